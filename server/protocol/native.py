"""The native WebSocket dialect at ``/v1/stream``: a pure codec (no sockets).

Client -> server text messages are parsed into small frozen objects (``Start``,
``Finalize``, ``KeepAlive``, ``Stop``); server -> client messages are built as compact
JSON strings. Stream configuration arrives either as URL query parameters (strings)
or in a ``start`` message (JSON-typed) and is validated by ``build_config`` into the
dialect-neutral ``server.stream_config.StreamConfig``. Every problem is a
``ProtocolError`` carrying the ``code`` the client sees; user docs: docs/protocol.md.
"""

from __future__ import annotations

import heapq
import json
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Collection, Mapping, Sequence

from server.audio.codecs import ENCODINGS
from server.audio.resample import STANDARD_RATES
from server.stream_config import StreamConfig, language_list

if TYPE_CHECKING:
    from server.runners.base import Word

PROTOCOL_VERSION = 1
CONFIG_KEYS = ("sample_rate", "encoding", "language", "interim_results", "partial_words", "endpointing_ms", "max_segment_ms",
               "channels", "call_id")
# Keys about the connection rather than each channel's session (see ``call_options``).
_CONNECTION_KEYS = ("channels", "call_id")
_CALL_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
# Query keys that are not stream config but are allowed in the URL (authentication proxies).
_QUERY_PASSTHROUGH = ("token",)
_LANGUAGE_RE = re.compile(r"[a-z-]{2,8}")
_TRUE, _FALSE = ("true", "1"), ("false", "0")
# A client's value is echoed in an error message only up to this many characters (and its
# repr, escapes included, only up to _ECHO_REPR_CHARS): error messages never reflect unbounded
# client input, however large the request.
_ECHO_CHARS = 32
_ECHO_REPR_CHARS = 80
# Error messages name at most this many of the unknown fields/parameters a client gave.
_ECHO_KEYS = 4


class ProtocolError(Exception):
    """A client mistake, reported to it as ``{"type": "error", "code": ..., ...}``."""

    def __init__(self, code: str, message: str, fatal: bool = False) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.fatal = fatal


@dataclass(frozen=True)
class Start:
    config_fields: dict  # the CONFIG_KEYS given, type-checked, not yet range-checked


@dataclass(frozen=True)
class Finalize:
    pass


@dataclass(frozen=True)
class KeepAlive:
    pass


@dataclass(frozen=True)
class Stop:
    pass


ClientMessage = Start | Finalize | KeepAlive | Stop
_CONTROLS: dict[str, ClientMessage] = {"finalize": Finalize(), "keepalive": KeepAlive(), "stop": Stop()}


def _bad_config(message: str) -> ProtocolError:
    # Fatal: streaming on with a config the client did not ask for would give it garbage.
    return ProtocolError("bad_config", message, fatal=True)


# ---------------------------------------------------------------------- client -> server


def parse_query(query: Mapping[str, str]) -> dict:
    """The CONFIG_KEYS present in the URL query (values still strings); {} if none."""
    unknown = [k for k in query if k not in CONFIG_KEYS and k not in _QUERY_PASSTHROUGH]
    if unknown:
        raise _bad_config(f"unknown query parameter(s) {_echo_keys(unknown)}; allowed: {', '.join(CONFIG_KEYS)}")
    return {k: query[k] for k in CONFIG_KEYS if k in query}


