"""SenseVoiceRunner on a tiny random-weight SenseVoiceSmall directory written by the test.

Random weights make the text meaningless, but every equality below (batch vs one by one,
per-row languages, padding, funasr's own inference) is over real audio and real token ids.
"""

from __future__ import annotations

import shutil
import time
import wave
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from server.config import RunnerConfig
from server import graphs
from server.runners.base import ItemError, ItemOptions, RunnerError
from server.runners.random_weights import write_sensevoice_dir
from server.runners.sensevoice import SenseVoiceRunner
from server.runners.sensevoice.core import sinusoidal_encoding
from server.runners.sensevoice.runner import LANGUAGE_IDS, TEXTNORM_IDS, ctc_collapse, parse_rich_text

DATA = Path(__file__).parent / "data"


def read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16).astype(np.float32) / 32768.0


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    return [read_wav(p) for p in sorted(DATA.glob("*.wav"))]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sensevoice_dir(tmp_path_factory.mktemp("sv") / "SenseVoiceSmall", scale="tiny", seed=0)


@pytest.fixture(scope="module")
def runner(model_dir: Path) -> SenseVoiceRunner:
    r = SenseVoiceRunner(RunnerConfig(name="sensevoice", model=str(model_dir), device="cpu"))
    r.load()
    return r


def tokens(results) -> list[list[int]]:
    return [r.fields["tokens"] for r in results]


# ---------------------------------------------------------------- model directory


def test_written_dir_has_the_real_layout(model_dir: Path) -> None:
    import json

    import sentencepiece as spm
    import yaml

    names = {p.name for p in model_dir.iterdir()}
    assert {"config.yaml", "model.pt", "am.mvn", "chn_jpn_yue_eng_ko_spectok.bpe.model",
            "tokens.json", "configuration.json"} <= names
    config = yaml.safe_load((model_dir / "config.yaml").read_text())
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "chn_jpn_yue_eng_ko_spectok.bpe.model"))
    assert sp.get_piece_size() == config["model_conf"]["vocab_size"] == len(json.loads((model_dir / "tokens.json").read_text()))
    assert sp.piece_to_id("<|en|>") != sp.unk_id() and sp.encode("<|woitn|>", out_type=str)[-1] == "<|woitn|>"
    metas = json.loads((model_dir / "configuration.json").read_text())["file_path_metas"]
    assert all((model_dir / name).is_file() for name in (metas["init_param"], metas["config"]))


def test_funasr_automodel_loads_the_written_dir(model_dir: Path, clips: list[np.ndarray]) -> None:
    """The directory is what funasr expects: AutoModel builds it and loads every key."""
    from funasr import AutoModel

    m = AutoModel(model=str(model_dir), device="cpu", disable_update=True, disable_pbar=True, ncpu=torch.get_num_threads())
    out = m.generate(input=clips[0][:32000], language="en")
    assert isinstance(out[0]["text"], str)


# ---------------------------------------------------------------- transcription


def test_transcribes_real_clips(runner: SenseVoiceRunner, clips: list[np.ndarray]) -> None:
    results = runner.transcribe(clips, [ItemOptions(language="en")] * len(clips))
    assert len(results) == len(clips)
    for r in results:
        assert r.fields["tokens"], "random weights still emit tokens on speech"
        assert "<|" not in r.text
        assert r.fields["raw_text"] == runner._sp.decode(r.fields["tokens"])
        assert r.language == "en" or r.language in LANGUAGE_IDS


def test_launch_reports_stages_and_is_synchronous_on_cpu(runner: SenseVoiceRunner, clips: list[np.ndarray]) -> None:
    """On CPU `launch` does the work itself (the batcher must not overlap batches); `result()`
    gives what `transcribe` gives, with the time of each stage."""
    assert runner.asynchronous is False
    opts = [ItemOptions(language="en")] * 2
    launched = runner.launch(clips[:2], opts)
    assert tokens(launched.result()) == tokens(runner.transcribe(clips[:2], opts))
    assert set(launched.stages) == {"features", "model", "postprocess"}
    assert launched.stages["model"] > launched.stages["postprocess"] > 0


def test_mixed_length_batch_equals_one_at_a_time(runner: SenseVoiceRunner, clips: list[np.ndarray]) -> None:
    audios = clips + [clips[0][:8000], clips[1][:16000 * 3 + 77]]
    opts = [ItemOptions(language="auto")] * len(audios)
    batched = tokens(runner.transcribe(audios, opts))
    alone = [tokens(runner.transcribe([a], [o]))[0] for a, o in zip(audios, opts)]
    assert batched == alone
    assert len({len(t) for t in batched}) > 1


