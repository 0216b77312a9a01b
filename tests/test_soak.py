"""The chaos soak on every change: a short run, and a SIGTERM in the middle of one.

The full-length run is ``python -m tests.soak --duration 60 --clients 300``
(see tests/soak/README.md); CI runs these shorter ones. Set ``SOAK_SEED`` to
replay a seed a failure reported (timing still varies from run to run).
"""

from __future__ import annotations

import os

import pytest
import trio

from .soak import EXPECTED_REASON, Kind, SoakConfig, run_soak

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("SOAK_SEED", "20240"))
MIB = 2**20


async def test_a_short_chaos_run_keeps_every_promise() -> None:
    config = SoakConfig(duration=14, clients=200, seed=SEED)
    with trio.fail_after(config.duration + 60):
        report = await run_soak(config)
    text = report.text()
    print(text)
    assert report.problems() == [], text
    # Every kind of client ran, and every connection was closed for its reason.
    assert all(count > 0 for count in report.by_kind.values()), text
    for s in report.sessions:
        assert s.record is not None, (s.kind, s.peer, s.outcome)
        assert s.record["reason"] == EXPECTED_REASON[s.kind], (s.kind, s.record)
    # Well-behaved clients got back every byte they sent, the final partial line included.
    assert report.mismatches == 0
    assert report.bytes_verified == report.bytes_expected > 10 * MIB
    for s in report.sessions:
        if s.kind in (Kind.WELL_BEHAVED, Kind.HALF_CLOSE_PARTIAL):
            assert s.echo is not None
            assert s.echo.received == len(s.echo.sent), (s.kind, s.peer)
    # No descriptor or memory left behind; the accept loop never stalled.
    assert report.fd_settle_s is not None
    assert report.fd_settle_s <= 1.0
    assert report.fd_after == report.fd_baseline
    assert report.rss_growth is not None
    assert report.rss_growth <= config.rss_bound_mib * MIB
    assert report.canary["failures"] == 0
    assert report.canary["probes"] >= 0.8 * report.elapsed_s / config.canary_interval
    assert report.canary["max_ms"] <= config.canary_max_s * 1000
    assert report.exit_status == 0


async def test_sigterm_under_load_echoes_a_prefix_to_everyone_and_exits_in_time() -> None:
    # The grace is shorter than the write timeout, so a client that never
    # reads is cut by the grace, and the exit deadline is really tested.
    config = SoakConfig(
        duration=30, clients=200, seed=SEED, sigterm_after=5, write_timeout=4, shutdown_grace=1.5
    )
    with trio.fail_after(config.duration + 60):
        report = await run_soak(config)
    text = report.text()
    print(text)
    assert report.problems() == [], text
    assert report.exit_status == 0
    assert report.exit_s is not None
    assert report.exit_s <= config.shutdown_grace + 1
    assert report.sigterm_at is not None
    # Well-behaved clients cut mid-stream: exactly a prefix of what they sent
    # came back, and the server echoed every byte it read.
    cut = [
        s
        for s in report.sessions
        if s.kind is Kind.WELL_BEHAVED and s.record and s.record["reason"] == "shutdown"
    ]
    assert cut, text
    for s in cut:
        assert s.echo is not None
        assert s.record is not None
        assert s.echo.mismatch_at is None
        assert s.echo.received <= len(s.echo.sent)
        assert s.record["bytes_out"] == s.record["bytes_in"]
    for s in report.sessions:
        if s.kind is Kind.WELL_BEHAVED and s.record and not s.eof_sent:
            assert s.record["reason"] == "shutdown", s.record
    # No handler outlived the server: every connection the server opened
    # closed before it logged `stopped`, and `stopped` counted them all.
    assert report.handlers_unfinished == []
    assert report.closed_after_stopped == 0
    assert report.served_reported == report.closed_records > 0
