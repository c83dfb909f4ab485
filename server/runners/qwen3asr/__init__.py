"""Qwen3-ASR runner (audio encoder + Qwen3 language model), in Chorus's own torch code."""

from server.runners.qwen3asr.runner import Qwen3AsrRunner

__all__ = ["Qwen3AsrRunner"]
