"""Sample-rate conversion to the model's 16 kHz, streaming or one-shot, over libsoxr.

``StreamResampler`` converts one live stream chunk by chunk (``process`` per client message,
``flush`` at end of stream); ``resample`` converts a whole signal (WAV files, tests).
Both take and return float32 mono.

Why soxr: band-limited resampling is a solved problem, and libsoxr (through python-soxr)
solves it in C with a well-tested filter design, for any rate pair, in a few microseconds per
20 ms chunk. The hand-written polyphase resampler it replaces ran in NumPy on the asyncio
event loop: about 35-45 µs per 20 ms chunk at 8/44.1/48 kHz (soxr 'HQ': 3-7 µs), and for odd
rate pairs it either built a large per-rate-pair table (7.8 MiB for 60013 Hz) or computed filter
coefficients per output sample (5-14 ms CPU per 20 ms chunk at 191999 Hz). ``bench/resample_bench.py``
measures both side by side.

Behaviour worth knowing:

* Output is delay-compensated: sample ``n`` of the output lies at input time
  ``n * in_rate / out_rate`` (a click stays where it was), and streaming output equals
  one-shot output. The total length is ``round(len(x) * out_rate / in_rate)``.
* A linear-phase filter needs look-ahead, and libsoxr works in internal blocks, so a stream
  holds some output back until enough input has arrived (``flush`` releases it). At 'HQ' with
  20 ms chunks to 16 kHz this is about 21 ms on average (37 ms at most) at 48 kHz, 23 ms (40 ms)
  at 44.1 kHz and 64 ms (115 ms) at 8 kHz; the old resampler held back 1-2 ms. This is
  latency added before the endpointer sees the audio of a non-16-kHz stream.
"""

from __future__ import annotations

import numpy as np
import soxr

# Input rates the server accepts from clients (the protocol layer enforces this list).
STANDARD_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 96000)

# soxr 'HQ' (20-bit precision, linear phase): for conversion to 16 kHz it is flat (within
# 0.01 dB) up to 7.3 kHz, -3 dB near 7.6 kHz, and attenuates everything at or above the new
# 8 kHz Nyquist by more than 130 dB -- far beyond what a speech model, or float32 audio from a
# 16-bit source (about 96 dB of dynamic range), can tell apart. 'VHQ' (28-bit) only deepens that
# stop band, yet costs 2-3x more per new stream (about 90 vs 30 µs at 48 kHz), about 15% more
# per chunk, and about twice the held-back latency at 44.1/48 kHz (42 vs 21 ms on average).
# Lower settings buy nothing here: 'MQ' costs the same per chunk with the same latency and a
# shallower stop band, 'LQ' already cuts 7 kHz by about 13 dB, and 'QQ' does not filter at all
# (a 9 kHz tone at 48 kHz comes through as 7 kHz at full level).
QUALITY = "HQ"

_EMPTY = np.zeros(0, dtype=np.float32)


def _check_rates(in_rate: int, out_rate: int) -> None:
    if in_rate <= 0 or out_rate <= 0:
        raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")


def _as_float32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(-1))


class StreamResampler:
    """Resample one live stream chunk by chunk; ``process`` then ``flush`` at end of stream."""

    def __init__(self, in_rate: int, out_rate: int = 16000) -> None:
        _check_rates(in_rate, out_rate)
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._passthrough = in_rate == out_rate
        self._flushed = False
        self._stream = (
            None if self._passthrough
            else soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality=QUALITY)
        )

    def process(self, x: np.ndarray) -> np.ndarray:
        """Feed samples (converted to float32); returns the float32 output that is ready now.

        The output may be shorter than ``len(x) * out_rate / in_rate`` (or empty) while the
        filter waits for look-ahead; ``flush`` returns what is still held back."""
        x = _as_float32(x)
        if self._passthrough:
            return x.copy()
        if self._flushed:
            raise RuntimeError("StreamResampler.process() after flush()")
        if not len(x):
            return _EMPTY.copy()
        return self._stream.resample_chunk(x)

    def flush(self) -> np.ndarray:
        """End of stream: the remaining output (the input's end is padded with silence)."""
        if self._passthrough or self._flushed:
            return _EMPTY.copy()
        self._flushed = True
        return self._stream.resample_chunk(_EMPTY, last=True)


def resample(x: np.ndarray, in_rate: int, out_rate: int = 16000) -> np.ndarray:
    """One-shot resampling of a whole signal to float32 (same samples as streaming it)."""
    _check_rates(in_rate, out_rate)
    x = _as_float32(x)
    if in_rate == out_rate:
        return x.copy()
    return soxr.resample(x, in_rate, out_rate, quality=QUALITY)
