"""Twilio Media Streams: a pure codec (no sockets) for what Twilio sends to `/v1/twilio`.

Twilio opens a WebSocket for a `<Connect><Stream>` or `<Start><Stream>` in a call's TwiML and
sends JSON text frames: ``connected``, one ``start`` (the call, its tracks, the audio format
and the TwiML's `<Parameter>`s as ``customParameters``), then ``media`` (base64 G.711
mu-law, 8 kHz mono, usually 20 ms per frame, each with its track and a timestamp in ms from
the stream's start), ``dtmf``, ``mark`` and finally ``stop``. Numeric-looking fields arrive
as strings. Twilio reads nothing Chorus could send on this socket (it closes right after
``stop``), so transcripts go to the application by webhook and /v1/calls instead.

``parse`` turns one frame into a small frozen message or raises ``TwilioError``; event
types Twilio may add later parse as ``Other`` and are ignored. ``signature`` computes the
``X-Twilio-Signature`` Twilio puts on the handshake (HMAC-SHA1 of the URL, keyed with the
account's Auth Token, base64), which is how a server knows the stream is Twilio's.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

# Media formats Twilio describes in `start.mediaFormat.encoding`, as server.audio.codecs names them.
ENCODINGS = {"audio/x-mulaw": "mulaw", "audio/x-alaw": "alaw"}
# Twilio's track names: `inbound` (the caller's audio reaching Twilio) and `outbound` (what
# Twilio plays to the caller); DTMF names them `inbound_track`/`outbound_track`.
TRACKS = ("inbound", "outbound")
# 20 ms of 8 kHz G.711 is 160 bytes; a frame of more than a few seconds is not Twilio's.
MAX_PAYLOAD_BYTES = 64_000
# `customParameters` that set recognition options (every parameter also goes to the
# application in `call_started.metadata`).
OPTION_KEYS = ("language", "endpointing_ms", "max_segment_ms", "interim_results", "partial_words")
_SID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
_DIGITS = frozenset("0123456789*#ABCDabcd")


class TwilioError(Exception):
    """A frame that is not what Twilio sends: ``code`` for metrics and the call's error event."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Connected:
    protocol: str
    version: str


@dataclass(frozen=True)
class Start:
    stream_sid: str
    call_sid: str
    account_sid: str
    tracks: tuple[str, ...]
    encoding: str  # a server.audio.codecs encoding
    sample_rate: int
    custom: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Media:
    track: str
    timestamp_ms: int | None  # from the stream's start; None if Twilio left it out
    payload: bytes


@dataclass(frozen=True)
class Dtmf:
    track: str
    digit: str


@dataclass(frozen=True)
class Mark:
    name: str


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Other:
    event: str


Message = Connected | Start | Media | Dtmf | Mark | Stop | Other


def parse(text: str) -> Message:
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        raise TwilioError("bad_json", "the frame is not JSON") from None
    if not isinstance(obj, dict):
        raise TwilioError("bad_json", "the frame is not a JSON object")
    event = obj.get("event")
    if not isinstance(event, str):
        raise TwilioError("bad_message", "the frame has no `event`")
    if event == "media":
        return _media(obj.get("media"))
    if event == "start":
        return _start(obj)
    if event == "connected":
        return Connected(str(obj.get("protocol", ""))[:32], str(obj.get("version", ""))[:32])
    if event == "dtmf":
        return _dtmf(obj.get("dtmf"))
    if event == "mark":
        mark = obj.get("mark")
        return Mark(str(mark.get("name", ""))[:128] if isinstance(mark, dict) else "")
    if event == "stop":
        return Stop()
    return Other(event[:32])


def _track(value: Any) -> str:
    name = value.removesuffix("_track") if isinstance(value, str) else value
    if name not in TRACKS:
        raise TwilioError("bad_track", f"track must be one of {', '.join(TRACKS)}")
    return name


