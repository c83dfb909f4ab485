"""MicroBatcher policy, with a recording runner standing in for a model.

The model is replaced here (and only here) because these tests are about which
requests go into which call; the real-model paths are covered by test_server.py.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from server.batcher import BatcherStopped, Kind, MicroBatcher
from server.config import BatcherConfig, RunnerConfig
from server.metrics import Metrics
from server.runners.base import ItemError, ItemOptions, Launched, ModelRunner, Transcript
from tests.waiting import async_wait_until


class RecordingRunner(ModelRunner):
    """Returns each item's length as its text and records every batch it is given."""

    name = "recording"

    def __init__(self, delay: float = 0.0, fail_when=None) -> None:
        super().__init__(RunnerConfig())
        self.batches: list[list[int]] = []
        self.delay = delay
        self.fail_when = fail_when
        self.gate = threading.Event()
        self.gate.set()
        self.entered = 0  # calls begun (a call held at the gate counts)

    def load(self) -> None:
        pass

    def transcribe(self, audios, options):
        self.entered += 1
        self.gate.wait(5)
        lengths = [len(a) for a in audios]
        self.batches.append(lengths)
        if self.fail_when and self.fail_when(lengths):
            raise RuntimeError("boom")
        time.sleep(self.delay)
        return [Transcript(text=str(n)) for n in lengths]


def audio(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * 16000), dtype=np.float32)


def run(coro):
    return asyncio.run(coro)


async def inside_call(r: RecordingRunner, n: int = 1) -> None:
    """Until the worker has begun its n-th call (held at the gate while the test queues more)."""
    await async_wait_until(lambda: r.entered >= n, timeout=10, what=f"the worker began call {n}")


def make(runner, **kw) -> MicroBatcher:
    cfg = BatcherConfig(**{"batch_wait_ms": 20.0, "max_batch_size": 4, "length_buckets_s": (2.0, 5.0, 30.0), **kw})
    return MicroBatcher(runner, cfg, Metrics())


def test_concurrent_requests_share_one_call():
    async def main():
        r = RecordingRunner()
        b = make(r)
        b.start(asyncio.get_running_loop())
        futs = [b.submit(audio(1.0 + i * 0.1), ItemOptions(), Kind.FINAL, f"s{i}") for i in range(4)]
        res = await asyncio.gather(*futs)
        b.stop()
        return r, res

    r, res = run(main())
    assert [t.text for t in res] == [str(int((1.0 + i * 0.1) * 16000)) for i in range(4)]
    assert r.batches == [[16000, 17600, 19200, 20800]]


def test_max_batch_size_and_buckets_respected():
    async def main():
        r = RecordingRunner()
        r.gate.clear()  # hold the worker so everything queues first
        b = make(r, batch_wait_ms=1.0)
        b.start(asyncio.get_running_loop())
        futs = [b.submit(audio(1.0), ItemOptions(), Kind.FINAL, f"a{i}") for i in range(6)]
        futs += [b.submit(audio(4.0), ItemOptions(), Kind.FINAL, f"b{i}") for i in range(2)]
        await inside_call(r)  # the first batch formed while everything was queued
        r.gate.set()
        await asyncio.gather(*futs)
        b.stop()
        return r

    r = run(main())
    assert all(len(batch) <= 4 for batch in r.batches)
    # No batch mixes the 1 s bucket with the 5 s bucket.
    for batch in r.batches:
        assert len({n <= 32000 for n in batch}) == 1
    assert sorted(n for batch in r.batches for n in batch) == sorted([16000] * 6 + [64000] * 2)


def test_finals_before_partials_and_partials_replaced():
    async def main():
        r = RecordingRunner()
        r.gate.clear()
        b = make(r, max_batch_size=8, batch_wait_ms=1.0)
        b.start(asyncio.get_running_loop())
        blocker = b.submit(audio(0.5), ItemOptions(), Kind.FINAL, "z")  # occupies the worker
        await inside_call(r)
        p_old = b.submit(audio(1.0), ItemOptions(), Kind.PARTIAL, "s1")
        p_new = b.submit(audio(1.5), ItemOptions(), Kind.PARTIAL, "s1")
        p_other = b.submit(audio(1.2), ItemOptions(), Kind.PARTIAL, "s2")
        f = b.submit(audio(1.9), ItemOptions(), Kind.FINAL, "s3")
        r.gate.set()
        out = await asyncio.gather(blocker, p_old, p_new, p_other, f)
        b.stop()
        return r, out

    r, (blocker, old, new, other, final) = run(main())
    assert old is None  # superseded
    assert new.text == "24000" and other.text == "19200" and final.text == "30400"
    # batch 0 = the blocker; then the final alone, before the two partials.
    assert r.batches[1] == [30400]
    assert sorted(r.batches[2]) == [19200, 24000]


