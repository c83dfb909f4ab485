"""Audio files of any common container and codec -> 16 kHz mono float32, via PyAV (FFmpeg).

Used where a client sends a whole file rather than a PCM stream (FunASR offline clients
with a ``wav_format`` such as wav, mp3, m4a, ogg). FFmpeg's own resampler does the
conversion while decoding, frame by frame, so nothing but the 16 kHz result is held.
Blocking: call it from a worker thread, never on the event loop.
"""

from __future__ import annotations

import io

import av
import numpy as np

from server.audio.codecs import AudioFormatError

SAMPLE_RATE = 16000


def decode_file(data: bytes, max_seconds: float | None = None) -> np.ndarray:
    """Decode a complete file held in memory. Raises AudioFormatError for anything that is
    not decodable audio, and for audio longer than ``max_seconds``."""
    limit = None if max_seconds is None else int(max_seconds * SAMPLE_RATE)
    chunks: list[np.ndarray] = []
    total = 0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            streams = container.streams.audio
            if not streams:
                raise AudioFormatError("the file has no audio stream")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            for frame in container.decode(streams[0]):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    total += chunks[-1].size
                if limit is not None and total > limit:
                    raise AudioFormatError(f"the file is longer than {max_seconds:g} s")
            for out in resampler.resample(None):  # what the resampler still holds
                chunks.append(out.to_ndarray().reshape(-1))
    except AudioFormatError:
        raise
    except (av.FFmpegError, ValueError, EOFError, OSError) as e:
        raise AudioFormatError(f"not a decodable audio file ({type(e).__name__})") from None
    if not chunks:
        raise AudioFormatError("the file holds no audio samples")
    audio = np.concatenate(chunks).astype(np.float32, copy=False)
    if not np.isfinite(audio).all():
        raise AudioFormatError("the file decodes to non-finite samples")
    return np.clip(audio, -1.0, 1.0)
