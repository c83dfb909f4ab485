"""Bucketed static-shape execution: one captured graph per (batch, frames) bucket, eager fallback.

A model call with real sizes (b, t) is padded into static buffers of the smallest bucket
(B >= b, T >= t), then the bucket's captured CUDA graph is replayed. The idioms follow
vLLM's and NeMo's graph runners:
- a precomputed size -> bucket table, so the hot path does two list lookups, no search;
- static input buffers allocated once at the largest bucket; each bucket uses the
  [:B, :T] view of them, and real data is copied into [:b, :t] with padding elsewhere
  (padding rows get length 0, which the model masks);
- all graphs share one memory pool, captured largest first so smaller ones reuse it;
- warm-up runs on a side stream before capture;
- sizes beyond the largest bucket run eagerly on their real shapes, and are counted.

Three rules make the captured path safe on first contact with a device, each with a CPU test:
- warm-up, capture and replay run under `torch.inference_mode()`: a capture with autograd on
  keeps backward graphs and their activations alive in the graph pool;
- a replay's outputs are copied out of the graph's static storage before the call returns
  (one small device copy, queued on the same stream). Graphs share a pool, so any later
  replay, of any bucket, may reuse the memory of an earlier graph's outputs; with the copy,
  a batch launched before the previous one is collected cannot overwrite its results;
- every replay happens on the stream the graphs were captured for (checked): the launch /
  collect pipeline relies on one stream ordering all batches' copies and kernels.

The device side is a `GraphBackend`: `CudaGraphs` on a GPU. Tests drive the same capture,
budget and replay logic on a CPU through a stand-in backend.

`GraphMode.BUCKETED` does the same padding but calls the model eagerly: it runs on any
device, which is how the CPU test suite checks that padding to a bucket is exact.
"""

from __future__ import annotations

import bisect
import enum
import logging
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Protocol, Sequence

import torch

log = logging.getLogger(__name__)


class GraphMode(str, enum.Enum):
    EAGER = "eager"
    BUCKETED = "bucketed"
    CUDA_GRAPHS = "cuda_graphs"


@dataclass(frozen=True)
class InputSpec:
    name: str
    dims: tuple[str | int, ...]
    """"B" = batch dim, "T" = bucketed length dim, ints = fixed sizes."""
    dtype: torch.dtype
    pad_value: float | int = 0


def buckets_up_to(buckets: Sequence[int], limit: int | None) -> list[int]:
    """The sorted batch buckets a batcher that sends at most `limit` items can use: every
    bucket up to the first one that holds `limit` (None = all). Capturing larger ones would
    only hold memory that no batch uses."""
    sizes = sorted(set(int(b) for b in buckets))
    if limit is None:
        return sizes
    i = bisect.bisect_left(sizes, limit)
    return sizes[: i + 1]


def keep_within_budget(
    keys: Sequence[Hashable],
    build: Callable[[Any, Any], None],
    discard: Callable[[Any], Any],
    held: Callable[[], int],
    new_pool: Callable[[], Any],
    budget: int,
    base: int,
    name: str,
) -> tuple[list[Any], list[Any], int]:
    """Build each key in order (largest first) into one shared pool, keeping those that fit.

    `build(key, pool)` allocates and captures one key, `discard(key)` forgets it, `held()` is the
    memory held now, charged from `base`; `new_pool()` gives a pool (None: nothing is shared).
    A key whose build takes the total over `budget` (0 = no limit) is discarded. In a shared
    pool deleting one graph does not hand back what its capture added (the pool goes only with
    its last graph), so the kept keys are then built again in a new pool.
    Returns (kept, dropped, bytes held for the kept ones)."""
    pool = new_pool()
    kept: list[Any] = []
    dropped: list[Any] = []
    for key in keys:
        build(key, pool)
        used = held() - base
        if not budget or used <= budget:
            kept.append(key)
            continue
        dropped.append(key)
        log.warning("%s: %s dropped: %.1f MiB > budget %.1f MiB", name, key, used / 2**20, budget / 2**20)
        discard(key)
        if pool is not None:
            for k in kept:
                discard(k)
            pool = new_pool()
            for k in kept:
                build(k, pool)
    return kept, dropped, held() - base


