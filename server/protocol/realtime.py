"""OpenAI's Realtime API, transcription sessions (``/v1/realtime?intent=transcription``): a pure codec.

Clients send JSON events (``transcription_session.update`` in the beta form, ``session.update``
with ``session.type == "transcription"`` in the GA form, ``input_audio_buffer.append`` with
base64 audio, ``input_audio_buffer.commit`` and ``input_audio_buffer.clear``); the server
answers with events that each carry a unique ``event_id``. This module has three parts, none
of which touches a socket:

- parsing client events (``parse_event``) and applying a session update to the connection's
  settings (``apply_update``), which also maps them onto a dialect-neutral ``StreamConfig``
  (``stream_config``) with the native protocol's validation;
- building server events (``session_event``, ``error``, ...);
- ``Turns``: the mapping of a Chorus session's segments onto Realtime *items*. With server
  VAD each segment is one item, committed when the endpointer ends it; with
  ``turn_detection: null`` an item is all the audio between two commits, however many
  segments the endpointer cut it into. Text deltas are append-only increments of the
  session's re-decoded partials (LocalAgreement-2, ``server.protocol.funasr.OnlineText``).

User docs: docs/realtime.md.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Collection, Hashable, Mapping

from server.protocol import native
from server.protocol.funasr import OnlineText, joiner
from server.stream_config import StreamConfig

# Beta form (``transcription_session.*`` events, ``input_audio_format``) and GA form
# (``session.*`` events, ``audio.input.format``): answers use the form the client spoke.
BETA, GA = "beta", "ga"
FORMATS = {"pcm16": ("pcm_s16le", 24000), "g711_ulaw": ("mulaw", 8000), "g711_alaw": ("alaw", 8000)}
_GA_FORMATS = {"audio/pcm": "pcm16", "audio/pcmu": "g711_ulaw", "audio/pcma": "g711_alaw"}
_GA_NAMES = {v: k for k, v in _GA_FORMATS.items()}
PCM_RATE = 24000  # OpenAI's PCM is 24 kHz mono little-endian; no other rate is accepted
# The native protocol's bounds on a client's endpointing (silence_duration_ms is clamped to them).
MIN_SILENCE_MS, MAX_SILENCE_MS = 100, 5000
# Manual commits: the endpointer still cuts at this much silence (the longest a client may
# set), which only splits an item into several segments; it never commits one.
MANUAL_ENDPOINTING_MS = MAX_SILENCE_MS
# OpenAI refuses to commit less than this much audio.
MIN_COMMIT_MS = 100
# Client strings echoed back (model, prompt, event_id) are cut to these many characters.
_ECHO_CHARS = 40
_NAME_CHARS = 128
_PROMPT_CHARS = 4096
_NOISE_TYPES = ("near_field", "far_field")
CLIENT_EVENTS = ("transcription_session.update", "session.update", "input_audio_buffer.append",
                 "input_audio_buffer.commit", "input_audio_buffer.clear")
# Events of conversation sessions: a transcription session has no use for them.
_CONVERSATION_EVENTS = ("response.create", "response.cancel", "conversation.item.create", "conversation.item.delete",
                        "conversation.item.retrieve", "conversation.item.truncate", "output_audio_buffer.clear")


class RealtimeError(Exception):
    """A client event that cannot be used; sent back as an ``error`` event."""

    def __init__(self, code: str, message: str, param: str | None = None, event_id: str | None = None,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.param = param
        self.event_id = event_id
        self.kind = kind


# ---------------------------------------------------------------------- settings


@dataclass(frozen=True)
class TurnDetection:
    """``server_vad``; ``threshold`` is kept for the session object only (webrtcvad has no
    such knob), ``prefix_padding_ms`` is the server's pre-roll (not settable per session)."""

    silence_duration_ms: int = 500
    threshold: float = 0.5
    prefix_padding_ms: int = 300


@dataclass(frozen=True)
class RealtimeSettings:
    """One connection's transcription settings, as the session object reports them."""

    audio_format: str = "pcm16"  # a key of FORMATS
    model: str | None = None  # echoed; every name maps to the server's one model
    language: str | None = None  # None: the server's default language
    prompt: str = ""  # echoed; the runner has no prompt support
    turn_detection: TurnDetection | None = TurnDetection()  # None: the client commits
    noise_reduction: str | None = None  # echoed; Chorus does no noise reduction
    include: tuple[str, ...] = ()

    @property
    def encoding(self) -> str:
        return FORMATS[self.audio_format][0]

    @property
    def sample_rate(self) -> int:
        return FORMATS[self.audio_format][1]


