"""The canary: a fresh connection and one round trip every interval, in its own process.

Run by the soak as ``python -m tests.soak.canary HOST PORT SOURCE INTERVAL``. It
prints one JSON object per probe on stdout -- ``peer`` (its own address, to
find the server's ``connection_closed`` record), ``latency`` (connect plus
round trip, in seconds) or ``error`` -- and stops when its stdin closes.

Its own process, so that what it measures is the server (the accept loop
and the event loop's lag), not the load generator's busy event loop.
"""

from __future__ import annotations

import json
import socket
import sys

import trio

PROBE_TIMEOUT_S = 5.0


async def _round_trip(stream: trio.SocketStream, line: bytes) -> None:
    await stream.send_all(line)
    echoed = b""
    while len(echoed) < len(line):
        chunk = await stream.receive_some(len(line) - len(echoed))
        if not chunk:
            raise EOFError(f"EOF after {echoed!r}")
        echoed += chunk
    if echoed != line:
        raise ValueError(f"sent {line!r}, got {echoed!r}")


async def probe(host: str, port: int, source: str, number: int) -> dict[str, object]:
    started = trio.current_time()
    line = b"canary %d \x00\xff\n" % number
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    result: dict[str, object] = {"peer": None, "latency": None, "error": None}
    try:
        with trio.fail_after(PROBE_TIMEOUT_S):
            await sock.bind((source, 0))
            await sock.connect((host, port))
            address, local_port = sock.getsockname()
            result["peer"] = f"{address}:{local_port}"
            async with trio.SocketStream(sock) as stream:
                await _round_trip(stream, line)
                result["latency"] = trio.current_time() - started
    except (OSError, EOFError, ValueError, trio.TooSlowError, trio.BrokenResourceError) as exc:
        result["error"] = repr(exc)
    finally:
        sock.close()
    return result


async def main(host: str, port: int, source: str, interval: float) -> None:
    stop = trio.Event()
    async with trio.open_nursery() as nursery:

        async def stop_when_stdin_closes() -> None:
            stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
            while await stdin.receive_some():
                pass
            stop.set()

        nursery.start_soon(stop_when_stdin_closes)
        next_at = trio.current_time()
        number = 0
        # A probe under way when stdin closes is finished and reported: the
        # server logs every connection, and the soak accounts for each one.
        while not stop.is_set():
            result = await probe(host, port, source, number)
            sys.stdout.write(json.dumps(result) + "\n")
            sys.stdout.flush()
            number += 1
            next_at = max(next_at + interval, trio.current_time())
            with trio.move_on_at(next_at):
                await stop.wait()


if __name__ == "__main__":
    host, port, source, interval = sys.argv[1:]
    trio.run(main, host, int(port), source, float(interval))
