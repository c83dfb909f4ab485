"""SenseVoiceRunner: SenseVoiceSmall through funasr's modules with a batched torch frontend.

Per batch: one padded waveform tensor goes to the device, the frontend (fbank -> LFR ->
CMVN) runs there for all rows at once, SenseVoiceCore runs (bucketed / CUDA graphs from
server.graphs), one device->host copy brings back argmax ids and lengths, and the CTC
collapse and sentencepiece decoding happen on the CPU per row. `launch` queues all device
work and returns; `Launched.result()` does the batch's single device sync and the host side.

Word timings (ItemOptions.words): computed on the host from the per-frame argmax ids that the
batch's one device->host copy already brings back (server.runners.sensevoice.timing): the CTC
runs (where each token is the argmax) as a vectorised run-length encoding, then words from the
pieces. That adds no device work, no copy and no sync; the device computes nothing extra.
Resolution: one encoder frame, frame_shift_ms * lfr_n = 60 ms for SenseVoiceSmall.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch

from server.config import RunnerConfig
from server.features.fbank import BatchFrontend, FbankOptions, load_cmvn, pad_waveforms
from server.graphs import BucketedRunner, BucketTable, GraphMode, InputSpec, buckets_up_to
from server.runners.base import (
    ItemError, ItemOptions, ItemResult, Launched, ModelRunner, RunnerError, Transcript, Word,
)
from server.runners.device import (
    StageClock, device_facts, graph_backend_for, graph_budget_bytes, resolve_device, resolve_dtype,
)
from server.runners.sensevoice.core import NUM_QUERY_FRAMES, SenseVoiceCore
from server.runners.sensevoice.model_dir import ModelFiles, resolve_model_dir
from server.runners.sensevoice.timing import PieceTable, agrees, item_words

log = logging.getLogger(__name__)

# SenseVoice's query vocabulary (funasr SenseVoiceSmall.lid_dict / textnorm_dict).
LANGUAGE_IDS = {"auto": 0, "zh": 3, "en": 4, "yue": 7, "ja": 11, "ko": 12, "nospeech": 13}
TEXTNORM_IDS = {"withitn": 14, "woitn": 15}
BLANK_ID = 0

_TAG = re.compile(r"<\|([^|]*)\|>")
_EMOTIONS = {"HAPPY", "SAD", "ANGRY", "NEUTRAL", "FEARFUL", "DISGUSTED", "SURPRISED", "EMO_UNKNOWN"}
_EVENTS = {"Speech", "BGM", "Applause", "Laughter", "Cry", "Sneeze", "Breath", "Cough", "Event_UNK"}
_LANG_TAGS = set(LANGUAGE_IDS) - {"auto"}


def parse_rich_text(raw: str) -> tuple[str, dict[str, str | None]]:
    """Split SenseVoice output such as ``<|en|><|NEUTRAL|><|Speech|><|woitn|>hello`` into
    plain text and its tags (language, emotion, event, itn)."""
    tags: dict[str, str | None] = {"language": None, "emotion": None, "event": None, "itn": None}
    for name in _TAG.findall(raw):
        if name in _LANG_TAGS and tags["language"] is None:
            tags["language"] = name
        elif name in _EMOTIONS and tags["emotion"] is None:
            tags["emotion"] = name
        elif name in _EVENTS and tags["event"] is None:
            tags["event"] = name
        elif name in TEXTNORM_IDS and tags["itn"] is None:
            tags["itn"] = name
    text = re.sub(r"\s+", " ", _TAG.sub("", raw)).strip()
    return text, tags


def ctc_collapse(ids: np.ndarray, blank: int = BLANK_ID) -> np.ndarray:
    """Greedy CTC: merge repeats, then drop blanks."""
    if ids.size == 0:
        return ids
    keep = np.empty(ids.shape, dtype=bool)
    keep[0] = True
    np.not_equal(ids[1:], ids[:-1], out=keep[1:])
    keep &= ids != blank
    return ids[keep]


def _load_state_dict(files: ModelFiles, model: torch.nn.Module) -> None:
    """Load model.pt strictly: funasr skips missing or mis-shaped tensors with a log line."""
    try:
        state = torch.load(files.weights, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip and torch errors all mean "unreadable"
        raise RunnerError(
            f"{files.weights} is not a readable torch checkpoint ({type(e).__name__}: {e}); "
            "it is probably corrupt or a partial download: download it again"
        ) from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise RunnerError(f"{files.weights} holds a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise RunnerError(
            f"{files.weights} lacks {len(missing)} of the model's {len(expected)} tensors "
            f"(e.g. {missing[:3]}): it does not belong to this config.yaml"
        )
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        k, got, want = wrong[0]
        raise RunnerError(
            f"{files.weights}: {len(wrong)} tensors have the wrong shape (e.g. {k}: {got}, config says {want}); "
            "model.pt, config.yaml and the BPE model must come from the same directory"
        )
    unexpected = sorted(set(state) - set(expected))
    if unexpected:
        log.warning("%s: ignoring %d unexpected tensors (e.g. %s)", files.weights, len(unexpected), unexpected[:3])
    model.load_state_dict({k: state[k] for k in expected}, strict=True)


def _build_model(files: ModelFiles, vocab_size: int, input_size: int) -> torch.nn.Module:
    """SenseVoiceSmall from its config.yaml through funasr's registry (no hub, no AutoModel:
    AutoModel also resets torch's thread count and would load weights leniently)."""
    import funasr.models.sense_voice.model  # noqa: F401 - registers SenseVoiceSmall and its encoder
    from funasr.register import tables

    cfg = files.config
    model_class = tables.model_classes.get(cfg["model"])
    if model_class is None:
        raise RunnerError(f"funasr has no model class {cfg['model']!r}")
    conf = {k: v for k, v in (cfg.get("model_conf") or {}).items() if k not in ("vocab_size", "input_size")}
    try:
        return model_class(
            encoder=cfg.get("encoder", "SenseVoiceEncoderSmall"),
            encoder_conf=cfg.get("encoder_conf") or {},
            ctc_conf=cfg.get("ctc_conf") or {},
            input_size=input_size,
            vocab_size=vocab_size,
            **conf,
        )
    except Exception as e:  # noqa: BLE001 - config values funasr cannot build from
        raise RunnerError(f"{files.root / 'config.yaml'}: funasr cannot build the model: {e}") from None


