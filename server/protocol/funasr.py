"""FunASR's WebSocket dialect (its runtime/docs/websocket_protocol.md): a pure codec.

FunASR clients send a JSON message of settings (``mode``, ``chunk_size``, ``audio_fs``,
``wav_name``, ``hotwords``, ...), raw PCM16 audio in binary messages of any size, and
``{"is_speaking": false}`` at the end of their audio (``"is_end": true`` asks for an
acknowledgement). Results are ``{"mode", "wav_name", "text", "is_final"}`` plus
``timestamp`` (a *string* holding ``[[start_ms, end_ms], ...]``) and ``stamp_sents``, and
FunASR's C++ runtime's sentence fields; ``Results`` decides which carry ``is_final`` true.

The clients in the field are lenient readers but particular about a few things, which
this module keeps:
- ``online`` / ``2pass-online`` messages are *appended* by clients (FunASR's streaming
  model emits only new text per chunk), so they carry new text only; ``OnlineText``
  turns re-decoded partials into append-only increments.
- ``2pass-offline`` replaces the online text of its sentence; ``offline`` ends an
  offline client's wait (FunASR's Python client closes after the first one), so offline
  mode answers once per end of audio with every sentence.
- ``timestamp`` has one pair per word of space-delimited text and one per character of
  CJK text: FunASR's own pages index it that way.
Parsing is tolerant (numbers and booleans as strings, ``chunk_size`` as a list or
"5,10,5", unknown fields ignored); a value that cannot be used is a ``FunasrError``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from server.audio.resample import STANDARD_RATES
from server.runners.base import Word
from server.spacing import CJK, joiner  # noqa: F401 - joiner is part of this codec's API

MODES = ("online", "offline", "2pass")
# Echoed in every result, so bounded.
_WAV_NAME_CHARS = 256
_HOTWORDS_CHARS = 8192
_LANGUAGE_RE = re.compile(r"[a-z-]{2,8}")
# Scripts written without spaces between words (Chinese, Japanese): one timestamp, and one
# agreement unit, per character.
_CJK = CJK
# Punctuation that ends a stamp_sents sentence (FunASR cuts at commas too).
_PUNCT = ",.?!;:，。？！；：、…"
# Marks around words that are not words: quotes and brackets, ASCII and CJK.
_MARKS = "\"'()[]{}“”‘’「」『』（）《》〈〉【】"
_TOKEN_RE = re.compile(rf"\s*(?:[{_CJK}]|[^\s{_CJK}]+)")
_CJK_RE = re.compile(f"[{_CJK}]")


class FunasrError(Exception):
    """A message or setting that cannot be used; ``code`` and ``message`` go to the client."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class FunasrSettings:
    """One connection's settings, as FunASR clients send them (defaults as FunASR's servers)."""

    mode: str = "2pass"
    wav_name: str = "microphone"
    wav_format: str = "pcm"  # "pcm", or (offline mode) a file's extension: the audio is a file to decode
    audio_fs: int = 16000
    chunk_size: tuple[int, int, int] = (5, 10, 5)  # in 60 ms units: look-back, chunk, look-ahead
    chunk_interval: int = 10
    encoder_chunk_look_back: int | None = None  # accepted; only FunASR's streaming Paraformer uses it
    decoder_chunk_look_back: int | None = None
    hotwords: str | None = None
    itn: bool | None = None
    svs_lang: str | None = None  # SenseVoice's language choice; here: any model's
    svs_itn: bool | None = None

    @property
    def is_pcm(self) -> bool:
        return self.wav_format in ("pcm", "")

    @property
    def chunk_ms(self) -> int:
        """How often FunASR's own server would emit online text (chunk_size[1] x 60 ms)."""
        return self.chunk_size[1] * 60


@dataclass(frozen=True)
class ClientMessage:
    settings: FunasrSettings  # the connection's settings with this message applied
    is_speaking: bool | None  # None: not in this message
    is_end: bool
    hotwords_given: bool


# ---------------------------------------------------------------------- client -> server


