"""Paraformer's encoder, CIF predictor and decoder as fixed-shape batched forwards.

funasr's `Paraformer.inference` batches the model, but its forward reads the device in the
middle (`torch.max(token_num).item()` in the predictor, boolean-mask indexing in `cif_v1`,
`lengths.max()` and CPU `arange`s in every mask, a positional table built from host tensors
per call), so its shapes follow the data. This module reuses funasr's own submodules (SANM
encoder layers, CifPredictorV2's convolution and tail rule, SANM decoder layers) with:

- masks built from one precomputed position buffer, the positional table precomputed;
- continuous integrate-and-fire written over fixed shapes: the k-th fired token of a row is
  gathered from cumulative sums at the k-th firing frame, with the same float operations in
  the same order as funasr's `cif_v1`, so the acoustic embeddings are bit-identical;
- the decoder run over a given number of token slots (`max_tokens`), rows with fewer tokens
  masked, so one forward has fixed shapes for a given (batch, frames, max_tokens).

The eager runner takes `max_tokens` from the predictor's token counts (one host read between
the two halves); `forward`, the captured path, decodes the most tokens a row can have instead
(its frame count + 1: every CIF weight is below 1 and the tail adds 0.45), so its shapes follow
only the input's and it reads nothing back.
"""

from __future__ import annotations

import torch
from torch import nn

from server.runners.sensevoice.core import sinusoidal_encoding


