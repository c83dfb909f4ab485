"""One live stream: audio clock, endpointer, segments, partial scheduling, ordered results.

A Session knows nothing of sockets or wire formats: a protocol adapter feeds it
bytes and controls, and it reports through a ``SessionOutput`` (which the adapter
encodes in its own dialect). It never imports torch; model work goes through the
batcher and comes back as futures on the event loop.

Ordering guarantees the adapters rely on:
- finals are emitted in segment order, each exactly once;
- a partial is emitted only for the segment that is still open and only if it is
  newer than the last partial sent for it, so partials of a segment precede its final;
- after ``stop()`` every confirmed segment has had its final before ``on_done``.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import numpy as np

from server.audio.codecs import AudioFormatError, decode
from server.audio.resample import StreamResampler
from server import incidents
from server.batcher import BatcherStopped, Kind, MicroBatcher, ModelUnavailable, Overloaded
from server.config import Config
from server.metrics import Metrics
from server.runners.base import ItemError, ItemOptions, Transcript, Word
from server.stream_config import StreamConfig
from server.vad.endpointer import Endpointer, EndpointerSettings, SegmentEnded, SpeechStarted

log = logging.getLogger(__name__)

# Silence within a segment shorter than this is a pause between words, not a possible end.
_PAUSE_MS = 200


class SessionOutput(Protocol):
    """What a protocol adapter must implement to receive a session's results."""

    def on_speech_started(self, segment_id: int, start_ms: int) -> None: ...
    def on_partial(self, segment_id: int, text: str, start_ms: int, end_ms: int, fields: dict[str, Any],
                   words: list[Word] | None = None) -> None: ...
    def on_final(self, segment_id: int, text: str, start_ms: int, end_ms: int, cut_ms: int, fields: dict[str, Any],
                 words: list[Word] | None = None) -> None: ...
    def on_error(self, code: str, message: str, fatal: bool) -> None: ...


def stream_words(t: Transcript, segment_start_ms: int, segment_end_ms: int) -> list[Word] | None:
    """The item's word timings on the stream's audio clock (the segment's audio begins at its
    start_ms), kept inside the segment; None when the runner gave none."""
    if t.words is None:
        return None
    out = []
    for w in t.words:
        start = min(segment_start_ms + max(w.start_ms, 0), segment_end_ms)
        out.append(Word(w.word, start, min(max(segment_start_ms + w.end_ms, start), segment_end_ms)))
    return out


def result_fields(t: Transcript) -> dict[str, Any]:
    """Model extras worth sending to clients (scalars only; token lists stay server-side)."""
    out: dict[str, Any] = {"language": t.language}
    for k, v in t.fields.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
    return out


def segment_failure(exc: BaseException, what: str) -> tuple[str, str]:
    """Why a segment's model request failed, as (error code, message safe for a client).
    Anything but the batcher's and runners' own errors is a server fault: its raw text stays in
    the log (it may hold paths or model internals) under an incident id. ``what`` names the
    segment in that log line."""
    if isinstance(exc, ItemError):
        return exc.code, str(exc)
    if isinstance(exc, (Overloaded, BatcherStopped)):
        return "overloaded", str(exc)
    if isinstance(exc, ModelUnavailable):
        return "model_unavailable", "the model is not responding"
    incident = incidents.report(log, "%s failed: %s: %s", None, what, type(exc).__name__, exc)
    return "internal", f"internal server error (incident {incident})"


@dataclass
class _PendingFinal:
    segment: SegmentEnded
    future: asyncio.Future
    decided_at: float  # monotonic time the segment was cut, for the latency metric


