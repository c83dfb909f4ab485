"""bench/run_gpu.sh, the one command for every GPU figure, run in its CPU smoke mode.

A GPU machine is lent rarely and briefly; a script that breaks there wastes the loan. This
runs the same steps (GPU tests, doctor, runner benchmarks, loadgen with its three server
variants) on the CPU with a tiny random-weight SenseVoice and checks each wrote its report.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_run_gpu_script_smoke_on_cpu(tmp_path):
    out = tmp_path / "bench.md"
    env = {**os.environ, "QUICK": "1", "DEVICE": "cpu", "OUT": str(out), "PY": sys.executable,
           "SV_DIR": str(tmp_path / "sv"), "RAMP": "1", "PROCS": "2"}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "run_gpu.sh")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no CUDA device" in proc.stdout  # the GPU tests skipped, saying why
    assert "graph_capture: skipped: runner.device is cpu" in proc.stdout  # doctor ran
    report = out.read_text()
    assert report.count("### runner_bench") == 2  # SenseVoice and Whisper
    assert "SenseVoiceSmall weights are RANDOM" in report
    assert "| chorus graphs-fp32 | 2 |" in report and "encoder" in report
    for mode in ("batching + CUDA graphs", "batching, eager", "one eager call per request"):
        assert f"### {mode}: largest N within target" in report
        assert f"Where the server's time went ({mode})" in report
    assert "RANDOM weights" in report.split("## loadgen run")[1]


def _run_gpu_script_quick_fail(tmp_path, out: Path) -> tuple[subprocess.CompletedProcess, float]:
    # The cheapest step (`tests` skips where CUDA is absent) and a tiny SenseVoice, so that a
    # script that does not check OUT first still ends soon (and fails the asserts below).
    env = {**os.environ, "QUICK": "1", "DEVICE": "cpu", "OUT": str(out), "PY": sys.executable,
           "SV_DIR": str(tmp_path / "sv")}
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "bench" / "run_gpu.sh"), "tests"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    return proc, time.monotonic() - t0


def test_run_gpu_script_refuses_a_directory_as_out(tmp_path):
    # OUT names the markdown report file; a directory used to crash the script only after
    # all its measurements, when the benchmarks appended their tables to it.
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    proc, took = _run_gpu_script_quick_fail(tmp_path, out_dir)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert f"run_gpu.sh: OUT={out_dir} is a directory; set OUT to the markdown report file, " \
           f"e.g. OUT={out_dir}/benchmarks.md" in proc.stderr
    assert "===" not in proc.stderr and not (tmp_path / "sv").exists()  # no step ran, nothing was written
    assert took < 10, took
    assert list(out_dir.iterdir()) == []


def test_run_gpu_script_refuses_out_in_a_missing_directory(tmp_path):
    out = tmp_path / "missing" / "benchmarks.md"
    proc, took = _run_gpu_script_quick_fail(tmp_path, out)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert f"run_gpu.sh: OUT={out}: its directory {out.parent} does not exist" in proc.stderr
    assert "===" not in proc.stderr and not (tmp_path / "sv").exists()
    assert took < 10, took


@pytest.mark.parametrize("script", ["file_priority_bench.py", "file_throughput_bench.py"])
def test_recording_benchmarks_start(script):
    """The recordings' benchmarks import and parse their arguments (they need minutes to run)."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--files" in out.stdout, out.stderr[-2000:]
