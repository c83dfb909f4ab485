"""The contract between the micro-batcher and a model.

A runner owns one model on one device. It is called from exactly one thread (the
batcher's worker), so it needs no locks. It never sees sockets or sessions: it gets
float32 16 kHz mono arrays and per-item options and returns one Transcript per item,
in order.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

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


class RunnerError(RuntimeError):
    """A model cannot be loaded or run; the message says what to do about it."""


class Launched:
    """A batch whose device work has been queued: `result()` waits for it (one device sync)
    and does the host-side post-processing. Call `result()` exactly once."""

    def __init__(self, finish: Callable[[], list[Transcript]]) -> None:
        self._finish = finish
        self.stages: dict[str, float] = {}
        """Seconds this batch spent per stage (e.g. features, model, decode), filled in by
        `result()` where the runner measures them; exported as chorus_stage_seconds."""

    @classmethod
    def done(cls, results: list[Transcript]) -> "Launched":
        return cls(lambda: results)

    def result(self) -> list[Transcript]:
        return self._finish()


class ModelRunner(abc.ABC):
    """Base of every model family's runner."""

    name: ClassVar[str]
    sample_rate: ClassVar[int] = SAMPLE_RATE
    max_item_seconds: ClassVar[float] = float("inf")
    """Longest single item the model accepts; the endpointer cuts segments below it."""

    def __init__(self, config: RunnerConfig) -> None:
        self.config = config
        self.asynchronous = False
        """True when `launch` returns while the device still works (CUDA), so the batcher can
        prepare and queue the next batch before collecting this one. Set by `load`."""

    @abc.abstractmethod
    def load(self) -> None:
        """Read weights, move to the configured device and dtype, warm up if configured."""

    @abc.abstractmethod
    def transcribe(self, audios: Sequence[np.ndarray], options: Sequence[ItemOptions]) -> list[Transcript]:
        """Recognise a batch of float32 mono 16 kHz arrays of any lengths; one result per item."""

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
