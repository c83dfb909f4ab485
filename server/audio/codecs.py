"""Wire encodings of audio samples -> float32 mono in [-1, 1] (and back, for clients and tests).

Supported: little-endian signed 16-bit PCM, little-endian float32, and the two G.711
telephony companders (mu-law, A-law). G.711 decoding is a 256-entry table lookup;
the encoders follow the ITU reference (Sun ``g711.c``) segment search, vectorised.
"""

from __future__ import annotations

import numpy as np

ENCODINGS: tuple[str, ...] = ("pcm_s16le", "pcm_f32le", "mulaw", "alaw")
BYTES_PER_SAMPLE: dict[str, int] = {"pcm_s16le": 2, "pcm_f32le": 4, "mulaw": 1, "alaw": 1}


class AudioFormatError(ValueError):
    """Audio bytes (or a file) that cannot be decoded; the message is shown to the client."""


def _mulaw_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(u & 0x80, -magnitude, magnitude).astype(np.int16)


def _alaw_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    exponent = (a >> 4) & 0x07
    mantissa = a & 0x0F
    magnitude = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0))
    # In A-law the sign bit set means positive (the opposite of mu-law).
    return np.where(a & 0x80, magnitude, -magnitude).astype(np.int16)


MULAW_TO_PCM16: np.ndarray = _mulaw_table()
ALAW_TO_PCM16: np.ndarray = _alaw_table()
_MULAW_F32 = MULAW_TO_PCM16.astype(np.float32) / 32768.0
_ALAW_F32 = ALAW_TO_PCM16.astype(np.float32) / 32768.0


def decode(data: bytes, encoding: str) -> np.ndarray:
    """Decode one message of mono samples to float32 in [-1, 1]."""
    width = BYTES_PER_SAMPLE.get(encoding)
    if width is None:
        raise AudioFormatError(f"unknown encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")
    if len(data) % width:
        raise AudioFormatError(
            f"{len(data)} bytes is not a whole number of {encoding} samples ({width} bytes each)"
        )
    if encoding == "pcm_s16le":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) * np.float32(1.0 / 32768.0)
    if encoding == "pcm_f32le":
        x = np.frombuffer(data, dtype="<f4")
        if not np.isfinite(x).all():
            raise AudioFormatError("pcm_f32le audio contains NaN or infinite samples")
        # Clipping (not rejecting) a slightly hot float signal matches what a DAC would do.
        return np.clip(x, -1.0, 1.0).astype(np.float32, copy=False)
    table = _MULAW_F32 if encoding == "mulaw" else _ALAW_F32
    return table[np.frombuffer(data, dtype=np.uint8)]


def to_pcm16(x: np.ndarray) -> np.ndarray:
    """float in [-1, 1] -> int16 (saturating), the inverse of the pcm_s16le decoding."""
    return np.clip(np.rint(np.asarray(x, dtype=np.float64) * 32768.0), -32768, 32767).astype(np.int16)


_MULAW_SEG_END = np.array([0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF], dtype=np.int32)
_ALAW_SEG_END = np.array([0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF], dtype=np.int32)


def encode_mulaw(x: np.ndarray) -> bytes:
    """float in [-1, 1] -> G.711 mu-law bytes (ITU reference encoder, 14-bit magnitude)."""
    pcm = to_pcm16(x).astype(np.int32) >> 2
    negative = pcm < 0
    mask = np.where(negative, 0x7F, 0xFF)
    mag = np.minimum(np.where(negative, -pcm, pcm), 8159) + (0x84 >> 2)
    seg = np.searchsorted(_MULAW_SEG_END, mag, side="left")
    code = np.where(seg >= 8, 0x7F, (seg << 4) | ((mag >> (seg + 1)) & 0x0F))  # >= 8: saturate
    return (code ^ mask).astype(np.uint8).tobytes()


def encode_alaw(x: np.ndarray) -> bytes:
    """float in [-1, 1] -> G.711 A-law bytes (ITU reference encoder, 13-bit magnitude)."""
    pcm = to_pcm16(x).astype(np.int32) >> 3
    negative = pcm < 0
    mask = np.where(negative, 0x55, 0xD5)
    mag = np.where(negative, -pcm - 1, pcm)
    seg = np.searchsorted(_ALAW_SEG_END, mag, side="left")
    shift = np.where(seg < 2, 1, seg)
    code = np.where(seg >= 8, 0x7F, (seg << 4) | ((mag >> np.minimum(shift, 15)) & 0x0F))
    return (code ^ mask).astype(np.uint8).tobytes()


def encode(x: np.ndarray, encoding: str) -> bytes:
    """float32 samples -> bytes in a wire encoding (what a client sends; used by tests and tools)."""
    if encoding == "pcm_s16le":
        return to_pcm16(x).astype("<i2").tobytes()
    if encoding == "pcm_f32le":
        return np.asarray(x, dtype="<f4").tobytes()
    if encoding == "mulaw":
        return encode_mulaw(x)
    if encoding == "alaw":
        return encode_alaw(x)
    raise AudioFormatError(f"unknown encoding {encoding!r}; use one of {', '.join(ENCODINGS)}")
