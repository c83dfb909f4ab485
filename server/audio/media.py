"""Audio files of any common container and codec -> 16 kHz mono float32, via PyAV (FFmpeg).

Used where a client sends a whole file rather than a PCM stream: the transcription API and
`chorus transcribe` (decoded as read, in chunks), FunASR offline clients with a
``wav_format`` such as wav, mp3, m4a, ogg. FFmpeg's own resampler does the conversion while
decoding, frame by frame, so nothing but the 16 kHz result is held.
Blocking: call it from a worker thread, never on the event loop.
"""

from __future__ import annotations

import io
import itertools
from pathlib import Path
from typing import BinaryIO, Iterator

import av
import numpy as np

from server.audio.codecs import AudioFormatError

SAMPLE_RATE = 16000


class AudioTooLong(AudioFormatError):
    """The file's audio is longer than the limit it was decoded under."""


def decode_file(data: bytes, max_seconds: float | None = None) -> np.ndarray:
    """Decode a complete file held in memory. Raises AudioFormatError for anything that is
    not decodable audio, and for audio longer than ``max_seconds``."""
    chunks = list(iter_file(io.BytesIO(data), max_seconds))
    if not chunks:
        raise AudioFormatError("the file holds no audio samples")
    return np.concatenate(chunks)


def iter_file(source: str | Path | BinaryIO, max_seconds: float | None = None,
              chunk_samples: int = 10 * SAMPLE_RATE) -> Iterator[np.ndarray]:
    """Decode a file (a path or a binary file object) as it is read, yielding 16 kHz mono
    float32 chunks of about ``chunk_samples`` (the last may be shorter), clipped to [-1, 1]:
    an hour of audio never sits in memory at once. Raises AudioFormatError for anything that
    is not decodable audio, non-finite samples, and audio longer than ``max_seconds`` (as
    soon as the decode passes it)."""
    limit = None if max_seconds is None else int(max_seconds * SAMPLE_RATE)
    total = 0
    pending: list[np.ndarray] = []
    held = 0
    try:
        with av.open(str(source) if isinstance(source, (str, Path)) else source, mode="r") as container:
            streams = container.streams.audio
            if not streams:
                raise AudioFormatError("the file has no audio stream")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            frames = itertools.chain(container.decode(streams[0]), [None])  # None: what the resampler still holds
            for frame in frames:
                for out in resampler.resample(frame):
                    samples = out.to_ndarray().reshape(-1)
                    total += samples.size
                    if limit is not None and total > limit:
                        raise AudioTooLong(f"the audio is longer than {max_seconds:g} s")
                    pending.append(samples)
                    held += samples.size
                if held >= chunk_samples or (frame is None and held):
                    yield _checked(np.concatenate(pending))
                    pending, held = [], 0
    except AudioFormatError:
        raise
    except (av.FFmpegError, ValueError, EOFError, OSError) as e:
        raise AudioFormatError(f"not a decodable audio file ({type(e).__name__})") from None


def _checked(chunk: np.ndarray) -> np.ndarray:
    if not np.isfinite(chunk).all():
        raise AudioFormatError("the file decodes to non-finite samples")
    return np.clip(chunk.astype(np.float32, copy=False), -1.0, 1.0)
