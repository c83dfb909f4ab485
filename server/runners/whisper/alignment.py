"""Word timings for Whisper transcripts: DTW over the cross-attention of the alignment heads.

The reference approach (openai-whisper's `timing.py`), written for batches:
1. one causal decoder forward over [sot, language, transcribe, notimestamps, text...] for all
   items at once (sequences padded at the end, which causal attention cannot see);
2. per item, the cross-attention weights q.k/sqrt(d) of the alignment heads over the item's
   own encoder frames (20 ms each), softmaxed over those frames only, z-scored per head along
   the token axis, median-filtered (width 7) along time and averaged over the heads;
3. DTW through the negated matrix; the frame where the path enters a token's row is when
   the token starts; a word starts with its first token and ends where the next word's
   first token starts (the last word: where the row that predicts end-of-text starts).

Row k of the matrix is the query at position 3+k, the one that *predicts* text token k
(row n predicts end-of-text), as in openai-whisper. openai's z-score also counts the query
row of the end-of-text input; it is left out here (one row among n+5) so the sequence never
exceeds what decoding produced.

One addition, instead of openai's duration heuristics: DTW gives every frame to some token,
and the z-score (per frame, across tokens) makes a pause's frames look most like the token
after it, so plain DTW starts a word that follows a pause at the end of the word before it
(jfk.wav: "what" 1.17 s early, each clip's first word at 0 instead of ~0.3 s). The raw
attention of the row that predicts a word's first token peaks at the word's onset, so the
start is moved to where that row's attention (softmax weights, median over the heads,
median-filtered along time) first reaches half its peak between the DTW start and the next
word's DTW start (`onset_fraction`; 0 keeps the plain DTW start). On the six test clips this
takes the onsets after pauses from errors of -1170..-20 ms to -30..+30 ms
(tests/test_word_timing.py). Word ends stay the DTW ends: the same rule applied to ends made
them worse (the attention fades before the word does). openai's clipping of words longer
than twice the median duration is not applied: it serves 30 s windows stitched by timestamp
tokens, and the onset rule already removes the pauses it was clipping.
"""

from __future__ import annotations

import json
import math
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from server.runners.base import SAMPLE_RATE, RunnerError, Word
from server.runners.whisper.model import Dims, Whisper, _heads
from server.runners.whisper.tokenizer import WhisperTokenizer

FRAME_SAMPLES = 320  # one encoder frame: 20 ms at 16 kHz
MEDIAN_WIDTH = 7
# Languages written without spaces: words are split where tokens end on a whole character.
NO_SPACE_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "my", "yue"})
PREPEND_PUNCTUATION = "\"'“¿([{-"
APPEND_PUNCTUATION = "\"'.。,，!！?？:：”)]}、"
_PROMPT_LEN = 4  # sot, language, transcribe, notimestamps
# A word starts where the attention of the row predicting its first token first reaches
# this fraction of its peak (module docstring); 0 = the plain DTW start.
ONSET_FRACTION = 0.5


@dataclass(frozen=True)
class AlignItem:
    """One transcript to time."""

    row: int
    """Index of the item's row in the cross K/V given to `align_words`."""
    language_id: int
    """The language token the transcript was decoded with."""
    text_tokens: Sequence[int]
    """The decoded text tokens (no prompt, no end-of-text)."""
    n_samples: int
    """Length of the item's audio (16 kHz): only its frames are aligned, and times are
    clipped to its duration."""


@dataclass(frozen=True)
class WordSpan:
    """A word and the tokens that time it: tokens [first, stop) of the transcript.

    Punctuation merged into a word does not time it (openai-whisper keeps the word's own
    times too), so `first`/`stop` cover the word's non-punctuation tokens, or all of its
    tokens when it has nothing else."""

    word: str
    first: int
    stop: int


