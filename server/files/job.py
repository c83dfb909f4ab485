"""One recording's transcription: decode as read, cut at pauses, batch, stitch in order.

A ``FileJob`` decodes the file in a worker thread (PyAV, chunk by chunk), cuts it at pauses
with the same endpointer live streams use (segments at most the model's window), and hands
each segment to the micro-batcher as soon as it is cut, at the lowest priority
(``Kind.FILE``): file work fills the model's time between live batches, and the segments of
many files are batched together by length. Results come back by futures on the event loop
and are handed out in order (``on_segment``) as soon as every earlier one is done, so a
client can stream them.

Memory stays bounded however long the file: the decoder never holds more than one chunk,
the endpointer one segment, and the thread stops decoding while ``max_pending_audio_s`` of
this file's audio waits for the model. The event loop does no decoding, resampling or VAD.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import uuid
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable

from server.audio.codecs import AudioFormatError
from server.audio.media import AudioTooLong, iter_file
from server.batcher import Kind, MicroBatcher
from server.config import FilesConfig, VadConfig
from server.runners.base import ItemOptions, Transcript, Word
from server.session import result_fields, segment_failure, stream_words
from server.spacing import join
from server.vad.endpointer import Endpointer, EndpointerSettings, SegmentEnded

class FileError(Exception):
    """The recording cannot be transcribed as a whole (it is not audio, too long, or the model
    is unavailable). ``code`` is machine-readable; the message is safe to show the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Segment:
    """One stretch of speech of the file and its text; times in ms from the file's start."""

    id: int
    start_ms: int
    end_ms: int
    text: str
    language: str | None = None
    words: list[Word] | None = None
    """On the file's clock; None unless words were asked for (or the model gives none)."""
    fields: dict[str, Any] = field(default_factory=dict)
    """The model's scalars (whisper: avg_logprob, no_speech_prob, compression_ratio, temperature)."""
    tokens: list[int] = field(default_factory=list)
    error: str | None = None
    """The error code when this segment alone could not be recognised (its text is empty)."""


@dataclass(frozen=True)
class FileTranscript:
    segments: list[Segment]
    duration_s: float
    """Length of the decoded audio."""

    @property
    def text(self) -> str:
        return join([s.text for s in self.segments])

    @property
    def language(self) -> str | None:
        """The language of most of the recognised speech (by segment length)."""
        spoken: collections.Counter[str] = collections.Counter()
        for s in self.segments:
            if s.language and s.text:
                spoken[s.language] += s.end_ms - s.start_ms
        return spoken.most_common(1)[0][0] if spoken else None

    @property
    def words(self) -> list[Word]:
        return [w for s in self.segments for w in s.words or ()]


def segment_settings(vad: VadConfig, files: FilesConfig, max_item_s: float) -> EndpointerSettings:
    """The endpointer of file jobs: the live VAD settings, with segments up to the model's window."""
    longest_ms = int(min(files.max_segment_s, max_item_s) * 1000)
    return EndpointerSettings.from_config(vad, max_segment_ms=max(longest_ms, vad.endpoint_ms + 2 * vad.frame_ms))


