"""bench/soak.py in short form: a real `chorus serve` subprocess, 3 concurrent real-time clients
joining and leaving for 42 s (1 in 5 dropping its TCP connection mid-segment), then the checks.

The soak runs as a subprocess (as tests/test_bench_scripts.py runs bench/run_gpu.sh), so the
script's own server handling (port discovery, /healthz wait, SIGTERM/SIGKILL on exit) is what
is tested, and its JSON report (--out) is what is checked.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent

SESSIONS = 3
MINUTES = 0.7  # 42 s of clients; + ~10-15 s model load + the last sessions' drain: ~60-80 s in all

# At least this many finals. Every clip in tests/data is clean speech, so each well-behaved
# session yields >= 1 final (also asserted per run below). Worst case over 42 s: each of the 3
# clients completes >= 2 sessions (longest clip jfk.wav 11 s + <= 3 s of silence + a few s for
# `done`, even after a 503 retry), i.e. >= 6 sessions, of which at most 2 vanish (1 in 5, rounded
# up) -> >= 4 well-behaved -> >= 4 finals. Measured: 9-15 finals per run on 2 cores.
MIN_FINALS = 4

# Memory. glibc keeps the freed pages of the largest model batch so far, so plain RSS grows in
# steps (+120 to +165 MiB in 42-s runs) that are not leaks. The server here runs with
# MALLOC_MMAP_THRESHOLD_=131072: large buffers are then mmapped and handed back when freed, so RSS
# tracks live memory. Measured on a 2-core CPU machine, no GPU, default config, this test's
# settings: growth after warm-up -31.3 and -14.7 MiB; RSS at the end (all clients gone, 2 s idle)
# +18.4 and +17.7 MiB above the idle server before the first client; over a 5-minute, 4-session
# soak -9.6 MiB and +30.5 MiB. The bound is 64 MiB for both: a leak of more than ~1.5 MiB per
# second of this run fails it (e.g. keeping each model call's encoder output, ~3 MB per item).
# Smaller leaks (keeping each segment's audio: ~64 kB per second per session) need the long
# soak and its slope: `bench/soak.py --minutes 30 --server-env MALLOC_MMAP_THRESHOLD_=131072`.
MAX_GROWTH_MIB = 64.0


@pytest.mark.extended  # ~60 s of a 2-core machine; the default run holds each of these claims in shorter form (docs/reliability.md)
@pytest.mark.timeout(300)
def test_soak_short(tmp_path):
    out = tmp_path / "soak.json"
    cmd = [sys.executable, str(ROOT / "bench" / "soak.py"), "--sessions", str(SESSIONS), "--minutes", str(MINUTES),
           "--vanish-fraction", "0.2", "--max-growth-mib", str(MAX_GROWTH_MIB),
           "--server-env", "MALLOC_MMAP_THRESHOLD_=131072", "--out", str(out),
           # Memory and cleanup under 3 concurrent sessions: on a 2-core CPU capacity-aware
           # admission may let fewer in, and a run with none vanished fails below.
           "--set", "server.admission_max_model_load=0", "--set", "server.admission_target_final_s=0",
           "--server-log", str(tmp_path / "server.log")]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=280)
    took = time.monotonic() - t0
    assert out.exists(), f"no report (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    r = json.loads(out.read_text())
    summary = proc.stdout[-3000:] + proc.stderr[-2000:]

    # Something was actually run and measured (an empty run must not pass).
    assert r["sessions_run"] > 0 and r["well_behaved_sessions"] > 0 and r["vanished_sessions"] > 0, summary
    assert r["sessions_done"] == r["well_behaved_sessions"], summary  # every stop got its `done`
    assert r["speech_started"] > 0 and r["finals_received"] > 0, summary
    assert r["finals_received"] >= MIN_FINALS, summary
    assert r["finals_received"] >= r["sessions_done"], summary  # >= 1 final per clip
    assert len(r["samples"]) >= MINUTES * 60 * 0.8, summary  # about one RSS sample a second
    assert r["rss_start_mib"] and r["rss_end_mib"], summary

    # The checks themselves.
    assert r["finals_lost"] == 0, r["lost_detail"]
    assert r["empty_finals"] == 0, r["empty_detail"]
    assert r["order_violations"] == [], r["order_violations"]
    assert r["server_sessions_active_after"] == 0, summary  # vanished clients were cleaned up
    assert r["rss_growth_mib"] < MAX_GROWTH_MIB, summary
    assert r["rss_idle_growth_mib"] < MAX_GROWTH_MIB, summary  # back near the idle server's RSS
    assert r["ok"] and r["failures"] == [], r["failures"]
    assert proc.returncode == 0, summary

    # The script stopped its server, with SIGTERM (not only SIGKILL).
    assert not psutil.pid_exists(r["server_pid"]) or psutil.Process(r["server_pid"]).status() == psutil.STATUS_ZOMBIE
    assert r["server_exit"].get("signal") == "SIGTERM", r["server_exit"]
    print(f"\nsoak test took {took:.0f} s\n{proc.stdout[-1500:]}")
