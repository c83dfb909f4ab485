"""Real speech clips re-encoded the way users' recordings come: MP3, Opus, FLAC, AAC, WebM.

Encoded with PyAV (FFmpeg's encoders) in memory, from the 16 kHz WAV clips in tests/data, so
the tests need no binary fixtures beyond the clips themselves.
"""

from __future__ import annotations

import io

import av
import numpy as np

# name -> (container format, codec, sample rate the codec is given, filename extension)
FORMATS = {
    "mp3": ("mp3", "libmp3lame", 16000, "mp3"),
    "opus": ("ogg", "libopus", 48000, "ogg"),
    "flac": ("flac", "flac", 16000, "flac"),
    "m4a": ("ipod", "aac", 44100, "m4a"),
    "webm": ("webm", "libopus", 48000, "webm"),
    "wav": ("wav", "pcm_s16le", 16000, "wav"),
}


def encode(audio: np.ndarray, name: str, rate: int = 16000, bit_rate: int | None = None) -> tuple[str, bytes]:
    """``audio`` (float32 mono at ``rate``) as a file of format ``name`` (at the encoder's
    default bit rate unless given): (filename, bytes)."""
    container_format, codec, codec_rate, ext = FORMATS[name]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container_format) as out:
        stream = out.add_stream(codec, rate=codec_rate)
        stream.layout = "mono"
        if bit_rate is not None:
            stream.bit_rate = bit_rate
        resampler = av.AudioResampler(format=stream.format.name, layout="mono", rate=codec_rate)
        pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
        step = rate // 10
        for i in range(0, len(pcm), step):
            frame = av.AudioFrame.from_ndarray(pcm[None, i:i + step], format="s16", layout="mono")
            frame.sample_rate = rate
            for f in resampler.resample(frame):
                out.mux(stream.encode(f))
        for f in resampler.resample(None):
            out.mux(stream.encode(f))
        out.mux(stream.encode(None))
    return f"clip.{ext}", buf.getvalue()