def test_failed_batch_fails_its_requests_and_worker_survives():
    async def main():
        r = RecordingRunner(fail_when=lambda lengths: 8000 in lengths)
        b = make(r, batch_wait_ms=1.0)
        b.start(asyncio.get_running_loop())
        bad = b.submit(audio(0.5), ItemOptions(), Kind.FINAL, "x")
        with pytest.raises(RuntimeError, match="boom"):
            await bad
        good = await b.submit(audio(1.0), ItemOptions(), Kind.FINAL, "y")
        b.stop()
        return good

    assert run(main()).text == "16000"


def test_cancelled_session_requests_never_run_and_stop_fails_waiters():
    async def main():
        r = RecordingRunner()
        r.gate.clear()
        b = make(r, batch_wait_ms=1.0)
        b.start(asyncio.get_running_loop())
        first = b.submit(audio(0.5), ItemOptions(), Kind.FINAL, "keep")
        await inside_call(r)  # the worker is held inside the first batch
        gone = [b.submit(audio(1.0), ItemOptions(), Kind.FINAL, "gone") for _ in range(3)]
        left = b.submit(audio(1.0), ItemOptions(), Kind.FINAL, "left")
        assert b.cancel_session("gone") == 3
        assert all(g.cancelled() for g in gone)
        r.gate.set()
        await first
        await left
        r.gate.clear()
        late = b.submit(audio(1.0), ItemOptions(), Kind.FINAL, "late")
        await inside_call(r, 3)  # late's call is in flight, held at the gate
        waiting = b.submit(audio(1.5), ItemOptions(), Kind.FINAL, "waiting")
        stopper = asyncio.get_running_loop().run_in_executor(None, b.stop, 0.1)
        await async_wait_until(waiting.done, what="stop failed the waiting request")
        r.gate.set()
        await stopper
        await async_wait_until(late.done, what="the call in flight at stop was answered")
        return r, late, waiting

    r, late, waiting = run(main())
    assert r.batches == [[8000], [16000], [16000]]  # first, left, late; never the cancelled ones
    assert isinstance(waiting.exception(), BatcherStopped)
    assert late.result().text == "16000"


def test_batching_off_means_one_item_per_call():
    async def main():
        r = RecordingRunner()
        b = make(r, enabled=False)
        b.start(asyncio.get_running_loop())
        await asyncio.gather(*[b.submit(audio(1.0), ItemOptions(), Kind.FINAL, f"s{i}") for i in range(5)])
        b.stop()
        return r

    assert all(len(batch) == 1 for batch in run(main()).batches)


def test_submit_after_stop_is_refused():
    async def main():
        r = RecordingRunner()
        b = make(r)
        b.start(asyncio.get_running_loop())
        b.stop()
        with pytest.raises(BatcherStopped):
            await b.submit(audio(1.0), ItemOptions(), Kind.FINAL, "s")

    run(main())


def test_out_of_memory_batch_is_split_not_dropped():
    import torch

    class OomRunner(RecordingRunner):
        def transcribe(self, audios, options):
            if len(audios) > 2:
                self.batches.append(["oom", len(audios)])
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
            return super().transcribe(audios, options)

    async def main():
        r = OomRunner()
        r.gate.clear()
        b = make(r, max_batch_size=8, batch_wait_ms=1.0)
        b.start(asyncio.get_running_loop())
        futs = [b.submit(np.zeros(16000 + i, np.float32), ItemOptions(), Kind.FINAL, f"s{i}") for i in range(5)]
        r.gate.set()
        res = await asyncio.gather(*futs)
        b.stop()
        return r, res

    r, res = run(main())
    assert [t.text for t in res] == [str(16000 + i) for i in range(5)]  # all answered, in order
    assert ["oom", 5] in r.batches and all(len(bt) <= 2 for bt in r.batches if bt[0] != "oom")


