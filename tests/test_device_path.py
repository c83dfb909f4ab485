"""The GPU path's classes of defect, caught on a CPU.

No GPU runs this suite, so each class of bug that would stop the GPU path on first contact
gets a CPU check that sees it:
- placement: a runner loaded onto the `meta` device must hold every tensor there (a buffer
  left on the CPU is a device mismatch at warm-up on CUDA);
- host syncs: the captured functions, run on `meta` under an audit, must read nothing back,
  build nothing on the host and mix no host tensor in; the launched path must copy in
  before its first kernel and out after its last;
- capture: with a stand-in graph backend (tests/graphsim.py) the real capture code runs on
  a CPU: no autograd during capture, outputs that survive the next replay of any bucket,
  replays on one stream, memory counted as the pool holds it;
- per-item failure: a row whose scores are not finite fails alone.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch

from server.config import GraphConfig, RunnerConfig
from server.graphs import BucketedRunner, BucketTable, GraphMode, InputSpec, buckets_up_to
from server.runners.base import ItemError, ItemOptions
from server.runners.random_weights import write_sensevoice_dir
from server.runners.sensevoice import SenseVoiceRunner
from server.runners.whisper import WhisperRunner
from tests.graphsim import SimulatedGraphs
from tests.serverharness import CLIPS, read_clip
from tests.syncaudit import DeviceAudit
from tests.test_graphs import MaskedToy

META = torch.device("meta")


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    return [read_clip(c) for c in CLIPS]


@pytest.fixture(scope="module")
def sv_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sensevoice_dir(tmp_path_factory.mktemp("sv") / "SenseVoiceSmall", scale="tiny", seed=0)


def _sv(sv_dir: Path, device: str = "cpu", backend: Any = None, max_batch: int | None = None, **graphs: Any) -> SenseVoiceRunner:
    g = GraphConfig(enabled=backend is not None, batch_buckets=(1, 2, 4), frame_buckets=(32, 64, 128), **graphs)
    r = SenseVoiceRunner(RunnerConfig(name="sensevoice", model=str(sv_dir), device=device, warmup=False, graphs=g),
                         max_batch_size=max_batch, graph_backend=backend)
    r.load()
    return r


@pytest.fixture(scope="module")
def whisper_meta() -> WhisperRunner:
    r = WhisperRunner(RunnerConfig(device="meta", warmup=False))
    r.load()
    return r


def reachable_tensors(obj: Any, path: str = "runner", seen: set[int] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor a runner holds: module parameters and buffers, tensor attributes, and
    tensors inside its own helper objects (graph runners, decoder buckets), lists and dicts."""
    seen = seen if seen is not None else set()
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, torch.nn.Module):
        for name, t in [*obj.named_parameters(), *obj.named_buffers()]:
            yield f"{path}.{name}", t
        for name, value in vars(obj).items():
            if not name.startswith("_") or name in ("_static",):
                yield from reachable_tensors(value, f"{path}.{name}", seen)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from reachable_tensors(v, f"{path}[{k!r}]", seen)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from reachable_tensors(v, f"{path}[{i}]", seen)
    elif type(obj).__module__.startswith("server.") and hasattr(obj, "__dict__"):
        for name, value in vars(obj).items():
            yield from reachable_tensors(value, f"{path}.{name}", seen)


# ------------------------------------------------------------------ placement


def test_every_tensor_of_a_loaded_sensevoice_runner_is_on_its_device(sv_dir):
    runner = _sv(sv_dir, device="meta")
    found = list(reachable_tensors(runner))
    assert len(found) > 100  # the walk reaches the model's weights, the core and the frontend
    elsewhere = [(p, t.device) for p, t in found if t.device != META]
    assert not elsewhere, f"tensors left off the runner's device: {elsewhere[:5]}"


def test_every_tensor_of_a_loaded_whisper_runner_is_on_its_device(whisper_meta):
    found = list(reachable_tensors(whisper_meta))
    assert len(found) > 50
    elsewhere = [(p, t.device) for p, t in found if t.device != META]
    assert not elsewhere, f"tensors left off the runner's device: {elsewhere[:5]}"


# ------------------------------------------------------------------ host syncs


def _assert_device_only(audit: DeviceAudit) -> None:
    bad = [e for e in audit.events if e.kind != "compute"]
    assert not bad, f"host work inside a captured function: {bad[:5]}"
    assert audit.of("compute"), "the audit saw no device work at all"


