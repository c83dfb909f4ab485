"""Runner throughput and latency by batch size: eager vs CUDA graphs, fp32 vs half, and funasr.

Prints a markdown table and appends it (with the machine and command) to --out.
Figures are measured side by side in one run; nothing here is an assertion.

    # CPU, embedded Whisper: finals (beam search, word timings) and partials (greedy) side by side
    python bench/runner_bench.py --runner whisper --batches 1,8 --decodings final,greedy-final,partial --out docs/benchmarks.md
    # SenseVoiceSmall, full-size RANDOM weights (compute does not depend on weight values)
    python bench/runner_bench.py --runner sensevoice --sensevoice-random full --batches 1,8 --seconds 5
    # Paraformer-large (paraformer-zh), full-size RANDOM weights, beside funasr's generate
    python bench/runner_bench.py --runner paraformer --paraformer-random full --batches 1,8,32 --seconds 5 --funasr-baseline
    # GPU: graphs and half precision side by side, plus what users run today (funasr)
    python bench/runner_bench.py --runner sensevoice --sensevoice-random full --device cuda \
        --variants eager-fp32,graphs-fp32,graphs-fp16 --batches 1,4,16,32 --funasr-baseline
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from server.config import GraphConfig, RunnerConfig, WhisperConfig  # noqa: E402
from server.runners import ItemOptions, create_runner  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


def speech(seconds: float, n: int) -> list[np.ndarray]:
    """n items of `seconds` each, cut from the real clips (looped)."""
    import wave

    pool = []
    for p in sorted(DATA.glob("*.wav")):
        with wave.open(str(p)) as w:
            pool.append(np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768)
    joined = np.concatenate(pool)
    size = int(seconds * 16000)
    return [np.resize(np.roll(joined, -i * 12345), size).astype(np.float32) for i in range(n)]


def machine(device: str, threads: int) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or "CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {threads} torch threads, torch {torch.__version__}"


def timed(fn, sync, repeats: int) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds) per call, after one warm-up call."""
    fn()  # warm this shape
    sync()
    walls, cpus = [], []
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        sync()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return float(np.median(walls)), float(np.median(cpus))


