"""Per-chunk cost of the event-loop side of a session: decode, resample, endpoint.

    python bench/audio_path_bench.py

Times each step on 20 ms chunks of real speech (the clips in tests/data, looped) and
prints microseconds per 20 ms chunk. This is the work the event loop does per client
message; the model runs elsewhere (the batcher's worker thread).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.audio.codecs import decode, encode_mulaw  # noqa: E402
from server.audio.resample import StreamResampler, resample  # noqa: E402
from server.audio.wavfile import read_wav  # noqa: E402
from server.config import VadConfig  # noqa: E402
from server.vad.endpointer import Endpointer, EndpointerSettings  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


def per_chunk_us(fn, chunks) -> float:
    t = time.perf_counter()
    for c in chunks:
        fn(c)
    return (time.perf_counter() - t) / len(chunks) * 1e6


def main() -> None:
    speech = np.concatenate([read_wav(p)[0] for p in sorted(DATA.glob("*.wav"))])
    s16 = (speech * 32767).astype("<i2").tobytes()
    chunks16 = [s16[i : i + 640] for i in range(0, len(s16) - 640, 640)]
    x48 = resample(speech, 16000, 48000)
    chunks48 = [x48[i : i + 960] for i in range(0, len(x48) - 960, 960)]
    mu8 = encode_mulaw(resample(speech, 16000, 8000))
    chunks8 = [mu8[i : i + 160] for i in range(0, len(mu8) - 160, 160)]
    ep = Endpointer(EndpointerSettings.from_config(VadConfig()))
    r48 = StreamResampler(48000)
    rows = [
        ("decode pcm_s16le 16 kHz", per_chunk_us(lambda c: decode(c, "pcm_s16le"), chunks16)),
        ("decode mulaw 8 kHz", per_chunk_us(lambda c: decode(c, "mulaw"), chunks8)),
        ("resample 48 -> 16 kHz (streaming)", per_chunk_us(r48.process, chunks48)),
        ("endpointer (webrtcvad, 30 ms frames)", per_chunk_us(ep.feed, [decode(c, "pcm_s16le") for c in chunks16])),
    ]
    print(f"{len(chunks16)} chunks of 20 ms ({len(speech) / 16000:.0f} s of speech)")
    for name, us in rows:
        print(f"| {name} | {us:.1f} µs per 20 ms chunk |")


if __name__ == "__main__":
    main()
