"""GPU checks: the shipped GPU config serves, captured graphs agree with eager calls within
stated tolerances, half precision stays finite and close to fp32, nothing on the launched path
waits for the device, and serving does not leak device memory.

They run wherever torch sees a CUDA device and skip with a stated reason on a machine without
a GPU (this project's CI has none; tests/test_device_path.py checks the same classes of defect
on a CPU). On a machine where `nvidia-smi` lists a GPU but torch cannot use CUDA (setup
installed CPU-only torch), they FAIL, saying how to install CUDA torch: a skip there would
pass the one run these checks exist for with the GPU unused (`gpu_gate`, tested on a CPU
with a stand-in nvidia-smi). Run on a GPU machine with:  python -m pytest -q -rs tests/test_gpu.py

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
import functools
import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

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

ROOT = Path(__file__).resolve().parent.parent


class Gate(NamedTuple):
    verdict: str  # "run", "skip" or "fail"
    why: str


def gpu_gate() -> Gate:
    """Whether the GPU tests run here, skip (no GPU to use) or fail (a GPU torch cannot use).

    `nvidia-smi -L` listing a GPU (exit status 0, a "GPU n:" line) while
    `torch.cuda.is_available()` is false is a machine set up wrong for these tests, most often
    with scripts/setup.sh's default CPU-only torch: that fails, with the way to install CUDA
    torch. A missing or failing nvidia-smi, or CUDA_VISIBLE_DEVICES hiding every GPU, is a
    machine without a usable GPU: a skip, with the reason."""
    if torch.cuda.is_available():
        return Gate("run", "")
    no_cuda = f"no CUDA device: GPU checks run where torch.cuda.is_available() (torch {torch.__version__})"
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return Gate("skip", f"{no_cuda}; no nvidia-smi on PATH")
    try:
        proc = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return Gate("skip", f"{no_cuda}; nvidia-smi did not run: {exc}")
    gpus = [line.strip() for line in proc.stdout.splitlines() if line.startswith("GPU ")]
    if proc.returncode != 0 or not gpus:
        said = (proc.stdout + proc.stderr).strip().splitlines()[:1]
        return Gate("skip", f"{no_cuda}; nvidia-smi lists no usable GPU (exit status {proc.returncode}{': ' + said[0] if said else ''})")
    hidden = os.environ.get("CUDA_VISIBLE_DEVICES")
    if hidden is not None and hidden.strip() in ("", "-1"):
        return Gate("skip", f"{no_cuda}; CUDA_VISIBLE_DEVICES={hidden!r} hides the GPUs nvidia-smi lists")
    version = torch.__version__.split("+")[0]
    if torch.version.cuda is None:
        cause = f"this torch ({torch.__version__}) is a CPU-only build"
    else:
        cause = (f"this torch ({torch.__version__}, built for CUDA {torch.version.cuda}) cannot use it: most often a driver "
                 "older than that CUDA version (nvidia-smi's header shows the driver's)")
    return Gate("fail", (
        f"nvidia-smi lists {len(gpus)} GPU(s) ({gpus[0]}) but {cause}, so the GPU checks cannot run. "
        f"Install a CUDA build of torch into this environment: `{sys.executable} -m pip install --force-reinstall "
        f"torch=={version} --index-url https://download.pytorch.org/whl/cu128` (a cuXYZ index your driver supports), "
        "or make the venv over a Python that already has CUDA torch: `rm -rf .venv && CHORUS_TORCH=skip "
        "./scripts/setup.sh` (scripts/setup.sh installs the CPU build by default)."))


GATE = gpu_gate()


def needs_cuda(test):
    """A GPU test: skipped (before its fixtures) where GATE says skip; failed with GATE's
    message where it says fail."""
    @functools.wraps(test)
    def gated(*args, **kwargs):
        if GATE.verdict == "fail":
            pytest.fail(GATE.why, pytrace=False)
        return test(*args, **kwargs)

    return pytest.mark.gpu(pytest.mark.skipif(GATE.verdict == "skip", reason=GATE.why)(gated))

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


@needs_cuda
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


@needs_cuda
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


@needs_cuda
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
@needs_cuda
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


@needs_cuda
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


@needs_cuda
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


@needs_cuda
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


@needs_cuda
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


# ------------------------------------------------------------------ the gate (runs on a CPU)


def _fake_nvidia_smi(bin_dir: Path, body: str) -> Path:
    """A stand-in nvidia-smi on PATH (the only one: PATH is bin_dir alone); it notes each call."""
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho \"$@\" >> {bin_dir / 'calls'}\n{body}\n")
    smi.chmod(0o755)
    return bin_dir / "calls"


H100 = 'echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0c1e5c3a-0000-0000-0000-000000000000)"'


@pytest.fixture
def cpu_torch(monkeypatch):
    """This process as a machine whose torch cannot use CUDA (whatever this machine has)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return monkeypatch


