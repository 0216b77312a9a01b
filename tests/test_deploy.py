"""The files in deploy/: systemd units, the environment file and HAProxy.

What is checked, and how honestly:

* ``systemd-analyze verify`` on every unit. verify insists that ExecStart's
  binary exists and is executable, and the units name the intended install,
  ``/opt/echosvc/bin/echosvc``, which a test machine does not have. So the
  units are verified twice: as shipped, where the only diagnostic allowed is
  exactly "Command /opt/echosvc/bin/echosvc is not executable" (and none at
  all on a machine where that path exists), and rendered into a temporary
  directory with only that path replaced by this virtualenv's ``echosvc``
  console script, where verify must be silent. Everything else verify checks
  (syntax, unknown settings, dependencies, the socket/service pairing) is
  checked on the shipped text.
* ``systemd-analyze security --offline=yes`` scores, against the limits the
  deployment promises (0.5 socket-activated, 1.5 binding its own port).
* ``deploy/echosvc.env`` names every ``ECHOSVC_*`` variable the CLI knows,
  with the CLI's defaults, and echosvc starts with all of them uncommented.
* ``haproxy -c`` accepts deploy/haproxy.cfg as shipped, and end to end: two
  echosvc processes behind HAProxy running that config (ports, stats socket
  and check intervals rendered for the test), lines echo through it, a killed
  backend is marked DOWN by the echo health check while clients still get
  their echoes, and it is marked UP again after a restart; one that accepts
  connections but no longer echoes (SIGSTOP) is marked DOWN as well.
* The PROXY protocol behind that HAProxy, ``send-proxy-v2`` as shipped and
  ``send-proxy`` (v1): clients from 127.0.0.2 and 127.0.0.3 are the
  instances' ``peer``, HAProxy's address their ``proxy``; the health checks
  go through the header and keep both instances UP; ``--max-per-source``
  counts each real client, not HAProxy; an instance that does not expect the
  header is marked DOWN by the anchored check instead of echoing headers.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import importlib.metadata as metadata
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from packaging.requirements import Requirement

import echosvc
from echosvc.proxyproto import encode_v2

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
SERVICES = ["echosvc.service", "echosvc-standalone.service", "echosvc@.service"]
UNITS = ["echosvc.socket", "echosvc-metrics.socket", *SERVICES]
INSTALLED_BINARY = "/opt/echosvc/bin/echosvc"
CONSOLE_SCRIPT = Path(sys.executable).parent / "echosvc"
ECHOSVC = [sys.executable, "-m", "echosvc"]

# What each unit promises in deploy/README.md (systemd-analyze's 0-10 scale).
EXPOSURE_LIMITS = {
    "echosvc.service": 0.5,
    "echosvc-standalone.service": 1.5,
    "echosvc@.service": 1.5,
}

TOOL_TIMEOUT = 60
START_TIMEOUT = 20
STOP_TIMEOUT = 15

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)
needs_haproxy = pytest.mark.skipif(
    shutil.which("haproxy") is None, reason="haproxy is not installed (apt-get install haproxy)"
)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without ECHOSVC_* or systemd variables, plus ``extra``."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("ECHOSVC_", "LISTEN_", "NOTIFY_", "WATCHDOG_", "JOURNAL_"))
    }
    # Plain output from the systemd tools: no colours, no pager.
    env.update({"SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "LC_ALL": "C.UTF-8"})
    env.update(extra or {})
    return env


def run_tool(*argv: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(arg) for arg in argv],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
        cwd=cwd,
        env=child_env(),
        check=False,
    )


# --- systemd units -------------------------------------------------------------


def render_units(directory: Path) -> None:
    """Copy the units into ``directory`` with ExecStart on this venv's echosvc."""
    assert CONSOLE_SCRIPT.is_file(), f"{CONSOLE_SCRIPT} missing: pip install -e . in this venv"
    for name in UNITS:
        text = (DEPLOY / name).read_text()
        if name.endswith(".service"):
            assert f"ExecStart={INSTALLED_BINARY} serve" in text, name
        (directory / name).write_text(text.replace(INSTALLED_BINARY, str(CONSOLE_SCRIPT)))


@needs_systemd_analyze
def test_units_verify_as_shipped() -> None:
    result = run_tool("systemd-analyze", "verify", *UNITS, cwd=DEPLOY)
    diagnostics = [line for line in (result.stdout + result.stderr).splitlines() if line]
    if Path(INSTALLED_BINARY).exists():
        assert result.returncode == 0, diagnostics
        assert diagnostics == []
        return
    # Only the missing install may be reported, once per service, nothing else.
    missing = f"Command {INSTALLED_BINARY} is not executable: No such file or directory"
    unexpected = [line for line in diagnostics if not line.endswith(missing)]
    assert unexpected == [], "\n".join(diagnostics)
    assert len(diagnostics) == len(SERVICES), "\n".join(diagnostics)


@needs_systemd_analyze
def test_units_verify_clean_with_a_real_binary(tmp_path: Path) -> None:
    render_units(tmp_path)
    result = run_tool("systemd-analyze", "verify", *UNITS, "echosvc@9001.service", cwd=tmp_path)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, output
    assert output == ""


