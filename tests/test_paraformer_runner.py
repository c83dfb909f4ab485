"""ParaformerRunner on random-weight Paraformer directories in the real (paraformer-zh) layout.

No Paraformer weights exist offline here: the text is meaningless, but every equality below
(funasr's own AutoModel.generate, batch vs one by one, padding, funasr's CIF and timestamp
functions) is over real audio and real token ids and times.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import torch

from server.config import RunnerConfig
from server.runners import create_runner
from server.runners.base import ItemError, ItemOptions, Launched, RunnerError
from server.runners.paraformer import ParaformerRunner
from server.runners.paraformer.core import _cif_embeddings, _fires
from server.runners.paraformer.timestamps import token_times
from server.runners.random_weights import write_paraformer_dir
from tests.funasrclient import run_funasr
from tests.serverharness import CLIPS, ServerThread, check_words, make_config, pcm16, read_clip, stream_audio
from tests.ports import free_port


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    return [read_clip(p) for p in CLIPS]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_paraformer_dir(tmp_path_factory.mktemp("pf") / "paraformer-zh", scale="tiny", seed=0)


@pytest.fixture(scope="module")
def runner(model_dir: Path) -> ParaformerRunner:
    r = ParaformerRunner(RunnerConfig(name="paraformer", model=str(model_dir), device="cpu"))
    r.load()
    return r


def _automodel(model_dir: Path):
    from funasr import AutoModel

    return AutoModel(model=str(model_dir), device="cpu", disable_update=True, disable_pbar=True,
                     ncpu=torch.get_num_threads())


@pytest.fixture(scope="module")
def reference(model_dir: Path):
    """funasr's own AutoModel on the same directory: the reference."""
    return _automodel(model_dir)


def tokens(results) -> list[list[int]]:
    return [r.fields["tokens"] for r in results]


def _assert_equals_funasr(reference, runner: ParaformerRunner, audios: list[np.ndarray], plain: bool = True) -> None:
    """funasr's generate one item at a time (as FunASR's servers run it; its batched path lets
    a row's padding leak into the CIF predictor, see ParaformerCore.encode), with timestamps
    (and without, where `plain`), and ours on the whole batch give the same text, the same
    token timestamps, and words that are those tokens and times."""
    stamped = reference.generate(input=audios, batch_size=1, output_timestamp=True)
    ours = runner.transcribe(audios, [ItemOptions()] * len(audios))
    assert len(stamped) == len(ours) == len(audios)
    if plain:
        assert [got.text for got in ours] == [r["text"] for r in reference.generate(input=audios, batch_size=1)]
    for ref_ts, got, audio in zip(stamped, ours, audios):
        assert got.fields["tokens"], "random weights still fire tokens on speech"
        assert got.fields["timestamp"] == ref_ts["timestamp"]
        assert " ".join(w.word for w in got.words) == ref_ts["text"]
        assert "".join(got.text.split()) == "".join(ref_ts["text"].split())
        duration = len(audio) * 1000 // 16000
        assert [[w.start_ms, w.end_ms] for w in got.words] == [
            [min(s, duration), min(e, duration)] for s, e in ref_ts["timestamp"]]


# ---------------------------------------------------------------- model directory


def test_written_dir_has_the_real_layout(model_dir: Path) -> None:
    import yaml

    names = {p.name for p in model_dir.iterdir()}
    assert {"config.yaml", "model.pt", "am.mvn", "tokens.json", "seg_dict", "configuration.json"} <= names
    config = yaml.safe_load((model_dir / "config.yaml").read_text())
    assert config["model"] == "Paraformer" and config["predictor"] == "CifPredictorV2"
    tokens = json.loads((model_dir / "tokens.json").read_text())
    assert tokens[:3] == ["<blank>", "<s>", "</s>"] and tokens[-1] == "<unk>" and len(tokens) == 400
    metas = json.loads((model_dir / "configuration.json").read_text())["file_path_metas"]
    assert all((model_dir / name).is_file() for name in (metas["init_param"], metas["config"],
                                                        metas["tokenizer_conf"]["token_list"]))


