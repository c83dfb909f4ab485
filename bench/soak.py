"""Soak test: a real `chorus serve` under N concurrent real-time sessions for M minutes.

    .venv/bin/python bench/soak.py --sessions 4 --minutes 5 --vanish-fraction 0.2 --out /tmp/soak.json

What it does:
- starts the server as a subprocess (`python -m server serve --config CONFIG --set server.port=0
  --set server.host=127.0.0.1`, the same as `chorus serve`), learns the port from the server's
  own "listening on ws://HOST:PORT/v1/stream" log line and waits for `GET /healthz` to answer
  200 (the model loads in ~10-20 s on CPU);
- keeps `--sessions` clients connected for `--minutes`: each client streams one speech clip
  from tests/data/*.wav at real-time pace (100 ms chunks on absolute deadlines,
  client_demo.pacing.send_paced), with 0.3-1.0 s of silence before it and 1.0-2.0 s after,
  sends `{"type":"stop"}`, waits for `done` and closes; a new client then takes its place.
  Clients start staggered so that joins and leaves interleave. A stated fraction of the clients
  (`--vanish-fraction`, every k-th client exactly, not a coin toss) vanish mid-segment instead:
  they stop sending 40-80 % into the clip and drop the TCP connection (SO_LINGER 0, so an RST,
  no close frame, no `stop`), which is what the server's cleanup has to survive;
- samples every second the server process's RSS (children included, if any) and CPU, and the
  GPU memory in use when `nvidia-smi` or a CUDA torch is present (else it says 'no GPU');
- counts, for the well-behaved clients, every `speech_started` and every `final`: a segment
  that had a `speech_started` and no `final` by `done` is a LOST final; a final with empty
  text (or an `error` field) is counted as EMPTY (every clip is clean speech); finals out of
  order or repeated count as order violations; `error` messages are counted by code, and
  refused handshakes (HTTP 503/429, e.g. admission control) by status;
- after the run (all clients closed, 2 s to settle) reads /metrics: `chorus_sessions_active`
  must be back to 0 (vanished clients cleaned up).

Memory: the first `--warmup-fraction` of the run (25 % by default) is warm-up (allocator
pools, torch caches, the first batches of each size); "RSS start" is the first sample after
it, "RSS end" the sample after all clients have closed and the server has idled 2 s, growth
= end - start. Also reported: the slope of a least-squares line through the post-warm-up
samples (MiB per minute), and the RSS of the loaded server before the first client connects
(end minus that includes the warm-up). With glibc's default malloc the RSS of a torch CPU
server rises in steps, each time a larger model batch than before runs (freed pages of the
largest batch so far stay in the heap), and stays flat between them: such a step is not a
leak. `--server-env MALLOC_MMAP_THRESHOLD_=131072` makes large buffers go back to the OS when
freed, so that RSS follows live memory and a leak stands out (a diagnostic, not the deployed
setting).

Exit status: 0 all good; 1 a lost final, an empty final, a well-behaved session without
`done`, an order violation, sessions left open on the server, or (with `--max-growth-mib`)
growth above it; 2 the soak could not run (server did not start, no session completed).
All traffic is to 127.0.0.1; every loop is bounded by the run deadline plus fixed timeouts,
and the server subprocess is killed on exit (SIGTERM, then SIGKILL after --term-timeout s),
also on Ctrl-C, SIGTERM and exceptions.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import wave
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client_demo.pacing import send_paced  # noqa: E402

DATA = ROOT / "tests" / "data"
RATE = 16000
HOST = "127.0.0.1"
MIB = 1024 * 1024
LISTENING = re.compile(r"listening on ws://[^\s:]+:(\d+)/v1/stream")

# Fixed bounds on every wait, so the script always ends by itself.
READY_TIMEOUT_S = 300.0  # server start + model load
HANDSHAKE_TIMEOUT_S = 30.0
DONE_TIMEOUT_S = 90.0  # after `stop`: pending finals on an overloaded CPU, then `done`
SETTLE_S = 2.0  # idle time after the last client before "RSS end" and the /metrics check
CLEANUP_WAIT_S = 10.0  # how long sessions_active may take to drop to 0 after the last client


# ---------------------------------------------------------------------- audio
def read_clip(path: Path) -> np.ndarray:
    """16 kHz mono 16-bit WAV -> float32 in [-1, 1] (as tests/serverharness.py reads clips)."""
    with wave.open(str(path)) as w:
        assert w.getframerate() == RATE and w.getnchannels() == 1 and w.getsampwidth() == 2, path
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0


def pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


def load_clips() -> list[tuple[str, np.ndarray]]:
    clips = [(p.name, read_clip(p)) for p in sorted(DATA.glob("*.wav"))]
    if not clips:
        raise SystemExit(f"no clips in {DATA}")
    return clips


def load_transcripts() -> dict[str, str]:
    try:
        return json.loads((DATA / "transcripts.json").read_text())
    except OSError:
        return {}


# ---------------------------------------------------------------------- server process
def _die_with_parent() -> None:
    """preexec_fn: the server gets SIGKILL if this script dies without cleaning up (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ServerProcess:
    """`python -m server serve` as a child process, its log in a file (an unread pipe would
    fill and block the server). Stopped with SIGTERM, then SIGKILL."""

    def __init__(self, config: Path, sets: list[str], log_path: Path | None, term_timeout: float,
                 env: dict[str, str] | None = None) -> None:
        self.env = {**os.environ, **(env or {})}
        self.argv = [sys.executable, "-m", "server", "serve", "--config", str(config),
                     "--set", f"server.host={HOST}", "--set", "server.port=0",
                     "--set", "funasr.port=0"]  # no second listener on a fixed port
        for s in sets:
            self.argv += ["--set", s]
        self.term_timeout = term_timeout
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix="chorus-soak-", suffix=".log")
            os.close(fd)
            log_path = Path(name)
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.exit: dict[str, Any] = {}

    def start(self) -> None:
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            self.argv, cwd=ROOT, env=self.env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches this script only; it stops the server itself
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> float:
        """Port from the log line, then /healthz 200. Returns the seconds it took."""
        assert self.proc is not None
        t0 = time.monotonic()
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            if self.port is None:
                m = LISTENING.search(self.log_text())
                if m:
                    self.port = int(m.group(1))
            if self.port is not None:
                status, _ = http_get(self.port, "/healthz", timeout=2)
                if status == 200:
                    return time.monotonic() - t0
            time.sleep(0.25)
        what = "did not log its port" if self.port is None else "did not answer /healthz 200"
        raise RuntimeError(f"server {what} within {timeout:g} s:\n{self.log_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            t0 = time.monotonic()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(self.term_timeout)
                self.exit = {"signal": "SIGTERM", "exit_s": round(time.monotonic() - t0, 2)}
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
                self.exit = {"signal": "SIGKILL", "exit_s": round(time.monotonic() - t0, 2),
                             "note": f"did not exit within {self.term_timeout:g} s of SIGTERM"}
        else:
            self.exit.setdefault("note", "exited before the soak stopped it")
        self.exit["returncode"] = self.proc.returncode
        self._log.close()


def http_get(port: int, path: str, timeout: float = 10) -> tuple[int | None, str]:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (OSError, ValueError):
        return None, ""


def metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


# ---------------------------------------------------------------------- resource sampling
class GpuProbe:
    """GPU memory in use (MiB) by nvidia-smi (device total), else torch.cuda.mem_get_info; or none."""

    def __init__(self) -> None:
        self.kind = "none"
        self.description = "no GPU"
        if shutil.which("nvidia-smi"):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=20)
                if out.returncode == 0 and out.stdout.strip():
                    self.kind = "nvidia-smi"
                    self.description = "nvidia-smi: " + "; ".join(out.stdout.strip().splitlines()) + " (MiB total)"
                    return
            except (OSError, subprocess.SubprocessError):
                pass
        try:
            import importlib.util

            if importlib.util.find_spec("torch") is not None:
                import torch

                if torch.cuda.is_available():
                    self.kind = "torch"
                    self.description = f"torch.cuda: {torch.cuda.get_device_name(0)} (device-wide use, this script's context included)"
        except Exception:  # noqa: BLE001 - a broken CUDA install means: no GPU figures
            pass

    def used_mib(self) -> float | None:
        try:
            if self.kind == "nvidia-smi":
                out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10)
                return float(sum(float(v) for v in out.stdout.split()))
            if self.kind == "torch":
                import torch

                free, total = torch.cuda.mem_get_info(0)
                return (total - free) / MIB
        except Exception:  # noqa: BLE001
            return None
        return None