class FileJob:
    def __init__(
        self,
        batcher: MicroBatcher,
        settings: EndpointerSettings,
        files: FilesConfig,
        options: ItemOptions,
        on_segment: Callable[[Segment], None] | None = None,
        job_id: str | None = None,
    ) -> None:
        """``on_segment`` is called on the event loop with each segment, in order, as soon as
        it and every earlier one are done (for streaming responses and progress)."""
        self.id = job_id or f"file-{uuid.uuid4().hex[:12]}"
        self.batcher = batcher
        self.settings = settings
        self.files = files
        self.options = options
        self.on_segment = on_segment
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: collections.deque[tuple[SegmentEnded, asyncio.Future]] = collections.deque()
        self._done: list[Segment] = []
        self._waiting_s = 0.0  # this job's audio handed to the batcher and not yet back
        self._cond = threading.Condition()
        self._cancelled = False
        self._all_done: asyncio.Event | None = None

    async def run(self, source: str | Path | BinaryIO, executor: Executor | None = None) -> FileTranscript:
        """Transcribe ``source`` (a path or a binary file object). Raises FileError when the
        file as a whole cannot be transcribed; a segment that fails alone is kept as an empty
        segment with its ``error``. Cancelling the task cancels the job's queued work."""
        self._loop = asyncio.get_running_loop()
        self._all_done = asyncio.Event()
        try:
            duration_ms = await self._loop.run_in_executor(executor, self._produce, source)
            await self._settled()
        except AudioTooLong as e:
            raise FileError("too_long", str(e)) from None
        except AudioFormatError as e:
            raise FileError("bad_file", str(e)) from None
        finally:
            self.cancel()  # nothing of this job stays queued, whatever ended it
        failed = [s for s in self._done if s.error]
        if self._done and len(failed) == len(self._done) and failed[0].error in ("overloaded", "model_unavailable"):
            raise FileError(failed[0].error, "the model is unavailable; try again later")
        return FileTranscript(list(self._done), duration_ms / 1000.0)

    def cancel(self) -> None:
        """Stop decoding and drop whatever of this job still waits for the model."""
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()
        self.batcher.cancel_session(self.id)

    # ------------------------------------------------------------------ decoding thread
    def _produce(self, source: str | Path | BinaryIO) -> int:
        """Decode, endpoint and hand over segments (worker thread); returns the duration in ms."""
        endpointer = Endpointer(self.settings)
        for chunk in iter_file(source, self.files.max_audio_s):
            if self._cancelled:
                break
            for event in endpointer.feed(chunk):
                self._hand_over(event)
        for event in endpointer.flush():
            self._hand_over(event)
        return endpointer.stream_ms

    def _hand_over(self, event: object) -> None:
        if not isinstance(event, SegmentEnded):
            return
        seconds = len(event.audio) / 16000.0
        with self._cond:
            # Bounded memory: wait while enough of this file is already queued for the model
            # (one segment always goes, so a segment longer than the bound cannot deadlock).
            while self._waiting_s > 0 and self._waiting_s + seconds > self.files.max_pending_audio_s and not self._cancelled:
                self._cond.wait()
            if self._cancelled:
                return
            self._waiting_s += seconds
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._submit, event)

    # ------------------------------------------------------------------ event loop
    def _submit(self, event: SegmentEnded) -> None:
        if self._cancelled:
            self._returned(len(event.audio) / 16000.0)
            return
        fut = self.batcher.submit(event.audio, self.options, Kind.FILE, self.id)
        self._pending.append((event, fut))
        fut.add_done_callback(lambda _f: self._on_result(len(event.audio) / 16000.0))

    def _returned(self, seconds: float) -> None:
        with self._cond:
            self._waiting_s -= seconds
            self._cond.notify_all()

    def _on_result(self, seconds: float) -> None:
        self._returned(seconds)
        while self._pending and self._pending[0][1].done():
            event, fut = self._pending.popleft()
            segment = self._segment(event, fut)
            if segment is None:
                continue
            self._done.append(segment)
            if self.on_segment is not None:
                self.on_segment(segment)
        if not self._pending and self._all_done is not None:
            self._all_done.set()

    async def _settled(self) -> None:
        """Wait for every handed-over segment (all were submitted before the decode returned:
        their call_soon_threadsafe callbacks ran before its future's)."""
        assert self._all_done is not None
        if self._pending:
            self._all_done.clear()
            await self._all_done.wait()

    def _segment(self, event: SegmentEnded, fut: asyncio.Future) -> Segment | None:
        index = len(self._done)
        if fut.cancelled():
            return None
        exc = fut.exception()
        if exc is not None:
            code, _ = segment_failure(exc, f"file job {self.id}: segment at {event.start_ms} ms")
            return Segment(index, event.start_ms, event.end_ms, "", error=code)
        t: Transcript = fut.result()
        fields = result_fields(t)
        language = fields.pop("language", None)
        tokens = t.fields.get("tokens")
        return Segment(index, event.start_ms, event.end_ms, t.text, language,
                       stream_words(t, event.start_ms, event.end_ms) if self.options.words else None,
                       fields, list(tokens) if isinstance(tokens, (list, tuple)) else [])
