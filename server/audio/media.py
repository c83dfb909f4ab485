"""Audio files of any common container and codec -> 16 kHz mono float32, via PyAV (FFmpeg).

Used where a client sends a whole file rather than a PCM stream: the transcription API and
`chorus transcribe` (through server/files/job.py), FunASR offline clients with a
``wav_format`` such as wav, mp3, m4a, ogg (server/transport/funasr.py). Every one of them
decodes as it reads, in chunks: FFmpeg's own resampler converts frame by frame, so nothing but
one chunk of the 16 kHz result is held, however long the file.

What a file may cost is checked before its first frame is decoded: a sample rate outside
MIN_RATE..MAX_RATE is refused (a WAV header claiming 1 Hz would make 16000 samples of every
sample in the file), and so is a declared duration over the caller's limit. The declared
duration can be wrong, so the decoded samples are counted too.
Blocking: call it from a worker thread, never on the event loop.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import BinaryIO, Iterator

import av
import numpy as np

from server.audio.codecs import AudioFormatError
from server.audio.wavfile import MAX_RATE, MIN_RATE

SAMPLE_RATE = 16000


class AudioTooLong(AudioFormatError):
    """The file's audio is longer than the limit it was decoded under."""


def iter_file(source: str | Path | BinaryIO, max_seconds: float | None = None,
              chunk_samples: int = 10 * SAMPLE_RATE) -> Iterator[np.ndarray]:
    """Decode a file (a path or a binary file object) as it is read, yielding 16 kHz mono
    float32 chunks of about ``chunk_samples`` (the last may be shorter), clipped to [-1, 1]:
    an hour of audio never sits in memory at once. Raises AudioFormatError for anything that
    is not decodable audio, a sample rate outside MIN_RATE..MAX_RATE, and non-finite samples;
    AudioTooLong for audio longer than ``max_seconds``, before decoding when the file declares
    its duration, else as soon as the decode passes it."""
    limit = None if max_seconds is None else int(max_seconds * SAMPLE_RATE)
    total = 0
    pending: list[np.ndarray] = []
    held = 0
    try:
        with av.open(str(source) if isinstance(source, (str, Path)) else source, mode="r") as container:
            streams = container.streams.audio
            if not streams:
                raise AudioFormatError("the file has no audio stream")
            _check_header(container, streams[0], max_seconds)
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            frames = itertools.chain(container.decode(streams[0]), [None])  # None: what the resampler still holds
            for frame in frames:
                if frame is not None and not MIN_RATE <= frame.sample_rate <= MAX_RATE:
                    # A stream may change its rate mid-way (chained Ogg, ADTS): each frame is checked.
                    raise AudioFormatError(_bad_rate(frame.sample_rate))
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


def _check_header(container: av.container.InputContainer, stream: av.audio.stream.AudioStream,
                  max_seconds: float | None) -> None:
    """Refuse, before decoding, what the file itself says is too costly."""
    rate = stream.sample_rate or stream.codec_context.sample_rate
    if rate and not MIN_RATE <= rate <= MAX_RATE:
        raise AudioFormatError(_bad_rate(rate))
    if max_seconds is None:
        return
    # The container's duration (FFmpeg's AV_TIME_BASE, microseconds), else the stream's; for a
    # WAV it is the data actually present, whatever its header's size field says.
    declared = None
    if container.duration is not None and container.duration > 0:
        declared = container.duration / 1_000_000
    elif stream.duration is not None and stream.duration > 0 and stream.time_base is not None:
        declared = float(stream.duration * stream.time_base)
    if declared is not None and declared > max_seconds:
        raise AudioTooLong(f"the audio is {declared:.0f} s long, longer than {max_seconds:g} s")


def _bad_rate(rate: int) -> str:
    return f"unsupported sample rate {rate} Hz (supported: {MIN_RATE} to {MAX_RATE} Hz)"


def _checked(chunk: np.ndarray) -> np.ndarray:
    if not np.isfinite(chunk).all():
        raise AudioFormatError("the file decodes to non-finite samples")
    return np.clip(chunk.astype(np.float32, copy=False), -1.0, 1.0)