def stream_config(s: RealtimeSettings, default_language: str, languages: Collection[str] | None,
                  max_segment_ms_limit: int, form: str = GA) -> StreamConfig:
    """The settings as a StreamConfig, validated as the native protocol validates its own
    (``form``: whose field path an unsupported language's error names)."""
    manual = s.turn_detection is None
    fields: dict[str, Any] = {
        "sample_rate": s.sample_rate,
        "encoding": s.encoding,
        "endpointing_ms": MANUAL_ENDPOINTING_MS if manual else s.turn_detection.silence_duration_ms,
        # Manual mode: nothing is shown before a commit, so partials would be model time wasted.
        "interim_results": not manual,
    }
    if s.language:
        fields["language"] = s.language
    try:
        return native.build_config(fields, default_language=default_language,
                                   max_segment_ms_limit=max_segment_ms_limit, languages=languages)
    except native.ProtocolError as e:
        if not s.language:  # the server's default language: checked when the model loaded
            raise RealtimeError("invalid_value", e.message, kind="server_error") from None
        param = ("session.input_audio_transcription" if form == BETA else "session.audio.input.transcription") + ".language"
        raise RealtimeError("unsupported_language", e.message, param) from None


# ---------------------------------------------------------------------- client events


@dataclass(frozen=True)
class SessionUpdate:
    event_id: str | None
    form: str  # BETA or GA
    session: Mapping[str, Any]


@dataclass(frozen=True)
class Append:
    event_id: str | None
    audio: bytes


@dataclass(frozen=True)
class Commit:
    event_id: str | None


@dataclass(frozen=True)
class Clear:
    event_id: str | None


ClientEvent = SessionUpdate | Append | Commit | Clear


def parse_event(text: str) -> ClientEvent:
    """One client text message; a RealtimeError (with the event's ``event_id`` when it had one)
    for anything that is not a usable event."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        raise RealtimeError("invalid_json", "events must be JSON objects") from None
    if not isinstance(obj, dict):
        raise RealtimeError("invalid_json", f"expected a JSON object, got {_kind(obj)}")
    event_id = obj.get("event_id")
    event_id = _sendable(event_id)[:_NAME_CHARS] if isinstance(event_id, str) else None
    kind = obj.get("type")
    try:
        if kind in ("transcription_session.update", "session.update"):
            session = obj.get("session", {})
            if not isinstance(session, dict):
                raise RealtimeError("invalid_type", f"session must be an object, got {_kind(session)}", "session")
            return SessionUpdate(event_id, BETA if kind == "transcription_session.update" else GA, session)
        if kind == "input_audio_buffer.append":
            audio = obj.get("audio")
            if not isinstance(audio, str):
                raise RealtimeError("invalid_type", f"audio must be a base64 string, got {_kind(audio)}", "audio")
            try:
                return Append(event_id, base64.b64decode(audio, validate=True))
            except (binascii.Error, ValueError):
                raise RealtimeError("invalid_base64", "audio is not valid base64", "audio") from None
        if kind == "input_audio_buffer.commit":
            return Commit(event_id)
        if kind == "input_audio_buffer.clear":
            return Clear(event_id)
    except RealtimeError as e:
        e.event_id = event_id
        raise
    if isinstance(kind, str) and kind in _CONVERSATION_EVENTS:
        raise RealtimeError("unsupported_event", f"{kind} is not available in a transcription session", "type", event_id)
    raise RealtimeError("unknown_event", f"unknown event type {_echo(kind)}; expected one of {', '.join(CLIENT_EVENTS)}",
                        "type", event_id)


def apply_update(current: RealtimeSettings, update: SessionUpdate) -> RealtimeSettings:
    """``current`` with the fields the update gives (nested objects are merged; unknown fields
    are ignored, so that clients written for newer OpenAI sessions still connect). Raises
    RealtimeError, with the field's path as ``param``, for a value that cannot be used."""
    s = update.session
    try:
        if update.form == BETA:
            return _apply(current, s, "session.", s.get("input_audio_format", _ABSENT), "input_audio_transcription",
                          "turn_detection", "input_audio_noise_reduction")
        if "type" in s and s["type"] != "transcription":
            raise RealtimeError("unsupported_session_type", f"session.type is {_echo(s['type'])}; only \"transcription\" "
                                "sessions are served here", "session.type")
        audio = _object(s, "audio", "session.") or {}
        audio_in = _object(audio, "input", "session.audio.") or {}
        fmt = _ga_format(audio_in["format"]) if "format" in audio_in else _ABSENT
        return _apply(current, {**audio_in, **({"include": s["include"]} if "include" in s else {})},
                      "session.audio.input.", fmt, "transcription", "turn_detection", "noise_reduction")
    except RealtimeError as e:
        e.event_id = update.event_id
        raise


