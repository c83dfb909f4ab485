"""Admission's capacity arithmetic, on its own: projected load from what the model spends on
finals per second of live stream, and the refusals it leads to. (Over real sockets:
tests/test_reliability.py.)"""

from __future__ import annotations

import asyncio
import time

import numpy as np

from server.admission import Admission
from server.batcher import Kind, MicroBatcher
from server.config import BatcherConfig, Config, ServerConfig
from server.metrics import Metrics
from server.runners.base import ItemOptions
from server.session import Session
from server.stream_config import StreamConfig
from tests.serverharness import DATA, read_clip
from tests.test_batcher import RecordingRunner


class StubBatcher:
    def __init__(self, cost: float | None, wait: float = 0.0) -> None:
        self.cost, self.wait = cost, wait

    def final_cost(self) -> float | None:
        return self.cost

    def final_wait_s(self) -> float:
        return self.wait


def admission(cost: float | None, **cfg) -> Admission:
    return Admission(ServerConfig(**cfg), StubBatcher(cost), Metrics())  # type: ignore[arg-type]


def test_projected_load_is_the_cost_per_second_of_stream_times_one_more_session():
    a = admission(0.2, admission_max_model_load=0.7, admission_max_final_wait_s=0)
    assert abs(a.projected_load() - 0.2) < 1e-9  # the first session alone
    for i in range(3):  # 20%, 40%, 60% of the model on finals
        assert a.admit(f"c{i}", f"10.0.0.{i}") is None
    assert abs(a.projected_load() - 0.8) < 1e-9
    refusal = a.admit("c4", "10.0.0.4")  # 80% > 70%
    assert refusal is not None and refusal.status == 503 and refusal.reason == "capacity"
    assert refusal.retry_after_s and a.sessions == 3
    a.release("c0")
    assert a.admit("c4", "10.0.0.4") is None  # a slot given back is a slot for the next one


def test_no_cost_measured_yet_admits_and_off_means_off():
    a = admission(None, admission_max_model_load=0.7, admission_max_final_wait_s=0)
    for i in range(5):
        assert a.admit(i, "a") is None
    a = admission(0.99, admission_max_model_load=0.0, admission_max_final_wait_s=0)
    for i in range(5):
        assert a.admit(i, "a") is None


def test_sessions_without_finals_yet_are_charged_from_their_first_second():
    """The server has been up a while; one session's finals show that a second of stream costs
    the model ~0.25 s. Sessions that have just arrived have sent no final of their own, yet they
    count fully: with two open, a third would make ~75% > 70% and is refused. (Projecting from
    the busy share of the last 20 s, as before, saw 0.5 s of work in 20 s and let it in: the
    sessions' cost showed only after their first utterances, when several too many were in.)"""
    runner = RecordingRunner(delay=0.25)
    b = MicroBatcher(runner, BatcherConfig(batch_wait_ms=1.0, max_batch_size=1), Metrics())
    a = Admission(ServerConfig(admission_max_model_load=0.7, admission_max_final_wait_s=0), b, Metrics())

    async def main():
        b.start(asyncio.get_running_loop())
        b._started_at -= 20  # serving for a while: no window is cut short
        try:
            assert a.admit("talker", "10.0.0.1") is None
            for _ in range(2):  # each final accounts for 1 s of the talker's stream
                await b.submit(np.zeros(16000, np.float32), ItemOptions(), Kind.FINAL, "talker", stream_s=1.0)
            await b.submit(np.zeros(16000, np.float32), ItemOptions(), Kind.PARTIAL, "talker")
            cost = b.final_cost()
            second = a.admit("new-1", "10.0.0.2")
            third = a.admit("new-2", "10.0.0.3")
            return cost, second, third
        finally:
            b.stop()

    cost, second, third = asyncio.run(main())
    assert cost is not None and 0.25 <= cost < 0.32, cost  # partials cost nothing here
    assert second is None
    assert third is not None and third.reason == "capacity", third
    assert a.sessions == 2


class _Output:
    def __init__(self) -> None:
        self.cuts: list[int] = []

    def on_speech_started(self, *args) -> None: ...
    def on_partial(self, *args) -> None: ...
    def on_error(self, *args) -> None: ...

    def on_final(self, segment_id, text, start_ms, end_ms, cut_ms, fields, words) -> None:
        self.cuts.append(cut_ms)


class _StreamTimes(MicroBatcher):
    """The real batcher, also keeping the stream time each final was submitted with."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.stream_s: list[float] = []

    def submit(self, audio, options, kind, session, stream_s: float = 0.0):
        if kind is Kind.FINAL:
            self.stream_s.append(stream_s)
        return super().submit(audio, options, kind, session, stream_s=stream_s)


def test_each_final_accounts_for_the_stream_since_its_sessions_previous_final():
    """Silence included, each stretch once: the finals' stream times add up to the stream."""
    clip = read_clip(DATA / "sense_and_sensibility_01_austen_64kb-0880.wav")
    quiet = np.zeros(16000, np.float32)
    audio = np.concatenate([quiet * 2, clip, quiet, clip, quiet, clip[: len(clip) // 2]])
    b = _StreamTimes(RecordingRunner(), BatcherConfig(batch_wait_ms=1.0), Metrics())
    out = _Output()

    async def main():
        b.start(asyncio.get_running_loop())
        try:
            s = Session(Config(), StreamConfig(interim_results=False), b, out, Metrics())  # type: ignore[arg-type]
            pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
            for i in range(0, len(pcm), 3200):
                s.feed_audio(pcm[i:i + 3200])
            await s.stop()  # the last segment is cut at the end of the stream
        finally:
            b.stop()

    asyncio.run(main())
    assert len(out.cuts) == 3, out.cuts
    expected = [(cut - before) / 1000 for before, cut in zip([0] + out.cuts, out.cuts)]
    assert b.stream_s == expected, (b.stream_s, out.cuts)
    assert out.cuts[-1] == len(audio) * 1000 // 16000  # the stop's cut is the stream's end
    assert abs(sum(b.stream_s) - len(audio) / 16000) < 0.001


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
