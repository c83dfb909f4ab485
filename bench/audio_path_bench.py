"""Per-chunk cost of the event-loop side of a session: decode, resample, endpoint.

    python bench/audio_path_bench.py

Times each step on 20 ms chunks of real speech (the clips in tests/data, looped) and
prints microseconds per 20 ms chunk, including what the telephony bridges add per frame
(Twilio's JSON and base64, AudioSocket's header). This is the work the event loop does per client
message; the model runs elsewhere (the batcher's worker thread).
"""

from __future__ import annotations

import base64
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.audio.codecs import decode, encode_mulaw  # noqa: E402
from server.audio.resample import StreamResampler, resample  # noqa: E402
from server.audio.wavfile import read_wav  # noqa: E402
from server.config import VadConfig  # noqa: E402
from server.protocol import twilio  # noqa: E402
from server.protocol.audiosocket import FrameParser, encode as audiosocket_frame  # noqa: E402
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
    r8 = StreamResampler(8000)
    # What the telephony bridges add per 20 ms frame and track, before the shared path above:
    # Twilio's JSON text with base64 mu-law, AudioSocket's binary header.
    twilio_frames = [json.dumps({"event": "media", "sequenceNumber": str(i), "streamSid": "MZ" + "0" * 32,
                                 "media": {"track": "inbound", "chunk": str(i), "timestamp": str(20 * i),
                                           "payload": base64.b64encode(c).decode()}}) for i, c in enumerate(chunks8)]
    pcm8 = (resample(speech, 16000, 8000) * 32767).astype("<i2").tobytes()
    socket_frames = [audiosocket_frame(0x10, pcm8[i : i + 320]) for i in range(0, len(pcm8) - 320, 320)]
    parser = FrameParser()
    rows = [
        ("decode pcm_s16le 16 kHz", per_chunk_us(lambda c: decode(c, "pcm_s16le"), chunks16)),
        ("decode mulaw 8 kHz", per_chunk_us(lambda c: decode(c, "mulaw"), chunks8)),
        ("resample 48 -> 16 kHz (streaming)", per_chunk_us(r48.process, chunks48)),
        ("endpointer (webrtcvad, 30 ms frames)", per_chunk_us(ep.feed, [decode(c, "pcm_s16le") for c in chunks16])),
        ("resample 8 -> 16 kHz (streaming)", per_chunk_us(r8.process, [decode(c, "mulaw") for c in chunks8])),
        ("Twilio media frame: JSON + base64 (protocol.twilio.parse)", per_chunk_us(twilio.parse, twilio_frames)),
        ("AudioSocket audio frame (FrameParser.feed)", per_chunk_us(parser.feed, socket_frames)),
    ]
    print(f"{len(chunks16)} chunks of 20 ms ({len(speech) / 16000:.0f} s of speech)")
    for name, us in rows:
        print(f"| {name} | {us:.1f} µs per 20 ms chunk |")


if __name__ == "__main__":
    main()