def test_registered_as_paraformer(model_dir: Path) -> None:
    r = create_runner(RunnerConfig(name="paraformer", model=str(model_dir), warmup=False))
    assert isinstance(r, ParaformerRunner)


# ---------------------------------------------------------------- equal to funasr


def test_equals_funasr_generate(reference, runner: ParaformerRunner, clips: list[np.ndarray]) -> None:
    """Every clip, batched: text, timestamps and words as funasr's AutoModel(...).generate."""
    _assert_equals_funasr(reference, runner, clips)


def test_equals_funasr_generate_on_cut_and_quiet_audio(reference, runner: ParaformerRunner,
                                                       clips: list[np.ndarray]) -> None:
    """Lengths that are not whole frames, a short cut, and speech behind a second of silence
    (a long gap before the first token: funasr's <sil> rules)."""
    quiet = np.concatenate([np.zeros(16000, np.float32), clips[2][:16000 * 2]])
    _assert_equals_funasr(reference, runner, [clips[0][:16000 * 3 + 77], clips[1][:9000], quiet], plain=False)


@pytest.mark.extended
def test_full_size_equals_funasr(tmp_path_factory: pytest.TempPathFactory, clips: list[np.ndarray]) -> None:
    """Extended (`pytest -m extended`: it writes and loads a 0.9 GB model twice, ours and
    funasr's; 76 s and 172 s in two runs on the shared 2-core machine): the released
    Paraformer-large architecture (50 + 16 blocks, width 512, 8404 tokens), random weights: equal
    to funasr's generate on two clips batched together."""
    d = write_paraformer_dir(tmp_path_factory.mktemp("pf-full") / "paraformer-large", scale="full", seed=3)
    r = ParaformerRunner(RunnerConfig(name="paraformer", model=str(d), device="cpu", warmup=False))
    r.load()
    assert r.describe()["params_m"] > 200
    _assert_equals_funasr(_automodel(d), r, [clips[0][:16000 * 4], clips[2]])
    r.close()
    shutil.rmtree(d)


# ---------------------------------------------------------------- batching


def test_batched_equals_one_at_a_time(runner: ParaformerRunner, clips: list[np.ndarray]) -> None:
    audios = clips + [clips[0][:8000], clips[1][:16000 * 3 + 77]]
    opts = [ItemOptions()] * len(audios)
    batched = runner.transcribe(audios, opts)
    alone = [runner.transcribe([a], [o])[0] for a, o in zip(audios, opts)]
    assert tokens(batched) == tokens(alone)
    assert [r.fields["timestamp"] for r in batched] == [r.fields["timestamp"] for r in alone]
    assert [r.words for r in batched] == [r.words for r in alone]
    assert len({len(t) for t in tokens(batched)}) > 1


def test_core_is_padding_invariant(runner: ParaformerRunner, clips: list[np.ndarray]) -> None:
    """More frames, more token slots and a garbage padding row leave the real rows' tokens and
    token counts unchanged. The CIF weights agree to float32 rounding, not bit for bit: CPU
    attention kernels reduce over a longer key axis in other blocks (measured: up to 1e-6 in
    the encoder output at +29 frames, 0.0 at +5)."""
    from server.features.fbank import pad_waveforms

    waves, lengths = pad_waveforms(clips[:3])
    feats, lens = runner.frontend(waves, lengths)
    b, t, d = feats.shape
    big = torch.zeros(b + 1, t + 29, d)
    big[:b, :t] = feats
    big[b, :7] = 3.0
    big_lens = torch.cat([lens, torch.tensor([7])])
    core = runner.core
    with torch.inference_mode():
        small = core.encode(feats, lens)
        large = core.encode(big, big_lens)
        n = int(small[5].max())
        ids, _ = core.decode(small[0], lens, *small[1:6], n)
        big_ids, _ = core.decode(large[0], big_lens, *large[1:6], n + 11)
    assert torch.equal(small[5], large[5][:b])
    for i in range(b):
        frames = int(lens[i]) + 1
        assert torch.allclose(small[2][i, :frames], large[2][i, :frames], rtol=0, atol=1e-5)  # CIF weights
        assert torch.allclose(small[3][i, :frames], large[3][i, :frames], rtol=0, atol=1e-4)  # fires
        assert not large[2][i, frames:].any()  # nothing fires on padding
        k = int(small[5][i])
        assert torch.equal(ids[i, :k], big_ids[i, :k])


