"""The central micro-batcher: one per model, one worker thread that owns the model.

Sessions submit requests from the event loop and get an ``asyncio.Future``. The
worker thread forms a batch within a deadline window (``batch_wait_ms`` after the
oldest waiting request arrived, or at once when a full batch is waiting), runs the
runner, and resolves each future on the loop with ``call_soon_threadsafe``.

Policy, in order:
- three priority classes: live finals, then live partials, then file segments (recordings
  sent whole: server/files/job.py); a batch holds one class. File work fills the model's
  time between live batches. A call cannot be interrupted, so a live final that arrives
  while a file batch runs waits for it: while live sessions are active, file batches are
  only as large as fit ``file_live_max_call_ms`` by the measured time per item, and where
  not even one item fits (a CPU) file work waits for the live sessions to go quiet;
- aging, so no class starves: a partial that has waited ``partial_max_wait_ms`` gets one
  batch between two batches of finals, and a file segment that has waited ``file_max_wait_s``
  one batch between two live ones, each only while its class took less than its share of
  the model's recent time (``partial_max_share``, ``file_aged_share``);
- file segments are batched by length: one length bucket per batch, longest first within it,
  the bucket with the oldest waiting segment first, except that a bucket holding a full
  batch goes ahead (full batches are the throughput);
- at most one pending partial per session: a newer one (or the session's final)
  replaces the older, whose future resolves to ``None`` (superseded);
- items of one length bucket per batch, so short items are not padded to long ones;
- at most ``max_batch_size`` items and ``max_batch_audio_s`` padded audio seconds;
- a runner answers each item with its result or that item's own error (`ItemError`): a
  bad item fails alone;
- an out-of-memory batch is split in halves and retried; any other failing batch
  fails every request in it, and the worker lives on;
- a device fault is reported against the batch it may belong to: a CUDA fault surfaces at
  the next call into the device, which can be the launch of the next batch while the faulty
  one is still in flight; then the batch in flight fails with it and the next is retried alone;
- with a runner that launches asynchronously (CUDA), the next batch is formed and
  launched before the running one is collected (see ``_worker``);
- a session that goes away cancels its requests; they are never run;
- health: whole calls failing in a row and a watchdog on call duration say when the
  model is broken or hung (``broken_reason``); a hung model fails what waits instead of
  leaving it waiting forever (``check_watchdog``).

Nothing here touches sockets or sessions, and nothing blocks the event loop beyond
a short lock held while a request is appended.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import enum
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Sequence

import numpy as np

from server.config import BatcherConfig
from server.metrics import Metrics
from server.runners.base import ItemOptions, ItemResult, Launched, ModelRunner, Transcript

log = logging.getLogger(__name__)


class Kind(enum.IntEnum):
    """Priority classes, most urgent first."""

    FINAL = 0
    PARTIAL = 1
    FILE = 2
    """A segment of a recording sent whole (the transcription API, `chorus transcribe`)."""


class BatcherStopped(RuntimeError):
    """The batcher shut down before the request ran."""


class Overloaded(RuntimeError):
    """The queue is full; the request was refused."""


class ModelUnavailable(RuntimeError):
    """The model is hung (a call outlived the watchdog): the request will not be run."""


# Final queue waits are summarised over this trailing window for admission control.
_WAIT_WINDOW_S = 5.0
# The model's busy time on finals is averaged over this trailing window (the final-load gauge).
LOAD_WINDOW_S = 20.0
# What a second of live stream costs the model on finals is measured over this trailing window.
COST_WINDOW_S = 60.0
# A final may wait behind a partial call in flight: admission looks at those of this trailing window.
_PARTIAL_CALL_WINDOW_S = 20.0
# Partials' share of the model's time is measured over this trailing window (see _partial_overdue).
_SHARE_WINDOW_S = 10.0
# Weight of the newest call in the running estimate of seconds per item.
_ITEM_COST_ALPHA = 0.2
# While aged file work is held back by its share, look again this often.
_FILE_RECHECK_S = 0.25


@dataclass(frozen=True)
class FinalCosts:
    """What recent final calls cost (``MicroBatcher.final_costs``), for admission's projection."""

    calls: tuple[tuple[int, float], ...]
    """(items, seconds) of each final call: how a call's time grows with its batch size."""
    stream_per_final_s: float
    """Seconds of a session's stream one final accounts for, on average (silence included):
    each open session sends a final about this often."""
    partial_call_s: float
    """90th percentile of recent partial calls' seconds (0 when none ran): a final that arrives
    while one is in flight waits for it."""


