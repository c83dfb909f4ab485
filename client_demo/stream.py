"""Stream a WAV file to a Chorus server at real-time pace and print partials and finals.

    python client_demo/stream.py tests/data/jfk.wav [--url ws://127.0.0.1:8765/v1/stream] [--speed 1]

The file is sent at its own sample rate (the server resamples). Final latency is the
time from sending the audio that holds the segment's `cut_ms` (the moment the server
could know the segment had ended) to the final's arrival.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from client_demo.pacing import SendClock, send_paced  # noqa: E402
from server.audio.resample import STANDARD_RATES, resample  # noqa: E402
from server.audio.wavfile import read_wav  # noqa: E402


async def run(args: argparse.Namespace) -> int:
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    audio, rate = read_wav(args.file)
    if rate not in STANDARD_RATES:  # the server takes the standard rates only
        audio, rate = resample(audio, rate, 16000), 16000
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    tty = sys.stdout.isatty()
    start = {"type": "start", "sample_rate": rate, "encoding": "pcm_s16le", "language": args.language,
             "interim_results": not args.no_interim}
    if args.endpointing_ms:
        start["endpointing_ms"] = args.endpointing_ms
    clock = SendClock(rate)
    status = 0
    try:
        headers = {"Authorization": f"Bearer {args.token}"} if args.token else None
        async with connect(args.url, max_size=None, additional_headers=headers) as ws:
            await ws.send(json.dumps(start))

            async def reader() -> None:
                try:
                    await read_all()
                except ConnectionClosed:
                    pass  # reported below, by the send or the wait that sees it

            async def read_all() -> None:
                nonlocal status
                async for raw in ws:
                    m = json.loads(raw)
                    kind = m["type"]
                    if kind == "partial":
                        line = f"  … [{m['segment_id']}] {m['text']}"
                        print("\r\033[K" + line if tty else line, end="" if tty else "\n", flush=True)
                    elif kind == "final":
                        lat = clock.latency_ms(m["cut_ms"], time.monotonic())
                        lat_s = f"{lat:.0f} ms" if lat is not None else "n/a"
                        print(("\r\033[K" if tty else "") + f"[{m['segment_id']}] {m['start_ms'] / 1000:6.2f}-{m['end_ms'] / 1000:6.2f}s "
                              f"(final latency {lat_s}) {m['text']}", flush=True)
                    elif kind == "error":
                        print(f"error {m['code']}: {m['message']}", file=sys.stderr)
                        if m.get("fatal"):
                            status = 1
                    elif kind == "ready":
                        print(f"ready: session {m['session_id']} config {m['config']}", file=sys.stderr)

            rd = asyncio.create_task(reader())
            await send_paced(ws, pcm, rate, args.chunk_ms, args.speed, clock=clock)
            await ws.send(json.dumps({"type": "stop"}))
            await asyncio.wait_for(rd, timeout=120)
            if ws.close_code not in (None, 1000):
                print(f"connection closed by the server: {ws.close_code} {ws.close_reason}", file=sys.stderr)
                status = status or 1
    except InvalidStatus as e:
        # Refused before the upgrade (401 token, 403 Origin, 429/503 admission): say why, no traceback.
        try:
            why = json.loads(e.response.body or b"{}").get("message", "")
        except ValueError:
            why = ""
        retry = e.response.headers.get("Retry-After")
        print(f"refused by {args.url}: HTTP {e.response.status_code} {why}"
              + (f" (retry after {retry} s)" if retry else ""), file=sys.stderr)
        return 2
    except ConnectionClosed as e:
        # The server ended the session (a fatal error, its session limit, or a shutdown).
        print(f"connection closed by the server: {e.rcvd.code if e.rcvd else 'no close frame'} "
              f"{e.rcvd.reason if e.rcvd else ''}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"cannot connect to {args.url}: {e}", file=sys.stderr)
        return 2
    return status


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("file", type=Path)
    p.add_argument("--url", default="ws://127.0.0.1:8765/v1/stream")
    p.add_argument("--speed", type=float, default=1.0, help="1 = real time, 2 = twice as fast")
    p.add_argument("--chunk-ms", type=int, default=100)
    p.add_argument("--language", default="auto")
    p.add_argument("--no-interim", action="store_true", help="finals only")
    p.add_argument("--endpointing-ms", type=int)
    p.add_argument("--token", default=os.environ.get("CHORUS_TOKEN"),
                   help="auth token, sent as 'Authorization: Bearer' (default: $CHORUS_TOKEN)")
    return asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
