"""deploy/echosvc.service.d/tls.conf: verified, scored, and run under a real systemd.

* ``systemd-analyze verify`` takes the drop-in beside each service unit.
* The exposure score of each service with the drop-in stays within the
  unit's promise (``systemd-analyze security --offline=yes`` reads no
  drop-ins, so it scores the unit with the drop-in's lines appended, which
  is what a drop-in amounts to for these settings).
* In the private systemd of test_deploy.py: echosvc-standalone.service with
  the drop-in (its credential sources pointed at the test's files) serves
  TLS as its DynamicUser, reading the key systemd copied to
  ``$CREDENTIALS_DIRECTORY`` from a root-only file; ``systemctl reload``
  (ExecReload=, SIGHUP) reloads without a restart and logs ``tls_reloaded``;
  and ``systemctl restart`` picks up a rotated certificate.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import pytest

from .test_deploy import (
    DEPLOY,
    EXPOSURE_LIMITS,
    SERVICES,
    UNITS,
    SystemdSandbox,
    build_opt_echosvc,
    cgroup2_dir,
    free_port,
    needs_systemd_analyze,
    run_tool,
    sandbox_unavailable,
    wait_for_log,
    wait_until,
    write_unit_dir,
)
from .tls_support import Certificates, ServerFiles

DROP_IN = DEPLOY / "echosvc.service.d" / "tls.conf"
CERT_SOURCE = "/etc/echosvc/tls.crt"
KEY_SOURCE = "/etc/echosvc/tls.key"


@needs_systemd_analyze
def test_the_drop_in_verifies_beside_every_service(tmp_path: Path) -> None:
    for name in UNITS:
        shutil.copy(DEPLOY / name, tmp_path / name)
    for service in SERVICES:
        (tmp_path / f"{service}.d").mkdir()
        shutil.copy(DROP_IN, tmp_path / f"{service}.d" / "tls.conf")
    result = run_tool("systemd-analyze", "verify", *SERVICES, cwd=tmp_path)
    diagnostics = [line for line in (result.stdout + result.stderr).splitlines() if line]
    # The install is missing here (test_deploy.py checks the units with it);
    # anything else, such as an unknown key in the drop-in, is reported.
    unexpected = [line for line in diagnostics if "is not executable" not in line]
    assert unexpected == [], "\n".join(diagnostics)


def test_the_drop_in_sets_what_echosvc_reads() -> None:
    settings = [
        line
        for line in DROP_IN.read_text().splitlines()
        if line and not line.startswith(("#", "["))
    ]
    assert settings == [
        f"LoadCredential=tls.crt:{CERT_SOURCE}",
        f"LoadCredential=tls.key:{KEY_SOURCE}",
        "Environment=ECHOSVC_TLS_CERT=%d/tls.crt",
        "Environment=ECHOSVC_TLS_KEY=%d/tls.key",
    ]
    for service in SERVICES:
        assert "ExecReload=/bin/kill -HUP $MAINPID" in (DEPLOY / service).read_text(), service


@needs_systemd_analyze
@pytest.mark.parametrize("unit", SERVICES)
def test_exposure_with_tls_stays_within_limit(unit: str, tmp_path: Path) -> None:
    for name in UNITS:
        shutil.copy(DEPLOY / name, tmp_path / name)
    (tmp_path / unit).write_text((DEPLOY / unit).read_text() + "\n" + DROP_IN.read_text())
    result = run_tool("systemd-analyze", "security", "--offline=yes", unit, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    [score] = re.findall(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    print(f"{unit} with tls.conf: {score} (limit {EXPOSURE_LIMITS[unit]})")
    assert float(score) <= EXPOSURE_LIMITS[unit]


def systemd_version() -> int:
    output = subprocess.run(
        ["systemctl", "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    match = re.match(r"systemd (\d+)", output)
    return int(match.group(1)) if match else 0


def served_fingerprint(port: int, ca: Path) -> tuple[str, bytes]:
    """The leaf a TLS client sees on ``port``, and one line's echo."""
    context = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as tcp,
        context.wrap_socket(tcp, server_hostname="127.0.0.1") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        tls.sendall(b"over tls under systemd\n")
        echoed = b""
        while len(echoed) < 23 and (chunk := tls.recv(100)):
            echoed += chunk
    return hashlib.sha256(der).hexdigest(), echoed


def log_count(path: Path, event: str) -> int:
    return sum(
        json.loads(line).get("event") == event
        for line in path.read_text(errors="replace").splitlines()
        if line.startswith("{")
    )


def install_sources(etc: Path, files: ServerFiles, mode: int) -> None:
    """The files at the paths the drop-in names (deploy/README.md: root's, 0600)."""
    for source, target in ((files.cert, etc / "tls.crt"), (files.key, etc / "tls.key")):
        target.write_bytes(source.read_bytes())
        target.chmod(mode)