class Sampler(threading.Thread):
    """Once a second: the server's RSS (children included) and CPU %, GPU memory, open clients."""

    def __init__(self, pid: int, gpu: GpuProbe, active: list[int], t0: float) -> None:
        super().__init__(daemon=True)
        import psutil

        self.psutil = psutil
        self.proc = psutil.Process(pid)
        self.gpu = gpu
        self.active = active  # [open client connections], updated by the event loop
        self.t0 = t0
        self.phase = "run"
        self.samples: list[dict] = []
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def rss_mib(self) -> float | None:
        try:
            procs = [self.proc] + self.proc.children(recursive=True)
        except self.psutil.Error:
            return None
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except self.psutil.Error:
                pass
        return total / MIB

    def sample(self) -> dict:
        try:
            cpu = self.proc.cpu_percent(None)
        except self.psutil.Error:
            cpu = None
        s = {"t_s": round(time.monotonic() - self.t0, 2), "phase": self.phase,
             "rss_mib": _r(self.rss_mib()), "cpu_pct": _r(cpu, 1), "clients": self.active[0]}
        if self.gpu.kind != "none":
            s["gpu_mib"] = _r(self.gpu.used_mib())
        with self._lock:
            self.samples.append(s)
        return s

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            # Next whole second of the run; a stall (busy machine) skips ticks, never bunches them.
            elapsed = time.monotonic() - self.t0
            self._halt.wait(max(0.05, int(elapsed) + 1 - elapsed))

    def stop(self) -> None:
        self._halt.set()
        self.join(10)