# ---------------------------------------------------------------- CIF and timestamps vs funasr


def test_cif_embeddings_equal_funasr_cif_v1() -> None:
    """Our fixed-shape integrate-and-fire gives funasr's cif_v1 frames bit for bit, rows with
    no fire included; slots past a row's count are zero."""
    from funasr.models.paraformer.cif_predictor import cif_v1

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 60, 16, generator=g)
    alphas = torch.rand(4, 60, generator=g) * 0.6
    alphas[2] = 0.01  # never reaches the threshold: no token
    alphas[3, 30:] = 0.0  # a padded row
    theirs, their_fires = cif_v1(hidden, alphas, 1.0)
    fires, fired = _fires(alphas)
    assert torch.equal(fires, their_fires)
    ours = _cif_embeddings(hidden, alphas, fires, fired, theirs.shape[1] + 3)
    assert torch.equal(ours[:, : theirs.shape[1]], theirs)
    assert not ours[:, theirs.shape[1]:].any()
    assert not ours[2].any() and theirs[0].abs().sum() > 0


@pytest.mark.parametrize("seed", range(6))
def test_token_times_equal_funasr(seed: int) -> None:
    """Our numpy timestamps equal funasr's ts_prediction_lfr6_standard as Paraformer calls it
    (fires first, weights second), on random rows: its renormalising fallback, long gaps
    (the 12-frame cap), leading silence and trailing silence."""
    from funasr.utils.timestamp_tools import ts_prediction_lfr6_standard

    rng = np.random.default_rng(seed)
    frames = int(rng.integers(20, 400))
    alphas = (rng.random(frames) * rng.choice([0.3, 0.6, 0.9])).astype(np.float32)
    alphas[: int(rng.integers(0, 15))] = 0.0
    if seed % 2:
        alphas[frames // 3: frames // 3 + 30] = 0.0
    fires, _ = _fires(torch.from_numpy(alphas)[None])
    fires = fires[0].numpy()
    for n in (1, max(1, int(alphas.sum()) - 2), max(1, int(alphas.sum()))):
        chars = [f"t{i}" for i in range(n)]
        _, theirs = ts_prediction_lfr6_standard(torch.from_numpy(fires.copy()), torch.from_numpy(alphas.copy()),
                                                chars, upsample_rate=1)
        assert token_times(fires, alphas, n) == theirs
    assert token_times(fires, alphas, 0) == []
    # The direct path: exactly tokens + 1 frames whose weight reaches the peak level.
    peaks_at = np.sort(rng.choice(frames, size=6, replace=False))
    alphas[peaks_at] = 1.0
    fires, _ = _fires(torch.from_numpy(alphas)[None])
    fires = fires[0].numpy()
    _, theirs = ts_prediction_lfr6_standard(torch.from_numpy(fires.copy()), torch.from_numpy(alphas.copy()),
                                            [f"t{i}" for i in range(5)], upsample_rate=1)
    assert token_times(fires, alphas, 5) == theirs and len(theirs) == 5


# ---------------------------------------------------------------- bad items and bad models


def test_a_poisoned_item_fails_alone(runner: ParaformerRunner, clips: list[np.ndarray]) -> None:
    alone = tokens(runner.transcribe(clips[:2], [ItemOptions()] * 2))
    nan = clips[2].copy()
    nan[50] = np.nan
    out = runner.transcribe([clips[0], clips[1], clips[1], nan],
                            [ItemOptions(), ItemOptions("de"), ItemOptions("zh"), ItemOptions()])
    assert isinstance(out[1], ItemError) and out[1].code == "bad_config" and "'de'" in str(out[1])
    assert isinstance(out[3], ItemError) and out[3].code == "bad_audio"
    assert tokens([out[0], out[2]]) == alone


def test_empty_tiny_and_silent_items(runner: ParaformerRunner, clips: list[np.ndarray]) -> None:
    assert runner.transcribe([], []) == []
    empty, tiny, silence = np.zeros(0, np.float32), np.zeros(100, np.float32), np.zeros(16000, np.float32)
    out = runner.transcribe([empty, clips[0], tiny, silence], [ItemOptions()] * 4)
    assert out[0].text == "" and out[0].words == [] and out[2].text == ""
    assert out[1].fields["tokens"] == tokens(runner.transcribe([clips[0]], [ItemOptions()]))[0]
    no_words = runner.transcribe([clips[0]], [ItemOptions(words=False)])[0]
    assert no_words.words is None and no_words.text == out[1].text


def test_launch_reports_stages(runner: ParaformerRunner, clips: list[np.ndarray]) -> None:
    launched = runner.launch(clips[:2], [ItemOptions()] * 2)
    assert tokens(launched.result()) == tokens(runner.transcribe(clips[:2], [ItemOptions()] * 2))
    assert set(launched.stages) == {"features", "model", "postprocess"}
    assert runner.describe()["runner"] == "paraformer" and runner.describe()["vocab"] == 400


def _load_error(model: str) -> str:
    with pytest.raises(RunnerError) as info:
        ParaformerRunner(RunnerConfig(name="paraformer", model=model, warmup=False)).load()
    return str(info.value)


def test_missing_model_pt_is_refused(model_dir: Path, tmp_path: Path) -> None:
    d = Path(shutil.copytree(model_dir, tmp_path / "m"))
    (d / "model.pt").unlink()
    msg = _load_error(str(d))
    assert "model.pt" in msg and "random weights" in msg


def test_missing_tokens_and_foreign_weights_are_refused(model_dir: Path, tmp_path: Path) -> None:
    d = Path(shutil.copytree(model_dir, tmp_path / "m"))
    (d / "tokens.json").unlink()
    assert "tokens.json" in _load_error(str(d))
    shutil.copy(model_dir / "tokens.json", d / "tokens.json")
    state = torch.load(d / "model.pt", weights_only=True)
    del state["predictor.cif_output.weight"]
    torch.save(state, d / "model.pt")
    assert "predictor.cif_output.weight" in _load_error(str(d))


def test_another_model_class_is_refused_with_its_runner_named(model_dir: Path, tmp_path: Path) -> None:
    import yaml

    d = Path(shutil.copytree(model_dir, tmp_path / "m"))
    config = yaml.safe_load((d / "config.yaml").read_text())
    for other, hint in (("SenseVoiceSmall", "sensevoice runner"), ("ParaformerStreaming", "not served yet")):
        (d / "config.yaml").write_text(yaml.safe_dump({**config, "model": other}))
        msg = _load_error(str(d))
        assert other in msg and hint in msg


@pytest.mark.timing  # "fast": a bound on wall time
def test_hub_id_offline_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHORUS_OFFLINE", "1")
    started = time.perf_counter()
    msg = _load_error("iic/speech_paraformer-large_asr_nat-zh-cn-16k-common-vocab8404-pytorch")
    assert "runner.model" in msg and time.perf_counter() - started < 2.0


# ---------------------------------------------------------------- through the server


class RecordingParaformer(ParaformerRunner):
    """The real runner; it also keeps the audio and text of every final item it recognised, so
    the test can check each final against funasr's own output for exactly that audio."""

    finals: list[tuple[np.ndarray, str]]

    def launch(self, audios: Sequence[np.ndarray], options: Sequence[ItemOptions]) -> Launched:
        launched = super().launch(audios, options)
        results = launched.result()
        for audio, option, result in zip(audios, options, results):
            if not option.partial and not isinstance(result, ItemError):
                self.finals.append((np.array(audio, copy=True), result.text))
        out = Launched.done(results)
        out.stages = launched.stages
        return out


@pytest.fixture(scope="module")
def served(model_dir: Path):
    cfg = make_config(**{"runner.name": "paraformer", "runner.model": str(model_dir), "funasr.port": free_port()})
    runner = RecordingParaformer(cfg.runner)
    runner.finals = []
    runner.load()
    with ServerThread(cfg, runner) as srv:
        yield cfg, runner, srv


def _funasr_texts(reference, audios: list[np.ndarray]) -> list[str]:
    return [r["text"] for r in reference.generate(input=audios, batch_size=1)]


def test_native_client_gets_funasr_finals(served, reference) -> None:
    """Over a real socket: a native client's finals are, segment for segment, what funasr's
    generate gives for the audio the server recognised, with word times that hold."""
    cfg, runner, srv = served
    runner.finals.clear()
    log = asyncio.run(stream_audio(srv.url, read_clip(CLIPS[0]), speed=8.0))
    finals = log.of("final")
    assert finals and any(f["text"] for f in finals), log.messages
    assert [f["text"] for f in finals] == [text for _, text in runner.finals]
    assert [text for _, text in runner.finals] == _funasr_texts(reference, [a for a, _ in runner.finals])
    for f in finals:
        check_words(f)
    assert srv.app.model_info()["runner"] == "paraformer"


def test_funasr_offline_client_gets_funasr_text(served, reference) -> None:
    """A FunASR client in offline mode gets one result holding every segment's funasr text,
    with FunASR's timestamp and stamp_sents fields."""
    cfg, runner, _ = served
    runner.finals.clear()
    pcm = pcm16(read_clip(CLIPS[2]))
    run = asyncio.run(run_funasr(f"ws://127.0.0.1:{cfg.funasr.port}", pcm,
                                 {"mode": "offline", "wav_name": "pf", "is_speaking": True}, speed=None))
    results = run.results()
    assert [r["mode"] for r in results] == ["offline"] and not run.errors(), run.messages
    assert runner.finals, "the server recognised nothing"
    expected = _funasr_texts(reference, [a for a, _ in runner.finals])
    assert expected == [text for _, text in runner.finals] and "".join(expected)
    assert "".join(results[0]["text"].split()) == "".join("".join(expected).split())
    assert json.loads(results[0]["timestamp"]) and results[0]["stamp_sents"]


def test_doctor_benchmarks_the_paraformer_config(model_dir: Path) -> None:
    """`chorus doctor` on configs/paraformer-cpu.yaml loads the runner and times batches 1 and 8."""
    from server import doctor
    from server.config import load_config

    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "configs" / "paraformer-cpu.yaml", {"runner.model": str(model_dir), "runner.warmup": "false"})
    report = doctor.run_doctor(cfg, bench_seconds=0.2)
    assert not doctor.benchmark_failed(report), report
    bench = report["benchmark"]
    assert bench["runner"]["runner"] == "paraformer" and bench["runner"]["forward"] == "eager"
    assert bench["batch_1"]["rtfx"] > 0 and bench["batch_8"]["rtfx"] > 0


