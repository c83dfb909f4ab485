"""A client that stops reading its results is cut loose (1008 slow_consumer); its neighbours are not.

server/transport/native.py bounds each client's outbox at ``server.max_outgoing_messages``.
To make that bound bite on loopback, the slow client

- opens its TCP socket itself with a tiny SO_RCVBUF (set before connect, so the advertised
  window stays small) and hands it to websockets with ``sock=``;
- never calls ``recv`` while flooding, so websockets stops reading the socket after
  ``max_queue`` frames and the TCP window closes;
- floods the server with small text messages of an unknown ``type``: each one is answered by
  a non-fatal ``unknown_type`` error (~130 bytes), so every message it sends costs the server
  a reply without touching the model. Once the kernel buffers and the websockets write buffer
  are full the server's writer blocks, the outbox (4 messages here) fills, and the client
  must be disconnected.

Meanwhile a well-behaved session on the same server streams speech and must get every
final, accurately, and close normally.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from client_demo.pacing import send_paced
from server.wer import word_error_rate
from tests.serverharness import CLIPS, TRANSCRIPTS, ServerThread, StreamLog, make_config, pcm16, read_clip
from tests.test_server import check_stream_invariants
from tests.waiting import async_wait_until, wait_until

log = logging.getLogger(__name__)

MAX_OUTGOING = 4
FLOOD_PAYLOAD = json.dumps({"type": "x"})  # each one is answered by a ~130-byte unknown_type error
FLOOD_MAX_MESSAGES = 200_000  # ~26 MB of replies: far more than any loopback buffering
FLOOD_BATCH = 500  # messages between two looks at /metrics


@pytest.fixture(scope="module")
def srv(whisper_runner):
    cfg = make_config(**{
        "server.max_outgoing_messages": MAX_OUTGOING,
        "batcher.partial_interval_ms": 300,
        "batcher.batch_wait_ms": 10,
    })
    with ServerThread(cfg, whisper_runner) as s:
        yield s


def errors_sent(srv: ServerThread, code: str) -> float:
    """chorus_errors{code=...} as /metrics shows it (0 before the first increment)."""
    return srv.metric("chorus_errors_total", code=code)


def small_rcvbuf_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Before connect: the window scale is negotiated in the SYN, from this buffer size.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def flood_until_kicked(ws, srv: ServerThread, kicked_before: float) -> tuple[bool, int]:
    """Send flood messages without reading until the server reports a kick (or the cap).
    Returns (kicked, messages sent)."""
    sent = 0
    while sent < FLOOD_MAX_MESSAGES:
        for _ in range(FLOOD_BATCH):
            await ws.send(FLOOD_PAYLOAD)
        sent += FLOOD_BATCH
        if await asyncio.to_thread(errors_sent, srv, "slow_consumer") > kicked_before:
            return True, sent
    return False, sent


def test_slow_consumer_is_disconnected_and_spares_other_sessions(srv):
    clip = next(c for c in CLIPS if c.name == "jfk.wav")
    speech = read_clip(clip)
    audio = np.concatenate([np.zeros(8000, np.float32), speech, np.zeros(16000, np.float32)])
    kicked_before = errors_sent(srv, "slow_consumer")
    t_start = time.monotonic()

    async def main():
        good_speaking = asyncio.Event()  # the good session has an open segment
        slow_done = asyncio.Event()  # the slow client has been kicked and has seen its close

        async def good_client() -> StreamLog:
            out = StreamLog()
            async with connect(srv.url, max_size=None) as ws:
                await ws.send(json.dumps({"type": "start", "language": "en"}))

                async def reader() -> None:
                    async for msg in ws:
                        m = json.loads(msg)
                        out.messages.append(m)
                        if m["type"] == "speech_started":
                            good_speaking.set()

                rd = asyncio.create_task(reader())
                await send_paced(ws, audio, 16000, 100, 4.0, encode=pcm16)
                # Keep this session open (and its results flowing) until the flood is over.
                await asyncio.wait_for(slow_done.wait(), 60)
                await ws.send(json.dumps({"type": "stop"}))
                await asyncio.wait_for(rd, 60)
                out.close_code = ws.close_code
            return out

        async def slow_client() -> dict:
            await asyncio.wait_for(good_speaking.wait(), 60)
            sock = small_rcvbuf_socket(srv.app.port)
            async with connect(srv.url, sock=sock, max_size=None, ping_interval=None, close_timeout=30) as ws:
                kicked, sent = await flood_until_kicked(ws, srv, kicked_before)
                if not kicked:
                    ws.transport.abort()  # fail below, without waiting for a close that never comes
                    slow_done.set()
                    return {"kicked": False, "sent": sent}
                log.info("slow client: server kicked it after %d flood messages", sent)
                # Now read what the server had already handed to the socket, up to its close frame.
                received: list[dict] = []
                try:
                    while True:
                        received.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
                except ConnectionClosed:
                    pass
                code, reason = ws.close_code, ws.close_reason
            slow_done.set()
            log.info("slow client: read %d of %d replies, then close %s %r", len(received), sent, code, reason)
            return {"kicked": True, "sent": sent, "received": received, "code": code, "reason": reason}

        try:
            return await asyncio.gather(good_client(), slow_client())
        finally:
            slow_done.set()

    good, slow = asyncio.run(main())
    log.info("slow-consumer test took %.1f s", time.monotonic() - t_start)

    # The slow client: disconnected with 1008 and the documented reason, after the server had
    # stopped queueing for it (it got fewer replies than it sent requests, and only replies).
    assert slow["kicked"], f"{slow['sent']} unread replies and chorus_errors{{code=\"slow_consumer\"}} did not move"
    assert slow["code"] == 1008, (slow["code"], slow["reason"])
    assert slow["reason"].startswith("slow_consumer"), slow["reason"]
    assert 0 < len(slow["received"]) < slow["sent"], (len(slow["received"]), slow["sent"])
    assert all(m["type"] == "error" and m["code"] == "unknown_type" and m["fatal"] is False for m in slow["received"])
    # Exactly one kick: the well-behaved session was never counted as slow.
    assert errors_sent(srv, "slow_consumer") == kicked_before + 1

    # The well-behaved session: every final, in order, accurate, then done and 1000.
    audio_ms = len(audio) * 1000 // 16000
    check_stream_invariants(good, audio_ms)
    assert good.of("error") == [], good.of("error")
    finals = good.of("final")
    assert finals and all(f["text"] and "error" not in f for f in finals), finals
    hyp = " ".join(f["text"] for f in finals)
    wer = word_error_rate([TRANSCRIPTS[clip.name]], [hyp])
    log.info("good session WER %.3f: %s", wer, hyp)
    assert wer <= 0.1, hyp

    # The kicked session was torn down; nothing of it is left in the batcher.
    wait_until(lambda: srv.app.sessions == 0, 10, 0.1, "every session closed")
    assert srv.metric("chorus_sessions_active") == 0
    assert srv.metric("chorus_batcher_queue_depth") == 0


def test_kicked_client_that_never_reads_again_loses_its_slot(srv):
    """A kicked client that neither reads nor hangs up cannot take the close frame: the server
    stops its session at once and aborts the connection after its close grace, so the slot
    is freed (it once lingered until the client itself went away)."""
    kicked_before = errors_sent(srv, "slow_consumer")

    async def main() -> dict:
        sock = small_rcvbuf_socket(srv.app.port)
        async with connect(srv.url, sock=sock, max_size=None, ping_interval=None, close_timeout=1) as ws:
            kicked, _ = await flood_until_kicked(ws, srv, kicked_before)
            # Hold the connection open without reading; the server must let go by itself.
            freed = await async_wait_until(lambda: srv.app.sessions == 0, 30, 0.1,
                                           "the kicked client's session freed while it holds the connection")
            ended = False
            try:
                while True:
                    await asyncio.wait_for(ws.recv(), 30)
            except ConnectionClosed:
                ended = True
        return {"kicked": kicked, "freed": freed, "ended": ended}

    out = asyncio.run(main())
    assert out["kicked"]
    assert out["freed"]
    assert out["ended"]
    assert srv.metric("chorus_batcher_queue_depth") == 0


def test_a_burst_from_a_reading_client_is_not_mistaken_for_a_slow_one(srv):
    """Many messages arriving at once, each answered, must not overflow a small outbox while
    the client reads: the server flushes before reading on (it once could kick such a client,
    because receiving buffered frames never yields to the writer)."""
    kicked_before = errors_sent(srv, "slow_consumer")
    burst = 20 * MAX_OUTGOING

    async def main() -> list[dict]:
        async with connect(srv.url, max_size=None) as ws:
            for _ in range(burst):
                await ws.send(json.dumps({"type": "no_such_type"}))
            replies = [json.loads(await asyncio.wait_for(ws.recv(), 30)) for _ in range(burst)]
            await ws.send(json.dumps({"type": "stop"}))
            replies.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
            return replies

    replies = asyncio.run(main())
    assert [m["code"] for m in replies[:-1]] == ["unknown_type"] * burst
    assert replies[-1]["type"] == "done"
    assert errors_sent(srv, "slow_consumer") == kicked_before


def test_outbox_is_bounded_in_bytes_too(whisper_runner):
    """A message-count bound alone lets a slow client pin count x message-size bytes of
    server memory; `max_outgoing_bytes` cuts it loose once that many characters wait."""
    cfg = make_config(**{"server.max_outgoing_messages": 1_000_000, "server.max_outgoing_bytes": 8192})
    with ServerThread(cfg, whisper_runner) as s:
        kicked_before = errors_sent(s, "slow_consumer")

        async def main() -> tuple[bool, int, int | None]:
            sock = small_rcvbuf_socket(s.app.port)
            async with connect(s.url, sock=sock, max_size=None, ping_interval=None, close_timeout=30) as ws:
                kicked, sent = await flood_until_kicked(ws, s, kicked_before)
                if not kicked:
                    ws.transport.abort()
                    return False, sent, None
                try:
                    while True:
                        await asyncio.wait_for(ws.recv(), 30)
                except ConnectionClosed:
                    pass
                return True, sent, ws.close_code

        kicked, sent, code = asyncio.run(main())
    assert kicked, f"{sent} unread replies and no kick"
    assert code == 1008


def test_a_kicked_call_stream_still_delivers_its_finals_to_the_call(srv):
    """A stream that names a call has two readers: its socket and the call's application. When
    the socket's client stops reading and is kicked, the finals its session owes (the open
    segment and those queued for the model) still reach the call, which then ends
    `slow_consumer`; they were once cancelled at the kick and the call ended `disconnected`
    without them."""
    clip = next(c for c in CLIPS if c.name == "jfk.wav")
    call_id = f"kicked-{time.monotonic_ns()}"
    kicked_before = errors_sent(srv, "slow_consumer")
    # No trailing silence: the last segment is still open when the kick comes.
    audio = np.concatenate([np.zeros(8000, np.float32), read_clip(clip)])

    async def follow(ready: asyncio.Event) -> list[dict]:
        events: list[dict] = []
        async with connect(f"ws://127.0.0.1:{srv.app.port}/v1/calls?call_id={call_id}") as ws:
            await ws.recv()  # subscribed
            ready.set()
            async with asyncio.timeout(120):
                async for msg in ws:
                    events.append(json.loads(msg))
        return events

    async def slow_call_stream() -> bool:
        sock = small_rcvbuf_socket(srv.app.port)
        async with connect(srv.url, sock=sock, max_size=None, ping_interval=None, close_timeout=1) as ws:
            await ws.send(json.dumps({"type": "start", "language": "en", "call_id": call_id}))
            await send_paced(ws, audio, 16000, 100, 8.0, encode=pcm16)
            kicked, _ = await flood_until_kicked(ws, srv, kicked_before)
            ws.transport.abort()  # it never reads again
            return kicked

    async def main():
        ready = asyncio.Event()
        watcher = asyncio.create_task(follow(ready))
        await ready.wait()
        kicked = await slow_call_stream()
        return kicked, await watcher

    kicked, events = asyncio.run(main())
    assert kicked
    kinds = [e["type"] for e in events]
    assert kinds[0] == "call_started" and kinds[-1] == "call_ended", kinds
    end = events[-1]
    assert end["reason"] == "slow_consumer" and "lost_segments" not in end, end
    finals = [e for e in events if e["type"] == "final"]
    hyp = " ".join(f["text"] for f in finals)
    wer = word_error_rate([TRANSCRIPTS[clip.name]], [hyp])
    log.info("kicked call stream: WER %.3f: %s", wer, hyp)
    assert wer <= 0.1, hyp
    wait_until(lambda: srv.app.sessions == 0, 10, 0.1, "every session closed")
    assert srv.metric("chorus_calls_active") == 0