# ---------------------------------------------------------------------- alignment heads
def read_alignment_heads(config_json: Path | None, dims: Dims) -> list[tuple[int, int]]:
    """(decoder layer, head) pairs from config.json's `alignment_heads`; without one, every
    head of the second half of the decoder layers (openai-whisper's default)."""
    conf = {}
    if config_json is not None and config_json.is_file():
        try:
            conf = json.loads(config_json.read_text())
        except (OSError, ValueError) as e:
            raise RunnerError(f"{config_json}: unreadable ({e})") from None
    raw = conf.get("alignment_heads") if isinstance(conf, dict) else None
    if raw is None:
        return [(layer, h) for layer in range(dims.n_dec_layers // 2, dims.n_dec_layers) for h in range(dims.n_heads)]
    heads: list[tuple[int, int]] = []
    for pair in raw if isinstance(raw, list) else [raw]:
        ok = (
            isinstance(pair, (list, tuple)) and len(pair) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
            and 0 <= pair[0] < dims.n_dec_layers and 0 <= pair[1] < dims.n_heads
        )
        if not ok:
            raise RunnerError(
                f"{config_json}: alignment_heads entry {pair!r} is not a [layer, head] pair within "
                f"{dims.n_dec_layers} decoder layers of {dims.n_heads} heads"
            )
        if (pair[0], pair[1]) not in heads:
            heads.append((pair[0], pair[1]))
    if not heads:
        raise RunnerError(f"{config_json}: alignment_heads is empty")
    return heads


# ---------------------------------------------------------------------- DTW
def dtw(cost: np.ndarray) -> np.ndarray:
    """Minimum-cost monotonic path through cost [N, M] from (0, 0) to (N-1, M-1) with
    horizontal (next frame), diagonal and vertical (next token, same frame) steps;
    returns [2, P]: the path's row and column indices.

    Ties prefer horizontal, then diagonal, then vertical, i.e. in a cell where
    h = D[i, j-1], d = D[i-1, j-1], u = D[i-1, j] the predecessor is h if h <= min(d, u),
    else d if d <= u, else u.

    Vectorised per row: with A[j] = min(d, u) and S the row's prefix sums,
    D[i, j] = S[j] + min over m <= j of (A[m] - S[m-1]) (the row is entered at column m and
    followed horizontally to j), a running minimum. 130 x 1500 (a long transcript over 30 s)
    takes 4.7 ms on the 2-core AMD EPYC dev VM, where a per-cell Python loop takes 106 ms."""
    c = np.asarray(cost, dtype=np.float64)
    if c.ndim != 2 or c.shape[0] == 0 or c.shape[1] == 0:
        raise ValueError(f"dtw needs a non-empty 2-D cost matrix, got shape {c.shape}")
    if not np.isfinite(c).all():
        raise ValueError("dtw cost matrix has non-finite values")
    n, m = c.shape
    cols = np.arange(1, m + 1, dtype=np.int32)
    entry = np.empty((n, m), dtype=np.int32)  # entry[i, j]: 1-based column where row i's segment ending at j begins
    from_diag = np.empty((n, m), dtype=bool)  # entering row i at column j came from (i-1, j-1), not (i-1, j)
    prev = np.full(m + 1, np.inf)  # D[i-1, 0..m]; D[0, 0] = 0
    prev[0] = 0.0
    s_prev = np.empty(m)
    new_min = np.empty(m, dtype=bool)
    row = np.empty(m + 1)
    row[0] = np.inf
    for i in range(n):
        d, u = prev[:-1], prev[1:]
        take_d = d <= u
        a = np.where(take_d, d, u)
        s = np.cumsum(c[i])
        s_prev[0] = 0.0
        s_prev[1:] = s[:-1]
        b = a - s_prev
        run = np.minimum.accumulate(b)
        # Earliest column reaching the running minimum: a later one must beat it strictly
        # (a tie keeps the horizontal step).
        new_min[0] = True
        np.less(b[1:], run[:-1], out=new_min[1:])
        entry[i] = np.maximum.accumulate(np.where(new_min, cols, 0))
        from_diag[i] = take_d
        row[1:] = s + run
        prev, row = row, prev
        row[0] = np.inf
    rows, columns = [], []
    j = m
    for i in range(n - 1, -1, -1):
        e = int(entry[i, j - 1])
        rows.append(np.full(j - e + 1, i))
        columns.append(np.arange(e - 1, j))
        j = e - 1 if from_diag[i, e - 1] else e
    assert j == 0, "DTW backtrace did not reach the origin"
    return np.stack([np.concatenate(rows[::-1]), np.concatenate(columns[::-1])])


def row_starts(path: np.ndarray) -> np.ndarray:
    """The first column of each row on a DTW path: [N]."""
    rows, columns = path
    first = np.ones(len(rows), dtype=bool)
    first[1:] = rows[1:] != rows[:-1]
    return columns[first]


# ---------------------------------------------------------------------- words
def _is_mark(text: str) -> bool:
    """Whitespace, punctuation or symbols only."""
    return all(unicodedata.category(ch)[0] in "PSZ" or ch.isspace() for ch in text)


def _in_set(text: str, chars: str) -> bool:
    s = text.strip()
    return bool(s) and all(ch in chars for ch in s)


def _decode(tokenizer: WhisperTokenizer, ids: list[int]) -> str:
    return tokenizer.tk.decode(ids, skip_special_tokens=True)


def _split_on_characters(tokenizer: WhisperTokenizer, tokens: Sequence[int]) -> list[tuple[str, int, int]]:
    """Groups of tokens that decode to whole characters: (text, first, stop).

    A group is closed when its bytes decode without U+FFFD, or when the U+FFFD it shows is
    in the full text too (bytes that are invalid UTF-8 for good)."""
    full = _decode(tokenizer, list(tokens))
    out: list[tuple[str, int, int]] = []
    offset, first = 0, 0
    for k in range(len(tokens)):
        text = _decode(tokenizer, list(tokens[first : k + 1]))
        bad = text.find("\ufffd")
        if bad < 0 or (offset + bad < len(full) and full[offset + bad] == "\ufffd"):
            out.append((text, first, k + 1))
            offset += len(text)
            first = k + 1
    if first < len(tokens):  # an incomplete character at the end
        out.append((_decode(tokenizer, list(tokens[first:])), first, len(tokens)))
    return out


def split_words(tokenizer: WhisperTokenizer, tokens: Sequence[int], language: str | None) -> list[WordSpan]:
    """The words of a transcript, as openai-whisper splits and merges them.

    Units: groups of tokens that decode to whole characters; in languages written with
    spaces a unit is extended by the following groups until one starts with a space or is
    punctuation. A unit of prepend punctuation (`"'“¿([{-`, led by a space in spaced
    languages) joins the word after it. In spaced languages every unit not led by a space
    joins the word before it (so the words joined with spaces give the text: "Americans,",
    "well-known", "50%"); elsewhere a unit of append punctuation (`"'.。,，!！?？:：”)]}、`) joins
    the word before it and every other unit is a word. Words are stripped of surrounding
    spaces; empty ones are dropped."""
    spaced = language not in NO_SPACE_LANGUAGES
    groups = _split_on_characters(tokenizer, tokens)
    units: list[tuple[str, int, int]] = []
    for text, first, stop in groups:
        if spaced and units and not text[:1].isspace() and not _is_mark(text):
            t0, f0, _ = units[-1]
            units[-1] = (t0 + text, f0, stop)
        else:
            units.append((text, first, stop))

    words: list[list[tuple[str, int, int]]] = []
    pending: list[tuple[str, int, int]] = []
    for k, unit in enumerate(units):
        text = unit[0]
        leads = text[:1].isspace() or k == 0
        if k < len(units) - 1 and _in_set(text, PREPEND_PUNCTUATION) and (leads or not spaced):
            pending.append(unit)
            continue
        if spaced:
            joins = not leads
        else:
            joins = not text[:1].isspace() and _in_set(text, APPEND_PUNCTUATION)
        if words and joins and not pending:
            words[-1].append(unit)
        else:
            words.append(pending + [unit])
            pending = []
    words.extend([u] for u in pending)

    out: list[WordSpan] = []
    for parts in words:
        word = "".join(p[0] for p in parts).strip()
        if not word:
            continue
        timed = [p for p in parts if not _is_mark(p[0])] or parts
        out.append(WordSpan(word, timed[0][1], timed[-1][2]))
    return out


# ---------------------------------------------------------------------- attention
def _median_filter(x: torch.Tensor, width: int) -> torch.Tensor:
    """Median of `width` (odd) along the last axis, reflect-padded at the ends."""
    pad = width // 2
    if x.shape[-1] <= pad:
        return x
    padded = F.pad(x, (pad, pad), mode="reflect")
    return padded.unfold(-1, width, 1).median(-1).values


def _alignment_queries(
    model: Whisper,
    tokens: torch.Tensor,
    cross: tuple[list[torch.Tensor], list[torch.Tensor]],
    rows: torch.Tensor,
    by_layer: dict[int, list[int]],
) -> dict[int, torch.Tensor]:
    """A causal decoder forward over tokens [B, S] (no cache); returns each alignment layer's
    cross-attention queries of its alignment heads, [B, h, S, d_head]."""
    s = tokens.shape[1]
    n_heads = model.dims.n_heads
    x = model.tok_emb(tokens) + model.dec_pos[:s]
    queries: dict[int, torch.Tensor] = {}
    for layer in range(max(by_layer) + 1):
        blk = model.dec_blocks[layer]
        b, _, d = x.shape
        q, k, v = _heads(blk.self_qkv(blk.self_ln(x)), 3, n_heads)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + blk.self_out(a.transpose(1, 2).reshape(b, s, d))
        q = _heads(blk.cross_q(blk.cross_ln(x)), 1, n_heads)[0]
        if layer in by_layer:
            queries[layer] = q[:, by_layer[layer]]
        if layer == max(by_layer):
            break
        ck = cross[0][layer].index_select(0, rows)
        cv = cross[1][layer].index_select(0, rows)
        a = F.scaled_dot_product_attention(q, ck, cv)
        x = x + blk.cross_out(a.transpose(1, 2).reshape(b, s, d))
        x = x + blk.fc2(F.gelu(blk.fc1(blk.mlp_ln(x))))
    return queries


def _n_frames(n_samples: int, n_audio_ctx: int) -> int:
    return max(1, min(n_audio_ctx, math.ceil(n_samples / FRAME_SAMPLES)))


@dataclass(frozen=True)
class ItemAttention:
    """One item's attention matrices, [n_text_tokens + 1, n_frames] float32 on the host; row
    k is the query that predicts text token k (the last row predicts end-of-text)."""

    z: np.ndarray
    """The DTW matrix: z-scored along tokens per head, median-filtered, mean over heads."""
    weights: np.ndarray
    """Softmax weights, median over heads (robust to a head that parks its attention on
    one frame), median-filtered along time: where each row actually looks."""


def attention_matrices(
    model: Whisper,
    tokenizer: WhisperTokenizer,
    cross: tuple[list[torch.Tensor], list[torch.Tensor]],
    items: Sequence[AlignItem],
    heads: Sequence[tuple[int, int]],
) -> list[ItemAttention | None]:
    """Per item, its attention matrices; None for an item without text tokens."""
    out: list[ItemAttention | None] = [None] * len(items)
    work = [i for i, it in enumerate(items) if len(it.text_tokens) > 0]
    if not work:
        return out
    dims = model.dims
    device = cross[0][0].device
    lengths = [_PROMPT_LEN + len(items[i].text_tokens) for i in work]
    if max(lengths) > dims.n_text_ctx:
        raise ValueError(f"a transcript of {max(lengths) - _PROMPT_LEN} tokens exceeds the decoder's context")
    seq = np.full((len(work), max(lengths)), tokenizer.eot, dtype=np.int64)
    for r, i in enumerate(work):
        it = items[i]
        seq[r, :_PROMPT_LEN] = (tokenizer.sot, it.language_id, tokenizer.transcribe, tokenizer.no_timestamps)
        seq[r, _PROMPT_LEN : lengths[r]] = it.text_tokens
    by_layer: dict[int, list[int]] = {}
    for layer, h in heads:
        by_layer.setdefault(layer, []).append(h)
    frames = [_n_frames(items[i].n_samples, dims.n_audio_ctx) for i in work]

    with torch.inference_mode():
        rows = torch.tensor([items[i].row for i in work], dtype=torch.long, device=device)
        tokens = torch.from_numpy(seq).to(device)
        queries = _alignment_queries(model, tokens, cross, rows, by_layer)
        scale = 1.0 / math.sqrt(dims.d_model // dims.n_heads)
        parts = []
        for r, i in enumerate(work):
            n_tok, n_fr, row = lengths[r], frames[r], items[i].row
            w = torch.cat([
                (queries[layer][r, :, :n_tok].float() @ cross[0][layer][row, hs, :n_fr].float().transpose(-1, -2)) * scale
                for layer, hs in by_layer.items()
            ]).softmax(-1)  # [heads, tokens, frames]
            std, mean = torch.std_mean(w, dim=-2, keepdim=True, unbiased=False)
            z = _median_filter((w - mean) / std.clamp_min(1e-12), MEDIAN_WIDTH).mean(0)
            weights = _median_filter(w.median(0).values, MEDIAN_WIDTH)
            # Rows from the one predicting text token 0 to the one predicting end-of-text.
            parts += [z[_PROMPT_LEN - 1 :].reshape(-1), weights[_PROMPT_LEN - 1 :].reshape(-1)]
        flat = torch.cat(parts).cpu().numpy()  # one device->host copy for the batch

    pos = 0
    for r, i in enumerate(work):
        shape = (len(items[i].text_tokens) + 1, frames[r])
        size = shape[0] * shape[1]
        out[i] = ItemAttention(flat[pos : pos + size].reshape(shape), flat[pos + size : pos + 2 * size].reshape(shape))
        pos += 2 * size
    return out


def align_words(
    model: Whisper,
    tokenizer: WhisperTokenizer,
    cross: tuple[list[torch.Tensor], list[torch.Tensor]],
    items: Sequence[AlignItem],
    heads: Sequence[tuple[int, int]],
    onset_fraction: float = ONSET_FRACTION,
) -> list[list[Word]]:
    """Word timings of each item, in ms from the item's first sample.

    `cross` is `model.cross_kv(enc)` of the batch the items were decoded from (one row per
    item); `heads` from `read_alignment_heads`. One batched decoder forward for all items;
    the attention matrices come back to the host in one copy, and the DTW runs there.
    Times lie in [0, duration]; each word has start <= end and starts at or after the
    previous word's end (non-overlapping, non-decreasing)."""
    out: list[list[Word]] = []
    for it, att in zip(items, attention_matrices(model, tokenizer, cross, items, heads)):
        if att is None:
            out.append([])
            continue
        starts = row_starts(dtw(-att.z))
        spans = split_words(tokenizer, it.text_tokens, tokenizer.language_of.get(it.language_id))
        out.append(_words(spans, starts, att.weights, onset_fraction, it.n_samples * 1000 // SAMPLE_RATE))
    return out


def _words(spans: list[WordSpan], starts: np.ndarray, weights: np.ndarray, onset_fraction: float,
           duration_ms: int) -> list[Word]:
    """Words from the DTW start frame of each row ([n_tokens + 1]; the last is the
    end-of-text row's), each start moved to its onset (see the module docstring), in ms
    clipped to [0, duration_ms], non-decreasing and non-overlapping."""
    n_frames = weights.shape[1]
    frame_ms = FRAME_SAMPLES * 1000 // SAMPLE_RATE
    words: list[Word] = []
    floor = 0
    for k, span in enumerate(spans):
        first = int(starts[span.first])
        limit = int(starts[spans[k + 1].first]) if k + 1 < len(spans) else n_frames
        if onset_fraction > 0 and limit > first:
            profile = weights[span.first, first:limit]
            first += int(np.argmax(profile >= onset_fraction * profile.max()))
        start = min(max(first * frame_ms, floor), duration_ms)
        end = min(max(int(starts[span.stop]) * frame_ms, start), duration_ms)
        words.append(Word(span.word, start, end))
        floor = end
    return words
