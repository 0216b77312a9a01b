"""The Prometheus exposition and its endpoint (`echosvc.metrics`, ``--metrics``).

In layers: the collectors in-process over a real server on loopback, parsed
back with prometheus_client's own strict parsers; the scrape handler on
memory streams under ``MockClock(autojump_threshold=0)``, so its 10 s
deadline is exact and instant; the endpoint on loopback for what needs real
sockets (a silent scraper beside a real one); and the real CLI in a
subprocess, whose output Prometheus' ``promtool`` checks in both formats.
A real Prometheus server scraping it is in ``test_prometheus.py``.
"""

from __future__ import annotations

import gzip
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

import h11
import prometheus_client
import pytest
import trio
import trio.testing
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text

from echosvc import CloseReason, Config, ConfigError, Server, __version__, serve
from echosvc import metrics as em
from echosvc.workers import REPORT_MAX_BYTES

from .support import Daemon, captured_logs, child_env, connect, receive_until_eof, round_trip
from .test_cli import run_cli
from .test_systemd import free_port, needs_socket_activate

TIME_LIMIT = 30
OPENMETRICS = "application/openmetrics-text; version=1.0.0"
needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool is not installed (Debian package prometheus)"
)

ECHOSVC_SERIES = {
    "echosvc_connections_accepted": "counter",
    "echosvc_connections_active": "gauge",
    "echosvc_connections_limit": "gauge",
    "echosvc_connections_closed": "counter",
    "echosvc_connection_duration_seconds": "histogram",
    "echosvc_lines": "counter",
    "echosvc_received_bytes": "counter",
    "echosvc_sent_bytes": "counter",
    "echosvc_accept_failures": "counter",
    "echosvc_build": "info",
    "echosvc_trio_tasks_living": "gauge",
    "echosvc_trio_tasks_runnable": "gauge",
    "echosvc_trio_tasks_waiting_read": "gauge",
    "echosvc_trio_tasks_waiting_write": "gauge",
    "echosvc_event_loop_lag_seconds": "gauge",
}


# --- helpers --------------------------------------------------------------------


async def http_request(
    port: int,
    method: str = "GET",
    target: str = "/metrics",
    headers: Iterable[tuple[str, str]] = (),
    host: str = "127.0.0.1",
) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request with h11 as the client: status, headers, body."""
    client = h11.Connection(h11.CLIENT)
    async with await trio.open_tcp_stream(host, port) as stream:
        request = h11.Request(method=method, target=target, headers=[("Host", host), *headers])
        await stream.send_all(client.send(request) + client.send(h11.EndOfMessage()))
        return await read_response(stream, client)


async def read_response(
    stream: trio.abc.ReceiveStream, client: h11.Connection
) -> tuple[int, dict[str, str], bytes]:
    status, fields, body = 0, {}, b""
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(bytes(await stream.receive_some()))
        elif isinstance(event, h11.Response):
            status = event.status_code
            fields = {name.decode(): value.decode() for name, value in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return status, fields, body
        else:
            raise AssertionError(f"unexpected {event!r}")


def families(text: str, *, openmetrics: bool = False) -> dict[str, Metric]:
    """Parsed with prometheus_client's parsers (the OpenMetrics one is strict)."""
    parse = parse_openmetrics if openmetrics else parse_text
    return {family.name: family for family in parse(text)}


async def until(predicate: Callable[[], bool]) -> None:
    """Poll a server's figures, which have no event to wait for."""
    while not predicate():  # noqa: ASYNC110
        await trio.sleep(0.01)


def value(family: Metric, sample: str, **labels: str) -> float:
    [found] = [s.value for s in family.samples if s.name == sample and s.labels == labels]
    return found


@asynccontextmanager
async def running_server(**settings: object) -> AsyncIterator[Server]:
    async with trio.open_nursery() as nursery:
        server: Server = await nursery.start(serve, Config(port=0, **settings))  # type: ignore[arg-type]
        try:
            yield server
        finally:
            server.shutdown()