def _r(v: float | None, nd: int = 1) -> float | None:
    return None if v is None else round(v, nd)


# ---------------------------------------------------------------------- clients
@dataclass
class Tally:
    sessions_started: int = 0
    well_behaved: int = 0
    vanished: int = 0
    vanished_after_speech_started: int = 0
    sessions_done: int = 0
    sessions_without_done: list[str] = field(default_factory=list)
    speech_started: int = 0
    finals: int = 0
    finals_lost: int = 0
    lost_detail: list[str] = field(default_factory=list)
    empty_finals: int = 0
    empty_detail: list[str] = field(default_factory=list)
    order_violations: list[str] = field(default_factory=list)
    partials: int = 0
    errors_by_code: Counter = field(default_factory=Counter)
    refused_by_status: Counter = field(default_factory=Counter)
    refusal_reasons: Counter = field(default_factory=Counter)
    connect_failures: Counter = field(default_factory=Counter)
    close_codes: Counter = field(default_factory=Counter)
    refs: list[str] = field(default_factory=list)
    hyps: list[str] = field(default_factory=list)


def _handshake_status(exc: BaseException) -> int | None:
    resp = getattr(exc, "response", None)
    return getattr(resp, "status_code", None)


def _refusal_reason(exc: BaseException) -> str:
    """The `message` of a refused handshake's JSON body, numbers masked so that reasons group."""
    body = getattr(getattr(exc, "response", None), "body", b"") or b""
    try:
        text = str(json.loads(body).get("message", body[:120]))
    except (ValueError, AttributeError):
        text = body[:120].decode(errors="replace")
    return re.sub(r"\d+(\.\d+)?", "N", text)[:160]