class Session:
    def __init__(
        self,
        config: Config,
        stream: StreamConfig,
        batcher: MicroBatcher,
        output: SessionOutput,
        metrics: Metrics,
        session_id: str | None = None,
        partials_wanted: Callable[[], bool] | None = None,
    ) -> None:
        """``partials_wanted``: asked before each partial request; when it says no, none is made
        (a telephony track whose call has no reader of partials spends no model time on them)."""
        self.id = session_id or uuid.uuid4().hex[:16]
        self.config = config
        self.stream = stream
        self.batcher = batcher
        self.output = output
        self.metrics = metrics
        self.options = ItemOptions(language=stream.language, itn=stream.itn)
        # Partials are decoded the cheap way (runner's choice) and carry words only if asked.
        self.partial_options = dataclasses.replace(self.options, partial=True, words=stream.partial_words)
        settings = EndpointerSettings.from_config(config.vad, stream.endpointing_ms, stream.max_segment_ms)
        self.settings = settings
        self.endpointer = Endpointer(settings)
        self.resampler = StreamResampler(stream.sample_rate, 16000) if stream.sample_rate != 16000 else None
        # A client may ask for partials less often than the server's cadence, never more often.
        interval = max(config.batcher.partial_interval_ms, stream.partial_interval_ms or 0)
        self.partial_interval_ms = interval if (stream.interim_results and config.batcher.partial_interval_ms > 0) else 0
        self._finals: collections.deque[_PendingFinal] = collections.deque()
        self._partials_wanted = partials_wanted
        self._partial_future: asyncio.Future | None = None
        self._last_partial_request_ms = 0
        self._accounted_ms = 0  # the stream clock up to which finals have been submitted
        self._partial_seq = 0
        self._last_partial_seq = 0
        self._open_segment: int | None = None
        self._last_final_id = -1  # finals go out in segment order, so one number suffices
        self._closed = False
        self._stopping = False
        self._decode_seconds = metrics.stage_seconds.labels("decode")
        self._vad_seconds = metrics.stage_seconds.labels("vad")

    # ------------------------------------------------------------------ input
    def feed_audio(self, data: bytes) -> None:
        """Decode, resample and endpoint one binary message. Raises AudioFormatError on bad bytes."""
        if self._closed or self._stopping:
            return
        t0 = time.perf_counter()
        samples = decode(data, self.stream.encoding)
        if self.resampler is not None:
            samples = self.resampler.process(samples)
        t1 = time.perf_counter()
        events = self.endpointer.feed(samples)
        t2 = time.perf_counter()
        self._decode_seconds.inc(t1 - t0)
        self._vad_seconds.inc(t2 - t1)
        self.metrics.audio_seconds.inc(len(samples) / 16000.0)
        self._handle(events)
        self._maybe_request_partial()

    async def backpressure(self) -> None:
        """Wait while this session has too many segments queued for the model.

        The adapter awaits this before reading the next message, so a client that sends
        faster than real time is slowed by TCP flow control rather than by a growing queue."""
        while self.held_back:
            await asyncio.wait([self._finals[0].future])
            self._drain_finals()

    def finalize(self) -> None:
        """Client asked to end the current segment now."""
        if not self._closed and not self._stopping:
            self._handle(self.endpointer.finalize())

    async def stop(self) -> None:
        """Flush: the open segment is finalised, every pending final is delivered.
        Safe to call again (a graceful shutdown may interrupt a client's own stop): every
        call returns only once every final is out, or the session is closed."""
        if self._closed:
            return
        if not self._stopping:
            self._stopping = True
            if self.resampler is not None:
                tail = self.resampler.flush()
                if len(tail):
                    self._handle(self.endpointer.feed(tail))
            self._handle(self.endpointer.flush())
        while self._finals and not self._closed:
            await asyncio.wait([p.future for p in self._finals])
            self._drain_finals()

    @property
    def pending_finals(self) -> int:
        """Segments cut whose finals are not delivered yet (0 once closed: they were dropped)."""
        return len(self._finals)

    @property
    def held_back(self) -> bool:
        """True when ``backpressure()`` would wait."""
        return len(self._finals) >= self.config.server.max_pending_finals and not self._closed

    def close(self) -> None:
        """The connection is gone: drop everything this session still has queued."""
        if self._closed:
            return
        self._closed = True
        n = self.batcher.cancel_session(self.id)
        for p in self._finals:
            p.future.cancel()
        self._finals.clear()
        if self._partial_future is not None:
            self._partial_future.cancel()
        if n:
            log.info("session %s closed with %d queued request(s) dropped", self.id, n)

    # ------------------------------------------------------------------ endpointer events
    def _handle(self, events: list[SpeechStarted | SegmentEnded]) -> None:
        for ev in events:
            if isinstance(ev, SpeechStarted):
                self._open_segment = ev.segment_id
                self._last_partial_request_ms = self.endpointer.stream_ms
                self.output.on_speech_started(ev.segment_id, ev.start_ms)
            else:
                self._submit_final(ev)

    def _submit_final(self, seg: SegmentEnded) -> None:
        if self._open_segment == seg.segment_id:
            self._open_segment = None
        self.metrics.segments.labels(seg.reason).inc()
        # The stream time this final accounts for, silence before it included: what a session
        # costs the model per second of its stream is measured from it (admission control).
        # Cuts only move forward (segments never overlap), so each stretch is counted once.
        stream_s = (seg.cut_ms - self._accounted_ms) / 1000.0
        self._accounted_ms = seg.cut_ms
        fut = self.batcher.submit(seg.audio, self.options, Kind.FINAL, self.id, stream_s=stream_s)
        pending = _PendingFinal(seg, fut, time.monotonic())
        self._finals.append(pending)
        fut.add_done_callback(lambda _f: self._drain_finals())

    def _drain_finals(self) -> None:
        """Emit finished finals in segment order; a later one waits for an earlier one."""
        while self._finals and self._finals[0].future.done():
            p = self._finals.popleft()
            if self._closed or p.future.cancelled():
                continue
            seg = p.segment
            self._last_final_id = seg.segment_id
            exc = p.future.exception()
            if exc is not None:
                # The words are lost for this segment only; say so instead of hanging.
                code, why = segment_failure(exc, f"session {self.id}: segment {seg.segment_id}")
                self.output.on_error(code, f"segment {seg.segment_id} could not be recognised: {why}", False)
                self.output.on_final(seg.segment_id, "", seg.start_ms, seg.end_ms, seg.cut_ms, {"error": code})
                continue
            t: Transcript = p.future.result()
            self.metrics.final_latency.observe(time.monotonic() - p.decided_at)
            self.output.on_final(seg.segment_id, t.text, seg.start_ms, seg.end_ms, seg.cut_ms, result_fields(t),
                                 stream_words(t, seg.start_ms, seg.end_ms))

    # ------------------------------------------------------------------ partials
    def _maybe_request_partial(self) -> None:
        if not self.partial_interval_ms or self._closed or self._stopping:
            return
        if self._partial_future is not None and not self._partial_future.done():
            # One in flight already: the batcher would replace it anyway; don't churn.
            return
        now_ms = self.endpointer.stream_ms
        if now_ms - self._last_partial_request_ms < self.partial_interval_ms:
            return
        if self._partials_wanted is not None and not self._partials_wanted():
            return
        silent = self.endpointer.trailing_silence_ms
        if silent >= _PAUSE_MS and self.endpointer.settings.endpoint_ms - silent <= self.partial_interval_ms:
            # The speaker has paused, and if the pause goes on the segment's final comes before the
            # next partial would be due: a partial now would only show what the final is about to,
            # and the final would wait for it in the model (on a CPU, about a call's time).
            return
        seg = self.endpointer.open_segment()
        if seg is None:
            return
        segment_id, start_ms, audio = seg
        self._last_partial_request_ms = now_ms
        self._partial_seq += 1
        seq = self._partial_seq
        requested = time.monotonic()
        audio = np.array(audio, copy=True)  # the endpointer keeps growing its buffer
        end_ms = start_ms + len(audio) * 1000 // 16000
        fut = self.batcher.submit(audio, self.partial_options, Kind.PARTIAL, self.id)
        self._partial_future = fut
        fut.add_done_callback(lambda f: self._on_partial(f, segment_id, start_ms, end_ms, seq, requested))

    def _on_partial(self, fut: asyncio.Future, segment_id: int, start_ms: int, end_ms: int, seq: int, requested: float) -> None:
        if self._closed or fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            if not isinstance(exc, (Overloaded, BatcherStopped, ItemError, ModelUnavailable)):
                log.warning("partial failed for session %s: %s", self.id, exc)
            return
        t = fut.result()
        if t is None:  # superseded by a newer partial
            return
        # A partial must never arrive after its segment's final, nor out of order.
        if segment_id <= self._last_final_id or self._open_segment != segment_id:
            return
        if self._last_partial_seq >= seq:
            return
        self._last_partial_seq = seq
        self.metrics.partial_latency.observe(time.monotonic() - requested)
        words = stream_words(t, start_ms, end_ms) if self.stream.partial_words else None
        self.output.on_partial(segment_id, t.text, start_ms, end_ms, result_fields(t), words)


__all__ = ["Session", "SessionOutput", "AudioFormatError", "result_fields", "segment_failure", "stream_words"]
