"""Whisper decoder steps through static per-batch-bucket buffers, replayed as CUDA graphs on GPU.

Each batch bucket of B items owns static storage for B*g decoder rows, g being the rows per
item of the search it serves (1 for greedy, the beam width for beam search, best_of for
sampling): the token column [B*g, 1], the position [1], the self-attention cache [.., B*g, ..]
and the cross-attention keys/values of B items (an item's g rows share them). A batch of
b <= B items copies its cross K/V into the first b item slots, its prompt cache into the first
b*g rows, and then every step writes the new tokens and position into the static inputs and
replays the bucket's graph (`Whisper.decode_step_static`: no host sync, no shape change).
Rows beyond b*g hold stale data that no real row can see (each row attends only to itself).

With no graph backend the same buffers are used and the static step is called eagerly: this
is the CPU reference the tests compare with the plain eager decoder, and the GPU fallback.

Only batch buckets up to the batcher's largest batch are allocated, and what they hold
(static buffers and graph pool) is charged to the graph memory budget, largest first: a
bucket that does not fit is not kept, and batches of its size decode eagerly.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from typing import Sequence

import torch

from server.graphs import GraphBackend, keep_within_budget
from server.runners.whisper.model import Whisper

log = logging.getLogger(__name__)


@dataclass
class _Bucket:
    size: int
    tokens: torch.Tensor
    pos: torch.Tensor
    cache: torch.Tensor
    cross_k: list[torch.Tensor]
    cross_v: list[torch.Tensor]
    logits: torch.Tensor | None = None
    graph: "torch.cuda.CUDAGraph | None" = None


class StaticDecoderSteps:
    def __init__(self, model: Whisper, batch_buckets: Sequence[int], max_len: int, dtype: torch.dtype,
                 device: torch.device, backend: GraphBackend | None, memory_budget_bytes: int = 0,
                 group: int = 1) -> None:
        self.model = model
        self.group = group
        """Decoder rows per item (1 greedy, the beam width, or best_of)."""
        self.sizes = sorted(set(batch_buckets))
        self.max_len = max_len
        self.dtype = dtype
        self.device = device
        self.backend = backend
        """Captures and replays the step graphs; None = the same buffers, run eagerly."""
        self.memory_budget = memory_budget_bytes
        self.buckets: dict[int, _Bucket] = {}
        self.dropped: list[int] = []
        self.memory_bytes = 0
        self.replays = 0

    def _alloc(self, size: int) -> _Bucket:
        d = self.model.dims
        h, dh = d.n_heads, d.d_model // d.n_heads
        z = lambda: torch.zeros(size, h, d.n_audio_ctx, dh, dtype=self.dtype, device=self.device)  # noqa: E731
        rows = size * self.group
        return _Bucket(
            size=size,
            tokens=torch.zeros(rows, 1, dtype=torch.long, device=self.device),
            pos=torch.zeros(1, dtype=torch.long, device=self.device),
            cache=self.model.new_cache(rows, self.max_len, self.dtype, self.device),
            cross_k=[z() for _ in range(d.n_dec_layers)],
            cross_v=[z() for _ in range(d.n_dec_layers)],
        )

    def _run(self, bk: _Bucket) -> torch.Tensor:
        return self.model.decode_step_static(bk.tokens, bk.pos, bk.cache, (bk.cross_k, bk.cross_v))

    def _held_bytes(self) -> int:
        if self.backend is not None:
            return self.backend.reserved_bytes()
        # Eager: what the buckets' buffers take.
        return sum(t.nbytes for bk in self.buckets.values() for t in (bk.tokens, bk.pos, bk.cache, *bk.cross_k, *bk.cross_v))

    def _build(self, size: int, pool: object) -> None:
        bk = self._alloc(size)
        if self.backend is not None:
            bk.pos.fill_(self.max_len - 1)
            self.backend.warm(lambda: self._run(bk))
            bk.graph, bk.logits = self.backend.capture(lambda: self._run(bk), pool)
        self.buckets[size] = bk

    def warmup(self) -> None:
        """Allocate each bucket (largest first) and, with a backend, capture its step graph,
        keeping those that fit the memory budget."""
        backend = self.backend
        with torch.inference_mode():
            _, self.dropped, self.memory_bytes = keep_within_budget(
                list(reversed(self.sizes)), self._build, self.buckets.pop, self._held_bytes,
                backend.new_pool if backend is not None else lambda: None,
                self.memory_budget, self._held_bytes(), "whisper decoder batch bucket",
            )
            self.sizes = sorted(self.buckets)
        if backend is not None:
            log.info("whisper decoder (%d row(s) per item): captured step graphs for batch buckets %s (%.1f MiB)",
                     self.group, self.sizes, self.memory_bytes / 2**20)

    def bucket_for(self, b: int) -> _Bucket | None:
        i = bisect.bisect_left(self.sizes, b)
        return self.buckets.get(self.sizes[i]) if i < len(self.sizes) else None

    def begin(self, bk: _Bucket, cross: tuple[list[torch.Tensor], list[torch.Tensor]], b: int) -> torch.Tensor:
        """Load a batch's cross K/V (b items); returns the cache view of its b*group rows, which
        the caller fills with the prompt and reorders between beam steps."""
        for i in range(len(bk.cross_k)):
            bk.cross_k[i][:b].copy_(cross[0][i])
            bk.cross_v[i][:b].copy_(cross[1][i])
        return bk.cache[:, :, : b * self.group]

    def step(self, bk: _Bucket, tokens: torch.Tensor, offset: int) -> torch.Tensor:
        """tokens [rows] at position `offset` -> logits [rows, vocab] (a view: consume before the next step)."""
        b = tokens.shape[0]
        bk.tokens[:b, 0].copy_(tokens)
        bk.pos.fill_(offset)
        if bk.graph is not None:
            assert self.backend is not None
            self.backend.replay(bk.graph)
            self.replays += 1
            assert bk.logits is not None
            return bk.logits[:b]
        return self._run(bk)[:b]
