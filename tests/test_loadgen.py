"""Load generator: its statistics as pure functions, and one short real run against a real server."""

from __future__ import annotations

import asyncio

import pytest

from client_demo.loadgen import (
    _scrape, assign_finals, holds_target, largest_within, markdown, mean_batch_size, run_load, svg_plot, time_breakdown,
)
from client_demo.pacing import SendClock, percentile
from tests.serverharness import CLIPS, ServerThread, make_config


def test_percentile_nearest_rank():
    assert percentile([], 50) is None
    assert percentile([5.0], 95) == 5.0
    vals = list(range(1, 101))
    assert percentile(vals, 50) == 50 and percentile(vals, 95) == 95 and percentile(vals, 100) == 100


def test_send_clock_maps_audio_time_to_send_time():
    c = SendClock(16000)
    for k in range(10):
        c.sent(1600, 100.0 + k * 0.1)  # 100 ms chunks
    assert c.sent_at(50) == 100.0  # inside the first chunk
    assert c.sent_at(250) == 100.2
    assert abs(c.latency_ms(950, 101.5) - 600.0) < 1e-6


def test_finals_are_assigned_to_the_clip_they_overlap():
    spans = [(1200, 4000, "a.wav"), (5200, 9000, "b.wav")]
    finals = [{"start_ms": 1000, "end_ms": 2500, "text": "one"}, {"start_ms": 2500, "end_ms": 3900, "text": "two"},
              {"start_ms": 5100, "end_ms": 9100, "text": "three"}]
    assert assign_finals(finals, spans) == ["one two", "three"]


def test_target_and_largest_n():
    def row(n, p95, errors=0, lost=0):
        return {"sessions": n, "final_latency_ms": {"p95": p95}, "errors": errors, "lost_finals": lost}

    rows = [row(1, 300), row(2, 800), row(4, 1400, errors=1), row(8, 2000)]
    assert holds_target(rows[1], 1000) and not holds_target(rows[2], 2000) and not holds_target(row(1, None), 1000)
    assert largest_within(rows, 1000) == 2
    assert largest_within(rows, 100) == 0
    # The GPU target also bounds the cadence of partials.
    fast, slow = dict(row(1, 200), partial_gap_ms={"p95": 550}), dict(row(2, 250), partial_gap_ms={"p95": 900})
    assert holds_target(fast, 300, 600) and not holds_target(slow, 300, 600) and holds_target(slow, 300)
    assert largest_within([fast, slow], 300, 600) == 1


def test_mean_batch_size_and_svg():
    text = "chorus_batch_size_sum 12.0\nchorus_batch_size_count 4.0\n"
    assert mean_batch_size(text) == 3.0 and mean_batch_size("") is None
    rows = [{"sessions": n, "final_latency_ms": {"p95": 100.0 * n}} for n in (1, 2, 4)]
    svg = svg_plot({"on": rows, "off": rows[:2]}, 300)
    assert svg.startswith("<svg") and svg.count("<polyline") == 2 and "target 300 ms" in svg


# timing: real-time sessions, and the server's CPU time is compared with its stages' wall time,
# which only means something while no other test shares the cores.
@pytest.mark.timing
def test_short_real_load_run(whisper_runner):
    cfg = make_config(**{"batcher.partial_interval_ms": 1000})
    with ServerThread(cfg, whisper_runner) as srv:
        before = _scrape(srv.url)
        summary = asyncio.run(run_load(srv.url, sessions=2, duration=6.0, clips=[str(c) for c in CLIPS], latency_target_ms=5000))
        after = _scrape(srv.url)
    assert summary["sessions"] == 2 and summary["errors"] == 0 and summary["lost_finals"] == 0
    assert summary["finals"] >= 2
    assert summary["final_latency_ms"]["p50"] is not None and summary["final_latency_ms"]["p50"] > 0
    assert summary["wer"] is not None and summary["wer"] <= 0.1
    # Where the time went, from the server's own /metrics around the run.
    t = time_breakdown(before, after)
    assert 11.0 <= t["audio_s"] <= 20.0, t  # 2 sessions x at least 6 s
    ms = t["ms_per_audio_s"]
    assert {"decode", "vad", "send", "features", "encoder", "decoder", "postprocess", "loop_cpu", "process_cpu"} <= set(ms), ms
    # The loop thread's CPU covers its named stages (and websockets, JSON, ... besides).
    assert ms["loop_cpu"] > ms["decode"] + ms["vad"], ms
    # Whisper on this CPU costs hundreds of ms per audio second; the event-loop stages a few.
    assert ms["encoder"] + ms["decoder"] > 10 * (ms["decode"] + ms["vad"]), ms
    assert ms["process_cpu"] > ms["encoder"], ms
    assert t["loop_lag_p99_ms"] is not None
    summary["time"] = t
    report = markdown({"as configured": [summary]}, 5000, "loadgen test", 6.0, partial_gap_ms=None)
    table = report.split("Where the server's time went")[1]
    assert "| encoder |" in table and "| process_cpu |" in table