class BucketTable:
    """Smallest (B, T) bucket for a (batch, frames) size, by table lookup."""

    def __init__(self, batch_buckets: Sequence[int], frame_buckets: Sequence[int]) -> None:
        self.batch_buckets = sorted(set(int(b) for b in batch_buckets))
        self.frame_buckets = sorted(set(int(t) for t in frame_buckets))
        if not self.batch_buckets or not self.frame_buckets or self.batch_buckets[0] < 1 or self.frame_buckets[0] < 1:
            raise ValueError("bucket lists must be non-empty and positive")
        # Dense tables for the batch dim (small) and bisect-free lookups for frames via a
        # table over the frame range as well (a few thousand ints at most).
        self._b = [0] * (self.batch_buckets[-1] + 1)
        for size in range(1, self.batch_buckets[-1] + 1):
            self._b[size] = self.batch_buckets[bisect.bisect_left(self.batch_buckets, size)]
        self._t = [0] * (self.frame_buckets[-1] + 1)
        for size in range(0, self.frame_buckets[-1] + 1):
            self._t[size] = self.frame_buckets[bisect.bisect_left(self.frame_buckets, max(size, 1))]

    @property
    def max_batch(self) -> int:
        return self.batch_buckets[-1]

    @property
    def max_frames(self) -> int:
        return self.frame_buckets[-1]

    def lookup(self, batch: int, frames: int) -> tuple[int, int] | None:
        if batch < 1 or batch > self.max_batch or frames < 0 or frames > self.max_frames:
            return None
        return self._b[batch], self._t[frames]

    def buckets(self) -> list[tuple[int, int]]:
        """Every bucket, largest first (capture order)."""
        return sorted(((b, t) for b in self.batch_buckets for t in self.frame_buckets), key=lambda bt: (bt[0] * bt[1], bt), reverse=True)


class GraphBackend(Protocol):
    """What capture and replay need from a device."""

    def alloc(self, shape: Sequence[int], dtype: torch.dtype, fill: float | int) -> torch.Tensor:
        """Static storage that graphs read (counted in `reserved_bytes`)."""

    def new_pool(self) -> Any:
        """A memory pool graphs captured into it share."""

    def warm(self, fn: Callable[[], Any]) -> None:
        """Run `fn` outside capture (kernel selection, workspaces)."""

    def capture(self, fn: Callable[[], Any], pool: Any) -> tuple[Any, Any]:
        """Capture `fn` into `pool`: (graph, the outputs `fn` returned during capture)."""

    def replay(self, graph: Any) -> None: ...

    def stream(self) -> Hashable:
        """Identity of the calling thread's current stream."""

    def reserved_bytes(self) -> int:
        """Device memory held, after handing back cached blocks no tensor or pool uses."""


class CudaGraphs:
    """`GraphBackend` of a CUDA device."""

    def __init__(self, device: torch.device) -> None:
        if torch.device(device).type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.device = torch.device(device)

    def alloc(self, shape: Sequence[int], dtype: torch.dtype, fill: float | int) -> torch.Tensor:
        return torch.full(tuple(shape), fill, dtype=dtype, device=self.device)

    def new_pool(self) -> Any:
        return torch.cuda.graph_pool_handle()

    def warm(self, fn: Callable[[], Any]) -> None:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)

    def capture(self, fn: Callable[[], Any], pool: Any) -> tuple[Any, Any]:
        graph = torch.cuda.CUDAGraph()
        # thread_local: the batcher's worker is the only thread that replays; other threads
        # may keep using the device while a capture runs.
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            out = fn()
        return graph, out

    def replay(self, graph: Any) -> None:
        graph.replay()

    def stream(self) -> Hashable:
        return torch.cuda.current_stream(self.device).cuda_stream

    def reserved_bytes(self) -> int:
        # memory_allocated would miss what a graph pool keeps for a graph's intermediates
        # (freed after capture, reserved for replays); reserved memory counts it. The regular
        # allocator's cached free blocks (warm-up workspaces) are handed back first.
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        return torch.cuda.memory_reserved(self.device)