def test_final_supersedes_the_sessions_waiting_partial():
    async def main():
        r = RecordingRunner()
        r.gate.clear()
        b = make(r, batch_wait_ms=1.0)
        b.start(asyncio.get_running_loop())
        blocker = b.submit(audio(0.5), ItemOptions(), Kind.FINAL, "z")
        await inside_call(r)
        partial = b.submit(audio(1.0), ItemOptions(), Kind.PARTIAL, "s1")
        final = b.submit(audio(1.5), ItemOptions(), Kind.FINAL, "s1")
        r.gate.set()
        out = await asyncio.gather(blocker, partial, final)
        b.stop()
        return r, out

    r, (_, partial, final) = run(main())
    assert partial is None and final.text == "24000"
    assert [16000] not in r.batches  # the stale partial never ran


class DeviceRunner(ModelRunner):
    """Stands in for a CUDA runner: `launch` queues the batch on a one-thread 'device' (stream
    order) and returns at once; `result()` waits for it. Records launches and collections."""

    name = "device"

    def __init__(self, asynchronous: bool, device_s: float = 0.05, fail_at_result=None) -> None:
        super().__init__(RunnerConfig())
        self.asynchronous = asynchronous
        self.device_s = device_s
        self.fail_at_result = fail_at_result
        self.stream = ThreadPoolExecutor(1)
        self.log: list[tuple[str, int]] = []
        self.gate = threading.Event()

    def load(self) -> None:
        pass

    def transcribe(self, audios, options):
        return self.launch(audios, options).result()

    def launch(self, audios, options):
        self.gate.wait(5)
        lengths = [len(a) for a in audios]
        self.log.append(("launch", lengths[0]))
        work = self.stream.submit(lambda: (time.sleep(self.device_s), lengths)[1])

        def finish():
            got = work.result()
            self.log.append(("collect", got[0]))
            if self.fail_at_result and self.fail_at_result(got):
                raise RuntimeError("device fault")
            return [Transcript(text=str(n)) for n in got]

        return Launched(finish)


def _pipeline(runner: DeviceRunner, n: int, max_batch_size: int = 1):
    """(the batcher, the results of n finals queued at once)."""
    async def main():
        b = make(runner, max_batch_size=max_batch_size, batch_wait_ms=1.0)
        b.start(asyncio.get_running_loop())
        futs = [b.submit(np.zeros(16000 + i, np.float32), ItemOptions(), Kind.FINAL, f"s{i}") for i in range(n)]
        runner.gate.set()  # everything is queued before the first launch returns
        res = await asyncio.gather(*futs, return_exceptions=True)
        b.stop()
        return b, res

    return run(main())


def test_asynchronous_runner_overlaps_next_launch_with_running_batch():
    """With an asynchronous runner the batcher launches batch N+1 before it collects batch N,
    and still delivers results in order."""
    r = DeviceRunner(asynchronous=True)
    _, res = _pipeline(r, 4)
    assert [t.text for t in res] == [str(16000 + i) for i in range(4)]
    assert r.log == [("launch", 16000), ("launch", 16001), ("collect", 16000), ("launch", 16002),
                     ("collect", 16001), ("launch", 16003), ("collect", 16002), ("collect", 16003)]


def test_synchronous_runner_collects_each_batch_before_the_next():
    """On CPU launching the next batch would run it, delaying this one's results: no overlap."""
    r = DeviceRunner(asynchronous=False)
    _, res = _pipeline(r, 3)
    assert [t.text for t in res] == [str(16000 + i) for i in range(3)]
    assert r.log == [("launch", 16000), ("collect", 16000), ("launch", 16001), ("collect", 16001),
                     ("launch", 16002), ("collect", 16002)]


def test_failure_while_collecting_fails_only_that_batch():
    r = DeviceRunner(asynchronous=True, fail_at_result=lambda lengths: 16001 in lengths)
    _, res = _pipeline(r, 3)
    assert res[0].text == "16000" and res[2].text == "16002"
    assert isinstance(res[1], RuntimeError) and "device fault" in str(res[1])


def test_out_of_memory_while_collecting_is_split_not_dropped():
    import torch

    def oom(lengths):
        if len(lengths) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated, at the sync)")
        return False

    r = DeviceRunner(asynchronous=True, device_s=0.0, fail_at_result=oom)
    b, res = _pipeline(r, 4, max_batch_size=4)
    assert [t.text for t in res] == [str(16000 + i) for i in range(4)]
    assert b.metrics.registry.get_sample_value("chorus_batch_splits_total") >= 1