async def eof_connection(port: int) -> None:
    async with await connect(port) as client:
        await round_trip(client, b"one line\n")
        await client.send_eof()
        assert await receive_until_eof(client) == b""


# --- the collectors --------------------------------------------------------------


async def test_every_series_with_help_and_base_units_in_both_formats() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with running_server() as server, trio.open_nursery() as nursery:
            monitor = em.LoopMonitor()
            nursery.start_soon(monitor.run)
            registry = em.daemon_registry(server, monitor)
            await eof_connection(server.port)
            await until(lambda: server.statistics().served >= 1)
            text = prometheus_client.generate_latest(registry).decode()
            om_text = choose_encoder(OPENMETRICS)[0](registry).decode()
            nursery.cancel_scope.cancel()

    assert om_text.endswith("# EOF\n")
    for found in (families(text), families(om_text, openmetrics=True)):
        for name, kind in ECHOSVC_SERIES.items():
            # The text format has no info type: a gauge named _info.
            family = found.get(name) or found[f"{name}_info"]
            if kind != "info":  # the text format has no info type: a gauge
                assert family.type == kind, name
            assert family.documentation, f"{name} has no help text"
        assert any(name.startswith("process_") for name in found), "no process_* series"
    om = families(om_text, openmetrics=True)
    assert om["echosvc_connection_duration_seconds"].unit == "seconds"
    assert om["echosvc_received_bytes"].unit == "bytes"
    assert om["echosvc_event_loop_lag_seconds"].unit == "seconds"
    assert value(om["echosvc_connections_accepted"], "echosvc_connections_accepted_total") == 1
    closed = om["echosvc_connections_closed"]
    reasons = {s.labels["reason"]: s.value for s in closed.samples if s.name.endswith("_total")}
    assert reasons == {reason.value: int(reason is CloseReason.EOF) for reason in CloseReason}
    assert value(om["echosvc_lines"], "echosvc_lines_total") == 1
    assert value(om["echosvc_received_bytes"], "echosvc_received_bytes_total") == 9
    assert value(om["echosvc_sent_bytes"], "echosvc_sent_bytes_total") == 9
    assert value(om["echosvc_build"], "echosvc_build_info", version=__version__) == 1
    duration = om["echosvc_connection_duration_seconds"]
    assert value(duration, "echosvc_connection_duration_seconds_count") == 1
    assert value(duration, "echosvc_connection_duration_seconds_bucket", le="+Inf") == 1
    # No label anywhere holds a peer address (or any address).
    for family in om.values():
        for sample in family.samples:
            for label in sample.labels.values():
                assert not re.search(r"\d+\.\d+\.\d+\.\d+|:\d+$", label), (sample, label)


async def test_udp_datagrams_by_result_only_with_udp() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with running_server() as plain:
            registry = prometheus_client.CollectorRegistry()
            registry.register(em.ServerCollector(plain))
            text = prometheus_client.generate_latest(registry).decode()
        assert "echosvc_udp" not in text
        async with running_server(udp=True, udp_max_bytes=100) as server:
            registry = prometheus_client.CollectorRegistry()
            registry.register(em.ServerCollector(server))
            with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer:
                await peer.bind(("127.0.0.1", 0))
                await peer.sendto(b"ping", ("127.0.0.1", server.port))
                assert await peer.recv(200) == b"ping"
                await peer.sendto(b"x" * 101, ("127.0.0.1", server.port))  # over the limit
                await until(lambda: sum(server.udp.statistics().dropped.values()) >= 1)  # type: ignore[union-attr]
            found = families(prometheus_client.generate_latest(registry).decode())
    datagrams = found["echosvc_udp_datagrams"]
    results = {s.labels["result"]: s.value for s in datagrams.samples}
    assert results == {"echoed": 1, "rate": 0, "port": 0, "size": 1, "source": 0, "send": 0}
    assert found["echosvc_udp_sources"].samples[0].value == 1


