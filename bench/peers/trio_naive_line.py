"""The naive Trio port of the Go line-echo server.

``trio.serve_tcp``; per connection a loop that reads into a buffer and, for each
line, arms one ``trio.move_on_after(300)`` around reading that line (the mirror of
``SetReadDeadline``) and does one ``await stream.send_all(line)``.
"""

from __future__ import annotations

import argparse
import signal
from functools import partial

import trio

READ_TIMEOUT = 300.0
MAX_LINE = 64 * 1024


async def handle(stream: trio.SocketStream) -> None:
    buf = bytearray()
    try:
        while True:
            line = None
            with trio.move_on_after(READ_TIMEOUT):
                while (end := buf.find(b"\n") + 1) == 0:
                    if len(buf) >= MAX_LINE:
                        return
                    data = await stream.receive_some(65536)
                    if not data:
                        return  # EOF (an unterminated final line is dropped, as in Go)
                    buf += data
                line = bytes(buf[:end])
                del buf[:end]
            if line is None:
                return  # read deadline
            await stream.send_all(line)
    except trio.BrokenResourceError:
        pass  # peer reset


async def main(host: str, port: int) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(trio.serve_tcp, handle, port, host=host))
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()
    trio.run(main, args.host, args.port)