def test_an_item_error_fails_only_its_request():
    """A runner answers a bad item with an ItemError in its place: that request alone fails,
    with the runner's code; the items batched with it get their results."""

    class OneBadItem(RecordingRunner):
        def transcribe(self, audios, options):
            out = super().transcribe(audios, options)
            return [ItemError("bad_config", "unknown language 'xx'") if o.language == "xx" else t
                    for t, o in zip(out, options)]

    async def main():
        r = OneBadItem()
        b = make(r)
        b.start(asyncio.get_running_loop())
        langs = ["en", "xx", "en"]
        futs = [b.submit(audio(1.0 + i * 0.1), ItemOptions(lang), Kind.FINAL, f"s{i}") for i, lang in enumerate(langs)]
        res = await asyncio.gather(*futs, return_exceptions=True)
        b.stop()
        return r, b, res

    r, b, res = run(main())
    assert len(r.batches) == 1 and len(r.batches[0]) == 3  # one batch, all three in it
    assert res[0].text == "16000" and res[2].text == "19200"
    assert isinstance(res[1], ItemError) and res[1].code == "bad_config"
    assert b.metrics.registry.get_sample_value("chorus_item_errors_total", {"code": "bad_config"}) == 1


class FaultingDeviceRunner(DeviceRunner):
    """A CUDA fault in batch N's kernels is reported by the next call into the device, once
    (as CUDA reports an asynchronous error): here the launch of batch N+1. Batch N's own sync
    then returns normally, with whatever its faulted kernels left."""

    def __init__(self, faulty_length: int) -> None:
        super().__init__(asynchronous=True)
        self.faulty_length = faulty_length
        self.pending_fault = False

    def launch(self, audios, options):
        if self.pending_fault:
            self.pending_fault = False
            self.gate.wait(5)
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        launched = super().launch(audios, options)
        self.pending_fault = any(len(a) == self.faulty_length for a in audios)
        return launched


def test_device_fault_is_reported_against_the_batch_in_flight():
    """Batch 16001 faults on the device; the fault surfaces while batch 16002 is launched.
    16001's request gets the error, 16002 is launched again on its own and gets its text."""
    r = FaultingDeviceRunner(faulty_length=16001)
    _, res = _pipeline(r, 3)
    assert res[0].text == "16000" and res[2].text == "16002", res
    assert isinstance(res[1], RuntimeError) and "illegal memory access" in str(res[1])


def test_under_overload_partials_thin_out_but_do_not_stop():
    """Finals always waiting (overload): strict finals-first would never run a partial again.
    An overdue partial gets a batch, but partial calls stay within `partial_max_share` of the
    model's time, so finals keep the rest."""
    runner = RecordingRunner(delay=0.05)
    b = make(runner, max_batch_size=1, partial_max_wait_ms=100, partial_max_share=0.25, batch_wait_ms=1.0)
    ran: list[str] = []

    async def main() -> None:
        b.start(asyncio.get_running_loop())
        b._started_at -= 10  # the share window is not cut short by a fresh start
        try:
            finals = [b.submit(audio(1.0), ItemOptions(), Kind.FINAL, f"f{i}") for i in range(60)]
            for f in finals:
                f.add_done_callback(lambda _f: ran.append("F"))
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline and not all(f.done() for f in finals):
                for s in ("a", "b", "c"):  # each session keeps one partial pending
                    p = b.submit(audio(1.5), ItemOptions(), Kind.PARTIAL, s)
                    p.add_done_callback(lambda f: f.exception() is None and f.result() is not None and ran.append("P"))
                await asyncio.sleep(0.02)
            await asyncio.gather(*finals)
        finally:
            b.stop()

    run(main())
    during = ran[: len(ran) - ran[::-1].index("F")]  # up to the last final: finals were waiting
    partials = during.count("P")
    assert partials >= 2, f"partials stopped under overload: {''.join(during)}"
    assert partials <= 0.4 * len(during), f"partials took more than their share: {''.join(during)}"


