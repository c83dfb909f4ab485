"""Find and check a SenseVoice model directory before funasr sees it.

funasr is forgiving in ways a server must not be: with a configuration.json and no
model.pt it silently builds random weights; offline, a hub id retries for ~22 s and
then reports "not registered". Here every missing or unreadable file is a RunnerError
that says what to do, and a hub id fails within seconds when the hub is unreachable.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from server.runners.base import RunnerError

log = logging.getLogger(__name__)

HUB_HOST = ("www.modelscope.cn", 443)
HUB_PROBE_TIMEOUT_S = 3.0
OFFLINE_ENV = "CHORUS_OFFLINE"


def read_funasr_config(root: Path, missing_advice: str) -> tuple[dict[str, Any], Path, Any]:
    """``(file_path_metas, config path, parsed config.yaml)`` of a funasr model directory, found
    the way funasr finds them (configuration.json's file_path_metas first); ``missing_advice``
    follows "<root> has no config.yaml:" when it is absent."""
    metas: dict[str, Any] = {}
    cj = root / "configuration.json"
    if cj.is_file():
        try:
            metas = json.loads(cj.read_text(encoding="utf-8")).get("file_path_metas", {}) or {}
        except (OSError, ValueError) as e:
            raise RunnerError(f"{cj} is not valid JSON ({e}); re-download the model directory") from None
    config_path = root / str(metas.get("config", "config.yaml"))
    if not config_path.is_file():
        raise RunnerError(f"{root} has no {config_path.name}: {missing_advice}")
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise RunnerError(f"{config_path} is not readable YAML: {e}") from None
    return metas, config_path, config


@dataclass(frozen=True)
class ModelFiles:
    """The files of one SenseVoice model directory, all known to exist."""

    root: Path
    config: dict[str, Any]
    weights: Path
    bpe_model: Path
    cmvn: Path

    @classmethod
    def from_dir(cls, root: Path) -> "ModelFiles":
        """Locate the files the way funasr does (configuration.json's file_path_metas first)."""
        metas, config_path, config = read_funasr_config(
            root, "not a complete SenseVoice model directory; download iic/SenseVoiceSmall (config.yaml, "
            "model.pt, am.mvn, *.bpe.model) and point runner.model at it")
        if not isinstance(config, dict) or config.get("model") != "SenseVoiceSmall":
            found = config.get("model") if isinstance(config, dict) else None
            raise RunnerError(f"{config_path}: model is {found!r}, the sensevoice runner needs SenseVoiceSmall")

        weights = root / str(metas.get("init_param", "model.pt"))
        if not weights.is_file():
            # funasr would build the model with random weights and transcribe garbage.
            raise RunnerError(
                f"{weights} is missing: without it funasr silently uses random weights. "
                "Download the complete model directory (model.pt is ~900 MB) and point runner.model at it"
            )
        tok_conf = metas.get("tokenizer_conf", {}) or {}
        bpe = root / str(tok_conf.get("bpemodel", "")) if tok_conf.get("bpemodel") else None
        if bpe is None:
            candidates = sorted(root.glob("*.bpe.model")) or sorted(root.glob("bpe.model"))
            bpe = candidates[0] if candidates else root / "chn_jpn_yue_eng_ko_spectok.bpe.model"
        if not bpe.is_file():
            raise RunnerError(f"{bpe} is missing: the sentencepiece model is needed to turn tokens into text")
        front_conf = metas.get("frontend_conf", {}) or {}
        cmvn = root / str(front_conf.get("cmvn_file", "am.mvn"))
        if not cmvn.is_file():
            raise RunnerError(f"{cmvn} is missing: SenseVoice's features are normalised with it")
        return cls(root=root, config=config, weights=weights, bpe_model=bpe, cmvn=cmvn)


def hub_reachable(host: tuple[str, int] | None = None, timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """A TCP connect to the model hub; False within `timeout_s` when there is no route."""
    host = host or HUB_HOST
    try:
        with socket.create_connection(host, timeout=timeout_s):
            return True
    except OSError:
        return False


def resolve_model_dir(model: str) -> Path:
    """`model` as a local directory, or a hub id downloaded now; RunnerError otherwise."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise RunnerError(f"runner.model={model!r} is a file; point it at the model directory")
        return path
    advice = (
        f"runner.model={model!r} is not a local directory and is taken as a hub id, but "
        "{why}. Download the model directory on a machine with network (e.g. "
        "`modelscope download --model iic/SenseVoiceSmall --local_dir DIR`), copy it here "
        "and set runner.model to that directory."
    )
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise RunnerError(advice.format(why=f"{OFFLINE_ENV} is set"))
    if not hub_reachable():
        raise RunnerError(advice.format(why=f"the hub ({HUB_HOST[0]}) is unreachable"))
    try:
        from modelscope.hub.snapshot_download import snapshot_download
    except ImportError:
        raise RunnerError(advice.format(why="the modelscope package is not installed")) from None
    log.info("downloading %s from ModelScope", model)
    try:
        return Path(snapshot_download(model))
    except Exception as e:  # noqa: BLE001 - any hub failure gets the same advice
        raise RunnerError(advice.format(why=f"the download failed ({type(e).__name__}: {e})")) from None
