"""Reading WAV files into float32 mono, for tests, benchmarks and the file CLI.

The RIFF chunks are parsed here rather than with the stdlib ``wave`` module, because
``wave`` refuses WAVE_FORMAT_IEEE_FLOAT, WAVE_FORMAT_EXTENSIBLE and G.711 files, and
one parser for every format is simpler than two paths. Supported: PCM 8 (unsigned),
16, 24 and 32 bit; IEEE float 32 and 64 bit; mu-law and A-law; any of these wrapped
in WAVE_FORMAT_EXTENSIBLE. Channels are averaged.
"""

from __future__ import annotations

import logging
import os
import struct

import numpy as np

from server.audio.codecs import ALAW_TO_PCM16, MULAW_TO_PCM16, AudioFormatError
from server.audio.resample import resample

log = logging.getLogger(__name__)

_PCM, _FLOAT, _ALAW, _MULAW, _EXTENSIBLE = 0x0001, 0x0003, 0x0006, 0x0007, 0xFFFE
# Sample rates a file may claim (here and in server/audio/media.py, for every container).
# Outside this range the header is lying or broken, and believing it would be costly: resampling
# a claimed 1 Hz to 16 kHz makes 16000 samples of every sample (a 1 MB file -> 64 GB of float32).
MIN_RATE, MAX_RATE = 1000, 768_000


def _samples(raw: bytes, fmt: int, bits: int, path: str) -> np.ndarray:
    """Interleaved sample bytes -> float32 in [-1, 1] (still interleaved)."""
    if fmt == _PCM:
        if bits == 8:  # 8-bit WAV is unsigned with 128 as zero
            return (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
        if bits == 16:
            return np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
        if bits == 24:
            b = np.frombuffer(raw, np.uint8).reshape(-1, 3)
            wide = np.zeros((len(b), 4), np.uint8)
            wide[:, 1:] = b  # little-endian: the 24 bits land in the top of an int32
            return (wide.view("<i4").reshape(-1) >> 8).astype(np.float32) / 8388608.0
        if bits == 32:
            return (np.frombuffer(raw, "<i4").astype(np.float64) / 2147483648.0).astype(np.float32)
    elif fmt == _FLOAT and bits in (32, 64):
        x = np.frombuffer(raw, "<f4" if bits == 32 else "<f8")
        if not np.isfinite(x).all():
            raise AudioFormatError(f"{path}: float WAV data contains NaN or infinite samples")
        return np.clip(x, -1.0, 1.0).astype(np.float32)
    elif fmt in (_MULAW, _ALAW) and bits == 8:
        table = MULAW_TO_PCM16 if fmt == _MULAW else ALAW_TO_PCM16
        return table[np.frombuffer(raw, np.uint8)].astype(np.float32) / 32768.0
    raise AudioFormatError(f"{path}: unsupported WAV format (format tag 0x{fmt:04x}, {bits} bits per sample)")


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """Read a WAV file: (float32 mono samples in [-1, 1], sample rate in MIN_RATE..MAX_RATE).

    Anything that is not such a file raises ``AudioFormatError``; never more samples than the
    file has bytes, whatever its header claims."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise AudioFormatError(f"{name}: no such file") from None
    except OSError as e:
        raise AudioFormatError(f"{name}: cannot read: {e.strerror or e}") from None
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise AudioFormatError(f"{name}: not a WAV file (no RIFF/WAVE header)")

    fmt_chunk: bytes | None = None
    raw: bytes | None = None
    pos = 12
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = data[pos + 8:pos + 8 + size]  # a streamed file may claim more than it holds
        if cid == b"fmt ":
            fmt_chunk = body
        elif cid == b"data":
            raw = body
            break
        pos += 8 + size + (size & 1)  # chunks are word-aligned
    if fmt_chunk is None or len(fmt_chunk) < 16:
        raise AudioFormatError(f"{name}: WAV file has no valid fmt chunk")
    if raw is None:
        raise AudioFormatError(f"{name}: WAV file has no data chunk")

    fmt, channels, rate, _byte_rate, block_align, bits = struct.unpack_from("<HHIIHH", fmt_chunk)
    if fmt == _EXTENSIBLE:
        if len(fmt_chunk) < 40:
            raise AudioFormatError(f"{name}: truncated WAVE_FORMAT_EXTENSIBLE header")
        # The sub-format GUID starts with the plain format tag.
        fmt = struct.unpack_from("<H", fmt_chunk, 24)[0]
    if fmt not in (_PCM, _FLOAT, _ALAW, _MULAW):
        raise AudioFormatError(
            f"{name}: unsupported WAV format (format tag 0x{fmt:04x}); use PCM, IEEE float, mu-law or A-law"
        )
    if channels < 1 or bits == 0 or block_align != channels * ((bits + 7) // 8):
        raise AudioFormatError(
            f"{name}: inconsistent WAV header ({channels} ch, {rate} Hz, {bits} bits, block {block_align})"
        )
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioFormatError(f"{name}: unsupported sample rate {rate} Hz (supported: {MIN_RATE} to {MAX_RATE} Hz)")
    usable = len(raw) - len(raw) % block_align
    if usable != len(raw):
        log.warning("%s: data ends mid-frame; %d trailing bytes ignored", name, len(raw) - usable)
    x = _samples(raw[:usable], fmt, bits, name)
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1, dtype=np.float32)
    return np.ascontiguousarray(x, dtype=np.float32), rate


def load_audio_16k(path: str | os.PathLike) -> np.ndarray:
    """Read a WAV file and resample it to 16 kHz mono float32."""
    x, rate = read_wav(path)
    return resample(x, rate, 16000)