def _retry_after(exc: BaseException) -> float:
    resp = getattr(exc, "response", None)
    try:
        return float(resp.headers.get("Retry-After", "1"))  # type: ignore[union-attr]
    except (AttributeError, TypeError, ValueError):
        return 1.0


def _drop_tcp(ws: Any) -> None:
    """Vanish: RST the connection (SO_LINGER on, 0 s) without a close frame."""
    sock = ws.transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    ws.transport.abort()


async def one_client(url: str, idx: int, name: str, clip: np.ndarray, vanish: bool, rng: np.random.Generator,
                     tally: Tally, transcripts: dict[str, str], active: list[int], chunk_ms: int,
                     deadline_connect: float) -> None:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

    lead = np.zeros(int(rng.uniform(0.3, 1.0) * RATE), dtype=np.float32)
    if vanish:
        audio = np.concatenate([lead, clip[: int(len(clip) * rng.uniform(0.4, 0.8))]])
    else:
        tail = np.zeros(int(rng.uniform(1.0, 2.0) * RATE), dtype=np.float32)
        audio = np.concatenate([lead, clip, tail])

    # Handshake, retried while the server refuses (503 overloaded / 429), within the run.
    ws = None
    while ws is None:
        try:
            ws = await asyncio.wait_for(connect(url, max_size=None, open_timeout=HANDSHAKE_TIMEOUT_S),
                                        HANDSHAKE_TIMEOUT_S + 5)
        except InvalidStatus as e:
            status = _handshake_status(e)
            tally.refused_by_status[str(status)] += 1
            tally.refusal_reasons[_refusal_reason(e)] += 1
            if time.monotonic() + 1 > deadline_connect:
                return
            await asyncio.sleep(min(5.0, max(0.2, _retry_after(e))))
        except (OSError, asyncio.TimeoutError, InvalidHandshake) as e:
            tally.connect_failures[type(e).__name__] += 1
            if time.monotonic() + 1 > deadline_connect:
                return
            await asyncio.sleep(1.0)

    tally.sessions_started += 1
    active[0] += 1
    started: list[int] = []
    finals: dict[int, dict] = {}
    final_order: list[int] = []
    got_done = False
    label = f"client {idx} ({name})"

    async def reader() -> None:
        nonlocal got_done
        try:
            async for raw in ws:
                m = json.loads(raw)
                kind = m.get("type")
                if kind == "speech_started":
                    started.append(m["segment_id"])
                elif kind == "final":
                    sid = m["segment_id"]
                    if got_done:
                        tally.order_violations.append(f"{label}: final for segment {sid} after done")
                    if sid not in started:
                        tally.order_violations.append(f"{label}: final for segment {sid} without speech_started")
                    if sid in finals:
                        tally.order_violations.append(f"{label}: final for segment {sid} repeated")
                    elif final_order and sid < final_order[-1]:
                        tally.order_violations.append(f"{label}: final {sid} after final {final_order[-1]}")
                    finals[sid] = m
                    final_order.append(sid)
                elif kind == "partial":
                    tally.partials += 1
                    if m.get("segment_id") in finals:
                        tally.order_violations.append(f"{label}: partial after the final of segment {m['segment_id']}")
                elif kind == "error":
                    tally.errors_by_code[m.get("code", "?")] += 1
                elif kind == "done":
                    got_done = True
        except ConnectionClosed:
            pass

    rd = asyncio.create_task(reader())
    try:
        try:
            await send_paced(ws, audio, RATE, chunk_ms, 1.0, encode=pcm16)
        except ConnectionClosed:
            pass  # the server closed on us: shows below as no `done`
        if vanish:
            tally.vanished += 1
            tally.vanished_after_speech_started += bool(started)
            _drop_tcp(ws)
            rd.cancel()
            return
        tally.well_behaved += 1
        try:
            await ws.send(json.dumps({"type": "stop"}))
        except ConnectionClosed:
            pass
        try:
            await asyncio.wait_for(asyncio.shield(rd), DONE_TIMEOUT_S)
        except asyncio.TimeoutError:
            pass
        try:
            await asyncio.wait_for(ws.close(), 10)
        except (asyncio.TimeoutError, ConnectionClosed):
            pass
        tally.close_codes[str(ws.close_code)] += 1
        # The verdict for this session.
        if got_done:
            tally.sessions_done += 1
        else:
            tally.sessions_without_done.append(f"{label}: no done within {DONE_TIMEOUT_S:g} s of stop "
                                               f"(close code {ws.close_code})")
        tally.speech_started += len(started)
        tally.finals += len(finals)
        lost = [s for s in started if s not in finals]
        tally.finals_lost += len(lost)
        if lost:
            tally.lost_detail.append(f"{label}: segments {lost} had speech_started and no final")
        for sid in sorted(finals):
            f = finals[sid]
            if not str(f.get("text", "")).strip() or "error" in f:
                tally.empty_finals += 1
                tally.empty_detail.append(f"{label}: segment {sid} final {json.dumps(f)[:300]}")
        if name in transcripts:
            tally.refs.append(transcripts[name])
            tally.hyps.append(" ".join(str(finals[s].get("text", "")) for s in sorted(finals)))
    finally:
        if not rd.done():
            rd.cancel()
        active[0] -= 1
        if not vanish and ws.state.name != "CLOSED":
            _drop_tcp(ws)  # interrupted (Ctrl-C, an exception): do not leave it half open


