"""Admission's capacity arithmetic, on its own: how a final call's cost grows with its batch
size, the projection of batched finals it leads to, and the refusals; then admission as shipped
(configs/default.yaml's triggers, ``shipped_admission=True``) over real sockets: a newcomer
refused with 503 + Retry-After when the projection says so, ``/healthz`` saying ``accepting:
false``, the admitted sessions keeping their finals. (Admission's other triggers over real
sockets: tests/test_reliability.py.)"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np

from server.admission import Admission, fit_call_cost, project
from server.batcher import FinalCosts, Kind, MicroBatcher
from server.config import BatcherConfig, Config, ServerConfig
from server.metrics import Metrics
from server.runners.base import ItemOptions
from server.session import Session
from server.stream_config import StreamConfig
from websockets.asyncio.client import connect

from client_demo.pacing import send_paced
from tests.faultrunner import BatchCostRunner
from tests.serverharness import DATA, ServerThread, StreamLog, handshake, make_config, pcm16, read_clip
from tests.test_batcher import RecordingRunner
from tests.test_reliability import collect, http_get, lost_finals
from tests.waiting import async_wait_until


class StubBatcher:
    def __init__(self, costs: FinalCosts | None, wait: float = 0.0) -> None:
        self.costs, self.wait = costs, wait

    def final_costs(self) -> FinalCosts | None:
        return self.costs

    def final_wait_s(self) -> float:
        return self.wait


def costs(calls, stream_per_final_s: float = 5.0, partial_call_s: float = 0.0) -> FinalCosts:
    return FinalCosts(calls=tuple(calls), stream_per_final_s=stream_per_final_s, partial_call_s=partial_call_s)


def admission(measured: FinalCosts | None, wait: float = 0.0, **cfg) -> Admission:
    return Admission(ServerConfig(**cfg), StubBatcher(measured, wait), Metrics())  # type: ignore[arg-type]


def test_call_cost_is_fitted_from_calls_of_different_sizes():
    """Calls measured at t = 0.8 + 0.1 k (with noise that cancels): the fit recovers both."""
    calls = [(1, 0.91), (1, 0.89), (2, 1.0), (4, 1.21), (4, 1.19), (8, 1.6)]
    base, per_item = fit_call_cost(calls, marginal_prior=0.5)
    assert abs(base - 0.8) < 0.01 and abs(per_item - 0.1) < 0.005, (base, per_item)


def test_call_cost_of_one_size_uses_the_prior_marginal():
    base, per_item = fit_call_cost([(1, 1.0), (1, 1.0)], marginal_prior=0.25)
    assert (base, per_item) == (0.75, 0.25)
    base, per_item = fit_call_cost([(2, 1.5)], marginal_prior=0.5)  # 1.5 = one * (0.5 + 0.5 * 2)
    assert abs(base - 0.5) < 1e-9 and abs(per_item - 0.5) < 1e-9


def test_a_slope_from_noise_stays_within_what_was_measured():
    # Bigger calls measured cheaper (noise): items are not taken to cost less than nothing.
    assert fit_call_cost([(1, 1.0), (2, 0.9)], 0.5)[1] == 0.0
    # Nor more per item than the dearest per-item cost any call showed.
    assert fit_call_cost([(1, 0.1), (2, 5.0)], 0.5)[1] == 2.5


def test_projection_batches_the_finals_that_arrive_while_one_waits():
    """call(k) = 0.8 + 0.1 k, a final every 5 s per session, 4 sessions: a final finds a call of
    one in flight (0.9 s), the other three sessions' finals arriving meanwhile (0.6/s x 0.9 s)
    join its call, which then takes 0.8 + 0.1 x 1.54 s."""
    p = project(costs([(1, 0.9), (2, 1.0)]), sessions=4, marginal_prior=0.5)
    k = 1 + 0.6 * 0.9
    assert abs(p.batch - k) < 1e-9 and abs(p.call_s - (0.8 + 0.1 * k)) < 1e-9
    assert abs(p.latency_s - (0.9 + 0.8 + 0.1 * k)) < 1e-9
    assert abs(p.load - 0.8 * (0.8 + 0.1 * k) / k) < 1e-9
    # A partial call in flight that is longer than a final's call is what a final waits for.
    q = project(costs([(1, 0.9), (2, 1.0)], partial_call_s=1.5), sessions=4, marginal_prior=0.5)
    assert abs(q.batch - (1 + 0.6 * 1.5)) < 1e-9 and abs(q.latency_s - (1.5 + q.call_s)) < 1e-9
    # One session alone: nobody else's finals to batch with.
    assert project(costs([(1, 0.9), (2, 1.0)]), sessions=1, marginal_prior=0.5).batch == 1.0


def test_a_projection_no_batch_keeps_up_with_is_refused():
    # Each item costs 0.5 s and 10 sessions send 2 finals a second: 1 s of work per second.
    p = project(costs([(1, 0.5), (2, 1.0)], stream_per_final_s=5.0), sessions=10, marginal_prior=0.5)
    assert not p.keeps_up and p.latency_s == float("inf")
    a = admission(costs([(1, 0.5), (2, 1.0)]), admission_target_final_s=100, admission_max_model_load=1.0,
                  admission_max_final_wait_s=0)
    for i in range(9):
        assert a.admit(i, "a") is None
    refusal = a.admit(9, "a")
    assert refusal is not None and refusal.reason == "capacity" and "busy" in refusal.message


def test_admits_while_the_projection_meets_the_target_and_the_load_limit_and_refuses_the_next():
    """Batched, the model takes many more sessions than one call per session would allow: with
    call(k) = 0.8 + 0.1 k and a final per 5 s, charging each session a call of its own (0.9 s
    per 5 s = 18% each) would stop at 2 sessions under a 40% limit."""
    measured = costs([(1, 0.9), (2, 1.0), (3, 1.1)])
    for target, limit in ((2.5, 0.9), (1.85, 0.9), (2.5, 0.5)):
        a = admission(measured, admission_target_final_s=target, admission_max_model_load=limit,
                      admission_max_final_wait_s=0)
        admitted = 0
        while a.admit(admitted, "a") is None:
            admitted += 1
            assert admitted < 100
        # The first refused newcomer is the first whose projection misses the target or the limit.
        first_miss = next(n for n in range(1, 100)
                          if project(measured, n, 0.5).latency_s > target or project(measured, n, 0.5).load > limit)
        assert admitted == first_miss - 1 and admitted >= 3, (target, limit, admitted)
        refusal = a.admit("late", "a")
        assert refusal is not None and refusal.status == 503 and refusal.retry_after_s
        a.release(0)
        assert a.admit("late", "a") is None  # a slot given back is a slot for the next one


def test_nothing_measured_admits_a_safe_start_and_off_means_off():
    a = admission(None, admission_unmeasured_sessions=2, admission_max_final_wait_s=0)
    assert a.admit(1, "a") is None and a.admit(2, "a") is None  # a second user is not refused
    refusal = a.admit(3, "a")
    assert refusal is not None and refusal.reason == "capacity" and "not measured" in refusal.message
    assert refusal.retry_after_s
    a = admission(None, admission_unmeasured_sessions=0, admission_max_final_wait_s=0)
    for i in range(5):
        assert a.admit(i, "a") is None
    off = dict(admission_target_final_s=0, admission_max_model_load=0, admission_max_final_wait_s=0)
    a = admission(costs([(1, 30.0)]), **off)
    for i in range(5):
        assert a.admit(i, "a") is None


def test_extra_tracks_are_charged_as_sessions():
    """A stereo stream or a two-track call runs two sessions on one connection: the fixed limit
    and the projection count both."""
    a = admission(None, max_sessions=3, admission_unmeasured_sessions=0, admission_max_final_wait_s=0)
    assert a.admit("stereo", "a") is None
    assert a.charge("stereo", 2) is None
    assert a.charged == 2
    assert a.admit("mono", "a") is None
    refusal = a.admit("third", "a")
    assert refusal is not None and refusal.reason == "full"
    assert a.charge("mono", 2) is not None  # no room for another track: refused, keeps its first
    assert a.charged == 3
    a.release("stereo")
    assert a.charged == 1 and a.admit("third", "a") is None


def test_sessions_without_finals_yet_are_charged_from_their_first_second():
    """The server has been up a while; one session's finals (~0.27 s of model each, one final
    per second of stream) are measured. Sessions that have just arrived have sent no final of
    their own, yet they count fully: each is projected to send a final a second like the talker,
    and batching saves nothing here (marginal 1: k finals cost k times one)."""
    runner = RecordingRunner(delay=0.25)
    b = MicroBatcher(runner, BatcherConfig(batch_wait_ms=1.0, max_batch_size=1), Metrics())
    a = Admission(ServerConfig(admission_target_final_s=2.0, admission_max_model_load=0.7, admission_max_final_wait_s=0,
                               admission_batch_marginal=1.0), b, Metrics())

    async def main():
        b.start(asyncio.get_running_loop())
        b._started_at -= 20  # serving for a while: no window is cut short
        try:
            assert a.admit("talker", "10.0.0.1") is None
            for _ in range(2):  # each final accounts for 1 s of the talker's stream
                await b.submit(np.zeros(16000, np.float32), ItemOptions(), Kind.FINAL, "talker", stream_s=1.0)
            await b.submit(np.zeros(16000, np.float32), ItemOptions(), Kind.PARTIAL, "talker")
            measured = b.final_costs()
            second = a.admit("new-1", "10.0.0.2")
            third = a.admit("new-2", "10.0.0.3")
            return measured, second, third
        finally:
            b.stop()

    measured, second, third = asyncio.run(main())
    assert measured is not None and [k for k, _ in measured.calls] == [1, 1]
    assert all(0.25 <= t < 0.32 for _, t in measured.calls), measured
    assert measured.stream_per_final_s == 1.0 and 0.25 <= measured.partial_call_s < 0.32
    # Two sessions: 2 finals/s of ~0.27 s each, batched with what arrives while one waits
    # (1.27 items a call): ~54% of the model, within 70%.
    assert second is None
    # Three: 3 finals/s, ~1.54 items a call: ~81% of the model, over 70%.
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
    a = admission(costs([(1, 0.1)]), wait=3.0, admission_target_final_s=2.5, admission_max_final_wait_s=1.0)
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


# ---------------------------------------------------------------- over real sockets, as shipped

CLIP = read_clip(DATA / "sense_and_sensibility_01_austen_64kb-0890.wav")


def _utterances(n: int) -> np.ndarray:
    quiet = np.zeros(16000, np.float32)
    return np.concatenate([quiet] + [x for _ in range(n) for x in (CLIP, quiet)])


async def _talk(ws, out: StreamLog, utterances: int) -> None:
    """Stream `utterances` utterances at 4x real time, leaving the session open."""
    await send_paced(ws, _utterances(utterances), 16000, 100, 4.0, encode=pcm16)


def test_shipped_admission_lets_in_the_sessions_measured_batches_fit():
    """Default config, a model whose call of k finals costs 0.8 + 0.1 k s. Before any final the
    safe start admits two sessions and refuses a third; once their finals are measured, the
    batched projection (~2 s, within the 2.5 s target) lets the third in, though charging each
    session a call of its own (0.9 s per ~4 s of stream each: ~70% for three) refuses it."""
    runner = BatchCostRunner(base_s=0.8, per_item_s=0.1)
    with ServerThread(make_config(shipped_admission=True), runner) as srv:
        async def main():
            logs = [StreamLog(), StreamLog()]
            seen: dict = {}
            async with connect(srv.url + "?language=en") as a, connect(srv.url + "?language=en") as b:
                readers = [asyncio.create_task(collect(ws, out)) for ws, out in zip((a, b), logs)]
                seen["unmeasured"] = await handshake(srv.url)
                await asyncio.gather(_talk(a, logs[0], 3), _talk(b, logs[1], 2))
                await async_wait_until(lambda: sum(len(out.of("final")) for out in logs) >= 5, 60, what="five finals")
                seen["costs"] = srv.app.batcher.final_costs()
                seen["health"] = await asyncio.to_thread(http_get, srv.app.port, "/healthz")
                async with connect(srv.url + "?language=en") as c:
                    seen["third"] = srv.app.admission.sessions
                    await c.send(json.dumps({"type": "stop"}))
                for ws in (a, b):
                    await ws.send(json.dumps({"type": "stop"}))
                await asyncio.wait_for(asyncio.gather(*readers), 60)
            return logs, seen

        logs, seen = asyncio.run(main())
    unmeasured = seen["unmeasured"]
    assert unmeasured.status == 503 and unmeasured.body["reason"] == "capacity" and "not measured" in unmeasured.body["message"], unmeasured
    assert int(unmeasured.headers["Retry-After"]) >= 1
    costs_seen = seen["costs"]
    assert costs_seen is not None and costs_seen.calls
    assert seen["health"][0] == 200 and seen["health"][2]["accepting"] is True, seen["health"]
    assert seen["third"] == 3
    for out in logs:
        assert out.of("final") and lost_finals(out) == [] and all(f["text"] == "hello there" for f in out.of("final"))


def test_shipped_admission_refuses_when_measured_batches_do_not_fit():
    """Default config, a model whose calls take 2 s and more: one session's finals show it. A
    newcomer would make finals wait for a 2.2 s call and then run one (> 2.5 s): 503 with
    Retry-After, /healthz `accepting: false`, and the admitted session keeps every final."""
    runner = BatchCostRunner(base_s=2.0, per_item_s=0.2)
    with ServerThread(make_config(shipped_admission=True), runner) as srv:
        async def main():
            out = StreamLog()
            seen: dict = {}
            async with connect(srv.url + "?language=en") as ws:
                reader = asyncio.create_task(collect(ws, out))
                await _talk(ws, out, 2)
                await async_wait_until(lambda: len(out.of("final")) >= 1, 60, what="a final")
                seen["health"] = await asyncio.to_thread(http_get, srv.app.port, "/healthz")
                seen["refused"] = await handshake(srv.url)
                await ws.send(json.dumps({"type": "stop"}))
                await asyncio.wait_for(reader, 60)
            return out, seen

        out, seen = asyncio.run(main())
    status, _, body = seen["health"]
    assert status == 503 and body["accepting"] is False, body
    refused = seen["refused"]
    assert refused.status == 503 and refused.body["reason"] == "capacity" and "projected" in refused.body["message"], refused
    assert int(refused.headers["Retry-After"]) >= 1
    # The admitted session keeps its finals, each with its text, and ends normally.
    assert len(out.of("final")) == 2 and lost_finals(out) == []
    assert all(f["text"] == "hello there" and "error" not in f for f in out.of("final")), out.of("final")
    assert out.messages[-1]["type"] == "done" and out.close_code == 1000, out.messages[-2:]


def test_a_stereo_stream_takes_two_sessions_over_a_real_socket():
    """max_sessions 2: a stereo stream (two sessions for the model) fills the server, so a mono
    newcomer is refused with 503 `full`; a second stereo stream on a server with one slot left
    is refused at its start (its channels do not fit), and once the first closes both fit."""
    runner = BatchCostRunner(base_s=0.01, per_item_s=0.0)
    with ServerThread(make_config(**{"server.max_sessions": 2}), runner) as srv:
        async def main():
            seen: dict = {}
            async with connect(srv.url + "?channels=2&language=en") as stereo:
                assert json.loads(await stereo.recv())["type"] == "ready"
                seen["charged"] = srv.app.admission.charged
                seen["mono"] = await handshake(srv.url)
            await async_wait_until(lambda: srv.app.admission.charged == 0, 10, what="the stereo slot back")
            async with connect(srv.url + "?language=en") as mono:
                assert json.loads(await mono.recv())["type"] == "ready"
                async with connect(srv.url + "?channels=2&language=en") as stereo2:
                    seen["stereo2"] = [json.loads(m) for m in [await stereo2.recv()]]
                    await asyncio.sleep(0)
                    seen["stereo2_close"] = await asyncio.wait_for(stereo2.wait_closed(), 10) or stereo2.close_code
            await async_wait_until(lambda: srv.app.admission.charged == 0, 10, what="every slot back")
            async with connect(srv.url + "?channels=2&language=en") as stereo3:
                seen["stereo3"] = json.loads(await stereo3.recv())["type"]
            return seen

        seen = asyncio.run(main())
    assert seen["charged"] == 2
    mono = seen["mono"]
    assert mono.status == 503 and mono.body["reason"] == "full" and int(mono.headers["Retry-After"]) >= 1, mono
    error = seen["stereo2"][0]
    assert error["type"] == "error" and error["code"] == "capacity" and "2 channels" in error["message"], error
    assert seen["stereo2_close"] == 1008
    assert seen["stereo3"] == "ready"