# ---------------------------------------------------------------------- file segments (lowest priority)
def test_live_finals_then_partials_then_file_segments():
    async def main():
        r = RecordingRunner()
        r.gate.clear()
        b = make(r, max_batch_size=8, batch_wait_ms=1.0)
        b.start(asyncio.get_running_loop())
        blocker = b.submit(audio(0.5), ItemOptions(), Kind.FINAL, "z")  # occupies the worker
        await inside_call(r)
        files = [b.submit(audio(1.0 + i * 0.1), ItemOptions(), Kind.FILE, "job") for i in range(3)]
        partial = b.submit(audio(1.5), ItemOptions(), Kind.PARTIAL, "s1")
        final = b.submit(audio(1.9), ItemOptions(), Kind.FINAL, "s2")
        r.gate.set()
        out = await asyncio.gather(blocker, *files, partial, final)
        b.stop()
        return r, out

    r, out = run(main())
    assert [t.text for t in out[1:4]] == ["16000", "17600", "19200"]  # each future gets its own item's result
    assert r.batches[1:] == [[30400], [24000], [19200, 17600, 16000]]  # final, partial, then files (longest first)


def test_file_segments_batch_by_length_and_a_full_bucket_goes_first():
    async def main():
        r = RecordingRunner()
        r.gate.clear()
        b = make(r, max_batch_size=4, batch_wait_ms=1.0)
        b.start(asyncio.get_running_loop())
        blocker = b.submit(audio(0.5), ItemOptions(), Kind.FILE, "z")  # no live session: full-size file batches
        await inside_call(r)
        lengths = [20.0, 1.0, 4.0, 1.5, 25.0, 1.2, 3.0, 1.8]  # buckets: <=2 s x4, <=5 s x2, <=30 s x2
        futs = [b.submit(audio(s), ItemOptions(), Kind.FILE, f"job{i % 2}") for i, s in enumerate(lengths)]
        r.gate.set()
        await asyncio.gather(blocker, *futs)
        b.stop()
        return r

    r = run(main())
    seconds = [[n / 16000 for n in bt] for bt in r.batches[1:]]
    # The <=2 s bucket holds a full batch: it goes before the older 20 s segment's bucket. Then
    # the oldest waiting segment's bucket (20 s, 25 s), then the rest; longest first in each.
    assert seconds == [[1.8, 1.5, 1.2, 1.0], [25.0, 20.0], [4.0, 3.0]], seconds


@pytest.mark.timing  # the batch sizes follow wall-clock cost measured within 25%: no other test may slow it
def test_file_batches_fit_the_live_call_budget_by_measured_cost():
    """0.1 s per call here. With a live session active, a file batch holds as many segments as
    0.1 s per item fits in `file_live_max_call_ms`; without one, a full batch."""
    async def main(live: bool, budget_ms: float):
        r = RecordingRunner(delay=0.1)
        # A 200 ms window: all six are waiting before the first batch forms, however slow this machine.
        b = make(r, max_batch_size=8, batch_wait_ms=200.0, max_batch_audio_s=240.0, file_live_max_call_ms=budget_ms,
                 file_max_wait_s=0, live_quiet_s=1.0)
        b.start(asyncio.get_running_loop())
        t0 = time.monotonic()  # the live request's arrival
        await b.submit(audio(0.5), ItemOptions(), Kind.FINAL if live else Kind.FILE, "z")  # measures 0.1 s per item
        futs = [b.submit(audio(20.0), ItemOptions(), Kind.FILE, "job") for _ in range(6)]
        started = []
        for f in futs:
            f.add_done_callback(lambda _f: started.append(time.monotonic() - t0))
        await asyncio.gather(*futs)
        b.stop()
        return [len(bt) for bt in r.batches[1:]], started[0]

    sizes, _ = run(main(live=True, budget_ms=250.0))
    assert sizes == [2, 2, 2], sizes
    sizes, _ = run(main(live=False, budget_ms=250.0))
    assert sizes == [6], sizes
    # Not even one segment fits: file work waits for the live session to go quiet (1 s after its
    # request), then runs full size.
    sizes, first = run(main(live=True, budget_ms=50.0))
    assert sizes == [6] and first >= 1.0, (sizes, first)