def parse_message(text: str, current: FunasrSettings) -> ClientMessage:
    """Apply one client text message to the connection's settings."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        raise FunasrError("bad_json", "text messages must be JSON objects") from None
    if not isinstance(obj, dict):
        raise FunasrError("bad_json", f"expected a JSON object, got {type(obj).__name__}")
    changes: dict[str, Any] = {}
    if "mode" in obj and obj["mode"] is not None:
        mode = _string(obj, "mode").strip().lower()
        if mode not in MODES:
            raise FunasrError("bad_config", f"mode must be online, offline or 2pass, got {_echo(obj['mode'])}")
        changes["mode"] = mode
    if "wav_name" in obj and obj["wav_name"] is not None:
        changes["wav_name"] = _string(obj, "wav_name")[:_WAV_NAME_CHARS]
    if "wav_format" in obj and obj["wav_format"] is not None:
        changes["wav_format"] = _string(obj, "wav_format").strip().lower().lstrip(".")[:16]
    if "audio_fs" in obj and obj["audio_fs"] is not None:
        rate = _int(obj, "audio_fs")
        if rate not in STANDARD_RATES:
            raise FunasrError("bad_config", f"audio_fs must be one of {', '.join(map(str, STANDARD_RATES))} "
                                            f"(Hz), got {_echo(obj['audio_fs'])}")
        changes["audio_fs"] = rate
    if "chunk_size" in obj and obj["chunk_size"] is not None:
        changes["chunk_size"] = _chunk_size(obj["chunk_size"])
    if "chunk_interval" in obj and obj["chunk_interval"] is not None:
        changes["chunk_interval"] = _int(obj, "chunk_interval", 1, 1000)
    for key in ("encoder_chunk_look_back", "decoder_chunk_look_back"):
        if key in obj and obj[key] is not None:
            changes[key] = _int(obj, key, -1, 1000)
    hotwords_given = False
    for key in ("hotwords", "hotword"):  # FunASR's Python server reads either spelling
        if key in obj and obj[key] not in (None, ""):
            value = obj[key]
            changes["hotwords"] = _sendable(value if isinstance(value, str) else _json(value))[:_HOTWORDS_CHARS]
            hotwords_given = True
    for key in ("itn", "svs_itn"):
        if key in obj and obj[key] is not None:
            changes[key] = _bool(obj, key)
    if "svs_lang" in obj and obj["svs_lang"] is not None:
        lang = _string(obj, "svs_lang").strip().lower()
        if lang != "auto" and not _LANGUAGE_RE.fullmatch(lang):
            raise FunasrError("bad_config", f"svs_lang must be \"auto\" or a language code such as \"en\", got {_echo(obj['svs_lang'])}")
        changes["svs_lang"] = lang
    is_speaking = _bool(obj, "is_speaking") if obj.get("is_speaking") is not None else None
    is_end = _bool(obj, "is_end") if obj.get("is_end") is not None else False
    settings = dataclasses.replace(current, **changes) if changes else current
    return ClientMessage(settings, is_speaking, is_end, hotwords_given)


def _string(obj: Mapping, key: str) -> str:
    value = obj[key]
    if isinstance(value, str):
        return _sendable(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return _json(value)
    raise FunasrError("bad_config", f"{key} must be a string, got {_echo(value)}")


def _sendable(text: str) -> str:
    """``text`` without lone surrogates (JSON escapes such as \\ud800 make them): strings
    that are echoed in results must encode as UTF-8, or no result could be sent."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _int(obj: Mapping, key: str, lo: int = 0, hi: int = 10**9) -> int:
    value = obj[key]
    out: int | None = None
    if isinstance(value, bool):
        out = None
    elif isinstance(value, int):
        out = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        out = int(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*-?[0-9]{1,9}\s*", value):
        out = int(value)
    if out is None or not lo <= out <= hi:
        raise FunasrError("bad_config", f"{key} must be an integer from {lo} to {hi}, got {_echo(value)}")
    return out


def _bool(obj: Mapping, key: str) -> bool:
    value = obj[key]
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise FunasrError("bad_config", f"{key} must be true or false, got {_echo(value)}")


def _chunk_size(value: Any) -> tuple[int, int, int]:
    parts: Any = value
    if isinstance(value, str):
        parts = [p for p in re.split(r"[,\s]+", value.strip()) if p]
    if not isinstance(parts, (list, tuple)) or len(parts) != 3:
        raise FunasrError("bad_config", f"chunk_size must be three integers such as [5, 10, 5] or \"5,10,5\", got {_echo(value)}")
    out = tuple(_int({"chunk_size": p}, "chunk_size", 0, 100) for p in parts)
    if out[1] < 1:
        raise FunasrError("bad_config", "chunk_size's middle value (the chunk, in 60 ms units) must be at least 1")
    return out  # type: ignore[return-value]


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False) if _bounded(value) else "?"


