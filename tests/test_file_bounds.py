"""What one file may make the server hold and do, on every path that takes files (issue 22,
item 3), and a drain that interrupts a FunASR offline file (item 9).

A real server (tests/serverharness.py) with the real Whisper model, on loopback sockets: the
FunASR port with offline files, the HTTP API with uploads. Memory is the server process's RSS
(psutil, sampled every 5 ms while the request runs; the server lives in this process), text is
checked against the clips' known transcripts (tests/data/transcripts.json). "Refused from its
header" is checked by what the server counts, not by a clock: no second of the file reaches a
session and no segment of it reaches the model.
"""

from __future__ import annotations

import asyncio
import json
import struct
import threading
import time

import numpy as np
import openai
import psutil
import pytest
from websockets.asyncio.client import connect

from server.wer import normalize_text, word_error_rate
from tests.audiofiles import encode
from tests.funasrclient import run_funasr
from tests.serverharness import CLIPS, DATA, TRANSCRIPTS, ServerThread, make_config, read_clip
from tests.ports import free_port
from tests.test_api import client
from tests.waiting import async_wait_until

JFK = DATA / "jfk.wav"
SHORT = DATA / "sense_and_sensibility_01_austen_64kb-0880.wav"
# What one file may add to the server's RSS while it is decoded and fed (measured: 0-2 MB on
# the 2-core CPU). Holding the decoded audio would take 64 KB per second (float32 at 16 kHz):
# 480 MB for the 1 Hz WAV below and 115 MB per copy for 30 minutes (measured on the parent
# commit: 944 MB and 291 MB).
RSS_BOUND_MB = 16


def wav_declaring(rate: int, nbytes: int) -> bytes:
    """A PCM16 mono WAV of ``nbytes`` of noise whose header says ``rate`` Hz."""
    data = np.random.default_rng(rate).integers(-3000, 3000, nbytes // 2).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


class PeakRss:
    """The most this process's RSS grew over its start while the block ran."""

    def __init__(self) -> None:
        self._me = psutil.Process()
        self._done = threading.Event()
        self.base = self.peak = 0

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, self._me.memory_info().rss)
            time.sleep(0.005)

    def __enter__(self) -> "PeakRss":
        self.base = self.peak = self._me.memory_info().rss
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    @property
    def grew_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def offline_file(srv: ServerThread, data: bytes, name: str, fmt: str = "wav", timeout: float = 120.0):
    first = {"mode": "offline", "wav_name": name, "wav_format": fmt, "is_speaking": True}
    return asyncio.run(run_funasr(srv.funasr_url, data, first, one_frame=True, speed=None, timeout=timeout))


def fed_s(srv: ServerThread) -> float:
    """Seconds of audio the server's sessions have been fed (read in-process: it also works
    once the server has stopped listening)."""
    return srv.app.metrics.registry.get_sample_value("chorus_audio_seconds_total") or 0.0


def wer(ref: str, hyp: str) -> float:
    return word_error_rate([ref], [hyp])


def model_items(srv: ServerThread, kind: str) -> float:
    """Items of ``kind`` submitted to the batcher (in-process, as fed_s)."""
    return srv.app.metrics.registry.get_sample_value("chorus_requests_total", {"kind": kind}) or 0.0


@pytest.fixture(scope="module")
def srv(whisper_runner):
    with ServerThread(make_config(**{"funasr.port": free_port()}), whisper_runner) as s:
        s.funasr_url = f"ws://127.0.0.1:{s.app.funasr_port}"
        yield s


