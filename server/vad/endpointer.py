"""Endpointer: cuts a live 16 kHz stream into speech segments with webrtcvad.

Pure and synchronous (no I/O, no torch): a session feeds it audio and acts on the
events it returns. All positions are on the stream's own audio clock, in ms of
16 kHz audio fed so far, never on wall time, so the same audio always gives the
same events however it is chunked (10 ms or 1 s messages alike).

Semantics
---------
- Audio is classified in frames of ``frame_ms`` by webrtcvad; samples are buffered
  across ``feed()`` calls until a frame is complete.
- A segment *opens* when, within the last ``pre_roll_ms`` of frames, the voiced frames
  add up to ``start_speech_ms``. Its audio starts ``pre_roll_ms`` before the first
  voiced frame of that window, so word onsets are not clipped; the start is clipped at
  the stream start, at the end of the previous segment (segments never overlap), and so
  that no segment is longer than ``max_segment_ms`` (this only bites when ``max_segment_ms``
  is shorter than the pre-roll plus the onset window).
- It is *confirmed* once its voiced frames add up to ``min_speech_ms``: only then is
  ``SpeechStarted`` emitted and a ``segment_id`` given (0, 1, 2, ... over confirmed
  segments only). A segment that ends unconfirmed is dropped without a trace: clicks
  and coughs never become segments and never use up an id.
- It *ends* after ``endpoint_ms`` of continuous non-speech (reason ``"silence"``), when
  one more frame would make it longer than ``max_segment_ms`` (``"max_length"``; if
  the speech goes on, the next segment opens right after and starts where this one
  ended), on ``finalize()`` (``"finalize"``) or at end of stream, ``flush()``
  (``"flush"``).
- ``SegmentEnded.end_ms`` is the end of the last voiced frame plus a tail of
  ``min(endpoint_ms, 200)`` ms, but never past the decision point nor past the audio
  fed; ``audio`` is exactly the samples ``start_ms .. end_ms`` (``16 * (end_ms -
  start_ms)`` of them). ``cut_ms`` is the audio clock when the end was decided: the end
  of the frame that decided it, or ``stream_ms`` for ``finalize``/``flush``. Always
  ``start_ms <= end_ms <= cut_ms``.

Memory is bounded: one buffer holds the open segment (at most ``max_segment_ms``) plus
the pre-roll and the not yet classified samples; when no segment is open the older
audio is dropped. The buffer grows geometrically, so a long segment is not re-copied
on every frame.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import webrtcvad

if TYPE_CHECKING:
    from server.config import VadConfig

SAMPLE_RATE = 16000
SAMPLES_PER_MS = SAMPLE_RATE // 1000
# The tail kept after the last voiced frame: webrtcvad marks the decaying end of a
# word (final fricatives, plosive releases) as non-speech.
MAX_TAIL_MS = 200


@dataclass(frozen=True)
class EndpointerSettings:
    frame_ms: int = 30  # webrtcvad frame: 10, 20 or 30 ms
    aggressiveness: int = 2  # webrtcvad mode 0..3
    pre_roll_ms: int = 300  # audio kept before the speech onset
    start_speech_ms: int = 90  # voiced audio within the pre-roll window that opens a segment
    endpoint_ms: int = 500  # trailing non-speech that ends a segment
    min_speech_ms: int = 250  # voiced audio a segment needs to be confirmed (else dropped)
    max_segment_ms: int = 20000  # longest segment; cut here even mid-speech

    def __post_init__(self) -> None:
        if self.frame_ms not in (10, 20, 30):
            raise ValueError(f"frame_ms must be 10, 20 or 30, got {self.frame_ms}")
        if not 0 <= self.aggressiveness <= 3:
            raise ValueError(f"aggressiveness must be 0..3, got {self.aggressiveness}")
        for name in ("pre_roll_ms", "start_speech_ms", "endpoint_ms", "min_speech_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.max_segment_ms < 2 * self.frame_ms:
            raise ValueError(f"max_segment_ms must be at least two frames, got {self.max_segment_ms}")

    @classmethod
    def from_config(cls, vad: "VadConfig", endpoint_ms: int | None = None,
                    max_segment_ms: int | None = None) -> "EndpointerSettings":
        """Server defaults from ``VadConfig``, with the per-session overrides a client may set."""
        return cls(
            frame_ms=vad.frame_ms,
            aggressiveness=vad.aggressiveness,
            pre_roll_ms=vad.pre_roll_ms,
            start_speech_ms=vad.start_speech_ms,
            endpoint_ms=vad.endpoint_ms if endpoint_ms is None else endpoint_ms,
            min_speech_ms=vad.min_speech_ms,
            max_segment_ms=vad.max_segment_ms if max_segment_ms is None else max_segment_ms,
        )


@dataclass(frozen=True)
class SpeechStarted:
    segment_id: int
    start_ms: int


@dataclass(frozen=True, eq=False)  # eq=False: numpy arrays have no boolean ==
class SegmentEnded:
    segment_id: int
    start_ms: int
    end_ms: int
    cut_ms: int
    audio: np.ndarray  # float32, 16 kHz, exactly start_ms..end_ms
    reason: str  # "silence" | "max_length" | "finalize" | "flush"


Event = SpeechStarted | SegmentEnded


class _Segment:
    """The open segment (absolute sample positions)."""

    __slots__ = ("start", "voiced_frames", "silent_frames", "last_voiced_end", "segment_id")

    def __init__(self, start: int, voiced_frames: int, last_voiced_end: int) -> None:
        self.start = start
        self.voiced_frames = voiced_frames
        self.silent_frames = 0
        self.last_voiced_end = last_voiced_end
        self.segment_id: int | None = None  # set when confirmed


class Endpointer:
    """Speech segmentation of one 16 kHz stream; see the module docstring for the rules."""

    def __init__(self, settings: EndpointerSettings) -> None:
        s = settings
        self.settings = s
        self._vad = webrtcvad.Vad(s.aggressiveness)
        self._frame = s.frame_ms * SAMPLES_PER_MS
        self._frame_bytes = 2 * self._frame
        self._pre_roll = s.pre_roll_ms * SAMPLES_PER_MS
        self._tail = min(s.endpoint_ms, MAX_TAIL_MS) * SAMPLES_PER_MS
        self._max_len = s.max_segment_ms * SAMPLES_PER_MS
        self._start_frames = max(1, math.ceil(s.start_speech_ms / s.frame_ms))
        self._confirm_frames = max(1, math.ceil(s.min_speech_ms / s.frame_ms))
        self._endpoint_frames = max(1, math.ceil(s.endpoint_ms / s.frame_ms))
        window = max(self._start_frames, s.pre_roll_ms // s.frame_ms)
        # Onset window: (frame index, voiced) of the latest frames while no segment is open.
        self._window: collections.deque[tuple[int, bool]] = collections.deque(maxlen=window)
        self._window_voiced = 0
        # Audio needed when idle: the window plus the pre-roll before it (and one frame spare).
        self._idle_keep = (window + 1) * self._frame + self._pre_roll
        self._min_capacity = max(SAMPLE_RATE * 2, 4 * self._idle_keep)
        self._buf = np.zeros(self._min_capacity, dtype=np.float32)
        self._base = 0  # absolute sample index of _buf[0]
        self._fed = 0  # samples fed
        self._frames = 0  # frames classified
        self._segment: _Segment | None = None
        self._next_id = 0
        self._prev_end = 0  # end of the last emitted segment (absolute samples)
        self._flushed = False

    # ------------------------------------------------------------------ public API
    @property
    def stream_ms(self) -> int:
        """The audio clock: ms of audio fed so far."""
        return self._fed // SAMPLES_PER_MS

    def feed(self, samples: np.ndarray) -> list[Event]:
        """Add float32 16 kHz samples (any length); returns the events they caused, in order."""
        if self._flushed:
            raise RuntimeError("Endpointer.feed() after flush()")
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        if not len(x):
            return []
        self._append(x)
        events: list[Event] = []
        first, last = self._frames, self._fed // self._frame
        if last > first:
            pcm = self._pcm_bytes(first * self._frame, last * self._frame)
            fb = self._frame_bytes
            for i in range(last - first):
                voiced = self._vad.is_speech(pcm[i * fb:(i + 1) * fb], SAMPLE_RATE)
                self._frames += 1
                self._on_frame(first + i, voiced, self._frames * self._frame, events)
        return events

    def finalize(self) -> list[SegmentEnded]:
        """End the open segment now (client request); an unconfirmed one is dropped."""
        return self._close_segment("finalize", self._fed_aligned())

    def flush(self) -> list[Event]:
        """End of stream: classify the partial last frame, then end the open segment."""
        if self._flushed:
            return []
        events: list[Event] = []
        done = self._frames * self._frame
        if self._fed > done:
            pad = np.zeros(self._frame, dtype=np.float32)
            pad[:self._fed - done] = self._view(done, self._fed)
            voiced = self._vad.is_speech(_to_pcm16(pad).tobytes(), SAMPLE_RATE)
            self._frames += 1
            self._on_frame(self._frames - 1, voiced, self._fed_aligned(), events)
        events.extend(self._close_segment("flush", self._fed_aligned()))
        self._flushed = True
        return events

    @property
    def trailing_silence_ms(self) -> int:
        """How long the open segment has been silent (0 without one, or while speech goes on)."""
        seg = self._segment
        return 0 if seg is None else seg.silent_frames * self.settings.frame_ms

    def open_segment(self) -> tuple[int, int, np.ndarray] | None:
        """(segment_id, start_ms, audio so far) of the confirmed open segment, else None.

        The audio is a read-only view of the internal buffer up to the last classified
        frame, valid until the next call that feeds or ends; copy it to keep it.
        """
        seg = self._segment
        if seg is None or seg.segment_id is None:
            return None
        view = self._view(seg.start, self._frames * self._frame)
        view.flags.writeable = False
        return seg.segment_id, seg.start // SAMPLES_PER_MS, view

    # ------------------------------------------------------------------ frame logic
    def _on_frame(self, index: int, voiced: bool, frame_end: int, events: list[Event]) -> None:
        seg = self._segment
        if seg is None:
            self._push_window(index, voiced)
            if self._window_voiced < self._start_frames:
                return
            onset = next(i for i, v in self._window if v) * self._frame
            # Clipped so that the check below cannot find it already longer than max_segment_ms
            # (pre-roll + onset window > max_segment_ms would otherwise give an over-long segment).
            start = max(onset - self._pre_roll, self._prev_end, 0, frame_end + self._frame - self._max_len)
            seg = self._segment = _Segment(start, self._window_voiced, frame_end)
        elif voiced:
            seg.voiced_frames += 1
            seg.silent_frames = 0
            seg.last_voiced_end = frame_end
        else:
            seg.silent_frames += 1

        if seg.segment_id is None and seg.voiced_frames >= self._confirm_frames:
            seg.segment_id = self._next_id
            self._next_id += 1
            events.append(SpeechStarted(seg.segment_id, seg.start // SAMPLES_PER_MS))
        if seg.silent_frames >= self._endpoint_frames:
            events.extend(self._close_segment("silence", frame_end))
        elif frame_end + self._frame - seg.start > self._max_len:
            events.extend(self._close_segment("max_length", frame_end))

    def _push_window(self, index: int, voiced: bool) -> None:
        if len(self._window) == self._window.maxlen and self._window[0][1]:
            self._window_voiced -= 1
        self._window.append((index, voiced))
        self._window_voiced += voiced

    def _close_segment(self, reason: str, cut: int) -> list[SegmentEnded]:
        seg = self._segment
        if seg is None:
            return []
        self._segment = None
        self._window.clear()
        self._window_voiced = 0
        if seg.segment_id is None:
            return []  # never confirmed: a click or a cough
        end = max(seg.start, min(seg.last_voiced_end + self._tail, cut, self._fed_aligned()))
        self._prev_end = end
        audio = self._view(seg.start, end).copy()
        ms = SAMPLES_PER_MS
        return [SegmentEnded(seg.segment_id, seg.start // ms, end // ms, cut // ms, audio, reason)]

    # ------------------------------------------------------------------ audio buffer
    def _fed_aligned(self) -> int:
        """Samples fed, rounded down to a whole ms (segment bounds are whole ms)."""
        return self._fed - self._fed % SAMPLES_PER_MS

    def _view(self, start: int, end: int) -> np.ndarray:
        return self._buf[start - self._base:end - self._base]

    def _pcm_bytes(self, start: int, end: int) -> bytes:
        return _to_pcm16(self._view(start, end)).tobytes()

    def _append(self, x: np.ndarray) -> None:
        n = len(x)
        cap = len(self._buf)
        if self._fed - self._base + n > cap:
            self._make_room(n)
        at = self._fed - self._base
        self._buf[at:at + n] = x
        self._fed += n

    def _make_room(self, n: int) -> None:
        """Drop audio no segment can still need; grow (x1.5) or shrink the buffer if useful."""
        if self._segment is not None:
            keep_from = self._segment.start
        else:
            keep_from = max(0, self._frames * self._frame - self._idle_keep)
        keep_from = max(keep_from, self._base)
        live = self._fed - keep_from
        needed = live + n
        cap = len(self._buf)
        if needed * 4 > cap * 3:
            # Less than a quarter would be free after compaction: grow, so that a long
            # segment is copied O(log n) times rather than on every append.
            new_cap = max(self._min_capacity, needed * 3 // 2)
        elif self._segment is None and cap > 2 * self._min_capacity and needed * 4 <= self._min_capacity * 3:
            new_cap = self._min_capacity  # give back what a long past segment needed
        else:
            new_cap = cap
        old = self._buf[keep_from - self._base:self._fed - self._base]
        if new_cap != cap:
            self._buf = np.empty(new_cap, dtype=np.float32)
        self._buf[:live] = old  # numpy handles the overlapping in-place move
        self._base = keep_from


def _to_pcm16(x: np.ndarray) -> np.ndarray:
    # Clipped to [-1, 1] before scaling: a huge (finite) float32 sample times 32768 would
    # overflow to inf with a RuntimeWarning; the result is the same either way.
    return np.minimum(np.clip(x, -1.0, 1.0) * np.float32(32768.0), np.float32(32767.0)).astype("<i2")
