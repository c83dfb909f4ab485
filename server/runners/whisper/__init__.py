"""WhisperRunner: batched greedy Whisper decoding over items of different lengths."""

from __future__ import annotations

import logging
import time
import zlib
from typing import Any, Sequence

import numpy as np
import torch

from server.config import RunnerConfig
from server.features.logmel import LogMel
from server.graphs import BucketedRunner, BucketTable, GraphBackend, GraphMode, InputSpec, buckets_up_to
from server.runners.base import ItemError, ItemOptions, ItemResult, Launched, ModelRunner, RunnerError, Transcript
from server.runners.device import (
    StageClock, device_facts, graph_backend_for, graph_budget_bytes, resolve_device, resolve_dtype,
)
from server.runners.whisper import assets
from server.runners.whisper.ct2 import read_ct2
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
        self.steps: StaticDecoderSteps | None = None  # decoder step graphs on GPU with graphs

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
        self.logmel = LogMel(model.dims.n_mels).to(self.device)
        backend = graph_backend_for(self.config, self.device, self.graph_backend)
        # One graph memory budget for the encoder's graphs and the decoder's step buffers.
        budget = graph_budget_bytes(self.config)
        self.encoder = self._make_encoder(backend, budget)
        if budget and self.encoder_graphs is not None:
            budget = max(1, budget - self.encoder_graphs.stats["graph_memory_bytes"])
        self.steps = self._make_steps(static=backend is not None, backend=backend, budget=budget)
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

    def _make_steps(self, static: bool, backend: GraphBackend | None = None, budget: int = 0) -> StaticDecoderSteps | None:
        """Static-buffer decoder steps (captured graphs with a backend); None = the plain eager
        decoder.

        `static=True` without a backend runs the same buffers without capture: the reference
        the tests hold the graph path to."""
        if not static:
            return None
        assert self.model is not None
        steps = StaticDecoderSteps(self.model, self._batch_buckets(), self._max_len(), self.dtype,
                                   self.device, backend=backend, memory_budget_bytes=budget)
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
        """Runs the batch to completion: greedy decoding is host-driven (the loop ends when
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
        max_len = self._max_len()
        bucket = self.steps.bucket_for(b) if self.steps is not None else None
        if bucket is not None:
            cache = self.steps.begin(bucket, cross, b)
        else:
            cache = model.new_cache(b, max_len, self.dtype, dev)

        # Step 0: <|startoftranscript|>. Its logits give the no-speech probability and the language.
        sot = torch.full((b, 1), tk.sot, dtype=torch.long, device=dev)
        logits0 = model.decode(sot, 0, cache, cross)[:, 0]
        no_speech = logits0.softmax(-1)[:, tk.no_speech]
        detected = self._lang_ids[logits0[:, self._lang_ids].argmax(-1)]
        lang = torch.where(forced >= 0, forced, detected)
        # Non-finite scores (e.g. float16 overflow) make a row's text garbage: flag, don't sync.
        finite = torch.isfinite(logits0).all(-1)

        prompt = torch.stack(
            [lang, torch.full_like(lang, tk.transcribe), torch.full_like(lang, tk.no_timestamps)], dim=1
        )
        logits = model.decode(prompt, 1, cache, cross)[:, -1]
        offset = 4
        tokens = torch.zeros((b, 0), dtype=torch.long, device=dev)
        finished = torch.zeros(b, dtype=torch.bool, device=dev)
        sum_logprob = torch.zeros(b, dtype=torch.float32, device=dev)
        n_tokens = torch.zeros(b, dtype=torch.long, device=dev)
        check_every = self._eot_interval()
        for step in range(max_len - offset):
            finite &= torch.isfinite(logits).all(-1) | finished
            mask = self._suppress_begin if step == 0 else self._suppress
            logits = logits.masked_fill(mask, float("-inf"))
            logprobs = logits.log_softmax(-1)
            nxt = logits.argmax(-1)
            nxt = torch.where(finished, torch.full_like(nxt, tk.eot), nxt)
            lp = logprobs.gather(1, nxt[:, None])[:, 0]
            sum_logprob += torch.where(finished, torch.zeros_like(lp), lp)
            now_done = nxt == tk.eot
            n_tokens += (~finished & ~now_done).long()
            finished |= now_done
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            if offset + 1 > max_len - 1 or ((step + 1) % check_every == 0 and bool(finished.all())):
                break
            if bucket is not None:
                logits = self.steps.step(bucket, nxt, offset)
            else:
                logits = model.decode(nxt[:, None], offset, cache, cross)[:, -1]
            offset += 1

        # Two device->host copies per batch: the tokens, and every per-row scalar stacked
        # (float32 holds the token counts and language ids exactly: all are below 2**24).
        scalars = torch.stack([no_speech.float(), sum_logprob, n_tokens.float(), lang.float(), finite.float()], dim=1)
        toks = tokens.cpu().tolist()
        per_row = scalars.cpu().tolist()
        clock.mark("decoder")
        post_start = time.perf_counter()
        out: list[ItemResult] = []
        for row, (nsp, lp_sum, n, lang_id, row_finite) in zip(toks, per_row):
            if not row_finite:
                out.append(ItemError.non_finite(self.config.dtype))
                continue
            n, lang_id = int(n), int(lang_id)
            ids = row[: row.index(tk.eot)] if tk.eot in row else row
            avg = lp_sum / (n + 1)
            text = tk.decode(ids)
            ratio = _compression_ratio(text)
            likely_silent = nsp > cfg.no_speech_threshold
            if (
                (likely_silent and avg < cfg.logprob_threshold)  # Whisper's own no-speech rule
                or (likely_silent and ratio > cfg.compression_ratio_threshold)  # a loop invented on noise
                or nsp > cfg.no_speech_hard_threshold  # confident 'you' on hum or clicks
            ):
                text = ""
            out.append(Transcript(text, tk.language_of.get(lang_id), {"no_speech_prob": round(nsp, 4), "avg_logprob": round(avg, 4), "compression_ratio": round(ratio, 2), "tokens": ids}))
        return out, {**clock.stages(), "postprocess": time.perf_counter() - post_start}

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(device_facts(self.device))
        info["asynchronous"] = self.asynchronous
        if self.model is not None:
            info["params_m"] = round(sum(p.numel() for p in self.model.parameters()) / 1e6, 1)
        return info

    def close(self) -> None:
        self.model = None
