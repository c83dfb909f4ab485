"""Bucketed static-shape execution: one CUDA graph per (batch, frames) bucket, eager fallback.

A model call with real sizes (b, t) is padded into static buffers of the smallest bucket
(B >= b, T >= t), then the bucket's captured CUDA graph is replayed. The idioms follow
vLLM's and NeMo's graph runners:
- a precomputed size -> bucket table, so the hot path does two list lookups, no search;
- static input buffers allocated once at the largest bucket; each bucket uses the
  [:B, :T] view of them, and real data is copied into [:b, :t] with padding elsewhere
  (padding rows get length 0, which the model masks);
- all graphs share one memory pool, captured largest first so smaller ones reuse it;
- warm-up runs on a side stream before capture; capture uses thread-local error mode
  (the batcher's worker is the only thread that replays);
- sizes beyond the largest bucket run eagerly on their real shapes, and are counted.

`GraphMode.BUCKETED` does the same padding but calls the model eagerly: it runs on any
device, which is how the CPU test suite checks that padding to a bucket is exact.
"""

from __future__ import annotations

import bisect
import enum
import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

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


class BucketedRunner:
    """Calls `forward(*inputs)` through static, bucket-shaped buffers (and CUDA graphs on GPU).

    Outputs of the BUCKETED and CUDA_GRAPHS modes are views into static storage sliced to
    the real batch: the caller must consume or copy them before the next call.
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
    ) -> None:
        if mode is GraphMode.CUDA_GRAPHS and torch.device(device).type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.forward = forward
        self.specs = list(inputs)
        self.table = table
        self.device = torch.device(device)
        self.mode = mode
        self.memory_budget = memory_budget_bytes
        self.name = name
        self._static: list[torch.Tensor] = []
        self._graphs: dict[tuple[int, int], tuple[Any, tuple[torch.Tensor, ...]]] = {}
        self._pool = None
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
        self._alloc_static()
        if self.mode is GraphMode.BUCKETED:
            return
        self._pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        base = torch.cuda.memory_allocated(self.device)
        for bucket in self.table.buckets():  # largest first: the smaller graphs reuse its pool
            views = self._views(*bucket)
            with torch.cuda.stream(side):
                for _ in range(2):  # kernels chosen and workspaces allocated outside the capture
                    self.forward(*views)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                out = self.forward(*views)
            outs = out if isinstance(out, tuple) else (out,)
            used = torch.cuda.memory_allocated(self.device) - base
            if self.memory_budget and used > self.memory_budget:
                self.stats["dropped"].append(bucket)
                log.warning("%s: bucket %s dropped: graphs would use %.1f MiB > budget", self.name, bucket, used / 2**20)
                del graph, outs
                continue
            self._graphs[bucket] = (graph, outs)
            self.stats["captured"].append(bucket)
        torch.cuda.synchronize(self.device)
        self.stats["graph_memory_bytes"] = torch.cuda.memory_allocated(self.device) - base
        log.info("%s: captured %d CUDA graphs (%.1f MiB)", self.name, len(self._graphs), self.stats["graph_memory_bytes"] / 2**20)

    # ------------------------------------------------------------------ call
    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
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
        views = self._fill(bucket, inputs)
        if self.mode is GraphMode.CUDA_GRAPHS:
            graph, outs = self._graphs[bucket]
            graph.replay()
            self.stats["replays"] += 1
        else:
            out = self.forward(*views)
            outs = out if isinstance(out, tuple) else (out,)
            self.stats["bucketed_calls"] += 1
        return tuple(o[:b] for o in outs)
