"""Model runners: the only package that imports torch.

Runners are looked up by name and imported lazily, so importing the server (or a
session) never pulls in torch or funasr until a model is actually created.
"""

from __future__ import annotations

import importlib

from server.config import RunnerConfig
from server.runners.base import ItemError, ItemOptions, ModelRunner, RunnerError, Transcript

_REGISTRY = {
    "whisper": "server.runners.whisper:WhisperRunner",
    "sensevoice": "server.runners.sensevoice:SenseVoiceRunner",
    "qwen3-asr": "server.runners.qwen3asr:Qwen3AsrRunner",
    "paraformer": "server.runners.paraformer:ParaformerRunner",
}


def create_runner(config: RunnerConfig, max_batch_size: int | None = None) -> ModelRunner:
    """Build (but do not load) the runner that ``config.name`` names. ``max_batch_size``: the
    most items one call will get (the batcher's limit), which bounds what graphs allocate."""
    try:
        target = _REGISTRY[config.name]
    except KeyError:
        raise RunnerError(f"unknown runner {config.name!r}; choose one of {sorted(_REGISTRY)}") from None
    module_name, cls_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(config, max_batch_size=max_batch_size)


__all__ = ["ItemError", "ItemOptions", "ModelRunner", "RunnerError", "Transcript", "create_runner"]