def test_captured_sensevoice_functions_never_touch_the_host(sv_dir):
    runner = _sv(sv_dir, device="meta")
    assert runner.core is not None and runner.frontend is not None
    b, t = 3, 40
    with torch.inference_mode(), DeviceAudit() as audit:
        feats, lens = runner.frontend(torch.zeros(b, 16000, device=META), torch.full((b,), 16000, device=META))
        runner.core(torch.zeros(b, t, 560, device=META), torch.full((b,), t, device=META),
                    torch.zeros(b, dtype=torch.long, device=META), torch.full((b,), 14, device=META))
    _assert_device_only(audit)


def test_captured_whisper_functions_never_touch_the_host(whisper_meta):
    model = whisper_meta.model
    assert model is not None
    b = 2
    with torch.inference_mode(), DeviceAudit() as audit:
        enc = model.encode(torch.zeros(b, 80, 3000, device=META))
        cross = model.cross_kv(enc)
        cache = model.new_cache(b, 40, torch.float32, META)
        model.decode_step_static(torch.zeros(b, 1, dtype=torch.long, device=META), torch.full((1,), 5, device=META), cache, cross)
    _assert_device_only(audit)


def test_sensevoice_launch_copies_in_first_and_out_last_and_never_waits(sv_dir, clips):
    """One launch: its host->device copies before the first kernel, no read-back in between,
    one device->host copy after the last kernel; collecting adds no device work."""
    runner = _sv(sv_dir, device="meta")
    with DeviceAudit() as audit:
        launched = runner.launch([clips[0][:40000], clips[1][:24000]], [ItemOptions("en"), ItemOptions("auto")])
        n_launch = len(audit.events)
        launched.result()
    assert not audit.of("sync") and not audit.of("mixed"), audit.of("sync") + audit.of("mixed")
    assert len(audit.of("h2d")) == 2 and audit.index("h2d", last=True) < audit.index("compute")
    assert len(audit.of("d2h")) == 1 and audit.index("d2h") > audit.index("compute", last=True)
    assert len(audit.events) == n_launch  # result() only waits and decodes on the host


def test_whisper_launch_copies_in_before_its_first_kernel(whisper_meta, clips):
    """Whisper's decoding is host-driven: its only reads are the end-of-text checks and two
    copies of the results (the search's, packed into one, and the per-item scalars); every
    host->device copy is queued before the encoder. (A fallback round or the word alignment
    would queue more work after these; on meta the text is empty and neither runs.)"""
    with DeviceAudit() as audit:
        whisper_meta.launch([clips[0][:48000], clips[1][:32000]], [ItemOptions("en"), ItemOptions("auto")])
    assert not audit.of("mixed"), audit.of("mixed")
    assert len(audit.of("h2d")) == 2 and audit.index("h2d", last=True) < audit.index("compute"), audit.of("h2d")
    # On meta the first end-of-text check answers "all ended": one check, then the results.
    assert len(audit.of("sync")) == 1
    assert len(audit.of("d2h")) == 2 and audit.index("d2h") > audit.index("compute", last=True)


# ------------------------------------------------------------------ capture


def _toy(backend: SimulatedGraphs | None, budget: int = 0, mode: GraphMode = GraphMode.CUDA_GRAPHS) -> tuple[MaskedToy, BucketedRunner]:
    model = MaskedToy().eval()
    specs = [InputSpec("x", ("B", "T", 6), torch.float32, 0.0), InputSpec("lens", ("B",), torch.long, 0)]
    r = BucketedRunner(model, specs, BucketTable([1, 2, 4], [16, 32]), torch.device("cpu"), mode,
                       memory_budget_bytes=budget, backend=backend)
    r.warmup()
    return model, r


def test_bucketed_calls_return_no_autograd_state():
    """Called outside inference mode, as a careless caller would: outputs must not require
    grad (a capture or replay with autograd on keeps backward graphs in the pool)."""
    _, r = _toy(None, mode=GraphMode.BUCKETED)
    y, pooled = r(torch.randn(2, 10, 6), torch.tensor([10, 4]))
    assert not y.requires_grad and not pooled.requires_grad and y.grad_fn is None


def test_capture_runs_without_autograd():
    sim = SimulatedGraphs()
    _toy(sim)
    assert len(sim.captures) == 6
    assert all(c.inference_mode and not c.grad_enabled for c in sim.captures), sim.captures
    assert not any(c.outputs_require_grad or c.outputs_have_grad_fn for c in sim.captures)


