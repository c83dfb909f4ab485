"""The Paraformer runner (funasr's Paraformer modules, batched frontend, fixed-shape CIF)."""

from server.runners.paraformer.runner import ParaformerRunner

__all__ = ["ParaformerRunner"]
