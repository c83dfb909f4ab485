"""`chorus doctor`: its exit status and the device its CUDA facts describe (CPU-only checks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from server import doctor
from server.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def _config(device: str):
    return load_config(ROOT / "configs" / "sensevoice-cpu.yaml", {"runner.device": device})


@pytest.mark.parametrize("as_json", [False, True])
def test_doctor_exits_nonzero_when_the_benchmark_fails(tmp_path, as_json):
    # An empty directory is not a SenseVoice model: the runner's load fails at once, offline
    # (the error text is the runner's; the test only needs that there is one).
    cmd = [sys.executable, "-m", "server", "doctor", "--config", "configs/sensevoice-cpu.yaml",
           "--model", str(tmp_path), "--seconds", "0.2"] + (["--json"] if as_json else [])
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    # The whole report is still printed, the error included, and stderr says what failed.
    if as_json:
        report = json.loads(proc.stdout)
        error = report["benchmark"]["error"]
        assert report["runner_config"]["name"] == "sensevoice" and "graph_capture" in report
    else:
        assert "runner_config:" in proc.stdout and "graph_capture:" in proc.stdout
        assert "benchmark:\n  error: " in proc.stdout
        error = proc.stdout.split("benchmark:\n  error: ", 1)[1].strip()
    assert error
    assert "self-benchmark failed" in proc.stderr and error in proc.stderr


@pytest.mark.parametrize(
    ("device", "cuda_available", "expected"),
    [
        ("cpu", False, torch.device("cpu")),
        ("cpu", True, torch.device("cpu")),
        ("auto", False, torch.device("cpu")),
        ("auto", True, torch.device("cuda", 0)),
        ("cuda", False, torch.device("cuda", 0)),
        ("cuda:1", False, torch.device("cuda", 1)),
        ("cuda:1", True, torch.device("cuda", 1)),
    ],
)
def test_doctor_device_follows_runner_device(monkeypatch, device, cuda_available, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_available)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    got = doctor._doctor_device(_config(device))
    assert got == expected
    assert got.type != "cuda" or got.index == expected.index  # always an explicit index


def _fake_cuda(monkeypatch, count: int = 2) -> dict[str, list]:
    """A CUDA runtime with `count` devices that records which device each query names."""
    seen: dict[str, list] = {"properties": [], "memory": [], "capture": []}

    def props(d):
        seen["properties"].append(torch.device(d).index if not isinstance(d, int) else d)
        return SimpleNamespace(name="Fake GPU", major=9, minor=0, multi_processor_count=132)

    def mem(d=None):
        seen["memory"].append(None if d is None else (torch.device(d).index if not isinstance(d, int) else d))
        return (40 * 2**30, 80 * 2**30)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem)
    monkeypatch.setattr(doctor, "_graph_capture_check", lambda dev: seen["capture"].append(dev) or "ok")
    monkeypatch.setattr(doctor.shutil, "which", lambda name: None)  # no nvidia-smi call
    return seen


def test_cuda_facts_use_the_configured_device_index(monkeypatch):
    seen = _fake_cuda(monkeypatch)
    facts = doctor._cuda_facts(_config("cuda:1"))
    assert seen["properties"] == [1] and seen["memory"] == [1] and seen["capture"] == [torch.device("cuda", 1)]
    assert facts["runner_device"] == "cuda:1"
    assert facts["device"] == "Fake GPU" and facts["graph_capture"] == "ok"


def test_cuda_facts_report_a_missing_device_index(monkeypatch):
    seen = _fake_cuda(monkeypatch, count=1)
    facts = doctor._cuda_facts(_config("cuda:3"))
    assert seen["properties"] == [] and seen["capture"] == []
    assert facts["cuda_available"] is True
    assert facts["graph_capture"].startswith("skipped:") and "cuda:3" in facts["graph_capture"]


def test_cuda_facts_skip_capture_when_the_runner_is_on_cpu(monkeypatch):
    # Even where CUDA is available, a CPU runner's doctor must not report (or touch) a GPU.
    seen = _fake_cuda(monkeypatch)
    facts = doctor._cuda_facts(_config("cpu"))
    assert facts["cuda_available"] is True
    assert facts["graph_capture"] == "skipped: runner.device is cpu"
    assert facts["runner_device"] == "cpu"
    assert seen == {"properties": [], "memory": [], "capture": []}


def test_cuda_facts_on_a_machine_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert doctor._cuda_facts(_config("cpu"))["graph_capture"] == "skipped: runner.device is cpu"
    assert doctor._cuda_facts(_config("auto"))["graph_capture"] == "skipped: runner.device is cpu"
    facts = doctor._cuda_facts(_config("cuda"))
    assert facts["cuda_available"] is False and facts["graph_capture"].startswith("skipped: no CUDA device")