def test_a_wav_declaring_1_hz_is_refused_at_once_on_the_funasr_port_and_the_api(srv):
    """15 KB claiming 1 Hz would be 7500 s of audio (480 MB as float32 at 16 kHz) from a
    15 KB request. Both paths refuse it from its header (none of it decoded, fed or sent to the
    model: "at once" by what the server did, not by a clock) and without growing."""
    short = SHORT.read_bytes()
    # Warm both paths (model, decoder, allocator), so the measurement is of the attack alone.
    assert wer(TRANSCRIPTS[SHORT.name], offline_file(srv, short, "warm").text()) <= 0.1
    attack = wav_declaring(1, 15_000)
    assert len(attack) < 16_000

    fed0, items0 = fed_s(srv), model_items(srv, "final")
    with PeakRss() as rss:
        run = offline_file(srv, attack, "onehz", timeout=30)
    print(f"funasr 1 Hz WAV: RSS grew {rss.grew_mb:.1f} MB")
    errors = run.errors()
    assert [e["error"] for e in errors] == ["bad_audio"] and "sample rate 1 Hz" in errors[0]["message"], run.messages
    assert [r["text"] for r in run.results()] == [""] and run.ack() is not None, run.messages
    assert rss.grew_mb < RSS_BOUND_MB, rss.grew_mb
    # From its header: not one second of it reached the session, nor one segment the model.
    assert (fed_s(srv), model_items(srv, "final")) == (fed0, items0)

    api = client(srv, timeout=60.0)
    items0 = model_items(srv, "file")
    with PeakRss() as rss:
        with pytest.raises(openai.BadRequestError) as refused:
            api.audio.transcriptions.create(model="whisper-1", file=("onehz.wav", attack))
    print(f"api 1 Hz WAV: RSS grew {rss.grew_mb:.1f} MB")
    body = refused.value.body
    assert body["code"] == "invalid_file" and "sample rate 1 Hz" in body["message"], body
    assert rss.grew_mb < RSS_BOUND_MB and model_items(srv, "file") == items0, rss.grew_mb

    # A rate at the edge of what is accepted still decodes; normal files are still transcribed.
    low = offline_file(srv, wav_declaring(1000, 2_000), "lowrate")
    assert not low.errors() and low.ack() is not None, low.messages
    assert wer(TRANSCRIPTS[SHORT.name], offline_file(srv, short, "after").text()) <= 0.1
    assert wer(TRANSCRIPTS[SHORT.name], api.audio.transcriptions.create(model="whisper-1", file=("s.wav", short)).text) <= 0.1


