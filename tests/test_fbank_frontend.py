"""The batched torch frontend against funasr's own per-utterance WavFrontend, on real clips."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from server.features.fbank import BatchFrontend, FbankOptions, load_cmvn, pad_waveforms
from server.runners.random_weights import cmvn_text

DATA = Path(__file__).parent / "data"
# Largest |ours - funasr| allowed on CMVN-normalised features (measured: ~1e-4; float32
# FFT and mel sums in a different order than kaldi-native-fbank's).
FEATURE_TOLERANCE = 1e-3


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768.0


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    full = [read_wav(p) for p in sorted(DATA.glob("*.wav"))]
    assert len(full) >= 6
    # Mixed lengths in one batch, including cuts that end mid-frame and a one-frame item.
    return full + [full[0][:16123], full[1][:401], full[2][:400 + 160 * 7], full[3][:400]]


@pytest.fixture(scope="module")
def cmvn_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cmvn") / "am.mvn"
    path.write_text(cmvn_text(560, seed=3))
    return path


def funasr_frontend(cmvn_file: Path | None):
    from funasr.frontends.wav_frontend import WavFrontend

    return WavFrontend(cmvn_file=str(cmvn_file) if cmvn_file else None, fs=16000, window="hamming", n_mels=80,
                       frame_length=25, frame_shift=10, lfr_m=7, lfr_n=6, dither=0.0)


def test_cmvn_parser_matches_funasr(cmvn_file: Path) -> None:
    from funasr.frontends.wav_frontend import load_cmvn as funasr_load_cmvn

    shift, scale = load_cmvn(cmvn_file)
    theirs = funasr_load_cmvn(str(cmvn_file)).numpy()
    assert shift.shape == (560,)
    np.testing.assert_array_equal(shift, theirs[0])
    np.testing.assert_array_equal(scale, theirs[1])


def test_cmvn_parser_rejects_other_files(tmp_path: Path) -> None:
    bad = tmp_path / "am.mvn"
    bad.write_text("<Nnet>\n</Nnet>\n")
    with pytest.raises(ValueError):
        load_cmvn(bad)


@pytest.mark.parametrize("with_cmvn", [False, True])
def test_batch_matches_funasr_wavfrontend(clips: list[np.ndarray], cmvn_file: Path, with_cmvn: bool) -> None:
    ref_frontend = funasr_frontend(cmvn_file if with_cmvn else None)
    ours = BatchFrontend(FbankOptions(), load_cmvn(cmvn_file) if with_cmvn else None)
    waves, lengths = pad_waveforms(clips)
    feats, counts = ours(waves, lengths)
    assert feats.shape[0] == len(clips) and feats.shape[2] == 560
    worst = 0.0
    for i, audio in enumerate(clips):
        ref, ref_len = ref_frontend(torch.from_numpy(audio)[None], [len(audio)])
        n = int(ref_len[0])
        assert int(counts[i]) == n == ref.shape[1], f"item {i}: frame count"
        worst = max(worst, float((ref[0] - feats[i, :n]).abs().max()))
        assert float(feats[i, n:].abs().sum()) == 0.0, "padding frames must be zero"
    assert worst < FEATURE_TOLERANCE, worst


def test_lfr_edge_lengths_match_funasr() -> None:
    """LFR stacking for 1..20 fbank frames: left copies of frame 0, right copies of the last."""
    from funasr.frontends.wav_frontend import apply_lfr

    gen = torch.Generator().manual_seed(0)
    lengths = list(range(1, 21))
    fb = torch.randn(len(lengths), max(lengths), 80, generator=gen)
    for i, n in enumerate(lengths):
        fb[i, n:] = 0.0
    ours = BatchFrontend(FbankOptions())
    out, out_lens = ours.lfr_cmvn(fb, torch.tensor(lengths))
    for i, n in enumerate(lengths):
        ref = apply_lfr(fb[i, :n].clone(), 7, 6)
        assert int(out_lens[i]) == ref.shape[0] == -(-n // 6)
        torch.testing.assert_close(out[i, : ref.shape[0]], ref, rtol=0, atol=0)


def test_shorter_than_a_frame_gives_no_frames() -> None:
    ours = BatchFrontend(FbankOptions())
    waves, lengths = pad_waveforms([np.zeros(0, np.float32), np.zeros(399, np.float32), np.ones(400, np.float32) * 0.1])
    feats, counts = ours(waves, lengths)
    assert counts.tolist() == [0, 0, 1]
    assert float(feats[:2].abs().max()) == 0.0


def test_waveform_scaling_is_int16_like(clips: list[np.ndarray]) -> None:
    """funasr scales [-1, 1] audio by 32768; a frontend without it is off by log(32768^2)."""
    a = clips[0][:16000]
    waves, lengths = pad_waveforms([a])
    scaled = BatchFrontend(FbankOptions()).fbank(waves, lengths)[0]
    raw = BatchFrontend(FbankOptions(upscale_samples=False)).fbank(waves, lengths)[0]
    n = (int(lengths[0]) - 400) // 160 + 1
    # Where the unscaled energies hit kaldi's log floor (FLT_EPSILON) the shift cannot show.
    unfloored = raw[0, :n] > np.log(np.finfo(np.float32).eps) + 1.0
    assert float(unfloored.float().mean()) > 0.5
    diff = (scaled - raw)[0, :n][unfloored]
    torch.testing.assert_close(diff, torch.full_like(diff, 2 * np.log(32768.0)), rtol=0, atol=1e-3)
