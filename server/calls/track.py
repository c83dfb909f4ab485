"""One speaker of a call as a session's output: session results -> call events.

A telephony bridge gives each track (Twilio's inbound/outbound, AudioSocket's one
direction, a stereo stream's caller/callee channel) its own Session, with a
``TrackOutput`` as that session's SessionOutput. Times are put on the call's clock:
the session counts the audio it was fed, the call counts from the stream's start, and
the two differ by where the track's first audio fell and by any gap the bridge
reported (Twilio's media timestamps) but did not fill with silence.
"""

from __future__ import annotations

import bisect
import logging
from typing import TYPE_CHECKING, Any, Callable

from server.protocol.native import result_extras, word_dicts

if TYPE_CHECKING:
    from server.calls.hub import CallStream
    from server.runners.base import Word

log = logging.getLogger(__name__)


class TrackOutput:
    """Implements SessionOutput for one track of a call."""

    def __init__(self, stream: "CallStream", track: str, on_error: Callable[[str, str, bool], None] | None = None,
                 offset_ms: int = 0) -> None:
        self.stream = stream
        self.track = track
        self._on_error = on_error
        # (session ms from which it applies, call ms minus session ms), ascending.
        self._at: list[int] = [0]
        self._offset: list[int] = [offset_ms]

    def wants_partials(self) -> bool:
        """For Session(partials_wanted=...): whether anyone reads this call's partials now."""
        return self.stream.hub.wants_partials(self.stream.call_id)

    # ------------------------------------------------------------------ clock
    def skip(self, session_ms: int, gap_ms: int) -> None:
        """From ``session_ms`` of the session's clock on, the call's clock is ``gap_ms`` further ahead."""
        if gap_ms <= 0:
            return
        if session_ms <= self._at[-1]:
            self._offset[-1] += gap_ms
        else:
            self._at.append(session_ms)
            self._offset.append(self._offset[-1] + gap_ms)

    def call_ms(self, session_ms: int) -> int:
        i = bisect.bisect_right(self._at, session_ms) - 1
        return session_ms + self._offset[max(i, 0)]

    def _times(self, start_ms: int, end_ms: int) -> dict[str, int]:
        return {"start_ms": self.call_ms(start_ms), "end_ms": self.call_ms(end_ms)}

    def _words(self, words: "list[Word] | None") -> list[dict[str, Any]]:
        out = word_dicts(words)
        for w in out:
            w["start_ms"] = self.call_ms(w["start_ms"])
            w["end_ms"] = self.call_ms(w["end_ms"])
        return out

    # ------------------------------------------------------------------ SessionOutput
    def on_speech_started(self, segment_id: int, start_ms: int) -> None:
        self.stream.publish("speech_started", self.track, {"segment_id": segment_id, "start_ms": self.call_ms(start_ms)})

    def on_partial(self, segment_id: int, text: str, start_ms: int, end_ms: int, fields: dict[str, Any],
                   words: "list[Word] | None" = None) -> None:
        event: dict[str, Any] = {"segment_id": segment_id, "text": text, **self._times(start_ms, end_ms)}
        if words is not None:
            event["words"] = self._words(words)
        self.stream.publish("partial", self.track, {**event, **result_extras(fields)})

    def on_final(self, segment_id: int, text: str, start_ms: int, end_ms: int, cut_ms: int, fields: dict[str, Any],
                 words: "list[Word] | None" = None) -> None:
        event = {"segment_id": segment_id, "text": text, **self._times(start_ms, end_ms), "words": self._words(words)}
        self.stream.publish("final", self.track, {**event, **result_extras(fields)})

    def on_error(self, code: str, message: str, fatal: bool) -> None:
        self.stream.publish("error", self.track, {"code": code, "message": message, "fatal": fatal})
        if self._on_error is not None:
            self._on_error(code, message, fatal)
