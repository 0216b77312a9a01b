"""Line echo as a bare ``asyncio.Protocol`` (on uvloop by default): the classic
"fastest Python echo" reference.

``data_received`` echoes every complete line of the batch with one
``transport.write`` and keeps the unterminated tail for the next batch (closing the
connection when that tail exceeds 64 KiB). No per-line deadline, no write flow
control: this is the lower bound for per-request cost in Python, not a robust server.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import cast

import uvloop

MAX_LINE = 64 * 1024


class LineEcho(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.partial = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.partial:
            data = self.partial + data
        end = data.rfind(b"\n") + 1
        if end:
            self.transport.write(data[:end])
        self.partial = data[end:]
        if len(self.partial) >= MAX_LINE:
            self.transport.close()

    def eof_received(self) -> bool | None:
        assert self.transport is not None
        if self.partial:
            self.transport.write(self.partial)
        return None  # close the transport


async def main(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(LineEcho, host, port)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = parser.parse_args()
    factory = uvloop.new_event_loop if args.loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main(args.host, args.port))
