"""What one WebSocket client can make the server buffer while the server is not reading it is
bounded in bytes (issue 22, item 4), on the main port and on the FunASR port.

websockets queues received frames up to ``max_queue`` (server.max_received_frames) before it
stops reading the socket; each frame may be as large as the listener's ``max_size``. The server
stops reading a client under backpressure (``server.max_pending_finals`` finals waiting for the
model). Here the model hangs (tests/faultrunner.py), so an attacker's first final never
finishes and its connection is held; it then floods the largest frames the listener takes,
as fast as TCP lets it, and the process's RSS may grow by at most the documented bound
((max_received_frames + 1) x max frame + one socket read) plus the attacker's own send buffer
(this test's client lives in the same process). With websockets' frame counts alone (64
frames of 4 MiB on the main port, of 64 MiB on the FunASR port) the same flood held 256 MiB.

An honest session streams beside it the whole time and, once the model is back, gets its
text right.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import numpy as np
import psutil
import pytest
from websockets.asyncio.client import connect

from client_demo.pacing import send_paced
from tests.faultrunner import FaultyRunner
from server.wer import word_error_rate
from tests.ports import free_port
from tests.serverharness import DATA, TRANSCRIPTS, ServerThread, make_config, pcm16, read_clip
from tests.waiting import async_wait_until

MiB = 1 << 20
JFK = DATA / "jfk.wav"
FRAMES = 4  # server.max_received_frames (the default)
MAX_MESSAGE = 1 * MiB  # server.max_message_bytes (the default): the main port takes frames of 4x it
FUNASR_MESSAGE = 4 * MiB  # funasr.max_message_bytes (the default)
READ = 256 << 10  # one socket read that is parsed whole after reading pauses
FLOOD_LIMIT = 100  # frames the attacker tries at most (400 MiB): far beyond any bound here
STALL_S = 1.5  # no frame sent for this long: TCP has closed its window, the server is not reading


def bound(frame: int) -> int:
    """What docs/reliability.md states one connection can make the server buffer."""
    return (FRAMES + 1) * frame + READ


@pytest.fixture(scope="module")
def model(whisper_runner):
    return FaultyRunner(whisper_runner)


@pytest.fixture(scope="module")
def srv(model):
    cfg = make_config(**{"funasr.port": free_port(), "server.max_pending_finals": 1, "batcher.partial_interval_ms": 300})
    with ServerThread(cfg, model) as server:
        yield server


def rss() -> int:
    return psutil.Process().memory_info().rss


def holding(srv: ServerThread, ws) -> bool:
    """The server holds this client's connection: it stopped reading it (backpressure)."""
    try:
        return any(c._holding and c.ws.remote_address == ws.local_address for c in list(srv.app.connections))
    except RuntimeError:  # the set changed size while copied (the server's loop runs meanwhile): ask again
        return False


async def held_attacker(srv: ServerThread, url: str, greet: list[str], frame: int) -> tuple[int, int, int]:
    """Open a connection, get it held (speech, then a pause: its final waits for the hung model),
    then flood frames of ``frame`` bytes until TCP stops taking them. Returns (frames sent, the
    process's RSS growth at the stall less this client's unsent bytes, RSS before the flood)."""
    speech = pcm16(np.concatenate([read_clip(JFK), np.zeros(32000, np.float32)]))
    payload = bytes(frame)
    async with connect(url, max_size=None, ping_interval=None) as ws:
        for text in greet:
            await ws.send(text)
        # One message, so that the frames waiting when the server stops reading are the flood's.
        await ws.send(speech)
        # The server reads it, cuts a segment whose final waits for the hung model, and holds the connection.
        await async_wait_until(lambda: holding(srv, ws), 30, what="the attacker's connection held")
        before = rss()
        sent = 0

        async def flood() -> None:
            nonlocal sent
            while sent < FLOOD_LIMIT:
                await ws.send(payload)
                sent += 1

        task = asyncio.create_task(flood())
        last, since = -1, time.monotonic()
        while not task.done() and time.monotonic() - since < STALL_S:
            await asyncio.sleep(0.1)
            if sent != last:
                last, since = sent, time.monotonic()
        # Less what this client itself holds: the part of a frame TCP has not taken yet.
        grown = rss() - before - ws.transport.get_write_buffer_size()
        task.cancel()
        ws.transport.abort()  # the attacker leaves without a close handshake
    return sent, grown, before


async def honest_stream(url: str) -> list[str]:
    """JFK at twice real time, then `stop`: the texts of its finals. Without the client's own
    keepalive (tests/serverharness.stream_audio has websockets' 20 s one): a server that holds a
    client back (here while the model hangs) reads its pings only when it reads again."""
    finals: list[str] = []
    x = np.concatenate([np.zeros(8000, np.float32), read_clip(JFK), np.zeros(16000, np.float32)])
    async with connect(url, max_size=None, ping_interval=None) as ws:
        async def reader() -> None:
            async for msg in ws:
                m = json.loads(msg)
                if m["type"] == "final" and m["text"]:
                    finals.append(m["text"])

        rd = asyncio.create_task(reader())
        await send_paced(ws, x, 16000, 100, 2.0, encode=pcm16)
        await ws.send(json.dumps({"type": "stop"}))
        await asyncio.wait_for(rd, 180)
    return finals


def honest_session(srv: ServerThread, out: dict) -> threading.Thread:
    def run() -> None:
        out["finals"] = asyncio.run(honest_stream(srv.url))

    t = threading.Thread(target=run)
    t.start()
    return t


@pytest.mark.parametrize("port", ["main", "funasr"])
def test_a_client_the_server_is_not_reading_cannot_make_it_buffer_more_than_the_bound(srv, model, port):
    if port == "main":
        url, greet, frame = srv.url, [json.dumps({"type": "start", "sample_rate": 16000})], 4 * MAX_MESSAGE
    else:
        url = f"ws://127.0.0.1:{srv.app.funasr_port}"
        greet, frame = [json.dumps({"mode": "offline", "wav_name": "flood", "is_speaking": True})], FUNASR_MESSAGE
    honest: dict = {}
    model.hang()
    try:
        t = honest_session(srv, honest)
        sent, grown, _ = asyncio.run(held_attacker(srv, url, greet, frame))
    finally:
        model.release()
    t.join(180)
    # The flood did reach the server and then stalled: it was not read, not refused.
    print(f"\n{port}: {sent} frames sent, RSS +{grown / MiB:.1f} MiB")
    assert 0 < sent < FLOOD_LIMIT, sent
    # 4 MiB for the allocator's own bookkeeping and the process's other work meanwhile (the
    # honest session, the batcher); measured +20.3 to +21.6 MiB on the main port.
    allowed = bound(frame) + 4 * MiB
    assert grown < allowed, f"RSS grew {grown / MiB:.1f} MiB with {sent} frames of {frame / MiB:.0f} MiB sent; " \
                            f"bound {allowed / MiB:.1f} MiB"
    finals = honest["finals"]
    assert word_error_rate([TRANSCRIPTS[JFK.name]], [" ".join(finals)]) <= 0.1, finals
