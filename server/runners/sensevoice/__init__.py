"""The SenseVoiceSmall runner (funasr model, batched torch frontend, graph-capturable core)."""

from server.runners.sensevoice.runner import SenseVoiceRunner

__all__ = ["SenseVoiceRunner"]
