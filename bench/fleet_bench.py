"""Fleet figures (docs/deploy.md, docs/benchmarks.md): two `chorus serve` replicas behind
Debian's HAProxy running deploy/haproxy/haproxy.cfg, on loopback.

1. Latency the balancer adds: the same load (``--sessions`` real-time sessions of
   ``--duration`` s, loadgen's streams and measures) run twice in one invocation, once straight to
   the replicas (half to each) and once through HAProxy; first-partial and final latency p50/p95
   side by side.
2. Spread: how many of the balanced sessions each replica took (its chorus_sessions_total).
3. Drain: ``--drain-sessions`` sessions through HAProxy, replica a gets SIGTERM mid-stream;
   how long until it exits, and whether any session lost a final or its `done`.

    .venv/bin/python bench/fleet_bench.py --sessions 4 --duration 30 --drain-sessions 4 --out /tmp/fleet.md

Needs haproxy (scripts/setup.sh installs Debian's). Run it on a quiet machine: the two replicas
share its cores, and every figure is that machine's.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from client_demo.loadgen import _run_sessions, _samples, machine, summarize  # noqa: E402
from tests.fleet import HAProxy, Replica, haproxy_binary, http_get  # noqa: E402
from tests.serverharness import ADMISSION_OFF  # noqa: E402

log = logging.getLogger("fleet_bench")
CLIPS = sorted(str(p) for p in (ROOT / "tests" / "data").glob("*.wav"))


def sessions_total(r: Replica) -> float:
    return _samples(http_get(r.port, "/metrics")[1]).get("chorus_sessions_total", 0.0)


def row(name: str, s: dict) -> str:
    f = lambda d, k: "-" if d.get(k) is None else f"{d[k]:.0f}"  # noqa: E731
    return (f"| {name} | {s['admitted']}/{s['sessions']} | {f(s['first_partial_ms'], 'p50')} | {f(s['first_partial_ms'], 'p95')} "
            f"| {f(s['final_latency_ms'], 'p50')} | {f(s['final_latency_ms'], 'p95')} | {s['lost_finals']} | {s['errors']} |")


async def latency(a: Replica, b: Replica, lb: HAProxy, args: argparse.Namespace) -> list[str]:
    half = args.sessions // 2
    direct = await asyncio.gather(
        _run_sessions(f"ws://127.0.0.1:{a.port}/v1/stream", half, args.duration, CLIPS, args.seed, args.speed),
        _run_sessions(f"ws://127.0.0.1:{b.port}/v1/stream", args.sessions - half, args.duration, CLIPS, args.seed, args.speed,
                      first_index=half),
    )
    before = sessions_total(a), sessions_total(b)
    balanced = await _run_sessions(f"ws://127.0.0.1:{lb.port}/v1/stream", args.sessions, args.duration, CLIPS, args.seed,
                                   args.speed)
    spread = sessions_total(a) - before[0], sessions_total(b) - before[1]
    return [
        f"### Latency with and without the balancer ({args.sessions} sessions of {args.duration:g} s at {args.speed:g}x real time)",
        "",
        "| path | admitted | first partial p50 ms | p95 | final p50 ms | p95 | lost finals | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
        row("direct (half to each replica)", summarize(direct[0] + direct[1], args.sessions)),
        row("through HAProxy (leastconn)", summarize(balanced, args.sessions)),
        "",
        f"Spread of the balanced sessions: replica a {spread[0]:.0f}, replica b {spread[1]:.0f}.",
        "",
    ]


async def drain(a: Replica, lb: HAProxy, args: argparse.Namespace) -> list[str]:
    run = asyncio.ensure_future(_run_sessions(f"ws://127.0.0.1:{lb.port}/v1/stream", args.drain_sessions, args.duration,
                                              CLIPS, args.seed + 100, args.speed))
    await asyncio.sleep(min(args.duration / 2, 10.0))
    on_a = a.sessions()
    t0 = time.monotonic()
    a.signal(signal.SIGTERM)
    rc = await asyncio.to_thread(a.wait, 600)
    took = time.monotonic() - t0
    results = await run
    s = summarize(results, args.drain_sessions)
    no_done = sum(1 for r in results if "no_done" in r.errors)
    return [
        f"### Drain: SIGTERM to replica a with {on_a} of {args.drain_sessions} sessions open on it",
        "",
        f"- replica a exited {rc} after {took:.2f} s (server.shutdown_timeout_s {args.shutdown_timeout:g} s)",
        f"- sessions without `done`: {no_done}; lost finals (speech started, no final): {s['lost_finals']}",
        f"- sessions admitted: {s['admitted']}/{s['sessions']}; refused handshakes seen by clients: {s['refused']}",
        "",
    ]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--sessions", type=int, default=4, help="concurrent sessions in each latency run (default 4)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of audio per session (default 30)")
    p.add_argument("--speed", type=float, default=1.0, help="pace against real time (default 1: latency is about timing)")
    p.add_argument("--drain-sessions", type=int, default=4, help="sessions open when replica a is drained (0: skip)")
    p.add_argument("--shutdown-timeout", type=float, default=60.0, help="server.shutdown_timeout_s of the replicas")
    p.add_argument("--threads", type=int, default=0, help="runner.num_threads per replica (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="append the report (markdown) to this file")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    binary = haproxy_binary()
    if binary is None:
        print("fleet_bench: haproxy is not installed (Debian: apt-get install haproxy)", file=sys.stderr)
        return 2
    # Capacity-aware admission off: the figures are about the balancer, not about refusals.
    sets = (*(f"{k}={v}" for k, v in ADMISSION_OFF.items()), f"server.shutdown_timeout_s={args.shutdown_timeout:g}", f"runner.num_threads={args.threads}")
    a, b = Replica("a", *sets), Replica("b", *sets)
    lb = HAProxy(a, b)
    try:
        a.start()
        b.start()
        a.wait_ready(300)
        b.wait_ready(300)
        lb.start(binary)
        lb.wait_up("chorus_ws", {"a", "b"})
        model = json.dumps(a.health().get("model", {}))
        report = [f"## fleet_bench run {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC", "",
                  f"Machine: {machine()}; model: {model}", f"Command: `{' '.join(sys.argv)}`", ""]
        report += asyncio.run(latency(a, b, lb, args))
        if args.drain_sessions:
            report += asyncio.run(drain(a, lb, args))
    finally:
        lb.close()
        a.close()
        b.close()
    text = "\n".join(report)
    print(text)
    if args.out:
        with args.out.open("a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
