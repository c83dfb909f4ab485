"""GPU checks: the shipped GPU config serves, captured graphs agree with eager calls within
stated tolerances, half precision stays finite and close to fp32, nothing on the launched path
waits for the device, and serving does not leak device memory.

They run wherever torch sees a CUDA device and skip with a stated reason elsewhere (this
project's CI has no GPU; tests/test_device_path.py checks the same classes of defect on a CPU).
Run on a GPU machine with:  python -m pytest -q -rs tests/test_gpu.py

Tolerances, and why they are not equalities: a graph replays a bucket's padded shapes, and
padded matrix products pick other kernels (other summation orders) than the eager call's
real shapes, so logits differ in their last bits and near-tied tokens may flip. Logits are
compared by relative error, ||a - b|| / ||a||, over valid frames: <= 1e-3 for graph vs eager
in fp32 (TF32 convolutions included), <= 1e-2 for float16 vs fp32 and <= 5e-2 for bfloat16
vs fp32 (8 mantissa bits). Token-level agreement is checked on real weights (Whisper), where
it means something: text within a WER bound of fp32 eager.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from server.config import GraphConfig, RunnerConfig, load_config
from server.graphs import BucketedRunner, BucketTable, GraphMode, InputSpec
from server.runners import ItemError, create_runner
from server.runners.base import ItemOptions
from server.runners.random_weights import write_sensevoice_dir
from server.wer import word_error_rate
from tests.serverharness import CLIPS, TRANSCRIPTS, ServerThread, read_clip, stream_audio
from tests.test_device_path import reachable_tensors
from tests.test_graphs import MaskedToy

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU checks run where torch.cuda.is_available()"),
]

ROOT = Path(__file__).resolve().parent.parent
SV_BUCKETS = GraphConfig(enabled=True, batch_buckets=(1, 2, 4, 8), frame_buckets=(32, 64, 128, 256))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / a.norm().clamp(min=1e-12))


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    return [read_clip(c) for c in CLIPS]


@pytest.fixture(scope="module")
def sv_dir(tmp_path_factory):
    return write_sensevoice_dir(tmp_path_factory.mktemp("sv") / "SenseVoiceSmall", scale="tiny", seed=0)


def _sv(model_dir, graphs: bool, dtype="float32", max_batch: int | None = None):
    g = SV_BUCKETS if graphs else dataclasses.replace(SV_BUCKETS, enabled=False)
    r = create_runner(RunnerConfig(name="sensevoice", model=str(model_dir), device="cuda", dtype=dtype, graphs=g),
                      max_batch_size=max_batch)
    r.load()
    return r


# ------------------------------------------------------------------ first contact


def test_shipped_gpu_config_loads_captures_and_serves(sv_dir, clips):
    """configs/sensevoice-gpu.yaml as shipped (model directory aside): load, capture every
    bucket, then a real client over a real socket gets its finals."""
    cfg = load_config(ROOT / "configs" / "sensevoice-gpu.yaml",
                      {"runner.model": str(sv_dir), "server.port": "0", "server.host": "127.0.0.1"})
    runner = create_runner(cfg.runner, max_batch_size=cfg.batcher.largest_batch)
    runner.load()
    stats = runner._forward.stats
    assert runner.describe()["forward"] == "cuda_graphs" and runner.asynchronous
    assert stats["captured"] and not stats["dropped"], stats
    found = list(reachable_tensors(runner))
    assert found and all(t.device.type == "cuda" for _, t in found), [p for p, t in found if t.device.type != "cuda"][:5]
    with ServerThread(cfg, runner) as srv:
        log = asyncio.run(stream_audio(srv.url, clips[0], speed=4.0, start={"language": "en"}))
    assert log.of("final") and not log.of("error"), log.messages[-5:]
    assert log.messages[-1]["type"] == "done"
    assert stats["replays"] > 0


# ------------------------------------------------------------------ graphs vs eager


def test_toy_graph_replay_matches_eager_for_every_bucket():
    model = MaskedToy().cuda().eval()
    specs = [InputSpec("x", ("B", "T", 6), torch.float32, 0.0), InputSpec("lens", ("B",), torch.long, 0)]
    graphs = BucketedRunner(model, specs, BucketTable([1, 2, 4, 8], [16, 32, 64]), torch.device("cuda"), GraphMode.CUDA_GRAPHS)
    graphs.warmup()
    assert len(graphs.stats["captured"]) == 12
    with torch.inference_mode():
        for b, t in graphs.table.buckets():
            x = torch.randn(b, t, 6, device="cuda")
            lens = torch.randint(1, t + 1, (b,), device="cuda")
            y_ref, pooled_ref = model(x, lens)
            y, pooled = graphs(x, lens)
            assert not y.requires_grad
            assert rel_err(pooled_ref, pooled) <= 1e-3
            for i in range(b):
                n = int(lens[i])
                assert rel_err(y_ref[i, :n], y[i, :n]) <= 1e-3
    assert graphs.stats["replays"] == 12


def _core_logits_runner(runner, mode: GraphMode) -> BucketedRunner:
    core = runner.core
    specs = [InputSpec("feats", ("B", "T", 560), runner.dtype, 0.0), InputSpec("feat_lens", ("B",), torch.long, 0),
             InputSpec("lang_ids", ("B",), torch.long, 0), InputSpec("textnorm_ids", ("B",), torch.long, 0)]
    r = BucketedRunner(core.logits, specs, BucketTable(SV_BUCKETS.batch_buckets, SV_BUCKETS.frame_buckets),
                       runner.device, mode, name="sv-logits")
    r.warmup()
    return r


def _features(runner, items):
    from server.features.fbank import pad_waveforms

    waves, lengths = pad_waveforms(items)
    with torch.inference_mode():
        return runner.frontend(waves.cuda(), lengths.cuda())


def test_sensevoice_graph_logits_match_eager_for_every_bucket(sv_dir, clips):
    runner = _sv(sv_dir, graphs=False)
    graphs = _core_logits_runner(runner, GraphMode.CUDA_GRAPHS)
    for seconds in (1.5, 3.5, 7.0, 14.0):  # one per frame bucket (LFR frames are 60 ms)
        for b in (1, 3, 8):
            items = [clips[i % len(clips)][: int(seconds * 16000)] for i in range(b)]
            feats, lens = _features(runner, items)
            lang = torch.full((b,), 4, device="cuda")
            norm = torch.full((b,), 14, device="cuda")
            with torch.inference_mode():
                want, want_lens, _ = runner.core.logits(feats, lens, lang, norm)
                got, got_lens, _ = graphs(feats, lens, lang, norm)
            assert torch.equal(want_lens, got_lens)
            for i in range(b):
                n = int(want_lens[i])
                err = rel_err(want[i, :n], got[i, :n])
                assert err <= 1e-3, f"{seconds} s x {b}: row {i} relative error {err:.2e}"
    assert graphs.stats["eager_fallbacks"] == 0 and graphs.stats["replays"] == 12


@pytest.mark.parametrize("dtype,bound", [("float16", 1e-2), ("bfloat16", 5e-2)])
def test_sensevoice_half_precision_logits_are_finite_and_close(sv_dir, clips, dtype, bound):
    full, half = _sv(sv_dir, graphs=False), _sv(sv_dir, graphs=False, dtype=dtype)
    feats, lens = _features(full, clips)
    b = len(clips)
    lang, norm = torch.full((b,), 4, device="cuda"), torch.full((b,), 14, device="cuda")
    with torch.inference_mode():
        ref, ref_lens, _ = full.core.logits(feats, lens, lang, norm)
        low, _, _ = half.core.logits(feats.to(half.dtype), lens, lang, norm)
    for i in range(b):
        n = int(ref_lens[i])
        assert torch.isfinite(low[i, :n]).all()
        err = rel_err(ref[i, :n], low[i, :n])
        assert err <= bound, f"{dtype}: clip {i} relative error {err:.2e} > {bound}"
    # Through the whole runner (graphs) every item comes back as text, none as non-finite.
    out = _sv(sv_dir, graphs=True, dtype=dtype).transcribe(clips, [ItemOptions("en")] * b)
    assert not [r for r in out if isinstance(r, ItemError)]


# ------------------------------------------------------------------ the launched path


def test_sensevoice_launch_never_waits_for_the_device(sv_dir, clips):
    """With sync debugging set to error, any synchronising call on the launched path raises
    (an .item(), a pageable copy, a read-back)."""
    runner = _sv(sv_dir, graphs=True)
    items = [c[: 3 * 16000] for c in clips[:3]]
    runner.transcribe(items, [ItemOptions("en")] * 3)  # warm this shape's allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        launched = runner.launch(items, [ItemOptions("en")] * 3)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(launched.result()) == 3


def test_sensevoice_batches_in_flight_in_different_buckets_keep_their_results(sv_dir, clips):
    """What the batcher does on CUDA: launch B (another bucket, same graph pool) before
    collecting A. A's results must be A's."""
    runner = _sv(sv_dir, graphs=True)
    assert runner.asynchronous
    a_items, a_opts = [c[: 2 * 16000] for c in clips[:3]], [ItemOptions("en")] * 3  # (4, 64)
    b_items, b_opts = [clips[0][16000: 11 * 16000]], [ItemOptions("zh")]  # 10 s of jfk: (1, 256)
    a_alone, b_alone = runner.transcribe(a_items, a_opts), runner.transcribe(b_items, b_opts)
    for first, second in ((a_items, b_items), (b_items, a_items)):  # both orders of the two buckets
        opts1 = a_opts if first is a_items else b_opts
        opts2 = b_opts if first is a_items else a_opts
        x = runner.launch(first, opts1)
        y = runner.launch(second, opts2)
        want_x, want_y = (a_alone, b_alone) if first is a_items else (b_alone, a_alone)
        assert [r.fields["tokens"] for r in x.result()] == [r.fields["tokens"] for r in want_x]
        assert [r.fields["tokens"] for r in y.result()] == [r.fields["tokens"] for r in want_y]


def test_serving_does_not_leak_device_memory(sv_dir, clips):
    """Two hundred batches of mixed sizes through launch/result, after one warm pass over the
    same shapes: live device memory must come back to where it was."""
    runner = _sv(sv_dir, graphs=True)
    rng = np.random.default_rng(0)
    shapes = [(int(rng.integers(1, 9)), float(rng.uniform(0.5, 14.0))) for _ in range(20)]

    def serve(reps: int) -> None:
        for _ in range(reps):
            for b, seconds in shapes:
                items = [clips[i % len(clips)][: int(seconds * 16000)] for i in range(b)]
                runner.launch(items, [ItemOptions("en")] * b).result()

    serve(1)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    serve(10)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == before


# ------------------------------------------------------------------ Whisper, real weights


def _whisper(graphs: bool, dtype="float32"):
    r = create_runner(RunnerConfig(device="cuda", dtype=dtype, graphs=GraphConfig(enabled=graphs, batch_buckets=(1, 2, 4, 8))),
                      max_batch_size=8)
    r.load()
    return r


def test_whisper_graphs_and_half_precision_keep_the_text():
    """Encoder per batch bucket and every decoder step replayed as CUDA graphs, in fp32, fp16
    and bf16: every item comes back as text (no non-finite scores), the text is fp32-eager's on
    at least 5 of 6 clips, and WER stays within 2 points of fp32 eager."""
    clips = [read_clip(c) for c in CLIPS]
    refs = [TRANSCRIPTS[c.name] for c in CLIPS]
    eager = _whisper(False).transcribe(clips, [ItemOptions()] * len(clips))
    base_wer = word_error_rate(refs, [e.text for e in eager])
    assert base_wer <= 0.05
    for dtype in ("float32", "float16", "bfloat16"):
        runner = _whisper(True, dtype)
        out = runner.transcribe(clips, [ItemOptions()] * len(clips))
        assert runner.steps[5].replays > 0  # the beam-search decoder steps were replayed
        partials = runner.transcribe(clips, [ItemOptions(partial=True)] * len(clips))
        assert runner.steps[1].replays > 0  # and the greedy ones
        assert word_error_rate(refs, [h.text for h in partials]) <= base_wer + 0.03, dtype
        assert not [r for r in out if isinstance(r, ItemError)], dtype
        same_text = sum(1 for x, y in zip(eager, out) if x.text == y.text)
        assert same_text >= 5, (dtype, [(x.text, y.text) for x, y in zip(eager, out) if x.text != y.text])
        assert word_error_rate(refs, [h.text for h in out]) <= base_wer + 0.02, dtype
