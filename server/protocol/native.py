"""The native WebSocket dialect at ``/v1/stream``: a pure codec (no sockets).

Client -> server text messages are parsed into small frozen objects (``Start``,
``Finalize``, ``KeepAlive``, ``Stop``); server -> client messages are built as compact
JSON strings. Stream configuration arrives either as URL query parameters (strings)
or in a ``start`` message (JSON-typed) and is validated into a ``StreamConfig`` by
``build_config``. Every problem is a ``ProtocolError`` carrying the ``code`` the client
sees; user docs: docs/protocol.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Collection, Mapping

from server.audio.codecs import ENCODINGS

PROTOCOL_VERSION = 1
CONFIG_KEYS = ("sample_rate", "encoding", "language", "interim_results", "endpointing_ms", "max_segment_ms")
# Query keys that are not stream config but are allowed in the URL (authentication proxies).
_QUERY_PASSTHROUGH = ("token",)
_LANGUAGE_RE = re.compile(r"[a-z-]{2,8}")
_TRUE, _FALSE = ("true", "1"), ("false", "0")
# A client's value is echoed in an error message only up to this many characters.
_ECHO_CHARS = 32
# Error messages list the supported language codes up to about this many characters.
_LIST_CHARS = 800


@dataclass(frozen=True)
class StreamConfig:
    sample_rate: int = 16000  # Hz of the audio the client sends; resampled to 16 kHz
    encoding: str = "pcm_s16le"  # one of server.audio.codecs.ENCODINGS
    language: str = "auto"  # "auto" or a language code
    interim_results: bool = True  # send partials
    endpointing_ms: int | None = None  # trailing silence that ends a segment; None = server default
    max_segment_ms: int | None = None  # longest segment; None = server default

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
    unknown = sorted(k for k in query if k not in CONFIG_KEYS and k not in _QUERY_PASSTHROUGH)
    if unknown:
        raise _bad_config(f"unknown query parameter(s) {', '.join(unknown)}; allowed: {', '.join(CONFIG_KEYS)}")
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
        unknown = sorted(k for k in fields if k not in CONFIG_KEYS)
        if unknown:
            raise _bad_config(f"unknown start field(s) {', '.join(unknown)}; allowed: {', '.join(CONFIG_KEYS)}")
        for key, value in fields.items():
            _check_json_type(key, value)
        return Start(fields)
    if isinstance(kind, str) and kind in _CONTROLS:
        return _CONTROLS[kind]
    raise ProtocolError(
        "unknown_type", f"unknown message type {kind!r}; expected start, finalize, keepalive or stop"
    )


def _check_json_type(key: str, value: Any) -> None:
    if key in ("encoding", "language"):
        ok = isinstance(value, str)
    elif key == "interim_results":
        ok = isinstance(value, bool)
    elif key in ("endpointing_ms", "max_segment_ms"):
        ok = value is None or _is_int(value)
    else:  # sample_rate
        ok = _is_int(value)
    if not ok:
        want = {"encoding": "a string", "language": "a string", "interim_results": "true or false",
                "sample_rate": "an integer"}.get(key, "an integer or null")
        raise _bad_config(f"{key} must be {want}, got {json.dumps(value)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_field(fields: Mapping, key: str, lo: int, hi: int) -> int | None:
    """An integer field from JSON (int) or a query (decimal string), range-checked."""
    if key not in fields or fields[key] is None:
        return None
    value = fields[key]
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,9}", value.strip()):
        value = int(value.strip())
    if not _is_int(value) or not lo <= value <= hi:
        raise _bad_config(f"{key} must be an integer from {lo} to {hi}, got {value!r}")
    return value


def _echo(value: Any) -> str:
    """A client's value for an error message: its repr, cut to ``_ECHO_CHARS`` characters."""
    if isinstance(value, str) and len(value) > _ECHO_CHARS:
        return f"{value[:_ECHO_CHARS]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= _ECHO_CHARS else text[:_ECHO_CHARS] + "..."