class SenseVoiceRunner(ModelRunner):
    """SenseVoiceSmall (zh/en/yue/ja/ko + emotion and audio-event tags), CTC, non-autoregressive."""

    name = "sensevoice"

    def __init__(self, config: RunnerConfig, max_batch_size: int | None = None, graph_backend: Any = None) -> None:
        super().__init__(config, max_batch_size, graph_backend)
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None
        self.frontend: BatchFrontend | None = None
        self.model: torch.nn.Module | None = None
        """funasr's SenseVoiceSmall (its modules are shared with `core`)."""
        self.core: SenseVoiceCore | None = None
        self._forward: BucketedRunner | None = None
        self._sp: Any = None
        self._pieces: PieceTable | None = None
        self._frame_ms = 0.0
        """Milliseconds per encoder output frame: fbank shift x LFR stride (the encoder keeps
        the LFR rate: out_len = feat_len + NUM_QUERY_FRAMES)."""
        self._graph_mode = "eager"
        self._num_params = 0

    # ------------------------------------------------------------------ loading

    def load(self) -> None:
        started = time.perf_counter()
        self.device = resolve_device(self.config)
        self.dtype = resolve_dtype(self.config, self.device)
        files = ModelFiles.from_dir(resolve_model_dir(self.config.model))

        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(files.bpe_model))
        except Exception as e:  # noqa: BLE001
            raise RunnerError(f"{files.bpe_model} is not a sentencepiece model: {e}") from None
        self._pieces = PieceTable.from_sentencepiece(self._sp, _TAG)

        opts = FbankOptions.from_frontend_conf(files.config.get("frontend_conf") or {})
        self._frame_ms = opts.frame_shift_ms * opts.lfr_n
        try:
            cmvn = load_cmvn(files.cmvn)
        except (OSError, ValueError) as e:
            raise RunnerError(f"{files.cmvn}: {e}") from None
        self.frontend = BatchFrontend(opts, cmvn).to(self.device)

        model = _build_model(files, vocab_size=self._sp.get_piece_size(), input_size=opts.output_size)
        _load_state_dict(files, model)
        model.to(self.device, self.dtype).eval()
        self._num_params = sum(p.numel() for p in model.parameters())
        self.model = model
        # The core's own buffers (positions, query ids) must sit with the weights: moved here
        # as a whole, whatever device its constructor saw.
        self.core = SenseVoiceCore(model).to(self.device).eval()
        self._forward = self._route_through_graphs(self.core, opts.output_size)
        # One sync per batch and nothing on the host between launch and result: on CUDA the
        # batcher may queue the next batch before collecting this one.
        self.asynchronous = self.device.type == "cuda"
        log.info(
            "sensevoice: %s (%.1f M params) on %s/%s, %s forward, loaded in %.1f s",
            files.root, self._num_params / 1e6, self.device, self.config.dtype, self._graph_mode,
            time.perf_counter() - started,
        )
        if self.config.warmup:
            self._warmup()

    def _route_through_graphs(self, core: SenseVoiceCore, feat_dim: int) -> BucketedRunner:
        """BucketedRunner from server.graphs (eager on CPU, CUDA graphs on GPU when enabled)."""
        g = self.config.graphs
        assert self.device is not None and self.dtype is not None
        backend = graph_backend_for(self.config, self.device, self.graph_backend)
        runner = BucketedRunner(
            core,
            inputs=(
                InputSpec("feats", ("B", "T", feat_dim), self.dtype, 0.0),
                InputSpec("feat_lens", ("B",), torch.long, 0),
                InputSpec("lang_ids", ("B",), torch.long, 0),
                InputSpec("textnorm_ids", ("B",), torch.long, 0),
            ),
            table=BucketTable(buckets_up_to(g.batch_buckets, self.max_batch_size), g.frame_buckets),
            device=self.device,
            mode=GraphMode.CUDA_GRAPHS if backend is not None else GraphMode.EAGER,
            memory_budget_bytes=graph_budget_bytes(self.config),
            name="sensevoice",
            backend=backend,
        )
        runner.warmup()
        self._graph_mode = runner.mode.value
        return runner

    def _warmup(self) -> None:
        started = time.perf_counter()
        noise = (np.random.default_rng(0).standard_normal(16000) * 0.01).astype(np.float32)
        self.transcribe([noise], [ItemOptions()])
        log.info("sensevoice warm-up took %.2f s", time.perf_counter() - started)

    # ------------------------------------------------------------------ inference

    def languages(self) -> frozenset[str] | None:
        return frozenset(LANGUAGE_IDS)

    def _item_error(self, audio: np.ndarray, option: ItemOptions) -> ItemError | None:
        if option.language not in LANGUAGE_IDS:
            return ItemError("bad_config", f"sensevoice does not know language {option.language!r}; use one of {sorted(LANGUAGE_IDS)}")
        if not np.isfinite(audio).all():
            return ItemError("bad_audio", "audio contains NaN or infinite samples")
        return None

    def _textnorm_id(self, option: ItemOptions) -> int:
        itn = self.config.sensevoice.use_itn if option.itn is None else option.itn
        return TEXTNORM_IDS["withitn" if itn else "woitn"]

    @torch.inference_mode()
    def _launch_ids(
        self, audios: Sequence[np.ndarray], lang_ids: Sequence[int], textnorm_ids: Sequence[int], clock: StageClock
    ) -> Callable[[], list[tuple[np.ndarray, bool]]]:
        """Queue one batch on the device; the returned function waits for it (the batch's one
        device sync) and gives, per item, its per-frame CTC argmax ids over its valid output
        frames (the NUM_QUERY_FRAMES query frames first, uncollapsed) and whether the model's
        scores were finite. Items must be at least one frame long.

        The host->device copies come first, from pinned memory on CUDA, and nothing between
        them and the device->host copy at the end reads the device."""
        if self.frontend is None or self._forward is None:
            raise RunnerError("SenseVoiceRunner.load() has not been called")
        waves, lengths = pad_waveforms(list(audios))
        # Two host->device copies per batch: the waveforms, and lengths + query ids together.
        meta = torch.stack([lengths, torch.tensor(list(lang_ids)), torch.tensor(list(textnorm_ids))])
        cuda = self.device is not None and self.device.type == "cuda"
        if cuda:
            # Pinned sources make the copies truly asynchronous; the caching host allocator
            # keeps the buffers alive until the copies are done.
            waves, meta = waves.pin_memory(), meta.pin_memory()
        clock.mark("start")
        waves = waves.to(self.device, non_blocking=True)
        lengths_d, lang, norm = meta.to(self.device, non_blocking=True).unbind(0)
        feats, feat_lens = self.frontend(waves, lengths_d)
        clock.mark("features")
        ids, out_lens, finite = self._forward(feats.to(self.dtype), feat_lens, lang, norm)
        # One device->host copy for the whole batch: ids, then the length and the finite flag
        # as two last columns, queued now into pinned memory on CUDA.
        n = len(audios)
        packed = torch.cat([ids[:n], out_lens[:n, None].to(ids.dtype), finite[:n, None].to(ids.dtype)], dim=1)
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=cuda)
        host.copy_(packed, non_blocking=True)
        clock.mark("model")
        done = torch.cuda.Event() if cuda else None
        if done is not None:
            done.record()

        def wait() -> list[tuple[np.ndarray, bool]]:
            if done is not None:
                done.synchronize()
            rows = host.numpy()
            return [(row[: int(row[-2])], bool(row[-1])) for row in rows]

        return wait

    def infer_ids(self, audios: Sequence[np.ndarray], lang_ids: Sequence[int], textnorm_ids: Sequence[int]) -> list[np.ndarray]:
        """Collapsed CTC token ids per item, synchronously (tests compare them with funasr's)."""
        rows = self._launch_ids(audios, lang_ids, textnorm_ids, StageClock(self.device or torch.device("cpu")))()
        return [ctc_collapse(frames) for frames, _ in rows]

    def transcribe(self, audios: Sequence[np.ndarray], options: Sequence[ItemOptions]) -> list[ItemResult]:
        return self.launch(audios, options).result()

    def launch(self, audios: Sequence[np.ndarray], options: Sequence[ItemOptions]) -> Launched:
        if len(audios) != len(options):
            raise RunnerError(f"{len(audios)} audios but {len(options)} option sets")
        if self.frontend is None:
            raise RunnerError("SenseVoiceRunner.load() has not been called")
        min_samples = self.frontend.opts.frame_length
        results: list[ItemResult] = []
        live = []
        for i, (audio, option) in enumerate(zip(audios, options)):
            # A bad item gets its own error and never reaches the model with the others.
            error = self._item_error(audio, option)
            results.append(error or Transcript(text="", language=None, fields={"emotion": None, "event": None, "raw_text": "", "tokens": []},
                                               words=[] if option.words else None))
            # Shorter than one 25 ms frame: funasr would shrink the window; there is nothing to hear.
            if error is None and len(audio) >= min_samples:
                live.append(i)
        if not live:
            return Launched.done(results)
        clock = StageClock(self.device or torch.device("cpu"))
        wait = self._launch_ids(
            [audios[i] for i in live],
            [LANGUAGE_IDS[options[i].language] for i in live],
            [self._textnorm_id(options[i]) for i in live],
            clock,
        )

        def finish() -> list[ItemResult]:
            rows = wait()
            post_start = time.perf_counter()
            for i, (frames, finite) in zip(live, rows):
                if finite:
                    results[i] = self._to_transcript(frames, options[i], len(audios[i]))
                else:
                    results[i] = ItemError.non_finite(self.config.dtype)
            launched.stages = {**clock.stages(), "postprocess": time.perf_counter() - post_start}
            return results

        launched = Launched(finish)
        return launched

    def _to_transcript(self, frames: np.ndarray, option: ItemOptions, num_samples: int) -> Transcript:
        """One item's result from its per-frame argmax ids (query frames first)."""
        words: list[Word] | None = None
        if option.words:
            assert self._pieces is not None
            tokens, words = item_words(
                frames, self._pieces, blank=BLANK_ID, frame_ms=self._frame_ms,
                duration_ms=num_samples * 1000 // self.sample_rate, query_frames=NUM_QUERY_FRAMES,
            )
        else:
            tokens = ctc_collapse(frames)
        token_list = tokens.tolist()
        raw = self._sp.decode(token_list)
        text, tags = parse_rich_text(raw)
        if words is not None and not agrees(words, text):
            # Text the pieces cannot reproduce (e.g. a "<|...|>" spelled by several pieces,
            # which parse_rich_text removes): no timings rather than wrong ones.
            log.debug("sensevoice: words %r do not spell the text %r; giving no timings", words, text)
            words = [] if not text else None
        forced = option.language if option.language not in ("auto", "nospeech") else None
        detected = tags["language"] if tags["language"] != "nospeech" else None
        return Transcript(
            text=text,
            language=detected or forced,
            fields={"emotion": tags["emotion"], "event": tags["event"], "raw_text": raw, "tokens": token_list,
                    "nospeech": tags["language"] == "nospeech"},
            words=words,
        )

    # ------------------------------------------------------------------ facts

    def describe(self) -> dict[str, Any]:
        facts = super().describe()
        facts.update({"params_m": round(self._num_params / 1e6, 1), "forward": self._graph_mode,
                      "query_frames": NUM_QUERY_FRAMES, "asynchronous": self.asynchronous})
        if self.device is not None:
            facts.update(device_facts(self.device))
        return facts

    def close(self) -> None:
        self.model = None
        self.core = None
        self._forward = None
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.empty_cache()
