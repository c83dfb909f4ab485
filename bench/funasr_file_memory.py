"""Worst case of one FunASR offline file: a WAV of funasr.max_file_bytes (64 MiB) of 16 kHz
PCM16 (about 2097 s of quiet noise), sent in 1 MiB messages by a client in another process;
prints the peak RSS growth of the server's process while the file is received, decoded and fed
(docs/reliability.md, "Memory and work bounds"). Run from the repository root:

    .venv/bin/python bench/funasr_file_memory.py
"""
import subprocess
import sys
import time

sys.path.insert(0, ".")
from server.config import RunnerConfig
from server.runners import create_runner
from tests.serverharness import ServerThread, make_config
from tests.test_funasr import free_port
from tests.test_file_bounds import PeakRss

CLIENT = r'''
import asyncio, io, json, sys, wave
sys.path.insert(0, ".")
import numpy as np
from tests.funasrclient import run_funasr
kind, url = sys.argv[1], sys.argv[2]
buf = io.BytesIO()
n = ((64 << 20) - 1000) // 2
rng = np.random.default_rng(0)
with wave.open(buf, "wb") as w:
    w.setnchannels(1); w.setsampwidth(2); w.setframerate(16000)
    for i in range(0, n, 16000 * 60):  # quiet noise, below the VAD's speech threshold
        w.writeframes((rng.standard_normal(min(16000 * 60, n - i)) * 20).astype("<i2").tobytes())
data = buf.getvalue()
first = {"mode": "offline", "wav_name": "big", "wav_format": "wav", "is_speaking": True}
run = asyncio.run(run_funasr(url, data, first, chunk_bytes=1 << 20, speed=None, timeout=900))
print(json.dumps({"bytes": len(data), "seconds": n / 16000, "errors": run.errors(), "text": run.text()[:200]}))
'''
runner = create_runner(RunnerConfig(name="whisper", model="embedded", device="cpu")); runner.load()
with ServerThread(make_config(**{"funasr.port": free_port()}), runner) as s:
    url = f"ws://127.0.0.1:{s.app.funasr_port}"
    t0 = time.monotonic()
    with PeakRss() as rss:
        out = subprocess.run([sys.executable, "-c", CLIENT, "big", url], capture_output=True, text=True, timeout=1200)
    print(out.stdout.strip()[-400:])
    if out.returncode:
        print(out.stderr[-2000:])
    print("took %.1f s, server RSS grew %.1f MB" % (time.monotonic() - t0, rss.grew_mb))