def _bounded(value: Any, depth: int = 0) -> bool:
    if depth > 8:
        return False
    if isinstance(value, Mapping):
        return len(value) <= 1000 and all(_bounded(v, depth + 1) for v in value.values())
    if isinstance(value, (list, tuple)):
        return len(value) <= 1000 and all(_bounded(v, depth + 1) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return not isinstance(value, int) or abs(value) < 10**30


def _echo(value: Any) -> str:
    """A client's value in an error message, bounded whatever its size."""
    if isinstance(value, str):
        return repr(value[:32]) + ("..." if len(value) > 32 else "")
    if isinstance(value, (list, tuple)):
        return f"an array of {len(value)} item(s)"
    if isinstance(value, Mapping):
        return f"an object of {len(value)} key(s)"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**32:
        return "a very large integer"
    return json.dumps(value) if value is None or isinstance(value, (bool, int, float)) else type(value).__name__


# ---------------------------------------------------------------------- text units


def units(text: str) -> list[str]:
    """Text cut into words (with their leading spaces) and single CJK characters; joined
    they give the text back (less surrounding space). Punctuation written right after a
    character stays with it ("好，" is one unit), so it never stands alone."""
    out: list[str] = []
    for token in _TOKEN_RE.findall(text.strip()):
        if out and not token[0].isspace() and not _bare(token):
            out[-1] += token
        else:
            out.append(token)
    return out


def _bare(token: str) -> str:
    """A token without its punctuation and quote marks ("" if it is nothing else)."""
    return token.strip().strip(_PUNCT + _MARKS)


class OnlineText:
    """The online text of one open sentence, made append-only for FunASR clients.

    A partial is a fresh decode of the whole open sentence and may revise its last words;
    clients can only append. So a word is sent once two consecutive partials agree on it and
    everything before it (the LocalAgreement-2 policy of streaming Whisper), and at the
    sentence's end whatever of the final text is still unsent follows. Words are compared
    without case and surrounding punctuation: a partial that only adds a comma after a sent
    word ("Americans" -> "Americans, ask") must not stop the words after it."""

    def __init__(self) -> None:
        self.sent: list[str] = []  # comparison keys of the units sent
        self._previous: list[str] | None = None

    def partial(self, text: str) -> str:
        current = units(text)
        keys = [_key(u) for u in current]
        previous, self._previous = self._previous, keys
        if previous is None:
            return ""
        agreed = len(_common_prefix(previous, keys))
        n = len(self.sent)
        if agreed <= n or keys[:n] != self.sent:
            return ""
        self.sent = keys[:agreed]
        return "".join(current[n:agreed])

    def final(self, text: str) -> str:
        rest = units(text)[len(self.sent):]
        self.sent = self.sent + [_key(u) for u in rest]
        return "".join(rest)


def _key(unit: str) -> str:
    return _bare(unit).casefold()


def _common_prefix(a: Sequence[str], b: Sequence[str]) -> list[str]:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return list(a[:n])


# ---------------------------------------------------------------------- timestamps


def _stamp_units(words: Sequence[Word]) -> list[tuple[str, int, int, str]]:
    """(unit, start_ms, end_ms, punctuation after it): one per word, one per CJK character
    (a word's span split evenly over its characters). Quote marks are dropped; punctuation
    (also before a closing quote, as in '"Stop."') goes to the unit before it."""
    out: list[tuple[str, int, int, str]] = []
    for w in words:
        pieces: list[tuple[str, str]] = []  # (unit, its punctuation)
        for token in _TOKEN_RE.findall(w.word):
            core = _bare(token)
            trail = "".join(c for c in token.strip()[len(token.strip().rstrip(_PUNCT + _MARKS)):] if c in _PUNCT)
            if core:
                pieces.append((core, trail))
            elif trail and pieces:
                pieces[-1] = (pieces[-1][0], pieces[-1][1] + trail)
            elif trail and out:  # a word of punctuation only: it ends the unit before it
                unit, s, e, p = out[-1]
                out[-1] = (unit, s, e, p + trail)
        span = max(w.end_ms - w.start_ms, 0)
        for i, (piece, trail) in enumerate(pieces):
            start = w.start_ms + span * i // len(pieces)
            end = w.start_ms + span * (i + 1) // len(pieces)
            out.append((piece, start, end, trail))
    return out


def timestamp(words: Sequence[Word]) -> str:
    """FunASR's ``timestamp`` field: a JSON string of [start_ms, end_ms] pairs."""
    return json.dumps([[s, e] for _, s, e, _ in _stamp_units(words)], separators=(",", ":"))


def stamp_sents(words: Sequence[Word]) -> list[dict[str, Any]]:
    """FunASR's ``stamp_sents``: the text cut at punctuation, each piece with its span and
    the span of every unit in it."""
    sents: list[dict[str, Any]] = []
    current: list[tuple[str, int, int, str]] = []
    for unit in _stamp_units(words):
        current.append(unit)
        if unit[3]:
            sents.append(_sentence(current))
            current = []
    if current:
        sents.append(_sentence(current))
    return sents


def _sentence(items: list[tuple[str, int, int, str]]) -> dict[str, Any]:
    return {"text_seg": " ".join(u for u, _, _, _ in items), "punc": items[-1][3][:1],
            "start": items[0][1], "end": items[-1][2], "ts_list": [[s, e] for _, s, e, _ in items]}


def sensevoice_tags(fields: Mapping[str, Any]) -> str:
    """SenseVoice's ``<|lang|><|EMO|><|Event|>`` prefix for a result, from the tags the runner
    parsed (``language``, ``emotion``, ``event``); "" for other models' results (which have no
    ``emotion`` field). A tag the model did not give is SenseVoice's own "unknown" one."""
    if "emotion" not in fields or "event" not in fields:
        return ""
    lang = "nospeech" if fields.get("nospeech") else (fields.get("language") or "nospeech")
    return f"<|{lang}|><|{fields.get('emotion') or 'EMO_UNKNOWN'}|><|{fields.get('event') or 'Event_UNK'}|>"


# ---------------------------------------------------------------------- server -> client


def _dumps(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def mode_label(mode: str, online: bool) -> str:
    """The ``mode`` a result carries: 2pass results say which pass they come from."""
    if mode == "2pass":
        return "2pass-online" if online else "2pass-offline"
    return mode


def result(mode: str, wav_name: str, text: str, is_final: bool, words: Sequence[Word] | None = None) -> str:
    """One result message; with ``words``, its ``timestamp`` and ``stamp_sents`` too."""
    out: dict[str, Any] = {"mode": mode, "wav_name": wav_name, "text": text, "is_final": is_final}
    if words is not None:
        out["timestamp"] = timestamp(words)
        out["stamp_sents"] = stamp_sents(words)
    return _dumps(out)


IS_FINAL = ("runtime", "per_sentence")


class Results:
    """One connection's result messages for streamed modes (2pass, online): where
    ``is_final`` goes, and the sentence fields of FunASR's C++ runtime.

    ``is_final`` ``"runtime"`` marks as FunASR's C++ WebSocket server does
    (runtime/websocket/bin/websocket-server-2pass.cpp): every message sent while audio flows
    is false, and the one message that answers ``is_speaking: false`` is true; it carries
    the last sentence if one was still open, else empty text. Clients written for that
    server stop reading at ``is_final`` true. The answer's sentences arrive one by one after
    ``end()`` (a slow final may come after a quick one), so each is held until the next
    comes or ``ended()``: only then is it known to be the last.
    ``"per_sentence"`` marks as FunASR's Python demo server does: every ``2pass-offline``
    sentence and the last ``online`` message of each sentence are true; ``end()`` and
    ``ended()`` send nothing of their own.

    The runtime's sentence fields go out in both: ``slice_type`` (0: the sentence's first
    message, 1: a later online one, 2: the finished ``2pass-offline`` sentence) and ``index``
    (the sentence's number on the connection, from 0) on every sentence message, and
    ``start_time`` / ``end_time`` (ms on the utterance's clock) on ``2pass-offline``.
    """

    def __init__(self, is_final: str = "runtime") -> None:
        if is_final not in IS_FINAL:
            raise ValueError(f"is_final must be one of {IS_FINAL}, got {is_final!r}")
        self.per_sentence = is_final == "per_sentence"
        self.index = 0  # the open (or next) sentence's number; the runtime counts per connection
        self._started = False  # a message of the open sentence has gone out
        self._ending = False
        self._held: dict[str, Any] | None = None

    def online(self, label: str, wav_name: str, text: str) -> list[str]:
        """An increment of the open sentence's online text (``label``: ``online`` or
        ``2pass-online``)."""
        return self._out({"mode": label, "wav_name": wav_name, "text": text, "is_final": False, **self._slice()})

    def online_end(self, wav_name: str, text: str) -> list[str]:
        """online mode, a sentence's end: the rest of its text (nothing if ``text`` is empty)."""
        out: list[str] = []
        if text:
            out = self._out({"mode": "online", "wav_name": wav_name, "text": text, "is_final": self.per_sentence,
                             **self._slice()})
        if self._started:
            self.index += 1
            self._started = False
        return out

    def sentence(self, wav_name: str, text: str, start_ms: int, end_ms: int, words: Sequence[Word]) -> list[str]:
        """2pass: a finished sentence, which replaces its online text."""
        msg = {"mode": "2pass-offline", "wav_name": wav_name, "text": text, "is_final": self.per_sentence,
               "timestamp": timestamp(words), "stamp_sents": stamp_sents(words),
               "slice_type": 2, "index": self.index, "start_time": start_ms, "end_time": end_ms}
        self.index += 1
        self._started = False
        return self._out(msg)

    def end(self) -> None:
        """The client's ``is_speaking: false`` came: what follows until ``ended()`` answers it."""
        self._ending = not self.per_sentence

    def ended(self, label: str, wav_name: str) -> list[str]:
        """The answer to the end of audio is complete: its last message, final (runtime)."""
        held, self._held = self._held, None
        ending, self._ending = self._ending, False
        self._started = False
        if not ending:
            return []
        msg = held or {"mode": label, "wav_name": wav_name, "text": "", "is_final": True}
        return [_dumps({**msg, "is_final": True})]

    def _slice(self) -> dict[str, int]:
        fields = {"slice_type": 1 if self._started else 0, "index": self.index}
        self._started = True
        return fields

    def _out(self, msg: dict[str, Any]) -> list[str]:
        if not self._ending:
            return [_dumps(msg)]
        held, self._held = self._held, msg
        return [_dumps(held)] if held is not None else []


def end_ack(mode: str, wav_name: str, errors: Sequence[str]) -> str:
    """The answer to ``is_end``, as FunASR's Python server gives it: everything before it
    has been sent; ``is_final`` false (with ``error``) if some of it failed."""
    out: dict[str, Any] = {"mode": mode, "wav_name": wav_name, "is_final": not errors, "is_end": True}
    if errors:
        out["error"] = "; ".join(errors)[:1000]
    return _dumps(out)


def error(wav_name: str, code: str, message: str, fatal: bool) -> str:
    """An error. No ``mode``, so FunASR clients (which skip messages without one) do not
    print it as text; ``text`` is empty for those that read it anyway, and ``is_final``
    ends the wait of a client whose session is over."""
    return _dumps({"wav_name": wav_name, "text": "", "is_final": fatal, "error": code, "message": message})
