"""Token searches over a batch of items, on the device: greedy, sampling and beam search.

A search owns the token history of n items x k rows (k = 1 for greedy, the beam width, or
best_of samples). The runner drives it: each step it gives the masked log-probabilities of
every row, the search picks the next token of every row (and, for beams, which earlier row
each new row continues), and says when every item is done. Nothing here reads the device
back, so a step is a few kernels queued behind the decoder's; the runner decides how often
to ask `all_done()` (each ask is one host sync on a GPU).

The semantics follow openai-whisper's decoders, which faster-whisper shares:
- greedy / sampling: each row runs until end-of-text; a row's score is the sum of its tokens'
  log-probabilities (end-of-text included), taken from the untempered distribution;
- beam search: each step, of the candidates (beam, token) ranked by summed log-probability,
  the best `beam_size` that do not end the text become the next beams, and those that end it
  and rank above the last beam kept join the item's ended hypotheses, until
  round(beam_size * patience) have ended; at the length limit the live beams fill up to
  beam_size hypotheses;
- ranking of an item's hypotheses: sum of log-probabilities divided by a length penalty
  (`rank`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class Candidate:
    """One finished hypothesis of an item."""

    tokens: list[int]
    """Text tokens, end-of-text excluded."""
    sum_logprob: float
    """Summed log-probability (the end-of-text token's included when the hypothesis ended)."""

    @property
    def avg_logprob(self) -> float:
        # openai-whisper's definition: the end-of-text token counts in the length.
        return self.sum_logprob / (len(self.tokens) + 1)


def rank(candidates: Sequence[Candidate], length_penalty: float | None) -> Candidate:
    """The best candidate by length-normalised log-probability (openai-whisper's
    MaximumLikelihoodRanker): None divides by the length, a number a by ((5 + length) / 6) ** a.
    Ties go to the earlier candidate."""
    def score(c: Candidate) -> float:
        n = len(c.tokens)
        penalty = n if length_penalty is None else ((5 + n) / 6) ** length_penalty
        return c.sum_logprob / max(penalty, 1e-9)

    best, best_score = candidates[0], score(candidates[0])
    for c in candidates[1:]:
        s = score(c)
        if s > best_score:
            best, best_score = c, s
    return best


def _to_host(*tensors: torch.Tensor) -> list[list]:
    """Several device tensors back as nested lists in ONE device->host copy (float32 holds
    token ids and counts exactly: all are below 2**24)."""
    flat = torch.cat([t.reshape(-1).float() for t in tensors]).cpu()
    out, at = [], 0
    for t in tensors:
        n = t.numel()
        out.append(flat[at : at + n].reshape(t.shape).tolist())
        at += n
    return out


def _ints(rows: list) -> list:
    return [_ints(r) if isinstance(r, list) else int(r) for r in rows]


def _cut(row: Sequence[int], eot: int) -> list[int]:
    row = list(row)
    return row[: row.index(eot)] if eot in row else row


class RowSearch:
    """k independent rows per item, each greedy (temperature 0) or sampled at a temperature;
    an item's result is its best row by `rank`."""

    def __init__(self, n: int, k: int, max_steps: int, eot: int, device: torch.device,
                 temperature: float = 0.0, generator: torch.Generator | None = None) -> None:
        self.n, self.k, self.eot = n, k, eot
        self.temperature = temperature
        self.generator = generator
        rows = n * k
        self.tokens = torch.full((rows, max_steps), eot, dtype=torch.long, device=device)
        self.sum_logprob = torch.zeros(rows, dtype=torch.float32, device=device)
        self.finished = torch.zeros(rows, dtype=torch.bool, device=device)
        self.finite = torch.ones(rows, dtype=torch.bool, device=device)
        self.t = 0

    def step(self, logits: torch.Tensor, suppress: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits [rows, vocab] and the mask of tokens forbidden at this step -> (next token
        per row, None: rows keep their place)."""
        self.finite &= torch.isfinite(logits).all(-1) | self.finished
        logits = logits.masked_fill(suppress, float("-inf"))
        logprobs = logits.log_softmax(-1)
        if self.temperature > 0:
            probs = (logits / self.temperature).softmax(-1)
            # A non-finite row (flagged above) must not make multinomial raise for the batch.
            probs = torch.where(torch.isfinite(probs).all(-1, keepdim=True), probs, torch.ones_like(probs))
            nxt = torch.multinomial(probs, 1, generator=self.generator)[:, 0]
        else:
            nxt = logits.argmax(-1)
        nxt = torch.where(self.finished, torch.full_like(nxt, self.eot), nxt)
        lp = logprobs.gather(1, nxt[:, None])[:, 0]
        self.sum_logprob += torch.where(self.finished, torch.zeros_like(lp), lp)
        self.finished |= nxt == self.eot
        self.tokens[:, self.t] = nxt
        self.t += 1
        return nxt, None

    def all_done(self) -> torch.Tensor:
        return self.finished.all()

    def item_finite(self) -> torch.Tensor:
        return self.finite.view(self.n, self.k).all(-1)

    def results(self, length_penalty: float | None) -> list[tuple[Candidate, bool]]:
        """Host side, after the search (one device->host copy): per item its best row and
        whether its scores stayed finite."""
        toks, lps, finite = _to_host(self.tokens[:, : self.t], self.sum_logprob, self.item_finite())
        toks = _ints(toks)
        out = []
        for i in range(self.n):
            rows = range(i * self.k, (i + 1) * self.k)
            out.append((rank([Candidate(_cut(toks[r], self.eot), lps[r]) for r in rows], length_penalty), bool(finite[i])))
        return out


class BeamSearch:
    """Beam search of `beam_size` rows per item, batched over items on the device."""

    def __init__(self, n: int, beam_size: int, max_steps: int, eot: int, device: torch.device,
                 patience: float = 1.0) -> None:
        k = beam_size
        self.n, self.k, self.eot, self.max_steps = n, k, eot, max_steps
        self.capacity = max(1, round(k * patience))
        """Ended hypotheses per item after which its search is over."""
        self.device = device
        self.tokens = torch.full((n, k, max_steps), eot, dtype=torch.long, device=device)
        # Only beam 0 is live at first: the k rows start from the same prompt, and openai's
        # decoder keeps one copy of identical candidates.
        self.sum_logprob = torch.full((n, k), float("-inf"), dtype=torch.float32, device=device)
        self.sum_logprob[:, 0] = 0.0
        c = self.capacity
        # Ended hypotheses; slot `capacity` of each item is scratch space for rejected writes,
        # so that every step writes with fixed shapes and no host sync.
        self.ended_tokens = torch.full((n * (c + 1), max_steps), eot, dtype=torch.long, device=device)
        self.ended_len = torch.zeros(n * (c + 1), dtype=torch.long, device=device)
        self.ended_logprob = torch.full((n * (c + 1),), float("-inf"), dtype=torch.float32, device=device)
        self.ended_count = torch.zeros(n, dtype=torch.long, device=device)
        self.finite = torch.ones(n, dtype=torch.bool, device=device)
        self._item_base = torch.arange(n, device=device)[:, None]
        self._beam_ids = torch.arange(k, device=device)[None, :]
        self.t = 0

    def step(self, logits: torch.Tensor, suppress: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [n*k, vocab] and the mask of tokens forbidden at this step -> (next token per
        row, source row of each new row: the caller reorders its cache with it before feeding
        the tokens)."""
        n, k, eot, t = self.n, self.k, self.eot, self.t
        vocab = logits.shape[-1]
        self.finite &= torch.isfinite(logits).view(n, k * vocab).all(-1)
        logits = logits.masked_fill(suppress, float("-inf"))
        scores = self.sum_logprob[:, :, None] + logits.log_softmax(-1).view(n, k, vocab)
        ended = scores[:, :, eot].clone()  # [n, k]
        scores[:, :, eot] = float("-inf")
        best, flat = scores.view(n, k * vocab).topk(k, dim=-1)  # best first
        src_beam, token = flat // vocab, flat % vocab
        # Hypotheses that end here and rank above the last beam kept join the ended ones,
        # best first, while the item has room (openai's rule).
        ends = ended > best[:, -1:]
        order = ended.masked_fill(~ends, float("-inf")).argsort(dim=-1, descending=True)
        ends_sorted = ends.gather(1, order)
        slot = self.ended_count[:, None] + ends_sorted.long().cumsum(-1) - 1  # >= capacity once over
        keep = ends_sorted & (slot < self.capacity)
        c1 = self.capacity + 1
        target = (self._item_base * c1 + torch.where(keep, slot, torch.full_like(slot, self.capacity))).view(-1)
        self.ended_tokens[target] = self.tokens.gather(1, order[:, :, None].expand(-1, -1, self.max_steps)).view(n * k, -1)
        self.ended_len[target] = t
        self.ended_logprob[target] = ended.gather(1, order).view(-1)
        count_before = self.ended_count
        self.ended_count = count_before + keep.long().sum(-1)
        # An item whose search is over keeps its beams as they are (its rows are fed
        # end-of-text from here on), so its result does not depend on how long the other
        # items of the batch run: batched equals one at a time.
        over = (count_before >= self.capacity)[:, None]
        src_beam = torch.where(over, self._beam_ids, src_beam)
        token = torch.where(over, torch.full_like(token, eot), token)
        best = torch.where(over, self.sum_logprob, best)
        # The new beams: histories follow their source beams, then the chosen token.
        self.tokens = self.tokens.gather(1, src_beam[:, :, None].expand(-1, -1, self.max_steps))
        self.tokens[:, :, t] = token
        self.sum_logprob = best
        self.t += 1
        src_rows = (self._item_base * k + src_beam).view(-1)
        return token.view(-1), src_rows

    def all_done(self) -> torch.Tensor:
        return (self.ended_count >= self.capacity).all()

    def results(self, length_penalty: float | None) -> list[tuple[Candidate, bool]]:
        """Host side, after the search (one device->host copy): per item its best hypothesis
        and whether its scores stayed finite. Items with fewer than beam_size ended hypotheses
        (the length limit came first) are filled up with their live beams, best first, as
        openai's decoder does."""
        c1 = self.capacity + 1
        ended_tokens, ended_len, ended_lp, counts, live_tokens, live_lp, finite = _to_host(
            self.ended_tokens[:, : self.t], self.ended_len, self.ended_logprob, self.ended_count,
            self.tokens[:, :, : self.t], self.sum_logprob, self.finite)
        ended_tokens, ended_len, counts, live_tokens = map(_ints, (ended_tokens, ended_len, counts, live_tokens))
        out = []
        for i in range(self.n):
            cands = []
            for j in range(min(counts[i], self.capacity)):
                r = i * c1 + j
                cands.append(Candidate(ended_tokens[r][: ended_len[r]], ended_lp[r]))
            if len(cands) < self.k:
                for j in sorted(range(self.k), key=lambda j: live_lp[i][j], reverse=True):
                    if not math.isfinite(live_lp[i][j]):
                        continue
                    cands.append(Candidate(_cut(live_tokens[i][j], self.eot), live_lp[i][j]))
                    if len(cands) >= self.k:
                        break
            if not cands:  # every score non-finite: the item is flagged as such
                cands = [Candidate([], float("-inf"))]
            out.append((rank(cands, length_penalty), bool(finite[i])))
        return out


Search = RowSearch | BeamSearch
