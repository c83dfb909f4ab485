"""WhisperRunner: batched Whisper decoding over items of different lengths.

Finals are decoded by beam search with temperature fallback, partials greedily (both
configurable); every search runs all items of a batch together, each item's beams or samples
as consecutive decoder rows (`decoding.py`). Items that ask for words get word timings from
the cross-attention of the alignment heads (`alignment.py`)."""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from server.config import RunnerConfig
from server.features.logmel import LogMel
from server.graphs import BucketedRunner, BucketTable, GraphBackend, GraphMode, InputSpec, buckets_up_to
from server.runners.base import ItemError, ItemOptions, ItemResult, Launched, ModelRunner, RunnerError, Transcript, Word
from server.runners.device import (
    StageClock, device_facts, graph_backend_for, graph_budget_bytes, resolve_device, resolve_dtype,
)
from server.runners.whisper import assets
from server.runners.whisper.alignment import AlignItem, align_words, read_alignment_heads
from server.runners.whisper.ct2 import read_ct2
from server.runners.whisper.decoding import BeamSearch, Candidate, RowSearch, Search
from server.runners.whisper.model import Whisper, build_from_ct2
from server.runners.whisper.steps import StaticDecoderSteps
from server.runners.whisper.tokenizer import WhisperTokenizer

log = logging.getLogger(__name__)

_MIN_SAMPLES = 1600  # 0.1 s: shorter input cannot hold a word; answer empty without a model call
# Below this RMS (about -66 dBFS) the input is digital silence; Whisper's mel normalisation
# would otherwise amplify it into noise, so it is answered empty without a model call.
_SILENCE_RMS = 5e-4


def _compression_ratio(text: str) -> float:
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


@dataclass
class _Prompted:
    """A batch after its prompt: cross K/V, the prompt's cache (4 positions) and the logits
    of the first text token, one row per item."""

    cross: tuple[list[torch.Tensor], list[torch.Tensor]]
    prompt_cache: torch.Tensor
    first: torch.Tensor


@dataclass
class _Attempt:
    """One item's result at one temperature."""

    candidate: Candidate
    text: str
    ratio: float
    finite: bool
    temperature: float


