"""The contract between the micro-batcher and a model.

A runner owns one model on one device. It is called from exactly one thread (the
batcher's worker), so it needs no locks. It never sees sockets or sessions: it gets
float32 16 kHz mono arrays and per-item options and returns one Transcript per item,
in order.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence, Union

import numpy as np

from server.config import RunnerConfig

SAMPLE_RATE = 16000


@dataclass(frozen=True)
class ItemOptions:
    """What a client may choose per utterance."""

    language: str = "auto"
    """`auto` to detect, or an ISO-639-1 code such as `en`, `zh`."""
    itn: bool | None = None
    """Inverse text normalisation (SenseVoice); None = the runner's configured default."""
    partial: bool = False
    """The item is a partial (replaced later by its segment's final): runners may decode it
    more cheaply (whisper: greedy instead of beam search)."""
    words: bool = True
    """Compute word (or token) timings for this item (Transcript.words)."""


@dataclass(frozen=True)
class Word:
    """One word of a transcript and where it was spoken, in ms from the item's first sample.

    `word` is written as in the text, without surrounding spaces; joined (with the spaces the
    language writes) the words of a transcript give its text. For languages written without
    spaces a "word" is a token (a character or a few)."""

    word: str
    start_ms: int
    end_ms: int


@dataclass
class Transcript:
    """One item's result."""

    text: str
    """The recognised text, stripped; empty for silence or noise."""
    language: str | None = None
    """Language code that was detected or forced; None if the model does not say."""
    fields: dict[str, Any] = field(default_factory=dict)
    """Model-specific extras: whisper: no_speech_prob, avg_logprob, tokens;
    sensevoice: emotion, event, raw_text, tokens."""
    words: list[Word] | None = None
    """Word timings, monotonic and inside the item; None when not asked for
    (ItemOptions.words False) or when the runner cannot give them; [] for empty text."""


class RunnerError(RuntimeError):
    """A model cannot be loaded or run; the message says what to do about it."""


class ItemError(RunnerError):
    """One item of a batch cannot be recognised (bad options, unusable audio, non-finite model
    output). A runner returns it in that item's place in the results, so the other items of
    the batch still get their text: a bad item fails alone, never its batch."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        """Machine-readable reason, sent to the client as the error code (e.g. `bad_config`)."""

    @classmethod
    def non_finite(cls, dtype: str) -> "ItemError":
        """The model's scores for the item came out NaN or infinite."""
        return cls("model_output", f"the model gave non-finite scores for this item (runner.dtype={dtype}); "
                   "float16 can overflow: use bfloat16 or float32")


ItemResult = Union[Transcript, ItemError]


class Launched:
    """A batch whose device work has been queued: `result()` waits for it (one device sync)
    and does the host-side post-processing. Call `result()` exactly once."""

    def __init__(self, finish: Callable[[], list[ItemResult]]) -> None:
        self._finish = finish
        self.stages: dict[str, float] = {}
        """Seconds this batch spent per stage (e.g. features, model, decode), filled in by
        `result()` where the runner measures them; exported as chorus_stage_seconds."""

    @classmethod
    def done(cls, results: list[ItemResult]) -> "Launched":
        return cls(lambda: results)

    def result(self) -> list[ItemResult]:
        """One entry per item, in order: its Transcript, or the ItemError that item alone failed with."""
        return self._finish()


class ModelRunner(abc.ABC):
    """Base of every model family's runner."""

    name: ClassVar[str]
    sample_rate: ClassVar[int] = SAMPLE_RATE
    max_item_seconds: ClassVar[float] = float("inf")
    """Longest single item the model accepts; the endpointer cuts segments below it."""

    def __init__(self, config: RunnerConfig, max_batch_size: int | None = None, graph_backend: Any = None) -> None:
        self.config = config
        self.max_batch_size = max_batch_size
        """Most items the batcher sends in one call (None = unknown): graph buckets and static
        buffers beyond the bucket that holds it are not allocated."""
        self.graph_backend = graph_backend
        """A `server.graphs.GraphBackend` to capture with instead of the device's own (tests run
        the captured path on a CPU with a stand-in); used only when `config.graphs.enabled`."""
        self.asynchronous = False
        """True when `launch` returns while the device still works (CUDA), so the batcher can
        prepare and queue the next batch before collecting this one. Set by `load`."""

    @abc.abstractmethod
    def load(self) -> None:
        """Read weights, move to the configured device and dtype, warm up if configured."""

    def enter_worker_thread(self) -> None:
        """Called by the batcher's worker thread before its first model call. torch's CPU thread
        count (`runner.num_threads`) holds per OS thread: set where `load` ran, it did not reach
        the thread that runs every served call."""
        if self.config.num_threads > 0:
            import torch  # torch-based runners only ask for it; the base stays importable without

            torch.set_num_threads(self.config.num_threads)

    @abc.abstractmethod
    def transcribe(self, audios: Sequence[np.ndarray], options: Sequence[ItemOptions]) -> list[ItemResult]:
        """Recognise a batch of float32 mono 16 kHz arrays of any lengths; one result per item:
        a Transcript, or an ItemError for an item that fails alone. Raising fails the whole
        batch and is for faults of the model or device, never for one item's content."""

    def languages(self) -> frozenset[str] | None:
        """Language codes an item may ask for, "auto" included; None if any code is accepted.
        Valid after `load()`. Sessions are refused at `start` with a language outside this set,
        so an unsupported language never reaches a batch."""
        return None

    def launch(self, audios: Sequence[np.ndarray], options: Sequence[ItemOptions]) -> Launched:
        """Queue a batch's device work and return without waiting for it, where the device
        allows. The default runs `transcribe` now; runners with a one-sync-per-batch device
        path override it (and set `asynchronous` on CUDA)."""
        return Launched.done(self.transcribe(audios, options))

    def describe(self) -> dict[str, Any]:
        """Facts for logs, /healthz and `chorus doctor`."""
        return {"runner": self.name, "model": self.config.model, "device": self.config.device, "dtype": self.config.dtype}

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release device memory; the default does nothing."""