def test_funasr_2pass_client_gets_offline_sentences_and_online_text(served, reference) -> None:
    """A FunASR client in 2pass mode (one Paraformer configured: partials from the same model
    re-run on the segment so far) gets 2pass-online text while it streams and 2pass-offline
    sentences equal to funasr's text for each segment's audio."""
    cfg, runner, _ = served
    runner.finals.clear()
    pcm = pcm16(read_clip(CLIPS[0]))
    run = asyncio.run(run_funasr(f"ws://127.0.0.1:{cfg.funasr.port}", pcm,
                                 {"mode": "2pass", "wav_name": "pf2", "is_speaking": True}, speed=4.0))
    assert not run.errors(), run.messages
    modes = {r["mode"] for r in run.results()}
    assert {"2pass-online", "2pass-offline"} <= modes, run.messages
    sentences = [r["text"] for r in run.results() if r["mode"] == "2pass-offline"]
    expected = _funasr_texts(reference, [a for a, _ in runner.finals])
    assert expected == [text for _, text in runner.finals] and "".join(expected)
    assert "".join("".join(sentences).split()) == "".join("".join(expected).split())


# ---------------------------------------------------------------- the captured path (CPU stand-in)


def test_graph_path_on_a_stand_in_backend(model_dir: Path, runner: ParaformerRunner, clips: list[np.ndarray]) -> None:
    """The whole forward captured per (batch, frames) bucket (the tests' CUDA-graph stand-in,
    whose replays rewrite shared output storage): tokens, timestamps and words as the eager
    path's, buckets only up to the batcher's batch, two buckets replayed in one run."""
    from server.config import GraphConfig
    from tests.graphsim import SimulatedGraphs

    sim = SimulatedGraphs()
    cfg = RunnerConfig(name="paraformer", model=str(model_dir), device="cpu", warmup=False,
                       graphs=GraphConfig(enabled=True, batch_buckets=(1, 2, 4), frame_buckets=(32, 64, 128)))
    graphed = ParaformerRunner(cfg, max_batch_size=2, graph_backend=sim)
    graphed.load()
    assert graphed._graphed is not None and graphed.describe()["forward"] == "cuda_graphs"
    assert {b for b, _ in graphed._graphed.stats["captured"]} == {1, 2}
    assert all(c.inference_mode and not c.outputs_require_grad for c in sim.captures)
    a_items = [clips[0][:16000], clips[1][:20000]]  # 16 and 20 LFR frames: bucket (2, 32)
    b_items = [clips[2][:16000 * 3]]  # 50 frames: bucket (1, 64)
    for items in (a_items, b_items):
        want = runner.transcribe(items, [ItemOptions()] * len(items))
        got = graphed.transcribe(items, [ItemOptions()] * len(items))
        assert tokens(got) == tokens(want) and all(tokens(got))
        assert [r.fields["timestamp"] for r in got] == [r.fields["timestamp"] for r in want]
        assert [r.words for r in got] == [r.words for r in want]
    assert sim.replays == 2 and graphed._graphed.stats["eager_fallbacks"] == 0


