"""A compact torch Whisper whose weights come from a CTranslate2 checkpoint.

Built for batched serving and, on GPU, for CUDA-graph capture:
- the encoder is a pure function of a fixed-shape [B, 80, 3000] log-mel batch;
- cross-attention keys/values are computed once per batch (`cross_kv`), not per step;
- self-attention keys/values live in a static cache [layers, B, heads, max_len, d_head]
  written in place (`index_copy_`), so a decode step changes no tensor shape;
- the beams (or samples) of one item are consecutive decoder rows that share the item's
  cross-attention keys/values without copying them.
The eager step attends over the filled prefix only (a slice whose length is a Python
int), which is what a CPU wants; a captured step would attend over the full cache
with a mask instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from server.runners.base import RunnerError


@dataclass(frozen=True)
class Dims:
    n_mels: int
    n_audio_ctx: int
    n_text_ctx: int
    n_vocab: int
    d_model: int
    n_heads: int
    n_enc_layers: int
    n_dec_layers: int


def _ln(d: int) -> nn.LayerNorm:
    return nn.LayerNorm(d)


def _heads(x: torch.Tensor, parts: int, heads: int) -> torch.Tensor:
    """[B, S, parts*D] projection -> [parts, B, heads, S, D/heads] (q/k/v split per head)."""
    b, s, width = x.shape
    return x.view(b, s, parts, heads, width // (parts * heads)).permute(2, 0, 3, 1, 4)


class EncoderBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.attn_ln = _ln(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.mlp_ln = _ln(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = _heads(self.qkv(self.attn_ln(x)), 3, self.heads)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.mlp_ln(x))))


class DecoderBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.self_ln = _ln(d)
        self.self_qkv = nn.Linear(d, 3 * d)
        self.self_out = nn.Linear(d, d)
        self.cross_ln = _ln(d)
        self.cross_q = nn.Linear(d, d)
        self.cross_kv = nn.Linear(d, 2 * d)
        self.cross_out = nn.Linear(d, d)
        self.mlp_ln = _ln(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = _heads(self.self_qkv(self.self_ln(x)), 3, self.heads)
        return q, k, v

    def _after_self_attention(self, x: torch.Tensor, a: torch.Tensor, cross_k: torch.Tensor, cross_v: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        x = x + self.self_out(a.transpose(1, 2).reshape(b, s, d))
        q = _heads(self.cross_q(self.cross_ln(x)), 1, self.heads)[0]
        n = cross_k.shape[0]
        if n != b:
            # g consecutive rows (an item's beams or samples) share the item's cross K/V: their
            # queries attend as g*s positions of one row, so the K/V (1500 frames per layer,
            # the bulk of a step's memory traffic) are read once per item, not once per row.
            g = b // n
            h, dh = q.shape[1], q.shape[3]
            q = q.reshape(n, g, h, s, dh).transpose(1, 2).reshape(n, h, g * s, dh)
            a = F.scaled_dot_product_attention(q, cross_k, cross_v)
            a = a.reshape(n, h, g, s, dh).transpose(1, 2).reshape(b, h, s, dh)
        else:
            a = F.scaled_dot_product_attention(q, cross_k, cross_v)
        x = x + self.cross_out(a.transpose(1, 2).reshape(b, s, d))
        return x + self.fc2(F.gelu(self.fc1(self.mlp_ln(x))))

    def forward(
        self,
        x: torch.Tensor,
        offset: int,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cross_k: torch.Tensor,
        cross_v: torch.Tensor,
    ) -> torch.Tensor:
        """Eager: S new tokens at Python-int positions offset.., attending over the filled prefix."""
        s = x.shape[1]
        q, k, v = self._qkv(x)
        pos = torch.arange(offset, offset + s, device=x.device)
        k_cache.index_copy_(2, pos, k)
        v_cache.index_copy_(2, pos, v)
        keys, values = k_cache[:, :, : offset + s], v_cache[:, :, : offset + s]
        if s > 1:
            # Causal within the new tokens; everything already cached is visible.
            mask = torch.ones(s, offset + s, dtype=torch.bool, device=x.device).tril(offset)
            a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
        else:
            a = F.scaled_dot_product_attention(q, keys, values)
        return self._after_self_attention(x, a, cross_k, cross_v)

    def step_static(
        self,
        x: torch.Tensor,
        pos: torch.Tensor,
        visible: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        cross_k: torch.Tensor,
        cross_v: torch.Tensor,
    ) -> torch.Tensor:
        """Capturable: one token at a device-tensor position, attending over the whole cache
        through a mask, so no shape depends on the step."""
        q, k, v = self._qkv(x)
        k_cache.index_copy_(2, pos, k)
        v_cache.index_copy_(2, pos, v)
        a = F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=visible)
        return self._after_self_attention(x, a, cross_k, cross_v)


class Whisper(nn.Module):
    def __init__(self, dims: Dims) -> None:
        super().__init__()
        self.dims = dims
        d = dims.d_model
        self.conv1 = nn.Conv1d(dims.n_mels, d, 3, padding=1)
        self.conv2 = nn.Conv1d(d, d, 3, stride=2, padding=1)
        self.register_buffer("enc_pos", torch.zeros(dims.n_audio_ctx, d))
        self.enc_blocks = nn.ModuleList(EncoderBlock(d, dims.n_heads) for _ in range(dims.n_enc_layers))
        self.enc_ln = _ln(d)
        self.tok_emb = nn.Embedding(dims.n_vocab, d)
        self.register_buffer("dec_pos", torch.zeros(dims.n_text_ctx, d))
        self.dec_blocks = nn.ModuleList(DecoderBlock(d, dims.n_heads) for _ in range(dims.n_dec_layers))
        self.dec_ln = _ln(d)

    # ------------------------------------------------------------------ encoder
    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        """[B, n_mels, 3000] -> [B, 1500, d]."""
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        x = x + self.enc_pos
        for blk in self.enc_blocks:
            x = blk(x)
        return self.enc_ln(x)

    def cross_kv(self, enc: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ks, vs = [], []
        for blk in self.dec_blocks:
            k, v = _heads(blk.cross_kv(enc), 2, self.dims.n_heads)
            ks.append(k.contiguous())
            vs.append(v.contiguous())
        return ks, vs

    # ------------------------------------------------------------------ decoder
    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        d, h = self.dims.d_model, self.dims.n_heads
        return torch.zeros(2, self.dims.n_dec_layers, batch, h, max_len, d // h, dtype=dtype, device=device)

    def decode(
        self,
        tokens: torch.Tensor,
        offset: int,
        cache: torch.Tensor,
        cross: tuple[list[torch.Tensor], list[torch.Tensor]],
    ) -> torch.Tensor:
        """tokens [B, S] at positions offset..offset+S-1 -> logits [B, S, vocab] (fp32).

        `cross` may hold B/g rows: then each g consecutive token rows share one cross row."""
        s = tokens.shape[1]
        x = self.tok_emb(tokens) + self.dec_pos[offset : offset + s]
        for i, blk in enumerate(self.dec_blocks):
            x = blk(x, offset, cache[0, i], cache[1, i], cross[0][i], cross[1][i])
        x = self.dec_ln(x)
        return (x @ self.tok_emb.weight.T).float()

    def decode_step_static(
        self,
        tokens: torch.Tensor,
        pos: torch.Tensor,
        cache: torch.Tensor,
        cross: tuple[list[torch.Tensor], list[torch.Tensor]],
    ) -> torch.Tensor:
        """tokens [B, 1] at position pos (LongTensor [1] on the device) -> logits [B, vocab].

        Same result as `decode(tokens, int(pos), ...)` but with static shapes and no host
        sync: the form a CUDA graph can capture once and replay at every step.
        """
        max_len = cache.shape[-2]
        visible = (torch.arange(max_len, device=tokens.device) <= pos)[None, :]
        x = self.tok_emb(tokens) + self.dec_pos.index_select(0, pos)
        for i, blk in enumerate(self.dec_blocks):
            x = blk.step_static(x, pos, visible, cache[0, i], cache[1, i], cross[0][i], cross[1][i])
        x = self.dec_ln(x)
        return (x[:, -1] @ self.tok_emb.weight.T).float()


# ---------------------------------------------------------------------- CT2 weights
def _scalar(t: dict[str, torch.Tensor], name: str, default: int) -> int:
    return int(t[name].item()) if name in t else default


def build_from_ct2(tensors: dict[str, torch.Tensor]) -> Whisper:
    """Map CTranslate2 WhisperSpec variable names onto the torch modules."""
    try:
        emb = tensors["decoder/embeddings/weight"]
        enc_pos = tensors["encoder/position_encodings/encodings"]
        dec_pos = tensors["decoder/position_encodings/encodings"]
        conv1 = tensors["encoder/conv1/weight"]
    except KeyError as e:
        raise RunnerError(f"not a CTranslate2 Whisper model: missing {e}") from None
    def count_layers(side: str) -> int:
        return len({k.split("/")[1] for k in tensors if re.match(rf"{side}/layer_\d+/", k)})

    n_enc, n_dec = count_layers("encoder"), count_layers("decoder")
    dims = Dims(
        n_mels=conv1.shape[1],
        n_audio_ctx=enc_pos.shape[0],
        n_text_ctx=dec_pos.shape[0],
        n_vocab=emb.shape[0],
        d_model=emb.shape[1],
        n_heads=_scalar(tensors, "encoder/num_heads", emb.shape[1] // 64),
        n_enc_layers=n_enc,
        n_dec_layers=n_dec,
    )
    model = Whisper(dims)
    sd: dict[str, torch.Tensor] = {
        "conv1.weight": conv1,
        "conv1.bias": tensors["encoder/conv1/bias"],
        "conv2.weight": tensors["encoder/conv2/weight"],
        "conv2.bias": tensors["encoder/conv2/bias"],
        "enc_pos": enc_pos,
        "enc_ln.weight": tensors["encoder/layer_norm/gamma"],
        "enc_ln.bias": tensors["encoder/layer_norm/beta"],
        "tok_emb.weight": emb,
        "dec_pos": dec_pos,
        "dec_ln.weight": tensors["decoder/layer_norm/gamma"],
        "dec_ln.bias": tensors["decoder/layer_norm/beta"],
    }

    def lin(dst: str, src: str) -> None:
        sd[f"{dst}.weight"] = tensors[f"{src}/weight"]
        sd[f"{dst}.bias"] = tensors[f"{src}/bias"]

    def ln(dst: str, src: str) -> None:
        sd[f"{dst}.weight"] = tensors[f"{src}/gamma"]
        sd[f"{dst}.bias"] = tensors[f"{src}/beta"]

    for i in range(n_enc):
        p, s = f"enc_blocks.{i}", f"encoder/layer_{i}"
        ln(f"{p}.attn_ln", f"{s}/self_attention/layer_norm")
        lin(f"{p}.qkv", f"{s}/self_attention/linear_0")
        lin(f"{p}.out", f"{s}/self_attention/linear_1")
        ln(f"{p}.mlp_ln", f"{s}/ffn/layer_norm")
        lin(f"{p}.fc1", f"{s}/ffn/linear_0")
        lin(f"{p}.fc2", f"{s}/ffn/linear_1")
    for i in range(n_dec):
        p, s = f"dec_blocks.{i}", f"decoder/layer_{i}"
        ln(f"{p}.self_ln", f"{s}/self_attention/layer_norm")
        lin(f"{p}.self_qkv", f"{s}/self_attention/linear_0")
        lin(f"{p}.self_out", f"{s}/self_attention/linear_1")
        ln(f"{p}.cross_ln", f"{s}/attention/layer_norm")
        lin(f"{p}.cross_q", f"{s}/attention/linear_0")
        lin(f"{p}.cross_kv", f"{s}/attention/linear_1")
        lin(f"{p}.cross_out", f"{s}/attention/linear_2")
        ln(f"{p}.mlp_ln", f"{s}/ffn/layer_norm")
        lin(f"{p}.fc1", f"{s}/ffn/linear_0")
        lin(f"{p}.fc2", f"{s}/ffn/linear_1")
    try:
        model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    except RuntimeError as e:
        raise RunnerError(f"CTranslate2 Whisper weights do not fit the model: {e}") from None
    return model
