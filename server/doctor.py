"""`chorus doctor`: what this machine offers the server, and a short self-benchmark.

Reports versions, the device, its memory, whether a CUDA graph can be captured and
replayed, and the configured runner's speed on real clips (tests/data when present,
else synthetic audio) at batch 1 and at the largest configured batch.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np

from server.config import Config

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


def _cuda_facts() -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {"cuda_available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if not torch.cuda.is_available():
        facts["graph_capture"] = "skipped: no CUDA device"
        return facts
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info()
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
            facts["driver"] = out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        x = torch.randn(64, 64, device="cuda")
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            y = x @ x
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            y = x @ x
        x.copy_(torch.eye(64, device="cuda"))
        g.replay()
        torch.cuda.synchronize()
        facts["graph_capture"] = "ok" if torch.allclose(y, torch.eye(64, device="cuda")) else "replay gave wrong values"
    except Exception as e:  # noqa: BLE001 - a diagnosis, not a failure
        facts["graph_capture"] = f"failed: {e}"
    return facts


def _bench(config: Config, seconds: float) -> dict[str, Any]:
    from server.runners import ItemOptions, create_runner

    runner = create_runner(config.runner)
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
    report.update(_cuda_facts())
    try:
        report["benchmark"] = _bench(config, bench_seconds)
    except Exception as e:  # noqa: BLE001 - report what failed instead of a traceback
        report["benchmark"] = {"error": str(e)}
    return report


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
