"""Calls under attack: bounded history and webhook queues, and no half-open calls (issue 22,
items 2 and 8).

- A native stream that names a call turns each stray text frame into a `metadata` event; a
  frame of 64 KiB of control characters encodes to ~393 KB. Streamed over real sockets, call
  after call, the hub's history and the webhook's queues stay within their configured byte
  bounds (read from the server's own /metrics and from the process's RSS), and a subscriber
  that connects after such a call ended still gets its finals and `call_ended`, and is told
  how many events its history dropped.
- Metadata that JSON cannot carry (NaN, an unpaired surrogate) must not open a call it can
  never end: every bridge that opens calls (native and FreeSWITCH-style streams with a
  `call_id`, Twilio, AudioSocket) leaves `chorus_calls_active` at 0 and every subscriber
  with a `call_ended`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import uuid

import numpy as np
import psutil
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from server.calls.hub import CallHub
from server.calls.track import TrackOutput
from server.calls.webhook import WebhookSender
from server.config import load_config
from server.metrics import Metrics
from server.wer import word_error_rate
from tests.audiosocketclient import audiosocket_call, frame
from tests.ports import free_port
from tests.serverharness import DATA, TRANSCRIPTS, ServerThread, make_config, pcm16, read_clip
from tests.twilioclient import TwilioSender, stop_and_wait_closed
from tests.waiting import wait_until

log = logging.getLogger(__name__)

CLIP = DATA / "sense_and_sensibility_01_austen_64kb-0880.wav"
MIB = 1 << 20
# The stray frame: as large as a text message may be, all control characters (each
# escaped to 6 bytes by JSON).
FLOOD_FRAME = "\x01" * 65536


async def follow(srv: ServerThread, call_id: str, timeout: float = 90.0,
                 ready: asyncio.Event | None = None) -> tuple[dict, list[dict], int | None]:
    """Subscribe to one call until the server closes: (the `subscribed` message, events, close code)."""
    async with connect(f"ws://127.0.0.1:{srv.app.port}/v1/calls?call_id={call_id}", max_size=None) as ws:
        first = json.loads(await ws.recv())
        if ready is not None:
            ready.set()
        events: list[dict] = []
        try:
            async with asyncio.timeout(timeout):
                async for msg in ws:
                    events.append(json.loads(msg))
        except TimeoutError:
            pass
        return first, events, ws.close_code


def black_hole() -> socket.socket:
    """A webhook that accepts connections and never answers: every event waits in its queue."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(256)
    return sock


# ---------------------------------------------------------------------- item 2, over sockets

HISTORY_PER_CALL = 1 * MIB
HISTORY_TOTAL = 4 * MIB
WEBHOOK_PER_CALL = 1 * MIB
WEBHOOK_TOTAL = 4 * MIB
ATTACK_CALLS = 8
FRAMES_PER_CALL = 24  # ~9.4 MB of metadata events per call: 75 MB over the attack
# What the process may grow by over the attack: both bounds, plus the attack's transient
# buffers and the allocator's slack. Unbounded, the same attack held two copies of every
# event (the history's and the webhook's).
RSS_BOUND = HISTORY_TOTAL + WEBHOOK_TOTAL + 24 * MIB


async def attack_call(srv: ServerThread, call_id: str, speech: np.ndarray | None, frames: int) -> None:
    """A FreeSWITCH-style stream (config in the URL): speech (or 0.1 s of silence, which opens
    the call), then `frames` stray text frames, then the socket closes without `stop`."""
    url = f"{srv.url}?language=en&call_id={call_id}"
    audio = (np.zeros(1600, np.float32) if speech is None
             else np.concatenate([np.zeros(8000, np.float32), speech, np.zeros(16000, np.float32)]))
    async with connect(url, max_size=None) as ws:
        async def drain() -> None:
            try:
                async for _ in ws:
                    pass
            except ConnectionClosed:
                pass

        rd = asyncio.create_task(drain())
        step = 1600  # 100 ms
        for i in range(0, len(audio), step):
            await ws.send(pcm16(audio[i:i + step]))
            await asyncio.sleep(0.01)  # 10x real time
        for _ in range(frames):
            await ws.send(FLOOD_FRAME)
        rd.cancel()


@pytest.fixture(scope="module")
def flooded(whisper_runner):
    hole = black_hole()
    cfg = make_config(**{
        "calls.history_bytes": HISTORY_PER_CALL,
        "calls.max_history_bytes": HISTORY_TOTAL,
        "webhook.url": f"http://127.0.0.1:{hole.getsockname()[1]}/hook",
        "webhook.timeout_s": 60,
        "webhook.max_pending_bytes": WEBHOOK_PER_CALL,
        "webhook.max_total_pending_bytes": WEBHOOK_TOTAL,
        # Also what a call that disconnects waits for its last finals (and what the stop waits
        # for the webhook: see below).
        "server.shutdown_timeout_s": 20,
    })
    try:
        with ServerThread(cfg, whisper_runner) as srv:
            yield srv
            # The stop gives the webhook its budget to deliver what is queued (docs/telephony.md),
            # and the black hole never answers: a short one, or the budget is spent in full.
            asyncio.run_coroutine_threadsafe(srv.app.stop(1.0), srv.loop).result(30)
    finally:
        hole.close()


