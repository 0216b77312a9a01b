"""PROXY protocol and the per-source limit through the real CLI.

``serve`` in a subprocess with the new flags and variables (a bad CIDR is a
usage error), ``check`` and ``bench`` sending a header at it, ``--workers``
(each worker gets the config through the environment and runs the stages
itself), and socket activation by ``systemd-socket-activate``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from typing import Any

import pytest
import trio
from typer.testing import CliRunner

from echosvc.cli import app
from echosvc.client import HeaderVersion, ProxyClaim, parse_endpoint
from echosvc.config import Config, ProxyProtocol, environment_for
from echosvc.proxyproto import ProxyParser

from .support import ECHOSVC, Daemon, child_env, connect, receive_exactly

TIME_LIMIT = 30


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ECHOSVC, *args],
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=TIME_LIMIT,
        check=False,
    )


async def run_cli_async(*args: str, env: dict[str, str] | None = None) -> Any:
    return await trio.to_thread.run_sync(lambda: run_cli(*args, env=env))


# --- the client's header -----------------------------------------------------------------


def test_parse_endpoint() -> None:
    assert parse_endpoint("203.0.113.7:4000") == ("203.0.113.7", 4000)
    assert parse_endpoint("[2001:DB8::7]:0") == ("2001:db8::7", 0)
    for bad in (
        "203.0.113.7",
        "203.0.113.7:",
        "203.0.113.7:65536",
        "203.0.113.7:+80",
        "203.0.113.7:080",
        "2001:db8::7:4000",
        "[203.0.113.7]:1",
        "[fe80::1%eth0]:1",
        "example.com:80",
    ):
        with pytest.raises(ValueError):  # noqa: PT011 -- the message is for humans
            parse_endpoint(bad)


@pytest.mark.parametrize(
    ("claim", "local", "remote", "source", "destination"),
    [
        # By default the connection's own address: the truth.
        (ProxyClaim(HeaderVersion.V1), ("127.0.0.2", 5), ("127.0.0.1", 9), ("127.0.0.2", 5), None),
        (ProxyClaim(HeaderVersion.V2), ("::1", 5, 0, 0), ("::1", 9, 0, 0), ("::1", 5), None),
        (
            ProxyClaim(HeaderVersion.V2),
            ("::ffff:127.0.0.1", 5, 0, 0),
            ("::ffff:127.0.0.1", 9, 0, 0),
            ("127.0.0.1", 5),
            ("127.0.0.1", 9),
        ),
        # A claim of the other family: the destination follows the claim's.
        (
            ProxyClaim(HeaderVersion.V1, ("2001:db8::7", 4000)),
            ("127.0.0.1", 5),
            ("127.0.0.1", 9),
            ("2001:db8::7", 4000),
            ("::ffff:7f00:1", 9),
        ),
        (
            ProxyClaim(HeaderVersion.V2, ("203.0.113.7", 4000)),
            ("::1", 5, 0, 0),
            ("::1", 9, 0, 0),
            ("203.0.113.7", 4000),
            ("0.0.0.0", 9),
        ),
    ],
)
def test_the_header_a_claim_makes(
    claim: ProxyClaim,
    local: tuple[Any, ...],
    remote: tuple[Any, ...],
    source: tuple[str, int],
    destination: tuple[str, int] | None,
) -> None:
    header = ProxyParser("any").feed(claim.header(local, remote))
    assert header is not None
    assert header.version == (1 if claim.version is HeaderVersion.V1 else 2)
    assert header.source == source
    assert header.destination == (destination or (remote[0], remote[1]))


# --- serve's flags -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "flag", "words"),
    [
        (["--proxy-trusted", "10.0.0.1/8"], None, "--proxy-trusted", "host bits set"),
        (
            ["--proxy-trusted", "10.0.0.0/8", "--proxy-trusted", "nope"],
            None,
            "--proxy-trusted",
            "'nope'",
        ),
        ([], {"ECHOSVC_PROXY_TRUSTED": "10.0.0.0/8,fe80::/10%eth0"}, "--proxy-trusted", "zone id"),
        (["--proxy-protocol", "v3"], None, "--proxy-protocol", "'v3'"),
        (["--proxy-timeout", "-1"], None, "--proxy-timeout", ">= 0"),
        (["--max-per-source", "-1"], None, "--max-per-source", "0 (no limit) or more"),
    ],
)
def test_bad_values_are_usage_errors_that_name_the_flag(
    args: list[str], env: dict[str, str] | None, flag: str, words: str
) -> None:
    # In-process: refused before anything binds or starts.
    done = CliRunner().invoke(app, ["serve", "--port", "0", *args], env=child_env(env))
    assert done.exit_code == 2, done.output
    assert f"'{flag}'" in done.output
    assert words in done.output
    assert done.exception is None or isinstance(done.exception, SystemExit)


def test_a_bad_cidr_in_the_environment_exits_2_from_the_real_command() -> None:
    done = run_cli("serve", "--port", "0", env={"ECHOSVC_PROXY_TRUSTED": "127.0.0.0/8, 10.0.0.1/8"})
    assert done.returncode == 2
    assert "Invalid value for '--proxy-trusted' / ECHOSVC_PROXY_TRUSTED" in done.stderr
    assert "'10.0.0.1/8' has host bits set" in done.stderr
    assert "Traceback" not in done.stderr


# --- check and bench against a PROXY listener ---------------------------------------------


async def test_check_with_and_without_a_header() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(
                nursery, "--port", "0", "--proxy-protocol", "v2", "--proxy-timeout", "1"
            )
            port = str(daemon.port)
            ok = await run_cli_async("check", "--port", port, "--proxy-protocol", "v2")
            assert (ok.returncode, ok.stdout.startswith("ok 127.0.0.1:")) == (0, True), ok.stderr
            claimed = await run_cli_async(
                "check",
                "--port",
                port,
                "--proxy-protocol",
                "v2",
                "--proxy-source",
                "[2001:db8::7]:4",
            )
            assert claimed.returncode == 0, claimed.stderr
            # The variable the service reads, so a HEALTHCHECK sharing its
            # environment sends what it expects; "any" sends v2.
            shared = await run_cli_async(
                "check", "--port", port, env={"ECHOSVC_PROXY_PROTOCOL": "any"}
            )
            assert shared.returncode == 0, shared.stderr
            bare = await run_cli_async("check", "--port", port)
            assert bare.returncode == 1
            assert "closed after 0 of" in bare.stderr or "broken" in bare.stderr, bare.stderr
            v1 = await run_cli_async("check", "--port", port, "--proxy-protocol", "v1")
            assert v1.returncode == 1
            usage = await run_cli_async("check", "--port", port, "--proxy-source", "1.2.3.4:5")
            assert (usage.returncode, "'--proxy-source'" in usage.stderr) == (2, True)
            await daemon.wait_for("connection_closed", 5)
            assert await daemon.stop() == 0
    closed = daemon.events("connection_closed")
    assert [c["reason"] for c in closed] == ["eof"] * 3 + ["proxy_invalid"] * 2
    assert closed[0]["peer"] == closed[0]["proxy"], "by default the header names the prober"
    assert closed[1]["peer"] == "[2001:db8::7]:4"
    assert closed[1]["proxy"].startswith("127.0.0.1:")
    assert closed[3]["detail"] == "not a PROXY protocol header"
    assert closed[4]["detail"] == "PROXY v1 header where only v2 is accepted"


async def test_bench_sends_a_header_on_every_connection() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, "--port", "0", "--proxy-protocol", "v1")
            done = await run_cli_async(
                "bench",
                f"--port={daemon.port}",
                "--connections=4",
                "--processes=2",
                "--warmup=0",
                "--duration=0.3",
                "--json",
                "--proxy-protocol=v1",
                "--proxy-source=198.51.100.20:7",
            )
            assert done.returncode == 0, done.stdout + done.stderr
            await daemon.wait_for("connection_closed", 4)
            assert await daemon.stop() == 0
    closed = daemon.events("connection_closed")
    assert {(c["peer"], c["reason"]) for c in closed} == {("198.51.100.20:7", "eof")}
    assert all(c["lines"] > 0 for c in closed)


# --- workers and socket activation -------------------------------------------------------


async def connect_from(source_ip: str, port: int) -> trio.SocketStream:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        await sock.bind((source_ip, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def echo_or_refusal(stream: trio.SocketStream) -> bytes:
    """The echo of ``hello\\n``, or b"" for a connection refused (FIN or RST)."""
    received = b""
    with trio.move_on_after(5):
        try:
            while len(received) < 6 and (chunk := await stream.receive_some(6 - len(received))):
                received += chunk
        except trio.BrokenResourceError:
            pass
    return received


async def test_each_worker_reads_headers_and_limits_sources_on_its_own() -> None:
    claim = ProxyClaim(HeaderVersion.V1, ("203.0.113.50", 1))
    env = {
        "ECHOSVC_PROXY_PROTOCOL": "v1",
        "ECHOSVC_PROXY_TRUSTED": "127.0.0.2/32, 127.0.0.3/32",
        "ECHOSVC_MAX_PER_SOURCE": "1",
    }
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(
                nursery, "--port", "0", "--workers", "2", "--log-level", "debug", env=env
            )
            await daemon.wait_for("listening", 3)
            held = []
            # Enough connections claiming one client that, spread over two
            # workers, each worker holds one and refuses the rest.
            for _ in range(8):
                stream = await connect_from("127.0.0.2", daemon.port)
                header = claim.header(stream.socket.getsockname(), stream.socket.getpeername())
                await stream.send_all(header + b"hello\n")
                held.append(stream)
            stranger = await connect_from("127.0.0.4", daemon.port)
            await stranger.send_all(b"no header, untrusted anyway\n")
            await daemon.wait_for("connection_closed", 7)
            echoed = [await echo_or_refusal(stream) for stream in held].count(b"hello\n")
            for stream in (*held, stranger):
                await stream.aclose()
            assert await daemon.stop() == 0
    closed = daemon.events("connection_closed")
    refused = [c for c in closed if c["reason"] == "source_limit"]
    workers = {c["worker"] for c in closed if c["reason"] != "proxy_untrusted"}
    reached = daemon.events("source_limit_reached")
    # One slot per worker: as many held as workers that got connections.
    assert echoed == len(workers) == 8 - len(refused), daemon.stderr_text()
    assert {c["peer"] for c in closed if c["reason"] != "proxy_untrusted"} == {"203.0.113.50:1"}
    assert {(r["source"], r["worker"]) for r in reached} <= {("203.0.113.50", w) for w in workers}
    assert len(reached) == len({c["worker"] for c in refused}), "once per episode per worker"
    [untrusted] = [c for c in closed if c["reason"] == "proxy_untrusted"]
    assert untrusted["peer"].startswith("127.0.0.4:")


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="needs systemd-socket-activate"
)
async def test_socket_activated_with_proxy_protocol() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = ["systemd-socket-activate", "-E", "PATH", "-E", "ECHOSVC_PROXY_PROTOCOL"]
    argv += ["-l", f"127.0.0.1:{port}", sys.executable, "-m", "echosvc", "serve"]
    env = {"ECHOSVC_PROXY_PROTOCOL": "v2"}
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, argv=argv, wait_for=None, env=env)
            with trio.fail_after(10):
                while True:
                    try:
                        first = await connect(port)
                        break
                    except OSError:
                        await trio.sleep(0.05)
            claim = ProxyClaim(HeaderVersion.V2, ("192.0.2.99", 99))
            local, remote = first.socket.getsockname(), first.socket.getpeername()
            await first.send_all(claim.header(local, remote) + b"activated\n")
            assert await receive_exactly(first, 10) == b"activated\n"
            await first.aclose()
            listening = (await daemon.wait_for("listening"))[0]
            assert listening["activation"] == "systemd"
            await daemon.wait_for("connection_closed")
            checked = await run_cli_async("check", "--port", str(port), "--proxy-protocol", "v2")
            assert checked.returncode == 0, checked.stderr
            await daemon.wait_for("connection_closed", 2)
            assert await daemon.stop() == 0
    first_closed = daemon.events("connection_closed")[0]
    assert (first_closed["peer"], first_closed["reason"]) == ("192.0.2.99:99", "eof")
    assert first_closed["proxy"] == f"127.0.0.1:{local[1]}"


def test_the_defaults_and_the_environment_workers_get() -> None:
    config = Config()
    assert config.proxy_protocol is ProxyProtocol.OFF
    assert [str(n) for n in config.proxy_trusted] == ["127.0.0.0/8", "::1/128"]
    assert (config.proxy_timeout, config.max_per_source) == (5, 0)
    environ = environment_for(
        Config(
            proxy_protocol="any", proxy_trusted=["10.0.0.0/8", "2001:db8::/32"], max_per_source=3
        )
    )
    assert environ["ECHOSVC_PROXY_PROTOCOL"] == "any"
    assert environ["ECHOSVC_PROXY_TRUSTED"] == "10.0.0.0/8,2001:db8::/32"
    assert (environ["ECHOSVC_PROXY_TIMEOUT"], environ["ECHOSVC_MAX_PER_SOURCE"]) == ("5.0", "3")
