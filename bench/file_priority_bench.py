"""Do recordings sent whole hurt live streams? Live final latency with and without file work.

    .venv/bin/python bench/file_priority_bench.py --sessions 2 --duration 60 --files 3 --file-minutes 3 \
        --out docs/benchmarks.md

One spawned `chorus serve`, two runs side by side: (A) `--sessions` live real-time sessions
(client_demo/loadgen.py's sessions: the test clips in a seeded order, at real-time pace); (B)
the same sessions while `--files` long recordings (the clips joined with pauses, as MP3) are
posted to the OpenAI-compatible API at the start of the run. Printed and recorded: live p50 /
p95 final latency in both runs and their ratio, lost finals, the files' completion times and
audio seconds per second, and the model calls per priority class (from /metrics). All traffic
goes to loopback; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client_demo.loadgen import SpawnedServer, _free_port, _run_sessions, _samples, machine, summarize  # noqa: E402
from server.audio.wavfile import load_audio_16k  # noqa: E402
from tests.audiofiles import encode  # noqa: E402

CLIPS = sorted((ROOT / "tests" / "data").glob("*.wav"))


def long_recording(minutes: float, seed: int) -> bytes:
    """The clips in a seeded order with 0.5-2 s pauses, to ``minutes`` long, as a 64 kbit/s MP3."""
    rng = np.random.default_rng(seed)
    clips = [load_audio_16k(p) for p in CLIPS]
    parts, total = [], 0
    while total < minutes * 60 * 16000:
        clip = clips[rng.integers(len(clips))]
        pause = np.zeros(int(rng.uniform(0.5, 2.0) * 16000), np.float32)
        parts += [clip, pause]
        total += len(clip) + len(pause)
    return encode(np.concatenate(parts), "mp3", bit_rate=64000)[1]


def post_files(api: str, files: list[bytes], results: list[dict]) -> None:
    """Post every file at once (a thread of its own: the live clients keep their loop)."""
    import aiohttp

    async def one(i: int, data: bytes) -> None:
        t0 = time.monotonic()
        form = aiohttp.FormData()
        form.add_field("model", "whisper-1")
        form.add_field("response_format", "verbose_json")
        form.add_field("file", data, filename=f"long{i}.mp3")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as s:
            async with s.post(f"{api}/v1/audio/transcriptions", data=form) as r:
                body = await r.json()
        results.append({"status": r.status, "seconds": time.monotonic() - t0, "audio_s": body.get("duration", 0.0),
                        "segments": len(body.get("segments") or [])})

    async def main() -> None:
        await asyncio.gather(*(one(i, d) for i, d in enumerate(files)))

    asyncio.run(main())


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        return _samples(r.read().decode())


def calls_by_class(before: dict, after: dict) -> dict[str, int]:
    return {k: int(after.get(f'chorus_batches_total{{kind="{k}"}}', 0) - before.get(f'chorus_batches_total{{kind="{k}"}}', 0))
            for k in ("final", "partial", "file")}


def run(server: SpawnedServer, api_port: int, args: argparse.Namespace, files: list[bytes] | None) -> dict:
    before = scrape(server.port)
    done: list[dict] = []
    poster = None
    t0 = time.monotonic()
    if files:
        poster = threading.Thread(target=post_files, args=(f"http://127.0.0.1:{api_port}", files, done))
        poster.start()
    live = summarize(asyncio.run(_run_sessions(server.url, args.sessions, args.duration, [str(c) for c in CLIPS],
                                               args.seed, 1.0)), args.sessions)
    live_end = time.monotonic() - t0
    if poster is not None:
        poster.join(args.file_timeout)
    out = {"live": live, "live_s": live_end, "files": done, "calls": calls_by_class(before, scrape(server.port)),
           "wall_s": time.monotonic() - t0}
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--serve", default=f"{ROOT}/.venv/bin/chorus serve --config {ROOT}/configs/default.yaml --funasr-port 0")
    p.add_argument("--sessions", type=int, default=2)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of audio per live session")
    p.add_argument("--files", type=int, default=3)
    p.add_argument("--file-minutes", type=float, default=3.0)
    p.add_argument("--file-timeout", type=float, default=1800.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="append a markdown report here")
    args = p.parse_args()

    files = [long_recording(args.file_minutes, args.seed + i) for i in range(args.files)]
    api_port = _free_port()
    with SpawnedServer(args.serve, ["--api-port", str(api_port)]) as server:
        alone = run(server, api_port, args, None)
        print(json.dumps({"live only": alone}, indent=1), flush=True)
        mixed = run(server, api_port, args, files)
        print(json.dumps({"live + files": mixed}, indent=1), flush=True)

    a, b = alone["live"]["final_latency_ms"], mixed["live"]["final_latency_ms"]
    file_audio = sum(f["audio_s"] for f in mixed["files"])
    file_wall = max((f["seconds"] for f in mixed["files"]), default=float("nan"))
    ok = [f for f in mixed["files"] if f["status"] == 200]
    lines = [
        f"### Live streams with recordings queued behind them ({dt.date.today()}, {machine()})",
        "",
        f"`bench/file_priority_bench.py --sessions {args.sessions} --duration {args.duration:g} --files {args.files} "
        f"--file-minutes {args.file_minutes:g}`: Whisper-base, `configs/default.yaml`; {args.sessions} real-time live "
        f"sessions for {args.duration:g} s, alone and then with {args.files} recordings of {args.file_minutes:g} min "
        "(MP3) posted to `/v1/audio/transcriptions` at the start.",
        "",
        "| run | live finals | lost | p50 final latency | p95 final latency | model calls final / partial / file |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| live only | {alone['live']['finals']} | {alone['live']['lost_finals']} | {a['p50']:.0f} ms | {a['p95']:.0f} ms | "
        f"{alone['calls']['final']} / {alone['calls']['partial']} / {alone['calls']['file']} |",
        f"| live + files | {mixed['live']['finals']} | {mixed['live']['lost_finals']} | {b['p50']:.0f} ms | {b['p95']:.0f} ms | "
        f"{mixed['calls']['final']} / {mixed['calls']['partial']} / {mixed['calls']['file']} |",
        "",
        f"p95 ratio (with files / without): **{b['p95'] / a['p95']:.2f}**. Files: {len(ok)} of {args.files} answered 200, "
        f"{file_audio:.0f} s of audio, the last done {file_wall:.0f} s after posting ({file_audio / file_wall:.1f} audio s per s "
        f"while live sessions ran for the first {mixed['live_s']:.0f} s).",
        "",
    ]
    record("\n".join(lines), args.out)
    return 0


def record(report: str, out: Path | None) -> None:
    """Print a markdown report and append it to ``out`` (e.g. docs/benchmarks.md)."""
    print(report)
    if out:
        with out.open("a") as f:
            f.write("\n" + report)


if __name__ == "__main__":
    sys.exit(main())