def vanishes(k: int, fraction: float) -> bool:
    """Exactly `fraction` of clients over time: client k vanishes when floor((k+1)f) > floor(kf)."""
    return int((k + 1) * fraction) > int(k * fraction)


async def run_clients(url: str, sessions: int, duration_s: float, vanish_fraction: float, seed: int,
                      chunk_ms: int, tally: Tally, active: list[int], log=print) -> None:
    clips = load_clips()
    transcripts = load_transcripts()
    rng = np.random.default_rng(seed)
    counter = iter(range(10**9))
    t_start = time.monotonic()
    t_end = t_start + duration_s
    mean_clip_s = statistics.mean(len(c) for _, c in clips) / RATE
    logged = [0]

    async def worker(w: int) -> None:
        # Staggered starts: joins and leaves interleave instead of moving in lockstep.
        await asyncio.sleep(min(duration_s / 2, w * (mean_clip_s + 2.0) / max(1, sessions)))
        while time.monotonic() < t_end:
            k = next(counter)
            name, clip = clips[int(rng.integers(len(clips)))]
            await one_client(url, k, name, clip, vanishes(k, vanish_fraction), rng, tally, transcripts,
                             active, chunk_ms, t_end)
            if tally.sessions_started >= logged[0] + 10:
                logged[0] = tally.sessions_started // 10 * 10
                log(f"  {time.monotonic() - t_start:6.1f} s: {tally.sessions_started} sessions, {tally.finals} finals, "
                    f"{tally.finals_lost} lost, {sum(tally.refused_by_status.values())} refused handshakes")

    await asyncio.gather(*(worker(w) for w in range(sessions)))


# ---------------------------------------------------------------------- the soak
def _slope_mib_per_min(samples: list[dict]) -> float | None:
    pts = [(s["t_s"], s["rss_mib"]) for s in samples if s["rss_mib"] is not None]
    if len(pts) < 3:
        return None
    t = np.array([p[0] for p in pts]) / 60.0
    y = np.array([p[1] for p in pts])
    if np.ptp(t) == 0:
        return None
    return float(np.polyfit(t, y, 1)[0])