def test_per_row_language_and_itn(runner: SenseVoiceRunner, clips: list[np.ndarray]) -> None:
    langs = ["en", "zh", "auto", "ja", "ko", "yue"]
    audios = [clips[i % len(clips)] for i in range(len(langs))] + [clips[0], clips[0]]
    opts = [ItemOptions(language=lang, itn=i % 2 == 0) for i, lang in enumerate(langs)]
    opts += [ItemOptions(language="en", itn=True), ItemOptions(language="en", itn=False)]
    batched = tokens(runner.transcribe(audios, opts))
    alone = [tokens(runner.transcribe([a], [o]))[0] for a, o in zip(audios, opts)]
    assert batched == alone
    # The query tokens reach the encoder: one audio under different queries does not always decode alike.
    variants = [ItemOptions("en", True), ItemOptions("en", False), ItemOptions("zh", True), ItemOptions("ja", False)]
    outs = tokens(runner.transcribe([clips[0]] * len(variants), variants))
    assert len({tuple(t) for t in outs}) > 1


def test_itn_default_comes_from_config(model_dir: Path, runner: SenseVoiceRunner, clips: list[np.ndarray]) -> None:
    a = clips[2]
    explicit = tokens(runner.transcribe([a], [ItemOptions("en", itn=False)]))[0]
    cfg = runner.config
    off = SenseVoiceRunner(replace(cfg, sensevoice=replace(cfg.sensevoice, use_itn=False), warmup=False))
    off.load()
    assert tokens(off.transcribe([a], [ItemOptions("en")]))[0] == explicit


def test_a_poisoned_item_fails_alone(runner: SenseVoiceRunner, clips: list[np.ndarray]) -> None:
    """An unknown language or non-finite samples fail that item with its own error; the items
    batched with it get exactly the tokens they get alone."""
    alone = tokens(runner.transcribe(clips[:2], [ItemOptions("en")] * 2))
    nan = clips[2].copy()
    nan[50] = np.inf
    out = runner.transcribe([clips[0], clips[1], clips[1], nan], [ItemOptions("en"), ItemOptions("de"), ItemOptions("en"), ItemOptions("en")])
    assert isinstance(out[1], ItemError) and out[1].code == "bad_config" and "'de'" in str(out[1]) and "'en'" in str(out[1])
    assert isinstance(out[3], ItemError) and out[3].code == "bad_audio"
    assert tokens([out[0], out[2]]) == alone


def test_empty_and_tiny_arrays_do_not_crash(runner: SenseVoiceRunner, clips: list[np.ndarray]) -> None:
    empty = np.zeros(0, dtype=np.float32)
    assert runner.transcribe([], []) == []
    results = runner.transcribe([empty, clips[0], np.zeros(100, np.float32)], [ItemOptions()] * 3)
    assert results[0].text == "" and results[2].text == "" and results[0].fields["tokens"] == []
    assert results[1].fields["tokens"] == tokens(runner.transcribe([clips[0]], [ItemOptions()]))[0]


# ---------------------------------------------------------------- the core


def test_positional_table_equals_funasr() -> None:
    from funasr.models.sense_voice.model import SinusoidalPositionEncoder

    theirs = SinusoidalPositionEncoder()(torch.zeros(1, 300, 560))[0]
    assert float((theirs - sinusoidal_encoding(300, 560)).abs().max()) == 0.0