def test_outputs_survive_a_later_replay_of_another_bucket():
    """Graphs share a pool: replaying bucket (4, 32) may overwrite what bucket (1, 16) left.
    What a call returned must stay what it was."""
    model, r = _toy(SimulatedGraphs())
    x1, l1 = torch.randn(1, 12, 6), torch.tensor([12])
    x2, l2 = torch.randn(3, 30, 6), torch.tensor([30, 20, 5])
    first = r(x1, l1)
    kept = [o.clone() for o in first]
    r(x2, l2)
    assert r.stats["replays"] == 2
    for got, want in zip(first, kept):
        assert torch.equal(got, want)
    with torch.inference_mode():
        y_ref, pooled_ref = model(x1, l1)
    torch.testing.assert_close(first[1], pooled_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first[0][0, :12], y_ref[0, :12], rtol=1e-5, atol=1e-5)


def test_replay_on_another_stream_is_refused():
    sim = SimulatedGraphs()
    _, r = _toy(sim)
    r(torch.randn(1, 8, 6), torch.tensor([8]))
    sim.current_stream = 7
    with pytest.raises(RuntimeError, match="another stream"):
        r(torch.randn(1, 8, 6), torch.tensor([8]))


def test_memory_budget_counts_what_the_pool_holds():
    """The budget is held against reserved memory (static inputs + pool), and a dropped
    bucket's memory is handed back, not left in the shared pool."""
    full = SimulatedGraphs()
    _, unlimited = _toy(full)
    need = unlimited.stats["graph_memory_bytes"]
    assert need == full.reserved_bytes() > 0
    sim = SimulatedGraphs()
    budget = int(need * 0.6)
    _, r = _toy(sim, budget=budget)
    assert r.stats["dropped"] and r.stats["dropped"][0] == (4, 32), r.stats
    assert (4, 32) not in r.stats["captured"] and (1, 16) in r.stats["captured"]
    assert sim.reserved_bytes() <= budget, (sim.reserved_bytes(), budget)
    assert r.stats["graph_memory_bytes"] == sim.reserved_bytes()
    x, lens = torch.randn(4, 30, 6), torch.tensor([30, 1, 2, 3])
    r(x, lens)  # a dropped bucket's size runs eagerly
    assert r.stats["eager_fallbacks"] == 1


def test_graph_buckets_stop_at_the_largest_batch():
    assert buckets_up_to((1, 2, 4, 8, 16, 32), 8) == [1, 2, 4, 8]
    assert buckets_up_to((1, 2, 4, 8, 16, 32), 5) == [1, 2, 4, 8]
    assert buckets_up_to((1, 2, 4, 8), 64) == [1, 2, 4, 8]
    assert buckets_up_to((4, 1, 2), None) == [1, 2, 4]


def test_sensevoice_graph_path_on_a_stand_in_backend(sv_dir, clips):
    """The whole captured path of the runner: capture under inference mode, buckets only up to
    the batcher's batch, and two batches in flight in different buckets keep their results."""
    eager = _sv(sv_dir)
    sim = SimulatedGraphs()
    graphs = _sv(sv_dir, backend=sim, max_batch=2)
    assert graphs._forward is not None and graphs._graph_mode == "cuda_graphs"
    assert {b for b, _ in graphs._forward.stats["captured"]} == {1, 2}
    assert all(c.inference_mode and not c.outputs_require_grad for c in sim.captures)
    a_items = [clips[0][:16000], clips[1][:20000]]  # 16 and 20 LFR frames (60 ms): bucket (2, 32)
    b_items = [clips[0][16000:80000]]  # 66 frames: bucket (1, 128)
    opts_a, opts_b = [ItemOptions("en")] * 2, [ItemOptions("zh")]
    a_alone, b_alone = eager.transcribe(a_items, opts_a), eager.transcribe(b_items, opts_b)
    a = graphs.launch(a_items, opts_a)
    b = graphs.launch(b_items, opts_b)  # replays another bucket of the same pool before a is collected
    assert [r.fields["tokens"] for r in a.result()] == [r.fields["tokens"] for r in a_alone]
    assert [r.fields["tokens"] for r in b.result()] == [r.fields["tokens"] for r in b_alone]
    assert sim.replays == 2 and graphs._forward.stats["eager_fallbacks"] == 0