def soak(sessions: int, minutes: float, vanish_fraction: float = 0.2, config: Path = ROOT / "configs" / "default.yaml",
         sets: list[str] | None = None, warmup_fraction: float = 0.25, seed: int = 0, chunk_ms: int = 100,
         max_growth_mib: float | None = None, server_log: Path | None = None, term_timeout: float = 20.0,
         server_env: dict[str, str] | None = None, log=print) -> dict:
    """Run the whole soak and return the report (see the module docstring)."""
    if sessions < 1 or minutes <= 0 or not 0 <= vanish_fraction < 1 or not 0 <= warmup_fraction < 1:
        raise ValueError("need sessions >= 1, minutes > 0, 0 <= vanish_fraction < 1, 0 <= warmup_fraction < 1")
    duration_s = minutes * 60.0
    server = ServerProcess(Path(config), list(sets or []), server_log, term_timeout, server_env)
    report: dict[str, Any] = {
        "command": " ".join(sys.argv), "sessions": sessions, "minutes": minutes,
        "vanish_fraction": vanish_fraction, "warmup_fraction": warmup_fraction, "seed": seed,
        "config": str(config), "sets": list(sets or []), "server_argv": server.argv, "server_env": server_env or {},
        "server_log": str(server.log_path), "cpu_count": os.cpu_count(),
    }
    tally = Tally()
    sampler: Sampler | None = None
    end_sample: dict | None = None
    idle_before: dict | None = None
    try:
        server.start()
        assert server.proc is not None
        report["server_pid"] = server.proc.pid
        log(f"server pid {server.proc.pid}, log {server.log_path}")
        report["server_ready_s"] = round(server.wait_ready(), 1)
        _, health = http_get(server.port, "/healthz")  # type: ignore[arg-type]
        try:
            report["model"] = json.loads(health).get("model")
        except ValueError:
            pass
        gpu = GpuProbe()
        report["gpu"] = gpu.description
        log(f"server ready on port {server.port} in {report['server_ready_s']} s; {gpu.description}; "
            f"{sessions} sessions for {minutes:g} min, {vanish_fraction:.0%} vanish, warm-up {warmup_fraction:.0%}")
        active = [0]
        t0 = time.monotonic()
        sampler = Sampler(server.proc.pid, gpu, active, t0)
        sampler.phase = "idle-before"
        idle_before = sampler.sample()  # loaded, warm-up batches run, no client yet
        sampler.phase = "run"
        sampler.start()
        url = f"ws://{HOST}:{server.port}/v1/stream?sample_rate={RATE}&encoding=pcm_s16le&language=en"
        asyncio.run(run_clients(url, sessions, duration_s, vanish_fraction, seed, chunk_ms, tally, active, log))
        report["clients_s"] = round(time.monotonic() - t0, 1)
        sampler.phase = "idle"
        time.sleep(SETTLE_S)
        end_sample = sampler.sample()
        # Cleanup: every session (vanished ones included) must be gone from the server.
        open_sessions = None
        cleanup_deadline = time.monotonic() + CLEANUP_WAIT_S
        while time.monotonic() < cleanup_deadline:
            status, text = http_get(server.port, "/metrics")  # type: ignore[arg-type]
            open_sessions = metric(text, "chorus_sessions_active") if status == 200 else None
            if open_sessions == 0:
                break
            time.sleep(0.5)
        report["server_sessions_active_after"] = open_sessions
        report["server_queue_depth_after"] = metric(text, "chorus_batcher_queue_depth") if status == 200 else None
        report["server_sessions_total"] = metric(text, "chorus_sessions_total") if status == 200 else None
        sampler.stop()
    except KeyboardInterrupt:
        report["interrupted"] = True
        log("interrupted; stopping the server")
    finally:
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        server.stop()
        report["server_exit"] = server.exit
        log_text = server.log_text()
        problems = [ln for ln in log_text.splitlines() if re.search(r" (WARNING|ERROR|CRITICAL) |Traceback", ln)]
        report["server_log_problems"] = {"count": len(problems), "first": problems[:20]}

    samples = sampler.samples if sampler is not None else []
    warm_t = warmup_fraction * duration_s
    after = [s for s in samples if s["t_s"] >= warm_t and s["rss_mib"] is not None]
    measured = [s for s in after if s["phase"] == "run"]
    run_samples = [s for s in samples if s["phase"] == "run"]
    rss_start = measured[0]["rss_mib"] if measured else None
    rss_end = end_sample["rss_mib"] if end_sample is not None else None
    rss_max = max((s["rss_mib"] for s in after), default=None)
    growth = None if rss_start is None or rss_end is None else rss_end - rss_start
    wer = None
    if tally.refs:
        from server.wer import word_error_rate

        wer = word_error_rate(tally.refs, tally.hyps)
    report.update({
        "sessions_run": tally.sessions_started,
        "well_behaved_sessions": tally.well_behaved,
        "vanished_sessions": tally.vanished,
        "vanished_after_speech_started": tally.vanished_after_speech_started,
        "sessions_done": tally.sessions_done,
        "sessions_without_done": tally.sessions_without_done,
        "speech_started": tally.speech_started,
        "finals_received": tally.finals,
        "finals_lost": tally.finals_lost,
        "lost_detail": tally.lost_detail,
        "empty_finals": tally.empty_finals,
        "empty_detail": tally.empty_detail,
        "order_violations": tally.order_violations,
        "partials_received": tally.partials,
        "errors_by_code": dict(tally.errors_by_code),
        "refused_handshakes_by_status": dict(tally.refused_by_status),
        "refusal_reasons": dict(tally.refusal_reasons),
        "connect_failures": dict(tally.connect_failures),
        "close_codes": dict(tally.close_codes),
        "wer": None if wer is None else round(wer, 4),
        "mean_connected_clients": _r(statistics.mean(s["clients"] for s in run_samples) if run_samples else None, 2),
        "warmup_s": round(warm_t, 1),
        "rss_start_mib": rss_start,
        "rss_start_t_s": measured[0]["t_s"] if measured else None,
        "rss_max_mib": rss_max,
        "rss_end_mib": rss_end,
        "rss_growth_mib": _r(growth),
        "rss_growth_pct": _r(None if growth is None or not rss_start else 100 * growth / rss_start, 2),
        "rss_idle_before_mib": idle_before["rss_mib"] if idle_before else None,
        "rss_idle_growth_mib": _r(None if idle_before is None or rss_end is None else rss_end - idle_before["rss_mib"]),
        "rss_slope_mib_per_min": _r(_slope_mib_per_min(measured), 2),
        "gpu_mib_start": measured[0].get("gpu_mib") if measured else None,
        "gpu_mib_max": max((s["gpu_mib"] for s in after if s.get("gpu_mib") is not None), default=None),
        "max_growth_mib": max_growth_mib,
        "samples": samples,
    })
    failures = []
    if report.get("interrupted"):
        failures.append("interrupted")
    if tally.finals_lost:
        failures.append(f"{tally.finals_lost} finals lost")
    if tally.empty_finals:
        failures.append(f"{tally.empty_finals} empty finals")
    if tally.sessions_without_done:
        failures.append(f"{len(tally.sessions_without_done)} well-behaved sessions got no done")
    if tally.order_violations:
        failures.append(f"{len(tally.order_violations)} ordering violations")
    if not report.get("interrupted") and report.get("server_sessions_active_after") != 0:
        failures.append(f"server still has {report.get('server_sessions_active_after')} sessions open after the run")
    if max_growth_mib is not None and (growth is None or growth > max_growth_mib):
        failures.append(f"RSS growth {growth} MiB after warm-up exceeds {max_growth_mib:g} MiB")
    if tally.sessions_done == 0 or tally.finals == 0:
        failures.append("no session completed with finals: nothing was measured")
    report["failures"] = failures
    report["ok"] = not failures
    return report