def test_process_series_without_proc_stat(tmp_path: Path) -> None:
    """Under ProcSubset=pid (echosvc.service) /proc/stat is hidden and
    prometheus_client's ProcessCollector reports nothing; ours still does."""
    (tmp_path / "self").symlink_to(Path("/proc/self"))
    assert (
        list(prometheus_client.ProcessCollector(proc=str(tmp_path), registry=None).collect()) == []
    )
    hidden = em.SandboxedProcessCollector(proc=str(tmp_path), registry=None)
    found = {family.name: family.samples[0].value for family in hidden.collect()}
    full = {
        family.name: family.samples[0].value
        for family in em.SandboxedProcessCollector(registry=None).collect()
    }
    assert set(found) == set(full) >= {"process_start_time_seconds", "process_open_fds"}
    assert abs(found["process_start_time_seconds"] - full["process_start_time_seconds"]) < 2


async def test_a_collector_in_the_callers_registry_and_nothing_global() -> None:
    """Two servers, two registries: each counts its own, and prometheus_client's
    process-global REGISTRY never hears of either."""
    with trio.fail_after(TIME_LIMIT):
        async with running_server() as one, running_server() as two:
            registries = [prometheus_client.CollectorRegistry() for _ in range(2)]
            for registry, server in zip(registries, (one, two), strict=True):
                registry.register(em.ServerCollector(server))
            for _ in range(2):
                await eof_connection(one.port)
            await eof_connection(two.port)
            await until(lambda: one.statistics().served >= 2 and two.statistics().served >= 1)
            counts = [
                registry.get_sample_value("echosvc_connections_accepted_total")
                for registry in registries
            ]
    assert counts == [2, 1]
    assert prometheus_client.REGISTRY.get_sample_value("echosvc_connections_accepted_total") is None
    # Registering the same series twice in one registry is refused, as for
    # any prometheus_client collector.
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registries[0].register(em.ServerCollector(two))


async def test_collecting_from_another_thread_takes_the_snapshot_in_the_trio_thread() -> None:
    """prometheus_client's threaded start_http_server in an application that
    embeds echosvc: collecting from its thread still works."""
    with trio.fail_after(TIME_LIMIT):
        async with running_server() as server:
            registry = prometheus_client.CollectorRegistry()
            registry.register(em.ServerCollector(server))
            registry.register(em.LoopCollector())
            await eof_connection(server.port)
            await until(lambda: server.statistics().served >= 1)
            text = await trio.to_thread.run_sync(prometheus_client.generate_latest, registry)
    found = families(text.decode())
    assert value(found["echosvc_connections_accepted"], "echosvc_connections_accepted_total") == 1
    assert found["echosvc_trio_tasks_living"].samples[0].value > 0
    assert "echosvc_event_loop_lag_seconds" not in found  # no monitor given


async def test_the_run_loop_gauges_follow_the_tasks() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with running_server() as server:
            registry = prometheus_client.CollectorRegistry()
            registry.register(em.LoopCollector())

            def gauge(name: str) -> float:
                found = registry.get_sample_value(name)
                assert found is not None, name
                return found

            before = gauge("echosvc_trio_tasks_living"), gauge("echosvc_trio_tasks_waiting_read")
            clients = [await connect(server.port) for _ in range(5)]
            await until(lambda: server.statistics().active >= 5)
            await trio.sleep(0.05)  # each handler is parked waiting for its line
            after = gauge("echosvc_trio_tasks_living"), gauge("echosvc_trio_tasks_waiting_read")
            for client in clients:
                await client.aclose()
    assert after[0] - before[0] == 5  # a task per connection
    # The accept loop waits in Trio's I/O manager; connections do too, or
    # on the server's netpoller (which Trio does not count), as load decides.
    assert before[1] >= 1
    assert after[1] >= before[1]