def test_a_long_offline_file_is_fed_in_slices_not_decoded_whole(srv):
    """30 minutes in a FLAC of under 1 MB: decoded whole it would be 115 MB of float32, copied
    three times over (measured on the parent commit: 291 MB more RSS). Fed a
    chunk at a time, all of it reaches the session and the server's RSS grows by a few MB.
    Silence, so that the model's own working memory (tens of MB per call, freed after) is not
    in the measurement; the same path with speech is transcribed right after."""
    _, data = encode(np.zeros(30 * 60 * 16000, np.float32), "flac")
    assert len(data) < 1 << 20
    offline_file(srv, data[: len(data) // 10], "warm", "flac")  # the decoder's first-use allocations
    fed_before = fed_s(srv)
    with PeakRss() as rss:
        run = offline_file(srv, data, "long", "flac", timeout=300)
    print(f"funasr 30 min FLAC ({len(data)} bytes): RSS grew {rss.grew_mb:.1f} MB")
    assert not run.errors() and [r["text"] for r in run.results()] == [""] and run.ack() is not None, run.messages
    assert abs(fed_s(srv) - fed_before - 30 * 60) < 1  # every second of it decoded and fed
    assert rss.grew_mb < RSS_BOUND_MB, rss.grew_mb

    speech = np.concatenate([read_clip(SHORT), np.zeros(5 * 60 * 16000, np.float32), read_clip(JFK)])
    run = offline_file(srv, encode(speech, "flac")[1], "speech", "flac")
    assert not run.errors() and wer(TRANSCRIPTS[SHORT.name] + " " + TRANSCRIPTS[JFK.name], run.text()) <= 0.1, run.messages


def test_max_session_s_0_leaves_files_bounded_by_files_max_audio_s(whisper_runner):
    """`server.max_session_s: 0` (sessions without a time limit) must not lift the bound on a
    file's decoded audio: `files.max_audio_s` still refuses a longer file, from its header,
    on the FunASR port as on the API."""
    cfg = make_config(**{"funasr.port": free_port(), "server.max_session_s": 0, "files.max_audio_s": 60})
    long_silence = encode(np.zeros(120 * 16000, np.float32), "flac")[1]
    with ServerThread(cfg, whisper_runner) as s:
        s.funasr_url = f"ws://127.0.0.1:{s.app.funasr_port}"
        run = offline_file(s, long_silence, "long", "flac", timeout=60)
        errors = run.errors()
        assert [e["error"] for e in errors] == ["audio_too_long"] and "60 s" in errors[0]["message"], run.messages
        assert [r["text"] for r in run.results()] == [""], run.messages
        assert fed_s(s) == 0, fed_s(s)  # refused from its header: none of it was decoded and fed
        with pytest.raises(openai.APIStatusError) as refused:
            client(s, timeout=60.0).audio.transcriptions.create(model="whisper-1", file=("long.flac", long_silence))
        assert refused.value.status_code == 413 and refused.value.body["code"] == "audio_too_long"
        # Under the bound, a file is transcribed.
        ok = offline_file(s, encode(read_clip(JFK), "flac")[1], "jfk", "flac")
        assert not ok.errors() and wer(TRANSCRIPTS[JFK.name], ok.text()) <= 0.1, ok.messages


def test_a_drain_mid_feed_delivers_the_offline_file_once(whisper_runner):
    """SIGTERM's drain while an offline file is being fed (its first segments wait for the
    model, the rest not yet fed): the answer is the file's text, each word once, not the
    part fed before the drain followed by the whole file again."""
    gap = np.zeros(int(1.5 * 16000), np.float32)
    audio = np.concatenate([x for clip in CLIPS for x in (read_clip(clip), gap)])
    ref = " ".join(TRANSCRIPTS[clip.name] for clip in CLIPS)
    total_s = len(audio) / 16000
    _, data = encode(audio, "flac")
    # One segment in flight at a time: the feed waits for the model after each, so the drain
    # lands mid-file. A generous shutdown budget: the rest of the file is recognised first.
    cfg = make_config(**{"funasr.port": free_port(), "server.max_pending_finals": 1, "server.shutdown_timeout_s": 120})
    with ServerThread(cfg, whisper_runner) as srv:
        async def main():
            async with connect(f"ws://127.0.0.1:{cfg.funasr.port}", ping_interval=None, max_size=None) as ws:
                await ws.send(json.dumps({"mode": "offline", "wav_name": "d", "wav_format": "flac", "is_speaking": True}))
                await ws.send(data)
                await ws.send(json.dumps({"is_speaking": False}))
                await async_wait_until(lambda: fed_s(srv) >= 3.0, 60, interval=0.01, what="3 s of the file fed")
                fed_at_drain = fed_s(srv)
                stopping = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(srv.app.stop(), srv.loop))
                msgs = [json.loads(m) async for m in ws]
                await stopping
                return fed_at_drain, msgs, ws.close_code

        fed_at_drain, msgs, code = asyncio.run(main())
        fed = fed_s(srv)
    assert 0 < fed_at_drain < total_s - 5, (fed_at_drain, total_s)  # the drain came mid-feed
    assert code == 1001 and [m.get("mode") for m in msgs] == ["offline"], msgs
    words, ref_words = normalize_text(msgs[0]["text"]).split(), normalize_text(ref).split()
    assert len(words) <= len(ref_words) + 2 and wer(ref, msgs[0]["text"]) <= 0.1, (msgs[0]["text"], ref)
    assert abs(fed - total_s) < 1, (fed, total_s)  # every second of the file fed once