_ABSENT: Any = object()


def _apply(cur: RealtimeSettings, obj: Mapping, prefix: str, fmt: Any, transcription_key: str,
           turn_key: str, noise_key: str) -> RealtimeSettings:
    changes: dict[str, Any] = {}
    if fmt is not _ABSENT and fmt is not None:
        # Only the beta form gets here unchecked (_ga_format has mapped the GA one already).
        if not isinstance(fmt, str) or fmt not in FORMATS:
            raise RealtimeError("unsupported_format", f"input_audio_format {_echo(fmt)} is not supported; use "
                                f"{', '.join(FORMATS)}", prefix + "input_audio_format")
        changes["audio_format"] = fmt
    tr = _object(obj, transcription_key, prefix)
    if tr:
        where = prefix + transcription_key + "."
        for key, limit in (("model", _NAME_CHARS), ("language", _NAME_CHARS), ("prompt", _PROMPT_CHARS)):
            if key in tr:
                value = tr[key]
                if value is not None and not isinstance(value, str):
                    raise RealtimeError("invalid_type", f"{key} must be a string, got {_kind(value)}", where + key)
                if value and key == "language":
                    value = value.strip().lower()
                value = _sendable(value)[:limit] if value else None
                changes[key] = value or ("" if key == "prompt" else None)
    if turn_key in obj:
        changes["turn_detection"] = _turn_detection(cur.turn_detection, obj[turn_key], prefix + turn_key)
    if noise_key in obj:
        nr = obj[noise_key]
        if nr is not None and (not isinstance(nr, dict) or nr.get("type", "near_field") not in _NOISE_TYPES):
            raise RealtimeError("invalid_value", "noise reduction must be null or {\"type\": \"near_field\" | "
                                "\"far_field\"}", prefix + noise_key)
        changes["noise_reduction"] = None if nr is None else nr.get("type", "near_field")
    if "include" in obj:
        inc = obj["include"]
        if inc is not None and (not isinstance(inc, list) or not all(isinstance(x, str) for x in inc)):
            raise RealtimeError("invalid_type", "include must be a list of strings", prefix.split(".")[0] + ".include")
        changes["include"] = tuple(_sendable(x)[:_NAME_CHARS] for x in (inc or ())[:8])
    return dataclasses.replace(cur, **changes) if changes else cur


def _ga_format(fmt: Any) -> str | None:
    if fmt is None:
        return None
    where = "session.audio.input.format"
    if not isinstance(fmt, dict):
        raise RealtimeError("invalid_type", f"format must be an object, got {_kind(fmt)}", where)
    kind = fmt.get("type", "audio/pcm")
    name = _GA_FORMATS.get(kind) if isinstance(kind, str) else None
    if name is None:
        raise RealtimeError("unsupported_format", f"audio format {_echo(fmt.get('type'))} is not supported; use "
                            f"{', '.join(_GA_FORMATS)}", where + ".type")
    rate = fmt.get("rate")
    if name == "pcm16" and rate is not None and (not _is_number(rate) or rate != PCM_RATE):
        raise RealtimeError("unsupported_format", f"audio/pcm is 24000 Hz only, got rate {_echo(rate)}", where + ".rate")
    return name


