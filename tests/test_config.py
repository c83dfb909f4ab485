"""Config loading: defaults, YAML files, overrides, and the errors a typo deserves."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from server.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_configs_load():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert isinstance(cfg, Config)


def test_default_yaml_matches_code_defaults_where_it_speaks():
    # configs/default.yaml restates defaults; it must not drift from the code's meaning.
    assert load_config(ROOT / "configs" / "default.yaml").runner == Config().runner


def test_overrides_and_types():
    cfg = load_config(None, {"server.port": "9000", "batcher.enabled": "false", "batcher.length_buckets_s": "[1, 2.5]"})
    assert cfg.server.port == 9000 and cfg.batcher.enabled is False and cfg.batcher.length_buckets_s == (1.0, 2.5)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"server.prot": "1"}, "unknown key"),
        ({"server.port": "eighty"}, "expected int"),
        ({"vad.frame_ms": "25"}, "frame_ms"),
        ({"runner.name": "wav2vec"}, "runner.name"),
        ({"runner.dtype": "int8"}, "dtype"),
        ({"vad.max_segment_ms": "40000"}, "30000"),
        ({"batcher.length_buckets_s": "[5, 2]"}, "ascending"),
        ({"batcher.enabled": "maybe"}, "true/false"),
    ],
)
def test_bad_values_are_clear_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_configuration_doc_is_current():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_config_doc.py"), "--check"])
    assert r.returncode == 0, "docs/configuration.md is stale: run python scripts/gen_config_doc.py"