def test_whisper_graph_path_on_a_stand_in_backend(whisper_runner, clips):
    """Encoder graphs per batch bucket and decoder step graphs, captured and replayed through
    the backend, give the eager decoder's tokens; only buckets up to the batch are kept."""
    sim = SimulatedGraphs()
    cfg = dataclasses.replace(whisper_runner.config, warmup=False, graphs=GraphConfig(enabled=True, batch_buckets=(1, 2, 4, 8)))
    graphs = WhisperRunner(cfg, max_batch_size=2, graph_backend=sim)
    graphs.load()
    assert sorted(graphs.steps) == [1, 5]  # greedy partials; beam finals and sampled fallbacks (best_of 5)
    assert all(s.sizes == [1, 2] for s in graphs.steps.values())
    assert graphs.encoder_graphs is not None and graphs.encoder_graphs.stats["captured"] == [(2, 3000), (1, 3000)]
    assert all(c.inference_mode and not c.outputs_require_grad for c in sim.captures)
    items = [clips[0][:5 * 16000], clips[1][:4 * 16000]]
    for opts in ([ItemOptions("en")] * 2, [ItemOptions("en", partial=True)] * 2):
        want = whisper_runner.transcribe(items, opts)
        got = graphs.transcribe(items, opts)
        assert [r.fields["tokens"] for r in got] == [r.fields["tokens"] for r in want]
    assert graphs.steps[1].replays > 5 and graphs.steps[5].replays > 5


def test_whisper_decoder_buffers_are_charged_to_the_budget(whisper_runner):
    """The decoder's static buffers of batch bucket B scale with B; with a budget that holds
    the small buckets only, the large ones are not allocated (they decode eagerly)."""
    whisper_runner.max_batch_size = 8
    try:
        all_steps = whisper_runner._make_steps(static=True)
        assert all_steps is not None and all_steps.sizes == [1, 2, 4, 8]  # not 16 and 32
        per_row = all_steps.memory_bytes // 15  # 1+2+4+8 rows
        budget = per_row * 3 + per_row // 2  # room for buckets 1 and 2
        small = whisper_runner._make_steps(static=True, budget=budget)
        beams = whisper_runner._make_steps(static=True, group=5)
        assert beams is not None and beams.sizes == [1, 2, 4, 8]
        # Each item holds 5 rows of self-attention cache but one row of cross K/V.
        assert all_steps.memory_bytes < beams.memory_bytes < 5 * all_steps.memory_bytes
    finally:
        whisper_runner.max_batch_size = None
    assert small is not None and small.sizes == [1, 2] and small.dropped == [8, 4]
    assert small.memory_bytes <= budget
    assert small.bucket_for(3) is None  # eager for a batch of 3


# ------------------------------------------------------------------ non-finite scores


def _nan_row(row: int):
    def hook(_module, _inputs, output):
        output = output.clone()
        output[row] = float("nan")
        return output

    return hook


def test_sensevoice_row_with_non_finite_scores_fails_alone(sv_dir, clips):
    runner = _sv(sv_dir)
    items = [clips[0][:32000], clips[1][:32000], clips[2][:32000]]
    opts = [ItemOptions("en")] * 3
    clean = runner.transcribe(items, opts)
    assert runner.core is not None
    handle = runner.core.ctc_lo.register_forward_hook(_nan_row(1))
    try:
        out = runner.transcribe(items, opts)
    finally:
        handle.remove()
    assert isinstance(out[1], ItemError) and out[1].code == "model_output" and "non-finite" in str(out[1])
    assert [out[0].fields["tokens"], out[2].fields["tokens"]] == [clean[0].fields["tokens"], clean[2].fields["tokens"]]


def test_whisper_row_with_non_finite_scores_fails_alone(whisper_runner, clips):
    """A NaN row never ends, so it decodes to the token limit at every fallback temperature:
    the limit is 40 tokens here (128 shipped), which the clean 3 s item stays well under."""
    items = [clips[0][:3 * 16000], clips[1][:3 * 16000]]
    opts = [ItemOptions("en")] * 2
    base = whisper_runner.config
    whisper_runner.config = dataclasses.replace(base, whisper=dataclasses.replace(base.whisper, max_new_tokens=40))
    try:
        clean = whisper_runner.transcribe(items, opts)
        handle = whisper_runner.model.dec_ln.register_forward_hook(_nan_row(0))
        try:
            out = whisper_runner.transcribe(items, opts)
        finally:
            handle.remove()
    finally:
        whisper_runner.config = base
    assert 0 < len(clean[1].fields["tokens"]) < 30  # ended by itself, not cut by the limit
    assert isinstance(out[0], ItemError) and out[0].code == "model_output"
    assert out[1].fields["tokens"] == clean[1].fields["tokens"] and out[1].text == clean[1].text