def test_metadata_flood_keeps_history_and_webhook_within_their_byte_bounds(flooded):
    srv = flooded
    proc = psutil.Process()
    # Warm-up: the first large frames allocate once.
    asyncio.run(attack_call(srv, "warm-up", None, 4))
    rss_before = proc.memory_info().rss
    peak_history = peak_webhook = 0.0
    # The process's memory is measured over calls without speech: the model's own working
    # memory (batches of several segments) moves RSS by tens of MiB and is not what is bounded here.
    calls = [f"attack-{i}-{uuid.uuid4().hex[:8]}" for i in range(ATTACK_CALLS)]
    for call_id in calls:
        asyncio.run(attack_call(srv, call_id, None, FRAMES_PER_CALL))
        peak_history = max(peak_history, srv.metric("chorus_call_history_bytes"))
        peak_webhook = max(peak_webhook, srv.metric("chorus_webhook_pending_bytes"))
    wait_until(lambda: srv.metric("chorus_calls_active") == 0, 30, 0.1, "every attack call ended")
    rss_growth = proc.memory_info().rss - rss_before
    # Then one such call that also speaks: its words must survive the flood.
    spoken = f"attack-speech-{uuid.uuid4().hex[:8]}"
    asyncio.run(attack_call(srv, spoken, read_clip(CLIP), FRAMES_PER_CALL))
    wait_until(lambda: srv.metric("chorus_calls_active") == 0, 60, 0.1, "the spoken call ended")
    peak_history = max(peak_history, srv.metric("chorus_call_history_bytes"))
    peak_webhook = max(peak_webhook, srv.metric("chorus_webhook_pending_bytes"))
    log.info("attack: %d calls x %d frames of %d bytes; history peak %.1f MiB, webhook peak %.1f MiB, RSS +%.1f MiB",
             ATTACK_CALLS, FRAMES_PER_CALL, len(FLOOD_FRAME), peak_history / MIB, peak_webhook / MIB, rss_growth / MIB)

    # The server's own accounting: within each bound, and both bounds were reached.
    assert HISTORY_TOTAL / 2 < peak_history <= HISTORY_TOTAL
    assert WEBHOOK_TOTAL / 2 < peak_webhook <= WEBHOOK_TOTAL
    assert srv.app.calls.history_bytes == srv.metric("chorus_call_history_bytes")
    # Every event left out is counted.
    assert srv.metric("chorus_call_history_dropped_events_total", reason="call_limit") > 0
    assert srv.metric("chorus_call_history_dropped_events_total", reason="evicted") > 0
    assert srv.metric("chorus_webhook_events_total", outcome="dropped") > 0
    # The process: it did not keep the ~57 MB of events (twice) that were sent.
    assert rss_growth < RSS_BOUND, f"RSS grew {rss_growth / MIB:.1f} MiB"

    # An application that subscribes after the spoken call ended gets its words and its end,
    # and is told that events are missing.
    first, events, code = asyncio.run(follow(srv, spoken, timeout=30))
    assert first["type"] == "subscribed" and first["history_dropped"] > 0, first
    assert code == 1000
    kinds = [e["type"] for e in events]
    assert kinds[0] == "call_started" and kinds[-1] == "call_ended", kinds
    assert events[-1]["reason"] == "disconnected"
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and seqs[-1] - len(seqs) == first["history_dropped"], (seqs, first)
    text = " ".join(e["text"] for e in events if e["type"] == "final")
    assert word_error_rate([TRANSCRIPTS[CLIP.name]], [text]) <= 0.2, text
    assert sum(len(json.dumps(e)) for e in events) <= HISTORY_PER_CALL * 1.1


# ---------------------------------------------------------------------- item 2, the hub and webhook alone

