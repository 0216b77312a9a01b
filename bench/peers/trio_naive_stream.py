"""Naive Trio RFC 862 stream echo: ``async for data in stream: await
stream.send_all(data)`` under ``trio.serve_tcp``. No line framing, no deadline."""

from __future__ import annotations

import argparse
import signal
from functools import partial

import trio


async def handle(stream: trio.SocketStream) -> None:
    try:
        async for data in stream:
            await stream.send_all(data)
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
