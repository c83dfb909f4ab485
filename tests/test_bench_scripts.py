"""bench/run_gpu.sh, the one command for every GPU figure, run in its CPU smoke mode.

A GPU machine is lent rarely and briefly; a script that breaks there wastes the loan. This
runs the same steps (GPU tests, doctor, runner benchmarks, loadgen with its three server
variants) on the CPU with a tiny random-weight SenseVoice and checks each wrote its report.
"""

from __future__ import annotations

import os
import subprocess
import sys
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
    assert "graph_capture: skipped: no CUDA device" in proc.stdout  # doctor ran
    report = out.read_text()
    assert report.count("### runner_bench") == 2  # SenseVoice and Whisper
    assert "SenseVoiceSmall weights are RANDOM" in report
    assert "| chorus graphs-fp32 | 2 |" in report and "encoder" in report
    for mode in ("batching + CUDA graphs", "batching, eager", "one eager call per request"):
        assert f"### {mode}: largest N within target" in report
        assert f"Where the server's time went ({mode})" in report
    assert "RANDOM weights" in report.split("## loadgen run")[1]
