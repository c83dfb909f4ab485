"""Resolve the configured device and dtype into torch objects, with clear errors."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from server.config import RunnerConfig
from server.runners.base import RunnerError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(config: RunnerConfig) -> torch.device:
    name = config.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunnerError(f"runner.device={config.device!r} but torch {torch.__version__} sees no CUDA device; use device: cpu")
    if device.type == "cpu" and config.num_threads > 0:
        torch.set_num_threads(config.num_threads)
    return device


def resolve_dtype(config: RunnerConfig, device: torch.device) -> torch.dtype:
    dtype = _DTYPES[config.dtype]
    if device.type == "cpu" and dtype is not torch.float32:
        # Half precision on CPU is slower than fp32 and loses accuracy; refuse instead of surprising.
        raise RunnerError(f"runner.dtype={config.dtype} needs a CUDA device; use float32 on CPU")
    return dtype


def graph_backend_for(config: RunnerConfig, device: torch.device, given: Any = None) -> Any:
    """The GraphBackend a runner captures with: None (eager) unless `graphs.enabled`; then the
    stand-in it was given, else CUDA graphs on a CUDA device, else None."""
    if not config.graphs.enabled:
        return None
    if given is not None:
        return given
    if device.type == "cuda":
        from server.graphs import CudaGraphs

        return CudaGraphs(device)
    return None


def graph_budget_bytes(config: RunnerConfig) -> int:
    return int(config.graphs.memory_budget_gb * (1 << 30))


def device_facts(device: torch.device) -> dict[str, str]:
    """What a report needs to name the hardware a runner is on."""
    facts = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        facts["gpu"] = torch.cuda.get_device_name(device)
        facts["cuda"] = str(torch.version.cuda)
    return facts


class StageClock:
    """Times consecutive stages of one batch (features, model, ...) without adding syncs.

    On CUDA each `mark` records a timing event on the current stream; durations are read
    in `stages()`, which should run after the batch's one device sync (it waits for the
    last mark otherwise). On CPU marks are wall-clock readings."""

    def __init__(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        self._marks: list[tuple[str, object]] = []

    def mark(self, name: str) -> None:
        """The stage called `name` ends here (the first mark only starts the clock)."""
        if self._cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self._marks.append((name, ev))
        else:
            self._marks.append((name, time.perf_counter()))

    def stages(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self._cuda and self._marks:
            self._marks[-1][1].synchronize()  # type: ignore[attr-defined] # free after the batch's sync
        for (_, a), (name, b) in zip(self._marks, self._marks[1:]):
            secs = a.elapsed_time(b) / 1000.0 if self._cuda else b - a  # type: ignore[union-attr,operator]
            out[name] = out.get(name, 0.0) + secs
        return out