def exposure(unit: str) -> float:
    """The "Overall exposure level" of ``systemd-analyze security --offline=yes``."""
    result = run_tool("systemd-analyze", "security", "--offline=yes", unit, cwd=DEPLOY)
    assert result.returncode == 0, result.stdout + result.stderr
    scores = re.findall(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert len(scores) == 1, result.stdout
    return float(scores[0])


@needs_systemd_analyze
@pytest.mark.parametrize("unit", SERVICES)
def test_security_exposure_within_limit(unit: str) -> None:
    score = exposure(unit)
    limit = EXPOSURE_LIMITS[unit]
    print(f"systemd-analyze security --offline=yes deploy/{unit}: {score} (limit {limit})")
    assert score <= limit, f"{unit}: exposure {score} > {limit}"


def unit_settings(name: str) -> dict[str, list[str]]:
    """Each ``Key=value`` of a unit file, every occurrence, comments skipped."""
    settings: dict[str, list[str]] = {}
    for raw in (DEPLOY / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key, []).append(value)
    return settings


@pytest.mark.parametrize("unit", SERVICES)
def test_services_follow_the_service_contract(unit: str) -> None:
    settings = unit_settings(unit)
    for key, value in {
        "Type": "notify",
        "NotifyAccess": "main",
        "Restart": "on-failure",
        "EnvironmentFile": "-/etc/echosvc/echosvc.env",
        # SIGTERM for the supervisor alone (see the unit and the systemd test).
        "KillMode": "mixed",
    }.items():
        assert value in settings.get(key, []), f"{unit}: {key}={value} missing"
    assert "WatchdogSec" in settings, unit
    # The stop timeout must outlast the default shutdown grace (10 s).
    (stop,) = settings["TimeoutStopSec"]
    assert stop.endswith("s"), stop
    assert float(stop.removesuffix("s")) > 10, stop
    # Raised far above the default max connections (10000).
    (nofile,) = settings["LimitNOFILE"]
    assert int(nofile) > 10_000 * 2, nofile
    # No flag that would beat ECHOSVC_* from the environment file, but the
    # template's port, which is its instance name.
    (exec_start,) = settings["ExecStart"]
    expected = f"{INSTALLED_BINARY} serve" + (" --port %i" if "@" in unit else "")
    assert exec_start == expected


def test_socket_activated_service_needs_its_socket() -> None:
    service = unit_settings("echosvc.service")
    assert service["Requires"] == ["echosvc.socket"]
    assert service["PrivateNetwork"] == ["yes"]
    assert service["RestrictAddressFamilies"] == ["AF_UNIX"]
    assert unit_settings("echosvc.socket")["ListenStream"] == ["127.0.0.1:9000"]


def test_the_metrics_socket_is_named_for_echosvc_and_on_loopback() -> None:
    metrics = unit_settings("echosvc-metrics.socket")
    assert metrics["FileDescriptorName"] == ["metrics"]
    assert metrics["Service"] == ["echosvc.service"]
    assert metrics["ListenStream"] == ["127.0.0.1:9180"]
    # Optional: the service neither requires nor wants it.
    service = unit_settings("echosvc.service")
    assert "echosvc-metrics.socket" not in " ".join(service.get("Requires", []))


# --- the environment file ----------------------------------------------------------


def serve_help_envvars() -> dict[str, str]:
    """``ECHOSVC_*`` -> default, as ``echosvc serve --help`` documents them."""
    result = subprocess.run(
        [*ECHOSVC, "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
        env=child_env({"COLUMNS": "200", "TERM": "dumb", "NO_COLOR": "1"}),
        check=True,
    )
    text = " ".join(result.stdout.split())
    found = dict(re.findall(r"env var: (ECHOSVC_\w+); default: ([^\]]+)\]", text))
    assert found, f"no '[env var: ...; default: ...]' in serve --help:\n{result.stdout}"
    return found


def env_file_defaults() -> dict[str, str]:
    """The ``#ECHOSVC_X=value`` lines of deploy/echosvc.env."""
    text = (DEPLOY / "echosvc.env").read_text()
    entries = re.findall(r"^#?(ECHOSVC_\w+)=(.*)$", text, flags=re.MULTILINE)
    assert entries
    return dict(entries)


def test_env_file_lists_every_variable_with_its_default() -> None:
    documented = env_file_defaults()
    # Every line is commented out: the file shows the defaults, it sets nothing.
    text = (DEPLOY / "echosvc.env").read_text()
    assert not re.search(r"^ECHOSVC_", text, flags=re.MULTILINE)
    for name, default in serve_help_envvars().items():
        assert name in documented, f"{name} is missing from deploy/echosvc.env"
        value = documented[name]
        if name == "ECHOSVC_BACKLOG":
            continue  # "the system maximum": the file shows a typical value
        if name in ("ECHOSVC_TLS_CERT", "ECHOSVC_TLS_KEY", "ECHOSVC_TLS_CLIENT_CA"):
            assert value == "", f"{name}: unset is shown as empty"
            continue
        if name == "ECHOSVC_LOG_FORMAT":
            assert value == "json", "the units set json; the file shows what they run"
            continue
        default = default.strip("()")
        try:
            assert float(value) == float(default), name
        except ValueError:
            assert value == default, name


def wait_for_log(path: Path, event: str, timeout: float = START_TIMEOUT) -> dict[str, object]:
    """The first JSON record with ``event`` written to ``path``, polling."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("{") and f'"{event}"' in line:
                record: dict[str, object] = json.loads(line)
                if record.get("event") == event:
                    return record
        time.sleep(0.05)
    raise AssertionError(f"no {event!r} in {path} after {timeout} s:\n{path.read_text()}")


def stop(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.send_signal(signal.SIGCONT)  # in case a test stopped it
        try:
            return process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.wait(timeout=STOP_TIMEOUT)


def test_env_file_values_are_accepted(tmp_path: Path) -> None:
    env = env_file_defaults()
    env.pop("ECHOSVC_WORKERS", None)  # not every echosvc has --workers yet
    env["ECHOSVC_PORT"] = "0"  # any free port, not 9000
    log = tmp_path / "stderr.log"
    with log.open("wb") as stderr:
        process = subprocess.Popen(
            [*ECHOSVC, "serve"], stdin=subprocess.DEVNULL, stderr=stderr, env=child_env(env)
        )
    try:
        record = wait_for_log(log, "listening")
        assert record["mode"] == "line"
    finally:
        assert stop(process) == 0, log.read_text()


# --- Prometheus -----------------------------------------------------------------------

needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool is not installed (Debian package prometheus)"
)


@needs_promtool
def test_the_prometheus_config_and_alert_rules_are_valid_as_shipped() -> None:
    result = run_tool("promtool", "check", "config", DEPLOY / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout, result.stdout


@needs_promtool
def test_the_alerts_fire_on_the_series_echosvc_exposes(tmp_path: Path) -> None:
    """``promtool test rules``: made-up series under echosvc's names, and the
    alerts that must (and must not) fire on them."""
    shutil.copy(DEPLOY / "echosvc-alerts.yml", tmp_path)
    (tmp_path / "test.yml").write_text(
        "rule_files: [echosvc-alerts.yml]\n"
        "evaluation_interval: 1m\n"
        "tests:\n"
        "  - interval: 1m\n"
        "    input_series:\n"
        '      - series: \'echosvc_connections_active{job="echosvc",instance="a"}\'\n'
        "        values: '9500x10'\n"
        '      - series: \'echosvc_connections_limit{job="echosvc",instance="a"}\'\n'
        "        values: '10000x10'\n"
        '      - series: \'echosvc_accept_failures_total{job="echosvc",instance="a"}\'\n'
        "        values: '0 0 0 0 0 3 3 3 3 3 3'\n"
        '      - series: \'echosvc_event_loop_lag_seconds{job="echosvc",instance="a"}\'\n'
        "        values: '0.001x10'\n"
        '      - series: \'echosvc_worker_up{job="echosvc",instance="a",worker="0"}\'\n'
        "        values: '1x10'\n"
        '      - series: \'echosvc_worker_up{job="echosvc",instance="a",worker="1"}\'\n'
        "        values: '1 1 1 0 0 0 0 0 0 0 0'\n"
        "    alert_rule_test:\n"
        "      - eval_time: 6m\n"
        "        alertname: EchosvcNearCapacity\n"
        "        exp_alerts:\n"
        "          - exp_labels: {severity: warning, job: echosvc, instance: a}\n"
        "            exp_annotations:\n"
        "              summary: echosvc at a serves 95% of its connection limit\n"
        "      - eval_time: 6m\n"
        "        alertname: EchosvcAcceptFailures\n"
        "        exp_alerts:\n"
        "          - exp_labels: {severity: warning, job: echosvc, instance: a}\n"
        "            exp_annotations:\n"
        "              summary: echosvc at a ran out of descriptors or memory in accept()\n"
        "      - eval_time: 6m\n"
        "        alertname: EchosvcEventLoopLag\n"
        "        exp_alerts: []\n"
        "      - eval_time: 6m\n"
        "        alertname: EchosvcWorkerDown\n"
        "        exp_alerts:\n"
        "          - exp_labels: {severity: page, job: echosvc, instance: a, worker: '1'}\n"
        "            exp_annotations:\n"
        "              summary: 'echosvc at a: worker 1 does not answer'\n"
    )
    result = run_tool("promtool", "test", "rules", "test.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


# --- HAProxy -------------------------------------------------------------------------


@needs_haproxy
def test_haproxy_config_is_valid_as_shipped() -> None:
    result = run_tool("haproxy", "-c", "-f", DEPLOY / "haproxy.cfg")
    assert result.returncode == 0, result.stdout + result.stderr


def render_haproxy_cfg(
    frontend_port: int,
    backend_ports: tuple[int, int],
    stats_socket: Path,
    shipped: str = "haproxy.cfg",
) -> str:
    """deploy/haproxy.cfg (or another ``shipped`` file of the same shape, such
    as haproxy-tls.cfg) with test ports, a private stats socket and fast checks.

    Each replaced text must occur exactly as often as expected, so the test
    breaks loudly rather than silently testing something else when the
    shipped file changes. Also dropped: chroot/user/group (they need the
    Debian package's haproxy user and /var/lib/haproxy, not what is tested),
    and maxconn shrinks to fit a test runner's fd limit (HAProxy needs two
    fds per connection and refuses to start if it cannot get them).
    """
    text = (DEPLOY / shipped).read_text()
    replacements = [
        ("bind 127.0.0.1:9000\n", f"bind 127.0.0.1:{frontend_port}\n", 1),
        (" 127.0.0.1:9001 ", f" 127.0.0.1:{backend_ports[0]} ", 1),
        (" 127.0.0.1:9002 ", f" 127.0.0.1:{backend_ports[1]} ", 1),
        ("stats socket /run/haproxy/admin.sock ", f"stats socket {stats_socket} ", 1),
        (
            " inter 5s fastinter 1s downinter 5s ",
            " inter 200ms fastinter 100ms downinter 200ms ",
            1,
        ),
        ("timeout check 2s\n", "timeout check 500ms\n", 1),
        ("maxconn 20000\n", "maxconn 1000\n", 2),
        ("    chroot /var/lib/haproxy\n", "", 1),
        ("    user haproxy\n", "", 1),
        ("    group haproxy\n", "", 1),
    ]
    for old, new, count in replacements:
        assert text.count(old) == count, f"deploy/{shipped}: expected {old!r} x{count}"
        text = text.replace(old, new)
    return text


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def scrape(port: int, timeout: float = 5.0) -> str:
    """``GET /metrics`` from 127.0.0.1:port: the body, after a 200."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        body = response.read().decode()
        assert response.status == 200, body
        return body
    finally:
        connection.close()


def echo_once(port: int, line: bytes, timeout: float = 5.0, header: bytes = b"") -> bytes:
    """Connect, send ``header`` and ``line``, read until its newline comes back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(header + line)
        received = b""
        while not received.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
        return received


def expect_echo(
    port: int, line: bytes, diagnose: Callable[[], str], timeout: float = 5.0, header: bytes = b""
) -> None:
    """`echo_once` must return ``line``; if not, fail with ``diagnose()``."""
    try:
        received = echo_once(port, line, timeout, header)
    except OSError as exc:
        raise AssertionError(f"{line!r} to port {port}: {exc!r}\n{diagnose()}") from exc
    assert received == line, f"{received!r}\n{diagnose()}"


def echo_concurrently(port: int, count: int, tag: str) -> None:
    """Open ``count`` connections at once, then check each echoes its own line."""
    with ExitStack() as stack:
        conns = [
            stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5.0))
            for _ in range(count)
        ]
        for i, sock in enumerate(conns):
            sock.sendall(f"{tag} {i} \xff\r\n".encode("latin-1"))
        for i, sock in enumerate(conns):
            expected = f"{tag} {i} \xff\r\n".encode("latin-1")
            received = b""
            while not received.endswith(b"\n"):
                chunk = sock.recv(65536)
                assert chunk, f"{tag}: connection {i} closed after {received!r}"
                received += chunk
            assert received == expected


def haproxy_stat(stats_socket: Path, backend: str = "echosvc") -> dict[str, dict[str, str]]:
    """``show stat`` of the ``backend``'s servers: name -> CSV columns."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5.0)
        sock.connect(str(stats_socket))
        sock.sendall(b"show stat\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    header = lines[0].lstrip("# ").split(",")
    rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
    return {
        row["svname"]: row
        for row in rows
        if row["pxname"] == backend and row["svname"] not in ("FRONTEND", "BACKEND")
    }


def wait_until(
    condition: Callable[[], bool], what: str, diagnose: Callable[[], str], timeout: float = 15.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"not {what} after {timeout} s\n{diagnose()}")


@contextmanager
def running(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("ab") as output:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=child_env(),
        )
    try:
        yield process
    finally:
        stop(process)


@needs_haproxy
def test_haproxy_balances_and_health_checks_echosvc(tmp_path: Path) -> None:
    stats_socket = tmp_path / "admin.sock"
    frontend = free_port()
    logs = {name: tmp_path / f"{name}.log" for name in ("a", "b", "haproxy")}

    def serve(port: int) -> list[str]:
        # As echosvc@.service runs them: behind send-proxy-v2.
        return [
            *ECHOSVC,
            "serve",
            "--port",
            str(port),
            "--log-format",
            "json",
            "--proxy-protocol",
            "v2",
        ]

    def diagnose() -> str:
        parts = [f"--- {path.name}\n{path.read_text(errors='replace')}" for path in logs.values()]
        if stats_socket.exists():
            parts.append(f"--- show stat\n{haproxy_stat(stats_socket)}")
        return "\n".join(parts)

    def status(server: str) -> str:
        try:
            return haproxy_stat(stats_socket)[server]["status"]
        except OSError:
            return "no stats socket yet"

    def sessions(server: str) -> int:
        return int(haproxy_stat(stats_socket)[server]["stot"])

    with ExitStack() as stack:
        # Backends on ports they pick themselves (no race for a free port),
        # read back from their `listening` records.
        backend_a = stack.enter_context(running(serve(0), logs["a"]))
        backend_b = stack.enter_context(running(serve(0), logs["b"]))
        ports = []
        for name in ("a", "b"):
            addresses = wait_for_log(logs[name], "listening")["addresses"]
            assert isinstance(addresses, list), addresses
            ports.append(int(str(addresses[0]).rsplit(":", 1)[1]))
        servers = ("echosvc-9001", "echosvc-9002")  # server names as shipped
        config = tmp_path / "haproxy.cfg"
        config.write_text(render_haproxy_cfg(frontend, (ports[0], ports[1]), stats_socket))
        check = run_tool("haproxy", "-c", "-f", config)
        assert check.returncode == 0, check.stdout + check.stderr
        stack.enter_context(running(["haproxy", "-f", str(config), "-db"], logs["haproxy"]))

        # Both UP: the echo health check (send a line, expect it back) passes.
        wait_until(lambda: all(status(s) == "UP" for s in servers), "both UP", diagnose)
        expect_echo(frontend, b"through haproxy\n", diagnose)
        echo_concurrently(frontend, 6, "both up")
        # leastconn spread the concurrent connections over both instances.
        assert sessions(servers[0]) >= 1, diagnose()
        assert sessions(servers[1]) >= 1, diagnose()

        # A crashed instance is marked DOWN by the echo check ...
        backend_a.kill()
        backend_a.wait(timeout=STOP_TIMEOUT)
        wait_until(lambda: status(servers[0]).startswith("DOWN"), "a DOWN", diagnose)
        # ... and new connections all go to the other one, and echo.
        served_by_a = sessions(servers[0])
        echo_concurrently(frontend, 6, "one down")
        assert sessions(servers[0]) == served_by_a

        # Back on the same port, it is UP again and takes connections.
        stack.enter_context(running(serve(ports[0]), logs["a"]))
        wait_until(lambda: status(servers[0]) == "UP", "a UP again", diagnose)
        echo_concurrently(frontend, 6, "both up again")
        assert sessions(servers[0]) > served_by_a, diagnose()

        # An instance that accepts (the kernel does, from the backlog) but no
        # longer echoes is DOWN too: the check wants its line back, a bare
        # TCP connect would pass. SIGSTOP wedges it like a stuck event loop.
        backend_b.send_signal(signal.SIGSTOP)
        wait_until(lambda: status(servers[1]).startswith("DOWN"), "b DOWN", diagnose)
        assert haproxy_stat(stats_socket)[servers[1]]["check_status"] == "L7TOUT", diagnose()
        echo_concurrently(frontend, 6, "b wedged")
        backend_b.send_signal(signal.SIGCONT)
        wait_until(lambda: status(servers[1]) == "UP", "b UP again", diagnose)


# --- HAProxy and the PROXY protocol ------------------------------------------------------
#
# The shipped config sends send-proxy-v2 to the instances and health-checks
# them through it. Clients connect to HAProxy from 127.0.0.2 and 127.0.0.3
# (any 127/8 address is this host's on Linux), so the instances' logs can
# tell them apart from HAProxy (127.0.0.1) only if the header got through.


def log_records(path: Path) -> list[dict[str, object]]:
    return [
        json.loads(line)
        for line in path.read_text(errors="replace").splitlines()
        if line.startswith("{")
    ]


class HAProxyRig:
    """Two echosvc instances behind HAProxy running deploy/haproxy.cfg."""

    servers = ("echosvc-9001", "echosvc-9002")  # server names as shipped

    def __init__(self, stack: ExitStack, tmp_path: Path, backend_args: list[list[str]]) -> None:
        self.stats_socket = tmp_path / "admin.sock"
        self.frontend = free_port()
        self.logs = {name: tmp_path / f"{name}.log" for name in ("a", "b", "haproxy")}
        self.ports: list[int] = []
        for name, args in zip(("a", "b"), backend_args, strict=True):
            argv = [*ECHOSVC, "serve", "--port", "0", "--log-format", "json", *args]
            stack.enter_context(running(argv, self.logs[name]))
        for name in ("a", "b"):
            addresses = wait_for_log(self.logs[name], "listening")["addresses"]
            assert isinstance(addresses, list), addresses
            self.ports.append(int(str(addresses[0]).rsplit(":", 1)[1]))
        self.tmp_path = tmp_path
        self.stack = stack

    def start(self, edit: tuple[str, str] | None = None) -> None:
        text = render_haproxy_cfg(self.frontend, (self.ports[0], self.ports[1]), self.stats_socket)
        if edit is not None:
            assert text.count(edit[0]) == 1, f"deploy/haproxy.cfg: expected {edit[0]!r} once"
            text = text.replace(*edit)
        config = self.tmp_path / "haproxy.cfg"
        config.write_text(text)
        check = run_tool("haproxy", "-c", "-f", config)
        assert check.returncode == 0, check.stdout + check.stderr
        self.stack.enter_context(
            running(["haproxy", "-f", str(config), "-db"], self.logs["haproxy"])
        )

    def stat(self, server: str) -> dict[str, str]:
        try:
            return haproxy_stat(self.stats_socket)[server]
        except OSError:
            return {}

    def checked_ok(self, server: str) -> bool:
        """UP, and the last health check passed (servers start UP before any)."""
        row = self.stat(server)
        return row.get("status") == "UP" and row.get("check_status", "").lstrip("* ") == "L7OK"

    def records(self, name: str, event: str = "connection_closed") -> list[dict[str, object]]:
        return [r for r in log_records(self.logs[name]) if r["event"] == event]

    def diagnose(self) -> str:
        parts = [f"--- {p.name}\n{p.read_text(errors='replace')}" for p in self.logs.values()]
        if self.stats_socket.exists():
            parts.append(f"--- show stat\n{haproxy_stat(self.stats_socket)}")
        return "\n".join(parts)


def connect_from(source_ip: str, port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5.0, source_address=(source_ip, 0))


def echo_on(sock: socket.socket, line: bytes) -> bytes:
    """Send ``line`` on ``sock``; what came back before its newline or the close."""
    sock.sendall(line)
    received = b""
    try:
        while not received.endswith(b"\n") and (chunk := sock.recv(65536)):
            received += chunk
    except ConnectionResetError:
        pass
    return received


@needs_haproxy
@pytest.mark.parametrize(
    ("version", "edit"),
    [
        ("v2", None),
        ("v1", ("    default-server send-proxy-v2\n", "    default-server send-proxy\n")),
    ],
    ids=["send-proxy-v2", "send-proxy"],
)
def test_haproxy_passes_the_real_client_and_the_limit_is_per_client(
    tmp_path: Path, version: str, edit: tuple[str, str] | None
) -> None:
    args = ["--proxy-protocol", version, "--max-per-source", "2", "--log-level", "debug"]
    with ExitStack() as stack:
        rig = HAProxyRig(stack, tmp_path, [args, args])
        rig.start(edit)
        # HAProxy's own health checks pass through the header (v2: LOCAL).
        wait_until(lambda: all(rig.checked_ok(s) for s in rig.servers), "both L7OK", rig.diagnose)

        # Real clients, named as such behind HAProxy.
        clients = {}
        for source in ("127.0.0.2", "127.0.0.3"):
            with connect_from(source, rig.frontend) as sock:
                clients[source] = sock.getsockname()[1]
                assert echo_on(sock, f"from {source}\n".encode()) == f"from {source}\n".encode()

        def closed_for(peer: str) -> list[dict[str, object]]:
            return [r for name in ("a", "b") for r in rig.records(name) if r["peer"] == peer]

        def logged(peer: str) -> bool:
            return bool(closed_for(peer))

        for source, port in clients.items():
            peer = f"{source}:{port}"
            wait_until(functools.partial(logged, peer), peer, rig.diagnose)
            [record] = closed_for(peer)
            assert record["reason"] == "eof", record
            assert str(record["proxy"]).startswith("127.0.0.1:"), record

        # The limit is per real client: 127.0.0.2 may hold 2 per instance,
        # so 4 through two instances, and the 5th is refused; 127.0.0.3,
        # behind the same HAProxy address, is not affected.
        held = [stack.enter_context(connect_from("127.0.0.2", rig.frontend)) for _ in range(4)]
        for i, sock in enumerate(held):
            assert echo_on(sock, b"held %d\n" % i) == b"held %d\n" % i, rig.diagnose()
        with connect_from("127.0.0.2", rig.frontend) as over:
            assert echo_on(over, b"one too many\n") == b"", rig.diagnose()
        with connect_from("127.0.0.3", rig.frontend) as other:
            assert echo_on(other, b"another client\n") == b"another client\n", rig.diagnose()

        def refusals() -> list[dict[str, object]]:
            return [r for n in ("a", "b") for r in rig.records(n) if r["reason"] == "source_limit"]

        wait_until(lambda: bool(refusals()), "the refusal logged", rig.diagnose)
        reached = [r for n in ("a", "b") for r in rig.records(n, "source_limit_reached")]
        assert [(r["source"], r["limit"]) for r in reached] == [("127.0.0.2", 2)]
        refused = refusals()
        assert [(r["level"], str(r["peer"]).split(":")[0]) for r in refused] == [
            ("debug", "127.0.0.2")
        ]

        # The health checks: the balancer's own connections, peer == proxy.
        checks = [
            r
            for n in ("a", "b")
            for r in rig.records(n)
            if r["peer"] == r.get("proxy") and r["lines"] == 1
        ]
        assert checks, rig.diagnose()
        assert all(str(r["peer"]).startswith("127.0.0.1:") for r in checks)
        assert not [
            r for n in ("a", "b") for r in rig.records(n) if str(r["reason"]).startswith("proxy_")
        ], rig.diagnose()
        for server in rig.servers:
            assert rig.checked_ok(server), rig.diagnose()


@needs_haproxy
def test_haproxy_marks_down_an_instance_that_does_not_expect_the_header(tmp_path: Path) -> None:
    with ExitStack() as stack:
        # b was started without --proxy-protocol: it would echo HAProxy's
        # header back to every client. The anchored check catches it.
        rig = HAProxyRig(stack, tmp_path, [["--proxy-protocol", "v2"], []])
        rig.start()
        good, bad = rig.servers
        wait_until(lambda: rig.checked_ok(good), "a L7OK", rig.diagnose)
        wait_until(
            lambda: rig.stat(bad).get("status", "").startswith("DOWN"), "b DOWN", rig.diagnose
        )
        # Failed at the anchored expect: the echo did not start with the line
        # (L7RSP once it is all in, L7TOUT while HAProxy waits for more).
        row = rig.stat(bad)
        assert row["check_status"].lstrip("* ") in ("L7RSP", "L7TOUT"), rig.diagnose()
        assert "regex" in row["last_chk"], rig.diagnose()
        # Clients reach the good one only, and get exactly their bytes back.
        for i in range(4):
            expect_echo(rig.frontend, b"clean echo %d\n" % i, rig.diagnose)
        assert int(rig.stat(bad)["stot"]) == 0, rig.diagnose()


# --- the units, run by a real systemd ---------------------------------------------
#
# The scores above say what the sandbox forbids; only running the units says
# that echosvc still works inside it (seccomp filter, MemoryDenyWriteExecute,
# PrivateNetwork with an inherited socket, DynamicUser, PrivateUsers, the
# watchdog). systemd is not PID 1 on a test machine, so the test boots one:
# /lib/systemd/systemd as PID 1 of new PID, mount and cgroup namespaces, in
# a cgroup of its own, with only the deploy/ units and empty stand-ins for
# the targets they depend on ($SYSTEMD_UNIT_PATH). The service's sockets live
# in the host's network namespace, so the test connects to them as a client
# would. The units run unmodified; drop-ins give the socket a free port,
# send stderr to a file (no journald here) and shorten the watchdog.
#
# The install is the one deploy/README.md describes, a virtualenv at
# /opt/echosvc on the system's python3, assembled offline: a venv made with
# /usr/bin/python3, the echosvc package under test and the installed files
# of its dependencies copied from this virtualenv (same Python minor version,
# so the same wheels), and the console script pip would write.

SYSTEM_PYTHON = Path("/usr/bin/python3")
SYSTEMD = Path("/lib/systemd/systemd")
STUB_TARGETS = ["sysinit", "basic", "sockets", "shutdown", "network", "network-online"]
STUB_TARGETS += ["multi-user", "echosvc-test"]


def sandbox_unavailable() -> str | None:
    """Why a private systemd cannot be booted here, or None."""
    if os.geteuid() != 0:
        return "needs root (namespaces, cgroups, DynamicUser)"
    if not SYSTEMD.exists() or shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return "needs /lib/systemd/systemd, unshare and nsenter"
    if not SYSTEM_PYTHON.exists():
        return "needs /usr/bin/python3 for the /opt/echosvc virtualenv"
    version = subprocess.run(
        [SYSTEM_PYTHON, "-c", "import sys; print(*sys.version_info[:2])"],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
        check=False,
    ).stdout.split()
    if version != [str(part) for part in sys.version_info[:2]]:
        return f"/usr/bin/python3 is {'.'.join(version)}, this venv's Python is not: wheels differ"
    if cgroup2_dir() is None:
        return "no writable cgroup2 hierarchy"
    return None


def cgroup2_dir() -> Path | None:
    """This process's own cgroup in the cgroup2 hierarchy, if writable."""
    mounts = [
        Path(line.split()[1])
        for line in Path("/proc/self/mounts").read_text().splitlines()
        if line.split()[2] == "cgroup2"
    ]
    own = [
        line.removeprefix("0::")
        for line in Path("/proc/self/cgroup").read_text().splitlines()
        if line.startswith("0::")
    ]
    if not mounts or not own:
        return None
    directory = mounts[0] / own[0].lstrip("/")
    return directory if os.access(directory, os.W_OK) else None


def build_opt_echosvc(venv: Path) -> None:
    """A virtualenv meant to live at /opt/echosvc, with echosvc installed."""
    subprocess.run(
        [SYSTEM_PYTHON, "-m", "venv", "--without-pip", venv], check=True, timeout=TOOL_TIMEOUT
    )
    (site,) = venv.glob("lib/python3*/site-packages")
    shutil.copytree(
        Path(echosvc.__file__).parent,
        site / "echosvc",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    seen: set[str] = set()
    todo = ["echosvc"]
    while todo:
        name = todo.pop()
        dist = metadata.distribution(name)
        for spec in dist.requires or []:
            requirement = Requirement(spec)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                key = requirement.name.lower().replace("_", "-")
                if key not in seen:
                    seen.add(key)
                    todo.append(requirement.name)
        if name == "echosvc":
            continue  # an editable install: copied from the source above
        for file in dist.files or []:
            source = Path(str(dist.locate_file(file)))
            target = (site / file).resolve()
            if target.is_relative_to(site) and source.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
    script = venv / "bin" / "echosvc"
    script.write_text(
        "#!/opt/echosvc/bin/python3\n"
        "import sys\n"
        "from echosvc.__main__ import main\n"
        "if __name__ == '__main__':\n"
        "    sys.exit(main())\n"
    )
    script.chmod(0o755)


class SystemdSandbox:
    """A systemd booted as PID 1 of private namespaces, and systemctl for it."""

    def __init__(self, root: Path, units: Path, cgroup: Path) -> None:
        self.root = root
        self.cgroup = cgroup
        self.console = root / "console.log"
        self.console.touch()
        boot = root / "boot.sh"
        boot.write_text(
            "set -e\n"
            "mount --make-rprivate /\n"
            "umount -l /sys/fs/cgroup 2>/dev/null || true\n"
            "mount -t cgroup2 cgroup2 /sys/fs/cgroup\n"
            "mount -t tmpfs tmpfs /run\n"
            "mount -t tmpfs tmpfs /opt\n"
            "mkdir /opt/echosvc\n"
            f"mount --bind {root / 'opt-echosvc'} /opt/echosvc\n"
            f"mount --bind {self.console} /dev/console\n"
            f"export SYSTEMD_UNIT_PATH={units} container=echosvc-test\n"
            f"exec {SYSTEMD} --system --unit=echosvc-test.target"
            " --log-target=console --log-level=info\n"
        )
        cgroup.mkdir()
        self.process = subprocess.Popen(
            [
                "sh",
                "-c",
                f'echo $$ > {cgroup / "cgroup.procs"} && exec "$@"',
                "sh",
                "unshare",
                "--pid",
                "--fork",
                "--kill-child",
                "--mount",
                "--mount-proc",
                "--cgroup",
                "sh",
                str(boot),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self.console.open("ab"),
            stderr=subprocess.STDOUT,
        )
        self.pid = 0

    def boot(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        while time.monotonic() < deadline and self.process.poll() is None:
            if not self.pid and children.exists() and children.read_text().split():
                self.pid = int(children.read_text().split()[0])
            if self.pid:
                state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.1)
        pytest.skip(f"could not boot a private systemd here:\n{self.console.read_text()}")

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", "-p", *argv],
            capture_output=True,
            text=True,
            timeout=TOOL_TIMEOUT,
            env=child_env(),
            check=False,
        )
        if check:
            assert result.returncode == 0, f"{argv}: {result.stdout}{result.stderr}"
        return result

    def show(self, unit: str, *properties: str) -> dict[str, str]:
        output = self.run("systemctl", "show", unit, "-p", ",".join(properties)).stdout
        return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)

    def status_of(self, unit: str) -> str:
        return self.run("systemctl", "status", "--no-pager", "-l", unit, check=False).stdout

    def close(self) -> None:
        if self.pid:
            # SIGKILL to a PID 1 ends its whole PID namespace.
            os.kill(self.pid, signal.SIGKILL)
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)
        # Remove the cgroups systemd made, deepest first; a cgroup can only
        # go once the kernel has reaped its processes, hence the retries.
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.cgroup.exists() and time.monotonic() < deadline:
            directories = [path for path in self.cgroup.rglob("*") if path.is_dir()]
            directories.sort(key=lambda path: len(path.parts), reverse=True)
            for directory in [*directories, self.cgroup]:
                with contextlib.suppress(OSError):
                    directory.rmdir()
            time.sleep(0.05)


def write_unit_dir(units: Path, ports: dict[str, int], log_dir: Path) -> None:
    """deploy/ units unmodified, stub targets, and the test's drop-ins."""
    units.mkdir()
    for name in UNITS:
        shutil.copy(DEPLOY / name, units / name)
    for target in STUB_TARGETS:
        (units / f"{target}.target").write_text(f"[Unit]\nDescription=stand-in {target}\n")
    drop_ins = {
        "echosvc.socket": f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{ports['socket']}\n",
        "echosvc-metrics.socket": (
            f"[Socket]\nListenStream=\nListenStream=127.0.0.1:{ports['metrics']}\n"
        ),
        "echosvc-standalone.service": (
            f"[Service]\nEnvironment=ECHOSVC_PORT={ports['standalone']}\n"
        ),
    }
    for service in SERVICES:
        # Drop-ins for a template apply to all its instances.
        log = log_dir / f"{service.replace('@', '-at')}.log"
        drop_ins[service] = (
            drop_ins.get(service, "[Service]\n") + f"StandardError=append:{log}\nWatchdogSec=1s\n"
        )
    for unit, text in drop_ins.items():
        (units / f"{unit}.d").mkdir()
        (units / f"{unit}.d" / "test.conf").write_text(text)


@pytest.mark.slow
def test_units_run_hardened_under_systemd(tmp_path: Path) -> None:
    reason = sandbox_unavailable()
    if reason is not None:
        pytest.skip(reason)
    cgroup = cgroup2_dir()
    assert cgroup is not None
    ports = {"socket": free_port(), "standalone": free_port(), "instance": free_port()}
    ports["metrics"] = free_port()
    logs = tmp_path / "logs"
    logs.mkdir(mode=0o755)
    write_unit_dir(tmp_path / "units", ports, logs)
    build_opt_echosvc(tmp_path / "opt-echosvc")
    instance = f"echosvc@{ports['instance']}.service"

    sandbox = SystemdSandbox(tmp_path, tmp_path / "units", cgroup / f"echosvc-test-{os.getpid()}")
    try:
        sandbox.boot()

        def diagnose() -> str:
            parts = [sandbox.status_of(unit) for unit in ("echosvc.socket", *SERVICES[:2])]
            parts += [f"--- {log.name}\n{log.read_text()}" for log in sorted(logs.iterdir())]
            return "\n".join(parts) + f"\n--- systemd\n{sandbox.console.read_text()[-4000:]}"

        # Socket activation: the first connection starts the service.
        sandbox.run("systemctl", "start", "echosvc.socket", "echosvc-metrics.socket")
        line = b"activated by systemd \x00\xff\r\n"
        expect_echo(ports["socket"], line, diagnose, timeout=START_TIMEOUT)
        record = wait_for_log(logs / "echosvc.service.log", "listening")
        assert record["activation"] == "systemd"
        service = sandbox.show("echosvc.service", "ActiveState", "MainPID", "StatusText")
        assert service["ActiveState"] == "active", diagnose()
        assert service["StatusText"].startswith("serving"), service

        # The sandbox is in force: unprivileged dynamic user, no capabilities,
        # seccomp, and a network namespace of its own.
        pid = service["MainPID"]
        status = sandbox.run("cat", f"/proc/{pid}/status").stdout
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        assert fields["Uid"].split()[0] != "0", status
        assert int(fields["CapEff"], 16) == int(fields["CapBnd"], 16) == 0, status
        assert fields["NoNewPrivs"] == "1", status
        assert fields["Seccomp"] == "2", status
        own_net = sandbox.run("readlink", f"/proc/{pid}/ns/net").stdout
        assert own_net != sandbox.run("readlink", "/proc/1/ns/net").stdout

        # With no network of its own it is scraped on the socket named
        # metrics, which systemd passed beside the echo socket.
        record = wait_for_log(logs / "echosvc.service.log", "metrics_listening")
        assert record["address"] == f"127.0.0.1:{ports['metrics']}"
        text = scrape(ports["metrics"])
        assert re.search(r"^echosvc_connections_accepted_total [1-9]", text, re.M), text
        assert "process_resident_memory_bytes" in text

        # WatchdogSec=1s: still the same process after several intervals.
        time.sleep(2.5)
        expect_echo(ports["socket"], b"still here\n", diagnose)
        after = sandbox.show("echosvc.service", "ActiveState", "MainPID", "NRestarts")
        assert after == {"ActiveState": "active", "MainPID": pid, "NRestarts": "0"}, diagnose()

        # SIGTERM: graceful stop, exit status 0; the socket stays and
        # activates it again.
        sandbox.run("systemctl", "stop", "echosvc.service")
        stopped = sandbox.show("echosvc.service", "Result", "ExecMainStatus", "ActiveState")
        assert stopped == {"Result": "success", "ExecMainStatus": "0", "ActiveState": "inactive"}
        wait_for_log(logs / "echosvc.service.log", "stopped")
        expect_echo(ports["socket"], b"again\n", diagnose, timeout=START_TIMEOUT)

        # The units that bind their own port.
        sandbox.run("systemctl", "start", "echosvc-standalone.service", instance)
        expect_echo(ports["standalone"], b"bound by echosvc\n", diagnose)
        # The template runs its instances behind HAProxy: PROXY v2 first.
        header = encode_v2(("203.0.113.7", 4000), ("127.0.0.1", ports["instance"]))
        expect_echo(ports["instance"], b"bound by echosvc\n", diagnose, header=header)
        closed = wait_for_log(logs / "echosvc-at.service.log", "connection_closed")
        assert (closed["peer"], closed["reason"]) == ("203.0.113.7:4000", "eof"), closed
        assert sandbox.show(instance, "User")["User"] == f"echosvc-{ports['instance']}"
        sandbox.run("systemctl", "stop", "echosvc-standalone.service", instance)
        for unit in ("echosvc-standalone.service", instance):
            result = sandbox.show(unit, "Result", "ExecMainStatus", "NRestarts")
            assert result == {"Result": "success", "ExecMainStatus": "0", "NRestarts": "0"}, (
                sandbox.status_of(unit)
            )

        # --workers: a supervisor (the main process, feeding the watchdog)
        # and its workers. On stop the supervisor gets SIGTERM
        # (KillMode=mixed) and orders every worker to drain: none may stop
        # at once (shutdown_forced).
        sandbox.run("systemctl", "set-environment", "ECHOSVC_WORKERS=2")
        sandbox.run("systemctl", "restart", "echosvc.service")
        log = logs / "echosvc.service.log"
        wait_until(lambda: '"workers": 2' in log.read_text(), "2 workers listening", diagnose)
        expect_echo(ports["socket"], b"to a worker\n", diagnose)
        # The supervisor serves the socket named metrics, for both workers.
        text = scrape(ports["metrics"])
        for worker in ("0", "1"):
            assert f'echosvc_worker_up{{worker="{worker}"}} 1.0' in text, text
        before = sandbox.show("echosvc.service", "MainPID")
        time.sleep(2.5)
        assert sandbox.show("echosvc.service", "MainPID", "ActiveState") == {
            **before,
            "ActiveState": "active",
        }, diagnose()
        sandbox.run("systemctl", "stop", "echosvc.service")
        stopped = sandbox.show("echosvc.service", "Result", "ExecMainStatus")
        assert stopped == {"Result": "success", "ExecMainStatus": "0"}, diagnose()
        records = [
            json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")
        ]
        worker_stops = [r for r in records if r["event"] == "stopped" and "worker" in r]
        assert len(worker_stops) >= 2, diagnose()
        assert not [r for r in records if r["event"] == "shutdown_forced"], diagnose()
    finally:
        sandbox.close()
