"""When a session asks the model for partials: never in a pause that the segment's final is
about to end (the final would wait for that partial in the model), always while speech goes on."""

from __future__ import annotations

import asyncio

import numpy as np

from server.batcher import Kind, MicroBatcher
from server.config import BatcherConfig, Config, load_config
from server.metrics import Metrics
from server.session import Session
from server.stream_config import StreamConfig
from tests.serverharness import DATA, read_clip
from tests.test_batcher import RecordingRunner

CLIPS = [read_clip(DATA / f"sense_and_sensibility_01_austen_64kb-{n}.wav") for n in ("0870", "0890", "0920", "0930")]


class _Output:
    def __init__(self) -> None:
        self.finals: list[int] = []

    def on_speech_started(self, *args) -> None: ...
    def on_partial(self, *args) -> None: ...
    def on_error(self, *args) -> None: ...

    def on_final(self, segment_id, text, start_ms, end_ms, cut_ms, fields, words) -> None:
        self.finals.append(cut_ms)


class _Submissions(MicroBatcher):
    """The real batcher, noting the stream position of every partial request."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.session: Session | None = None
        self.partials_at: list[int] = []

    def submit(self, audio, options, kind, session, stream_s: float = 0.0):
        if kind is Kind.PARTIAL:
            assert self.session is not None
            self.partials_at.append(self.session.endpointer.stream_ms)
        return super().submit(audio, options, kind, session, stream_s=stream_s)


def test_no_partial_is_requested_in_the_pause_before_a_final():
    """Four real utterances with a second of silence after each, partials due every 300 ms:
    none is asked for from 250 ms after an utterance's audio ends until the next one starts
    (the final, 500 ms into the silence, comes first), and partials keep coming while people
    speak."""
    config: Config = load_config(None, {"batcher.partial_interval_ms": "300"})
    quiet = np.zeros(16000, np.float32)
    audio = np.concatenate([quiet] + [x for c in CLIPS for x in (c, quiet)])
    pauses = []  # (start, end) ms of the silence after each clip
    pos = len(quiet)
    for c in CLIPS:
        pos += len(c)
        pauses.append((pos * 1000 // 16000, (pos + len(quiet)) * 1000 // 16000))
        pos += len(quiet)
    b = _Submissions(RecordingRunner(), BatcherConfig(batch_wait_ms=1.0), Metrics())
    out = _Output()

    async def main():
        b.start(asyncio.get_running_loop())
        try:
            s = Session(config, StreamConfig(), b, out, Metrics())  # type: ignore[arg-type]
            b.session = s
            pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
            for i in range(0, len(pcm), 3200):  # 100 ms at a time, each partial answered before the next
                s.feed_audio(pcm[i:i + 3200])
                await asyncio.sleep(0.005)
            await s.stop()
        finally:
            b.stop()

    asyncio.run(main())
    assert len(out.finals) == len(CLIPS), out.finals
    in_pauses = [t for t in b.partials_at for start, end in pauses if start + 250 <= t < end]
    assert in_pauses == [], (in_pauses, pauses)
    speech_s = sum(len(c) for c in CLIPS) / 16000
    assert len(b.partials_at) >= speech_s / 0.3 * 0.5, (len(b.partials_at), speech_s)
