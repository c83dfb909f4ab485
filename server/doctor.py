"""`chorus doctor`: what this machine offers the server, and a short self-benchmark.

Reports versions, the configured runner's device (runner.device), its memory, whether a
CUDA graph can be captured and replayed there, and the configured runner's speed on real
clips (tests/data when present, else synthetic audio) at batch 1 and at the largest
configured batch. `chorus doctor` exits 1 when the self-benchmark failed.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import time
import wave
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from server.config import Config

if TYPE_CHECKING:
    import torch

_DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


def _clips() -> tuple[list[np.ndarray], str]:
    clips = []
    for p in sorted(_DATA.glob("*.wav")):
        with wave.open(str(p)) as w:
            if w.getframerate() == 16000 and w.getsampwidth() == 2 and w.getnchannels() == 1:
                clips.append(np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768)
    if clips:
        return clips, f"{len(clips)} real clips from tests/data"
    rng = np.random.default_rng(0)
    return [(rng.standard_normal(16000 * 5) * 0.1).astype(np.float32) for _ in range(4)], "synthetic noise (tests/data not found)"


def _doctor_device(config: Config) -> torch.device:
    """The device the configured runner runs on, as `resolve_device` picks it, with its CUDA index.

    `auto` is cuda when CUDA is available, else cpu; a bare `cuda` is the current CUDA device
    (0 where CUDA is absent, for the report). Unlike `resolve_device` this never raises: a
    missing CUDA device is something the doctor reports."""
    import torch

    name = config.runner.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    return device


def _graph_capture_check(device: torch.device) -> str:
    """Capture one matmul into a CUDA graph on `device`, replay it on new input, check the result."""
    import torch

    try:
        with torch.cuda.device(device):
            x = torch.randn(64, 64, device=device)
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream(device)
            s.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(s):
                y = x @ x
            torch.cuda.current_stream(device).wait_stream(s)
            with torch.cuda.graph(g):
                y = x @ x
            x.copy_(torch.eye(64, device=device))
            g.replay()
            torch.cuda.synchronize(device)
            return "ok" if torch.allclose(y, torch.eye(64, device=device)) else "replay gave wrong values"
    except Exception as e:  # noqa: BLE001 - a diagnosis, not a failure
        return f"failed: {e}"


def _cuda_facts(config: Config) -> dict[str, Any]:
    """CUDA facts of the device the configured runner uses (runner.device), not of device 0."""
    import torch

    device = _doctor_device(config)
    facts: dict[str, Any] = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda,
                             "runner_device": str(device)}
    if device.type != "cuda":
        facts["graph_capture"] = f"skipped: runner.device is {device.type}"
        return facts
    if not torch.cuda.is_available():
        facts["graph_capture"] = f"skipped: no CUDA device (runner.device={config.runner.device})"
        return facts
    count = torch.cuda.device_count()
    if device.index >= count:
        facts["graph_capture"] = f"skipped: runner.device={config.runner.device} ({device}) but this machine has {count} CUDA device(s)"
        return facts
    props = torch.cuda.get_device_properties(device.index)
    free, total = torch.cuda.mem_get_info(device.index)
    facts.update(
        device=props.name,
        compute_capability=f"{props.major}.{props.minor}",
        multiprocessors=props.multi_processor_count,
        memory_total_gib=round(total / 2**30, 1),
        memory_free_gib=round(free / 2**30, 1),
        cudnn=torch.backends.cudnn.version(),
    )
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
            lines = out.stdout.strip().splitlines()
            if lines:
                facts["driver"] = lines[0].strip()  # one line per GPU; the driver is the same for all
        except (OSError, subprocess.SubprocessError):
            pass
    facts["graph_capture"] = _graph_capture_check(device)
    return facts


def _bench(config: Config, seconds: float) -> dict[str, Any]:
    from server.runners import ItemOptions, create_runner

    runner = create_runner(config.runner, max_batch_size=config.batcher.largest_batch)
    t0 = time.monotonic()
    runner.load()
    out: dict[str, Any] = {"load_s": round(time.monotonic() - t0, 2), "runner": runner.describe()}
    clips, source = _clips()
    out["audio"] = source
    sync = _sync_fn(runner)
    for batch in sorted({1, config.batcher.max_batch_size}):
        items = [clips[i % len(clips)] for i in range(batch)]
        audio_s = sum(len(c) for c in items) / 16000
        runner.transcribe(items, [ItemOptions()] * batch)  # warm this shape
        times = []
        deadline = time.monotonic() + seconds / 2
        while time.monotonic() < deadline or not times:
            t = time.monotonic()
            runner.transcribe(items, [ItemOptions()] * batch)
            sync()
            times.append(time.monotonic() - t)
        med = float(np.median(times))
        out[f"batch_{batch}"] = {"calls": len(times), "ms_per_batch": round(med * 1000, 1), "rtfx": round(audio_s / med, 1)}
    return out


def _sync_fn(runner: Any):
    try:
        import torch

        if str(getattr(runner, "device", "cpu")).startswith("cuda"):
            return torch.cuda.synchronize
    except ImportError:
        pass
    return lambda: None


def run_doctor(config: Config, bench_seconds: float = 10.0) -> dict[str, Any]:
    import torch

    report: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "runner_config": {"name": config.runner.name, "model": config.runner.model, "device": config.runner.device,
                          "dtype": config.runner.dtype, "graphs": config.runner.graphs.enabled},
    }
    report.update(_cuda_facts(config))
    try:
        report["benchmark"] = _bench(config, bench_seconds)
    except Exception as e:  # noqa: BLE001 - report what failed instead of a traceback
        report["benchmark"] = {"error": str(e)}
    return report


def benchmark_failed(report: dict[str, Any]) -> bool:
    """True when the self-benchmark did not run to the end (its error is in the report)."""
    return "error" in report.get("benchmark", {})


def format_report(report: dict[str, Any]) -> str:
    lines = []
    for k, v in report.items():
        if isinstance(v, dict):
            lines.append(f"{k}:")
            for k2, v2 in v.items():
                lines.append(f"  {k2}: {v2}")
        else:
            lines.append(f"{k}: {v}")
    return "\n".join(lines)
