"""SenseVoiceSmall's encoder + CTC head as one graph-capturable forward with per-row queries.

funasr's `SenseVoiceSmall.inference` takes one language for the whole batch and, inside
its forward, builds tensors from Python lists, copies a CPU `arange` to the device and
calls `.item()` per row; none of that can be captured as a CUDA graph. This module reuses
funasr's own submodules (query embedding, SANM encoder layers, CTC projection) but
precomputes the positional encoding and index buffers, takes the language and
text-normalisation query ids as per-row tensors, and returns frame-wise argmax ids, so a
forward has fixed shapes and no host<->device synchronisation.
"""

from __future__ import annotations


import torch
from torch import nn

# SenseVoice prepends four query frames: language, event, emotion, text normalisation.
NUM_QUERY_FRAMES = 4
# Embedding rows of the event and emotion queries (funasr: `self.embed(LongTensor([[1, 2]]))`).
_EVENT_EMO_IDS = (1, 2)


def sinusoidal_encoding(num_positions: int, depth: int) -> torch.Tensor:
    """funasr's SinusoidalPositionEncoder for positions 1..num_positions, [P, depth] float32.

    Same float32 operations in the same order as funasr, so the table is bit-identical on CPU.
    """
    positions = torch.arange(1, num_positions + 1, dtype=torch.float32)
    log_increment = torch.log(torch.tensor([10000], dtype=torch.float32)) / (depth / 2 - 1)
    inv_timescales = torch.exp(torch.arange(depth / 2).float() * (-log_increment))
    scaled = positions[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)


class SenseVoiceCore(nn.Module):
    """feats [B, T, 560], feat_lens [B], lang_ids [B], textnorm_ids [B]
    -> (token ids [B, T + 4] = argmax of the CTC logits per frame, out_lens [B] = feat_lens + 4,
        finite [B] = every logit of the row's valid frames is finite).

    `model` is a built funasr `SenseVoiceSmall`; its modules are shared, not copied, and every
    buffer of this module is made on their device. `max_frames` sizes the precomputed buffers;
    longer inputs grow them (eager only).
    """

    def __init__(self, model: nn.Module, max_frames: int = 3000) -> None:
        super().__init__()
        self.embed = model.embed
        self.encoder = model.encoder
        self.ctc_lo = model.ctc.ctc_lo
        self.input_size = self.embed.embedding_dim
        self.scale = float(self.encoder.output_size()) ** 0.5
        self.register_buffer(
            "event_emo_ids", torch.tensor(_EVENT_EMO_IDS, dtype=torch.long, device=self.embed.weight.device), persistent=False
        )
        self._set_tables(max_frames + NUM_QUERY_FRAMES)

    def _set_tables(self, num_positions: int) -> None:
        device = self.embed.weight.device
        dtype = self.embed.weight.dtype
        self.register_buffer(
            "pos_enc", sinusoidal_encoding(num_positions, self.input_size).to(device, dtype), persistent=False
        )
        self.register_buffer("positions", torch.arange(num_positions, device=device), persistent=False)

    def forward(
        self,
        feats: torch.Tensor,
        feat_lens: torch.Tensor,
        lang_ids: torch.Tensor,
        textnorm_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits, out_lens, valid = self.logits(feats, feat_lens, lang_ids, textnorm_ids)
        # A row whose scores overflowed (float16) has no meaningful argmax: flag it, without a sync.
        finite = (torch.isfinite(logits).all(dim=-1) | ~valid).all(dim=-1)
        # argmax of the logits equals argmax of funasr's log_softmax (a monotone shift per frame).
        return logits.argmax(dim=-1), out_lens, finite

    def logits(
        self,
        feats: torch.Tensor,
        feat_lens: torch.Tensor,
        lang_ids: torch.Tensor,
        textnorm_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CTC logits [B, T + 4, vocab], out_lens [B], and the valid-frame mask [B, T + 4]."""
        batch, frames, _ = feats.shape
        total = frames + NUM_QUERY_FRAMES
        if total > self.pos_enc.shape[0]:  # a Python shape check: no device sync
            self._set_tables(2 * total)

        language = self.embed(lang_ids).unsqueeze(1)
        textnorm = self.embed(textnorm_ids).unsqueeze(1)
        event_emo = self.embed(self.event_emo_ids).unsqueeze(0).expand(batch, -1, -1)
        x = torch.cat([language, event_emo, textnorm, feats.to(language.dtype)], dim=1)
        out_lens = feat_lens + NUM_QUERY_FRAMES

        # funasr's mask is float [B, 1, T]: 1 on valid frames, 0 on padding.
        valid = self.positions[:total].unsqueeze(0) < out_lens.unsqueeze(1)
        mask = valid.to(x.dtype).unsqueeze(1)
        x = x * self.scale + self.pos_enc[:total]

        encoder = self.encoder
        for layer in encoder.encoders0:
            x = layer(x, mask)[0]
        for layer in encoder.encoders:
            x = layer(x, mask)[0]
        x = encoder.after_norm(x)
        for layer in encoder.tp_encoders:
            x = layer(x, mask)[0]
        x = encoder.tp_norm(x)

        return self.ctc_lo(x), out_lens, valid