class BucketedRunner:
    """Calls `forward(*inputs)` through static, bucket-shaped buffers (and captured graphs).

    In CUDA_GRAPHS mode outputs are copies, sliced to the real batch, that no later call
    touches. In BUCKETED mode they are what `forward` returned on the padded views.
    """

    def __init__(
        self,
        forward: Callable[..., Any],
        inputs: Sequence[InputSpec],
        table: BucketTable,
        device: torch.device,
        mode: GraphMode,
        memory_budget_bytes: int = 0,
        name: str = "model",
        backend: GraphBackend | None = None,
    ) -> None:
        if mode is GraphMode.CUDA_GRAPHS and backend is None:
            backend = CudaGraphs(device)  # raises on a device without CUDA graphs
        self.forward = forward
        self.specs = list(inputs)
        self.table = table
        self.device = torch.device(device)
        self.mode = mode
        self.backend = backend
        self.memory_budget = memory_budget_bytes
        self.name = name
        self._static: list[torch.Tensor] = []
        self._graphs: dict[tuple[int, int], tuple[Any, tuple[torch.Tensor, ...]]] = {}
        self._stream: Hashable | None = None
        self.stats: dict[str, Any] = {"replays": 0, "bucketed_calls": 0, "eager_fallbacks": 0, "captured": [], "dropped": [], "graph_memory_bytes": 0}
        self._t_axis = [spec.dims.index("T") if "T" in spec.dims else None for spec in self.specs]
        self._b_axis = [spec.dims.index("B") for spec in self.specs]

    @staticmethod
    def mode_for(device: torch.device, graphs_enabled: bool) -> GraphMode:
        return GraphMode.CUDA_GRAPHS if graphs_enabled and torch.device(device).type == "cuda" else GraphMode.EAGER

    # ------------------------------------------------------------------ buffers
    def _alloc_static(self) -> None:
        self._static = []
        for spec in self.specs:
            shape = [self.table.max_batch if d == "B" else self.table.max_frames if d == "T" else int(d) for d in spec.dims]
            if self.backend is not None:
                self._static.append(self.backend.alloc(shape, spec.dtype, spec.pad_value))
            else:
                self._static.append(torch.full(shape, spec.pad_value, dtype=spec.dtype, device=self.device))

    def _views(self, b: int, t: int) -> list[torch.Tensor]:
        out = []
        for buf, ta, ba in zip(self._static, self._t_axis, self._b_axis):
            v = buf.narrow(ba, 0, b)
            if ta is not None:
                v = v.narrow(ta, 0, t)
            out.append(v)
        return out

    def _fill(self, bucket: tuple[int, int], inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        views = self._views(*bucket)
        for view, x, spec, ta, ba in zip(views, inputs, self.specs, self._t_axis, self._b_axis):
            view.fill_(spec.pad_value)
            dst = view.narrow(ba, 0, x.shape[ba])
            if ta is not None:
                dst = dst.narrow(ta, 0, x.shape[ta])
            dst.copy_(x, non_blocking=True)
        return views

    # ------------------------------------------------------------------ warm-up / capture
    def warmup(self) -> None:
        if self.mode is GraphMode.EAGER:
            return
        with torch.inference_mode():
            if self.mode is GraphMode.BUCKETED:
                self._alloc_static()
                return
            self._capture_all()

    def _capture(self, bucket: tuple[int, int], pool: Any) -> None:
        assert self.backend is not None
        views = self._views(*bucket)
        self.backend.warm(lambda: self.forward(*views))
        graph, out = self.backend.capture(lambda: self.forward(*views), pool)
        self._graphs[bucket] = (graph, out if isinstance(out, tuple) else (out,))

    def _capture_all(self) -> None:
        backend = self.backend
        assert backend is not None
        self._stream = backend.stream()
        base = backend.reserved_bytes()  # before the static inputs: they count toward the budget
        self._alloc_static()
        # Largest first: the smaller graphs reuse its pool.
        kept, dropped, held = keep_within_budget(
            self.table.buckets(), self._capture, self._graphs.pop, backend.reserved_bytes, backend.new_pool,
            self.memory_budget, base, f"{self.name} bucket",
        )
        self.stats.update(captured=kept, dropped=dropped, graph_memory_bytes=held)
        log.info("%s: captured %d graphs (%.1f MiB with static inputs)", self.name, len(self._graphs),
                 self.stats["graph_memory_bytes"] / 2**20)

    # ------------------------------------------------------------------ call
    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.inference_mode():
            return self._call(inputs)

    def _call(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if self.mode is GraphMode.EAGER:
            out = self.forward(*inputs)
            return out if isinstance(out, tuple) else (out,)
        b = inputs[0].shape[self._b_axis[0]]
        t_idx = next((i for i, ta in enumerate(self._t_axis) if ta is not None), None)
        t = inputs[t_idx].shape[self._t_axis[t_idx]] if t_idx is not None else self.table.frame_buckets[0]
        bucket = self.table.lookup(b, t)
        if bucket is None or (self.mode is GraphMode.CUDA_GRAPHS and bucket not in self._graphs):
            self.stats["eager_fallbacks"] += 1
            out = self.forward(*inputs)
            return out if isinstance(out, tuple) else (out,)
        if not self._static:  # BUCKETED used without warmup(): allocate on first use
            self._alloc_static()
        if self.mode is GraphMode.CUDA_GRAPHS:
            assert self.backend is not None
            if self.backend.stream() != self._stream:
                raise RuntimeError(
                    f"{self.name}: graph replay on another stream than the one captured for: batches "
                    "in flight are ordered by one stream (their copies and kernels), so replays must stay on it"
                )
            views = self._fill(bucket, inputs)
            graph, outs = self._graphs[bucket]
            self.backend.replay(graph)
            self.stats["replays"] += 1
            return tuple(o[:b].clone() for o in outs)
        views = self._fill(bucket, inputs)
        out = self.forward(*views)
        self.stats["bucketed_calls"] += 1
        return tuple(o[:b] for o in (out if isinstance(out, tuple) else (out,)))