def test_file_work_slows_under_live_overload_but_does_not_stop():
    """Finals always waiting: strict priority would never run a file segment. An aged one gets a
    batch, within `file_aged_share` of the model's time."""
    runner = RecordingRunner(delay=0.05)
    # 0.05 s calls, a 10 s share window: at most 0.05 * 10 / 0.05 = 10 aged file calls in it.
    b = make(runner, max_batch_size=1, file_max_wait_s=0.1, file_aged_share=0.05, batch_wait_ms=1.0,
             partial_max_wait_ms=0)
    ran: list[str] = []

    async def main() -> None:
        b.start(asyncio.get_running_loop())
        b._started_at -= 10
        try:
            files = [b.submit(audio(1.0), ItemOptions(), Kind.FILE, "job") for _ in range(20)]
            for f in files:
                f.add_done_callback(lambda f: f.exception() is None and ran.append("f"))
            deadline = time.monotonic() + 2.5
            i = 0
            while time.monotonic() < deadline:
                while len(b._finals) < 3:  # finals always waiting
                    b.submit(audio(1.0), ItemOptions(), Kind.FINAL, f"s{i}").add_done_callback(
                        lambda f: f.exception() is None and ran.append("F"))  # not those failed by stop()
                    i += 1
                await asyncio.sleep(0.01)
        finally:
            b.stop()

    run(main())
    during = ran[: len(ran) - ran[::-1].index("F")]
    files = during.count("f")
    assert files >= 2, f"file work stopped under live overload: {''.join(during)}"
    assert files <= 11 and files <= 0.3 * len(during), f"file work took more than its share: {''.join(during)}"


def test_a_cancelled_job_drops_its_file_segments_and_metrics_count_each_class():
    async def main():
        r = RecordingRunner()
        r.gate.clear()
        b = make(r, max_batch_size=8, batch_wait_ms=1.0)
        b.start(asyncio.get_running_loop())
        blocker = b.submit(audio(0.5), ItemOptions(), Kind.FINAL, "z")
        await inside_call(r)
        gone = [b.submit(audio(1.0), ItemOptions(), Kind.FILE, "gone") for _ in range(3)]
        kept = b.submit(audio(1.5), ItemOptions(), Kind.FILE, "kept")
        assert b.cancel_session("gone") == 3
        r.gate.set()
        await asyncio.gather(blocker, kept)
        b.stop()
        return r, b, gone

    r, b, gone = run(main())
    assert all(f.cancelled() for f in gone) and r.batches[1:] == [[24000]]
    text = b.metrics.render().decode()
    assert 'chorus_requests_dropped_total{kind="file",why="cancelled"} 3.0' in text
    assert 'chorus_batches_total{kind="file"} 1.0' in text and 'chorus_batches_total{kind="final"} 1.0' in text
    assert 'chorus_requests_total{kind="file"} 4.0' in text
    assert re.search(r'chorus_model_busy_seconds_total\{kind="file"\} [0-9.e-]+', text)


class MatmulRunner(ModelRunner):
    """Multiplies large matrices in its call and records the CPU time per wall second it took:
    about the number of threads torch ran the product on."""

    name = "matmul"

    def __init__(self, num_threads: int) -> None:
        super().__init__(RunnerConfig(num_threads=num_threads))
        self.cores_used: list[float] = []

    def load(self) -> None:
        pass

    def transcribe(self, audios, options):
        import torch

        a = torch.randn(1200, 1200)
        # The process's CPU time per wall second: torch's pool threads work for this call too
        # (measured on a machine with nothing else running: the test is `timing`).
        t0, c0 = time.monotonic(), time.process_time()
        for _ in range(40):
            a @ a
        self.cores_used.append((time.process_time() - c0) / (time.monotonic() - t0))
        return [Transcript(text="x") for _ in audios]


@pytest.mark.timing
@pytest.mark.skipif(os.cpu_count() < 2, reason="needs 2 cores to tell one thread from several")
def test_runner_num_threads_holds_in_the_thread_that_runs_the_calls():
    """`runner.num_threads` 1 on a 2-core machine: the served calls use one core. torch's thread
    count is per OS thread; it used to be set only in the thread that loaded the model, and the
    batcher's worker ran on every core."""
    import torch

    async def main(r):
        b = make(r)
        b.start(asyncio.get_running_loop())
        try:
            await b.submit(audio(1.0), ItemOptions(), Kind.FINAL, "s")
        finally:
            b.stop()

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # as `load` does with num_threads 1, in the loading thread
        one, default = MatmulRunner(num_threads=1), MatmulRunner(num_threads=0)
        run(main(one))
        run(main(default))
    finally:
        torch.set_num_threads(before)
    assert default.cores_used[0] > 1.5, default.cores_used  # the measure tells one core from two
    assert one.cores_used[0] < 1.3, one.cores_used
