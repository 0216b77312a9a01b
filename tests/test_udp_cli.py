"""UDP echo where users meet it: ``echosvc serve --udp`` and ``echosvc check --udp``
as real subprocesses, socket activation with ``systemd-socket-activate
--datagram``, the deploy units with ``ListenDatagram=``, and floods.

Floods come from ``python -m tests.udp_support flood`` in a process of its
own: forged datagrams from tens of thousands of ``127.x.y.z`` sources
(loopback delivers them), so the server meets the spoofed-source flood a
reflector attack would send, and the test's own loop is free to measure.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from .support import ECHOSVC, Daemon, connect, receive_exactly, round_trip
from .test_cli import run_cli
from .test_deploy import needs_systemd_analyze, render_units, run_tool
from .test_server import has_ipv6_loopback
from .udp_support import Peer, can_forge

TIME_LIMIT = 30
REPOSITORY = Path(__file__).resolve().parent.parent
needs_root = pytest.mark.skipif(not can_forge(), reason="forging datagrams needs root")
needs_socket_activate = pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate is not installed (Debian package systemd)",
)


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


async def run_flood(port: int, count: int, *, start: int = 0, pace: int = 0, seconds: float) -> int:
    """`tests.udp_support.flood` in a subprocess; how many datagrams it sent."""
    done = await trio.run_process(
        [
            sys.executable,
            "-m",
            "tests.udp_support",
            "flood",
            f"--port={port}",
            f"--count={count}",
            f"--start={start}",
            f"--pace={pace}",
            f"--seconds={seconds}",
        ],
        capture_stdout=True,
        cwd=REPOSITORY,
    )
    return int(done.stdout)


async def udp_echo(port: int, payload: bytes, host: str = "127.0.0.1") -> None:
    with Peer((host, 0)) as peer:
        peer.send(payload, (host, port))
        assert await peer.receive() == payload


# --- serve --udp --------------------------------------------------------------------


async def test_serve_udp_lists_udp_addresses_echoes_logs_drops_and_stops() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, "--port", "0", "--udp")
            port = daemon.port
            assert daemon.listening["addresses"] == [
                f"127.0.0.1:{port}",
                f"udp://127.0.0.1:{port}",
            ]
            await udp_echo(port, b"\x00\xffbinary\r\n")
            async with await connect(port) as client:
                await round_trip(client, b"tcp too\n")
            with Peer(("127.0.0.1", 0)) as peer:
                peer.send(bytes(1473), ("127.0.0.1", port))
                [dropped] = await daemon.wait_for("udp_dropped")
            assert await daemon.stop() == 0
    assert dropped["level"] == "warning"
    assert {k: dropped[k] for k in ("rate", "port", "size", "source", "send")} == {
        "rate": 0,
        "port": 0,
        "size": 1,
        "source": 0,
        "send": 0,
    }
    assert daemon.events("stopped")[0]["connections_served"] == 1


async def test_workers_serve_udp_on_the_port_the_supervisor_picked_and_say_so() -> None:
    """With --workers the supervisor picks the port (checking UDP is free on
    it too), lists the UDP addresses in its listening record, and every
    worker serves UDP there beside TCP."""
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, "--port", "0", "--udp", "--workers", "2")
            while not (ours := [e for e in daemon.events("listening") if "workers" in e]):
                await daemon.wait_for("listening", len(daemon.events("listening")) + 1)
            [listening] = ours  # the supervisor's, for the whole service
            port = int(listening["addresses"][0].rsplit(":", 1)[1])
            assert listening["addresses"] == [f"127.0.0.1:{port}", f"udp://127.0.0.1:{port}"]
            for i in range(8):  # the kernel spreads them over both workers' sockets
                await udp_echo(port, b"datagram %d" % i)
            async with await connect(port) as client:
                await round_trip(client, b"tcp too\n")
            assert await daemon.stop() == 0


@pytest.mark.parametrize(
    ("args", "env", "names"),
    [
        (["--udp-max-bytes", "0"], {}, "'--udp-max-bytes'"),
        (["--udp-max-bytes", "65528"], {}, "'--udp-max-bytes'"),
        (["--udp-rate", "0"], {}, "'--udp-rate'"),
        ([], {"ECHOSVC_UDP_RATE": "-1"}, "ECHOSVC_UDP_RATE"),
        ([], {"ECHOSVC_UDP": "maybe"}, "ECHOSVC_UDP"),
    ],
)
def test_bad_udp_values_are_usage_errors_that_name_the_option(
    args: list[str], env: dict[str, str], names: str
) -> None:
    done = run_cli("serve", "--port", "0", *args, env=env)
    assert done.returncode == 2
    assert names in done.stderr
    assert "Traceback" not in done.stderr


def test_a_udp_port_in_use_is_one_line_and_status_1() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        done = run_cli("serve", "--udp", "--port", str(port))
    assert done.returncode == 1
    assert done.stderr == (
        f"echosvc: cannot listen on udp://127.0.0.1:{port}: Address already in use\n"
    )


# --- check --udp --------------------------------------------------------------------


async def test_check_udp_reports_a_round_trip_or_why_not() -> None:
    hosts = ["--host", "127.0.0.1"] + (["--host", "::1"] if has_ipv6_loopback() else [])
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, "--port", "0", "--udp", *hosts)
            port = str(daemon.port)
            ok = await trio.to_thread.run_sync(run_cli, "check", "--udp", "--port", port)
            assert (ok.returncode, ok.stderr) == (0, "")
            assert ok.stdout.startswith(f"ok udp://127.0.0.1:{port} round trip ")
            if has_ipv6_loopback():
                six = await trio.to_thread.run_sync(
                    run_cli, "check", "--udp", "--host", "::1", "--port", port
                )
                assert six.returncode == 0
                assert six.stdout.startswith(f"ok udp://[::1]:{port} round trip ")
            assert await daemon.stop() == 0
    refused = run_cli("check", "--udp", "--port", port, "--timeout", "5")
    assert refused.returncode == 1
    assert refused.stderr == (
        f"echosvc check: udp://127.0.0.1:{port}: port unreachable: nothing serves UDP there\n"
    )


async def test_check_udp_resends_then_fails_against_something_that_does_not_echo() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as mute:
        mute.bind(("127.0.0.1", 0))
        port = mute.getsockname()[1]
        done = await trio.to_thread.run_sync(
            run_cli, "check", "--udp", "--port", str(port), "--timeout", "0.5"
        )
        mute.setblocking(False)
        probes = []
        while True:
            try:
                probes.append(mute.recv(100))
            except BlockingIOError:
                break
    assert done.returncode == 1
    assert done.stderr == f"echosvc check: udp://127.0.0.1:{port}: no echo within 0.5 s\n"
    # UDP may lose one: four distinct datagrams over the timeout.
    assert len(set(probes)) == len(probes) == 4
    assert all(re.fullmatch(rb"echosvc-check [0-9a-f]{16}", probe) for probe in probes)


# --- floods ---------------------------------------------------------------------------


@needs_root
async def test_a_spoofed_source_flood_past_the_table_size_leaves_memory_flat() -> None:
    # A generous rate, so the marker the flood paces itself with is never
    # refused; the table's dynamics do not depend on it (a bucket refills
    # within a second, whatever the rate).
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, "--port", "0", "--udp", "--udp-rate", "1000000")
            pid, port = daemon.process.pid, daemon.port
            # Past the table's 65,536 sources, and until its own churn has
            # settled (its dict grows once more while entries are replaced).
            assert await run_flood(port, 130_000, pace=128, seconds=25) == 130_000
            full = rss_kib(pid)
            assert await run_flood(port, 100_000, start=130_000, pace=128, seconds=25) == 100_000
            after = rss_kib(pid)
            await udp_echo(port, b"still answering")
            assert await daemon.stop() == 0
    # A table keeping every source would hold 100,000 more (about 180 bytes
    # each: some 18 MB); the bounded one reuses its places.
    growth_mib = (after - full) / 1024
    print(f"RSS at 130,000 sources: {full / 1024:.1f} MiB; 100,000 more: {growth_mib:+.1f} MiB")
    assert growth_mib < 6, f"RSS grew {growth_mib:.1f} MiB"


# The latency promise under a UDP flood, on a shared 2-core machine with the
# flood generator, the server and this test competing: generous on purpose.
TCP_LATENCY_BOUND_S = 0.5


@needs_root
async def test_tcp_clients_keep_their_latency_beside_a_udp_flood() -> None:
    latencies: list[float] = []
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, "--port", "0", "--udp")
            port = daemon.port
            flooding = trio.Event()
            flood_over = trio.Event()
            sent = [0]

            async def flood() -> None:
                flooding.set()
                # Unpaced: as fast as one process can forge them, 4 s at most.
                sent[0] = await run_flood(port, 150_000, seconds=4)
                flood_over.set()

            async def client(index: int) -> None:
                line = b"%d " % index + b"x" * 60 + b"\n"
                async with await connect(port) as stream:
                    await flooding.wait()
                    while not flood_over.is_set():
                        started = trio.current_time()
                        await stream.send_all(line)
                        assert await receive_exactly(stream, len(line)) == line
                        latencies.append(trio.current_time() - started)
                        await trio.sleep(0.01)

            async with trio.open_nursery() as load:
                for index in range(10):
                    load.start_soon(client, index)
                load.start_soon(flood)
            await udp_echo(port, b"after the flood")
            assert await daemon.stop() == 0
    assert sent[0] > 10_000
    assert len(latencies) > 50
    worst = max(latencies)
    print(f"{sent[0]} forged datagrams; {len(latencies)} TCP round trips, worst {worst:.3f} s")
    assert worst < TCP_LATENCY_BOUND_S
    assert "Traceback" not in daemon.stderr_text()


# --- socket activation -----------------------------------------------------------------


@needs_socket_activate
async def test_serves_the_datagram_socket_systemd_socket_activate_passes() -> None:
    port = free_udp_port()
    argv = ["systemd-socket-activate", "--datagram", "-l", f"127.0.0.1:{port}", "-E", "PATH"]
    argv += [*ECHOSVC, "serve"]
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, argv=argv, wait_for=None)
            with Peer() as peer:
                # The first datagram starts the service, which then finds it
                # waiting on the socket. Until systemd-socket-activate has
                # bound the port, datagrams are refused: send again.
                with trio.fail_after(10):
                    while True:
                        with contextlib.suppress(ConnectionRefusedError):
                            peer.send(b"wake up", ("127.0.0.1", port))
                        with trio.move_on_after(0.2):
                            assert await peer.receive() == b"wake up"
                            break
                listening = (await daemon.wait_for("listening"))[0]
                assert listening["activation"] == "systemd"
                assert listening["addresses"] == [f"udp://127.0.0.1:{port}"]
                assert listening["pid"] == daemon.process.pid
                peer.send(b"again", ("127.0.0.1", port))
                while await peer.receive() == b"wake up":  # every one sent is echoed
                    pass
            assert await daemon.stop() == 0


# Moves the descriptors to 3, 4, ... and execs echosvc as systemd would:
# LISTEN_PID is the pid echosvc will have, since exec keeps it.
_AS_SYSTEMD = """
import os, sys
fds = [int(fd) for fd in sys.argv[1].split(",")]
for target, fd in enumerate(fds, start=3):
    os.dup2(fd, target)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)))
