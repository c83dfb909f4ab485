"""Asterisk AudioSocket: a sans-I/O parser of the frames Asterisk sends (no sockets).

A frame is ``kind (1 byte) | payload length (uint16, big-endian) | payload``. Asterisk sends
the call's UUID first (``0x01``, 16 bytes), then signed linear 16-bit little-endian mono audio
(``0x10`` at 8 kHz; ``0x11``-``0x18`` at the higher rates of recent Asterisk versions), DTMF
digits (``0x03``, one ASCII byte), a hangup (``0x00``) and errors (``0xff``, an optional code
byte). The server may send audio and a hangup back; Chorus only ever sends the hangup.

``FrameParser.feed(data)`` takes bytes as they arrive, split anywhere, and returns whole
frames in order; a frame that is not what Asterisk sends comes out as ``Invalid`` (after the
good frames before it, so their audio still counts), and the parser takes nothing more: the
call's error path ends the connection. Rates and kinds: Asterisk's ``res_audiosocket.h`` and its
AudioSocket protocol documentation.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

KIND_HANGUP = 0x00
KIND_UUID = 0x01
KIND_DTMF = 0x03
KIND_ERROR = 0xFF
# Signed linear 16-bit mono audio kinds and their sample rates.
AUDIO_RATES = {
    0x10: 8000, 0x11: 12000, 0x12: 16000, 0x13: 24000, 0x14: 32000,
    0x15: 44100, 0x16: 48000, 0x17: 96000, 0x18: 192000,
}
HEADER_BYTES = 3
HANGUP_FRAME = bytes((KIND_HANGUP, 0, 0))
_DIGITS = frozenset(b"0123456789*#ABCDabcd")


class AudioSocketError(Exception):
    """Bytes that are not an AudioSocket frame Asterisk would send."""


@dataclass(frozen=True)
class Uuid:
    call_id: str  # canonical lower-case 8-4-4-4-12


@dataclass(frozen=True)
class Audio:
    rate: int
    pcm: bytes  # signed 16-bit little-endian samples


@dataclass(frozen=True)
class Dtmf:
    digit: str


@dataclass(frozen=True)
class Hangup:
    pass


@dataclass(frozen=True)
class Error:
    code: int | None  # Asterisk's own: 1 the caller hung up, 2 frame forwarding, 4 memory


@dataclass(frozen=True)
class Invalid:
    """A frame Asterisk would not send; the parser takes nothing after it."""
    message: str


Frame = Uuid | Audio | Dtmf | Hangup | Error | Invalid


def decode(kind: int, payload: bytes) -> Frame:
    """One frame's kind and payload -> a message, or AudioSocketError."""
    if kind in AUDIO_RATES:
        if not payload or len(payload) % 2:
            raise AudioSocketError(f"an audio frame of {len(payload)} bytes is not whole 16-bit samples")
        return Audio(AUDIO_RATES[kind], payload)
    if kind == KIND_UUID:
        if len(payload) != 16:
            raise AudioSocketError(f"a UUID frame must hold 16 bytes, not {len(payload)}")
        return Uuid(str(uuid.UUID(bytes=payload)))
    if kind == KIND_DTMF:
        if len(payload) != 1 or payload[0] not in _DIGITS:
            raise AudioSocketError("a DTMF frame must hold one digit (0-9, *, #, A-D)")
        return Dtmf(chr(payload[0]))
    if kind == KIND_HANGUP:
        if payload:
            raise AudioSocketError("a hangup frame has no payload")
        return Hangup()
    if kind == KIND_ERROR:
        return Error(payload[0] if payload else None)
    raise AudioSocketError(f"unknown frame kind 0x{kind:02x}")


def encode(kind: int, payload: bytes = b"") -> bytes:
    """A frame as bytes (what Asterisk sends; used by tests and tools)."""
    if len(payload) > 0xFFFF:
        raise ValueError("an AudioSocket payload holds at most 65535 bytes")
    return bytes((kind,)) + len(payload).to_bytes(2, "big") + payload


class FrameParser:
    """Bytes in, whole frames out; holds a partial frame between calls."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.broken = False

    def feed(self, data: bytes) -> list[Frame]:
        if self.broken:
            return []
        self._buf += data
        out: list[Frame] = []
        pos = 0
        buf = self._buf
        while len(buf) - pos >= HEADER_BYTES:
            kind = buf[pos]
            length = int.from_bytes(buf[pos + 1:pos + 3], "big")
            end = pos + HEADER_BYTES + length
            if len(buf) < end:
                break
            try:
                out.append(decode(kind, bytes(buf[pos + HEADER_BYTES:end])))
            except AudioSocketError as e:
                out.append(Invalid(str(e)))
                self.broken = True
                self._buf = bytearray()
                return out
            pos = end
        del buf[:pos]
        return out

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held."""
        return len(self._buf)