def test_hub_bounds_history_per_call_in_total_and_in_retained_calls():
    async def main():
        metrics = Metrics()
        cfg = load_config(None, {"calls.history_bytes": "200000", "calls.max_history_bytes": "500000",
                                 "calls.max_retained_calls": "2"})
        hub = CallHub(cfg, metrics)
        peak = 0
        for n in range(5):
            stream = hub.open(f"CA{n}", "native", tracks=("mono",))
            out = TrackOutput(stream, "mono")
            for i in range(10):
                stream.publish("metadata", None, {"metadata": {"text": "\x01" * 10000}})  # ~60 KB each
                out.on_final(i, f"words {i}", i * 1000, i * 1000 + 900, i * 1000 + 900, {})
                peak = max(peak, hub.history_bytes)
            stream.end("stop")
            peak = max(peak, hub.history_bytes)
        subs = {n: hub.subscribe(f"CA{n}") for n in range(5)}
        replays = {}
        for n, sub in subs.items():
            got = []
            while True:
                try:
                    body = sub.get_nowait()
                except asyncio.QueueEmpty:
                    break
                got.append(None if body is None else json.loads(body))
            replays[n] = (sub.history_dropped, got)
        return metrics, peak, hub, replays

    metrics, peak, hub, replays = asyncio.run(main())
    assert 400_000 < peak <= 500_000
    # Only the two calls that ended last are kept; the older ones were forgotten early.
    assert replays[0][1] == replays[1][1] == replays[2][1] == []
    for n in (3, 4):
        dropped, events = replays[n]
        assert events[-1] is None
        kinds = [e["type"] for e in events[:-1]]
        # Metadata went first: every final and the call's start and end are still there.
        assert kinds[0] == "call_started" and kinds[-1] == "call_ended" and kinds.count("final") == 10, kinds
        assert dropped == 10 - kinds.count("metadata") > 0
        assert sum(len(json.dumps(e, ensure_ascii=False)) for e in events[:-1]) <= 200_000
    get = metrics.registry.get_sample_value
    assert get("chorus_call_history_dropped_events_total", {"reason": "call_limit"}) >= 5 * replays[4][0]
    assert get("chorus_call_history_dropped_events_total", {"reason": "evicted"}) > 0
    assert get("chorus_call_history_bytes") == hub.history_bytes <= 500_000