async def test_a_blocked_loop_shows_in_the_lag_gauge() -> None:
    """The loop is blocked on purpose (a synchronous sleep in a task). The
    gauge reports it whether the scrape runs before the monitor has woken up
    again (the pending wake-up is overdue) or after (it measured the block)."""
    monitor = em.LoopMonitor()
    registry = prometheus_client.CollectorRegistry()
    registry.register(em.LoopCollector(monitor))

    def lag() -> float:
        found = registry.get_sample_value("echosvc_event_loop_lag_seconds")
        assert found is not None
        return found

    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(monitor.run)
            await trio.sleep(0.35)
            # (Generous: other test runs may share the machine's cores.)
            assert lag() < 0.5, "an idle loop is not late"
            time.sleep(1.0)  # noqa: ASYNC251 -- blocking the loop is the point
            assert lag() >= 0.8  # at once: the pending wake-up is overdue
            await trio.sleep(3 * em.LAG_INTERVAL_S)
            assert lag() >= 0.8  # later: the measured lateness, still in the window
            nursery.cancel_scope.cancel()


def test_the_lag_window_forgets_old_blocks() -> None:
    async def main() -> float:
        monitor = em.LoopMonitor(interval=1.0, window=3)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(monitor.run)
            await trio.sleep(0.5)
            clock.jump(5.0)  # a 5 s "block": the wake-up at 1 s runs at 5.5 s
            await trio.sleep(0.1)
            assert 4.4 < monitor.lag() < 4.6
            await trio.sleep(3.5)  # three punctual wake-ups later
            lag = monitor.lag()
            nursery.cancel_scope.cancel()
        return lag

    clock = trio.testing.MockClock(autojump_threshold=0)
    assert trio.run(main, clock=clock) == 0.0


# --- a supervisor's view of its workers ------------------------------------------


async def test_a_snapshot_survives_the_trip_from_a_worker() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with running_server() as server, trio.open_nursery() as nursery:
            monitor = em.LoopMonitor()
            nursery.start_soon(monitor.run)
            await eof_connection(server.port)
            await until(lambda: server.statistics().served >= 1)
            registry = em.daemon_registry(server, monitor)
            sent = list(registry.collect())
            text = em.encode_families(_Fixed(sent))
            nursery.cancel_scope.cancel()
    assert "\n" not in text  # one line: it travels as one report
    # ... one datagram the supervisor reads whole, with room to grow.
    assert len(text.encode()) + 64 < REPORT_MAX_BYTES // 4
    assert em.decode_families(text) == sent
    for garbage in ("", "{}", "[1]", '[{"name": "x"}]', '[{"name":"1","help":"","type":"x"}]'):
        with pytest.raises(ValueError):  # noqa: PT011 -- any ValueError is the contract
            em.decode_families(garbage)


class _Fixed:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


