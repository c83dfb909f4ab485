"""FileJob: a recording decoded as read, cut at pauses, batched at the lowest priority,
stitched in order, with bounded memory.

The model is a stand-in here (as in tests/test_batcher.py) because these tests are about
how a recording's segments flow; real text through the real model is tests/test_api.py.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from server.batcher import MicroBatcher
from server.config import BatcherConfig, FilesConfig, RunnerConfig, VadConfig
from server.files.job import FileError, FileJob, segment_settings
from server.metrics import Metrics
from server.runners.base import ItemError, ItemOptions, ModelRunner, Transcript, Word
from tests.audiofiles import encode
from tests.serverharness import CLIPS, read_clip

ROOT = Path(__file__).parent.parent


class LengthRunner(ModelRunner):
    """Answers each item with its length in ms (and one word spanning it); an item of a length
    in ``fail_ms`` fails alone."""

    name = "length"
    max_item_seconds = 30.0

    def __init__(self, fail_ms: set[int] = frozenset(), delay: float = 0.0) -> None:
        super().__init__(RunnerConfig())
        self.fail_ms = fail_ms
        self.delay = delay
        self.calls: list[int] = []

    def load(self) -> None:
        pass

    def transcribe(self, audios, options):
        import time

        time.sleep(self.delay)
        self.calls.append(len(audios))
        out = []
        for a in audios:
            ms = len(a) // 16
            out.append(ItemError("bad_audio", "no") if ms in self.fail_ms
                       else Transcript(f"len{ms}", "en", {"avg_logprob": -0.2}, [Word(f"len{ms}", 0, ms)]))
        return out


def speech_with_pauses() -> tuple[np.ndarray, int]:
    """The clips with 1 s pauses between them, and how many clips."""
    parts = []
    for path in CLIPS:
        parts += [read_clip(path), np.zeros(16000, np.float32)]
    return np.concatenate(parts), len(CLIPS)


async def transcribe(runner: ModelRunner, data, files: FilesConfig = FilesConfig(), on_segment=None, **batcher):
    b = MicroBatcher(runner, BatcherConfig(batch_wait_ms=1.0, **batcher), Metrics())
    b.start(asyncio.get_running_loop())
    try:
        job = FileJob(b, segment_settings(VadConfig(), files, runner.max_item_seconds), files, ItemOptions(), on_segment)
        return await job.run(data)
    finally:
        b.stop()


def test_segments_come_in_order_on_the_files_clock_and_batch_together(tmp_path):
    audio, clips = speech_with_pauses()
    path = tmp_path / "talk.flac"
    path.write_bytes(encode(audio, "flac")[1])
    runner = LengthRunner(delay=0.05)  # slower than the decoder, as a model is: segments wait together
    seen = []
    t = asyncio.run(transcribe(runner, path, on_segment=seen.append))
    assert len(t.segments) >= clips and seen == t.segments
    assert abs(t.duration_s - len(audio) / 16000) < 0.05
    prev = 0
    for i, s in enumerate(t.segments):
        assert s.id == i and prev <= s.start_ms < s.end_ms <= t.duration_s * 1000, s
        assert s.text == f"len{s.end_ms - s.start_ms}"  # each segment got its own item's result
        assert s.words == [Word(s.text, s.start_ms, s.end_ms)]  # word times moved onto the file's clock
        prev = s.end_ms
    assert t.text == " ".join(s.text for s in t.segments)
    assert sum(runner.calls) == len(t.segments) and len(runner.calls) < len(t.segments)  # batched


def test_a_segment_that_fails_alone_keeps_its_place_and_the_rest_their_text(tmp_path):
    audio, _ = speech_with_pauses()
    first = asyncio.run(transcribe(LengthRunner(), _file(tmp_path, audio)))
    victim = first.segments[1]
    t = asyncio.run(transcribe(LengthRunner(fail_ms={victim.end_ms - victim.start_ms}), _file(tmp_path, audio)))
    assert [s.start_ms for s in t.segments] == [s.start_ms for s in first.segments]
    assert t.segments[1].error == "bad_audio" and t.segments[1].text == ""
    assert all(s.text and not s.error for i, s in enumerate(t.segments) if i != 1)


def _file(tmp_path: Path, audio: np.ndarray) -> Path:
    path = tmp_path / "talk.wav"
    path.write_bytes(encode(audio, "wav")[1])
    return path


def test_not_audio_and_too_long_are_file_errors(tmp_path):
    bad = tmp_path / "x.mp3"
    bad.write_bytes(b"\x00\x01 definitely not audio" * 100)
    with pytest.raises(FileError) as e:
        asyncio.run(transcribe(LengthRunner(), bad))
    assert e.value.code == "bad_file"
    audio, _ = speech_with_pauses()
    with pytest.raises(FileError) as e:
        asyncio.run(transcribe(LengthRunner(), _file(tmp_path, audio), FilesConfig(max_audio_s=10)))
    assert e.value.code == "too_long"


def test_what_a_header_says_is_checked_before_any_work(tmp_path, monkeypatch):
    """The API and `chorus transcribe` share this path. 15 KB claiming 1 Hz (7500 s of audio
    once resampled) is refused from its header, and so is a file declaring more than
    `files.max_audio_s`: not one chunk of audio is decoded, and no segment reaches the model."""
    import wave

    from server.files import job as job_module

    decoded: list[int] = []
    real_iter_file = job_module.iter_file

    def counting_iter_file(*args, **kwargs):
        for chunk in real_iter_file(*args, **kwargs):
            decoded.append(len(chunk))
            yield chunk

    monkeypatch.setattr(job_module, "iter_file", counting_iter_file)

    onehz = tmp_path / "onehz.wav"
    with wave.open(str(onehz), "wb") as w:
        w.setnchannels(1); w.setsampwidth(2); w.setframerate(1)
        w.writeframes(np.random.default_rng(1).integers(-3000, 3000, 7500).astype("<i2").tobytes())
    audio, _ = speech_with_pauses()
    for path, files, code, says in ((onehz, FilesConfig(), "bad_file", "sample rate 1 Hz"),
                                    (_file(tmp_path, audio), FilesConfig(max_audio_s=10), "too_long", "s long")):
        runner = LengthRunner()
        decoded.clear()
        with pytest.raises(FileError) as e:
            asyncio.run(transcribe(runner, path, files))
        assert e.value.code == code and says in str(e.value), e.value
        assert runner.calls == [] and decoded == [], decoded


def test_decoding_waits_while_max_pending_audio_s_of_the_file_is_queued(tmp_path):
    """A slow model: the decoder must not run ahead and queue the whole file."""
    audio, _ = speech_with_pauses()
    audio = np.concatenate([audio] * 3)
    runner = LengthRunner(delay=0.05)
    files = FilesConfig(max_pending_audio_s=20.0)
    most = 0.0

    async def main():
        nonlocal most
        b = MicroBatcher(runner, BatcherConfig(batch_wait_ms=1.0, max_batch_size=1), Metrics())
        b.start(asyncio.get_running_loop())
        job = FileJob(b, segment_settings(VadConfig(), files, 30.0), files, ItemOptions())
        task = asyncio.ensure_future(job.run(_file(tmp_path, audio)))
        while not task.done():
            most = max(most, sum(len(r.audio) for r in b._files) / 16000)  # waiting in the batcher
            await asyncio.sleep(0.005)
        b.stop()
        return task.result()

    t = asyncio.run(main())
    assert len(t.segments) >= 15
    assert 0 < most <= files.max_pending_audio_s, most


def test_an_hour_long_file_is_transcribed_in_bounded_memory(tmp_path):
    """An hour of speech (115 MB as 16-bit WAV, 230 MB as float32 samples): the job's peak RSS
    stays far below what holding the decoded audio would take. Run in a fresh process so the
    peak is this job's alone."""
    script = textwrap.dedent(f"""
        import asyncio, json, sys, threading, time, wave
        import numpy as np, psutil
        sys.path.insert(0, {str(ROOT)!r})
        from tests.test_file_job import LengthRunner, speech_with_pauses, transcribe
        audio, _ = speech_with_pauses()
        pcm = (audio * 32767).astype("<i2").tobytes()
        seconds = 0.0
        with wave.open({str(tmp_path / "hour.wav")!r}, "wb") as w:  # written in pieces, never whole
            w.setnchannels(1); w.setsampwidth(2); w.setframerate(16000)
            while seconds < 3600:
                w.writeframes(pcm); seconds += len(audio) / 16000
        del pcm
        me = psutil.Process()
        base = me.memory_info().rss
        peak = base
        done = threading.Event()
        def sample():
            global peak
            while not done.is_set():
                peak = max(peak, me.memory_info().rss)
                time.sleep(0.005)
        threading.Thread(target=sample, daemon=True).start()
        t = asyncio.run(transcribe(LengthRunner(delay=0.002), {str(tmp_path / "hour.wav")!r}, max_batch_size=16))
        done.set()
        print(json.dumps({{"duration": t.duration_s, "segments": len(t.segments), "grew_mb": (peak - base) / 2**20}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["duration"] >= 3600 and result["segments"] >= 400, result
    print(result)
    assert result["grew_mb"] < 80, result  # the decoded hour alone would be 230 MB
