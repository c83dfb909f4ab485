"""Qwen3AsrRunner: Qwen3-ASR (0.6B / 1.7B) batched across items within a memory budget.

One call's items are encoded together (model.AudioEncoder), then decoded greedily (the
reference's decoding: `generate` without sampling, vLLM at temperature 0) from one static KV
cache: each decoding item holds one cache row; when an item stops (end token or
`max_new_tokens`) its row takes the next waiting item's prompt, so a batch larger than the rows
that fit decodes in one pass. Each step copies the batch's next tokens to the host once.

The number of rows comes from the memory budget (`runner.memory_budget_gb`): weights, rows of
KV cache sized for the longest item, and the activations of a prompt and of a step per row.
`plan_rows` is the arithmetic; `describe()` reports it."""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from server.config import RunnerConfig
from server.features.logmel import HOP, N_FFT, mel_filters
from server.runners.base import ItemError, ItemOptions, ItemResult, Launched, ModelRunner, RunnerError, Transcript
from server.runners.device import StageClock, device_facts, resolve_device, resolve_dtype
from server.runners.qwen3asr.model import KVCache, Qwen3ASR, audio_tokens, param_count, weight_bytes
from server.runners.qwen3asr.model_dir import ModelFiles, load_model
from server.runners.qwen3asr.tokenizer import QwenTokenizer

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
# Shorter input cannot hold a word, and under 25 ms the reference's own STFT fails: answered
# empty without a model call. (The reference pads only the chunks it cuts from inputs longer than
# 20 minutes to 0.5 s; a whole short input goes in unpadded, and so it does here.)
MIN_SAMPLES = SAMPLE_RATE // 10
PROMPT_OVERHEAD = 32  # prompt tokens besides the audio placeholders and `context`, with margin

# Qwen3-ASR's language names (qwen_asr.inference.utils.SUPPORTED_LANGUAGES) by ISO code.
LANGUAGE_NAMES = {
    "zh": "Chinese", "en": "English", "yue": "Cantonese", "ar": "Arabic", "de": "German", "fr": "French",
    "es": "Spanish", "pt": "Portuguese", "id": "Indonesian", "it": "Italian", "ko": "Korean", "ru": "Russian",
    "th": "Thai", "vi": "Vietnamese", "ja": "Japanese", "tr": "Turkish", "hi": "Hindi", "ms": "Malay",
    "nl": "Dutch", "sv": "Swedish", "da": "Danish", "fi": "Finnish", "pl": "Polish", "cs": "Czech",
    "fil": "Filipino", "fa": "Persian", "el": "Greek", "ro": "Romanian", "hu": "Hungarian", "mk": "Macedonian",
}
LANGUAGE_CODES = {name: code for code, name in LANGUAGE_NAMES.items()}


def parse_output(raw: str, forced: str | None) -> tuple[str, str]:
    """(language name, text) from a decoded answer, as the reference's `parse_asr_output`:
    a forced language makes the whole answer text; otherwise `language X<asr_text>text`, where
    `language None` means no speech. Repetition repair is the reference's own function."""
    from server.runners.qwen3asr.repetition import detect_and_fix_repetitions

    s = (raw or "").strip()
    if not s:
        return "", ""
    s = detect_and_fix_repetitions(s)
    if forced:
        return forced, s
    if "<asr_text>" not in s:
        return "", s.strip()
    meta, text = s.split("<asr_text>", 1)
    if "language none" in meta.lower():
        return "", text.strip()
    lang = ""
    for line in meta.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.lower().startswith("language "):
            val = line[len("language "):].strip()
            if val:
                lang = val[:1].upper() + val[1:].lower()
            break
    return lang, text.strip()


@dataclass(frozen=True)
class RowPlan:
    """How many decode rows fit a budget, and why."""

    rows: int
    budget_bytes: int
    weight_bytes: int
    row_bytes: int
    kv_row_bytes: int
    activation_row_bytes: int
    encoder_bytes: int
    max_len: int

    def describe(self) -> dict[str, Any]:
        gib = float(1 << 30)
        return {"decode_rows": self.rows, "memory_budget_gib": round(self.budget_bytes / gib, 3),
                "weights_gib": round(self.weight_bytes / gib, 3), "row_gib": round(self.row_bytes / gib, 4),
                "kv_row_gib": round(self.kv_row_bytes / gib, 4), "encoder_gib": round(self.encoder_bytes / gib, 3),
                "cache_positions": self.max_len}


