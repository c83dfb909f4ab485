"""Map the server's audio clock back to the wall time at which that audio was sent."""

from __future__ import annotations

import asyncio
import bisect
import math
import time
from typing import Any, Callable


class SendClock:
    """Records (samples sent so far, wall time) per chunk; answers "when was ms X sent?"."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._ends: list[int] = []  # cumulative samples after each chunk
        self._times: list[float] = []
        self._total = 0

    def sent(self, samples: int, at: float) -> None:
        self._total += samples
        self._ends.append(self._total)
        self._times.append(at)

    def sent_at(self, stream_ms: float) -> float | None:
        """Wall time at which the chunk holding `stream_ms` of audio was sent."""
        sample = int(stream_ms * self.rate / 1000)
        i = bisect.bisect_left(self._ends, sample)
        if i >= len(self._ends):
            return self._times[-1] if self._times else None
        return self._times[i]

    def latency_ms(self, cut_ms: float, arrived: float) -> float | None:
        t = self.sent_at(cut_ms)
        return None if t is None else (arrived - t) * 1000.0


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


async def send_paced(
    ws: Any,
    samples: Any,
    rate: int,
    chunk_ms: int,
    speed: float = 1.0,
    encode: Callable[[Any], bytes] = lambda chunk: chunk.tobytes(),
    clock: SendClock | None = None,
) -> None:
    """Send `samples` in chunk_ms pieces at `speed` x real time.

    Deadlines are absolute (start + k * chunk / speed), so a slow send never accumulates
    drift; `clock`, if given, records when each chunk left.
    """
    step = rate * chunk_ms // 1000
    t0 = time.monotonic()
    for k, i in enumerate(range(0, len(samples), step)):
        delay = t0 + k * chunk_ms / 1000 / speed - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        chunk = samples[i : i + step]
        await ws.send(encode(chunk))
        if clock is not None:
            clock.sent(len(chunk), time.monotonic())