def bind_drop_in(etc: Path) -> str:
    """The other way to hand the files over: bound read-only into the sandbox."""
    return (
        "[Service]\n"
        f"BindReadOnlyPaths={etc}:/etc/echosvc-tls\n"
        "Environment=ECHOSVC_TLS_CERT=/etc/echosvc-tls/tls.crt\n"
        "Environment=ECHOSVC_TLS_KEY=/etc/echosvc-tls/tls.key\n"
    )


@pytest.mark.slow
@pytest.mark.parametrize("delivery", ["credentials", "bind"])
def test_tls_under_systemd_and_systemctl_reload(tmp_path: Path, delivery: str) -> None:
    reason = sandbox_unavailable()
    if reason is not None:
        pytest.skip(reason)
    cgroup = cgroup2_dir()
    assert cgroup is not None
    ports = {"socket": free_port(), "standalone": free_port(), "metrics": free_port()}
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o755)
    units = tmp_path / "units"
    write_unit_dir(units, ports, logs)
    etc = tmp_path / "etc"
    if delivery == "credentials":
        etc.mkdir(mode=0o700)  # root's alone: systemd reads it, echosvc never
        drop_in = DROP_IN.read_text()
        for source, target in ((CERT_SOURCE, etc / "tls.crt"), (KEY_SOURCE, etc / "tls.key")):
            assert drop_in.count(f":{source}\n") == 1  # the setting, not the comments
            drop_in = drop_in.replace(f":{source}\n", f":{target}\n")
        mode = 0o600
    else:
        etc.mkdir(mode=0o755)
        drop_in = bind_drop_in(etc)
        mode = 0o644  # a test key: the dynamic user reads the file itself
    (units / "echosvc-standalone.service.d" / "tls.conf").write_text(drop_in)
    certs = Certificates(tmp_path)
    first, second = certs.server("first"), certs.server("second")
    install_sources(etc, first, mode)
    build_opt_echosvc(tmp_path / "opt-echosvc")
    log = logs / "echosvc-standalone.service.log"
    unit = "echosvc-standalone.service"

    sandbox = SystemdSandbox(tmp_path, units, cgroup / f"echosvc-tls-test-{os.getpid()}")
    try:
        sandbox.boot()

        def diagnose() -> str:
            tail = sandbox.console.read_text()[-3000:]
            return f"{sandbox.status_of(unit)}\n--- log\n{log.read_text()}\n--- systemd\n{tail}"

        started = sandbox.run("systemctl", "start", unit, check=False)
        if started.returncode != 0 and "/run/credentials/" in log.read_text():
            # Seen in this CI's nested sandbox (systemd 252 as PID 1 of an
            # unshare without a user namespace): the private credentials
            # mount is not made, the service finds the empty 0700 root-owned
            # placeholder. The "bind" variant runs the same checks.
            pytest.skip(f"LoadCredential= unusable in this sandbox:\n{log.read_text()}")
        assert started.returncode == 0, diagnose()
        wait_for_log(log, "listening")
        seen, echoed = served_fingerprint(ports["standalone"], certs.ca_file)
        assert (seen, echoed) == (first.fingerprint, b"over tls under systemd\n"), diagnose()
        before = sandbox.show(unit, "MainPID")
        status = sandbox.run("cat", f"/proc/{before['MainPID']}/status").stdout
        uid = re.search(r"^Uid:\t(\d+)", status, re.M)
        assert uid is not None
        assert uid.group(1) != "0", "served by the dynamic user"

        # systemctl reload: ExecReload= sends SIGHUP, and the job ends at
        # the READY=1 after RELOADING=1. No restart.
        install_sources(etc, second, mode)
        sandbox.run("systemctl", "reload", unit)
        wait_for_log(log, "tls_reloaded")
        after = sandbox.show(unit, "MainPID", "ActiveState", "NRestarts")
        assert after == {"MainPID": before["MainPID"], "ActiveState": "active", "NRestarts": "0"}
        seen, _ = served_fingerprint(ports["standalone"], certs.ca_file)
        if delivery == "bind":
            assert seen == second.fingerprint, diagnose()
        elif systemd_version() <= 252:
            # The documented limitation: the credentials directory is filled
            # at start only, so the reload read the same copies again.
            assert seen == first.fingerprint, diagnose()

        sandbox.run("systemctl", "restart", unit)
        wait_until(lambda: log_count(log, "listening") == 2, "listening again", diagnose)
        seen, _ = served_fingerprint(ports["standalone"], certs.ca_file)
        assert seen == second.fingerprint, diagnose()
        sandbox.run("systemctl", "stop", unit)
        result = sandbox.show(unit, "Result", "ExecMainStatus")
        assert result == {"Result": "success", "ExecMainStatus": "0"}, diagnose()
    finally:
        sandbox.close()