def stage_text(stages: dict[str, float]) -> str:
    """'features 1.2 / model 30.4 / ...' in ms (device time from CUDA events on GPU)."""
    return " / ".join(f"{k} {v * 1000:.1f}" for k, v in stages.items()) or "-"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runner", choices=["whisper", "sensevoice", "paraformer"], default="whisper")
    p.add_argument("--model", help="model dir (sensevoice, paraformer) or CT2 dir (whisper); default embedded")
    p.add_argument("--sensevoice-random", choices=["tiny", "full"], help="generate a random-weight SenseVoiceSmall dir")
    p.add_argument("--paraformer-random", choices=["tiny", "full"], help="generate a random-weight Paraformer dir")
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", default="eager-fp32", help="comma list of {eager,graphs}-{fp32,fp16,bf16}")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--seconds", type=float, default=5.0, help="audio length per item")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--decodings", default="final",
                   help="whisper, comma list: final (the configured beam search + fallback, with word timings), "
                        "greedy-final (beam 1, with word timings), partial (greedy, no word timings)")
    p.add_argument("--funasr-baseline", action="store_true", help="also time funasr AutoModel.generate (sensevoice, paraformer)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    import torch

    threads = torch.get_num_threads()
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    tmp = None
    model = args.model or "embedded"
    random_note = ""
    if args.runner == "sensevoice":
        if args.sensevoice_random:
            from server.runners.random_weights import write_sensevoice_dir

            tmp = tempfile.TemporaryDirectory()
            model = str(write_sensevoice_dir(Path(tmp.name) / "SenseVoiceSmall", scale=args.sensevoice_random))
            random_note = f"SenseVoiceSmall weights are RANDOM ({args.sensevoice_random} size): compute does not depend on weight values, accuracy is meaningless."
        elif not args.model:
            p.error("sensevoice needs --model DIR or --sensevoice-random")
    if args.runner == "paraformer":
        if args.paraformer_random:
            from server.runners.random_weights import write_paraformer_dir

            tmp = tempfile.TemporaryDirectory()
            model = str(write_paraformer_dir(Path(tmp.name) / "paraformer-large", scale=args.paraformer_random))
            random_note = (f"Paraformer weights are RANDOM ({args.paraformer_random} size): compute does not depend on "
                           "weight values except through the token count (set near speech's ~4 tokens/s), accuracy is meaningless.")
        elif not args.model:
            p.error("paraformer needs --model DIR or --paraformer-random")
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    decodings = args.decodings.split(",") if args.runner == "whisper" else ["final"]
    for variant in args.variants.split(","):
        mode, prec = variant.split("-")
        dtype = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}[prec]
        for decoding in decodings:
            whisper = WhisperConfig(beam_size=1) if decoding == "greedy-final" else WhisperConfig()
            cfg = RunnerConfig(name=args.runner, model=model, device=args.device, dtype=dtype, whisper=whisper,
                               graphs=GraphConfig(enabled=(mode == "graphs"), batch_buckets=tuple(sorted({1, 2, 4, 8, 16, 32, *batches}))))
            options = ItemOptions("en", partial=True, words=False) if decoding == "partial" else ItemOptions("en")
            if args.runner == "paraformer":
                options = ItemOptions("auto")
            label = f"chorus {variant}" + (f" {decoding}" if args.runner == "whisper" else "")
            if decoding != "partial" and args.runner == "whisper":
                label += f" (beam {whisper.beam_size}, words)"
            runner = create_runner(cfg, max_batch_size=max(batches))
            runner.load()
            for b in batches:
                items = speech(args.seconds, b)
                med, cpu = timed(lambda: runner.transcribe(items, [options] * b), sync, args.repeats)
                launched = runner.launch(items, [options] * b)
                launched.result()
                rows.append((label, b, med, cpu, b * args.seconds, stage_text(launched.stages)))
                print(f"{label} batch {b}: {med * 1000:.1f} ms, RTFx {b * args.seconds / med:.1f}", flush=True)
            runner.close()
    if args.funasr_baseline and args.runner in ("sensevoice", "paraformer"):
        from funasr import AutoModel

        # funasr's AutoModel sets torch's thread count itself (ncpu, default 4): give it ours.
        am = AutoModel(model=model, device=args.device, disable_update=True, ncpu=threads)
        kw = {"language": "en", "use_itn": False} if args.runner == "sensevoice" else {"output_timestamp": True}
        for b in batches:
            items = speech(args.seconds, b)
            med, cpu = timed(lambda: [am.generate(input=x, **kw) for x in items], sync, args.repeats)
            rows.append(("funasr generate, one request at a time", b, med, cpu, b * args.seconds, "-"))
            # Without a VAD model funasr batches by batch_size (batch_size_s applies to VAD segments).
            own = {"batch_size": b} if args.runner == "paraformer" else {"batch_size_s": b * args.seconds + 1}
            med, cpu = timed(lambda: am.generate(input=items, **own, **kw), sync, args.repeats)
            rows.append((f"funasr generate, own batching ({next(iter(own))})", b, med, cpu, b * args.seconds, "-"))
            print(f"funasr batch {b} done", flush=True)
    lines = [f"### runner_bench {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC — {args.runner} on {args.device}", "",
             f"- machine: {machine(args.device, threads)}", f"- command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`",
             f"- items of {args.seconds:g} s of real speech; median of {args.repeats} calls after a warm-up call"]
    if random_note:
        lines.append(f"- {random_note}")
    lines += ["", "| variant | batch | ms per batch | RTFx (audio s / wall s) | process CPU ms per audio s | stages of one call, ms |",
              "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {v} | {b} | {wall * 1000:.1f} | {audio / wall:.1f} | {cpu / audio * 1000:.0f} | {st} |"
              for v, b, wall, cpu, audio, st in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with args.out.open("a") as f:
            f.write("\n" + text)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
