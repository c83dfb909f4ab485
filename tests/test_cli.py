"""The `chorus` command line, run as a user would run it (a subprocess): each `chorus transcribe`
here builds and loads its own model, so one run carries several files (in-process CLI tests with
the session's loaded model: tests/test_transcribe_cli.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import wave
from pathlib import Path

import numpy as np

from server.wer import word_error_rate
from tests.serverharness import CLIPS, TRANSCRIPTS, read_clip

ROOT = Path(__file__).resolve().parent.parent


def chorus(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def write_wav(path: Path, audio: np.ndarray, rate: int) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())


def test_transcribe_short_clip_and_long_file_at_another_rate_and_a_bad_file(tmp_path):
    """One bad file among good ones: its error is clear and does not stop the others."""
    from server.audio.resample import resample

    # A 44.1 kHz file longer than Whisper's 30 s window: the CLI resamples it and cuts it at pauses.
    names = [c.name for c in CLIPS if c.name != "jfk.wav"] + ["jfk.wav"]
    gap = np.zeros(16000, np.float32)
    long16 = np.concatenate([part for n in names for part in (read_clip(CLIPS[[c.name for c in CLIPS].index(n)]), gap)])
    assert len(long16) / 16000 > 30
    long_path = tmp_path / "long.wav"
    write_wav(long_path, resample(long16, 16000, 44100), 44100)

    bad = tmp_path / "notes.txt"
    bad.write_text("not audio")
    r = chorus("transcribe", "--json", str(bad), "tests/data/jfk.wav", str(long_path))
    assert r.returncode == 1, r.stderr
    assert f"error: {bad}: " in r.stderr and "Traceback" not in r.stderr, r.stderr
    jfk, long = [json.loads(line) for line in r.stdout.strip().splitlines()]
    assert (jfk["file"], long["file"]) == ("tests/data/jfk.wav", str(long_path)), r.stdout[:300]
    assert word_error_rate([TRANSCRIPTS["jfk.wav"]], [jfk["text"]]) <= 0.05, jfk["text"]
    assert len(long["segments"]) >= 2
    # Word times are on the file's clock: ascending across segments, each inside its segment's audio.
    words = [w for seg in long["segments"] for w in seg["words"]]
    assert " ".join(w["word"] for w in words) == " ".join(seg["text"] for seg in long["segments"] if seg["text"])
    assert all(a["end_ms"] <= b["start_ms"] for a, b in zip(words, words[1:]))
    assert words[-1]["end_ms"] <= long["seconds"] * 1000
    assert all(w["start_ms"] >= seg["start_ms"] for seg in long["segments"] for w in seg["words"])
    assert any(seg["start_ms"] > 0 and seg["words"] for seg in long["segments"])  # offsets were added
    ref = " ".join(TRANSCRIPTS[n] for n in names)
    assert word_error_rate([ref], [long["text"]]) <= 0.05, long["text"]


def test_transcribe_errors_are_clear():
    # A bad file among good ones: test_transcribe_short_clip_and_long_file_at_another_rate_and_a_bad_file.
    r = chorus("transcribe", "--set", "runner.name=wav2vec", "tests/data/jfk.wav")
    assert r.returncode == 2 and "runner.name" in r.stderr


def test_config_doc_lists_every_knob():
    r = chorus("config", "--doc")
    assert r.returncode == 0 and "batcher.partial_interval_ms" in r.stdout and "vad.endpoint_ms" in r.stdout