def parse_text(text: str) -> ClientMessage:
    """Parse one client text message."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        raise ProtocolError("bad_json", "text messages must be JSON objects") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_json", f"expected a JSON object, got {type(obj).__name__}")
    kind = obj.get("type")
    if kind == "start":
        fields = {k: v for k, v in obj.items() if k != "type"}
        unknown = [k for k in fields if k not in CONFIG_KEYS]
        if unknown:
            raise _bad_config(f"unknown start field(s) {_echo_keys(unknown)}; allowed: {', '.join(CONFIG_KEYS)}")
        for key, value in fields.items():
            _check_json_type(key, value)
        return Start(fields)
    if isinstance(kind, str) and kind in _CONTROLS:
        return _CONTROLS[kind]
    raise ProtocolError(
        "unknown_type", f"unknown message type {_echo(kind)}; expected start, finalize, keepalive or stop"
    )


def _check_json_type(key: str, value: Any) -> None:
    if key in ("encoding", "language", "call_id"):
        ok = isinstance(value, str)
    elif key in ("interim_results", "partial_words"):
        ok = isinstance(value, bool)
    elif key in ("endpointing_ms", "max_segment_ms"):
        ok = value is None or _is_int(value)
    else:  # sample_rate, channels
        ok = _is_int(value)
    if not ok:
        want = {"encoding": "a string", "language": "a string", "call_id": "a string", "interim_results": "true or false",
                "partial_words": "true or false", "sample_rate": "an integer", "channels": "an integer"}.get(key, "an integer or null")
        raise _bad_config(f"{key} must be {want}, got {_echo(value)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_int(value: Any) -> int | None:
    """An integer from JSON (int) or a query (decimal string of at most 9 digits), else None."""
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,9}", value.strip()):
        return int(value.strip())
    return value if _is_int(value) else None


def _int_field(fields: Mapping, key: str, lo: int, hi: int) -> int | None:
    """An integer field, range-checked; None if absent or null."""
    if key not in fields or fields[key] is None:
        return None
    value = _as_int(fields[key])
    if value is None or not lo <= value <= hi:
        raise _bad_config(f"{key} must be an integer from {lo} to {hi}, got {_echo(fields[key])}")
    return value


def _sample_rate_field(fields: Mapping) -> int | None:
    """``sample_rate``: one of STANDARD_RATES; None if absent or null."""
    if "sample_rate" not in fields or fields["sample_rate"] is None:
        return None
    value = _as_int(fields["sample_rate"])
    if value not in STANDARD_RATES:
        raise _bad_config(
            f"sample_rate must be one of {', '.join(map(str, STANDARD_RATES))} (Hz), got {_echo(fields['sample_rate'])}"
        )
    return value


def _echo(value: Any) -> str:
    """A client's value for an error message, bounded whatever its size or depth.

    A string: its repr, cut to ``_ECHO_CHARS`` characters (and ``_ECHO_REPR_CHARS`` of repr,
    so escapes cannot inflate it), plus its length when cut; repr also escapes lone surrogates,
    so the message stays valid UTF-8. Numbers, true/false/null: as in JSON (a huge integer by
    its size). An array or object: its size only (never its repr: megabytes, or nesting deep
    enough to overflow the stack).
    """
    if isinstance(value, str):
        text = repr(value[:_ECHO_CHARS])
        if len(text) > _ECHO_REPR_CHARS:
            text = text[:_ECHO_REPR_CHARS] + "..."
        return text if len(value) <= _ECHO_CHARS else f"{text}... ({len(value)} characters)"
    if value is None or isinstance(value, (bool, float)):
        return json.dumps(value)  # null, true, false, 1.5, Infinity, NaN
    if isinstance(value, int):
        if abs(value) < 10 ** _ECHO_CHARS:
            return str(value)
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    if isinstance(value, (list, tuple)):
        return f"an array of {len(value)} item(s)"
    if isinstance(value, Mapping):
        return f"an object of {len(value)} key(s)"
    return f"a {type(value).__name__}"


def _echo_keys(keys: list) -> str:
    """Unknown field names for an error message: the first few (sorted), each cut, and a count."""
    try:
        shown = heapq.nsmallest(_ECHO_KEYS, keys)
    except TypeError:  # keys of mixed types (not from JSON or a URL): any few will do
        shown = keys[:_ECHO_KEYS]
    text = ", ".join(_echo(k) for k in shown)
    return text if len(keys) <= len(shown) else f"{text} and {len(keys) - len(shown)} more"


def build_config(
    fields: Mapping,
    default_language: str = "auto",
    max_segment_ms_limit: int = 30000,
    languages: Collection[str] | None = None,
) -> StreamConfig:
    """Validate the given config fields (from ``parse_query`` or ``Start``) into a StreamConfig.

    ``languages``: the codes the loaded model accepts ("auto" included; from
    ``ModelRunner.languages()``); a language outside it is a ``bad_config``. None accepts any
    well-formed code."""
    unknown = [k for k in fields if k not in CONFIG_KEYS]
    if unknown:
        raise _bad_config(f"unknown config field(s) {_echo_keys(unknown)}; allowed: {', '.join(CONFIG_KEYS)}")
    call_options(fields)  # checked here too, so one call validates everything a client gave
    out: dict[str, Any] = {}

    rate = _sample_rate_field(fields)
    if rate is not None:
        out["sample_rate"] = rate

    if "encoding" in fields:
        enc = fields["encoding"]
        if not isinstance(enc, str) or enc not in ENCODINGS:
            raise _bad_config(f"encoding must be one of {', '.join(ENCODINGS)}, got {_echo(enc)}")
        out["encoding"] = enc

    given = fields.get("language", default_language)
    if not isinstance(given, str):
        raise _bad_config(f"language must be \"auto\" or a language code such as \"en\", got {_echo(given)}")
    lang = given.strip().lower()
    if lang != "auto" and not _LANGUAGE_RE.fullmatch(lang):
        supported = f"; this model supports: {language_list(languages)}" if languages is not None else ""
        raise _bad_config(
            f"language must be \"auto\" or a 2-8 letter code of a-z and '-' such as \"en\", got {_echo(given)}{supported}"
        )
    if languages is not None and lang not in languages:
        raise _bad_config(f"language {_echo(given)} is not supported by this model; use one of: {language_list(languages)}")
    out["language"] = lang

    for key in ("interim_results", "partial_words"):
        if key in fields:
            value = fields[key]
            if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
                value = value.strip().lower() in _TRUE
            if not isinstance(value, bool):
                raise _bad_config(f"{key} must be true or false, got {_echo(value)}")
            out[key] = value

    endpointing = _int_field(fields, "endpointing_ms", 100, 5000)
    if endpointing is not None:
        out["endpointing_ms"] = endpointing
    max_segment = _int_field(fields, "max_segment_ms", 1000, max_segment_ms_limit)
    if max_segment is not None:
        out["max_segment_ms"] = max_segment
    return StreamConfig(**out)


def call_options(fields: Mapping) -> tuple[int, str | None]:
    """``channels`` (1, or 2: interleaved frames, each channel its own session and speaker, as
    FreeSWITCH's stereo streams send caller and callee) and ``call_id`` (publish this stream's
    results as that call's events, for the webhook and /v1/calls), from the same fields as
    ``build_config``."""
    channels = _int_field(fields, "channels", 1, 2) or 1
    call_id = fields.get("call_id")
    if call_id is not None and (not isinstance(call_id, str) or not _CALL_ID_RE.fullmatch(call_id)):
        raise _bad_config(f"call_id must be 1-128 letters, digits and . _ : -, got {_echo(call_id)}")
    return channels, call_id


# ---------------------------------------------------------------------- server -> client


def _dumps(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


_CORE_KEYS = frozenset(("type", "segment_id", "text", "start_ms", "end_ms", "cut_ms", "words", "channel"))


def result_extras(fields: Mapping) -> dict[str, Any]:
    """Model extras worth sending: JSON scalars only, never overriding a core key."""
    out: dict[str, Any] = {}
    for k, v in fields.items():
        if not isinstance(k, str) or k in _CORE_KEYS:
            continue
        if isinstance(v, float) and not math.isfinite(v):
            continue
        if v is None or isinstance(v, (str, int, float, bool)):
            out[k] = v
    return out


def _plain(value: Any) -> Any:
    """Model info for ``ready``: JSON-able values as they are, the rest as strings."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def ready(session_id: str, config: StreamConfig, model: Mapping, channels: int = 1, call_id: str | None = None) -> str:
    return _dumps({
        "type": "ready",
        "session_id": session_id,
        "protocol_version": PROTOCOL_VERSION,
        "model": _plain(model),
        # Only the settings this dialect has words for (StreamConfig also holds other dialects' knobs).
        "config": {**{k: v for k, v in config.to_dict().items() if k in CONFIG_KEYS},
                   "channels": channels, "call_id": call_id},
    })


def _channel(obj: dict[str, Any], channel: int | None) -> dict[str, Any]:
    """Results of a two-channel stream say which channel (0 or 1) they belong to."""
    if channel is not None:
        obj["channel"] = channel
    return obj


def speech_started(segment_id: int, start_ms: int, channel: int | None = None) -> str:
    return _dumps(_channel({"type": "speech_started", "segment_id": segment_id, "start_ms": start_ms}, channel))


def word_dicts(words: "Sequence[Word] | None") -> list[dict[str, Any]]:
    """Word timings, already on the stream's clock (the session puts them there)."""
    return [{"word": w.word, "start_ms": w.start_ms, "end_ms": w.end_ms} for w in words or ()]


def partial(segment_id: int, text: str, start_ms: int, end_ms: int, fields: Mapping,
            words: "Sequence[Word] | None" = None, channel: int | None = None) -> str:
    """`words` only when the client asked for them in partials (`partial_words`)."""
    core: dict[str, Any] = {"type": "partial", "segment_id": segment_id, "text": text, "start_ms": start_ms, "end_ms": end_ms}
    if words is not None:
        core["words"] = word_dicts(words)
    return _dumps(_channel({**core, **result_extras(fields)}, channel))


def final(segment_id: int, text: str, start_ms: int, end_ms: int, cut_ms: int, fields: Mapping,
          words: "Sequence[Word] | None" = None, channel: int | None = None) -> str:
    """Every final has `words` (an empty list for empty text or when the model gave none)."""
    core = {"type": "final", "segment_id": segment_id, "text": text, "start_ms": start_ms,
            "end_ms": end_ms, "cut_ms": cut_ms, "words": word_dicts(words)}
    return _dumps(_channel({**core, **result_extras(fields)}, channel))


def error(code: str, message: str, fatal: bool) -> str:
    return _dumps({"type": "error", "code": code, "message": message, "fatal": fatal})


def done() -> str:
    return _dumps({"type": "done"})
