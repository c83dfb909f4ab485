"""Qwen3-ASR in plain torch: the audio encoder and the Qwen3 language model that writes the text.

Module and parameter names follow the published checkpoints (`thinker.audio_tower.*`,
`thinker.model.*`, `thinker.lm_head.*`), so a safetensors state dict loads as is. The maths is
the reference's (`qwen_asr.core.transformers_backend.modeling_qwen3_asr`); what differs is how
work is laid out for serving:

- The encoder runs every item of a batch at once. The reference encodes one item at a time,
  cutting its mel frames into chunks of `2 * n_window` frames (each convolved on its own, the
  last one zero-padded to the item's longest chunk) and letting tokens attend within windows of
  `n_window_infer` frames. Here all chunks of all items go through the convolutions together,
  grouped by the length the reference pads them to, and all attention windows of all items form
  one padded batch: the same numbers, one call per layer.
- The language model decodes from a static KV cache: one row per decoding item, rows of
  different prompt lengths side by side (each row has its own position), a finished item's row
  refilled by the next waiting item's prompt.

Multimodal RoPE: the reference gives every prompt and audio token the same position in its three
rotary sections (positions come from the attention mask alone), and with equal sections the
interleaved rotary embedding is the plain one; so the plain rotary embedding is used here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AudioDims:
    num_mel_bins: int
    d_model: int
    layers: int
    heads: int
    ffn_dim: int
    downsample_hidden_size: int
    output_dim: int
    n_window: int
    n_window_infer: int
    max_source_positions: int

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> "AudioDims":
        return cls(
            num_mel_bins=int(c.get("num_mel_bins", 128)), d_model=int(c["d_model"]),
            layers=int(c.get("encoder_layers", c.get("num_hidden_layers", 0))),
            heads=int(c["encoder_attention_heads"]), ffn_dim=int(c["encoder_ffn_dim"]),
            downsample_hidden_size=int(c.get("downsample_hidden_size", 480)), output_dim=int(c["output_dim"]),
            n_window=int(c.get("n_window", 50)), n_window_infer=int(c.get("n_window_infer", 800)),
            max_source_positions=int(c.get("max_source_positions", 1500)),
        )


@dataclass(frozen=True)
class TextDims:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, c: dict[str, Any]) -> "TextDims":
        heads = int(c["num_attention_heads"])
        return cls(
            vocab_size=int(c["vocab_size"]), hidden_size=int(c["hidden_size"]),
            intermediate_size=int(c["intermediate_size"]), layers=int(c["num_hidden_layers"]), heads=heads,
            kv_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=int(c.get("head_dim") or int(c["hidden_size"]) // heads),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)), rope_theta=float(c.get("rope_theta", 1e6)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
        )


def conv_out_len(n: int) -> int:
    """Frames left of `n` mel frames after the three stride-2 convolutions."""
    for _ in range(3):
        n = (n - 1) // 2 + 1
    return n


# ---------------------------------------------------------------------------------- encoder

class _AudioAttention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """x: [W, T, d] (one row per attention window); mask: [W, 1, 1, T] True = key present."""
        w, t, d = x.shape
        q = self.q_proj(x).view(w, t, self.heads, -1).transpose(1, 2)
        k = self.k_proj(x).view(w, t, self.heads, -1).transpose(1, 2)
        v = self.v_proj(x).view(w, t, self.heads, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(w, t, d))


class _AudioLayer(nn.Module):
    def __init__(self, dims: AudioDims) -> None:
        super().__init__()
        d = dims.d_model
        self.self_attn = _AudioAttention(d, dims.heads)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, dims.ffn_dim)
        self.fc2 = nn.Linear(dims.ffn_dim, d)
        self.final_layer_norm = nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), mask)
        x = x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))
        if x.dtype == torch.float16:  # as the reference: keep fp16 activations finite
            big = torch.finfo(x.dtype).max - 1000
            x = x.clamp(-big, big)
        return x


def _sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    inc = np.log(max_timescale) / (channels // 2 - 1)
    inv = torch.exp(-inc * torch.arange(channels // 2).float())
    t = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)


class AudioEncoder(nn.Module):
    def __init__(self, dims: AudioDims) -> None:
        super().__init__()
        self.dims = dims
        ch = dims.downsample_hidden_size
        self.conv2d1 = nn.Conv2d(1, ch, 3, 2, padding=1)
        self.conv2d2 = nn.Conv2d(ch, ch, 3, 2, padding=1)
        self.conv2d3 = nn.Conv2d(ch, ch, 3, 2, padding=1)
        freq = (((dims.num_mel_bins + 1) // 2 + 1) // 2 + 1) // 2
        self.conv_out = nn.Linear(ch * freq, dims.d_model, bias=False)
        self.layers = nn.ModuleList([_AudioLayer(dims) for _ in range(dims.layers)])
        self.ln_post = nn.LayerNorm(dims.d_model)
        self.proj1 = nn.Linear(dims.d_model, dims.d_model)
        self.proj2 = nn.Linear(dims.d_model, dims.output_dim)
        self.register_buffer("positional_embedding", _sinusoids(dims.max_source_positions, dims.d_model), persistent=False)

    def forward(self, mels: Sequence[torch.Tensor], windowed: bool = True) -> list[torch.Tensor]:
        """mels: one [n_mels, L_i] log-mel per item -> one [tokens_i, output_dim] per item.
        `windowed`: attention within windows of `n_window_infer` frames (see EncoderPlan)."""
        plan = EncoderPlan(self.dims, [int(m.shape[1]) for m in mels], windowed)
        dtype = self.conv_out.weight.dtype
        # 1. Convolutions, per group of chunks the reference pads to the same length.
        chunk_tokens: list[torch.Tensor | None] = [None] * len(plan.chunks)
        for pad_len, idx in plan.groups.items():
            x = torch.zeros(len(idx), 1, self.dims.num_mel_bins, pad_len, dtype=dtype, device=mels[0].device)
            for row, c in enumerate(idx):
                item, start, length = plan.chunks[c]
                x[row, 0, :, :length] = mels[item][:, start:start + length]
            x = F.gelu(self.conv2d1(x))
            x = F.gelu(self.conv2d2(x))
            x = F.gelu(self.conv2d3(x))
            b, c_, f, t = x.shape
            x = self.conv_out(x.permute(0, 3, 1, 2).reshape(b, t, c_ * f))
            x = x + self.positional_embedding[:t].to(x.dtype)
            for row, c in enumerate(idx):
                chunk_tokens[c] = x[row, : plan.chunk_out[c]]
        per_item: list[list[torch.Tensor]] = [[] for _ in mels]
        for c, (item, _, _) in enumerate(plan.chunks):
            t_ = chunk_tokens[c]
            assert t_ is not None
            per_item[item].append(t_)
        tokens = [torch.cat(parts, 0) for parts in per_item]
        # 2. Transformer layers over attention windows, all windows of all items in one batch.
        wmax = max(n for _, _, n in plan.windows)
        h = torch.zeros(len(plan.windows), wmax, self.dims.d_model, dtype=dtype, device=tokens[0].device)
        mask = torch.zeros(len(plan.windows), 1, 1, wmax, dtype=torch.bool, device=h.device)
        for w, (item, start, n) in enumerate(plan.windows):
            h[w, :n] = tokens[item][start:start + n]
            mask[w, ..., :n] = True
        attn_mask = None if bool(mask.all()) else mask
        for layer in self.layers:
            h = layer(h, attn_mask)
        h = self.proj2(F.gelu(self.proj1(self.ln_post(h))))
        out: list[list[torch.Tensor]] = [[] for _ in mels]
        for w, (item, _, n) in enumerate(plan.windows):
            out[item].append(h[w, :n])
        return [torch.cat(parts, 0) for parts in out]


class EncoderPlan:
    """How the reference cuts each item: chunks for the convolutions, windows for attention.

    Windows: the reference computes them (`cu_seqlens`), and its vLLM backend and its
    transformers backend with flash-attention 2 attend within them; its transformers backend
    with sdpa or eager attention passes no mask, so there every token of an item attends to the
    whole item. `windowed=False` is that behaviour (one window per item); the two agree for
    items up to one window (8 s in the published models)."""

    def __init__(self, dims: AudioDims, frames: Sequence[int], windowed: bool = True) -> None:
        chunk = dims.n_window * 2
        self.chunks: list[tuple[int, int, int]] = []  # (item, first frame, frames)
        self.chunk_out: list[int] = []
        self.groups: dict[int, list[int]] = {}  # padded length -> chunk indices
        self.windows: list[tuple[int, int, int]] = []  # (item, first token, tokens)
        self.tokens: list[int] = []
        for item, n in enumerate(frames):
            if n <= 0:
                raise ValueError("an item needs at least one mel frame")
            # The reference pads an item's chunks to its longest one: a full chunk when it has one.
            pad_len = min(n, chunk)
            total = 0
            for start in range(0, n, chunk):
                length = min(chunk, n - start)
                self.groups.setdefault(pad_len, []).append(len(self.chunks))
                self.chunks.append((item, start, length))
                out = conv_out_len(length)
                self.chunk_out.append(out)
                total += out
            self.tokens.append(total)
            window = conv_out_len(pad_len) * (dims.n_window_infer // chunk) if windowed else total
            for start in range(0, total, window):
                self.windows.append((item, start, min(window, total - start)))


def audio_tokens(frames: int, dims: AudioDims) -> int:
    """Audio tokens (prompt placeholders) an item of `frames` mel frames becomes."""
    return EncoderPlan(dims, [frames]).tokens[0]


# ---------------------------------------------------------------------------------- text model

class RMSNorm(nn.Module):
    def __init__(self, n: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class _TextAttention(nn.Module):
    def __init__(self, d: TextDims) -> None:
        super().__init__()
        self.d = d
        self.q_proj = nn.Linear(d.hidden_size, d.heads * d.head_dim, bias=False)
        self.k_proj = nn.Linear(d.hidden_size, d.kv_heads * d.head_dim, bias=False)
        self.v_proj = nn.Linear(d.hidden_size, d.kv_heads * d.head_dim, bias=False)
        self.o_proj = nn.Linear(d.heads * d.head_dim, d.hidden_size, bias=False)
        self.q_norm = RMSNorm(d.head_dim, d.rms_norm_eps)
        self.k_norm = RMSNorm(d.head_dim, d.rms_norm_eps)

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: [B, T, hidden] -> q [B, H, T, hd], k and v [B, KV, T, hd], rotary applied."""
        b, t, _ = x.shape
        hd = self.d.head_dim
        q = self.q_norm(self.q_proj(x).view(b, t, -1, hd)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, t, -1, hd)).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, hd).transpose(1, 2)
        cos, sin = cos[:, None], sin[:, None]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return q, k, v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Grouped-query attention; mask [B, 1, Tq, Tk] True = may attend. SDPA's own GQA reads
        each key/value head for its query heads: no repeated copy of the cache per step."""
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.d.heads != self.d.kv_heads)
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class _TextMLP(nn.Module):
    def __init__(self, d: TextDims) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d.hidden_size, d.intermediate_size, bias=False)
        self.up_proj = nn.Linear(d.hidden_size, d.intermediate_size, bias=False)
        self.down_proj = nn.Linear(d.intermediate_size, d.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _TextLayer(nn.Module):
    def __init__(self, d: TextDims) -> None:
        super().__init__()
        self.self_attn = _TextAttention(d)
        self.mlp = _TextMLP(d)
        self.input_layernorm = RMSNorm(d.hidden_size, d.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(d.hidden_size, d.rms_norm_eps)


class TextModel(nn.Module):
    def __init__(self, d: TextDims) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(d.vocab_size, d.hidden_size)
        self.layers = nn.ModuleList([_TextLayer(d) for _ in range(d.layers)])
        self.norm = RMSNorm(d.hidden_size, d.rms_norm_eps)


class KVCache:
    """Static keys and values: [layers, 2, rows, kv_heads, max_len, head_dim] in one tensor, so
    its size is known before it is allocated (the memory budget) and a graph can capture steps
    over it."""

    def __init__(self, d: TextDims, rows: int, max_len: int, dtype: torch.dtype, device: torch.device) -> None:
        self.kv = torch.zeros(d.layers, 2, rows, d.kv_heads, max_len, d.head_dim, dtype=dtype, device=device)
        self.rows, self.max_len = rows, max_len

    @staticmethod
    def bytes_per_row(d: TextDims, max_len: int, dtype: torch.dtype) -> int:
        return d.layers * 2 * d.kv_heads * max_len * d.head_dim * torch.empty((), dtype=dtype).element_size()


class Qwen3ASR(nn.Module):
    """The thinker: audio tower + text model + head (names as in the checkpoints, minus `thinker.`)."""

    def __init__(self, audio: AudioDims, text: TextDims) -> None:
        super().__init__()
        self.audio_dims, self.text_dims = audio, text
        self.audio_tower = AudioEncoder(audio)
        self.model = TextModel(text)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        hd = text.head_dim
        inv = 1.0 / (text.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
        self.register_buffer("inv_freq", inv, persistent=False)

    def tie_weights(self) -> None:
        self.lm_head.weight = self.model.embed_tokens.weight

    def _rotary(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, T, head_dim] (computed in float32, as the reference)."""
        freqs = positions[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def prefill(self, embeds: torch.Tensor, lengths: torch.Tensor, cache: KVCache, rows: torch.Tensor) -> torch.Tensor:
        """Run prompts (right-padded embeds [n, T, hidden], true `lengths` [n]) and store their keys
        and values in cache `rows` [n] at positions 0..T-1 (past a prompt's end, padding that its
        decode steps overwrite or mask). Returns the logits of each prompt's last token [n, vocab]."""
        n, t, _ = embeds.shape
        dev = embeds.device
        pos = torch.arange(t, device=dev)[None].expand(n, t)
        cos, sin = self._rotary(pos, embeds.dtype)
        causal = torch.ones(t, t, dtype=torch.bool, device=dev).tril()
        mask = causal[None, None] & (pos < lengths[:, None])[:, None, None, :]
        # A padded query row attends to nothing otherwise (NaN); let it see itself.
        mask = mask | torch.eye(t, dtype=torch.bool, device=dev)[None, None]
        h = embeds
        for i, layer in enumerate(self.model.layers):
            x = layer.input_layernorm(h)
            q, k, v = layer.self_attn.qkv(x, cos, sin)
            cache.kv[i, 0, rows, :, :t] = k
            cache.kv[i, 1, rows, :, :t] = v
            h = h + layer.self_attn.attend(q, k, v, mask)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        last = h[torch.arange(n, device=dev), lengths - 1]
        return self.lm_head(self.model.norm(last))

    def step(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One decode step over every cache row: tokens [rows] at positions [rows] -> logits
        [rows, vocab]. Static shapes (graph-capturable): rows that are idle compute too and
        are ignored by the caller."""
        rows = cache.rows
        dev = tokens.device
        h = self.model.embed_tokens(tokens)[:, None]
        cos, sin = self._rotary(positions[:, None], h.dtype)
        keys = torch.arange(cache.max_len, device=dev)
        mask = (keys[None] <= positions[:, None])[:, None, None, :]
        r = torch.arange(rows, device=dev)
        for i, layer in enumerate(self.model.layers):
            x = layer.input_layernorm(h)
            q, k, v = layer.self_attn.qkv(x, cos, sin)
            cache.kv[i, 0, r, :, positions] = k[:, :, 0]
            cache.kv[i, 1, r, :, positions] = v[:, :, 0]
            h = h + layer.self_attn.attend(q, cache.kv[i, 0], cache.kv[i, 1], mask)
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.lm_head(self.model.norm(h[:, 0]))

    def embed_prompts(self, prompts: Sequence[Sequence[int]], audio: Sequence[torch.Tensor], audio_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Token prompts with `audio_token_id` placeholders -> right-padded embeds [n, T, hidden]
        with each item's audio features in its placeholders, and lengths [n]."""
        dev = self.lm_head.weight.device
        n, t = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(n, t, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p, dtype=torch.long)
        ids = ids.to(dev)
        emb = self.model.embed_tokens(ids)
        for i, a in enumerate(audio):
            where = (ids[i] == audio_token_id).nonzero()[:, 0]
            if where.numel() != a.shape[0]:
                raise ValueError(f"prompt has {where.numel()} audio placeholders for {a.shape[0]} audio tokens")
            emb[i, where] = a.to(emb.dtype)
        return emb, torch.tensor([len(p) for p in prompts], dtype=torch.long, device=dev)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers (a tied head counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


__all__ = ["AudioDims", "TextDims", "Qwen3ASR", "KVCache", "audio_tokens", "conv_out_len", "weight_bytes"]