def activation_bytes(model: Qwen3ASR, prompt_len: int, elt: int) -> tuple[int, int]:
    """(per decode row, encoder of one longest item): the largest live activations, as an upper
    bound. A row's prompt runs once (its layer's hidden states, MLP and attention scores) and
    each step holds its logits; the encoder holds a window batch's hidden states, MLP and scores
    and the first convolution's output."""
    t, a = model.text_dims, model.audio_dims
    prefill = prompt_len * (4 * t.hidden_size + 3 * t.intermediate_size + 2 * t.vocab_size // prompt_len
                            + t.heads * prompt_len) * elt
    step = 2 * t.vocab_size * 4 + 8 * t.hidden_size * elt
    tokens = prompt_len
    window = max(1, (a.n_window_infer // (2 * a.n_window)) * 13)
    frames = max(1, tokens * 100 // 13)
    encoder = (tokens * (4 * a.d_model + 2 * a.ffn_dim) + a.heads * tokens * window) * elt
    conv = a.downsample_hidden_size * (a.num_mel_bins // 2 + 1) * (frames // 2 + 1) * elt * 2
    return prefill + step, encoder + conv


def plan_rows(model: Qwen3ASR, budget_bytes: int, max_len: int, dtype: torch.dtype, most: int) -> RowPlan:
    """Decode rows that fit `budget_bytes` next to the weights (at most `most`); RunnerError if not one."""
    elt = torch.empty((), dtype=dtype).element_size()
    wb = weight_bytes(model)
    kv = KVCache.bytes_per_row(model.text_dims, max_len, dtype)
    act, enc = activation_bytes(model, max_len, elt)
    row = kv + act
    free = budget_bytes - wb - enc
    rows = min(most, free // row) if free > 0 else 0
    plan = RowPlan(int(rows), budget_bytes, wb, row, kv, act, enc, max_len)
    if rows < 1:
        gib = float(1 << 30)
        raise RunnerError(
            f"qwen3-asr does not fit runner.memory_budget_gb={budget_bytes / gib:.2f} GiB: weights "
            f"{wb / gib:.2f} GiB + encoder {enc / gib:.2f} GiB + one decode row {row / gib:.3f} GiB "
            f"(KV cache of {max_len} positions {kv / gib:.3f} GiB); raise the budget or lower "
            "runner.qwen3asr.max_item_s / max_new_tokens"
        )
    return plan


class Qwen3AsrRunner(ModelRunner):
    name = "qwen3-asr"

    def __init__(self, config: RunnerConfig, max_batch_size: int | None = None, graph_backend: Any = None) -> None:
        super().__init__(config, max_batch_size, graph_backend)
        self.max_item_seconds = float(config.qwen3asr.max_item_s)  # instance value: the endpointer reads it
        self.model: Qwen3ASR | None = None
        self.tokenizer: QwenTokenizer | None = None
        self.files: ModelFiles | None = None
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.plan: RowPlan | None = None
        self.cache: KVCache | None = None
        self._languages: dict[str, str] = {}
        self._eos: tuple[int, ...] = ()

    # ------------------------------------------------------------------ load
    def load(self) -> None:
        t0 = time.monotonic()
        cfg = self.config
        self.files = ModelFiles.from_dir(cfg.model)
        self.device = resolve_device(cfg)
        self.dtype = resolve_dtype(cfg, self.device)
        self.tokenizer = QwenTokenizer(self.files.root)
        free_before = self._free_bytes()
        self.model = load_model(self.files, self.device, self.dtype)
        self._eos = self.files.eos
        names = set(self.files.languages) or set(LANGUAGE_NAMES.values())
        self._languages = {code: name for code, name in LANGUAGE_NAMES.items() if name in names}
        self._filters = torch.from_numpy(mel_filters(self.model.audio_dims.num_mel_bins)).to(self.device)
        self._window = torch.hann_window(N_FFT, device=self.device)
        max_len = self.max_len()
        most = max(1, self.max_batch_size or 8)
        budget = int(cfg.memory_budget_gb * (1 << 30))
        if budget <= 0:
            budget = int(0.9 * free_before) if free_before else 0
        if budget <= 0:  # CPU without a budget: rows for the batcher's largest batch
            wb = weight_bytes(self.model)
            kv = KVCache.bytes_per_row(self.model.text_dims, max_len, self.dtype)
            elt = torch.empty((), dtype=self.dtype).element_size()
            act, enc = activation_bytes(self.model, max_len, elt)
            budget = wb + enc + most * (kv + act)
        self.plan = plan_rows(self.model, budget, max_len, self.dtype, most)
        self.cache = KVCache(self.model.text_dims, self.plan.rows, max_len, self.dtype, self.device)
        log.info("qwen3-asr loaded from %s on %s/%s in %.1f s: %s", self.files.root, self.device, self.dtype,
                 time.monotonic() - t0, self.plan.describe())
        if cfg.warmup:
            rng = np.random.default_rng(0)
            self.transcribe([rng.standard_normal(SAMPLE_RATE).astype(np.float32) * 0.1], [ItemOptions(language="en")])

    def _free_bytes(self) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free)
        return 0

    def max_len(self) -> int:
        """Cache positions per row: the longest item's prompt plus `max_new_tokens`."""
        assert self.model is not None and self.tokenizer is not None
        frames = int(self.max_item_seconds * SAMPLE_RATE) // HOP
        context = len(self.tokenizer.encode(self.config.qwen3asr.context))
        return PROMPT_OVERHEAD + context + audio_tokens(frames, self.model.audio_dims) + self.config.qwen3asr.max_new_tokens

    def languages(self) -> frozenset[str] | None:
        if self.model is None:
            raise RunnerError("qwen3-asr runner used before load()")
        return frozenset(self._languages) | {"auto"}

    # ------------------------------------------------------------------ inference
    def transcribe(self, audios: Sequence[np.ndarray], options: Sequence[ItemOptions]) -> list[ItemResult]:
        return self.launch(audios, options).result()

    def launch(self, audios: Sequence[np.ndarray], options: Sequence[ItemOptions]) -> Launched:
        """Runs the batch to completion (decoding is host-driven), so `asynchronous` stays False."""
        if self.model is None or self.tokenizer is None:
            raise RunnerError("qwen3-asr runner used before load()")
        if len(audios) != len(options):
            raise ValueError("one ItemOptions per audio item")
        results: list[ItemResult | None] = [None] * len(audios)
        work: list[int] = []
        for i, (a, o) in enumerate(zip(audios, options)):
            error = self._item_error(a, o)
            if error is not None:
                results[i] = error
            elif len(a) < MIN_SAMPLES:
                lang = o.language if o.language != "auto" else None
                results[i] = Transcript("", lang, {"raw_text": "", "tokens": [], "language_name": None}, None)
            else:
                work.append(i)
        stages: dict[str, float] = {}
        if work:
            with torch.inference_mode():
                decoded, stages = self._run([audios[i] for i in work], [options[i] for i in work])
            for i, r in zip(work, decoded):
                results[i] = r
        launched = Launched.done([r for r in results if r is not None])
        launched.stages = stages
        return launched

    def _item_error(self, audio: np.ndarray, option: ItemOptions) -> ItemError | None:
        if option.language != "auto" and option.language not in self._languages:
            return ItemError("bad_config", f"unknown language {option.language!r}; use auto or one of "
                             f"{', '.join(sorted(self._languages))}")
        if len(audio) > self.max_item_seconds * SAMPLE_RATE + HOP:
            return ItemError("bad_audio", f"item is {len(audio) / SAMPLE_RATE:.1f} s; this qwen3-asr runner takes at most "
                             f"{self.max_item_seconds:g} s per item (runner.qwen3asr.max_item_s)")
        if not np.isfinite(audio).all():
            return ItemError("bad_audio", "audio contains NaN or infinite samples")
        return None

    def features(self, audio: np.ndarray) -> torch.Tensor:
        """The reference's input: audio normalised as `float_range_normalize`, then Whisper's log-mel (transformers' WhisperFeatureExtractor, 128 bins) without
        padding to 30 s: [n_mels, len // 160]."""
        a = np.asarray(audio, dtype=np.float32)
        peak = float(np.max(np.abs(a))) if a.size else 0.0
        if peak > 1.0:
            a = a / peak
        a = np.clip(a, -1.0, 1.0)
        x = torch.from_numpy(a).to(self.device)
        stft = torch.stft(x, N_FFT, HOP, window=self._window, return_complex=True)
        power = stft[..., :-1].abs() ** 2
        log_spec = torch.clamp(self._filters @ power, min=1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
        return (log_spec + 4.0) / 4.0

    def _run(self, audios: Sequence[np.ndarray], options: Sequence[ItemOptions]) -> tuple[list[ItemResult], dict[str, float]]:
        assert self.model is not None and self.tokenizer is not None and self.cache is not None and self.plan is not None
        model, tk, dev = self.model, self.tokenizer, self.device
        clock = StageClock(dev)
        clock.mark("start")
        mels = [self.features(a).to(self.dtype) for a in audios]
        clock.mark("features")
        # The budget holds the encoder activations of one longest item: items go through the
        # encoder in groups of at most that much audio.
        most = int(self.max_item_seconds * SAMPLE_RATE) // HOP
        enc: list[torch.Tensor] = []
        group: list[torch.Tensor] = []
        for m in mels:
            if group and sum(g.shape[1] for g in group) + m.shape[1] > most:
                enc += model.audio_tower(group, windowed=self.config.qwen3asr.encoder_windows)
                group = []
            group.append(m)
        enc += model.audio_tower(group, windowed=self.config.qwen3asr.encoder_windows)
        clock.mark("encoder")
        forced = [LANGUAGE_NAMES[o.language] if o.language != "auto" else None for o in options]
        context = self.config.qwen3asr.context
        prompts = [tk.prompt(int(e.shape[0]), f, context) for e, f in zip(enc, forced)]
        tokens, finite = self._decode(prompts, enc)
        clock.mark("decoder")
        out: list[ItemResult] = []
        for i, toks in enumerate(tokens):
            if not finite[i]:
                out.append(ItemError.non_finite(self.config.dtype))
                continue
            raw = tk.decode(toks)
            name, text = parse_output(raw, forced[i])
            code = LANGUAGE_CODES.get(name)
            fields = {"raw_text": raw, "tokens": toks, "language_name": name or None}
            # No forced aligner here: finals carry no word timings (None, not []).
            out.append(Transcript(text, code, fields, None))
        return out, clock.stages()

    def _decode(self, prompts: list[list[int]], audio: list[torch.Tensor]) -> tuple[list[list[int]], list[bool]]:
        """Greedy decoding of every prompt from the static cache; rows are reused as items end."""
        assert self.model is not None and self.cache is not None
        model, dev = self.model, self.device
        max_new = self.config.qwen3asr.max_new_tokens
        n = len(prompts)
        rows = min(self.cache.rows, n)
        cache = self._view(rows)
        eos = set(self._eos)
        pending = deque(range(n))
        row_item: list[int | None] = [None] * rows
        out: list[list[int]] = [[] for _ in range(n)]
        finite = [True] * n
        # Step inputs stay on the device (static buffers a captured graph could read): each row's
        # next position advances by its `active` flag, so a finished row keeps writing at its
        # last position (never read: its next item's prefill and steps overwrite or mask it).
        pos_dev = torch.zeros(rows, dtype=torch.long, device=dev)
        active_dev = torch.zeros(rows, dtype=torch.long, device=dev)
        tokens_dev = torch.zeros(rows, dtype=torch.long, device=dev)
        bad_dev = torch.zeros(rows, dtype=torch.bool, device=dev)
        while True:
            free = [r for r in range(rows) if row_item[r] is None]
            if free and pending:
                take = [pending.popleft() for _ in range(min(len(free), len(pending)))]
                rws = free[: len(take)]
                if any(len(prompts[i]) + max_new > cache.max_len for i in take):
                    raise RunnerError("a prompt outgrew the KV cache (max_item_s and the cache disagree)")
                emb, lengths = model.embed_prompts([prompts[i] for i in take], [audio[i] for i in take],
                                                   self.files.token_id("audio_token_id", 151676) if self.files else 151676)
                idx = torch.tensor(rws, dtype=torch.long, device=dev)
                best, arg = model.prefill(emb, lengths, cache, idx).max(-1)  # max propagates NaN: one pass for both
                tokens_dev[idx] = arg
                bad_dev[idx] = ~torch.isfinite(best)
                pos_dev[idx] = lengths
                active_dev[idx] = 1
                for r, i in zip(rws, take):
                    row_item[r] = i
            # The one device->host copy of this step: every row's newest token and finiteness.
            host = torch.stack([tokens_dev, bad_dev.long()]).cpu().tolist()
            for r in range(rows):
                i = row_item[r]
                if i is None:
                    continue
                t = int(host[0][r])
                if host[1][r]:
                    finite[i] = False
                out[i].append(t)
                if t in eos or len(out[i]) >= max_new or not finite[i]:
                    row_item[r] = None
                    active_dev[r] = 0
            if all(i is None for i in row_item):
                if not pending:
                    break
                continue
            # Idle rows step too (static shapes), in place.
            best, arg = model.step(tokens_dev, pos_dev, cache).max(-1)
            tokens_dev.copy_(arg)
            bad_dev.copy_(~torch.isfinite(best))
            pos_dev += active_dev
        for i in range(n):
            if out[i] and out[i][-1] in eos:
                out[i].pop()
        return out, finite

    def _view(self, rows: int) -> KVCache:
        """The first `rows` rows of the cache, as a cache (no copy)."""
        assert self.cache is not None
        if rows == self.cache.rows:
            return self.cache
        view = KVCache.__new__(KVCache)
        view.kv = self.cache.kv[:, :, :rows]
        view.rows, view.max_len = rows, self.cache.max_len
        return view

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(device_facts(self.device))
        info["asynchronous"] = self.asynchronous
        if self.model is not None:
            info["params_m"] = round(param_count(self.model) / 1e6, 1)
        if self.plan is not None:
            info.update(self.plan.describe())
        return info

    def close(self) -> None:
        self.model = None
        self.cache = None