def _code_list(codes: Collection[str]) -> str:
    """Supported language codes for an error message: "auto" first, then sorted; bounded."""
    ordered = (["auto"] if "auto" in codes else []) + sorted(c for c in codes if c != "auto")
    shown: list[str] = []
    used = 0
    for code in ordered:
        if used + len(code) + 2 > _LIST_CHARS:
            shown.append(f"... ({len(ordered) - len(shown)} more)")
            break
        shown.append(code)
        used += len(code) + 2
    return ", ".join(shown)


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
    unknown = sorted(k for k in fields if k not in CONFIG_KEYS)
    if unknown:
        raise _bad_config(f"unknown config field(s) {', '.join(unknown)}; allowed: {', '.join(CONFIG_KEYS)}")
    out: dict[str, Any] = {}

    rate = _int_field(fields, "sample_rate", 8000, 192000)
    if rate is not None:
        out["sample_rate"] = rate

    if "encoding" in fields:
        enc = fields["encoding"]
        if not isinstance(enc, str) or enc not in ENCODINGS:
            raise _bad_config(f"encoding must be one of {', '.join(ENCODINGS)}, got {enc!r}")
        out["encoding"] = enc

    given = fields.get("language", default_language)
    if not isinstance(given, str):
        raise _bad_config(f"language must be \"auto\" or a language code such as \"en\", got {_echo(given)}")
    lang = given.strip().lower()
    if lang != "auto" and not _LANGUAGE_RE.fullmatch(lang):
        supported = f"; this model supports: {_code_list(languages)}" if languages is not None else ""
        raise _bad_config(
            f"language must be \"auto\" or a 2-8 letter code of a-z and '-' such as \"en\", got {_echo(given)}{supported}"
        )
    if languages is not None and lang not in languages:
        raise _bad_config(f"language {_echo(given)} is not supported by this model; use one of: {_code_list(languages)}")
    out["language"] = lang

    if "interim_results" in fields:
        value = fields["interim_results"]
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            value = value.strip().lower() in _TRUE
        if not isinstance(value, bool):
            raise _bad_config(f"interim_results must be true or false, got {value!r}")
        out["interim_results"] = value

    endpointing = _int_field(fields, "endpointing_ms", 100, 5000)
    if endpointing is not None:
        out["endpointing_ms"] = endpointing
    max_segment = _int_field(fields, "max_segment_ms", 1000, max_segment_ms_limit)
    if max_segment is not None:
        out["max_segment_ms"] = max_segment
    return StreamConfig(**out)


# ---------------------------------------------------------------------- server -> client


def _dumps(obj: Mapping[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


_CORE_KEYS = frozenset(("type", "segment_id", "text", "start_ms", "end_ms", "cut_ms"))


def _extras(fields: Mapping) -> dict[str, Any]:
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


def ready(session_id: str, config: StreamConfig, model: Mapping) -> str:
    return _dumps({
        "type": "ready",
        "session_id": session_id,
        "protocol_version": PROTOCOL_VERSION,
        "model": _plain(model),
        "config": config.to_dict(),
    })


def speech_started(segment_id: int, start_ms: int) -> str:
    return _dumps({"type": "speech_started", "segment_id": segment_id, "start_ms": start_ms})


def partial(segment_id: int, text: str, start_ms: int, end_ms: int, fields: Mapping) -> str:
    core = {"type": "partial", "segment_id": segment_id, "text": text, "start_ms": start_ms, "end_ms": end_ms}
    return _dumps({**core, **_extras(fields)})


def final(segment_id: int, text: str, start_ms: int, end_ms: int, cut_ms: int, fields: Mapping) -> str:
    core = {"type": "final", "segment_id": segment_id, "text": text, "start_ms": start_ms,
            "end_ms": end_ms, "cut_ms": cut_ms}
    return _dumps({**core, **_extras(fields)})


def error(code: str, message: str, fatal: bool) -> str:
    return _dumps({"type": "error", "code": code, "message": message, "fatal": fatal})


def done() -> str:
    return _dumps({"type": "done"})
