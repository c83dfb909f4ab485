"""ParaformerRunner: offline Paraformer (paraformer-zh / Paraformer-large) with a batched frontend.

Per batch: one padded waveform tensor goes to the device, the frontend (fbank -> LFR -> CMVN,
server.features.fbank) runs there for all rows at once, ParaformerCore encodes and runs the CIF
predictor for the whole batch, the decoder runs over the batch's largest token count with
shorter rows masked, and one device->host copy brings back token ids, counts, CIF weights and
fires. Token-to-text (funasr's `sentence_postprocess`, so the text is what funasr writes) and
the token timestamps from the CIF fires (server.runners.paraformer.timestamps) run on the host.

Two device paths:
- eager (the default, and on CPU): encoder and CIF, one host read of the batch's largest token
  count, then the decoder over that many token slots;
- with `runner.graphs.enabled` on CUDA: `ParaformerCore.forward` through server.graphs' buckets
  (one captured graph per (batch, frames) bucket, under the graphs' memory budget): the decoder
  runs over every slot a row could fire (frames + 1), so nothing is read back mid-batch. This
  path is exercised on the CPU with the graph stand-in of the tests; it has not run on a GPU.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import numpy as np
import torch

from server.config import RunnerConfig
from server.features.fbank import BatchFrontend, FbankOptions, load_cmvn, pad_waveforms
from server.runners.base import ItemError, ItemOptions, ItemResult, Launched, ModelRunner, RunnerError, Transcript, Word
from server.graphs import BucketedRunner, BucketTable, GraphMode, InputSpec, buckets_up_to
from server.runners.device import (
    StageClock, device_facts, graph_backend_for, graph_budget_bytes, resolve_device, resolve_dtype,
)
from server.runners.paraformer.core import ParaformerCore
from server.runners.paraformer.model_dir import ParaformerFiles
from server.runners.paraformer.timestamps import token_times
from server.runners.sensevoice.model_dir import resolve_model_dir
from server.runners.sensevoice.runner import _load_state_dict

log = logging.getLogger(__name__)

# Paraformer's output languages: Mandarin with English words (paraformer-zh); "auto" = the model's.
LANGUAGES = frozenset({"auto", "zh", "en"})


def _build_model(files: ParaformerFiles, vocab_size: int, input_size: int) -> torch.nn.Module:
    """Paraformer from its config.yaml through funasr's registry (no hub, no AutoModel, whose
    loading is lenient about missing tensors and resets torch's thread count)."""
    import funasr.models.paraformer.model  # noqa: F401 - registers Paraformer and its parts
    from funasr.register import tables

    cfg = files.config
    model_class = tables.model_classes.get(cfg["model"])
    if model_class is None:
        raise RunnerError(f"funasr has no model class {cfg['model']!r}")
    conf = {k: v for k, v in (cfg.get("model_conf") or {}).items() if k not in ("vocab_size", "input_size")}
    try:
        return model_class(
            encoder=cfg.get("encoder"), encoder_conf=cfg.get("encoder_conf") or {},
            decoder=cfg.get("decoder"), decoder_conf=cfg.get("decoder_conf") or {},
            predictor=cfg.get("predictor"), predictor_conf=cfg.get("predictor_conf") or {},
            ctc_conf=cfg.get("ctc_conf") or {}, input_size=input_size, vocab_size=vocab_size, **conf,
        )
    except Exception as e:  # noqa: BLE001 - config values funasr cannot build from
        raise RunnerError(f"{files.root / 'config.yaml'}: funasr cannot build the model: {e}") from None