def test_captured_forward_never_touches_the_host(model_dir: Path) -> None:
    """Loaded on the meta device, every tensor of the runner is there, and the frontend and
    ParaformerCore.forward read nothing back and build nothing on the host: nothing a CUDA
    graph could not capture (funasr's own tail rule builds its zero frame on the host)."""
    from tests.syncaudit import DeviceAudit
    from tests.test_device_path import reachable_tensors

    meta = torch.device("meta")
    r = ParaformerRunner(RunnerConfig(name="paraformer", model=str(model_dir), device="meta", warmup=False))
    r.load()
    found = list(reachable_tensors(r))
    assert len(found) > 50 and not [p for p, t in found if t.device != meta], "tensors left off the runner's device"
    b, t = 3, 40
    with torch.inference_mode(), DeviceAudit() as audit:
        r.frontend(torch.zeros(b, 16000, device=meta), torch.full((b,), 16000, device=meta))
        r.core(torch.zeros(b, t, 560, device=meta), torch.full((b,), t, device=meta))
    bad = [e for e in audit.events if e.kind != "compute"]
    assert not bad, f"host work inside the captured forward: {bad[:5]}"
    assert audit.of("compute")


def test_a_row_with_non_finite_scores_fails_alone(runner: ParaformerRunner, clips: list[np.ndarray]) -> None:
    """NaN decoder scores in one row (what float16 overflow gives) fail that item with
    `model_output`; the other items keep the tokens they get without it."""
    items = [clips[0], clips[1], clips[2]]
    want = runner.transcribe(items, [ItemOptions()] * 3)

    def poison(_module, _inputs, output):
        output = output.clone()
        output[1] = float("nan")
        return output

    handle = runner.model.decoder.output_layer.register_forward_hook(poison)
    try:
        got = runner.transcribe(items, [ItemOptions()] * 3)
    finally:
        handle.remove()
    assert isinstance(got[1], ItemError) and got[1].code == "model_output"
    assert tokens([got[0], got[2]]) == tokens([want[0], want[2]])