def test_webhook_queues_are_bounded_in_bytes_per_call_and_in_total():
    hole = black_hole()

    async def main():
        metrics = Metrics()
        cfg = load_config(None, {"webhook.url": f"http://127.0.0.1:{hole.getsockname()[1]}/", "webhook.timeout_s": "60",
                                 "webhook.max_pending_bytes": "100000", "webhook.max_total_pending_bytes": "250000"})
        sender = WebhookSender(cfg.webhook, None, metrics)
        peak = 0.0
        big = b"x" * 30_000
        for i in range(40):
            for call in ("CA1", "CA2", "CA3", "CA4"):
                sender.deliver(call, "metadata", f"{call}-{i}", big)
                peak = max(peak, metrics.registry.get_sample_value("chorus_webhook_pending_bytes"))
            await asyncio.sleep(0)
        # One call's events, all larger than a call's whole queue: refused, counted.
        sender.deliver("CA5", "metadata", "huge", b"x" * 100_001)
        queued = {c: sum(len(e.body) for e in q) for c, q in sender._queues.items()}
        dropped = metrics.registry.get_sample_value("chorus_webhook_events_total", {"outcome": "dropped"})
        await sender.close(0.1)
        return peak, queued, dropped

    try:
        peak, queued, dropped = asyncio.run(main())
    finally:
        hole.close()
    assert 200_000 < peak <= 250_000
    assert all(b <= 100_000 for b in queued.values()) and "CA5" not in queued, queued
    # Every call still has events waiting: the total bound takes from the largest queue first.
    assert set(queued) == {"CA1", "CA2", "CA3", "CA4"}, queued
    assert dropped == 160 + 1 - sum(b // 30_000 for b in queued.values())


# ---------------------------------------------------------------------- item 8: no half-open calls

@pytest.fixture(scope="module")
def plain(whisper_runner):
    with ServerThread(make_config(), whisper_runner) as srv:
        yield srv


async def metadata_stream(srv: ServerThread, call_id: str, channels: int, speech: np.ndarray) -> list[dict]:
    """A stream that names a call and opens with metadata JSON cannot carry, sends speech (and
    more bad metadata mid-call), then `stop`. Returns what the server sent."""
    url = f"{srv.url}?language=en&call_id={call_id}&channels={channels}"
    audio = np.concatenate([np.zeros(8000, np.float32), speech, np.zeros(16000, np.float32)])
    pcm = np.repeat(audio[:, None], channels, axis=1).reshape(-1) if channels > 1 else audio
    got: list[dict] = []
    async with connect(url, max_size=None) as ws:
        await ws.send('{"campaign": NaN}')  # Python's json reads NaN; no JSON writer may write it
        await ws.send('{"who": "\\ud800"}')  # an unpaired surrogate: valid JSON text, not encodable UTF-8
        step = 1600 * channels
        for i in range(0, len(pcm), step):
            await ws.send(pcm16(pcm[i:i + step]))
            if i == 10 * step:
                await ws.send('{"score": Infinity}')
                await ws.send('{"fine": "metadata"}')
            await asyncio.sleep(0.01)
        await ws.send(json.dumps({"type": "stop"}))
        try:
            async for msg in ws:
                got.append(json.loads(msg))
        except ConnectionClosed:
            pass
        assert ws.close_code == 1000, (ws.close_code, ws.close_reason)
    return got


@pytest.mark.parametrize("channels", [1, 2], ids=["native", "freeswitch_stereo"])
def test_unencodable_metadata_never_leaves_a_call_open(plain, channels):
    srv = plain
    call_id = f"nan-{channels}-{uuid.uuid4().hex[:8]}"
    speech = read_clip(CLIP)

    async def main():
        ready = asyncio.Event()
        watcher = asyncio.create_task(follow(srv, call_id, timeout=90, ready=ready))
        await ready.wait()
        got = await metadata_stream(srv, call_id, channels, speech)
        return got, await watcher

    got, (_, events, code) = asyncio.run(main())
    errors = [m for m in got if m["type"] == "error"]
    assert [e["code"] for e in errors] == ["bad_metadata"] * 3 and not any(e["fatal"] for e in errors), errors
    assert got[-1]["type"] == "done"
    kinds = [e["type"] for e in events]
    assert kinds[0] == "call_started" and kinds[-1] == "call_ended" and code == 1000, kinds
    assert events[0]["metadata"] == {}  # the bad first frames did not open the call; audio did
    assert [e["metadata"] for e in events if e["type"] == "metadata"] == [{"fine": "metadata"}]
    assert events[-1]["reason"] == "stop"
    assert any(e["type"] == "final" and e["text"] for e in events)
    assert srv.metric("chorus_calls_active") == 0


def test_twilio_start_with_an_unencodable_parameter_is_refused_before_the_call_opens(plain):
    srv = plain
    call_sid = f"CA{uuid.uuid4().hex}"
    url = f"ws://127.0.0.1:{srv.app.port}/v1/twilio"

    async def one_stream(custom: dict, bad_second_start: bool) -> int | None:
        sender = TwilioSender(call_sid)
        async with connect(url) as ws:
            await ws.send(sender.connected())
            await ws.send(sender.start(["inbound"], custom))
            await ws.send(sender.media("inbound", 1, 0, b"\xff" * 160))
            if bad_second_start:
                # Its error message quotes the bad sample rate: an event JSON cannot carry.
                await ws.send(sender.start(["inbound"], {}, rate="\ud800"))  # type: ignore[arg-type]
            await ws.send(sender.dtmf("5"))
            return await stop_and_wait_closed(ws, sender)

    async def main():
        ready = asyncio.Event()
        watcher = asyncio.create_task(follow(srv, call_sid, timeout=60, ready=ready))
        await ready.wait()
        refused = await one_stream({"campaign": "\ud800"}, False)
        active_after_refusal = await asyncio.to_thread(srv.metric, "chorus_calls_active")
        accepted = await one_stream({"campaign": "c-9"}, True)
        return refused, active_after_refusal, accepted, await watcher

    refused, active_after_refusal, accepted, (_, events, code) = asyncio.run(main())
    assert refused == 1008 and active_after_refusal == 0
    # The subscriber saw only the call that opened, from its start to its end.
    kinds = [e["type"] for e in events]
    assert kinds[0] == "call_started" and kinds[-1] == "call_ended" and code == 1000, kinds
    assert events[0]["metadata"]["custom_parameters"] == {"campaign": "c-9"}
    assert events[-1]["reason"] == "stop" and accepted == 1000
    assert [e["digit"] for e in events if e["type"] == "dtmf"] == ["5"]
    assert srv.metric("chorus_calls_active") == 0
    assert srv.metric("chorus_errors_total", code="unencodable_event") >= 1


def test_audiosocket_error_paths_end_their_calls(whisper_runner):
    cfg = make_config(**{"audiosocket.port": free_port()})
    speech = read_clip(CLIP)[::2]  # 8 kHz is near enough for a call that must merely end
    with ServerThread(cfg, whisper_runner) as srv:
        call = uuid.uuid4()

        async def main():
            ready = asyncio.Event()
            watcher = asyncio.create_task(follow(srv, str(call), timeout=60, ready=ready))
            await ready.wait()
            # A malformed frame (unknown kind) in the middle of the call.
            await audiosocket_call(srv.app.audiosocket_port, call, speech[:16000], speed=8.0,
                                   raw_after=frame(0x7E, b"?"), hangup=False)
            return await watcher

        _, events, code = asyncio.run(main())
        kinds = [e["type"] for e in events]
        assert kinds[0] == "call_started" and kinds[-1] == "call_ended" and code == 1000, kinds
        assert events[-1]["reason"] == "protocol_error"
        assert srv.metric("chorus_calls_active") == 0
