"""`chorus` command line: wiring and subcommands only."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from server.config import Config, ConfigError, describe, load_config

log = logging.getLogger("chorus")


def _parse_sets(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = v
    return out


def _config(args: argparse.Namespace) -> Config:
    overrides = _parse_sets(args.set or [])
    for flag, key in (("host", "server.host"), ("port", "server.port"), ("device", "runner.device"), ("model", "runner.model"),
                      ("tls_cert", "server.tls_cert"), ("tls_key", "server.tls_key"), ("funasr_port", "funasr.port"),
                      ("audiosocket_port", "audiosocket.port"), ("webhook_url", "webhook.url")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = str(value)
    return load_config(args.config, overrides)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# ---------------------------------------------------------------------- transcribe
def _segments_for(audio, runner_max_s: float, config: Config):
    """Whole file if it fits the model; else cut at pauses with the same endpointer the server uses."""
    import numpy as np

    from server.vad.endpointer import Endpointer, EndpointerSettings, SegmentEnded

    if len(audio) / 16000.0 <= runner_max_s:
        return [(0, audio)]
    max_ms = int(min(config.vad.max_segment_ms, runner_max_s * 1000))
    ep = Endpointer(EndpointerSettings.from_config(config.vad, max_segment_ms=max_ms))
    events = ep.feed(np.asarray(audio, dtype=np.float32)) + ep.flush()
    return [(e.start_ms, e.audio) for e in events if isinstance(e, SegmentEnded)]


def cmd_transcribe(args: argparse.Namespace) -> int:
    from server.audio.codecs import AudioFormatError
    from server.audio.wavfile import load_audio_16k
    from server.runners import ItemError, ItemOptions, RunnerError, Transcript, create_runner

    config = _config(args)
    runner = create_runner(config.runner, max_batch_size=max(1, config.batcher.max_batch_size))
    try:
        t0 = time.monotonic()
        runner.load()
        log.info("model loaded in %.1f s", time.monotonic() - t0)
    except RunnerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    supported = runner.languages()
    if supported is not None and args.language not in supported:
        print(f"error: --language {args.language!r} is not supported by this model; use one of {', '.join(sorted(supported))}",
              file=sys.stderr)
        return 2
    status = 0
    opts = ItemOptions(language=args.language)
    for path in args.files:
        try:
            audio = load_audio_16k(path)
        except (AudioFormatError, OSError) as e:
            print(f"error: {path}: {e}", file=sys.stderr)
            status = 1
            continue
        pieces = _segments_for(audio, runner.max_item_seconds, config)
        t0 = time.monotonic()
        results = []
        step = max(1, config.batcher.max_batch_size)
        for i in range(0, len(pieces), step):
            chunk = pieces[i : i + step]
            results.extend(runner.transcribe([a for _, a in chunk], [opts] * len(chunk)))
        took = time.monotonic() - t0
        for (start_ms, _), r in zip(pieces, results):
            if isinstance(r, ItemError):
                print(f"error: {path}: segment at {start_ms} ms: {r}", file=sys.stderr)
                status = 1
        results = [r if not isinstance(r, ItemError) else Transcript("", None, {"error": r.code}) for r in results]
        text = " ".join(r.text for r in results if r.text).strip()
        if args.json:
            print(json.dumps({
                "file": str(path),
                "text": text,
                "seconds": round(len(audio) / 16000.0, 3),
                "compute_s": round(took, 3),
                "segments": [
                    {"start_ms": s, "text": r.text, "language": r.language,
                     "words": [{"word": w.word, "start_ms": s + w.start_ms, "end_ms": s + w.end_ms} for w in r.words or ()],
                     **{k: v for k, v in r.fields.items() if isinstance(v, (str, int, float, bool))}}
                    for (s, _), r in zip(pieces, results)
                ],
            }, ensure_ascii=False))
        elif len(args.files) > 1:
            print(f"{path}: {text}")
        else:
            print(text)
    return status


# ---------------------------------------------------------------------- serve / doctor / config
def cmd_serve(args: argparse.Namespace) -> int:
    from server.app import run

    config = _config(args)
    _setup_logging(config.log_level)
    try:
        run(config)
    except KeyboardInterrupt:
        pass
    except ConfigError as e:  # e.g. an unreadable tokens file or certificate
        log.error("config error: %s", e)
        return 2
    except Exception as e:  # noqa: BLE001 - report and exit non-zero instead of a traceback wall
        log.error("server stopped: %s", e)
        return 1
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from server.doctor import benchmark_failed, format_report, run_doctor

    config = _config(args)
    report = run_doctor(config, bench_seconds=args.seconds)
    print(json.dumps(report, indent=2, default=str) if args.json else format_report(report))
    if benchmark_failed(report):
        print(f"error: the self-benchmark failed: {report['benchmark'].get('error')}", file=sys.stderr)
        return 1
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.doc:
        for name, default, doc in describe():
            print(f"{name} = {default}\n    {doc}")
        return 0
    import dataclasses

    config = _config(args)
    print(json.dumps(dataclasses.asdict(config), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="chorus", description="Real-time speech recognition server with cross-session batching.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", "-c", type=Path, help="YAML config (default: built-in defaults = configs/default.yaml)")
        sp.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override one config value (repeatable)")
        sp.add_argument("--device", help="shortcut for --set runner.device=...")
        sp.add_argument("--model", help="shortcut for --set runner.model=...")

    t = sub.add_parser("transcribe", help="print the text of WAV files")
    common(t)
    t.add_argument("files", nargs="+", type=Path)
    t.add_argument("--language", default="auto", help="language code or auto (default)")
    t.add_argument("--json", action="store_true", help="one JSON object per file, with segments, their words (times in ms from the file's start) and model fields")
    t.set_defaults(func=cmd_transcribe)

    s = sub.add_parser("serve", help="run the streaming server")
    common(s)
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--funasr-port", type=int, metavar="N",
                   help="port of the FunASR-compatible listener (default 10095; 0 turns it off; shortcut for --set funasr.port=N)")
    s.add_argument("--audiosocket-port", type=int, metavar="PORT",
                   help="TCP port of the Asterisk AudioSocket listener (default off; shortcut for --set audiosocket.port=PORT)")
    s.add_argument("--webhook-url", metavar="URL",
                   help="POST every call's events here (shortcut for --set webhook.url=URL; signing secret in CHORUS_WEBHOOK_SECRET)")
    s.add_argument("--tls-cert", metavar="FILE", help="PEM certificate (chain): serve wss:// and https:// (shortcut for --set server.tls_cert=...)")
    s.add_argument("--tls-key", metavar="FILE", help="PEM private key for --tls-cert (shortcut for --set server.tls_key=...)")
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser("doctor", help="report device, CUDA, graph capture and a short self-benchmark")
    common(d)
    d.add_argument("--seconds", type=float, default=10.0, help="self-benchmark duration")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_doctor)

    c = sub.add_parser("config", help="print the effective config, or --doc for every knob")
    common(c)
    c.add_argument("--doc", action="store_true")
    c.set_defaults(func=cmd_config)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "serve":
        _setup_logging("WARNING")
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
