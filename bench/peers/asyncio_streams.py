"""Line echo on asyncio streams: the idiomatic asyncio port of the Go echo server.

Per connection: ``reader.readline()`` under ``asyncio.timeout(300)`` (the mirror of
Go's ``SetReadDeadline`` before every line), ``writer.write(line)``, ``await
writer.drain()``. Lines are limited to 64 KiB by the StreamReader limit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

import uvloop

READ_TIMEOUT = 300.0
MAX_LINE = 64 * 1024


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            async with asyncio.timeout(READ_TIMEOUT):
                line = await reader.readline()
            if not line:
                break
            writer.write(line)
            await writer.drain()
    except (TimeoutError, ValueError, ConnectionError):
        pass  # deadline, line over the limit (readline raises ValueError), reset
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def main(host: str, port: int, reuse_port: bool = False) -> None:
    server = await asyncio.start_server(
        handle, host, port, limit=MAX_LINE, reuse_port=reuse_port or None
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument(
        "--reuse-port", action="store_true", help="SO_REUSEPORT: several copies share the port"
    )
    args = parser.parse_args()
    factory = uvloop.new_event_loop if args.loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main(args.host, args.port, args.reuse_port))
