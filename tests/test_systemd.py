"""The systemd protocol with real parts: ``systemd-socket-activate`` passes the
listening sockets, and a notify socket owned by the test plays the manager.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from echosvc import systemd

from .support import Daemon, child_env, connect, receive_until_eof, round_trip
from .test_server import has_ipv6_loopback

TIME_LIMIT = 30
needs_socket_activate = pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate is not installed (Debian package systemd)",
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


# --- the pure parts ---------------------------------------------------------


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_us() -> None:
    assert systemd.watchdog_interval({}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "200000"}) == 0.1
    mine = {"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}
    assert systemd.watchdog_interval(mine) == 15
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert systemd.watchdog_interval({"WATCHDOG_USEC": "0"}) is None


def test_listen_sockets_are_taken_only_when_meant_for_us_and_the_variables_go() -> None:
    environ = {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b", "OTHER": "x"}
    assert systemd.listen_sockets(environ) == []
    assert environ == {"OTHER": "x"}, "children must not inherit the activation"
    with pytest.raises(ValueError, match="LISTEN_FDS"):
        systemd.listen_sockets({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "many"})


def test_without_notify_socket_the_notifier_is_a_no_op() -> None:
    notifier = systemd.Notifier({})
    assert not notifier.enabled
    assert notifier.send("READY=1") is False


# --- socket activation ------------------------------------------------------


@needs_socket_activate
@pytest.mark.parametrize("ipv6", [False, True], ids=["ipv4", "ipv4+ipv6"])
async def test_serves_the_sockets_systemd_socket_activate_passes(ipv6: bool) -> None:
    if ipv6 and not has_ipv6_loopback():
        pytest.skip("this machine has no ::1")
    port = free_port()
    addresses = [f"127.0.0.1:{port}"] + ([f"[::1]:{port}"] if ipv6 else [])
    argv = ["systemd-socket-activate", "-E", "PATH"]
    for address in addresses:
        argv += ["-l", address]
    # --host/--port given too: ignored, with a warning.
    argv += [sys.executable, "-m", "echosvc", "serve", "--port", "1"]
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, argv=argv, wait_for=None)
            # systemd-socket-activate execs the service on the first connection.
            with trio.fail_after(10):
                while True:
                    try:
                        first = await connect(port)
                        break
                    except OSError:
                        await trio.sleep(0.05)
            await round_trip(first, b"woke the service\n")
            listening = (await daemon.wait_for("listening"))[0]
            assert listening["activation"] == "systemd"
            assert listening["addresses"] == addresses
            assert listening["pid"] == daemon.process.pid  # exec'd in place
            assert daemon.events("address_ignored")
            if ipv6:
                async with await connect(port, "::1") as second:
                    await round_trip(second, b"over ipv6\n")
            await first.aclose()
            assert await daemon.stop() == 0
    assert daemon.events("stopped")[0]["connections_served"] == 1 + ipv6


@needs_socket_activate
async def test_a_socket_that_is_not_listening_is_one_clear_line_and_status_1() -> None:
    """``Accept=yes`` hands the service one connected socket per connection,
    which echosvc cannot serve: it says so in one line, no traceback."""
    port = free_port()
    argv = ["systemd-socket-activate", "--accept", "-E", "PATH", "-l", f"127.0.0.1:{port}"]
    argv += [sys.executable, "-m", "echosvc", "serve", "--log-format", "json"]
    with trio.fail_after(TIME_LIMIT):
        activate = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            with trio.fail_after(10):
                while True:
                    try:
                        client = await connect(port)
                        break
                    except OSError:
                        await trio.sleep(0.05)
            # The service exits at once: our connection is closed.
            assert await receive_until_eof(client) == b""
            await client.aclose()
            assert activate.stderr is not None
            output = b""
            with trio.move_on_after(5):
                while b"Accept=no" not in output:
                    output += await activate.stderr.receive_some()
        finally:
            activate.kill()
            with trio.move_on_after(5, shield=True):
                await activate.wait()
    text = output.decode()
    assert "echosvc: inherited fd 3 is a connected stream socket, not a listening one" in text
    assert "Traceback" not in text


@pytest.mark.parametrize("kind", ["connected", "datagram"])
def test_an_unservable_inherited_socket_exits_1_with_one_line(kind: str) -> None:
    """The same protocol by hand, to see the exit status: fd 3 and
    LISTEN_PID set to the service's own pid (the shell execs it)."""
    if kind == "connected":
        ours, theirs = socket.socketpair()
    else:
        ours, theirs = socket.socket(type=socket.SOCK_DGRAM), socket.socket(type=socket.SOCK_DGRAM)
    with ours, theirs:
        # Put the socket at fd 3 and exec, keeping the pid LISTEN_PID names.
        trampoline = (
            "import os, sys; os.dup2(int(sys.argv[1]), 3);"
            " os.environ['LISTEN_PID'] = str(os.getpid());"
            " os.execv(sys.executable, [sys.executable, '-m', 'echosvc', 'serve'])"
        )
        result = subprocess.run(
            [sys.executable, "-c", trampoline, str(theirs.fileno())],
            env={**child_env(), "LISTEN_FDS": "1"},
            pass_fds=[theirs.fileno()],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("echosvc: inherited fd 3 is a ")


def test_an_inherited_seqpacket_socket_is_refused_by_name() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        fd = os.dup(ours.fileno())
        with pytest.raises(ValueError, match=f"inherited fd {fd} is a seqpacket socket"):
            systemd.sockets_from_fds([fd])


# --- sd_notify --------------------------------------------------------------


class Manager:
    """A notify socket, as systemd would hold it; collects what it receives."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.messages: list[tuple[float, str]] = []
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._arrived = trio.Event()

    async def bind(self) -> None:
        await self.sock.bind(self.address.replace("@", "\0", 1))

    async def collect(self) -> None:
        while True:
            data = await self.sock.recv(4096)
            self.messages.append((trio.current_time(), data.decode()))
            self._arrived.set()
            self._arrived = trio.Event()

    def received(self, assignment: str) -> list[float]:
        """When each message containing ``assignment`` arrived."""
        return [at for at, text in self.messages if assignment in text.split("\n")]

    def statuses(self) -> list[str]:
        return [
            line
            for _, text in self.messages
            for line in text.split("\n")
            if line.startswith("STATUS=")
        ]

    async def wait_for(self, assignment: str) -> None:
        while not self.received(assignment) and assignment not in self.statuses():
            await self._arrived.wait()

    async def wait_for_count(self, assignment: str, count: int) -> None:
        """Wait until ``count`` messages contained ``assignment``."""
        while len(self.received(assignment)) < count:
            await self._arrived.wait()


@pytest.mark.parametrize("namespace", ["path", "abstract"])
async def test_ready_status_watchdog_and_stopping_reach_the_notify_socket(
    namespace: str, tmp_path: Path
) -> None:
    if namespace == "path":
        address = str(tmp_path / "notify")
    else:
        address = f"@echosvc-test-{secrets.token_hex(8)}"
    manager = Manager(address)
    await manager.bind()
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "200000"}
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(manager.collect)
            daemon = await Daemon.start(
                nursery, "--port", "0", "--shutdown-grace", "1", env=env, wait_for=None
            )
            await manager.wait_for("READY=1")
            # READY=1 is sent once the port accepts.
            await daemon.wait_for("listening")
            async with await connect(daemon.port) as one, await connect(daemon.port) as stuck:
                await round_trip(one, b"1\n")
                with trio.fail_after(3):
                    await manager.wait_for("STATUS=serving 2 connections")
                # A client that never reads keeps the server in its grace period.
                with trio.move_on_after(0.3):
                    while True:
                        await stuck.send_all(b"s" * 1023 + b"\n")
                daemon.send_signal(signal.SIGTERM)
                await manager.wait_for("STOPPING=1")
                # The idle client hangs up when the server does, as clients
                # do; the server's lingering close waits for that.
                assert await receive_until_eof(one) == b""
                await one.aclose()
                assert await daemon.wait() == 0
                exited_at = trio.current_time()
            nursery.cancel_scope.cancel()
    ready_at = manager.received("READY=1")[0]
    stopping_at = manager.received("STOPPING=1")[0]
    pings = manager.received("WATCHDOG=1")
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert len(pings) >= 5
    assert max(gaps) < 0.5, f"the watchdog was starved: gaps {gaps}"
    assert ready_at <= pings[0] + 0.05
    # Pings go on through the 1 s grace, until exit.
    assert len([at for at in pings if stopping_at < at < exited_at]) >= 5
    assert stopping_at > ready_at
    assert manager.statuses()[0] == "STATUS=serving 0 connections"
    assert "STATUS=draining 1 connection" in manager.statuses()
    # The idle client was closed at once, the stuck one when the grace ran out.
    assert [e["reason"] for e in daemon.events("connection_closed")] == ["shutdown", "shutdown"]
