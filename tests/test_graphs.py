"""Bucketed execution on CPU: the table, and padding to a bucket being exact (BUCKETED == EAGER)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from server.graphs import BucketedRunner, BucketTable, GraphMode, InputSpec


def test_bucket_table_lookup():
    t = BucketTable([1, 2, 4, 8], [32, 64, 128])
    assert t.lookup(1, 1) == (1, 32)
    assert t.lookup(3, 33) == (4, 64)
    assert t.lookup(8, 128) == (8, 128)
    assert t.lookup(9, 10) is None and t.lookup(2, 129) is None and t.lookup(0, 5) is None
    order = t.buckets()
    assert order[0] == (8, 128) and order[-1] == (1, 32) and len(order) == 12
    with pytest.raises(ValueError):
        BucketTable([], [1])


class MaskedToy(torch.nn.Module):
    """Length-masked conv + attention + pooling: valid outputs must not see padding."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(6, 16)
        self.attn = torch.nn.MultiheadAttention(16, 2, batch_first=True)
        self.out = torch.nn.Linear(16, 5)

    def forward(self, x: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = x.shape[1]
        mask = torch.arange(t, device=x.device)[None, :] < lens[:, None]
        h = self.proj(x) * mask[..., None]
        # Padding rows (length 0) would make every key masked; keep one key open for them.
        key_pad = ~mask
        key_pad[:, 0] = False
        a, _ = self.attn(h, h, h, key_padding_mask=key_pad)
        y = self.out(a) * mask[..., None]
        pooled = y.sum(1) / lens.clamp(min=1)[:, None]
        return y, pooled


def test_bucketed_padding_is_exact_for_many_shapes():
    model = MaskedToy().eval()
    specs = [InputSpec("x", ("B", "T", 6), torch.float32, 0.0), InputSpec("lens", ("B",), torch.long, 0)]
    table = BucketTable([1, 2, 4, 8], [16, 32, 64])
    bucketed = BucketedRunner(model, specs, table, torch.device("cpu"), GraphMode.BUCKETED)
    bucketed.warmup()
    rng = np.random.default_rng(0)
    with torch.inference_mode():
        for _ in range(30):
            b, t = int(rng.integers(1, 9)), int(rng.integers(1, 65))
            x = torch.from_numpy(rng.standard_normal((b, t, 6)).astype(np.float32))
            lens = torch.from_numpy(rng.integers(1, t + 1, size=b))
            y_ref, pooled_ref = model(x, lens)
            y, pooled = bucketed(x, lens)
            assert y.shape[0] == b and pooled.shape == pooled_ref.shape
            for i in range(b):
                n = int(lens[i])
                torch.testing.assert_close(y[i, :n], y_ref[i, :n], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(pooled, pooled_ref, rtol=1e-5, atol=1e-5)
    assert bucketed.stats["bucketed_calls"] == 30 and bucketed.stats["eager_fallbacks"] == 0


def test_oversize_falls_back_to_eager_and_eager_mode_passes_through():
    model = MaskedToy().eval()
    specs = [InputSpec("x", ("B", "T", 6), torch.float32, 0.0), InputSpec("lens", ("B",), torch.long, 0)]
    r = BucketedRunner(model, specs, BucketTable([1, 2], [8]), torch.device("cpu"), GraphMode.BUCKETED)
    r.warmup()
    x = torch.randn(3, 20, 6)
    lens = torch.tensor([20, 5, 1])
    with torch.inference_mode():
        y, _ = r(x, lens)
        assert y.shape == (3, 20, 5) and r.stats["eager_fallbacks"] == 1
        eager = BucketedRunner(model, specs, BucketTable([1], [8]), torch.device("cpu"), GraphMode.EAGER)
        torch.testing.assert_close(eager(x, lens)[0], model(x, lens)[0])
    assert BucketedRunner.mode_for(torch.device("cpu"), True) is GraphMode.EAGER
    with pytest.raises(ValueError):
        BucketedRunner(model, specs, BucketTable([1], [8]), torch.device("cpu"), GraphMode.CUDA_GRAPHS)