def _turn_detection(cur: TurnDetection | None, td: Any, where: str) -> TurnDetection | None:
    if td is None:
        return None
    if not isinstance(td, dict):
        raise RealtimeError("invalid_type", f"turn_detection must be an object or null, got {_kind(td)}", where)
    kind = td.get("type", "server_vad")
    if kind not in ("server_vad", "semantic_vad"):
        raise RealtimeError("invalid_value", f"turn_detection.type must be \"server_vad\" (or \"semantic_vad\", served "
                            f"as server_vad), got {_echo(kind)}", where + ".type")
    out = cur or TurnDetection()
    if "silence_duration_ms" in td and td["silence_duration_ms"] is not None:
        v = td["silence_duration_ms"]
        if not _is_number(v) or v < 0:
            raise RealtimeError("invalid_value", f"silence_duration_ms must be a number of ms, got {_echo(v)}",
                                where + ".silence_duration_ms")
        # Clamped, not refused: OpenAI accepts any; the session object reports the value used.
        out = dataclasses.replace(out, silence_duration_ms=int(min(max(v, MIN_SILENCE_MS), MAX_SILENCE_MS)))
    if "threshold" in td and td["threshold"] is not None:
        v = td["threshold"]
        if not _is_number(v) or not 0.0 <= v <= 1.0:
            raise RealtimeError("invalid_value", f"threshold must be from 0.0 to 1.0, got {_echo(v)}", where + ".threshold")
        out = dataclasses.replace(out, threshold=float(v))
    if "prefix_padding_ms" in td and td["prefix_padding_ms"] is not None:
        v = td["prefix_padding_ms"]
        if not _is_number(v) or v < 0:
            raise RealtimeError("invalid_value", f"prefix_padding_ms must be a number of ms, got {_echo(v)}",
                                where + ".prefix_padding_ms")
    return out


def _object(obj: Mapping, key: str, prefix: str) -> dict | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, dict):
        raise RealtimeError("invalid_type", f"{key} must be an object, got {_kind(value)}", prefix + key)
    return value