async def test_a_worker_that_does_not_answer_in_1_s_is_up_0_and_missing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Worker 0 answers, 1 never does, 2 is gone (OSError), 3 answers
    garbage: the answer comes after exactly 1 s, with worker 0's series
    labelled worker="0" and up 1, 0, 0, 0."""
    answer = em.encode_families(counter_registry())

    async def ask(index: int) -> str:
        if index == 0:
            await trio.sleep(0.2)
            return answer
        if index == 1:
            await trio.sleep_forever()
        if index == 2:
            raise ConnectionRefusedError
        return "not json"

    own = prometheus_client.CollectorRegistry()
    prometheus_client.Gauge("supervisor_own", "Its own.", registry=own).set(7)
    view = em.WorkersView(4, ask, own)
    start = trio.current_time()
    collector = await view()
    assert trio.current_time() - start == em.WORKER_ANSWER_S
    text = choose_encoder(OPENMETRICS)[0](collector).decode()
    found = families(text, openmetrics=True)  # strict: the merged output is valid
    up = {s.labels["worker"]: s.value for s in found["echosvc_worker_up"].samples}
    assert up == {"0": 1, "1": 0, "2": 0, "3": 0}
    [sample] = [s for s in found["demo_events"].samples if s.name == "demo_events_total"]
    assert (sample.labels, sample.value) == ({"worker": "0"}, 3)
    assert found["supervisor_own"].samples[0].labels == {}  # no worker label


def test_families_of_several_workers_merge_by_name_each_workers_samples_together() -> None:
    """A name appears once in an exposition: the supervisor's own family of
    that name and its workers' are one, the supervisor's samples unlabelled."""
    one = list(counter_registry().collect())
    merged = em.worker_families([one, None, one], own=counter_registry().collect())
    names = [family.name for family in merged]
    assert names == ["echosvc_worker_up", "demo_events"]
    assert [s.labels for s in merged[1].samples] == [{}, {"worker": "0"}, {"worker": "2"}]
    text = choose_encoder(OPENMETRICS)[0](_Fixed(merged)).decode()
    assert families(text, openmetrics=True)["demo_events"].samples == merged[1].samples


# --- the scrape handler, on memory streams with a virtual clock ------------------


class Constant:
    """A collector whose output never changes (no _created timestamps)."""

    def collect(self) -> Iterable[Metric]:
        return [CounterMetricFamily("demo_events", "Events.", value=3)]


def counter_registry() -> prometheus_client.CollectorRegistry:
    registry = prometheus_client.CollectorRegistry()
    registry.register(Constant())
    return registry


async def exchange(raw: bytes, source: em.Source | None = None) -> tuple[bytes, float]:
    """Send ``raw`` to handle_scrape; what came back before it closed, and when."""
    client, server = trio.testing.memory_stream_pair()
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(em.handle_scrape, server, source or counter_registry())
        await client.send_all(raw)
        received = await receive_until_eof(client)
        closed_at = trio.current_time() - start
        await client.aclose()
    return received, closed_at


def parse_response(raw: bytes, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method=method, target="/metrics", headers=[("Host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(raw)
    client.receive_data(b"")
    status, fields, body = 0, {}, b""
    while not isinstance(event := client.next_event(), h11.EndOfMessage):
        if isinstance(event, h11.Response):
            status = event.status_code
            fields = {name.decode(): value.decode() for name, value in event.headers}
        elif isinstance(event, h11.Data):
            body += event.data
    return status, fields, body


def request(method: str = "GET", target: str = "/metrics", *headers: str) -> bytes:
    head = [f"{method} {target} HTTP/1.1", "Host: x", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode()


async def test_get_answers_the_text_format_and_closes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    raw, closed_at = await exchange(request())
    status, fields, body = parse_response(raw)
    assert status == 200
    assert fields["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert fields["connection"] == "close"
    assert int(fields["content-length"]) == len(body)
    assert b"demo_events_total 3.0\n" in body
    # It closed at once after answering: no waiting for the deadline.
    assert closed_at < 1


async def test_openmetrics_when_accept_asks_and_gzip_when_accepted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    raw, _ = await exchange(request("GET", "/metrics", f"Accept: {OPENMETRICS}"))
    status, fields, body = parse_response(raw)
    assert status == 200
    assert fields["content-type"].startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")
    raw, _ = await exchange(request("GET", "/metrics", "Accept-Encoding: gzip"))
    status, fields, body = parse_response(raw)
    assert fields["content-encoding"] == "gzip"
    assert b"demo_events_total 3.0\n" in gzip.decompress(body)


async def test_head_has_the_headers_of_get_and_no_body(
    autojump_clock: trio.testing.MockClock,
) -> None:
    _, get_fields, get_body = parse_response((await exchange(request()))[0])
    raw, _ = await exchange(request("HEAD"))
    status, fields, body = parse_response(raw, method="HEAD")
    assert (status, body) == (200, b"")
    assert fields == get_fields
    assert int(fields["content-length"]) == len(get_body)


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (request("GET", "/"), 404),
        (request("GET", "/metrics/extra"), 404),
        (request("GET", "/metrics?name[]=x"), 200),  # a query does not change the path
        (request("POST", "/metrics", "Content-Length: 0"), 405),
        (request("DELETE", "/metrics"), 405),
        (request("POST", "/elsewhere", "Content-Length: 0"), 404),
        (b"BREW /pot HTCPCP/1.0\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(64), 400),  # a TLS hello
    ],
)
async def test_other_paths_methods_and_garbage_are_refused(
    raw: bytes, status: int, autojump_clock: trio.testing.MockClock
) -> None:
    received, closed_at = await exchange(raw)
    got, fields, _ = parse_response(received)
    assert got == status
    if status == 405:
        assert fields["allow"] == "GET, HEAD"
    assert closed_at < 2


async def test_a_head_over_8_kib_is_431(autojump_clock: trio.testing.MockClock) -> None:
    def head(size: int) -> bytes:
        raw = request("GET", "/metrics", "X-Padding: ")
        return raw[:-4] + b"p" * (size - len(raw)) + b"\r\n\r\n"

    assert len(head(em.MAX_HEAD_BYTES)) == em.MAX_HEAD_BYTES
    for size, status in [(em.MAX_HEAD_BYTES, 200), (em.MAX_HEAD_BYTES + 1, 431), (10**6, 431)]:
        received, _ = await exchange(head(size))
        assert parse_response(received)[0] == status, size


@pytest.mark.parametrize("sent", [b"", b"GET /metrics HTTP/1.1\r\nHost: x\r\n"])
async def test_a_silent_or_unfinished_request_is_closed_at_the_deadline(
    sent: bytes, autojump_clock: trio.testing.MockClock
) -> None:
    client, server = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(em.handle_scrape, server, counter_registry())
        await client.send_all(sent)
        start = trio.current_time()
        assert await receive_until_eof(client) == b""
        assert trio.current_time() - start == em.SCRAPE_TIMEOUT_S


async def test_a_failing_collector_is_a_500_logged_with_its_traceback(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Broken:
        def collect(self) -> Iterable[Metric]:
            raise RuntimeError("collector bug")

    with captured_logs() as logs:
        raw, _ = await exchange(request(), Broken())
    assert parse_response(raw)[0] == 500
    [record] = logs.events("metrics_scrape_failed")
    assert record["log_level"] == "error"
    assert "collector bug" in record["error"]
    assert record["exc_info"] is True


async def test_an_async_source_is_awaited_for_each_scrape(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls = []

    async def gather() -> prometheus_client.CollectorRegistry:
        calls.append(trio.current_time())
        await trio.sleep(0.5)  # e.g. asking workers
        return counter_registry()

    for _ in range(2):
        raw, _ = await exchange(request(), gather)
        assert parse_response(raw)[0] == 200
    assert len(calls) == 2


# --- the endpoint on loopback ----------------------------------------------------


@asynccontextmanager
async def endpoint(source: em.Source) -> AsyncIterator[int]:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port: int = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(em.serve_metrics, listeners, source)
        yield port
        nursery.cancel_scope.cancel()


async def test_a_scraper_that_sends_nothing_does_not_delay_another() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with endpoint(counter_registry()) as port:
            silent = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(5)]
            half = await trio.open_tcp_stream("127.0.0.1", port)
            await half.send_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and no more
            start = trio.current_time()
            status, _, body = await http_request(port)
            elapsed = trio.current_time() - start
            assert status == 200
            assert b"demo_events_total 3.0" in body
            assert elapsed < 1.0, elapsed
            for stream in [*silent, half]:
                await stream.aclose()


# --- the daemon: --metrics, promtool, socket activation -------------------------


async def scrape(port: int, accept: str | None = None) -> str:
    headers = [("Accept", accept)] if accept else []
    status, _, body = await http_request(port, headers=headers)
    assert status == 200, body
    return body.decode()


class ToolResult:
    def __init__(self, process: subprocess.CompletedProcess[bytes]) -> None:
        self.returncode = process.returncode
        self.stdout = process.stdout.decode(errors="replace")
        self.stderr = process.stderr.decode(errors="replace")


async def run_tool(argv: list[str], *, stdin: bytes = b"", cwd: Path | None = None) -> ToolResult:
    with trio.fail_after(TIME_LIMIT):
        done = await trio.run_process(
            argv, stdin=stdin, capture_stdout=True, capture_stderr=True, cwd=cwd, check=False
        )
    return ToolResult(done)


def metrics_port(daemon: Daemon) -> int:
    [record] = daemon.events("metrics_listening")
    return int(record["address"].rsplit(":", 1)[1])


@needs_promtool
async def test_promtool_checks_a_running_daemons_output_in_both_formats(tmp_path: Path) -> None:
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(
                nursery, "--port", "0", "--metrics", "127.0.0.1:0", "--read-timeout", "0.2"
            )
            [listening] = daemon.events("metrics_listening")
            port = metrics_port(daemon)
            assert listening["address"] == f"127.0.0.1:{port}"
            assert listening["address"] not in daemon.listening["addresses"]
            # Something to count: an echo and a read timeout.
            await eof_connection(daemon.port)
            async with await connect(daemon.port) as idle:
                assert await receive_until_eof(idle) == b""
            await daemon.wait_for("connection_closed", 2)
            text = await scrape(port)
            om_text = await scrape(port, OPENMETRICS)
            assert await daemon.stop() == 0

    # The text format: promtool's linter (names, help, types, units, _total).
    lint = await run_tool(["promtool", "check", "metrics"], stdin=text.encode())
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert 'echosvc_connections_closed_total{reason="read_timeout"} 1.0' in text
    # OpenMetrics: promtool 2.42's linter reads only the text format, but
    # its OpenMetrics backfill parses with Prometheus' own (strict)
    # OpenMetrics parser, given a timestamp on every sample.
    stamped = re.sub(r"^([^#\n].*)$", rf"\1 {int(time.time())}", om_text, flags=re.MULTILINE)
    (tmp_path / "metrics.om").write_text(stamped)
    backfill = await run_tool(
        ["promtool", "tsdb", "create-blocks-from", "openmetrics", "metrics.om", "blocks"],
        cwd=tmp_path,
    )
    assert backfill.returncode == 0, backfill.stdout + backfill.stderr
    # Every sample made it: NUM SAMPLES, NUM CHUNKS and NUM SERIES in its table.
    series = len([line for line in om_text.splitlines() if not line.startswith("#")])
    assert re.search(rf"\s{series}\s+{series}\s+{series}\s", backfill.stdout), backfill.stdout
    assert families(om_text, openmetrics=True)  # and prometheus_client's strict parser


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("127.0.0.1:9180", "127.0.0.1:9180"),
        (" 0.0.0.0:0 ", "0.0.0.0:0"),
        ("[::1]:9180", "[::1]:9180"),
        ("localhost:9180", "localhost:9180"),
        ("off", None),
        ("OFF", None),
        ("", None),
        (None, None),
    ],
)
def test_the_metrics_address_is_host_port_or_off(given: str | None, expected: str | None) -> None:
    assert Config(metrics=given).metrics == expected


@pytest.mark.parametrize(
    "given",
    ["9180", ":9180", "::1:9180", "[::1]", "[::1]:", "host:65536", "host:+80", "host:٣"],
)
def test_a_metrics_address_that_is_not_host_port_names_the_field(given: str) -> None:
    with pytest.raises(ConfigError, match=r"^metrics: ") as caught:
        Config(metrics=given)
    assert caught.value.field == "metrics"


def test_a_bad_metrics_value_is_a_usage_error_naming_the_flag() -> None:
    for args, env in [
        (["--metrics", "9180"], {}),
        ([], {"ECHOSVC_METRICS": "localhost:70000"}),
    ]:
        done = run_cli("serve", *args, env=env)
        assert done.returncode == 2, (args, env, done.stderr)
        assert "'--metrics' / ECHOSVC_METRICS" in done.stderr
        assert "Traceback" not in done.stderr


def test_a_metrics_port_in_use_is_one_line_and_status_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli("serve", "--port", "0", "--metrics", f"127.0.0.1:{port}")
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if not line.startswith("{")]
    assert lines == [
        f"echosvc: --metrics: cannot listen on 127.0.0.1:{port}: Address already in use"
    ], done.stderr
    assert '"listening"' not in done.stderr


async def test_off_is_no_endpoint_and_the_env_variable_works_too() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(nursery, "--port", "0", env={"ECHOSVC_METRICS": "off"})
            assert daemon.events("metrics_listening") == []
            assert await daemon.stop() == 0
            port = free_port()
            env = {"ECHOSVC_METRICS": f"127.0.0.1:{port}"}
            daemon = await Daemon.start(nursery, "--port", "0", env=env)
            assert metrics_port(daemon) == port
            assert "echosvc_connections_active 0.0" in await scrape(port)
            assert await daemon.stop() == 0


async def test_scrapes_go_on_through_the_shutdown_grace() -> None:
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(
                nursery, "--port", "0", "--metrics", "127.0.0.1:0", "--shutdown-grace", "3"
            )
            port = metrics_port(daemon)
            async with await connect(daemon.port) as stuck:
                # A client that never reads holds the server in its grace.
                with trio.move_on_after(0.3):
                    while True:
                        await stuck.send_all(b"s" * 1023 + b"\n")
                daemon.send_signal(signal.SIGTERM)
                await daemon.wait_for("shutdown_started")
                text = await scrape(port)
                assert "echosvc_connections_active 1.0" in text
            assert await daemon.wait() == 0


@needs_socket_activate
async def test_the_inherited_socket_named_metrics_is_the_endpoint() -> None:
    """systemd-socket-activate with two sockets, the second named metrics
    (``--fdname``, i.e. ``FileDescriptorName=``): the first is the echo, the
    second the endpoint, and a scrape is what wakes the service up."""
    echo_port, port = free_port(), free_port()
    argv = ["systemd-socket-activate", "-E", "PATH", "--fdname=echo:metrics"]
    argv += ["-l", f"127.0.0.1:{echo_port}", "-l", f"127.0.0.1:{port}"]
    argv += [sys.executable, "-m", "echosvc", "serve"]
    with trio.fail_after(TIME_LIMIT):
        async with trio.open_nursery() as nursery:
            daemon = await Daemon.start(
                nursery, "--metrics", "127.0.0.1:1", argv=argv, wait_for=None
            )
            with trio.fail_after(10):
                while True:
                    try:
                        text = await scrape(port)
                        break
                    except OSError:
                        await trio.sleep(0.05)
            assert "echosvc_connections_accepted_total 0.0" in text
            listening = (await daemon.wait_for("listening"))[0]
            assert listening["activation"] == "systemd"
            assert listening["addresses"] == [f"127.0.0.1:{echo_port}"]
            [record] = daemon.events("metrics_listening")
            assert record["address"] == f"127.0.0.1:{port}"
            # --metrics was given as well: ignored, with a warning.
            assert any("metrics" in r["reason"] for r in daemon.events("address_ignored"))
            await eof_connection(echo_port)
            await daemon.wait_for("connection_closed")
            assert "echosvc_connections_accepted_total 1.0" in await scrape(port)
            assert await daemon.stop() == 0


def test_only_a_metrics_socket_or_two_of_them_is_one_clear_line_and_status_1() -> None:
    for names in ("metrics", "metrics:metrics"):
        sockets = [socket.socket() for _ in names.split(":")]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
        trampoline = (
            "import os, sys\n"
            "for i, fd in enumerate(sys.argv[1:]): os.dup2(int(fd), 3 + i)\n"
            "os.environ['LISTEN_PID'] = str(os.getpid())\n"
            "os.execv(sys.executable, [sys.executable, '-m', 'echosvc', 'serve'])\n"
        )
        env = {"LISTEN_FDS": str(len(sockets)), "LISTEN_FDNAMES": names}
        try:
            result = subprocess.run(
                [sys.executable, "-c", trampoline, *(str(s.fileno()) for s in sockets)],
                env=child_env(env),
                pass_fds=[s.fileno() for s in sockets],
                capture_output=True,
                text=True,
                timeout=TIME_LIMIT,
                check=False,
            )
        finally:
            for sock in sockets:
                sock.close()
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("echosvc: "), lines
        assert "'metrics'" in lines[0], lines
