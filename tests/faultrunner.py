"""A real runner with faults injected on demand, for tests of the server's failure handling.

Wraps the loaded Whisper runner: every call goes to the real model unless a fault is
switched on (from the test thread, while the server runs): a delay per call, an
exception for every call, an out-of-memory for batches over a size, or a hang until
released. Not part of the server package: test material only.
"""

from __future__ import annotations

import threading
import time
from typing import Sequence

import numpy as np

from server.runners.base import ItemOptions, ItemResult, ModelRunner, Transcript


class OutOfMemoryError(RuntimeError):
    """Named like torch's: the batcher recognises out-of-memory by the type's name."""


class FaultyRunner(ModelRunner):
    name = "faulty"

    def __init__(self, inner: ModelRunner, load_error: BaseException | None = None) -> None:
        super().__init__(inner.config)
        self.inner = inner
        self.max_item_seconds = inner.max_item_seconds  # type: ignore[misc]
        self.load_error = load_error
        self.delay_s = 0.0
        self.fail_with: BaseException | None = None
        self.oom_over: int | None = None
        self.released = threading.Event()
        self.released.set()
        self.calls = 0
        self.batch_sizes: list[int] = []
        self.last_return = 0.0  # time.monotonic() when the latest call ended (returned or raised)

    def hang(self) -> None:
        """Every call from now on blocks until `release()`."""
        self.released.clear()

    def release(self) -> None:
        self.released.set()

    def load(self) -> None:
        if self.load_error is not None:
            raise self.load_error

    def languages(self) -> frozenset[str] | None:
        return self.inner.languages()

    def describe(self) -> dict:
        return self.inner.describe()

    def transcribe(self, audios: Sequence[np.ndarray], options: Sequence[ItemOptions]) -> list[ItemResult]:
        self.calls += 1
        self.batch_sizes.append(len(audios))
        try:
            self.released.wait(120)
            if self.delay_s:
                time.sleep(self.delay_s)
            if self.fail_with is not None:
                raise self.fail_with
            if self.oom_over is not None and len(audios) > self.oom_over:
                raise OutOfMemoryError(f"injected: batch of {len(audios)} > {self.oom_over}")
            return self.inner.transcribe(audios, options)
        finally:
            self.last_return = time.monotonic()


class BatchCostRunner(ModelRunner):
    """A model whose call of k items takes ``base_s + per_item_s * k`` seconds and writes a
    fixed text: a known batch-cost curve, for tests of what admission measures and projects."""

    name = "batch-cost"

    def __init__(self, base_s: float, per_item_s: float, text: str = "hello there") -> None:
        from server.config import RunnerConfig

        super().__init__(RunnerConfig())
        self.base_s, self.per_item_s, self.text = base_s, per_item_s, text
        self.batch_sizes: list[int] = []

    def load(self) -> None:
        pass

    def transcribe(self, audios: Sequence[np.ndarray], options: Sequence[ItemOptions]) -> list[ItemResult]:
        self.batch_sizes.append(len(audios))
        time.sleep(self.base_s + self.per_item_s * len(audios))
        return [Transcript(text=self.text, language="en") for _ in audios]