class WhisperRunner(ModelRunner):
    name = "whisper"
    max_item_seconds = 30.0

    def __init__(self, config: RunnerConfig, max_batch_size: int | None = None, graph_backend: Any = None) -> None:
        super().__init__(config, max_batch_size, graph_backend)
        self.model: Whisper | None = None
        self.tokenizer: WhisperTokenizer | None = None
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        self.encoder = None  # callable mel -> enc; a BucketedRunner on GPU with graphs
        self.encoder_graphs: BucketedRunner | None = None
        self.steps: dict[int, StaticDecoderSteps] = {}
        """Static-buffer decoder steps (graphs on GPU) per rows-per-item of the searches in use."""
        self._generator: torch.Generator | None = None  # made at the first sampled fallback (see sampler())
        self._alignment_heads: list[tuple[int, int]] = []

    # ------------------------------------------------------------------ load
    def load(self) -> None:
        t0 = time.monotonic()
        self.device = resolve_device(self.config)
        self.dtype = resolve_dtype(self.config, self.device)
        files = assets.resolve(self.config)
        spec, tensors = read_ct2(files.model_bin)
        if spec != "WhisperSpec":
            raise RunnerError(f"{files.model_bin} holds a {spec}, not a Whisper model")
        model = build_from_ct2(tensors)
        self.model = model.to(self.device, self.dtype).eval()
        self.tokenizer = WhisperTokenizer(files.tokenizer_json, files.config_json)
        self._alignment_heads = read_alignment_heads(files.config_json, model.dims)
        self.logmel = LogMel(model.dims.n_mels).to(self.device)
        backend = graph_backend_for(self.config, self.device, self.graph_backend)
        # One graph memory budget for the encoder's graphs and the decoder's step buffers.
        budget = graph_budget_bytes(self.config)
        self.encoder = self._make_encoder(backend, budget)
        if budget and self.encoder_graphs is not None:
            budget = max(1, budget - self.encoder_graphs.stats["graph_memory_bytes"])
        self.steps = {}
        for group in self._row_groups():
            steps = self._make_steps(static=backend is not None, backend=backend, budget=budget, group=group)
            if steps is not None:
                self.steps[group] = steps
                if budget:
                    budget = max(1, budget - steps.memory_bytes)
        self._build_suppression()
        log.info("whisper loaded from %s on %s/%s in %.1f s", files.model_bin, self.device, self.dtype, time.monotonic() - t0)
        if self.config.warmup:
            rng = np.random.default_rng(0)
            self.transcribe([rng.standard_normal(16000 * 2).astype(np.float32) * 0.1], [ItemOptions(language="en")])

    def _batch_buckets(self) -> list[int]:
        return buckets_up_to(self.config.graphs.batch_buckets, self.max_batch_size)

    def _make_encoder(self, backend: GraphBackend | None, budget: int):
        assert self.model is not None
        if backend is None:
            return self.model.encode
        n = self.model.dims.n_mels
        runner = BucketedRunner(
            self.model.encode,
            [InputSpec("mel", ("B", n, "T"), self.dtype, 0.0)],
            BucketTable(self._batch_buckets(), (3000,)),
            self.device,
            GraphMode.CUDA_GRAPHS,
            memory_budget_bytes=budget,
            name="whisper-encoder",
            backend=backend,
        )
        runner.warmup()
        self.encoder_graphs = runner
        return lambda mel: runner(mel)[0]

    def _max_len(self) -> int:
        assert self.model is not None
        return min(4 + self.config.whisper.max_new_tokens + 1, self.model.dims.n_text_ctx)

    def _row_groups(self) -> list[int]:
        """Rows per item of every search the config can run: greedy or beam partials, beam
        finals, sampled fallbacks."""
        w = self.config.whisper
        groups = {w.partial_beam_size, w.beam_size}
        if any(t > 0 for t in w.temperatures):
            groups.add(w.best_of)
        return sorted(groups)

    def _make_steps(self, static: bool, backend: GraphBackend | None = None, budget: int = 0, group: int = 1) -> StaticDecoderSteps | None:
        """Static-buffer decoder steps (captured graphs with a backend); None = the plain eager
        decoder.

        `static=True` without a backend runs the same buffers without capture: the reference
        the tests hold the graph path to."""
        if not static:
            return None
        assert self.model is not None
        steps = StaticDecoderSteps(self.model, self._batch_buckets(), self._max_len(), self.dtype,
                                   self.device, backend=backend, memory_budget_bytes=budget, group=group)
        try:
            steps.warmup()
        except RuntimeError as e:  # a capture failure must not stop the server: fall back to eager
            log.warning("whisper decoder step capture failed (%s); decoding eagerly", e)
            return None
        return steps

    def _build_suppression(self) -> None:
        tk, dims = self.tokenizer, self.model.dims
        assert tk is not None
        mask = torch.zeros(dims.n_vocab, dtype=torch.bool)
        # Transcription without timestamps: every special token after eot (sot, languages,
        # tasks, no-speech, timestamps) is forbidden as output, plus OpenAI's non-speech symbols.
        mask[tk.eot + 1 :] = True
        mask[[i for i in tk.suppress if i < dims.n_vocab]] = True
        begin = mask.clone()
        if self.config.whisper.suppress_blank:
            begin[[i for i in tk.suppress_begin if i is not None and i < dims.n_vocab]] = True
        self._suppress = mask.to(self.device)
        self._suppress_begin = begin.to(self.device)
        lang_ids = sorted(tk.languages.values())
        self._lang_ids = torch.tensor(lang_ids, device=self.device)

    # ------------------------------------------------------------------ inference
    def language_codes(self) -> list[str]:
        assert self.tokenizer is not None
        return sorted(self.tokenizer.languages)

    def languages(self) -> frozenset[str] | None:
        if self.tokenizer is None:
            raise RunnerError("whisper runner used before load()")
        return frozenset(self.tokenizer.languages) | {"auto"}

    def transcribe(self, audios: Sequence[np.ndarray], options: Sequence[ItemOptions]) -> list[Transcript]:
        return self.launch(audios, options).result()

    def launch(self, audios: Sequence[np.ndarray], options: Sequence[ItemOptions]) -> Launched:
        """Runs the batch to completion: decoding is host-driven (the loop ends when
        every row has), so `asynchronous` stays False; queueing the next batch first would
        make this one's decoder wait behind it."""
        if self.model is None or self.tokenizer is None:
            raise RunnerError("whisper runner used before load()")
        if len(audios) != len(options):
            raise ValueError("one ItemOptions per audio item")
        results: list[ItemResult | None] = [None] * len(audios)
        work = []
        for i, (a, o) in enumerate(zip(audios, options)):
            # A bad item gets its own error and never reaches the model with the others.
            error = self._item_error(a, o)
            if error is not None:
                results[i] = error
            elif len(a) < _MIN_SAMPLES or float(np.sqrt(np.mean(np.square(a, dtype=np.float64)))) < _SILENCE_RMS:
                lang = o.language if o.language != "auto" else None
                results[i] = Transcript("", lang, {"no_speech_prob": 1.0, "avg_logprob": 0.0, "tokens": []})
            else:
                work.append(i)
        stages: dict[str, float] = {}
        if work:
            with torch.inference_mode():
                decoded, stages = self._decode([audios[i] for i in work], [options[i] for i in work])
            for i, t in zip(work, decoded):
                results[i] = t
        launched = Launched.done([r for r in results if r is not None])
        launched.stages = stages
        return launched

    def _item_error(self, audio: np.ndarray, option: ItemOptions) -> ItemError | None:
        tk = self.tokenizer
        assert tk is not None
        if option.language != "auto" and option.language not in tk.languages:
            return ItemError("bad_config", f"unknown language {option.language!r}; use auto or one of {', '.join(self.language_codes())}")
        if len(audio) > self.max_item_seconds * 16000 + 160:
            return ItemError("bad_audio", f"item is {len(audio) / 16000:.1f} s; whisper takes at most {self.max_item_seconds:g} s per item")
        if not np.isfinite(audio).all():
            return ItemError("bad_audio", "audio contains NaN or infinite samples")
        return None

    def _eot_interval(self) -> int:
        n = self.config.whisper.eot_check_interval
        return n if n > 0 else (8 if self.device.type == "cuda" else 1)

    def _decode(self, audios: Sequence[np.ndarray], options: Sequence[ItemOptions]) -> tuple[list[ItemResult], dict[str, float]]:
        """Results of a batch of valid, non-silent items, and the seconds of each stage.

        Every host->device copy is queued before the first kernel, from pinned memory on CUDA:
        a copy from pageable memory waits for the device to drain, so one built after the
        encoder is queued would stall the host for the encoder's whole run."""
        assert self.model is not None and self.tokenizer is not None and self.encoder is not None
        tk, model, cfg = self.tokenizer, self.model, self.config.whisper
        dev = self.device
        b = len(audios)
        clock = StageClock(dev)
        audio = self.logmel.pad_batch(audios)
        forced = torch.tensor([tk.languages[o.language] if o.language != "auto" else -1 for o in options], dtype=torch.long)
        if dev.type == "cuda":
            audio, forced = audio.pin_memory(), forced.pin_memory()
        clock.mark("start")
        audio = audio.to(dev, non_blocking=True)
        forced = forced.to(dev, non_blocking=True)
        mel = self.logmel(audio).to(self.dtype)
        clock.mark("features")
        enc = self.encoder(mel)
        cross = model.cross_kv(enc)
        clock.mark("encoder")

        # The prompt runs once per item, into a cache of its 4 positions that every search
        # (of however many rows per item) starts from.
        prompt_cache = model.new_cache(b, 4, self.dtype, dev)
        # Step 0: <|startoftranscript|>. Its logits give the no-speech probability and the language.
        sot = torch.full((b, 1), tk.sot, dtype=torch.long, device=dev)
        logits0 = model.decode(sot, 0, prompt_cache, cross)[:, 0]
        no_speech = logits0.softmax(-1)[:, tk.no_speech]
        detected = self._lang_ids[logits0[:, self._lang_ids].argmax(-1)]
        lang = torch.where(forced >= 0, forced, detected)
        # Non-finite scores (e.g. float16 overflow) make a row's text garbage: flag, don't sync.
        finite0 = torch.isfinite(logits0).all(-1)
        prompt = torch.stack(
            [lang, torch.full_like(lang, tk.transcribe), torch.full_like(lang, tk.no_timestamps)], dim=1
        )
        first = model.decode(prompt, 1, prompt_cache, cross)[:, -1]
        state = _Prompted(cross, prompt_cache, first)
        # Every per-item scalar, for one device->host copy after the first search (float32
        # holds language ids exactly).
        scalars = torch.stack([no_speech.float(), lang.float(), finite0.float()], dim=1)

        # Temperature fallback (finals only): each round decodes the items still failing.
        temperatures = cfg.temperatures
        attempts: list[list[_Attempt]] = [[] for _ in range(b)]
        pending = list(range(b))
        per_row: list[list[float]] | None = None
        for round_i, temperature in enumerate(temperatures):
            for k, kind, items in self._groups(pending, options, temperature):
                found = self._search(state, items, k, kind, temperature)
                for i, (cand, ok) in zip(items, found):
                    text = tk.decode(cand.tokens)
                    attempts[i].append(_Attempt(cand, text, _compression_ratio(text), ok, temperature))
            if per_row is None:
                per_row = scalars.cpu().tolist()
            if round_i + 1 == len(temperatures):
                break
            pending = [i for i in pending if not options[i].partial and self._needs_fallback(attempts[i][-1], per_row[i][0])]
            if not pending:
                break
        clock.mark("decoder")
        post_start = time.perf_counter()
        out: list[ItemResult] = []
        aligned: list[tuple[int, AlignItem]] = []
        assert per_row is not None
        for i, (nsp, lang_id, ok0) in enumerate(per_row):
            best = self._choose(attempts[i], nsp)
            if not (ok0 and best.finite):
                out.append(ItemError.non_finite(self.config.dtype))
                continue
            avg, text, ratio = best.candidate.avg_logprob, best.text, best.ratio
            likely_silent = nsp > cfg.no_speech_threshold
            if (
                (likely_silent and avg < cfg.logprob_threshold)  # Whisper's own no-speech rule
                or (likely_silent and ratio > cfg.compression_ratio_threshold)  # a loop invented on noise
                or nsp > cfg.no_speech_hard_threshold  # confident 'you' on hum or clicks
            ):
                text = ""
            fields = {"no_speech_prob": round(nsp, 4), "avg_logprob": round(avg, 4), "compression_ratio": round(ratio, 2),
                      "temperature": best.temperature, "tokens": best.candidate.tokens}
            words: list[Word] | None = [] if options[i].words else None
            out.append(Transcript(text, tk.language_of.get(int(lang_id)), fields, words))
            if options[i].words and text:
                aligned.append((i, AlignItem(i, int(lang_id), best.candidate.tokens, len(audios[i]))))
        postprocess = time.perf_counter() - post_start
        if aligned:
            # One more decoder pass over the chosen tokens, for the cross-attention of the
            # alignment heads (DTW, as openai-whisper times words): alignment.py.
            t0 = time.perf_counter()
            timed = align_words(model, tk, cross, [a for _, a in aligned], self._alignment_heads)
            for (i, _), words_i in zip(aligned, timed):
                result = out[i]
                assert isinstance(result, Transcript)
                result.words = words_i
            stages_extra = {"alignment": time.perf_counter() - t0}
        else:
            stages_extra = {}
        return out, {**clock.stages(), "postprocess": postprocess, **stages_extra}

    def sampler(self) -> torch.Generator:
        """The fallback sampler's generator, seeded with `whisper.sampling_seed` when made."""
        if self._generator is None:
            self._generator = torch.Generator(device=self.device)
            self._generator.manual_seed(self.config.whisper.sampling_seed)
        return self._generator

    def _groups(self, pending: list[int], options: Sequence[ItemOptions], temperature: float) -> list[tuple[int, str, list[int]]]:
        """The items of one fallback round, grouped by search: (rows per item, kind, items)."""
        cfg = self.config.whisper
        if temperature > 0:
            return [(cfg.best_of, "sample", pending)]
        by_width: dict[int, list[int]] = {}
        for i in pending:
            by_width.setdefault(cfg.partial_beam_size if options[i].partial else cfg.beam_size, []).append(i)
        return [(k, "beam" if k > 1 else "greedy", items) for k, items in sorted(by_width.items())]

    def _needs_fallback(self, a: "_Attempt", no_speech_prob: float) -> bool:
        """openai-whisper's and faster-whisper's rule: decode again when the text loops or is
        unlikely, unless the segment is likely silence (then the no-speech rule empties it)."""
        cfg = self.config.whisper
        if not a.finite:
            return False
        avg = a.candidate.avg_logprob
        if no_speech_prob > cfg.no_speech_threshold and avg < cfg.logprob_threshold:
            return False
        return a.ratio > cfg.compression_ratio_threshold or avg < cfg.logprob_threshold

    def _choose(self, attempts: list["_Attempt"], no_speech_prob: float) -> "_Attempt":
        """The last attempt when it passed (or was the only one); when every temperature failed,
        faster-whisper's choice: the highest average log-probability among attempts that do not
        loop (all attempts if every one loops)."""
        if len(attempts) == 1 or not self._needs_fallback(attempts[-1], no_speech_prob):
            return attempts[-1]
        finite = [a for a in attempts if a.finite] or attempts
        not_looping = [a for a in finite if a.ratio <= self.config.whisper.compression_ratio_threshold]
        return max(not_looping or finite, key=lambda a: a.candidate.avg_logprob)

    def _search(self, state: "_Prompted", items: list[int], k: int, kind: str, temperature: float) -> list[tuple[Candidate, bool]]:
        """Run one search over `items` of the batch with k rows per item; per item its best
        candidate and whether its scores stayed finite."""
        assert self.model is not None and self.tokenizer is not None
        model, tk, cfg, dev = self.model, self.tokenizer, self.config.whisper, self.device
        n, rows = len(items), len(items) * k
        whole = len(items) == state.first.shape[0]  # pending lists are ascending: whole = every item, in order
        if whole:
            cross, prompt_cache, first = state.cross, state.prompt_cache, state.first
        else:
            sel = torch.tensor(items, dtype=torch.long, device=dev)
            cross = ([c.index_select(0, sel) for c in state.cross[0]], [c.index_select(0, sel) for c in state.cross[1]])
            prompt_cache, first = state.prompt_cache.index_select(2, sel), state.first.index_select(0, sel)
        max_len = self._max_len()
        steps = self.steps.get(k)
        bucket = steps.bucket_for(n) if steps is not None else None
        if bucket is not None:
            assert steps is not None
            cache = steps.begin(bucket, cross, n)
        else:
            cache = model.new_cache(rows, max_len, self.dtype, dev)
        cache[:, :, :, :, :4].copy_(prompt_cache.repeat_interleave(k, dim=2) if k > 1 else prompt_cache)
        logits = first.repeat_interleave(k, dim=0) if k > 1 else first
        offset = 4
        budget = max_len - offset
        search: Search
        if kind == "beam":
            search = BeamSearch(n, k, budget, tk.eot, dev, patience=cfg.patience)
        else:
            search = RowSearch(n, k, budget, tk.eot, dev, temperature=temperature,
                               generator=self.sampler() if temperature > 0 else None)
        check_every = self._eot_interval()
        for step in range(budget):
            nxt, src = search.step(logits, self._suppress_begin if step == 0 else self._suppress)
            if offset + 1 > max_len - 1 or ((step + 1) % check_every == 0 and bool(search.all_done())):
                break
            if src is not None:
                # The new beams continue earlier rows: their cached keys/values follow them.
                filled = cache[:, :, :, :, :offset]
                filled.copy_(filled.index_select(2, src))
            if bucket is not None:
                assert steps is not None
                logits = steps.step(bucket, nxt, offset)
            else:
                logits = model.decode(nxt[:, None], offset, cache, cross)[:, -1]
            offset += 1
        return search.results(cfg.length_penalty)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(device_facts(self.device))
        info["asynchronous"] = self.asynchronous
        if self.model is not None:
            info["params_m"] = round(sum(p.numel() for p in self.model.parameters()) / 1e6, 1)
        return info

    def close(self) -> None:
        self.model = None