def _features(runner: SenseVoiceRunner, audios: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    from server.features.fbank import pad_waveforms

    waves, lengths = pad_waveforms(audios)
    return runner.frontend(waves, lengths)


def test_core_is_padding_invariant(runner: SenseVoiceRunner, clips: list[np.ndarray]) -> None:
    feats, lens = _features(runner, clips[:3])
    b, t, d = feats.shape
    lang = torch.tensor([4, 3, 0])
    norm = torch.tensor([14, 15, 14])
    with torch.inference_mode():
        ids, out_lens, _ = runner.core(feats, lens, lang, norm)
        # Pad to a larger (batch, frames) bucket, with a zero-length padding row, as graphs do.
        big = torch.zeros(b + 2, t + 37, d)
        big[:b, :t] = feats
        big[b + 1, :5] = 3.0  # garbage in a padding row must not leak into real rows
        big_ids, big_lens, _ = runner.core(
            big, torch.cat([lens, torch.tensor([0, 5])]), torch.cat([lang, torch.tensor([0, 0])]),
            torch.cat([norm, torch.tensor([15, 15])]),
        )
    assert out_lens.tolist() == (lens + 4).tolist() == big_lens[:b].tolist()
    for i in range(b):
        n = int(out_lens[i])
        assert torch.equal(ids[i, :n], big_ids[i, :n])


class _RecordingTokenizer:
    """Stands in for funasr's tokenizer to capture the token ids its inference decodes."""

    def __init__(self) -> None:
        self.ids: list[list[int]] = []

    def decode(self, token_int: list[int]) -> str:
        self.ids.append(list(token_int))
        return ""


@pytest.mark.parametrize("language,itn", [("en", False), ("zh", True), ("auto", False)])
def test_core_equals_funasr_inference(runner: SenseVoiceRunner, clips: list[np.ndarray], language: str, itn: bool) -> None:
    """Our forward reproduces funasr's SenseVoiceSmall.inference token for token."""
    feats, lens = _features(runner, clips)
    rec = _RecordingTokenizer()
    with torch.inference_mode():
        runner.model.inference(feats.clone(), lens.clone(), data_type="fbank", tokenizer=rec, device="cpu",
                               language=language, use_itn=itn, key=["k"])
    ours = runner.infer_ids(clips, [LANGUAGE_IDS[language]] * len(clips),
                            [TEXTNORM_IDS["withitn" if itn else "woitn"]] * len(clips))
    assert [t.tolist() for t in ours] == rec.ids


def test_whole_path_equals_funasr_with_its_frontend(runner: SenseVoiceRunner, model_dir: Path, clips: list[np.ndarray]) -> None:
    """funasr's own path (WavFrontend on the CPU, dither off) gives the same tokens as ours."""
    from funasr.frontends.wav_frontend import WavFrontend

    frontend = WavFrontend(cmvn_file=str(model_dir / "am.mvn"), fs=16000, window="hamming", n_mels=80,
                           frame_length=25, frame_shift=10, lfr_m=7, lfr_n=6, dither=0.0)
    rec = _RecordingTokenizer()
    with torch.inference_mode():
        runner.model.inference(list(clips), tokenizer=rec, frontend=frontend, device="cpu", language="en",
                               use_itn=True, key=["k"])
    ours = tokens(runner.transcribe(clips, [ItemOptions("en", itn=True)] * len(clips)))
    assert ours == rec.ids


# ---------------------------------------------------------------- helpers


def test_parse_rich_text() -> None:
    text, tags = parse_rich_text("<|en|><|NEUTRAL|><|Speech|><|woitn|>and so my fellow americans")
    assert text == "and so my fellow americans"
    assert tags == {"language": "en", "emotion": "NEUTRAL", "event": "Speech", "itn": "woitn"}
    text, tags = parse_rich_text("<|zh|><|HAPPY|><|BGM|><|withitn|>你好。")
    assert (text, tags["language"], tags["emotion"], tags["event"]) == ("你好。", "zh", "HAPPY", "BGM")
    assert parse_rich_text("plain") == ("plain", {"language": None, "emotion": None, "event": None, "itn": None})


def test_ctc_collapse() -> None:
    assert ctc_collapse(np.array([0, 5, 5, 0, 5, 7, 7, 7, 0, 0, 3])).tolist() == [5, 5, 7, 3]
    assert ctc_collapse(np.array([], dtype=np.int64)).tolist() == []
    assert ctc_collapse(np.array([0, 0, 0])).tolist() == []


# ---------------------------------------------------------------- refusing bad models


def _copy(model_dir: Path, dest: Path) -> Path:
    return Path(shutil.copytree(model_dir, dest))


def _load_error(model: str) -> tuple[str, float]:
    started = time.perf_counter()
    with pytest.raises(RunnerError) as info:
        SenseVoiceRunner(RunnerConfig(name="sensevoice", model=model, warmup=False)).load()
    return str(info.value), time.perf_counter() - started


def test_missing_model_pt_is_refused(model_dir: Path, tmp_path: Path) -> None:
    d = _copy(model_dir, tmp_path / "m")
    (d / "model.pt").unlink()
    msg, _ = _load_error(str(d))
    assert "model.pt" in msg and "random weights" in msg


def test_corrupt_model_pt_is_refused(model_dir: Path, tmp_path: Path) -> None:
    d = _copy(model_dir, tmp_path / "m")
    (d / "model.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    msg, _ = _load_error(str(d))
    assert "corrupt" in msg


def test_truncated_model_pt_is_refused(model_dir: Path, tmp_path: Path) -> None:
    d = _copy(model_dir, tmp_path / "m")
    data = (d / "model.pt").read_bytes()
    (d / "model.pt").write_bytes(data[: len(data) // 2])
    assert "corrupt" in _load_error(str(d))[0]


def test_model_pt_from_another_model_is_refused(model_dir: Path, tmp_path: Path) -> None:
    d = _copy(model_dir, tmp_path / "m")
    state = torch.load(d / "model.pt", weights_only=True)
    del state["ctc.ctc_lo.weight"]
    torch.save(state, d / "model.pt")
    assert "ctc.ctc_lo.weight" in _load_error(str(d))[0]


def test_missing_config_yaml_is_refused(model_dir: Path, tmp_path: Path) -> None:
    d = _copy(model_dir, tmp_path / "m")
    (d / "config.yaml").unlink()
    assert "config.yaml" in _load_error(str(d))[0]


@pytest.mark.timing  # "fast": a bound on wall time
def test_hub_id_offline_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHORUS_OFFLINE", "1")
    msg, took = _load_error("iic/SenseVoiceSmall")
    assert "runner.model" in msg and "download" in msg.lower()
    assert took < 2.0


@pytest.mark.timing  # "fast": a bound on wall time
def test_unreachable_hub_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without CHORUS_OFFLINE the probe itself must fail fast (here: a closed local port)."""
    from server.runners.sensevoice import model_dir as md
    from tests.ports import free_port

    closed_port = free_port()  # nothing listens there
    monkeypatch.delenv("CHORUS_OFFLINE", raising=False)
    monkeypatch.setattr(md, "HUB_HOST", ("127.0.0.1", closed_port))
    msg, took = _load_error("iic/SenseVoiceSmall")
    assert "unreachable" in msg and "runner.model" in msg
    assert took < md.HUB_PROBE_TIMEOUT_S + 1.0


def test_describe(runner: SenseVoiceRunner) -> None:
    facts = runner.describe()
    assert facts["runner"] == "sensevoice" and facts["params_m"] > 0 and facts["forward"]


def test_bucketed_forward_equals_eager(runner: SenseVoiceRunner, clips: list[np.ndarray]) -> None:
    """Through server.graphs' bucket padding (eager replay on CPU) the ids are unchanged."""
    core_inputs = (
        graphs.InputSpec("feats", ("B", "T", 560), torch.float32, 0.0),
        graphs.InputSpec("feat_lens", ("B",), torch.long, 0),
        graphs.InputSpec("lang_ids", ("B",), torch.long, 0),
        graphs.InputSpec("textnorm_ids", ("B",), torch.long, 0),
    )
    bucketed = graphs.BucketedRunner(
        runner.core, inputs=core_inputs, table=graphs.BucketTable((1, 2, 4, 8), (64, 128, 256)),
        device=torch.device("cpu"), mode=graphs.GraphMode.BUCKETED, name="sensevoice-test",
    )
    feats, lens = _features(runner, clips[:3])
    lang, norm = torch.tensor([4, 0, 3]), torch.tensor([14, 15, 14])
    with torch.inference_mode():
        ids, out_lens, _ = runner.core(feats, lens, lang, norm)
        b_ids, b_lens = bucketed(feats, lens, lang, norm)[:2]
    assert b_lens.tolist() == out_lens.tolist()
    for i in range(3):
        n = int(out_lens[i])
        assert torch.equal(ids[i, :n], b_ids[i, :n])


def test_core_traces_as_one_graph(runner: SenseVoiceRunner) -> None:
    """No .item(), no host-built tensors, no data-dependent branches: dynamo traces the whole
    forward without a graph break (fullgraph=True raises on any), as CUDA-graph capture needs."""
    compiled = torch.compile(runner.core, backend="eager", fullgraph=True, dynamic=False)
    feats = torch.randn(2, 50, 560, generator=torch.Generator().manual_seed(1))
    args = (feats, torch.tensor([50, 30]), torch.tensor([4, 0]), torch.tensor([14, 15]))
    with torch.inference_mode():
        traced, eager = compiled(*args), runner.core(*args)
    assert all(torch.equal(a, b) for a, b in zip(traced, eager)) and len(traced) == 3