def _int(value: Any) -> int | None:
    """A number Twilio sends as a string ("5") or a number; None if absent or not an integer."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and re.fullmatch(r"[0-9]{1,12}", value.strip()):
        return int(value.strip())
    return None


def _media(media: Any) -> Media:
    if not isinstance(media, dict):
        raise TwilioError("bad_media", "`media` must be an object")
    payload = media.get("payload")
    if not isinstance(payload, str):
        raise TwilioError("bad_media", "`media.payload` must be a base64 string")
    if len(payload) > MAX_PAYLOAD_BYTES * 4 // 3 + 4:
        raise TwilioError("bad_media", f"`media.payload` over {MAX_PAYLOAD_BYTES} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise TwilioError("bad_media", "`media.payload` is not valid base64") from None
    # Twilio sends only inbound or outbound media; a frame without a track is the inbound one
    # (one-track streams in older message versions).
    track = _track(media["track"]) if "track" in media else "inbound"
    timestamp = media.get("timestamp")
    ts = _int(timestamp)
    if timestamp is not None and ts is None:
        raise TwilioError("bad_media", "`media.timestamp` must be a whole number of milliseconds")
    return Media(track, ts, data)


def _dtmf(dtmf: Any) -> Dtmf:
    if not isinstance(dtmf, dict):
        raise TwilioError("bad_dtmf", "`dtmf` must be an object")
    digit = dtmf.get("digit")
    if not isinstance(digit, str) or len(digit) != 1 or digit not in _DIGITS:
        raise TwilioError("bad_dtmf", "`dtmf.digit` must be one of 0-9, *, #, A-D")
    return Dtmf(_track(dtmf.get("track", "inbound")), digit)


def _sid(obj: Mapping, key: str, required: bool = True) -> str:
    value = obj.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not _SID_RE.fullmatch(value):
        raise TwilioError("bad_start", f"`{key}` must be a string of 1-128 letters, digits and . _ : -")
    return value


def _start(obj: Mapping) -> Start:
    start = obj.get("start")
    if not isinstance(start, dict):
        raise TwilioError("bad_start", "`start` must be an object")
    stream_sid = _sid(start, "streamSid") if "streamSid" in start else _sid(obj, "streamSid")
    call_sid = _sid(start, "callSid")
    account_sid = _sid(start, "accountSid", required=False)
    tracks = start.get("tracks", ["inbound"])
    if not isinstance(tracks, list) or not tracks or len(tracks) > len(TRACKS):
        raise TwilioError("bad_start", "`start.tracks` must list inbound and/or outbound")
    names = tuple(dict.fromkeys(_track(t) for t in tracks))
    fmt = start.get("mediaFormat", {})
    if not isinstance(fmt, dict):
        raise TwilioError("bad_start", "`start.mediaFormat` must be an object")
    encoding = ENCODINGS.get(str(fmt.get("encoding", "audio/x-mulaw")).lower())
    rate = _int(fmt.get("sampleRate", 8000))
    channels = _int(fmt.get("channels", 1))
    if encoding is None or rate != 8000 or channels != 1:
        raise TwilioError(
            "unsupported_format",
            f"media format must be audio/x-mulaw (or audio/x-alaw), 8000 Hz, 1 channel; got "
            # repr: a client's text may hold what UTF-8 cannot (an unpaired surrogate), and this
            # message goes to the log as well as to the client.
            f"{str(fmt.get('encoding'))[:32]!r}, {str(fmt.get('sampleRate'))[:16]!r}, {str(fmt.get('channels'))[:8]!r}",
        )
    custom = start.get("customParameters") or {}
    if not isinstance(custom, dict):
        raise TwilioError("bad_start", "`start.customParameters` must be an object")
    # TwiML <Parameter> values are strings; keep the application's metadata bounded.
    params = {str(k)[:128]: str(v)[:1024] for k, v in list(custom.items())[:64]}
    return Start(stream_sid, call_sid, account_sid, names, encoding, 8000, params)


def options(custom: Mapping[str, str]) -> dict[str, str]:
    """The recognition options among a stream's custom parameters (validated by the caller
    with the native protocol's rules, as query parameters are)."""
    return {k: v for k, v in custom.items() if k in OPTION_KEYS}


def signature(auth_token: str, url: str) -> str:
    """``X-Twilio-Signature`` of a request without a body (a WebSocket handshake) to ``url``."""
    digest = hmac.new(auth_token.encode(), url.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


def signature_valid(auth_token: str, given: str, urls: list[str]) -> bool:
    """Whether ``given`` signs any of ``urls`` (compared in constant time, all of them)."""
    ok = False
    for url in urls:
        ok |= hmac.compare_digest(signature(auth_token, url).encode(), given.encode())
    return ok
