"""Resolve the configured device and dtype into torch objects, with clear errors."""

from __future__ import annotations

import logging

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
