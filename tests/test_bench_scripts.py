"""bench/run_gpu.sh, the one command for every GPU figure.

A GPU machine is lent rarely and briefly; a script that breaks there wastes the loan. The
default run checks that every step starts: the script reaches it and its command line, with
the GPU settings and with the CPU smoke settings, is accepted by its program's argument parser
(a stand-in for python records each command and stops the program once its arguments parse).
The extended run (`pytest -m extended`) runs the same steps for real on the CPU with a tiny
random-weight SenseVoice (about 2 minutes: three servers) and checks each wrote its report.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The suite's CPU lock (tests/conftest.py) belongs to this run: a pytest that the script starts
# must not queue on it behind the very test that waits for the script.
_ENV = {k: v for k, v in os.environ.items() if k != "CHORUS_TEST_RUN_LOCKS"}


def _steps_as_started(tmp_path: Path, **env: str) -> list[list[str]]:
    """Run bench/run_gpu.sh (all steps) with a stand-in python that only records its command
    line (a bare interpreter: no site, no torch); the command lines, in order."""
    log = tmp_path / "commands.jsonl"
    (tmp_path / "record.py").write_text(
        f"import json, sys\nwith open({str(log)!r}, 'a') as f:\n    f.write(json.dumps(sys.argv[1:]) + '\\n')\n")
    py = tmp_path / "python"
    py.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -I -S {shlex.quote(str(tmp_path / 'record.py'))} \"$@\"\n")
    py.chmod(0o755)
    run_env = {**_ENV, "PY": str(py), "OUT": str(tmp_path / "bench.md"), "SV_DIR": str(tmp_path / "sv"), **env}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "run_gpu.sh")], cwd=ROOT, env=run_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    return [json.loads(line) for line in log.read_text().splitlines()]


class _Parsed(Exception):
    """Raised once a program's argparse parser has accepted its arguments."""


def _parses(monkeypatch: pytest.MonkeyPatch, command: list[str]) -> None:
    """Run the program of `command` (`-m module ...` or `script.py ...`) in this process only
    until its argparse parser accepts the arguments; argparse's SystemExit(2), with its
    message, fails the test where one is refused."""
    parse = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        parse(self, args, namespace)
        raise _Parsed

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        m.setattr(sys, "path", list(sys.path))  # the scripts put the checkout first on it
        m.setattr(sys, "argv", [command[1], *command[2:]] if command[0] == "-m" else list(command))
        with pytest.raises(_Parsed):
            if command[0] == "-m":
                runpy.run_module(command[1], run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(str(ROOT / command[0]), run_name="__main__")


@pytest.mark.parametrize("settings", [
    pytest.param({"DEVICE": "cuda"}, id="gpu"),
    pytest.param({"DEVICE": "cpu", "QUICK": "1"}, id="cpu-smoke"),
])
def test_run_gpu_script_every_step_starts(tmp_path, monkeypatch, settings):
    """Every step of bench/run_gpu.sh, with the GPU machine's settings and with the CPU smoke
    settings, is reached and its command line is accepted by its program's parser (the real
    runs: `test_run_gpu_script_smoke_on_cpu`, extended, and the GPU loans)."""
    from server.cli import build_parser
    from server.runners import random_weights

    commands = _steps_as_started(tmp_path, **settings)
    programs = [c[1] if c[0] == "-m" else c[0] for c in commands]
    assert programs == ["-c", "pytest", "server", "bench/runner_bench.py", "bench/runner_bench.py",
                        "client_demo/loadgen.py"], commands
    # The model directory is written first (not run here: full size is 900 MB).
    compile(commands[0][1], "<run_gpu.sh -c>", "exec")
    assert "write_sensevoice_dir" in commands[0][1] and callable(random_weights.write_sensevoice_dir)
    assert commands[1][2:] == ["-q", "-rs", "tests/test_gpu.py"]
    for command in commands[2:]:
        _parses(monkeypatch, command)
    assert commands[2][2] == "doctor"
    runner_args = [c[1:] for c in commands[3:5]]
    assert [a[a.index("--runner") + 1] for a in runner_args] == ["sensevoice", "whisper"]
    assert all(a[a.index("--device") + 1] == settings["DEVICE"] for a in runner_args)
    # The server that loadgen spawns for each mode: its command line parses too.
    loadgen = commands[5]
    serve = shlex.split(loadgen[loadgen.index("--spawn-server") + 1])
    assert serve[1:4] == ["-m", "server", "serve"]
    args = build_parser().parse_args(serve[3:])
    assert str(args.config) == "configs/sensevoice-gpu.yaml" and args.model == str(tmp_path / "sv")


@pytest.mark.extended
def test_run_gpu_script_smoke_on_cpu(tmp_path):
    """Extended (about 2 minutes on the 2-core machine: doctor, both runner benchmarks and
    loadgen with three server variants): every step of the CPU smoke run, for real."""
    out = tmp_path / "bench.md"
    env = {**_ENV, "QUICK": "1", "DEVICE": "cpu", "OUT": str(out), "PY": sys.executable,
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


def _run_gpu_script_quick_fail(tmp_path, out: Path) -> tuple[subprocess.CompletedProcess, Path]:
    """The script with a stand-in python that only notes that it was called (in the returned
    file): a script that does not check OUT first runs it, and fails the asserts below."""
    called = tmp_path / "python-called"
    py = tmp_path / "python"
    py.write_text(f"#!/bin/sh\necho \"$@\" >> {shlex.quote(str(called))}\n")
    py.chmod(0o755)
    env = {**_ENV, "QUICK": "1", "DEVICE": "cpu", "OUT": str(out), "PY": str(py), "SV_DIR": str(tmp_path / "sv")}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "run_gpu.sh"), "tests"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    return proc, called


def test_run_gpu_script_refuses_a_directory_as_out(tmp_path):
    # OUT names the markdown report file; a directory used to crash the script only after
    # all its measurements, when the benchmarks appended their tables to it.
    out_dir = tmp_path / "results"
    out_dir.mkdir()
    proc, called = _run_gpu_script_quick_fail(tmp_path, out_dir)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert f"run_gpu.sh: OUT={out_dir} is a directory; set OUT to the markdown report file, " \
           f"e.g. OUT={out_dir}/benchmarks.md" in proc.stderr
    assert "===" not in proc.stderr and not called.exists()  # no step ran: python was never started
    assert list(out_dir.iterdir()) == []


def test_run_gpu_script_refuses_out_in_a_missing_directory(tmp_path):
    out = tmp_path / "missing" / "benchmarks.md"
    proc, called = _run_gpu_script_quick_fail(tmp_path, out)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert f"run_gpu.sh: OUT={out}: its directory {out.parent} does not exist" in proc.stderr
    assert "===" not in proc.stderr and not called.exists()


@pytest.mark.parametrize("script", ["file_priority_bench.py", "file_throughput_bench.py"])
def test_recording_benchmarks_start(script):
    """The recordings' benchmarks import and parse their arguments (they need minutes to run)."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--files" in out.stdout, out.stderr[-2000:]
