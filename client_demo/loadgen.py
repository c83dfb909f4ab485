"""Load generator: N concurrent real-time sessions of real speech against a Chorus server.

    python client_demo/loadgen.py --url ws://127.0.0.1:8765/v1/stream --sessions 4 --duration 30
    python client_demo/loadgen.py --spawn-server "chorus serve --config configs/default.yaml" \
        --compare-batching --ramp 1,2,4,6,8 --duration 30 --out docs/loadgen.md --plot docs/loadgen.svg

Each session streams the test clips in a seeded random order, 1.2 s of silence apart, at
real-time pace (100 ms chunks on absolute deadlines), then `stop`. Measured per segment:
final latency (from sending the audio that holds the final's `cut_ms` to the final's
arrival), partial cadence, errors, lost finals, and WER against the clips' transcripts.
`--compare-batching` runs the same ramp against the server with batching on and with
`batcher.enabled=false` (one model call per request) in one invocation.
All traffic goes to the given URL (loopback in this project); every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client_demo.pacing import SendClock, percentile, send_paced  # noqa: E402
from server.audio.wavfile import load_audio_16k  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GAP_S = 1.2
CHUNK_MS = 100


@dataclass
class SessionResult:
    final_latency_ms: list[float] = field(default_factory=list)
    partial_gap_ms: list[float] = field(default_factory=list)
    first_partial_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    refused: int | None = None  # HTTP status of a refused handshake (503 overloaded, 429, ...)
    lost_finals: int = 0
    finals: int = 0
    refs: list[str] = field(default_factory=list)
    hyps: list[str] = field(default_factory=list)


def build_stream(clips: list[str], duration: float, seed: int) -> tuple[np.ndarray, list[tuple[int, int, str]]]:
    """Concatenate clips (seeded order) with silence until `duration` s; return audio and clip spans in ms."""
    rng = random.Random(seed)
    audios = {c: load_audio_16k(c) for c in clips}
    parts, spans, pos = [], [], 0
    gap = np.zeros(int(GAP_S * 16000), np.float32)
    while pos < duration * 16000:
        c = rng.choice(clips)
        parts += [gap, audios[c]]
        start = pos + len(gap)
        spans.append((start * 1000 // 16000, (start + len(audios[c])) * 1000 // 16000, Path(c).name))
        pos = start + len(audios[c])
    parts.append(gap)
    return np.concatenate(parts), spans


def assign_finals(finals: list[dict], spans: list[tuple[int, int, str]]) -> list[str]:
    """Text heard for each clip span: finals whose middle falls inside the span (+- 300 ms)."""
    out = []
    for s, e, _ in spans:
        words = [f["text"] for f in finals if s - 300 <= (f["start_ms"] + f["end_ms"]) / 2 <= e + 300]
        out.append(" ".join(w for w in words if w))
    return out


async def one_session(url: str, audio: np.ndarray, spans, transcripts: dict, speed: float, delay: float) -> SessionResult:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    res = SessionResult()
    await asyncio.sleep(delay)
    clock = SendClock(16000)
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    finals: list[dict] = []
    started: set[int] = set()
    last_partial: dict[int, float] = {}
    speech_at: dict[int, float] = {}
    done = False
    try:
        async with connect(url, max_size=None, open_timeout=30) as ws:
            await ws.send(json.dumps({"type": "start", "sample_rate": 16000, "language": "en"}))

            async def reader() -> None:
                nonlocal done
                async for raw in ws:
                    now = time.monotonic()
                    m = json.loads(raw)
                    t = m["type"]
                    if t == "speech_started":
                        started.add(m["segment_id"])
                        speech_at[m["segment_id"]] = now
                    elif t == "partial":
                        sid = m["segment_id"]
                        if sid in last_partial:
                            res.partial_gap_ms.append((now - last_partial[sid]) * 1000)
                        elif sid in speech_at:
                            res.first_partial_ms.append((now - speech_at[sid]) * 1000)
                        last_partial[sid] = now
                    elif t == "final":
                        finals.append(m)
                        lat = clock.latency_ms(m["cut_ms"], now)
                        if lat is not None:
                            res.final_latency_ms.append(lat)
                    elif t == "error":
                        res.errors.append(m["code"])
                    elif t == "done":
                        done = True

            rd = asyncio.create_task(reader())
            await send_paced(ws, pcm, 16000, CHUNK_MS, speed, clock=clock)
            await ws.send(json.dumps({"type": "stop"}))
            await asyncio.wait_for(rd, timeout=120 + len(audio) / 16000)
    except InvalidStatus as e:
        # Refused before the upgrade (admission control): not an error of an admitted session.
        res.refused = e.response.status_code
        return res
    except Exception as e:  # noqa: BLE001 - count it and carry on with the other sessions
        res.errors.append(f"disconnect:{type(e).__name__}")
    if not done:
        res.errors.append("no_done")
    got = {f["segment_id"] for f in finals}
    res.lost_finals = len(started - got)
    res.finals = len(finals)
    res.refs = [transcripts.get(name, "") for _, _, name in spans]
    res.hyps = assign_finals(finals, spans)
    return res


def summarize(results: list[SessionResult], sessions: int) -> dict:
    """Figures over the admitted sessions; refused handshakes are counted apart."""
    refused = [r.refused for r in results if r.refused is not None]
    results = [r for r in results if r.refused is None]
    lat = [x for r in results for x in r.final_latency_ms]
    gaps = [x for r in results for x in r.partial_gap_ms]
    first = [x for r in results for x in r.first_partial_ms]
    wer = None
    try:
        from server.wer import word_error_rate

        refs = [x for r in results for x in r.refs]
        hyps = [x for r in results for x in r.hyps]
        wer = word_error_rate(refs, hyps) if refs else None
    except ImportError:
        pass
    return {
        "sessions": sessions,
        "admitted": len(results),
        "refused": len(refused),
        "refused_status": sorted(set(refused)),
        "finals": sum(r.finals for r in results),
        "final_latency_ms": {"p50": percentile(lat, 50), "p95": percentile(lat, 95), "max": max(lat) if lat else None},
        "partial_gap_ms": {"p50": percentile(gaps, 50), "p95": percentile(gaps, 95)},
        "first_partial_ms": {"p50": percentile(first, 50), "p95": percentile(first, 95)},
        "errors": sum(len(r.errors) for r in results),
        "error_codes": sorted({e for r in results for e in r.errors}),
        "lost_finals": sum(r.lost_finals for r in results),
        "wer": wer,
    }


def _transcripts() -> dict:
    p = ROOT / "tests" / "data" / "transcripts.json"
    return json.loads(p.read_text()) if p.exists() else {}


async def _run_sessions(url: str, sessions: int, duration: float, clips: list[str], seed: int, speed: float,
                        first_index: int = 0, arrival_s: float = 0.0) -> list[SessionResult]:
    transcripts = _transcripts()
    tasks = []
    for i in range(sessions):
        audio, spans = build_stream(clips, duration, seed + first_index + i)
        # Arrivals spread over a second, or one every `arrival_s` (how admission control sees them).
        delay = (first_index + i) * arrival_s if arrival_s else i / max(1, sessions)
        tasks.append(one_session(url, audio, spans, transcripts, speed, delay=delay))
    return await asyncio.gather(*tasks)


async def run_load(url: str, sessions: int, duration: float, clips: list[str], latency_target_ms: float = 1500,
                   seed: int = 0, speed: float = 1.0) -> dict:
    """Single-process run; returns the summary (see `summarize`) plus `within_target`."""
    results = await _run_sessions(url, sessions, duration, clips, seed, speed)
    s = summarize(results, sessions)
    s["within_target"] = holds_target(s, latency_target_ms)
    return s


def holds_target(summary: dict, target_ms: float, partial_gap_ms: float | None = None) -> bool:
    """p95 final latency within target, no errors, no lost finals, and (if given) p95 gap
    between a segment's partials within `partial_gap_ms`."""
    p95 = summary["final_latency_ms"]["p95"]
    ok = p95 is not None and p95 <= target_ms and summary["errors"] == 0 and summary["lost_finals"] == 0
    if ok and partial_gap_ms is not None:
        gap = summary["partial_gap_ms"]["p95"]
        ok = gap is not None and gap <= partial_gap_ms
    return ok