def _is_number(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    # An int of any size is finite (math.isfinite would overflow converting a huge one).
    return isinstance(v, int) or (isinstance(v, float) and math.isfinite(v))


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _echo(value: Any) -> str:
    """A client's value for an error message, bounded whatever its size."""
    if isinstance(value, str):
        text = repr(value[:_ECHO_CHARS])[:2 * _ECHO_CHARS]
        return text + ("..." if len(value) > _ECHO_CHARS else "")
    if value is None or isinstance(value, bool) or (isinstance(value, (int, float)) and abs(value) < 1e15):
        return json.dumps(value)
    return _kind(value)


def _sendable(text: str) -> str:
    """Without lone surrogates (JSON escapes make them): echoed strings must encode as UTF-8."""
    return text.encode("utf-8", "replace").decode("utf-8")


# ---------------------------------------------------------------------- server events


class Ids:
    """Unique ids for one connection: a random prefix (given by the adapter) and a counter."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._n = 0

    def next(self, kind: str) -> str:
        self._n += 1
        return f"{kind}_{self.prefix}{self._n:x}"


def _dumps(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _transcription(s: RealtimeSettings) -> dict[str, Any]:
    return {"model": s.model, "language": s.language, "prompt": s.prompt}


def _turns(s: RealtimeSettings, vad_prefix_ms: int) -> dict[str, Any] | None:
    td = s.turn_detection
    if td is None:
        return None
    return {"type": "server_vad", "threshold": td.threshold, "prefix_padding_ms": vad_prefix_ms,
            "silence_duration_ms": td.silence_duration_ms}


def session_object(s: RealtimeSettings, session_id: str, form: str, prefix_padding_ms: int) -> dict[str, Any]:
    """The session as OpenAI's session objects show it, in the client's form; the values are
    the ones in effect (``prefix_padding_ms``: the server's pre-roll)."""
    noise = {"type": s.noise_reduction} if s.noise_reduction else None
    if form == BETA:
        return {"id": session_id, "object": "realtime.transcription_session", "input_audio_format": s.audio_format,
                "input_audio_transcription": _transcription(s), "turn_detection": _turns(s, prefix_padding_ms),
                "input_audio_noise_reduction": noise, "include": list(s.include), "modalities": ["text"]}
    fmt: dict[str, Any] = {"type": _GA_NAMES[s.audio_format]}
    if s.audio_format == "pcm16":
        fmt["rate"] = PCM_RATE
    return {"type": "transcription", "id": session_id, "object": "realtime.transcription_session",
            "audio": {"input": {"format": fmt, "transcription": _transcription(s),
                                "turn_detection": _turns(s, prefix_padding_ms), "noise_reduction": noise}},
            "include": list(s.include)}


def session_event(event_id: str, kind: str, s: RealtimeSettings, session_id: str, form: str, prefix_padding_ms: int) -> str:
    """``kind``: "created" or "updated"."""
    name = ("transcription_session." if form == BETA else "session.") + kind
    return _dumps({"type": name, "event_id": event_id, "session": session_object(s, session_id, form, prefix_padding_ms)})


def error(event_id: str, e: RealtimeError) -> str:
    return _dumps({"type": "error", "event_id": event_id, "error": {
        "type": e.kind, "code": e.code, "message": e.message, "param": e.param, "event_id": e.event_id}})


def speech_started(event_id: str, item_id: str, audio_start_ms: int) -> str:
    return _dumps({"type": "input_audio_buffer.speech_started", "event_id": event_id, "audio_start_ms": audio_start_ms,
                   "item_id": item_id})


def speech_stopped(event_id: str, item_id: str, audio_end_ms: int) -> str:
    return _dumps({"type": "input_audio_buffer.speech_stopped", "event_id": event_id, "audio_end_ms": audio_end_ms,
                   "item_id": item_id})


def committed(event_id: str, item_id: str, previous_item_id: str | None) -> str:
    return _dumps({"type": "input_audio_buffer.committed", "event_id": event_id, "previous_item_id": previous_item_id,
                   "item_id": item_id})


def cleared(event_id: str) -> str:
    return _dumps({"type": "input_audio_buffer.cleared", "event_id": event_id})


def delta(event_id: str, item_id: str, text: str) -> str:
    return _dumps({"type": "conversation.item.input_audio_transcription.delta", "event_id": event_id,
                   "item_id": item_id, "content_index": 0, "delta": text})


def completed(event_id: str, item_id: str, transcript: str, seconds: float) -> str:
    return _dumps({"type": "conversation.item.input_audio_transcription.completed", "event_id": event_id,
                   "item_id": item_id, "content_index": 0, "transcript": transcript,
                   "usage": {"type": "duration", "seconds": round(seconds, 3)}})


def failed(event_id: str, item_id: str, code: str, message: str) -> str:
    return _dumps({"type": "conversation.item.input_audio_transcription.failed", "event_id": event_id,
                   "item_id": item_id, "content_index": 0,
                   "error": {"type": "server_error", "code": code, "message": message, "param": None}})


# ---------------------------------------------------------------------- items


@dataclass(eq=False)
class _Item:
    id: str
    announced: bool = False  # the client knows its id (speech_started or committed): deltas go out at once
    committed: bool = False
    discarded: bool = False  # cleared before its commit: nothing more is said of it
    done: bool = False
    pending: set = field(default_factory=set)  # segments whose final is still to come
    trackers: dict = field(default_factory=dict)  # segment -> OnlineText
    texts: list = field(default_factory=list)  # its segments' finals, in order
    shown: str = ""  # the deltas so far, concatenated
    queued: list = field(default_factory=list)  # deltas held until the client knows the id
    seconds: float = 0.0
    failure: tuple[str, str] | None = None

    @property
    def empty(self) -> bool:
        return not self.pending and not self.texts and self.failure is None


class Turns:
    """Segments of a Chorus session (keyed by any hashable the adapter chooses) -> Realtime
    items and their events. Every method returns the events to send, in order; the adapter
    tells it what the session did (speech started, a partial, a segment cut, a final) and what
    the client asked (commit, clear)."""

    def __init__(self, ids: Ids, vad: bool) -> None:
        self.ids = ids
        self.vad = vad
        self._items: dict[Hashable, _Item] = {}  # segment -> its item, until the segment's final
        self._open: Hashable | None = None  # VAD: the segment whose speech_stopped is still owed
        self._current: _Item | None = None  # manual: the item the next commit commits
        self._previous: str | None = None  # the last committed item, for previous_item_id

    @property
    def speaking(self) -> bool:
        """VAD: a turn is open (a commit would end it)."""
        return self._open is not None

    def speech_started(self, segment: Hashable, start_ms: int) -> list[str]:
        out = self.segment_cut(start_ms)  # segments never overlap: the one before has ended
        if self.vad:
            item = _Item(self.ids.next("item"), announced=True)
            self._open = segment
            out.append(speech_started(self.ids.next("event"), item.id, start_ms))
        else:
            item = self._current = self._current or _Item(self.ids.next("item"))
        item.pending.add(segment)
        item.trackers[segment] = OnlineText()
        self._items[segment] = item
        return out

    def poll(self, open_segment: Hashable | None, now_ms: int) -> list[str]:
        """After audio was fed: ``open_segment`` is the session's open segment now (None if none)."""
        if self._open is None or open_segment == self._open:
            return []
        return self.segment_cut(now_ms)

    def segment_cut(self, end_ms: int) -> list[str]:
        """VAD: the open segment has ended (the endpointer cut it): its turn is committed."""
        if self._open is None:
            return []
        item = self._items.get(self._open)
        self._open = None
        if item is None or item.discarded:
            return []
        return [speech_stopped(self.ids.next("event"), item.id, end_ms), *self._commit(item)]

    def partial(self, segment: Hashable, text: str) -> list[str]:
        item = self._items.get(segment)
        if item is None or item.discarded:
            return []
        return self._delta(item, item.trackers[segment].partial(text))

    def final(self, segment: Hashable, text: str, seconds: float, cut_ms: int,
              failure: tuple[str, str] | None = None) -> list[str]:
        """A segment's final (``failure``: (code, message) when it could not be recognised)."""
        out = self.segment_cut(cut_ms) if segment == self._open else []
        item = self._items.pop(segment, None)
        if item is None:
            return out
        tracker = item.trackers.pop(segment)
        item.pending.discard(segment)
        if item.discarded:
            return out
        item.seconds += seconds
        if failure is not None:
            item.failure = failure
        elif text:
            out += self._delta(item, tracker.final(text))
            item.texts.append(text)
        return out + self._complete(item)

    def commit(self) -> list[str]:
        """Manual mode: the client commits the buffer (its audio is already finalised)."""
        item = self._current or _Item(self.ids.next("item"))
        self._current = None
        return self._commit(item)

    def clear(self) -> list[str]:
        """Drop the turn not yet committed: its text is never sent (the adapter finalises the
        session's open segment, whose final is then ignored)."""
        item = self._items.get(self._open) if self.vad and self._open is not None else self._current
        if item is not None:
            item.discarded = True
        self._open = None
        self._current = None
        return [cleared(self.ids.next("event"))]

    def set_vad(self, vad: bool) -> list[str]:
        """Turn detection switched (after the adapter stopped the old session): a manual turn
        that holds speech is committed rather than lost."""
        out: list[str] = []
        if vad and not self.vad and self._current is not None:
            if not self._current.empty:
                out = self.commit()
            self._current = None
        self.vad = vad
        return out

    def flush(self) -> list[str]:
        """The connection ends (drain, session limit): commit what a manual turn holds."""
        if self.vad or self._current is None or self._current.empty:
            return []
        return self.commit()

    # ------------------------------------------------------------------ internals
    def _commit(self, item: _Item) -> list[str]:
        item.committed = item.announced = True
        out = [committed(self.ids.next("event"), item.id, self._previous)]
        self._previous = item.id
        out += [delta(self.ids.next("event"), item.id, d) for d in item.queued]
        item.queued = []
        return out + self._complete(item)

    def _delta(self, item: _Item, text: str) -> list[str]:
        if not text:
            return []
        text = joiner(item.shown, text) + text
        item.shown += text
        if not item.announced:
            item.queued.append(text)
            return []
        return [delta(self.ids.next("event"), item.id, text)]

    def _complete(self, item: _Item) -> list[str]:
        if not item.committed or item.pending or item.done:
            return []
        item.done = True
        if item.failure is not None:
            # The transcript would be missing words: say so rather than send part of it.
            return [failed(self.ids.next("event"), item.id, *item.failure)]
        transcript = ""
        for t in item.texts:
            transcript += joiner(transcript, t) + t
        return [completed(self.ids.next("event"), item.id, transcript, item.seconds)]


__all__ = ["Append", "Clear", "Commit", "Ids", "RealtimeError", "RealtimeSettings", "SessionUpdate", "TurnDetection",
           "Turns", "apply_update", "parse_event", "stream_config"]
