"""A CPU stand-in for CUDA graphs, so the CPU suite runs the captured path of every runner.

`SimulatedGraphs` implements `server.graphs.GraphBackend` with the properties of CUDA graphs
that the serving code must survive, made as unforgiving as the real device allows:
- a graph's outputs are static storage that a replay rewrites in place;
- graphs captured into one pool share memory, so a replay of *any* graph of the pool may
  overwrite the outputs of every other one (modelled as all of them aliasing one buffer);
- capture records whether autograd was on and whether anything returned requires grad;
- memory: static allocations plus, per live pool, the largest sum of tensor bytes one
  captured call produced; a pool's memory goes only when its last graph and handle do;
- the current stream is a number the test can change.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _Pool:
    def __init__(self) -> None:
        self.bytes = 0
        self.shared: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def alias(self, index: int, value: torch.Tensor) -> torch.Tensor:
        """`value` copied into this pool's shared storage for output slot `index`."""
        key = (index, value.dtype)
        buf = self.shared.get(key)
        if buf is None or buf.numel() < value.numel():
            buf = torch.empty(max(value.numel(), 1), dtype=value.dtype, device=value.device)
            self.shared[key] = buf
        out = buf[: value.numel()].view(value.shape)
        out.copy_(value)
        return out


class _BytesProduced(TorchDispatchMode):
    """Sums the bytes of every tensor an op returns: a call's activation footprint."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat, _ = tree_flatten(out)
        self.bytes += sum(t.nbytes for t in flat if isinstance(t, torch.Tensor))
        return out


@dataclass
class _Graph:
    fn: Callable[[], Any]
    outputs: tuple[torch.Tensor, ...]
    pool: _Pool


@dataclass
class Capture:
    grad_enabled: bool
    inference_mode: bool
    outputs_require_grad: bool
    outputs_have_grad_fn: bool


@dataclass
class SimulatedGraphs:
    current_stream: int = 0
    static_bytes: int = 0
    captures: list[Capture] = field(default_factory=list)
    replays: int = 0
    warm_calls: int = 0
    _pools: "weakref.WeakSet[_Pool]" = field(default_factory=weakref.WeakSet)

    def alloc(self, shape: Sequence[int], dtype: torch.dtype, fill: float | int) -> torch.Tensor:
        t = torch.full(tuple(shape), fill, dtype=dtype)
        self.static_bytes += t.nbytes
        return t

    def new_pool(self) -> _Pool:
        pool = _Pool()
        self._pools.add(pool)
        return pool

    def warm(self, fn: Callable[[], Any]) -> None:
        for _ in range(2):
            fn()
            self.warm_calls += 1

    def capture(self, fn: Callable[[], Any], pool: _Pool) -> tuple[_Graph, Any]:
        with _BytesProduced() as produced:
            out = fn()
        outs = out if isinstance(out, tuple) else (out,)
        self.captures.append(Capture(
            grad_enabled=torch.is_grad_enabled(),
            inference_mode=torch.is_inference_mode_enabled(),
            outputs_require_grad=any(o.requires_grad for o in outs),
            outputs_have_grad_fn=any(o.grad_fn is not None for o in outs),
        ))
        pool.bytes = max(pool.bytes, produced.bytes)
        aliased = tuple(pool.alias(i, o) for i, o in enumerate(outs))
        graph = _Graph(fn, aliased, pool)
        return graph, aliased if isinstance(out, tuple) else aliased[0]

    def replay(self, graph: _Graph) -> None:
        out = graph.fn()
        outs = out if isinstance(out, tuple) else (out,)
        # Every graph of the pool writes the same storage: the worst a shared pool can do.
        for dst, src in zip(graph.outputs, outs):
            dst.copy_(src)
        self.replays += 1

    def stream(self) -> int:
        return self.current_stream

    def reserved_bytes(self) -> int:
        return self.static_bytes + sum(p.bytes for p in list(self._pools))