class ParaformerRunner(ModelRunner):
    """Paraformer (non-autoregressive, CIF predictor): Mandarin + English, token timestamps."""

    name = "paraformer"

    def __init__(self, config: RunnerConfig, max_batch_size: int | None = None, graph_backend: Any = None) -> None:
        super().__init__(config, max_batch_size, graph_backend)
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None
        self.frontend: BatchFrontend | None = None
        self.model: torch.nn.Module | None = None
        """funasr's Paraformer (its modules are shared with `core`)."""
        self.core: ParaformerCore | None = None
        self._graphed: BucketedRunner | None = None
        """The whole forward through captured graphs (graphs enabled on CUDA, or a stand-in
        backend); None: the eager two-stage path."""
        self._forward_mode = "eager"
        self.tokens: list[str] = []
        self._special: np.ndarray | None = None
        """Per token id: True for blank, <s> and </s>, which funasr drops from the output."""
        self._frame_s = 0.06
        self._num_params = 0

    # ------------------------------------------------------------------ loading

    def load(self) -> None:
        started = time.perf_counter()
        self.device = resolve_device(self.config)
        self.dtype = resolve_dtype(self.config, self.device)
        files = ParaformerFiles.from_dir(resolve_model_dir(self.config.model))
        self.tokens = files.token_list()
        opts = FbankOptions.from_frontend_conf(files.config.get("frontend_conf") or {})
        # funasr's timestamps assume LFR-6 frames of 10 ms (ts_prediction_lfr6_standard).
        self._frame_s = opts.frame_shift_ms * opts.lfr_n / 1000
        try:
            cmvn = load_cmvn(files.cmvn)
        except (OSError, ValueError) as e:
            raise RunnerError(f"{files.cmvn}: {e}") from None
        self.frontend = BatchFrontend(opts, cmvn).to(self.device)

        model = _build_model(files, vocab_size=len(self.tokens), input_size=opts.output_size)
        _load_state_dict(files, model)
        model.to(self.device, self.dtype).eval()
        self._num_params = sum(p.numel() for p in model.parameters())
        self.model = model
        special = np.zeros(len(self.tokens), dtype=bool)
        for tok_id in (getattr(model, "blank_id", 0), getattr(model, "sos", 1), getattr(model, "eos", 2)):
            if 0 <= tok_id < len(special):
                special[tok_id] = True
        self._special = special
        self.core = ParaformerCore(model).to(self.device).eval()
        backend = graph_backend_for(self.config, self.device, self.graph_backend)
        if backend is not None:
            g = self.config.graphs
            self._graphed = BucketedRunner(
                self.core,
                inputs=(InputSpec("feats", ("B", "T", opts.output_size), self.dtype, 0.0),
                        InputSpec("feat_lens", ("B",), torch.long, 0)),
                table=BucketTable(buckets_up_to(g.batch_buckets, self.max_batch_size), g.frame_buckets),
                device=self.device, mode=GraphMode.CUDA_GRAPHS, memory_budget_bytes=graph_budget_bytes(self.config),
                name="paraformer", backend=backend,
            )
            self._graphed.warmup()
            self._forward_mode = self._graphed.mode.value
        log.info(
            "paraformer: %s (%.1f M params, %d tokens) on %s/%s, %s forward, loaded in %.1f s",
            files.root, self._num_params / 1e6, len(self.tokens), self.device, self.config.dtype,
            self._forward_mode, time.perf_counter() - started,
        )
        if self.config.warmup:
            started = time.perf_counter()
            noise = (np.random.default_rng(0).standard_normal(16000) * 0.01).astype(np.float32)
            self.transcribe([noise], [ItemOptions()])
            log.info("paraformer warm-up took %.2f s", time.perf_counter() - started)

    # ------------------------------------------------------------------ inference

    def languages(self) -> frozenset[str] | None:
        return LANGUAGES

    @torch.inference_mode()
    def infer(self, audios: Sequence[np.ndarray], clock: StageClock | None = None) -> list[dict[str, Any]]:
        """Per item (each at least one 25 ms frame long): its token ids (blank, <s>, </s>
        dropped, as funasr does), the CIF weights and fires over its encoder frames + the tail
        frame (funasr's timestamp inputs), and whether the model's scores were finite."""
        if self.frontend is None or self.core is None:
            raise RunnerError("ParaformerRunner.load() has not been called")
        clock = clock or StageClock(self.device or torch.device("cpu"))
        waves, lengths = pad_waveforms(list(audios))
        clock.mark("start")
        waves = waves.to(self.device)
        lengths_d = lengths.to(self.device)
        feats, feat_lens = self.frontend(waves, lengths_d)
        clock.mark("features")
        core = self.core
        if self._graphed is not None:
            ids, token_num, finite, alphas, fires = self._graphed(feats.to(self.dtype), feat_lens)
        else:
            enc, hidden_tail, alphas, fires, fired, token_num, finite = core.encode(feats.to(self.dtype), feat_lens)
            # The one host read inside a batch: decode only as many token slots as it needs.
            most = int(token_num.max()) if len(audios) else 0
            if most > 0:
                ids, dec_finite = core.decode(enc, feat_lens, hidden_tail, alphas, fires, fired, token_num, most)
                finite = finite & dec_finite
            else:
                ids = torch.zeros(len(audios), 0, dtype=torch.long, device=enc.device)
        max_tokens = ids.shape[1]
        # One device->host copy: ids and counts as float32 (exact below 2^24), CIF weights, fires.
        packed = torch.cat([
            ids.float(), token_num[:, None].float(), feat_lens[:, None].float(),
            finite[:, None].float(), alphas.float(), fires.float(),
        ], dim=1).cpu().numpy()
        clock.mark("model")
        out = []
        tail = 1 if core.tail_threshold > 0.0 else 0
        width = alphas.shape[1]
        for row in packed:
            n = min(int(row[max_tokens]), max_tokens)
            frames = min(int(row[max_tokens + 1]) + tail, width)
            ids_row = row[:n].astype(np.int64)
            assert self._special is not None
            ids_row = ids_row[~self._special[ids_row]]
            base = max_tokens + 3
            out.append({
                "ids": ids_row,
                "finite": bool(row[max_tokens + 2]),
                "alphas": row[base: base + frames],
                "fires": row[base + width: base + width + frames],
            })
        return out

    def transcribe(self, audios: Sequence[np.ndarray], options: Sequence[ItemOptions]) -> list[ItemResult]:
        return self.launch(audios, options).result()

    def launch(self, audios: Sequence[np.ndarray], options: Sequence[ItemOptions]) -> Launched:
        if len(audios) != len(options):
            raise RunnerError(f"{len(audios)} audios but {len(options)} option sets")
        if self.frontend is None:
            raise RunnerError("ParaformerRunner.load() has not been called")
        min_samples = self.frontend.opts.frame_length
        results: list[ItemResult] = []
        live = []
        for i, (audio, option) in enumerate(zip(audios, options)):
            error = None
            if option.language not in LANGUAGES:
                error = ItemError("bad_config", f"paraformer does not know language {option.language!r}; "
                                                f"use one of {sorted(LANGUAGES)}")
            elif not np.isfinite(audio).all():
                error = ItemError("bad_audio", "audio contains NaN or infinite samples")
            results.append(error or Transcript(text="", language=None, fields={"tokens": []}, words=[] if option.words else None))
            # Shorter than one 25 ms frame: there is nothing to hear.
            if error is None and len(audio) >= min_samples:
                live.append(i)
        if not live:
            return Launched.done(results)
        clock = StageClock(self.device or torch.device("cpu"))
        rows = self.infer([audios[i] for i in live], clock)
        post_start = time.perf_counter()
        for i, row in zip(live, rows):
            if row["finite"]:
                results[i] = self._to_transcript(row, options[i], len(audios[i]))
            else:
                results[i] = ItemError.non_finite(self.config.dtype)
        launched = Launched.done(results)
        launched.stages = {**clock.stages(), "postprocess": time.perf_counter() - post_start}
        return launched

    def _to_transcript(self, row: dict[str, Any], option: ItemOptions, num_samples: int) -> Transcript:
        from funasr.utils.postprocess_utils import sentence_postprocess

        token_ids = row["ids"].tolist()
        tokens = [self.tokens[t] for t in token_ids]
        # funasr's own text rules (CJK characters joined, English words spaced, "@@" pieces
        # merged, <unk> dropped): the text is what funasr gives for these tokens.
        text = sentence_postprocess(tokens)[0] if tokens else ""
        words: list[Word] | None = None
        fields: dict[str, Any] = {"tokens": token_ids}
        if option.words:
            words = []
            if tokens:
                stamps = token_times(row["fires"], row["alphas"], len(tokens), self._frame_s)
                _, stamps, pieces = sentence_postprocess(tokens, stamps)
                # funasr's `timestamp` as it gives it (its last token may end in the tail frame,
                # past the audio); the words below are clipped to the item.
                fields["timestamp"] = stamps
                duration_ms = num_samples * 1000 // self.sample_rate
                if len(pieces) == len(stamps) and "".join(pieces) == "".join(text.split()):
                    words = [Word(w, min(max(int(s), 0), duration_ms), min(max(int(e), int(s), 0), duration_ms))
                             for w, (s, e) in zip(pieces, stamps)]
                else:
                    # funasr's rules dropped or merged tokens the times were not merged with.
                    log.debug("paraformer: %d words for %d times; giving no timings", len(pieces), len(stamps))
                    words = None
        return Transcript(text=text, language=None, fields=fields, words=words)

    # ------------------------------------------------------------------ facts

    def describe(self) -> dict[str, Any]:
        facts = super().describe()
        facts.update({"params_m": round(self._num_params / 1e6, 1), "forward": self._forward_mode,
                      "vocab": len(self.tokens), "asynchronous": self.asynchronous})
        if self.device is not None:
            facts.update(device_facts(self.device))
        return facts

    def close(self) -> None:
        self.model = None
        self.core = None
        self._graphed = None
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.empty_cache()