@dataclass(eq=False)
class Request:
    audio: np.ndarray
    options: ItemOptions
    kind: Kind
    session: Hashable
    future: asyncio.Future
    bucket: int
    enqueued: float = field(default_factory=time.monotonic)
    seq: int = 0
    stream_s: float = 0.0
    """A final's share of its session's stream: the audio since the session's previous final
    (silence included). What admission charges per session is measured against it."""

    @property
    def seconds(self) -> float:
        return len(self.audio) / 16000.0


def _is_oom(exc: BaseException) -> bool:
    # Matched by name so this module stays free of torch (torch.OutOfMemoryError).
    return type(exc).__name__ == "OutOfMemoryError"


def _is_device_fault(exc: BaseException) -> bool:
    """An error the device reported for work queued earlier (torch.AcceleratorError, or the
    RuntimeError that older torch raises for CUDA errors), not one of this call's own."""
    return type(exc).__name__ == "AcceleratorError" or str(exc).startswith("CUDA error")


@dataclass
class _InFlight:
    """A launched batch waiting to be collected."""

    batch: list[Request]
    launched: Launched
    start: float
    call_id: int


class MicroBatcher:
    def __init__(self, runner: ModelRunner, config: BatcherConfig, metrics: Metrics) -> None:
        self.runner = runner
        self.config = config
        self.metrics = metrics
        self.max_batch = config.largest_batch
        # Batching off is the way most servers work: one request, one model call, no waiting for company.
        self.wait_s = config.batch_wait_ms / 1000.0 if config.enabled else 0.0
        self.bucket_edges = list(config.length_buckets_s)
        self._cond = threading.Condition()
        self._finals: collections.deque[Request] = collections.deque()
        self._partials: dict[Hashable, Request] = {}  # insertion-ordered: oldest first
        self._files: list[Request] = []  # arrival order; batches are picked by length (_take_files)
        self._live_seen = float("-inf")  # when the last live request arrived
        self._item_s: float | None = None  # seconds per item of recent final and file calls (beam-decoded)
        self._running = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._seq = itertools.count()
        self.batches_run = 0
        # Health, read by the event loop (broken_reason, check_watchdog): calls started and not
        # yet collected (id -> (start, requests)), whole-call failures in a row, a hung verdict.
        self._calls: dict[int, tuple[float, list[Request]]] = {}
        self._call_ids = itertools.count()
        self.consecutive_failures = 0
        self.last_failure: str | None = None
        self.hung_reason: str | None = None
        self._final_waits: collections.deque[tuple[float, float]] = collections.deque()  # (when, wait)
        self._aged_partials_last = False
        self._aged_files_last = False
        self._final_calls: collections.deque[tuple[float, float]] = collections.deque()  # (end, seconds)
        self._partial_calls: collections.deque[tuple[float, float]] = collections.deque()
        self._file_calls: collections.deque[tuple[float, float]] = collections.deque()
        # Final calls as (end, seconds, stream seconds their items account for, items): see
        # final_cost and final_costs.
        self._final_costs: collections.deque[tuple[float, float, float, int]] = collections.deque()
        self._last_final_costs: FinalCosts | None = None
        self._started_at = time.monotonic()

    # ------------------------------------------------------------------ lifecycle
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._started_at = time.monotonic()
        self._running = True
        self._thread = threading.Thread(target=self._worker, name=f"batcher-{self.runner.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the worker after its current batch; fail whatever still waits."""
        with self._cond:
            self._running = False
            left = self._waiting()
            self._clear_waiting()
            self._cond.notify_all()
        for req in left:
            self._resolve(req, exc=BatcherStopped("server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)

    def _waiting(self) -> list[Request]:
        """Every waiting request (lock held)."""
        return list(self._finals) + list(self._partials.values()) + list(self._files)

    def _clear_waiting(self) -> None:
        self._finals.clear()
        self._partials.clear()
        self._files.clear()

    # ------------------------------------------------------------------ event-loop side
    def bucket_of(self, seconds: float) -> int:
        return min(bisect.bisect_left(self.bucket_edges, seconds), len(self.bucket_edges) - 1) if self.bucket_edges else 0

    def submit(self, audio: np.ndarray, options: ItemOptions, kind: Kind, session: Hashable,
               stream_s: float = 0.0) -> asyncio.Future:
        """Queue one item; the future resolves to a Transcript (or None for a superseded partial).
        FILE items always queue: their job bounds how much of its recording waits at once.
        ``stream_s``: for a live final, the seconds of its session's stream it accounts for."""
        assert self._loop is not None, "batcher not started"
        fut = self._loop.create_future()
        req = Request(audio, options, kind, session, fut, self.bucket_of(len(audio) / 16000.0), seq=next(self._seq),
                      stream_s=stream_s)
        replaced = None
        with self._cond:
            if not self._running:
                fut.set_exception(BatcherStopped("server is shutting down"))
                return fut
            if self.hung_reason is not None:
                fut.set_exception(ModelUnavailable(self.hung_reason))
                return fut
            depth = len(self._finals) + len(self._partials)
            if kind is not Kind.FILE:
                self._live_seen = req.enqueued
            if kind is Kind.FILE:
                self._files.append(req)
            elif kind is Kind.PARTIAL:
                if depth >= self.config.max_queue and session not in self._partials:
                    self.metrics.requests_dropped.labels("partial", "overload").inc()
                    fut.set_exception(Overloaded("batcher queue full"))
                    return fut
                replaced = self._partials.pop(session, None)
                if replaced is not None:
                    # The session has waited for a partial since the one replaced was queued.
                    req.enqueued = replaced.enqueued
                self._partials[session] = req
            else:
                # Finals always queue: dropping one would lose a user's words. A partial still
                # waiting for this session is for the segment that just ended: drop it unrun.
                self._finals.append(req)
                replaced = self._partials.pop(session, None)
            self._publish_depth()
            self._cond.notify()
        self.metrics.requests.labels(kind.name.lower()).inc()
        if replaced is not None:
            self.metrics.requests_dropped.labels("partial", "superseded").inc()
            if not replaced.future.done():
                replaced.future.set_result(None)
        return fut

    def cancel_session(self, session: Hashable) -> int:
        """Forget every waiting request of a session that went away. Returns how many."""
        with self._cond:
            gone = [r for r in self._finals if r.session == session]
            if gone:
                self._finals = collections.deque(r for r in self._finals if r.session != session)
            p = self._partials.pop(session, None)
            if p is not None:
                gone.append(p)
            files = [r for r in self._files if r.session == session]
            if files:
                self._files = [r for r in self._files if r.session != session]
                gone += files
            self._publish_depth()
        for r in gone:
            self.metrics.requests_dropped.labels(r.kind.name.lower(), "cancelled").inc()
            if not r.future.done():
                r.future.cancel()
        return len(gone)

    # ------------------------------------------------------------------ health
    def broken_reason(self) -> str | None:
        """Why the model cannot serve (an orchestrator should restart the process), or None:
        a call outlived the watchdog, or `max_consecutive_failures` calls failed in a row
        (a sticky device error fails every batch while the process looks alive)."""
        if self.hung_reason is not None:
            return self.hung_reason
        limit = self.config.max_consecutive_failures
        if limit and self.consecutive_failures >= limit:
            return f"{self.consecutive_failures} model calls failed in a row (last: {self.last_failure})"
        return None

    def check_watchdog(self, now: float | None = None) -> bool:
        """Called periodically from the event loop. A call running longer than `watchdog_s`
        marks the model hung: its requests and every waiting one fail with ModelUnavailable
        (sessions report the loss instead of waiting forever), and so does every new one.
        A worker thread cannot be killed; a hung call that returns after all clears the
        verdict. Returns whether the model is hung."""
        limit = self.config.watchdog_s
        if not limit:
            return False
        now = time.monotonic() if now is None else now
        with self._cond:
            stuck = [(start, reqs) for start, reqs in self._calls.values() if now - start > limit]
            if not stuck:
                return self.hung_reason is not None
            if self.hung_reason is None:
                oldest = min(start for start, _ in stuck)
                self.hung_reason = f"a model call has run for {now - oldest:.0f} s (watchdog {limit:g} s)"
                log.error("model hung: %s; failing waiting requests", self.hung_reason)
            left = [r for _, reqs in stuck for r in reqs] + self._waiting()
            self._clear_waiting()
            self._publish_depth()
        exc = ModelUnavailable(self.hung_reason)
        for r in left:
            self._resolve(r, exc=exc)
        return True

    def final_wait_s(self, now: float | None = None) -> float:
        """How long finals are waiting for the model now: the larger of the oldest waiting
        final's age and the 90th percentile of the waits of finals started in the last
        few seconds. Admission control refuses new sessions while this is too high."""
        now = time.monotonic() if now is None else now
        with self._cond:
            while self._final_waits and now - self._final_waits[0][0] > _WAIT_WINDOW_S:
                self._final_waits.popleft()
            recent = sorted(w for _, w in self._final_waits)
            oldest = now - self._finals[0].enqueued if self._finals else 0.0
        p90 = recent[min(len(recent) - 1, int(0.9 * len(recent)))] if recent else 0.0
        return max(oldest, p90)

    def final_load(self, now: float | None = None) -> float:
        """Share of the last `LOAD_WINDOW_S` seconds the model spent on calls of finals (0..1).
        Finals are the work the server owes every admitted session; partials fill what is
        left and thin out under load. Published as a gauge; admission projects `final_cost`."""
        now = time.monotonic() if now is None else now
        with self._cond:
            return self._busy_share(self._final_calls, now, LOAD_WINDOW_S)

    def final_cost(self, now: float | None = None) -> float | None:
        """Model seconds spent on finals per second of live stream they account for, over the
        same final calls as `final_costs` (None before the first final): the
        `chorus_model_final_cost` gauge. Each final is matched to the stream time since its
        session's previous final, so silence and batching are in it."""
        costs = self.final_costs(now)
        if costs is None:
            return None
        items = sum(k for k, _ in costs.calls)
        return sum(t for _, t in costs.calls) / (costs.stream_per_final_s * items)

    def final_costs(self, now: float | None = None) -> FinalCosts | None:
        """What recent final calls cost, call by call with their sizes, and how often a session
        sends a final: what admission projects the model's latency from. Over the final calls of
        the last `COST_WINDOW_S` (the latest such measure when none was that recent; None before
        the first final)."""
        now = time.monotonic() if now is None else now
        with self._cond:
            while self._final_costs and self._final_costs[0][0] < now - COST_WINDOW_S:
                self._final_costs.popleft()
            items = sum(c[3] for c in self._final_costs)
            stream = sum(c[2] for c in self._final_costs)
            if items and stream > 0:
                partials = sorted(seconds for end, seconds in self._partial_calls if end >= now - _PARTIAL_CALL_WINDOW_S)
                self._last_final_costs = FinalCosts(
                    calls=tuple((c[3], c[1]) for c in self._final_costs),
                    stream_per_final_s=stream / items,
                    partial_call_s=partials[int(0.9 * (len(partials) - 1))] if partials else 0.0,
                )
            return self._last_final_costs

    def _busy_share(self, calls: collections.deque[tuple[float, float]], now: float, window: float) -> float:
        """Share of the trailing ``window`` spent in these calls (lock held); trims old ones."""
        span = min(window, now - self._started_at)
        if span < 1.0:
            return 0.0
        while calls and calls[0][0] < now - LOAD_WINDOW_S:
            calls.popleft()
        busy = sum(max(0.0, min(seconds, end - (now - span))) for end, seconds in calls)
        return min(1.0, busy / span)

    def _publish_depth(self) -> None:
        self.metrics.queue_depth.set(len(self._finals) + len(self._partials) + len(self._files))
        for kind, n in ((Kind.FINAL, len(self._finals)), (Kind.PARTIAL, len(self._partials)), (Kind.FILE, len(self._files))):
            self.metrics.queue_waiting.labels(kind.name.lower()).set(n)

    # ------------------------------------------------------------------ worker side
    def _next_queue(self) -> list[Request]:
        """The queue the next batch comes from (lock held): finals while any wait, else
        partials, else file segments. A partial that has waited `partial_max_wait_ms` gets one
        batch between two batches of finals, so that under load partials thin out instead of
        stopping; a file segment that has waited `file_max_wait_s` likewise gets one batch
        between two live ones, so file work slows under live load but never stops."""
        now = time.monotonic()
        if self._files and (self._finals or self._partials) and not self._aged_files_last and self._file_aged(now):
            return self._files
        if self._finals and not self._partial_overdue():
            return list(self._finals)
        live = list(self._partials.values()) or list(self._finals)
        if live:
            return live
        return self._files if self._files and self._file_wait_s(now) is None else []

    def _file_aged(self, now: float) -> bool:
        """An aged file segment may run now (lock held): the oldest has waited `file_max_wait_s`
        and file calls took less than `file_aged_share` of the model's last 10 s."""
        wait = self.config.file_max_wait_s
        if not wait or now - self._files[0].enqueued <= wait:
            return False
        return self._busy_share(self._file_calls, now, _SHARE_WINDOW_S) < self.config.file_aged_share

    def _live_active(self, now: float) -> bool:
        return now - self._live_seen < self.config.live_quiet_s

    def _file_slots(self, now: float) -> int:
        """How many file segments one batch may take now (lock held): a full batch without live
        sessions; with them, as many as the measured time per item fits in
        `file_live_max_call_ms` (1 while nothing is measured yet), possibly 0."""
        if not self._live_active(now):
            return self.max_batch
        if self._item_s is None:
            return 1
        return min(self.max_batch, int(self.config.file_live_max_call_ms / 1000.0 / max(self._item_s, 1e-6)))

    def _file_wait_s(self, now: float) -> float | None:
        """None if waiting file segments may go now (no live work waits), else how long to wait
        before looking again: until live sessions are quiet, or the oldest segment ages."""
        if self._file_slots(now) > 0 or self._file_aged(now):
            return None
        until = self._live_seen + self.config.live_quiet_s
        wait = self.config.file_max_wait_s
        if wait and self._files[0].enqueued + wait > now:
            until = min(until, self._files[0].enqueued + wait)
        elif wait:  # aged, but over its share: the share frees up as time passes
            until = min(until, now + _FILE_RECHECK_S)
        return max(0.001, until - now)

    def _partial_overdue(self) -> bool:
        """An overdue partial may go ahead of waiting finals, but only while partial calls
        took less than `partial_max_share` of the model's recent time: under overload the
        finals keep the rest, and partials come less often instead of not at all."""
        wait = self.config.partial_max_wait_ms / 1000.0
        if not wait or not self._partials or self._aged_partials_last:
            return False
        now = time.monotonic()
        if now - next(iter(self._partials.values())).enqueued <= wait:
            return False
        return self._busy_share(self._partial_calls, now, _SHARE_WINDOW_S) < self.config.partial_max_share

    def _ready_count(self) -> int:
        """Items that could go into the next batch right now (for the 'full batch' early wake)."""
        queue = self._next_queue()
        return sum(1 for r in queue if r.bucket == queue[0].bucket) if queue else 0

    def _oldest_enqueued(self) -> float:
        times = []
        if self._finals:
            times.append(self._finals[0].enqueued)
        if self._partials:
            times.append(next(iter(self._partials.values())).enqueued)
        if self._files:
            times.append(self._files[0].enqueued)
        return min(times)

    def _take_batch(self) -> list[Request]:
        """Pick the next batch (lock held): finals first, one bucket, size and audio budget."""
        batch: list[Request] = []
        queue = self._next_queue()
        if queue and queue[0].kind is Kind.FILE:
            batch = self._take_files()
        elif queue:
            bucket = queue[0].bucket
            batch = self._fill((r for r in queue if r.bucket == bucket), self.max_batch)
            taken = set(map(id, batch))
            if batch[0].kind is Kind.FINAL:
                self._finals = collections.deque(r for r in self._finals if id(r) not in taken)
            else:
                for r in batch:
                    del self._partials[r.session]
        if batch:
            # A partial batch taken while finals wait was an overdue one: finals go next; and
            # a file batch taken while live work waits was an aged one: live work goes next.
            self._aged_partials_last = batch[0].kind is Kind.PARTIAL and bool(self._finals)
            self._aged_files_last = batch[0].kind is Kind.FILE and bool(self._finals or self._partials)
        self._publish_depth()
        return batch

    def _fill(self, candidates: Iterable[Request], most: int) -> list[Request]:
        """A batch of ``candidates`` (one bucket), in their order: at most ``most`` items, and
        at most `max_batch_audio_s` of padded audio (every item costs its bucket's upper edge);
        the first always goes."""
        edge = self.bucket_edges
        budget = self.config.max_batch_audio_s
        batch: list[Request] = []
        for r in candidates:
            if len(batch) >= most:
                break
            per_item = edge[r.bucket] if edge else r.seconds
            if not batch or per_item * (len(batch) + 1) <= budget:
                batch.append(r)
        return batch

    def _take_files(self) -> list[Request]:
        """A batch of file segments (lock held), by length: the bucket of the oldest waiting
        segment, unless some bucket holds a full batch (that one goes first; the oldest
        segment's bucket is taken once it has waited `file_max_wait_s`); longest first within
        the bucket, so a batch pads as little as it can; at most `max_batch_audio_s` of padded
        audio, and while live sessions are active at most `_file_slots` segments (at least one:
        an aged batch goes even where none fits)."""
        now = time.monotonic()
        by_bucket: dict[int, list[Request]] = {}
        for r in self._files:
            by_bucket.setdefault(r.bucket, []).append(r)
        oldest = self._files[0]
        bucket = oldest.bucket
        wait = self.config.file_max_wait_s
        if not (wait and now - oldest.enqueued > wait):
            full = [b for b, rs in by_bucket.items() if len(rs) >= self.max_batch]
            if full and bucket not in full:
                bucket = min(full, key=lambda b: by_bucket[b][0].seq)
        batch = self._fill(sorted(by_bucket[bucket], key=lambda r: -len(r.audio)), max(1, self._file_slots(now)))
        taken = set(map(id, batch))
        self._files = [r for r in self._files if id(r) not in taken]
        return batch

    def _wait_for_batch(self, block: bool) -> list[Request] | None:
        """The next batch, or None once stopped. With ``block=False`` (a batch is in flight)
        it returns at once: a batch if one is due now (full, or its window has passed),
        else an empty list, so the worker collects the running batch instead of waiting."""
        with self._cond:
            while True:
                if block:
                    while self._running and not (self._finals or self._partials or self._files):
                        self._cond.wait()
                if not self._running:
                    return None
                if not (self._finals or self._partials or self._files):
                    return []
                if self._finals or self._partials:
                    break
                held = self._file_wait_s(time.monotonic())  # only file work waits: may it go?
                if held is None:
                    break
                if not block:
                    return []
                self._cond.wait(held)
            # Deadline window from the oldest waiting request, not a sleep-poll loop.
            deadline = self._oldest_enqueued() + self.wait_s
            while self._running and self._ready_count() < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if not block:
                    return []
                self._cond.wait(remaining)
            if not self._running:
                return None
            batch = self._take_batch()
        # Skip requests whose session vanished while they waited.
        return [r for r in batch if not r.future.cancelled()]

    def _worker(self) -> None:
        """Form, launch and collect batches. With an asynchronous runner (CUDA) the next
        batch is formed and launched while the current one runs on the device, and only
        then is the current one collected: the host work of batch N+1 (gathering, padding,
        pinned copies, kernel launches) overlaps the device work of batch N, and the device
        never idles between back-to-back batches. A batch is collected before any later one,
        so results reach sessions in launch order."""
        self.runner.enter_worker_thread()
        inflight: _InFlight | None = None
        while True:
            batch = self._wait_for_batch(block=inflight is None)
            if batch is None:  # stopped: the running batch still delivers its results
                if inflight is not None:
                    self._collect(inflight)
                return
            launched: _InFlight | None = None
            if batch:
                try:
                    launched = self._launch(batch)
                except Exception as exc:  # noqa: BLE001 - a failed batch must fail its requests, not the worker
                    if inflight is not None and _is_device_fault(exc):
                        # Batch N's kernels may have faulted: the error surfaced at this launch,
                        # the next call into the device. It is N's; N+1 gets a launch of its own.
                        self._fail_inflight(inflight, exc)
                        inflight = None
                        launched = self._launch_alone(batch)
                    else:
                        self._fail(batch, exc)
            if inflight is not None:
                self._collect(inflight)
                inflight = None
            if launched is not None:
                if self.runner.asynchronous:
                    inflight = launched
                else:
                    self._collect(launched)

    def _start(self, batch: Sequence[Request]) -> Launched:
        """Queue a batch on the runner; out of memory while queueing runs it in halves now."""
        try:
            return self.runner.launch([r.audio for r in batch], [r.options for r in batch])
        except Exception as exc:
            if not _is_oom(exc) or len(batch) == 1:
                raise
            return Launched.done(self._split(batch))

    def _results(self, batch: Sequence[Request], launched: Launched) -> list[ItemResult]:
        """A launched batch's results, one per request; out of memory runs it in halves."""
        try:
            results = launched.result()
        except Exception as exc:
            if not _is_oom(exc) or len(batch) == 1:
                raise
            return self._split(batch)
        if len(results) != len(batch):
            raise RuntimeError(f"runner returned {len(results)} results for {len(batch)} items")
        return results

    def _split(self, batch: Sequence[Request]) -> list[ItemResult]:
        """Out of memory: run the halves one after the other, synchronously, never dropping one."""
        mid = len(batch) // 2
        log.warning("out of memory on a batch of %d; splitting and retrying", len(batch))
        self.metrics.batch_splits.inc()
        halves = (batch[:mid], batch[mid:])
        return [t for half in halves for t in self._results(half, self._start(half))]

    def _launch(self, batch: list[Request], first_try: bool = True) -> _InFlight:
        """Queue a batch on the runner; raises what the launch raised. The call is watched
        (check_watchdog) from here until it is collected or failed."""
        start = time.monotonic()
        call_id = next(self._call_ids)
        with self._cond:
            self._calls[call_id] = (start, batch)
            if first_try:
                self._final_waits.extend((start, start - r.enqueued) for r in batch if r.kind is Kind.FINAL)
        if first_try:
            for r in batch:
                self.metrics.queue_wait.labels(r.kind.name.lower()).observe(start - r.enqueued)
        try:
            return _InFlight(batch, self._start(batch), start, call_id)
        except BaseException:
            self._end_call(call_id)
            raise

    def _end_call(self, call_id: int, ok: bool = False) -> None:
        """A watched call is over; a successful one also counts towards the busy shares."""
        with self._cond:
            started = self._calls.pop(call_id, None)
            if ok:
                if started is not None and started[1]:
                    end = time.monotonic()
                    kind = started[1][0].kind
                    busy = {Kind.FINAL: self._final_calls, Kind.PARTIAL: self._partial_calls}.get(kind, self._file_calls)
                    busy.append((end, end - started[0]))
                    if kind is Kind.FINAL:
                        self._final_costs.append(
                            (end, end - started[0], sum(r.stream_s for r in started[1]), len(started[1])))
                    if kind is not Kind.PARTIAL:  # partials decode greedily: cheaper than what files cost
                        per_item = (end - started[0]) / len(started[1])
                        prev = self._item_s
                        self._item_s = per_item if prev is None else prev + _ITEM_COST_ALPHA * (per_item - prev)
                    self.metrics.model_busy_seconds.labels(kind.name.lower()).inc(end - started[0])
                self.consecutive_failures = 0
                if self.hung_reason is not None and not self._calls:
                    log.warning("model recovered: the call the watchdog flagged has returned")
                    self.hung_reason = None

    def _launch_alone(self, batch: list[Request]) -> _InFlight | None:
        """Launch with nothing in flight: whatever fails now is this batch's own."""
        try:
            return self._launch(batch, first_try=False)
        except Exception as exc:  # noqa: BLE001 - a failed batch must fail its requests, not the worker
            self._fail(batch, exc)
            return None

    def _fail_inflight(self, inflight: _InFlight, exc: BaseException) -> None:
        log.error("device fault surfaced while batch of %d was in flight; failing that batch", len(inflight.batch))
        try:
            inflight.launched.result()  # wait for its queued work before its buffers go
        except Exception:  # noqa: BLE001, S110 - the fault is already being reported
            pass
        self._end_call(inflight.call_id)
        self._fail(inflight.batch, exc)

    def _collect(self, inflight: _InFlight) -> None:
        batch = inflight.batch
        try:
            results = self._results(batch, inflight.launched)
        except Exception as exc:  # noqa: BLE001 - a failed batch must fail its requests, not the worker
            self._end_call(inflight.call_id)
            self._fail(batch, exc)
            return
        self._end_call(inflight.call_id, ok=True)
        took = time.monotonic() - inflight.start
        audio_s = sum(r.seconds for r in batch)
        self.batches_run += 1
        self.metrics.batches.labels(batch[0].kind.name.lower()).inc()
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_audio_seconds.observe(audio_s)
        self.metrics.model_seconds.observe(took)
        for stage, seconds in inflight.launched.stages.items():
            self.metrics.stage_seconds.labels(stage).inc(seconds)
        if audio_s > 0:
            self.metrics.rtf.observe(took / audio_s)
        for r, res in zip(batch, results):
            if isinstance(res, BaseException):
                self.metrics.item_errors.labels(getattr(res, "code", "internal")).inc()
                self._resolve(r, exc=res)
            else:
                self._resolve(r, result=res)

    def _fail(self, batch: Sequence[Request], exc: BaseException) -> None:
        """A whole call failed (not one item): counted towards `broken_reason`."""
        log.error("model call failed for a batch of %d: %s: %s", len(batch), type(exc).__name__, exc, exc_info=exc)
        with self._cond:
            self.consecutive_failures += 1
            self.last_failure = type(exc).__name__
        self.metrics.batch_failures.inc()
        for r in batch:
            self._resolve(r, exc=exc)

    def _resolve(self, req: Request, result: Transcript | None = None, exc: BaseException | None = None) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        def settle() -> None:
            if req.future.done():
                return
            if exc is not None:
                req.future.set_exception(exc)
            else:
                req.future.set_result(result)

        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:  # loop closed between the check and the call
            pass