def test_gate_fails_where_nvidia_smi_lists_a_gpu_that_cpu_torch_cannot_use(tmp_path, cpu_torch):
    calls = _fake_nvidia_smi(tmp_path / "bin", H100)
    cpu_torch.setenv("PATH", str(tmp_path / "bin"))
    gate = gpu_gate()
    assert gate.verdict == "fail", gate
    assert calls.read_text().split() == ["-L"]
    assert "NVIDIA H100 80GB HBM3" in gate.why and "CPU-only build" in gate.why
    version = torch.__version__.split("+")[0]
    assert f"pip install --force-reinstall torch=={version} --index-url https://download.pytorch.org/whl/cu" in gate.why
    assert "CHORUS_TORCH=skip ./scripts/setup.sh" in gate.why
    # A CUDA build that still cannot see the GPU: the message names the driver, not the build.
    cpu_torch.setattr(torch.version, "cuda", "12.8")
    gate = gpu_gate()
    assert gate.verdict == "fail" and "built for CUDA 12.8" in gate.why and "driver" in gate.why, gate


def test_gate_skips_where_there_is_no_usable_gpu(tmp_path, cpu_torch):
    cpu_torch.setenv("PATH", str(tmp_path / "empty"))  # no nvidia-smi at all
    gate = gpu_gate()
    assert gate.verdict == "skip" and "no CUDA device" in gate.why and "no nvidia-smi" in gate.why, gate
    # nvidia-smi present but failing, as without a loaded driver.
    _fake_nvidia_smi(tmp_path / "bin", "echo \"NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\"; exit 9")
    cpu_torch.setenv("PATH", str(tmp_path / "bin"))
    gate = gpu_gate()
    assert gate.verdict == "skip" and "exit status 9" in gate.why and "NVIDIA-SMI has failed" in gate.why, gate
    # Listing a GPU the environment hides on purpose.
    _fake_nvidia_smi(tmp_path / "bin", H100)
    cpu_torch.setenv("CUDA_VISIBLE_DEVICES", "")
    gate = gpu_gate()
    assert gate.verdict == "skip" and "CUDA_VISIBLE_DEVICES" in gate.why, gate


def test_gate_runs_where_torch_sees_cuda_without_asking_nvidia_smi(tmp_path, monkeypatch):
    calls = _fake_nvidia_smi(tmp_path / "bin", H100)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert gpu_gate() == Gate("run", "")
    assert not calls.exists()


def test_every_gpu_test_fails_when_the_gate_says_fail(monkeypatch):
    """Each GPU test of this file carries the gate: where it says fail, the test fails with the
    gate's message before touching CUDA, and its skip condition is the gate's skip alone."""
    module = sys.modules[__name__]
    gpu_tests = {name: f for name, f in vars(module).items()
                 if name.startswith("test_") and callable(f) and any(m.name == "gpu" for m in getattr(f, "pytestmark", []))}
    others = {name for name in vars(module) if name.startswith("test_")} - set(gpu_tests)
    assert others == {"test_gate_fails_where_nvidia_smi_lists_a_gpu_that_cpu_torch_cannot_use",
                      "test_gate_skips_where_there_is_no_usable_gpu",
                      "test_gate_runs_where_torch_sees_cuda_without_asking_nvidia_smi",
                      "test_every_gpu_test_fails_when_the_gate_says_fail",
                      "test_gpu_tests_fail_not_skip_with_a_gpu_and_cpu_torch"}, others
    assert len(gpu_tests) == 8
    real = GATE
    monkeypatch.setattr(module, "GATE", Gate("fail", "stand-in: a GPU that torch cannot use"))
    for name, f in gpu_tests.items():
        skipif = [m for m in f.pytestmark if m.name == "skipif"]
        assert [m.args for m in skipif] == [(real.verdict == "skip",)], name
        with pytest.raises(pytest.fail.Exception, match="stand-in"):
            f(*[None] * len(inspect.signature(f).parameters))  # fails before it reads an argument


@pytest.mark.extended
def test_gpu_tests_fail_not_skip_with_a_gpu_and_cpu_torch(tmp_path):
    """Extended (a pytest subprocess: ~5 s of imports, more under load): the whole file as
    pytest runs it, on this machine with a stand-in nvidia-smi that lists a GPU: a GPU test is
    reported failed with the install message, not skipped."""
    _fake_nvidia_smi(tmp_path / "bin", H100)
    env = {k: v for k, v in os.environ.items() if k not in ("CHORUS_TEST_RUN_LOCKS", "CUDA_VISIBLE_DEVICES")}
    env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    if torch.cuda.is_available():
        pytest.skip("torch here sees CUDA: the GPU tests run rather than fail")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-rfs",
                           "tests/test_gpu.py::test_toy_graph_replay_matches_eager_for_every_bucket"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "1 failed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-3000:]
    assert "NVIDIA H100" in proc.stdout and "CPU-only build" in proc.stdout and "pip install" in proc.stdout, proc.stdout[-3000:]
