"""The client side: the health probe behind ``echosvc check``.

`probe` connects, sends one random line and expects exactly that line back,
all under one deadline. It is what a load balancer, a container
``HEALTHCHECK`` or a monitoring system should run: it proves the service
accepts, reads, and echoes, not merely that a port is open.
"""

from __future__ import annotations

import errno
import os
import secrets
import socket

import trio

__all__ = ["ProbeError", "probe"]


class ProbeError(Exception):
    """The probe failed; the message says why, for a human."""


async def probe(host: str, port: int, timeout: float) -> float:  # noqa: ASYNC109
    """Round-trip one random line through the echo service at ``host:port``.

    ``timeout`` bounds the whole probe -- resolve, connect, send, receive --
    which is the contract of a health check, so it is a parameter rather
    than the caller's cancel scope.

    Returns:
      The seconds from sending the line to receiving all of its echo.

    Raises:
      ProbeError: connection refused, timed out, closed early, or a mismatch.

    """
    line = b"echosvc-check " + secrets.token_hex(16).encode() + b"\n"
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_tcp_stream(host, port)
            async with stream:
                started = trio.current_time()
                await stream.send_all(line)
                received = b""
                while len(received) < len(line):
                    chunk = await stream.receive_some(len(line) - len(received))
                    if not chunk:
                        raise ProbeError(
                            f"connection closed after {len(received)} of {len(line)} bytes"
                        )
                    received += chunk
                elapsed = trio.current_time() - started
    except trio.TooSlowError:
        raise ProbeError(f"no echo within {timeout:g} s") from None
    except socket.gaierror as exc:
        raise ProbeError(f"cannot resolve {host!r}: {exc.strerror}") from None
    except OSError as exc:
        raise ProbeError(_describe(exc)) from None
    except trio.BrokenResourceError as exc:
        raise ProbeError(f"connection broken: {exc.__cause__ or exc}") from None
    if received != line:
        raise ProbeError(f"echo mismatch: sent {line!r}, received {received!r}")
    return elapsed


def _describe(exc: OSError) -> str:
    # When every address fails, open_tcp_stream raises a bare OSError whose
    # cause is an ExceptionGroup of the per-address errors: report the first.
    cause: BaseException = exc
    while isinstance(cause, OSError) and cause.errno is None and cause.__cause__ is not None:
        cause = cause.__cause__
        if isinstance(cause, BaseExceptionGroup):
            cause = cause.exceptions[0]
    if isinstance(cause, OSError) and cause.errno == errno.ECONNREFUSED:
        return "connection refused"
    if isinstance(cause, OSError) and cause.errno is not None:
        return os.strerror(cause.errno).lower()
    return str(exc)