def _proc_main(args: tuple) -> list[SessionResult]:
    url, n, duration, clips, seed, speed, first, arrival_s = args
    return asyncio.run(_run_sessions(url, n, duration, clips, seed, speed, first, arrival_s))


def run_multiproc(url: str, sessions: int, duration: float, clips: list[str], seed: int, speed: float, procs: int,
                  arrival_s: float = 0.0) -> dict:
    """Split sessions over processes so the generator is not the bottleneck; merge raw samples."""
    if procs <= 1:
        return summarize(asyncio.run(_run_sessions(url, sessions, duration, clips, seed, speed, 0, arrival_s)), sessions)
    shares = [sessions // procs + (1 if i < sessions % procs else 0) for i in range(procs)]
    jobs, first = [], 0
    for n in shares:
        if n:
            jobs.append((url, n, duration, clips, seed, speed, first, arrival_s))
            first += n
    with mp.get_context("spawn").Pool(len(jobs)) as pool:
        parts = pool.map(_proc_main, jobs)
    return summarize([r for part in parts for r in part], sessions)


# ---------------------------------------------------------------------- spawned servers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SpawnedServer:
    def __init__(self, command: str, extra: list[str]) -> None:
        argv = shlex.split(command) + extra
        if "--port" not in argv:
            argv += ["--port", str(_free_port())]
        self.port = int(argv[argv.index("--port") + 1])
        self.argv = argv

    def __enter__(self) -> "SpawnedServer":
        # The server's log goes to a file, not a pipe: an unread pipe fills after ~64 KB of
        # log lines (a few hundred sessions) and then blocks the server's event loop.
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"server exited: {self.log.read()[-2000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError("server did not become ready in 300 s")

    def model(self) -> dict:
        """The server's own account of its model and device (from /healthz, which answers 503
        with the same body while it admits no new session)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=60) as r:
                return json.loads(r.read()).get("model", {})
        except urllib.error.HTTPError as e:
            return json.loads(e.read()).get("model", {})

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"


def _samples(metrics_text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value} (comments skipped)."""
    out = {}
    for line in metrics_text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


STAGES = ("decode", "vad", "send", "features", "encoder", "decoder", "model", "postprocess")


def time_breakdown(before: str, after: str) -> dict:
    """Where the server's time went between two /metrics scrapes: seconds per stage (event
    loop: decode, vad, send; worker: features, encoder, decoder, model, postprocess), the
    event-loop thread's CPU and the whole process's CPU seconds, each per second of audio
    received; plus the event loop's lag (the upper bound of the histogram bucket holding its
    99th percentile)."""
    a, b = _samples(before), _samples(after)
    d = lambda k: b.get(k, 0.0) - a.get(k, 0.0)  # noqa: E731
    audio = d("chorus_audio_seconds_total")
    out: dict = {"audio_s": round(audio, 1), "ms_per_audio_s": {}}
    if audio <= 0:
        return out
    for st in STAGES:
        v = d(f'chorus_stage_seconds_total{{stage="{st}"}}')
        if v > 0:
            out["ms_per_audio_s"][st] = round(1000 * v / audio, 3)
    out["ms_per_audio_s"]["loop_cpu"] = round(1000 * d("chorus_event_loop_cpu_seconds_total") / audio, 3)
    out["ms_per_audio_s"]["process_cpu"] = round(1000 * d("process_cpu_seconds_total") / audio, 3)
    total = d("chorus_event_loop_lag_seconds_count")
    if total > 0:
        buckets = sorted(
            (float(m.group(1)), d(k)) for k in b
            if (m := re.match(r'chorus_event_loop_lag_seconds_bucket\{le="([^"]+)"\}', k)) and m.group(1) != "+Inf"
        )
        out["loop_lag_p99_ms"] = next((1000 * le for le, n in buckets if n >= 0.99 * total), None)
    return out


def mean_batch_size(metrics_text: str) -> float | None:
    s = _samples(metrics_text)
    count = s.get("chorus_batch_size_count")
    return s["chorus_batch_size_sum"] / count if count else None


def _scrape(ws_url: str) -> str | None:
    """/metrics of the server behind a ws:// URL, or None (with a warning on stderr) if it
    does not answer: a lost breakdown must not lose the step's latency figures."""
    parts = urlsplit(ws_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    try:
        with urllib.request.urlopen(f"{scheme}://{parts.netloc}/metrics", timeout=60) as r:
            return r.read().decode()
    except OSError as e:
        print(f"warning: no /metrics from {parts.netloc} ({e}); no time breakdown for this step", file=sys.stderr)
        return None


# ---------------------------------------------------------------------- reporting
def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def largest_within(rows: list[dict], target: float, partial_gap_ms: float | None = None) -> int:
    ok = [r["sessions"] for r in rows if holds_target(r, target, partial_gap_ms)]
    return max(ok) if ok else 0


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def markdown(modes: dict[str, list[dict]], target: float, command: str, duration: float,
             partial_gap_ms: float | None = None, note: str | None = None) -> str:
    gap = f", p95 gap between partials {partial_gap_ms:g} ms" if partial_gap_ms is not None else ""
    out = [f"## loadgen run {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
           f"- command: `{command}`", f"- machine: {machine()}",
           f"- each session: {duration:g} s of real speech clips 1.2 s apart at real-time pace; "
           f"target p95 final latency {target:g} ms{gap}"]
    if note:
        out.append(f"- {note}")
    out.append("")
    for mode, rows in modes.items():
        out.append(f"### {mode}: largest N within target = **{largest_within(rows, target, partial_gap_ms)}**")
        if rows and rows[0].get("server"):
            out.append("")
            out.append("server: " + ", ".join(f"{k}={v}" for k, v in rows[0]["server"].items()))
        out.append("")
        out.append("| sessions | admitted | refused | finals | final p50 ms | final p95 ms | final max ms | first partial p50 ms | partial gap p50 ms | partial gap p95 ms | errors | lost finals | WER | mean batch |")
        out.append("| --- " * 14 + "|")
        for r in rows:
            wer = "-" if r.get("wer") is None else f"{r['wer']:.1%}"
            mb = "-" if r.get("mean_batch") is None else f"{r['mean_batch']:.2f}"
            f, g = r["final_latency_ms"], r["partial_gap_ms"]
            refused = f"{r.get('refused', 0)}" + (f" ({', '.join(map(str, r['refused_status']))})" if r.get("refused") else "")
            out.append(f"| {r['sessions']} | {r.get('admitted', r['sessions'])} | {refused} | {r['finals']} | {_fmt(f['p50'])} | "
                       f"{_fmt(f['p95'])} | {_fmt(f['max'])} | {_fmt(r['first_partial_ms']['p50'])} | "
                       f"{_fmt(g['p50'])} | {_fmt(g['p95'])} | {r['errors']} | {r['lost_finals']} | {wer} | {mb} |")
        out.append("")
        rows_with = [r for r in rows if r.get("time", {}).get("ms_per_audio_s")]
        if rows_with:
            cols = [c for c in (*STAGES, "loop_cpu", "process_cpu") if any(c in r["time"]["ms_per_audio_s"] for r in rows_with)]
            out.append(f"Where the server's time went ({mode}), ms per second of audio (device time for worker "
                       "stages on GPU; loop_cpu = the event-loop thread's CPU, all of it; process_cpu = the "
                       "whole server process):")
            out.append("")
            out.append("| sessions | " + " | ".join(cols) + " | loop lag p99 ms |")
            out.append("| --- " * (len(cols) + 2) + "|")
            for r in rows_with:
                t = r["time"]
                cells = [f"{t['ms_per_audio_s'][c]:.2f}" if c in t["ms_per_audio_s"] else "-" for c in cols]
                lag = t.get("loop_lag_p99_ms")
                out.append(f"| {r['sessions']} | " + " | ".join(cells) + f" | {'-' if lag is None else f'<= {lag:g}'} |")
            out.append("")
    return "\n".join(out) + "\n"


def svg_plot(modes: dict[str, list[dict]], target: float, width: int = 640, height: int = 400) -> str:
    """p95 final latency against sessions, one line per mode, the target dashed."""
    pts = {m: [(r["sessions"], r["final_latency_ms"]["p95"]) for r in rows if r["final_latency_ms"]["p95"] is not None] for m, rows in modes.items()}
    xs = [x for p in pts.values() for x, _ in p] or [1]
    ys = [y for p in pts.values() for _, y in p] + [target]
    x_max, y_max = max(xs), max(ys) * 1.1
    left, right, top, bottom = 70, 20, 30, 50
    pw, ph = width - left - right, height - top - bottom
    sx = lambda x: left + pw * x / x_max  # noqa: E731
    sy = lambda y: top + ph * (1 - y / y_max)  # noqa: E731
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    el = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
          f'<rect width="{width}" height="{height}" fill="white"/>',
          f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="black"/>',
          f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="black"/>',
          f'<text x="{left + pw / 2}" y="{height - 10}" text-anchor="middle">concurrent sessions</text>',
          f'<text x="15" y="{top + ph / 2}" transform="rotate(-90 15 {top + ph / 2})" text-anchor="middle">p95 final latency (ms)</text>',
          f'<line x1="{left}" y1="{sy(target):.1f}" x2="{left + pw}" y2="{sy(target):.1f}" stroke="gray" stroke-dasharray="6,4"/>',
          f'<text x="{left + pw - 4}" y="{sy(target) - 4:.1f}" text-anchor="end" fill="gray">target {target:g} ms</text>']
    for i in range(5):
        yv = y_max * i / 4
        el.append(f'<text x="{left - 6}" y="{sy(yv) + 4:.1f}" text-anchor="end">{yv:.0f}</text>')
    for xv in sorted(set(xs)):
        el.append(f'<text x="{sx(xv):.1f}" y="{top + ph + 18}" text-anchor="middle">{xv}</text>')
    for i, (mode, p) in enumerate(pts.items()):
        c = colors[i % len(colors)]
        if p:
            el.append(f'<polyline fill="none" stroke="{c}" stroke-width="2" points="' + " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in p) + '"/>')
            el += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{c}"/>' for x, y in p]
        el.append(f'<text x="{left + 10}" y="{top + 14 + 16 * i}" fill="{c}">{mode}</text>')
    el.append("</svg>")
    return "\n".join(el) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="ws://127.0.0.1:8765/v1/stream")
    p.add_argument("--sessions", type=int, default=2)
    p.add_argument("--ramp", help="comma-separated session counts, e.g. 1,2,4,8 (overrides --sessions)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of audio per session")
    p.add_argument("--clips", nargs="+", default=[str(c) for c in sorted((ROOT / "tests" / "data").glob("*.wav"))])
    p.add_argument("--procs", type=int, default=1, help="generator processes")
    p.add_argument("--latency-target-ms", type=float, default=1500.0)
    p.add_argument("--partial-gap-target-ms", type=float,
                   help="also require the p95 gap between a segment's partials to be within this")
    p.add_argument("--speed", type=float, default=1.0)
    p.add_argument("--arrival-interval", type=float, default=0.0, metavar="S",
                   help="start session i at i*S seconds (default: all within the first second)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spawn-server", help="command that starts a server (a free --port is appended)")
    p.add_argument("--compare-batching", action="store_true", help="with --spawn-server: batching on, then off")
    p.add_argument("--compare-gpu", action="store_true",
                   help="with --spawn-server: batching + CUDA graphs, batching with eager model calls, and one "
                        "eager call per request, in that order")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=ARGS",
                   help="with --spawn-server: a named server variant, ARGS appended to its command "
                        "(e.g. 'fp16=--set runner.dtype=float16'); repeatable")
    p.add_argument("--stop-after-miss", action="store_true", help="end a ramp at the first N that misses the target")
    p.add_argument("--out", type=Path, help="append a markdown report here")
    p.add_argument("--note", help="a line for the report, e.g. that the model has random weights")
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path, help="write an SVG plot here")
    args = p.parse_args()
    ramp = [int(x) for x in args.ramp.split(",")] if args.ramp else [args.sessions]
    variants: dict[str, list[str]] = {}
    if (args.compare_batching or args.compare_gpu or args.variant) and not args.spawn_server:
        p.error("--compare-batching, --compare-gpu and --variant need --spawn-server")
    if args.compare_gpu:
        variants["batching + CUDA graphs"] = ["--set", "runner.graphs.enabled=true"]
        variants["batching, eager"] = ["--set", "runner.graphs.enabled=false"]
        variants["one eager call per request"] = ["--set", "runner.graphs.enabled=false", "--set", "batcher.enabled=false"]
    elif args.compare_batching:
        variants["batching on"] = []
        variants["batching off (one call per request)"] = ["--set", "batcher.enabled=false"]
    for v in args.variant:
        name, sep, extra = v.partition("=")
        if not sep or not name:
            p.error(f"--variant {v!r}: expected NAME=ARGS")
        variants[name] = shlex.split(extra)
    if not variants:
        variants["as configured"] = []
    modes: dict[str, list[dict]] = {}
    for mode, extra in variants.items():
        rows: list[dict] = []
        for n in ramp:
            if args.spawn_server:
                # A fresh server per step, so one step's backlog or metrics never leak into the next.
                with SpawnedServer(args.spawn_server, extra) as srv:
                    before = _scrape(srv.url)
                    row = run_multiproc(srv.url, n, args.duration, args.clips, args.seed, args.speed, args.procs, args.arrival_interval)
                    after = _scrape(srv.url)
                    row["server"] = srv.model()
            else:
                before = _scrape(args.url)
                row = run_multiproc(args.url, n, args.duration, args.clips, args.seed, args.speed, args.procs, args.arrival_interval)
                after = _scrape(args.url)
            if before is not None and after is not None:
                row["mean_batch"] = mean_batch_size(after)
                row["time"] = time_breakdown(before, after)
            row["within_target"] = holds_target(row, args.latency_target_ms, args.partial_gap_target_ms)
            rows.append(row)
            print(f"[{mode}] N={n}: final p50/p95 {_fmt(row['final_latency_ms']['p50'])}/{_fmt(row['final_latency_ms']['p95'])} ms, "
                  f"admitted {row['admitted']}, refused {row['refused']} {row['refused_status']}, "
                  f"errors {row['errors']}, lost {row['lost_finals']}, mean batch {row.get('mean_batch')}, "
                  f"WER {row['wer']}, ms per audio s {row.get('time', {}).get('ms_per_audio_s')}", flush=True)
            if args.stop_after_miss and not row["within_target"]:
                break
        modes[mode] = rows
    report = markdown(modes, args.latency_target_ms, " ".join(shlex.quote(a) for a in sys.argv), args.duration,
                      args.partial_gap_target_ms, args.note)
    print(report)
    if args.out:
        with args.out.open("a") as f:
            f.write(report + "\n")
    if args.json:
        args.json.write_text(json.dumps(modes, indent=2))
    if args.plot:
        args.plot.write_text(svg_plot(modes, args.latency_target_ms))
    return 0


if __name__ == "__main__":
    sys.exit(main())
