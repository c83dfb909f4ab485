"""`chorus` command line: wiring and subcommands only."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from server.config import Config, ConfigError, describe, load_config

if TYPE_CHECKING:
    from server.files.client import LocalTranscriber, Progress, Transcriber
    from server.runners.base import ModelRunner

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
                      ("audiosocket_port", "audiosocket.port"), ("webhook_url", "webhook.url"), ("api_port", "api.port")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = str(value)
    return load_config(args.config, overrides)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# ---------------------------------------------------------------------- transcribe
def cmd_transcribe(args: argparse.Namespace) -> int:
    """Recordings of any format -> text, JSON or subtitles: here on the loaded model (the
    server's file path: cut at pauses, batched across files), or by a server (--server)."""
    import asyncio
    import os

    from server.files.client import EXTENSIONS, Progress, RemoteTranscriber

    fmt = "legacy_json" if args.json else args.format
    several = len(args.files) > 1
    if args.output_dir is None and several and fmt in ("srt", "vtt"):
        print(f"error: {fmt} subtitles are one file's: write several files' with --output-dir DIR", file=sys.stderr)
        return 2
    if args.output_dir is not None:
        stems = [p.stem for p in args.files]
        clash = sorted({s for s in stems if stems.count(s) > 1})
        if clash:
            print(f"error: --output-dir would write {clash[0]}.{EXTENSIONS[fmt]} for two files; run them apart",
                  file=sys.stderr)
            return 2
        args.output_dir.mkdir(parents=True, exist_ok=True)
    status = 0
    paths = []
    for path in args.files:
        if path.is_file():
            paths.append(path)
        else:
            print(f"error: {path}: no such file", file=sys.stderr)
            status = 1
    if not paths:
        return status
    progress = Progress(sys.stderr.isatty() if args.progress is None else args.progress)

    if args.server:
        try:
            transcriber = RemoteTranscriber(args.server, args.language, args.token or os.environ.get("CHORUS_TOKEN"))
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    else:
        built = _local_transcriber(args, fmt)
        if isinstance(built, int):
            return built
        transcriber = built
    try:
        failed = asyncio.run(_transcribe_all(transcriber, paths, fmt, several, args.output_dir, progress))
    except KeyboardInterrupt:
        return 130
    return 1 if failed or status else 0


def _local_transcriber(args: argparse.Namespace, fmt: str) -> "LocalTranscriber | int":
    """The loaded model behind the server's file path, or the exit status when it cannot load."""
    from server.files.client import LocalTranscriber
    from server.runners import ItemOptions, RunnerError

    config = _config(args)
    try:
        runner = _load_runner(config)
    except RunnerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    supported = runner.languages()
    if supported is not None and args.language not in supported:
        print(f"error: --language {args.language!r} is not supported by this model; use one of {', '.join(sorted(supported))}",
              file=sys.stderr)
        return 2
    # Word timings cost an alignment pass: only for outputs that show them (subtitle cues are cut at word gaps).
    return LocalTranscriber(runner, config, ItemOptions(language=args.language, words=fmt != "text"))


def _load_runner(config: Config) -> "ModelRunner":
    """Build and load the configured model (a seam: in-process tests hand in one already loaded)."""
    from server.runners import create_runner

    runner = create_runner(config.runner, max_batch_size=max(1, config.batcher.max_batch_size))
    t0 = time.monotonic()
    runner.load()
    log.info("model loaded in %.1f s", time.monotonic() - t0)
    return runner


async def _transcribe_all(transcriber: "Transcriber", paths: list[Path], fmt: str, several: bool, output_dir: Path | None,
                          progress: "Progress") -> bool:
    """Print (or write) each file's result in order; True when any file or segment failed."""
    from server.files.client import EXTENSIONS, ServerUnreachable, render, transcribe_files

    failed = False
    try:
        async with transcriber:
            async for result in transcribe_files(transcriber, paths, progress):
                if result.transcript is None:
                    print(f"error: {result.path}: {result.error}", file=sys.stderr)
                    failed = True
                    continue
                for s in result.transcript.segments:
                    if s.error:
                        print(f"error: {result.path}: the segment at {s.start_ms} ms failed ({s.error})", file=sys.stderr)
                        failed = True
                if output_dir is None:
                    progress.write(render(result, fmt, several))
                else:
                    out = output_dir / f"{result.path.stem}.{EXTENSIONS[fmt]}"
                    out.write_text(render(result, fmt, False), encoding="utf-8")
                    progress.write(f"{result.path} -> {out}\n", sys.stderr)
    except ServerUnreachable as e:
        print(f"error: {e}", file=sys.stderr)
        return True
    return failed


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

    t = sub.add_parser("transcribe", help="print the text (or subtitles) of recordings: wav, flac, mp3, m4a, ogg/opus, webm")
    common(t)
    t.add_argument("files", nargs="+", type=Path)
    t.add_argument("--language", default="auto", help="language code or auto (default)")
    shape = t.add_mutually_exclusive_group()
    shape.add_argument("--format", "-f", choices=("text", "json", "verbose_json", "srt", "vtt"), default="text",
                       help="output as the transcription API writes it (default text; several files: `path: text` lines)")
    shape.add_argument("--json", action="store_true",
                       help="one JSON object per file, with segments, their words (times in ms from the file's start) and model fields")
    t.add_argument("--output-dir", "-o", type=Path, metavar="DIR",
                   help="write each file's output to DIR/<name>.<txt|json|srt|vtt> instead of stdout")
    t.add_argument("--server", metavar="URL",
                   help="send the files to a running server's HTTP API (e.g. http://127.0.0.1:8766) instead of loading a model here")
    t.add_argument("--token", help="with --server: the server's access token (default $CHORUS_TOKEN)")
    t.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="a progress bar per file on stderr (default: when stderr is a terminal)")
    t.set_defaults(func=cmd_transcribe)

    s = sub.add_parser("serve", help="run the streaming server")
    common(s)
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--funasr-port", type=int, metavar="N",
                   help="port of the FunASR-compatible listener (default 10095; 0 turns it off; shortcut for --set funasr.port=N)")
    s.add_argument("--api-port", type=int, metavar="N",
                   help="port of the HTTP API for recordings, OpenAI-compatible (default: the main port + 1; 0 turns it off; "
                        "shortcut for --set api.port=N)")
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
