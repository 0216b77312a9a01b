"""Test support: the real ``echosvc`` CLI in a subprocess, and stream helpers.

Shared by the CLI, systemd and soak tests: the daemon is started exactly as
a user would start it, and its stderr is parsed line by line, so every test
asserts on the public log interface rather than on internals.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import structlog
import structlog.testing
import trio
import trio.testing

ECHOSVC = [sys.executable, "-m", "echosvc"]
CONSOLE_SCRIPT = Path(sys.executable).parent / "echosvc"
START_TIMEOUT = 20
STOP_TIMEOUT = 15


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The test's environment without any ECHOSVC_* or systemd variables."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("ECHOSVC_", "LISTEN_", "NOTIFY_", "WATCHDOG_", "JOURNAL_"))
    }
    env.update(extra or {})
    return env


class Daemon:
    """An ``echosvc serve`` process and the log records it has written so far."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.records: list[dict[str, Any]] = []
        self.raw_lines: list[bytes] = []
        self._changed = trio.Event()
        self._logs_ended = False

    @classmethod
    async def start(
        cls,
        nursery: trio.Nursery,
        *args: str,
        env: Mapping[str, str] | None = None,
        argv: Sequence[str] = (*ECHOSVC, "serve"),
        wait_for: str | None = "listening",
        pass_fds: Sequence[int] = (),
        preexec_fn: Callable[[], object] | None = None,
        new_session: bool = False,
    ) -> Daemon:
        """Start ``echosvc serve *args`` with JSON logs; wait for ``listening``."""
        process = await trio.lowlevel.open_process(
            [*argv, "--log-format", "json", *args],
            env=child_env(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            pass_fds=pass_fds,
            preexec_fn=preexec_fn,
            start_new_session=new_session,
        )
        daemon = cls(process)
        nursery.start_soon(daemon._read_logs)
        if wait_for is not None:
            with trio.fail_after(START_TIMEOUT):
                await daemon.wait_for(wait_for)
        return daemon

    async def _read_logs(self) -> None:
        try:
            await self._parse_logs()
        finally:
            # A failed test cancels us: leave no server behind.
            if self.process.returncode is None:
                self.process.kill()

    async def _parse_logs(self) -> None:
        assert self.process.stderr is not None
        buffer = b""
        async with self.process.stderr:
            while chunk := await self.process.stderr.receive_some():
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    self.raw_lines.append(line)
                    if line.lstrip().startswith((b"{", b"<")):
                        self.records.append(json.loads(line[line.index(b"{") :]))
                self._changed.set()
                self._changed = trio.Event()
        self._logs_ended = True
        self._changed.set()

    def events(self, name: str) -> list[dict[str, Any]]:
        return [record for record in self.records if record["event"] == name]

    async def wait_for(self, name: str, count: int = 1) -> list[dict[str, Any]]:
        """Wait until ``count`` records named ``name`` were logged."""
        while len(self.events(name)) < count:
            if self._logs_ended:
                raise AssertionError(f"stderr closed before {name!r}:\n{self.stderr_text()}")
            await self._changed.wait()
        return self.events(name)

    async def wait_until(self, predicate: Callable[[], object]) -> None:
        """Wait until ``predicate()`` is true, checked after each batch of logs."""
        while not predicate():
            if self._logs_ended:
                raise AssertionError(f"stderr closed, still waiting:\n{self.stderr_text()}")
            await self._changed.wait()

    @property
    def listening(self) -> dict[str, Any]:
        return self.events("listening")[0]

    @property
    def port(self) -> int:
        return int(self.listening["addresses"][0].rsplit(":", 1)[1])

    def send_signal(self, signum: int = signal.SIGTERM) -> None:
        self.process.send_signal(signum)

    async def stop(self, signum: int = signal.SIGTERM) -> int:
        """Signal the process and wait for it; return its exit status."""
        self.send_signal(signum)
        return await self.wait()

    async def wait(self) -> int:
        """Wait (a bounded time) for the process to exit; return its status."""
        with trio.fail_after(STOP_TIMEOUT):
            return await self.process.wait()

    def stderr_text(self) -> str:
        return b"\n".join(self.raw_lines).decode(errors="replace")

    async def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


class Logs(structlog.testing.LogCapture):
    """Captures structlog records in-process, and lets a test wait for one."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = trio.Event()

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> NoReturn:
        try:
            super().__call__(logger, method_name, event_dict)
        finally:
            self._changed.set()
            self._changed = trio.Event()

    def events(self, name: str) -> list[MutableMapping[str, Any]]:
        return [entry for entry in self.entries if entry["event"] == name]

    async def wait_for(self, name: str, count: int = 1) -> list[MutableMapping[str, Any]]:
        while len(self.events(name)) < count:
            await self._changed.wait()
        return self.events(name)


@contextmanager
def captured_logs() -> Iterator[Logs]:
    """Like `structlog.testing.capture_logs`, with `Logs.wait_for`."""
    logs = Logs()
    previous = structlog.get_config()
    structlog.configure(processors=[logs])
    try:
        yield logs
    finally:
        structlog.configure(**previous)


async def connect(port: int, host: str = "127.0.0.1") -> trio.SocketStream:
    return await trio.open_tcp_stream(host, port)


async def receive_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    received = bytearray()
    while len(received) < size:
        chunk = await stream.receive_some(size - len(received))
        assert chunk, f"EOF after {len(received)} of {size} bytes: {bytes(received)!r}"
        received += chunk
    return bytes(received)


async def receive_until_eof(stream: trio.abc.ReceiveStream) -> bytes:
    received = bytearray()
    while chunk := await stream.receive_some():
        received += chunk
    return bytes(received)


async def round_trip(stream: trio.abc.Stream, line: bytes) -> None:
    await stream.send_all(line)
    assert await receive_exactly(stream, len(line)) == line


class MemoryPeer:
    """The client's end of a connection on `trio.testing` memory streams, with a
    socket buffer of ``capacity`` bytes.

    The client's operations are synchronous -- ``send`` (``put_data``),
    ``send_eof``, ``take``, ``reset`` -- so a test decides exactly in which
    scheduler pass data arrives. The send stream's ``send_all_hook`` moves
    each echo into `inbox` and holds ``send_all`` until the inbox is down to
    ``capacity`` bytes: a client that does not read makes the write deadline
    fire, which on plain memory streams (unbounded buffers) it never could. A
    reset breaks both directions. ``echo_times`` records when each echo
    arrived.
    """

    def __init__(self, capacity: int = 10**9) -> None:
        self.capacity = capacity
        self.incoming = trio.testing.MemoryReceiveStream()  # the server reads this
        self.outgoing = trio.testing.MemorySendStream(send_all_hook=self._sent)
        self.inbox = bytearray()  # echoed, not yet read by the client
        self.received = bytearray()
        self.echo_times: list[float] = []
        self.broken = False
        self._drained = trio.lowlevel.ParkingLot()

    def server_stream(self) -> trio.StapledStream[Any, Any]:
        return trio.StapledStream(self.outgoing, self.incoming)

    async def _sent(self) -> None:
        """An echo was sent: buffer it, and hold send_all until it fits."""
        if self.broken:
            raise trio.BrokenResourceError("the peer reset the connection")
        self._collect()
        while len(self.inbox) > self.capacity:
            await self._drained.park()
            if self.broken:
                raise trio.BrokenResourceError("the peer reset the connection")

    def _collect(self) -> bool:
        """Move what the server sent into the inbox; True once the server closed."""
        while True:
            try:
                data = self.outgoing.get_data_nowait()
            except trio.WouldBlock:
                return False
            if not data:
                return True
            self.inbox += data
            self.echo_times.append(trio.current_time())

    def send(self, data: bytes) -> bool:
        """Send ``data``; False if the server had already closed the connection."""
        try:
            self.incoming.put_data(data)
        except trio.ClosedResourceError:
            return False
        return True

    def send_eof(self) -> None:
        self.incoming.put_eof()

    def take(self, size: int) -> None:
        self._collect()
        self.received += self.inbox[:size]
        del self.inbox[:size]
        self._drained.unpark_all()

    def echo(self) -> bytes:
        """Everything echoed so far, read or not."""
        self._collect()
        return bytes(self.received + self.inbox)

    def reset(self) -> None:
        self.broken = True
        self.incoming.close()  # the server's receive fails
        self._drained.unpark_all()  # and so does a send it is waiting in

    @property
    def closed_by_server(self) -> bool:
        return self._collect()
