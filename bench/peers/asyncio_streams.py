"""Line echo on asyncio streams: the idiomatic asyncio port of the Go echo server.

Per connection: ``reader.readline()`` under ``asyncio.timeout(300)`` (the mirror of
Go's ``SetReadDeadline`` before every line), ``writer.write(line)``, ``await
writer.drain()``. Lines are limited to 64 KiB by the StreamReader limit. With
``--tls-cert`` the same over TLS 1.3 (``start_server(ssl=...)``), for the TLS benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import ssl

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


async def main(host: str, port: int, reuse_port: bool = False, tls_cert: str | None = None) -> None:
    context = None
    if tls_cert is not None:  # TLS 1.3, as echosvc's default
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        context.load_cert_chain(tls_cert)
    server = await asyncio.start_server(
        handle, host, port, limit=MAX_LINE, reuse_port=reuse_port or None, ssl=context
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
    parser.add_argument("--tls-cert", help="serve TLS with this PEM file (key and certificate)")
    args = parser.parse_args()
    factory = uvloop.new_event_loop if args.loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main(args.host, args.port, args.reuse_port, args.tls_cert))