os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
"""


def passing_fds_as_systemd(*fds: int) -> list[str]:
    """argv that serves ``fds`` as if systemd had passed them."""
    assert all(fd > 2 + len(fds) for fd in fds), fds
    return [sys.executable, "-c", _AS_SYSTEMD, ",".join(map(str, fds)), "-m", "echosvc", "serve"]


async def test_inherited_stream_and_datagram_sockets_serve_tcp_and_udp() -> None:
    with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen()
        port = tcp.getsockname()[1]
        udp.bind(("127.0.0.1", port))
        with trio.fail_after(TIME_LIMIT):
            async with trio.open_nursery() as nursery:
                daemon = await Daemon.start(
                    nursery,
                    argv=passing_fds_as_systemd(tcp.fileno(), udp.fileno()),
                    pass_fds=(tcp.fileno(), udp.fileno()),
                )
                assert daemon.listening["activation"] == "systemd"
                assert daemon.listening["addresses"] == [
                    f"127.0.0.1:{port}",
                    f"udp://127.0.0.1:{port}",
                ]
                async with await connect(port) as client:
                    await round_trip(client, b"inherited tcp\n")
                await udp_echo(port, b"inherited udp")
                assert await daemon.stop() == 0


def test_an_inherited_unix_datagram_socket_is_one_line_and_status_1(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unix:
        unix.bind(str(tmp_path / "sock"))
        done = subprocess.run(
            passing_fds_as_systemd(unix.fileno()),
            pass_fds=(unix.fileno(),),
            capture_output=True,
            text=True,
            timeout=TIME_LIMIT,
            env={key: value for key, value in os.environ.items() if "ECHOSVC" not in key},
            check=False,
        )
    assert done.returncode == 1
    assert done.stderr == (
        "echosvc: inherited fd 3 is a datagram socket of family AF_UNIX;"
        " only UDP (IPv4 or IPv6) is served\n"
    )


@needs_systemd_analyze
def test_the_socket_unit_with_listen_datagram_verifies_and_the_exposure_holds(
    tmp_path: Path,
) -> None:
    render_units(tmp_path)
    unit = tmp_path / "echosvc.socket"
    text = unit.read_text()
    assert text.count("\n#ListenDatagram=127.0.0.1:9000\n") == 1
    unit.write_text(text.replace("\n#ListenDatagram=", "\nListenDatagram="))
    result = run_tool(
        "systemd-analyze", "verify", "echosvc.socket", "echosvc.service", cwd=tmp_path
    )
    assert (result.returncode, (result.stdout + result.stderr).strip()) == (0, "")
    security = run_tool(
        "systemd-analyze", "security", "--offline=yes", "echosvc.service", cwd=tmp_path
    )
    [score] = re.findall(r"Overall exposure level for \S+: (\d+\.\d+)", security.stdout)
    assert float(score) <= 0.5, security.stdout
