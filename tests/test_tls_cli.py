"""TLS through the real CLI and real peers: openssl, socat, ncat, HAProxy, systemd.

``echosvc serve --tls-cert ...`` in a subprocess, certificates from trustme:
byte-exact echoes through ``openssl s_client``, ``socat OPENSSL:`` and
``ncat --ssl``; the handshake deadline for real; unusable files as usage
errors naming the flag; SIGHUP reloads, alone and under ``--workers 2``,
with the ``RELOADING=1``/``READY=1`` bracket on a notify socket; ``check``
and ``bench`` with ``--tls``; socket activation; a PROXY v2 header then TLS
through a real HAProxy running deploy/haproxy-tls.cfg.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from typer.testing import CliRunner

from echosvc.cli import app

from .support import Daemon, child_env, receive_exactly
from .test_deploy import (
    DEPLOY,
    free_port,
    haproxy_stat,
    needs_haproxy,
    render_haproxy_cfg,
    running,
    wait_until,
)
from .test_proxy_cli import run_cli_async
from .test_systemd import Manager
from .tls_support import Certificates, ServerFiles, fingerprint, open_tls

TIME_LIMIT = 40
PAYLOAD = (
    b"plain\n\x00nul\r\n\xff\xfe not utf-8\n" + bytes(range(1, 256)).replace(b"\n", b"") + b"\n"
)


def needs(tool: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(shutil.which(tool) is None, reason=f"needs {tool}")


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return Certificates(tmp_path)


@pytest.fixture
def server_files(certs: Certificates) -> ServerFiles:
    return certs.server()


# --- usage errors -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "flag", "words"),
    [
        ("missing", "--tls-cert", "cannot read"),
        ("no key", "--tls-cert", "no private key in it"),
        ("wrong key", "--tls-key", "does not match the certificate"),
        ("garbage key", "--tls-key", "no PEM private key"),
        ("key alone", "--tls-key", "needs a certificate"),
        ("garbage CA", "--tls-client-ca", "no usable CA certificate"),
        ("version", "--tls-min-version", "'1.1'"),
        ("timeout", "--tls-handshake-timeout", ">= 0"),
    ],
)
def test_unusable_tls_settings_are_usage_errors_naming_the_flag(
    certs: Certificates, tmp_path: Path, case: str, flag: str, words: str
) -> None:
    good, other = certs.server("good"), certs.server("other")
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("garbage\n")
    args = {
        "missing": ["--tls-cert", str(tmp_path / "absent.pem")],
        "no key": ["--tls-cert", str(good.cert)],
        "wrong key": ["--tls-cert", str(good.cert), "--tls-key", str(other.key)],
        "garbage key": ["--tls-cert", str(good.cert), "--tls-key", str(garbage)],
        "key alone": ["--tls-key", str(good.key)],
        "garbage CA": [*good.args(), "--tls-client-ca", str(garbage)],
        "version": [*good.args(), "--tls-min-version", "1.1"],
        "timeout": [*good.args(), "--tls-handshake-timeout", "-1"],
    }[case]
    done = CliRunner().invoke(app, ["serve", "--port", "0", *args], env=child_env())
    assert done.exit_code == 2, done.output
    assert f"'{flag}'" in done.output
    assert words in done.output


async def test_the_real_command_exits_2_before_binding(
    server_files: ServerFiles, tmp_path: Path
) -> None:
    port = free_port()
    env = {"ECHOSVC_TLS_CERT": str(server_files.cert), "ECHOSVC_TLS_KEY": str(tmp_path / "nope")}
    with trio.fail_after(TIME_LIMIT):
        done = await run_cli_async("serve", "--port", str(port), env=env)
    assert done.returncode == 2
    assert "Invalid value for '--tls-key' / ECHOSVC_TLS_KEY" in done.stderr
    assert "Traceback" not in done.stderr
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", port))  # never bound by the refused serve


# --- real TLS clients ---------------------------------------------------------------


async def run_peer(argv: list[str], payload: bytes, *, hold_stdin: bool) -> bytes:
    """Run a TLS client tool: feed ``payload``, return all it printed.

    With ``hold_stdin`` stdin stays open until the whole echo has arrived
    (tools that exit at EOF on stdin without waiting for the echo).
    """
    process = await trio.lowlevel.open_process(
        argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert process.stdin is not None
    assert process.stdout is not None
    received = bytearray()
    try:
        await process.stdin.send_all(payload)
        if not hold_stdin:
            await process.stdin.aclose()
        while len(received) < len(payload) and (chunk := await process.stdout.receive_some()):
            received += chunk
        if hold_stdin:
            await process.stdin.aclose()
        while chunk := await process.stdout.receive_some():
            received += chunk
        await process.wait()
    finally:
        if process.returncode is None:
            process.kill()
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 5):
                await process.wait()
    return bytes(received)


@needs("openssl")
@needs("socat")
@needs("ncat")
async def test_openssl_socat_and_ncat_get_byte_exact_echoes(
    certs: Certificates, server_files: ServerFiles
) -> None:
    ca = str(certs.ca_file)
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, "--port", "0", *server_files.args())
            port = str(daemon.port)
            # -no_ign_eof: EOF on stdin sends close_notify; -nocommands: a
            # line starting with Q, R or K is data, not a command.
            s_client = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile", ca]
            s_client += ["-verify_return_error", "-quiet", "-no_ign_eof", "-nocommands"]
            assert await run_peer(s_client, PAYLOAD, hold_stdin=True) == PAYLOAD
            # socat sends close_notify at EOF and reads on (-t): the final
            # line without a newline comes back too, before our close_notify.
            socat = ["socat", "-t", "5", "-", f"OPENSSL:127.0.0.1:{port},cafile={ca}"]
            tail = PAYLOAD + b"no newline at the end"
            assert await run_peer(socat, tail, hold_stdin=False) == tail
            # ncat checks DNS names only, not IP addresses: "localhost".
            ncat = ["ncat", "--ssl", "--ssl-verify", "--ssl-trustfile", ca, "localhost", port]
            assert await run_peer(ncat, PAYLOAD, hold_stdin=True) == PAYLOAD
            await daemon.wait_for("connection_closed", 3)
            assert await daemon.stop() == 0
    s_closed, socat_closed, ncat_closed = daemon.events("connection_closed")
    lines = PAYLOAD.count(b"\n")
    for closed in (s_closed, socat_closed, ncat_closed):
        assert closed["tls_version"] == "TLSv1.3"
        assert closed["bytes_in"] >= len(PAYLOAD), "plaintext bytes"
    assert (s_closed["reason"], s_closed["lines"], s_closed["bytes_out"]) == (
        "eof",
        lines,
        len(PAYLOAD),
    )
    assert (socat_closed["reason"], socat_closed["lines"]) == ("eof", lines + 1)
    assert socat_closed["bytes_out"] == len(tail)
    # ncat closes its socket without a close_notify: a truncation, which
    # https_compatible=False reports as such.
    assert ncat_closed["reason"] in ("eof", "reset")
    assert ncat_closed["bytes_out"] == len(PAYLOAD)


@needs("openssl")
async def test_tls_12_refused_by_default_and_taken_when_allowed(
    certs: Certificates, server_files: ServerFiles
) -> None:
    ca = str(certs.ca_file)
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            strict = await Daemon.start(nursery, "--port", "0", *server_files.args())
            lenient = await Daemon.start(
                nursery, "--port", "0", *server_files.args(), "--tls-min-version", "1.2"
            )
            results = []
            for daemon in (strict, lenient):
                argv = ["openssl", "s_client", "-connect", f"127.0.0.1:{daemon.port}"]
                argv += ["-CAfile", ca, "-tls1_2", "-quiet", "-no_ign_eof", "-nocommands"]
                results.append(await run_peer(argv, b"twelve\n", hold_stdin=True))
            assert results == [b"", b"twelve\n"]
            for daemon in (strict, lenient):
                await daemon.wait_for("connection_closed")
                assert await daemon.stop() == 0
    [refused] = strict.events("connection_closed")
    assert (refused["reason"], refused["detail"]) == ("tls_failed", "unsupported protocol")
    [taken] = lenient.events("connection_closed")
    assert (taken["reason"], taken["tls_version"]) == ("eof", "TLSv1.2")


async def test_a_silent_client_meets_the_real_handshake_deadline(
    server_files: ServerFiles,
) -> None:
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(
                nursery, "--port", "0", *server_files.args(), "--tls-handshake-timeout", "0.5"
            )
            silent = await trio.open_tcp_stream("127.0.0.1", daemon.port)
            began = trio.current_time()
            # Closed the hard way: a RST is fine too.
            with contextlib.suppress(trio.BrokenResourceError):
                assert await silent.receive_some() == b""
            took = trio.current_time() - began
            await silent.aclose()
            await daemon.wait_for("connection_closed")
            assert await daemon.stop() == 0
    [closed] = daemon.events("connection_closed")
    assert closed["reason"] == "tls_timeout"
    assert 0.45 <= closed["duration_s"] < 2
    assert 0.4 <= took < 2


# --- check and bench ----------------------------------------------------------------


async def test_check_and_bench_speak_tls(certs: Certificates, server_files: ServerFiles) -> None:
    ca = str(certs.ca_file)
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, "--port", "0", *server_files.args())
            port = str(daemon.port)
            verified = await run_cli_async("check", "--port", port, "--tls", "--tls-ca", ca)
            assert verified.returncode == 0, verified.stderr
            assert verified.stdout.startswith(f"ok 127.0.0.1:{port} round trip")
            insecure = await run_cli_async("check", "--port", port, "--tls", "--tls-insecure")
            assert insecure.returncode == 0, insecure.stderr
            # The system's trust store does not know the test CA.
            untrusted = await run_cli_async("check", "--port", port, "--tls")
            assert untrusted.returncode == 1
            assert "certificate verify failed" in untrusted.stderr
            plain = await run_cli_async("check", "--port", port)
            assert plain.returncode == 1
            usage = await run_cli_async("check", "--port", port, "--tls-ca", ca)
            assert (usage.returncode, "'--tls-ca'" in usage.stderr) == (2, True)
            bench = await run_cli_async(
                "bench",
                f"--port={port}",
                "--tls",
                f"--tls-ca={ca}",
                "--connections=4",
                "--processes=2",
                "--warmup=0",
                "--duration=0.3",
                "--json",
            )
            assert bench.returncode == 0, bench.stdout + bench.stderr
            assert '"mismatches": 0' in bench.stdout
            await daemon.wait_for("connection_closed", 8)
            assert await daemon.stop() == 0
    reasons = [c["reason"] for c in daemon.events("connection_closed")]
    assert reasons.count("eof") == 6, reasons  # two checks and four bench connections
    assert reasons.count("tls_failed") == 2, reasons  # the unverified and the plain one


# --- reload on SIGHUP ---------------------------------------------------------------


def rotate(live: ServerFiles, to: ServerFiles) -> None:
    """Replace the files under the live paths, as a certificate renewal does."""
    live.cert.write_bytes(to.cert.read_bytes())
    live.key.write_bytes(to.key.read_bytes())


@pytest.mark.parametrize("workers", [1, 2])
async def test_sighup_reloads_new_connections_only_and_keeps_a_good_context(
    certs: Certificates, tmp_path: Path, workers: int
) -> None:
    first, second = certs.server("first"), certs.server("second")
    live = ServerFiles(tmp_path / "live.crt", tmp_path / "live.key", first.both, "")
    rotate(live, first)
    manager = Manager(str(tmp_path / "notify"))
    await manager.bind()
    context = certs.client_context()
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(manager.collect)
            daemon = await Daemon.start(
                nursery,
                "--port",
                "0",
                "--workers",
                str(workers),
                *live.args(),
                env={"NOTIFY_SOCKET": manager.address},
            )
            await daemon.wait_for("listening", workers + (workers > 1))
            await manager.wait_for("READY=1")
            old = [await open_tls(daemon.port, context) for _ in range(4)]
            assert {fingerprint(stream) for stream in old} == {first.fingerprint}

            rotate(live, second)
            daemon.send_signal(signal.SIGHUP)
            await daemon.wait_for("tls_reloaded", workers)
            # Each connection goes to whichever worker the kernel picks: all
            # of them see the new certificate.
            new = [await open_tls(daemon.port, context) for _ in range(6)]
            assert {fingerprint(stream) for stream in new} == {second.fingerprint}
            for stream in (*old, *new):
                await stream.send_all(b"still echoing\n")
                assert await receive_exactly(stream, 14) == b"still echoing\n"
            with trio.fail_after(5):
                await manager.wait_for_count("READY=1", 2)

            live.cert.write_text(
                "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n"
            )
            daemon.send_signal(signal.SIGHUP)
            await daemon.wait_for("tls_reload_failed", workers)
            kept = [await open_tls(daemon.port, context) for _ in range(4)]
            assert {fingerprint(stream) for stream in kept} == {second.fingerprint}
            for stream in (*old, *new, *kept):
                await stream.aclose()
            await daemon.wait_for("connection_closed", 14)
            assert await daemon.stop() == 0
            nursery.cancel_scope.cancel()  # the manager
    reloaded = daemon.events("tls_reloaded")
    failed = daemon.events("tls_reload_failed")
    assert all(r["not_after"].endswith("Z") for r in reloaded)
    assert all(r["level"] == "error" and "tls_cert" in r["error"] for r in failed)
    if workers > 1:
        assert {r["worker"] for r in reloaded} == {r["worker"] for r in failed} == {0, 1}
    closed = daemon.events("connection_closed")
    assert [c["reason"] for c in closed] == ["eof"] * 14
    # The bracket: RELOADING=1 with MONOTONIC_USEC=, then READY=1, each reload.
    reloading = [text for _, text in manager.messages if "RELOADING=1" in text.split("\n")]
    assert len(reloading) == 2, manager.messages
    assert all(re.search(r"^MONOTONIC_USEC=\d+$", text, re.M) for text in reloading)
    ready = manager.received("READY=1")
    starts = manager.received("RELOADING=1")
    assert len(ready) == 3, manager.messages  # started, and after each reload
    assert ready[0] < starts[0] <= ready[1] < starts[1] <= ready[2]


async def test_without_tls_a_sighup_changes_nothing_and_stops_nothing(tmp_path: Path) -> None:
    manager = Manager(str(tmp_path / "notify"))
    await manager.bind()
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(manager.collect)
            daemon = await Daemon.start(
                nursery, "--port", "0", env={"NOTIFY_SOCKET": manager.address}
            )
            await manager.wait_for("READY=1")
            stream = await trio.open_tcp_stream("127.0.0.1", daemon.port)
            daemon.send_signal(signal.SIGHUP)
            [requested] = await daemon.wait_for("reload_requested")
            await stream.send_all(b"after the hangup\n")
            assert await receive_exactly(stream, 17) == b"after the hangup\n"
            await stream.aclose()
            await daemon.wait_for("connection_closed")
            assert await daemon.stop() == 0
            nursery.cancel_scope.cancel()  # the manager
    assert requested["reloads"] == []
    assert not manager.received("RELOADING=1")
    assert not daemon.events("tls_reloaded")


# --- socket activation and HAProxy ---------------------------------------------------


@needs("systemd-socket-activate")
async def test_socket_activated_tls_listener(
    certs: Certificates, server_files: ServerFiles
) -> None:
    port = free_port()
    argv = ["systemd-socket-activate", "-E", "PATH"]
    argv += ["-E", "ECHOSVC_TLS_CERT", "-E", "ECHOSVC_TLS_KEY"]
    argv += ["-l", f"127.0.0.1:{port}", sys.executable, "-m", "echosvc", "serve"]
    env = {"ECHOSVC_TLS_CERT": str(server_files.cert), "ECHOSVC_TLS_KEY": str(server_files.key)}
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, argv=argv, wait_for=None, env=env)
            # "Listening on 127.0.0.1:PORT as 3.": bound, echosvc not started yet.
            await daemon.wait_until(
                lambda: any(b"Listening on" in line for line in daemon.raw_lines)
            )
            # The listener is systemd-socket-activate's from the start; the
            # first connection starts echosvc, which does the handshake.
            stream = await open_tls(port, certs.client_context())
            assert fingerprint(stream) == server_files.fingerprint
            await stream.send_all(b"activated over TLS\n")
            assert await receive_exactly(stream, 19) == b"activated over TLS\n"
            await stream.aclose()
            [listening] = await daemon.wait_for("listening")
            await daemon.wait_for("connection_closed")
            assert await daemon.stop() == 0
    assert listening["activation"] == "systemd"
    [closed] = daemon.events("connection_closed")
    assert (closed["reason"], closed["tls_version"]) == ("eof", "TLSv1.3")


def test_haproxy_tls_config_is_valid_as_shipped() -> None:
    done = subprocess.run(
        ["haproxy", "-c", "-f", str(DEPLOY / "haproxy-tls.cfg")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@needs_haproxy
async def test_a_proxy_v2_header_then_tls_through_haproxy(
    certs: Certificates, server_files: ServerFiles, tmp_path: Path
) -> None:
    frontend, backends = free_port(), (free_port(), free_port())
    stats = tmp_path / "haproxy.sock"
    config = tmp_path / "haproxy.cfg"
    config.write_text(render_haproxy_cfg(frontend, backends, stats, shipped="haproxy-tls.cfg"))
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            instances = [
                await Daemon.start(
                    nursery,
                    "--port",
                    str(port),
                    "--proxy-protocol",
                    "v2",
                    *server_files.args(),
                )
                for port in backends
            ]
            with running(["haproxy", "-f", str(config), "-db"], tmp_path / "haproxy.log"):

                def both_up() -> bool:
                    try:
                        table = haproxy_stat(stats, backend="echosvc-tls")
                    except OSError:  # not listening on its stats socket yet
                        return False
                    return all(
                        table.get(f"echosvc-{port}", {}).get("status") == "UP"
                        for port in (9001, 9002)
                    )

                await trio.to_thread.run_sync(
                    lambda: wait_until(
                        both_up, "both instances UP", lambda: (tmp_path / "haproxy.log").read_text()
                    )
                )
                stream = await open_tls(frontend, certs.client_context())
                client = stream.transport_stream.socket.getsockname()
                assert fingerprint(stream) == server_files.fingerprint, "passed through"
                await stream.send_all(b"through haproxy, encrypted\n")
                assert await receive_exactly(stream, 27) == b"through haproxy, encrypted\n"
                await stream.aclose()

                def served() -> list[dict[str, Any]]:
                    return [
                        c
                        for daemon in instances
                        for c in daemon.events("connection_closed")
                        if c["lines"] and c["peer"] == f"{client[0]}:{client[1]}"
                    ]

                with trio.fail_after(10):
                    for daemon in instances:  # it was one of them
                        with trio.move_on_after(5):
                            await daemon.wait_until(served)
            for daemon in instances:
                assert await daemon.stop() == 0
    [closed] = served()
    assert (closed["reason"], closed["tls_version"]) == ("eof", "TLSv1.3")
    assert closed["proxy"] != closed["peer"], "HAProxy's own address is the proxy"
    checks = [
        c for d in instances for c in d.events("connection_closed") if c["peer"] == c["proxy"]
    ]
    assert checks, "the health checks: PROXY LOCAL, TLS, an echo"
    assert all(c["reason"] in ("eof", "reset") and c["tls_version"] for c in checks)
