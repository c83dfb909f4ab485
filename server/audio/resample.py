"""Band-limited rational resampling (polyphase windowed sinc), streaming or one-shot.

Output sample ``n`` lies at input time ``t = n * in_rate / out_rate``; it is the sum of
the input samples around ``t`` weighted by a Kaiser-windowed sinc whose cutoff sits a
little below the lower of the two Nyquist frequencies (anti-aliasing when going down,
anti-imaging when going up). With ``out/in = L/M`` in lowest terms, ``t`` only takes
``L`` fractional offsets, so the filter is a table of ``L`` phases computed once per
rate pair and shared by every stream.

The filter is centred on ``t`` (zero phase): output and input stay aligned in time,
and a stream only has to wait for ``H`` input samples of look-ahead (1 ms at 48 kHz).
Every output sample is computed from the same inputs with the same arithmetic however
the input is chunked, so streaming output is bit-identical to one-shot output.
"""

from __future__ import annotations

import functools
import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

# Zero crossings of the sinc on each side of the centre (at the lower rate): the
# transition band is about 1/ZERO_CROSSINGS of Nyquist wide.
ZERO_CROSSINGS = 16
# Cutoff as a fraction of the lower Nyquist: the transition band ends near Nyquist,
# so little aliasing folds back into the speech band.
ROLLOFF = 0.94
KAISER_BETA = 8.0
# Phase tables larger than this (odd rate pairs such as 44099 -> 16000) are not
# cached; their coefficients are computed per output sample instead.
_MAX_TABLE_ENTRIES = 1 << 21


class _Kernel:
    """Filter geometry of one rate pair: L, M, half-width H and (maybe) the phase table."""

    def __init__(self, in_rate: int, out_rate: int) -> None:
        g = math.gcd(in_rate, out_rate)
        self.up = out_rate // g  # L
        self.down = in_rate // g  # M
        self.scale = min(1.0, self.up / self.down) * ROLLOFF
        self.half = int(math.ceil(ZERO_CROSSINGS / self.scale))  # H: taps each side, in input samples
        self.taps = 2 * self.half
        if self.up * self.taps <= _MAX_TABLE_ENTRIES:
            self.table: np.ndarray | None = self.coefficients(np.arange(self.up))
        else:
            self.table = None

    def coefficients(self, phases: np.ndarray) -> np.ndarray:
        """(len(phases), taps) float32 filter rows; row sums are 1 (unit DC gain)."""
        # Tap j multiplies input k = floor(t) - H + 1 + j, at distance d = t - k.
        d = phases[:, None] / self.up + (self.half - 1 - np.arange(self.taps))[None, :]
        arg = np.clip(1.0 - (d / self.half) ** 2, 0.0, None)
        h = np.sinc(self.scale * d) * np.i0(KAISER_BETA * np.sqrt(arg))
        h /= h.sum(axis=1, keepdims=True)
        return h.astype(np.float32)

    def rows(self, phases: np.ndarray) -> np.ndarray:
        return self.table[phases] if self.table is not None else self.coefficients(phases)


@functools.lru_cache(maxsize=32)
def _kernel(in_rate: int, out_rate: int) -> _Kernel:
    return _Kernel(in_rate, out_rate)


class StreamResampler:
    """Resample one live stream chunk by chunk; ``process`` then ``flush`` at end of stream."""

    def __init__(self, in_rate: int, out_rate: int = 16000) -> None:
        if in_rate <= 0 or out_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {in_rate} -> {out_rate}")
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._passthrough = in_rate == out_rate
        if self._passthrough:
            return
        self._k = _kernel(in_rate, out_rate)
        h = self._k.half
        # Input history: absolute index of _buf[0]; H-1 zeros stand for the time before the stream.
        self._buf = np.zeros(h - 1, dtype=np.float32)
        self._buf_start = -(h - 1)
        self._n_in = 0  # input samples received
        self._n_out = 0  # next output index
        self._flushed = False

    def process(self, x: np.ndarray) -> np.ndarray:
        """Feed float32 samples; returns every output sample whose inputs are now all known."""
        x = np.asarray(x, dtype=np.float32).reshape(-1)
        if self._passthrough:
            return x.copy()
        if self._flushed:
            raise RuntimeError("StreamResampler.process() after flush()")
        self._n_in += len(x)
        self._buf = np.concatenate((self._buf, x)) if len(x) else self._buf
        last_known = self._buf_start + len(self._buf) - 1
        # Output n needs inputs up to floor(n*M/L) + H: it is ready when that is <= last_known.
        return self._emit(self._count_ready(last_known - self._k.half))

    def flush(self) -> np.ndarray:
        """End of stream: emit the remaining ceil(total_in * L / M) outputs (zeros beyond the end)."""
        if self._passthrough or self._flushed:
            return np.zeros(0, dtype=np.float32)
        self._flushed = True
        k = self._k
        self._buf = np.concatenate((self._buf, np.zeros(k.half + 1, dtype=np.float32)))
        total = -(-self._n_in * k.up // k.down)
        return self._emit(total)

    def _count_ready(self, max_floor: int) -> int:
        """Number of outputs n (from 0) with floor(n*M/L) <= max_floor."""
        if max_floor < 0:
            return 0
        return ((max_floor + 1) * self._k.up - 1) // self._k.down + 1

    def _emit(self, n_end: int) -> np.ndarray:
        k = self._k
        n0 = self._n_out
        if n_end <= n0:
            return np.zeros(0, dtype=np.float32)
        pos = np.arange(n0, n_end, dtype=np.int64) * k.down
        first = pos // k.up - (k.half - 1) - self._buf_start  # first tap of each output, in _buf
        windows = sliding_window_view(self._buf, k.taps)[first]
        # einsum, not a BLAS matrix-vector product: BLAS may block rows differently for
        # different batch sizes, and then chunked output would differ in the last bit.
        out = np.einsum("ij,ij->i", windows, k.rows(pos % k.up))
        self._n_out = n_end
        # Keep only the history the next output still needs.
        keep_from = (n_end * k.down) // k.up - (k.half - 1)
        drop = keep_from - self._buf_start
        if drop > 0:
            self._buf = self._buf[drop:].copy()
            self._buf_start = keep_from
        return out.astype(np.float32, copy=False)


def resample(x: np.ndarray, in_rate: int, out_rate: int = 16000) -> np.ndarray:
    """One-shot resampling of a whole signal (same samples as streaming it)."""
    r = StreamResampler(in_rate, out_rate)
    head = r.process(x)
    tail = r.flush()
    return np.concatenate((head, tail)) if len(tail) else head