class ParaformerCore(nn.Module):
    """`encode` (feats [B, T, 560], feat_lens [B]) -> encoder output, CIF weights and fires;
    `decode` (those, max_tokens) -> per-slot token ids. `model` is a built funasr `Paraformer`
    whose modules are shared, not copied."""

    def __init__(self, model: nn.Module, max_frames: int = 3000) -> None:
        super().__init__()
        self.encoder = model.encoder
        self.predictor = model.predictor
        self.decoder = model.decoder
        self.scale = float(self.encoder.output_size()) ** 0.5
        self.threshold = float(self.predictor.threshold)
        self.tail_threshold = float(self.predictor.tail_threshold)
        self._feat_dim = int(self.encoder.encoders0[0].in_size)
        """The encoder's input width (560 = 80 mels x LFR 7): what the positional table adds to."""
        self._set_tables(max_frames + 1)

    def _set_tables(self, num_positions: int) -> None:
        weight = next(self.encoder.parameters())
        self.register_buffer(
            "pos_enc", sinusoidal_encoding(num_positions, self._feat_dim).to(weight.device, weight.dtype), persistent=False
        )
        self.register_buffer("positions", torch.arange(num_positions, device=weight.device), persistent=False)

    def forward(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The whole model with shapes fixed by the input's: (token ids [B, T + 1], token counts
        [B], finite [B], CIF weights [B, T + 1], fires [B, T + 1]). The decoder runs over T + 1
        token slots, the most a row can fire (each CIF weight is below 1, the tail adds 0.45),
        so nothing depends on the data's token counts: one CUDA graph per (batch, frames)
        bucket, no host read. It costs decoder work on slots a row does not use (speech fires
        about one token per four frames); the eager path decodes only the batch's largest count."""
        enc, hidden_tail, alphas, fires, fired, token_num, finite = self.encode(feats, feat_lens)
        ids, dec_finite = self.decode(enc, feat_lens, hidden_tail, alphas, fires, fired, token_num, feats.shape[1] + 1)
        return ids, token_num, finite & dec_finite, alphas, fires

    def encode(self, feats: torch.Tensor, feat_lens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """-> (encoder output [B, T, D], CIF weights after the tail rule [B, T + 1],
        fires [B, T + 1] (funasr's `cif_peak`: the integrator after each frame, +1 where a token
        fires), token counts [B] (long), finite [B])."""
        _, frames, _ = feats.shape
        if frames + 1 > self.pos_enc.shape[0]:  # a Python shape check: no device sync
            self._set_tables(2 * (frames + 1))
        valid = self.positions[:frames].unsqueeze(0) < feat_lens.unsqueeze(1)  # [B, T]
        mask = valid.unsqueeze(1)  # funasr's encoder mask: bool [B, 1, T]
        x = feats.to(self.pos_enc.dtype) * self.scale + self.pos_enc[:frames]
        for layer in self.encoder.encoders0:
            x = layer(x, mask)[0]
        for layer in self.encoder.encoders:
            x = layer(x, mask)[0]
        if self.encoder.normalize_before:
            x = self.encoder.after_norm(x)
        finite = (torch.isfinite(x).all(dim=-1) | ~valid).all(dim=-1)
        # funasr leaves the encoder's output on padding frames as it comes out; its predictor's
        # convolution then reads the frame after a row's last one, and its tail weight lands on
        # that frame, so a row's tokens change with what it is batched with. Zeroed, padding
        # is what funasr's one-at-a-time path sees past the end (the convolution's zero padding,
        # the tail's zero frame): every row gets its unbatched result (x * 1 is exact).
        x = x * valid.unsqueeze(-1).to(x.dtype)
        alphas, hidden_tail, token_num = self._alphas(x, valid)
        fires, fired = _fires(alphas)
        return x, hidden_tail, alphas, fires, fired, token_num, finite

    def _alphas(self, hidden: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """CifPredictorV2.forward up to the integration (inference: no targets)."""
        p = self.predictor
        output = torch.relu(p.cif_conv1d(p.pad(hidden.transpose(1, 2)))).transpose(1, 2)
        alphas = torch.sigmoid(p.cif_output(output))
        alphas = torch.nn.functional.relu(alphas * p.smooth_factor - p.noise_threshold)
        mask = valid.unsqueeze(-1).float()  # funasr: mask.transpose(-1, -2).float(): [B, T, 1]
        alphas = (alphas * mask).squeeze(-1)
        mask = mask.squeeze(-1)
        token_num = alphas.sum(-1)
        if self.tail_threshold > 0.0:
            hidden, alphas, token_num = self._tail(hidden, alphas, mask if p.tail_mask else None)
        return alphas, hidden, token_num.long()

    def _tail(self, hidden: torch.Tensor, alphas: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """CifPredictorV2.tail_process_fn (the same operations in the same order) with every
        tensor made on the device: funasr's builds its zero frame on the host and copies it,
        which a CUDA graph cannot capture. Adds `tail_threshold` of weight on the frame after a
        row's last one (a zero frame), so a final partial token still fires."""
        b, _, d = hidden.shape
        zeros_t = torch.zeros((b, 1), dtype=torch.float32, device=alphas.device)
        if mask is not None:
            ones_t = torch.ones_like(zeros_t)
            edge = torch.cat([ones_t, mask], dim=1) - torch.cat([mask, zeros_t], dim=1)
            alphas = torch.add(torch.cat([alphas, zeros_t], dim=1), edge * self.tail_threshold)
        else:
            alphas = torch.cat([alphas, torch.full_like(zeros_t, self.tail_threshold).to(alphas.dtype)], dim=1)
        hidden = torch.cat([hidden, hidden.new_zeros((b, 1, d))], dim=1)
        return hidden, alphas, torch.floor(alphas.sum(dim=-1))

    def decode(
        self,
        enc: torch.Tensor,
        feat_lens: torch.Tensor,
        hidden_tail: torch.Tensor,
        alphas: torch.Tensor,
        fires: torch.Tensor,
        fired: torch.Tensor,
        token_num: torch.Tensor,
        max_tokens: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (argmax token ids [B, max_tokens], finite [B]); slots past a row's count are padding."""
        embeds = _cif_embeddings(hidden_tail, alphas, fires, fired, max_tokens)
        batch, frames, _ = enc.shape
        tgt_valid = self.positions[:max_tokens].unsqueeze(0) < token_num.unsqueeze(1)
        tgt_mask = tgt_valid.to(torch.float32).unsqueeze(-1)  # funasr: sequence_mask(...)[:, :, None]
        memory_mask = (self.positions[:frames].unsqueeze(0) < feat_lens.unsqueeze(1)).to(torch.float32).unsqueeze(1)
        d = self.decoder
        x = embeds.to(enc.dtype)
        x, tgt_mask, memory, memory_mask, _ = d.decoders(x, tgt_mask, enc, memory_mask)
        if d.decoders2 is not None:
            x, tgt_mask, memory, memory_mask, _ = d.decoders2(x, tgt_mask, memory, memory_mask)
        x, tgt_mask, memory, memory_mask, _ = d.decoders3(x, tgt_mask, memory, memory_mask)
        logits = d.output_layer(d.after_norm(x))
        finite = (torch.isfinite(logits).all(dim=-1) | ~tgt_valid).all(dim=-1)
        # argmax of the logits equals argmax of funasr's log_softmax (a monotone shift per slot).
        return logits.argmax(dim=-1), finite


def _fires(alphas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """funasr's `cif_wo_hidden_v1` without boolean indexing: (fires, fired) [B, T + 1]."""
    # funasr: the prefix sum in float64 ("cumsum precision degradation"), then float32.
    prefix_sum = torch.cumsum(alphas, dim=1, dtype=torch.float64).to(torch.float32)
    prefix_floor = torch.floor(prefix_sum)
    shifted_floor = torch.floor(torch.roll(prefix_sum, 1, dims=1))
    shifted_floor[:, 0] = 0
    fired = (prefix_floor - shifted_floor) > 0
    fires = torch.where(fired, 1.0, 0.0).to(alphas.dtype) + prefix_sum - prefix_floor
    return fires, fired


def _cif_embeddings(
    hidden: torch.Tensor, alphas: torch.Tensor, fires: torch.Tensor, fired: torch.Tensor, max_tokens: int
) -> torch.Tensor:
    """funasr's `cif_v1` frames over fixed shapes: [B, max_tokens, D], zero past a row's count.

    Token k of a row integrates the weighted hidden states between its (k-1)-th and k-th
    firing frames: prefix[p_k] - prefix[p_(k-1)] + rest[p_(k-1)] - rest[p_k], where rest is
    the part of a firing frame's weight carried into the next token. Evaluated in funasr's
    order with zeros for k = 0, so every value is bit-identical to its boolean-indexed one.
    """
    batch, frames, dim = hidden.shape
    prefix = torch.cumsum(alphas.unsqueeze(-1).repeat((1, 1, dim)) * hidden, dim=1)
    remains = fires - torch.floor(fires)
    rest = remains.unsqueeze(-1).repeat((1, 1, dim)) * hidden
    # Slot of every firing frame; the others (and fires past max_tokens) go to a dump slot.
    slot = torch.cumsum(fired.long(), dim=1) - 1
    slot = torch.where(fired, slot, max_tokens).clamp(max=max_tokens)
    frame_idx = torch.arange(frames, device=hidden.device).expand(batch, -1)
    where = torch.zeros(batch, max_tokens + 1, dtype=torch.long, device=hidden.device).scatter(1, slot, frame_idx)
    where = where[:, :max_tokens, None].expand(-1, -1, dim)
    cur = torch.gather(prefix, 1, where)
    cur_rest = torch.gather(rest, 1, where)
    zero = cur.new_zeros(batch, 1, dim)
    prev = torch.cat([zero, cur[:, :-1]], dim=1)
    prev_rest = torch.cat([zero, cur_rest[:, :-1]], dim=1)
    frames_out = cur - prev + prev_rest - cur_rest
    count = fired.sum(dim=1)
    valid = torch.arange(max_tokens, device=hidden.device).unsqueeze(0) < count.unsqueeze(1)
    return torch.where(valid.unsqueeze(-1), frames_out, torch.zeros_like(frames_out))
