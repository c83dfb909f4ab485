"""CPU cost of streaming resampling to 16 kHz, per 20 ms chunk and per new stream.

    python bench/resample_bench.py                          # server/audio/resample.py as it is
    python bench/resample_bench.py --old /tmp/old_resample.py   # and an older copy, side by side

For each input rate (8000, 44100, 48000 Hz by default) it feeds 20 ms chunks of real speech
(the clips in tests/data, looped) through ``StreamResampler(rate, 16000).process`` and prints
the CPU time per chunk (this work runs on the asyncio event loop, once per client message),
and the cost of starting a stream: the constructor, and the constructor plus the first chunk.
Raw ``soxr.ResampleStream`` at 'HQ' and 'VHQ' is timed too (the quality choice in
resample.py). With ``--old PATH`` the module at PATH (a copy of an earlier resample.py) is
loaded under another name and timed in the same run; the last column is old / current.

CPU time is this thread's (``time.thread_time``); every figure is the median of --repeats
passes. Figures are only comparable within one run on one machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

import numpy as np
import soxr

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.audio import resample as current  # noqa: E402
from server.audio.wavfile import read_wav  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
OUT_RATE = 16000


def load_module(path: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("old_resample", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--old {path}: cannot load a Python module from it")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def speech_at(rate: int, seconds: float) -> np.ndarray:
    """`seconds` of real speech at `rate`, converted by soxr 'VHQ' (neither implementation under test)."""
    x16 = np.concatenate([read_wav(p)[0] for p in sorted(DATA.glob("*.wav"))])
    x16 = np.tile(x16, int(np.ceil(seconds * 16000 / len(x16))))[: int(seconds * 16000)]
    return soxr.resample(x16, 16000, rate, quality="VHQ").astype(np.float32)


def cpu_us(fn: Callable[[], object], n: int) -> float:
    """CPU microseconds of this thread per call of fn, over n calls."""
    t = time.thread_time_ns()
    for _ in range(n):
        fn()
    return (time.thread_time_ns() - t) / n / 1e3


def median_of(repeats: int, f: Callable[[], float]) -> float:
    return statistics.median(f() for _ in range(repeats))


class Impl:
    """One thing to time: make() builds a fresh stream object, feed(obj, chunk) runs one chunk."""

    def __init__(self, name: str, make: Callable[[int], object], feed: Callable[[object, np.ndarray], object],
                 reset: Callable[[], None] = lambda: None) -> None:
        self.name, self.make, self.feed, self.reset = name, make, feed, reset


def impls(old: ModuleType | None) -> list[Impl]:
    out = [Impl("current resample.py", lambda r: current.StreamResampler(r, OUT_RATE), lambda s, c: s.process(c))]
    for q in ("HQ", "VHQ"):
        out.append(Impl(f"raw soxr {q}", lambda r, q=q: soxr.ResampleStream(r, OUT_RATE, 1, dtype="float32", quality=q),
                        lambda s, c: s.resample_chunk(c)))
    if old is not None:
        # The old module caches one filter table per rate pair; reset() clears it for the "cold" start.
        cache = getattr(old, "_kernel", None)
        out.append(Impl("old resample.py", lambda r: old.StreamResampler(r, OUT_RATE), lambda s, c: s.process(c),
                        reset=getattr(cache, "cache_clear", lambda: None)))
    return out


def bench_rate(impl: Impl, rate: int, x: np.ndarray, repeats: int, streams: int) -> dict[str, float]:
    step = rate // 50  # 20 ms
    chunks = [x[i : i + step] for i in range(0, len(x) - step + 1, step)]

    def steady() -> float:
        s = impl.make(rate)
        impl.feed(s, chunks[0])  # warm-up: first-call setup is counted under "start" below
        it = iter(chunks[1:])
        return cpu_us(lambda: impl.feed(s, next(it)), len(chunks) - 1)

    def ctor() -> float:
        impl.make(rate)
        return cpu_us(lambda: impl.make(rate), streams)

    def start() -> float:  # constructor + first 20 ms chunk: what a new session pays up front
        impl.make(rate)
        return cpu_us(lambda: impl.feed(impl.make(rate), chunks[0]), streams)

    def cold_start() -> float:  # same, with any per-rate-pair cache cleared first
        def one() -> None:
            impl.reset()
            impl.feed(impl.make(rate), chunks[0])
        return cpu_us(one, max(1, streams // 10))

    return {"chunk": median_of(repeats, steady), "ctor": median_of(repeats, ctor),
            "start": median_of(repeats, start), "cold": median_of(repeats, cold_start)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", metavar="PATH", help="a copy of an older server/audio/resample.py to time side by side")
    ap.add_argument("--rates", default="8000,44100,48000", help="input rates in Hz, comma-separated")
    ap.add_argument("--seconds", type=float, default=30.0, help="audio per steady-state pass")
    ap.add_argument("--repeats", type=int, default=5, help="passes per figure; the median is printed")
    ap.add_argument("--streams", type=int, default=200, help="streams started per construction pass")
    args = ap.parse_args()

    old = load_module(args.old) if args.old else None
    rates = [int(r) for r in args.rates.split(",")]
    print(f"python {platform.python_version()}, numpy {np.__version__}, soxr {soxr.__version__}, "
          f"{platform.machine()}, {os.cpu_count()} CPUs; {args.seconds:g} s of speech per pass, "
          f"median of {args.repeats} passes; CPU time of this thread")
    print()
    print("| input Hz | implementation | µs CPU per 20 ms chunk | new stream: constructor µs "
          "| constructor + first chunk µs | same, per-rate caches cleared µs |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    results: dict[tuple[int, str], dict[str, float]] = {}
    for rate in rates:
        x = speech_at(rate, args.seconds)
        for impl in impls(old):
            r = results[rate, impl.name] = bench_rate(impl, rate, x, args.repeats, args.streams)
            print(f"| {rate} | {impl.name} | {r['chunk']:.1f} | {r['ctor']:.1f} | {r['start']:.1f} | {r['cold']:.1f} |",
                  flush=True)
    if old is not None:
        print()
        print("| input Hz | old / current, per chunk | old / current, constructor + first chunk "
              "| old / current, caches cleared |")
        print("| ---: | ---: | ---: | ---: |")
        for rate in rates:
            o, c = results[rate, "old resample.py"], results[rate, "current resample.py"]
            print(f"| {rate} | {o['chunk'] / c['chunk']:.2f}x | {o['start'] / c['start']:.2f}x "
                  f"| {o['cold'] / c['cold']:.2f}x |")


if __name__ == "__main__":
    main()