def summary(r: dict) -> str:
    def mib(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f} MiB"

    lines = [
        f"soak: {r['sessions']} concurrent sessions for {r['minutes']:g} min, {r['vanish_fraction']:.0%} vanishing "
        f"mid-segment; model {r.get('model')}; {r.get('gpu', '-')}; {r.get('cpu_count')} CPUs",
        f"sessions run {r['sessions_run']} ({r['well_behaved_sessions']} well-behaved, {r['sessions_done']} with done; "
        f"{r['vanished_sessions']} vanished, {r['vanished_after_speech_started']} of them after speech_started)",
        f"speech_started {r['speech_started']}, finals received {r['finals_received']}, finals LOST {r['finals_lost']}, "
        f"empty finals {r['empty_finals']}, order violations {len(r['order_violations'])}, WER {r['wer']}",
        f"errors by code {r['errors_by_code'] or '{}'}; refused handshakes {r['refused_handshakes_by_status'] or '{}'} "
        f"{r['refusal_reasons'] or ''}; mean connected clients {r['mean_connected_clients']}; "
        f"close codes {r['close_codes']}",
        f"RSS (warm-up = first {r['warmup_s']:g} s): start {mib(r['rss_start_mib'])} at {r['rss_start_t_s']} s, "
        f"max {mib(r['rss_max_mib'])}, end {mib(r['rss_end_mib'])}; growth {mib(r['rss_growth_mib'])} "
        f"({r['rss_growth_pct']} %), slope {r['rss_slope_mib_per_min']} MiB/min; idle before the first client "
        f"{mib(r['rss_idle_before_mib'])} (end - that: {mib(r['rss_idle_growth_mib'])})"
        + ("" if r["gpu_mib_start"] is None else f"; GPU start {r['gpu_mib_start']} MiB, max {r['gpu_mib_max']} MiB"),
        f"server after the run: sessions_active {r.get('server_sessions_active_after')}, queue depth "
        f"{r.get('server_queue_depth_after')}, exit {r.get('server_exit')}, log warnings/errors "
        f"{r['server_log_problems']['count']}",
        "OK" if r["ok"] else "FAILED: " + "; ".join(r["failures"]),
    ]
    for key in ("lost_detail", "empty_detail", "order_violations", "sessions_without_done"):
        lines += [f"  {x}" for x in r[key][:10]]
    lines += [f"  server log: {x}" for x in r["server_log_problems"]["first"][:10]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sessions", type=int, default=4, help="concurrent clients (default 4)")
    p.add_argument("--minutes", type=float, default=5.0, help="run length; clients start no new session after it (default 5)")
    p.add_argument("--vanish-fraction", type=float, default=0.2,
                   help="fraction of clients that drop the TCP connection mid-segment without stop (default 0.2)")
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="passed to chorus serve")
    p.add_argument("--warmup-fraction", type=float, default=0.25,
                   help="first part of the run excluded from the memory baseline (default 0.25)")
    p.add_argument("--max-growth-mib", type=float, default=None,
                   help="exit 1 if RSS grows more than this after warm-up (default: not checked)")
    p.add_argument("--out", type=Path, help="write the report, samples included, as JSON here")
    p.add_argument("--server-log", type=Path, help="the server's log file (default: a temp file)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-ms", type=int, default=100)
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment for the server, e.g. MALLOC_MMAP_THRESHOLD_=131072 (glibc then returns "
                        "large freed buffers to the OS, so RSS follows live memory instead of the high-water mark)")
    p.add_argument("--term-timeout", type=float, default=20.0, help="seconds between SIGTERM and SIGKILL")
    args = p.parse_args(argv)

    # Ctrl-C raises KeyboardInterrupt (inside asyncio.run it cancels the clients first), also when
    # started with SIGINT ignored (a background job); SIGTERM is turned into the same SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda signum, frame: os.kill(os.getpid(), signal.SIGINT))
    try:
        report = soak(args.sessions, args.minutes, args.vanish_fraction, args.config, args.set, args.warmup_fraction,
                      args.seed, args.chunk_ms, args.max_growth_mib, args.server_log, args.term_timeout,
                      dict(e.split("=", 1) for e in args.server_env if "=" in e),
                      log=lambda s: print(s, flush=True))
    except (RuntimeError, ValueError) as e:
        print(f"soak: {e}", file=sys.stderr)
        return 2
    if args.out:
        args.out.write_text(json.dumps(report, indent=1, default=str))
    print(summary(report), flush=True)
    if report["sessions_done"] == 0 or report["finals_received"] == 0:
        return 2
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
