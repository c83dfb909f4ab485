"""Admission's capacity arithmetic, on its own: projected load from the model's busy time on
finals, and the refusals it leads to. (Over real sockets: tests/test_reliability.py.)"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from server.admission import Admission
from server.batcher import Kind, MicroBatcher
from server.config import BatcherConfig, ServerConfig
from server.metrics import Metrics
from server.runners.base import ItemOptions
from tests.test_batcher import RecordingRunner


class StubBatcher:
    def __init__(self, load: float, wait: float = 0.0) -> None:
        self.load, self.wait = load, wait

    def final_load(self) -> float:
        return self.load

    def final_wait_s(self) -> float:
        return self.wait


def admission(load: float, **cfg) -> Admission:
    return Admission(ServerConfig(**cfg), StubBatcher(load), Metrics())  # type: ignore[arg-type]


def test_projected_load_scales_the_per_settled_session_share_to_one_more_session():
    a = admission(0.3, admission_max_model_load=0.7, admission_max_final_wait_s=0)
    assert a.admit("c1", "10.0.0.1") is None
    now = time.monotonic()
    a.tick(now)  # c1 is new: the load so far is taken as one session's
    assert abs(a.projected_load() - 0.6) < 1e-9
    a._counts.clear()
    a.tick(now + 11)  # c1 has settled: one session uses 30% of the model on its finals
    assert abs(a.projected_load() - 0.6) < 1e-9  # two would use 60%
    assert a.admit("c2", "10.0.0.2") is None
    a._counts.clear()
    a.tick(now + 22)  # both settled, together 45%: three would use 67.5%
    a.batcher.load = 0.45  # type: ignore[attr-defined]
    assert abs(a.projected_load() - 0.45 / 2 * 3) < 1e-9
    assert a.admit("c3", "10.0.0.3") is None
    a.batcher.load = 0.5  # type: ignore[attr-defined]
    refusal = a.admit("c4", "10.0.0.4")  # 0.5 / 2 * 4 = 100% > 70%
    assert refusal is not None and refusal.status == 503 and refusal.reason == "capacity"
    assert refusal.retry_after_s and a.sessions == 3


def test_no_load_measured_yet_admits_and_off_means_off():
    assert admission(0.0, admission_max_model_load=0.7).admit("c", "a") is None
    a = admission(0.99, admission_max_model_load=0.0, admission_max_final_wait_s=0)
    for i in range(5):
        assert a.admit(i, "a") is None
        a.tick()


def test_backlog_refuses_even_when_the_projection_would_admit():
    a = Admission(ServerConfig(admission_max_model_load=0.7, admission_max_final_wait_s=1.0),
                  StubBatcher(0.1, wait=3.0), Metrics())  # type: ignore[arg-type]
    refusal = a.admit("c", "a")
    assert refusal is not None and refusal.reason == "capacity" and "wait" in refusal.message


def test_final_load_is_the_busy_share_on_finals_only():
    """A runner taking 0.2 s per call: finals every 0.4 s make ~50% load; partials count nothing."""
    runner = RecordingRunner(delay=0.2)
    b = MicroBatcher(runner, BatcherConfig(batch_wait_ms=1.0, max_batch_size=1), Metrics())

    async def main() -> tuple[float, float]:
        b.start(asyncio.get_running_loop())
        b._started_at -= 10  # as if serving for a while: the window is not cut short
        try:
            for _ in range(6):
                await b.submit(np.zeros(16000, np.float32), ItemOptions(), Kind.PARTIAL, "p")
            partial_only = b.final_load()
            t0 = time.monotonic()
            for _ in range(8):
                await b.submit(np.zeros(16000, np.float32), ItemOptions(), Kind.FINAL, "f")
                await asyncio.sleep(0.2)
            finals_for = time.monotonic() - t0
            return partial_only, b.final_load() * min(20.0, time.monotonic() - b._started_at) / finals_for
        finally:
            b.stop()

    partial_only, busy_share = asyncio.run(main())
    assert partial_only == 0.0
    assert 0.35 < busy_share < 0.65, busy_share
