"""Find and check a Paraformer model directory (paraformer-zh / paraformer-large layout).

The layout funasr downloads: config.yaml, model.pt, am.mvn, tokens.json (tokens.txt in older
exports), seg_dict where present, configuration.json whose `file_path_metas` name the files.
As for SenseVoice (server.runners.sensevoice.model_dir, whose hub handling this reuses), every
missing or unreadable file is a RunnerError that says what to do; funasr would instead build
random weights when model.pt is missing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.runners.base import RunnerError
from server.runners.sensevoice.model_dir import read_funasr_config

SUPPORTED_MODELS = ("Paraformer",)
"""funasr model classes this runner serves: the plain CIF Paraformer (paraformer-zh's
`speech_paraformer-large_asr_nat-*`, FunASR's server default). BiCifParaformer and
SeacoParaformer carry extra predictors and are refused with a clear error."""

_DOWNLOAD_ADVICE = (
    "download a Paraformer model directory (e.g. `modelscope download --model "
    "iic/speech_paraformer-large_asr_nat-zh-cn-16k-common-vocab8404-pytorch --local_dir DIR`) "
    "and point runner.model at it"
)


@dataclass(frozen=True)
class ParaformerFiles:
    """The files of one Paraformer model directory, all known to exist (seg_dict optional)."""

    root: Path
    config: dict[str, Any]
    weights: Path
    tokens: Path
    cmvn: Path
    seg_dict: Path | None

    @classmethod
    def from_dir(cls, root: Path) -> "ParaformerFiles":
        """Locate the files the way funasr does (configuration.json's file_path_metas first)."""
        metas, config_path, config = read_funasr_config(
            root, f"not a complete Paraformer model directory; {_DOWNLOAD_ADVICE}")
        found = config.get("model") if isinstance(config, dict) else None
        if found not in SUPPORTED_MODELS:
            raise RunnerError(
                f"{config_path}: model is {found!r}; the paraformer runner serves {', '.join(SUPPORTED_MODELS)} "
                "(SenseVoiceSmall: use the sensevoice runner; ParaformerStreaming, BiCifParaformer and "
                "SeacoParaformer are not served yet)"
            )
        weights = root / str(metas.get("init_param", "model.pt"))
        if not weights.is_file():
            raise RunnerError(
                f"{weights} is missing: without it funasr silently uses random weights. "
                f"Download the complete model directory (model.pt is ~840 MB): {_DOWNLOAD_ADVICE}"
            )
        tok_conf = metas.get("tokenizer_conf", {}) or {}
        if tok_conf.get("token_list"):
            tokens = root / str(tok_conf["token_list"])
        else:
            tokens = root / "tokens.txt" if (root / "tokens.txt").is_file() else root / "tokens.json"
        if not tokens.is_file():
            raise RunnerError(f"{tokens} is missing: the token list is needed to turn token ids into text")
        seg_name = tok_conf.get("seg_dict_file") or "seg_dict"
        seg_dict = root / str(seg_name) if (root / str(seg_name)).is_file() else None
        front_conf = metas.get("frontend_conf", {}) or {}
        cmvn = root / str(front_conf.get("cmvn_file", "am.mvn"))
        if not cmvn.is_file():
            raise RunnerError(f"{cmvn} is missing: Paraformer's features are normalised with it")
        return cls(root=root, config=config, weights=weights, tokens=tokens, cmvn=cmvn, seg_dict=seg_dict)

    def token_list(self) -> list[str]:
        """tokens.json (a JSON list) or tokens.txt (one token per line), as funasr reads them."""
        try:
            text = self.tokens.read_text(encoding="utf-8")
            if self.tokens.suffix == ".json":
                tokens = json.loads(text)
            else:
                tokens = [line.rstrip("\r\n") for line in text.splitlines()]
        except (OSError, ValueError) as e:
            raise RunnerError(f"{self.tokens} is not a readable token list: {e}") from None
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise RunnerError(f"{self.tokens} is not a list of token strings")
        return tokens
