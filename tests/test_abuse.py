"""The abuse run (issue 22): every door of the server attacked at once, beside one honest session.

One server with every listener on (main port, FunASR port, API port, AudioSocket; Twilio is on
by default and, with no Twilio Auth Token, takes the server's token), token auth on and
`/metrics` behind the token, the real Whisper model. One honest native session streams JFK
at twice real time with the token. While it streams, for every door in
``server.transport.access.DOORS`` (so a door added later is attacked too):

- strangers knock for the whole attack window: a foreign Host (with the matching Origin, as a
  DNS-rebinding page sends), no token, a wrong token, a foreign Origin, each where the door's
  guards say it must be refused (AudioSocket: a peer not in `audiosocket.allowed_peers`); every
  answer must be that refusal;
- and where a door takes work, an attacker with the token does its worst (``WORST``): stray
  64 KiB control-character metadata frames on calls, oversized and silent frames sent while
  never reading, NaN metadata, a `/v1/calls?call_id=*` subscriber that never reads, Twilio and
  Realtime streams of garbage, a WAV declaring 1 Hz to the FunASR port and the API, too many
  and too large form fields, trickling bodies, path traversal under `/static/`, an AudioSocket
  call joined by its UUID from other connections.

Then: the honest text is right (WER against tests/data/transcripts.json), both HTTP listeners
answer `/healthz` 200, an honest API request is transcribed, every call has ended
(`chorus_calls_active` 0), and the process's RSS (the server runs in this process; sampled
every 5 ms, peak over the attack less the level after a warm-up) grew by less than
``RSS_BOUND``. Loopback only; every attacker is bounded in count and time and cancelled or
aborted at the end.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid

import aiohttp
import numpy as np
import pytest
from websockets.asyncio.client import connect

from server.transport.access import API, AUDIOSOCKET, DOORS, FUNASR, HOST, MAIN, METRICS_TOKEN, ORIGIN, PEERS, TOKEN, TWILIO, Door
from tests.audiosocketclient import audiosocket_call, frame
from tests.callrecorder import CallRecorder
from tests.funasrclient import run_funasr
from tests import scrape
from tests.ports import free_port
from tests.serverharness import DATA, ServerThread, clip_wer, make_config, pcm16, read_clip, stream_audio
from tests.test_api import BOUNDARY, FORM_HEAD, FORM_TAIL, client
from tests.test_file_bounds import PeakRss, wav_declaring
from tests.twilioclient import TwilioSender
from tests.waiting import async_wait_until, wait_until

MiB = 1 << 20
TOKEN_VALUE = "abuse-token-7Wq2"
AUTH = {"Authorization": f"Bearer {TOKEN_VALUE}"}
JFK = DATA / "jfk.wav"
SHORT = DATA / "sense_and_sensibility_01_austen_64kb-0880.wav"
ATTACKER = "127.0.0.2"  # another loopback address: another client (AudioSocket: a peer not allowed)
ATTACK_S = 4.0  # how long each attacker keeps at it
KNOCK_EVERY_S = 0.1  # strangers: at most 1 / this knocks per door per second
FOREIGN = "evil.example"
FLOOD_FRAME = "\x01" * 65536  # the largest stray text frame, ~393 KB once JSON-escaped in an event
# The RSS bound, from the documented bounds (docs/reliability.md) of what this run can make the
# server hold at once: four connections flooding frames while not read (stream, Realtime,
# Twilio, FunASR) at 20.3 MiB each = 81 MiB; three flooded calls' history at
# `calls.history_bytes` 4 MiB = 12 MiB; one non-reading `/v1/calls` subscriber's outbox 4 MiB;
# the API's requests (256 KiB of fields + 1 MiB of upload + 128 KiB read buffer each, a few at
# once) ~6 MiB: 103 MiB; plus this process's own attackers (their unsent frames, up to 4 MiB per
# flooding connection) and the model's working memory for the honest session and the allocator's
# slack, ~100 MiB (with the strangers alone and the honest session the peak was +48 MiB).
# Measured on the 2-core CPU, shared with other test runs: +87.5 to +140.6 MiB. Before issue
# 22's bounds the 1 Hz WAV alone held +944 MB, the metadata flood +146 MiB for 8 calls and one
# unread connection +213 MiB.
RSS_BOUND = 200 * MiB

# Paths to knock on where the door's pattern does not name one.
PATHS = {"calls": "/v1/calls?call_id=*", "funasr": "/healthz", "page files": "/static/app.js",
         "model": "/v1/models/chorus"}


@pytest.fixture(scope="module")
def srv(whisper_runner, tmp_path_factory):
    f = tmp_path_factory.mktemp("abuse") / "tokens"
    f.write_text(TOKEN_VALUE + "\n")
    cfg = make_config(**{
        "server.auth_tokens_file": str(f), "server.metrics_require_token": "true",
        "funasr.port": free_port(), "api.port": free_port(), "audiosocket.port": free_port(),
        "audiosocket.allowed_peers": "[127.0.0.1/32]",
    })
    with pytest.MonkeyPatch.context() as mp:  # read when the server is built
        mp.delenv("CHORUS_AUTH_TOKENS", raising=False)
        mp.delenv("CHORUS_TWILIO_AUTH_TOKEN", raising=False)
        server = ServerThread(cfg, whisper_runner)
    with server as s:
        s.recorder = s.app.calls.sink = UuidCallRecorder()
        yield s


class UuidCallRecorder(CallRecorder):
    """The call events of AudioSocket calls (named by UUID) only: the metadata flood's calls
    (``abuse-*``) are left out, so the recorder holds no copy of them in this process."""

    def deliver(self, call_id: str, event_type: str, event_id: str, body: bytes) -> None:
        if not call_id.startswith("abuse-"):
            super().deliver(call_id, event_type, event_id, body)


def port_of(s: ServerThread, listener: str) -> int:
    return {MAIN: s.app.port, FUNASR: s.app.funasr_port, API: s.app.api_port, AUDIOSOCKET: s.app.audiosocket_port}[listener]


def metric(s: ServerThread, name: str, **labels: str) -> float:
    """One sample of the server's /metrics (behind the token here), read over its socket."""
    return scrape.metric(s.app.port, name, headers=AUTH, **labels)


# ---------------------------------------------------------------------- a raw async HTTP client
async def request(port: int, method: str, path: str, headers: list[tuple[str, str]], body: bytes = b"",
                  timeout: float = 15.0) -> tuple[int, dict[str, str], bytes]:
    """One request from ATTACKER with exactly these headers; a 101 is read up to its headers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(ATTACKER, 0))
    try:
        upgrade = any(k == "Upgrade" for k, _ in headers)
        head = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers), f"Content-Length: {len(body)}",
                "Connection: Upgrade" if upgrade else "Connection: close", "", ""]
        writer.write("\r\n".join(head).encode() + body)
        async with asyncio.timeout(timeout):
            lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            hdrs = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if line)}
            if status == 101:
                return status, hdrs, b""
            n = int(hdrs.get("content-length", "-1"))
            data = await (reader.readexactly(n) if n >= 0 else reader.read())
        return status, hdrs, data
    finally:
        writer.transport.abort()


def error_code(body: bytes) -> str | None:
    """Ours ({"error": code}) or the API's (OpenAI's shape)."""
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    err = payload.get("error") if isinstance(payload, dict) else None
    return err.get("code") if isinstance(err, dict) else err


# ---------------------------------------------------------------------- strangers, from each door's guards
def stranger_attempts(door: Door) -> list[tuple[str, str, int]]:
    """(attempt, the refusal's code, its status) for every refusal the door's guards promise."""
    g = door.guards
    out = []
    if HOST in g:
        out.append(("foreign Host", "unknown_host", 421))
    if TOKEN in g or METRICS_TOKEN in g or TWILIO in g:  # no Twilio Auth Token here: the token guards Twilio
        out += [("no token", "unauthorized", 401), ("wrong token", "unauthorized", 401)]
    if ORIGIN in g:
        out.append(("foreign Origin", "forbidden_origin", 403))
    return out


def door_path(door: Door) -> str:
    if door.name in PATHS:
        return PATHS[door.name]
    return "/nope" if door.path == "*" else door.path.replace("*", "nope")


async def strangers(s: ServerThread, door: Door, until: float) -> int:
    """Knock with every refused attempt in turn until ``until``; each must get its refusal."""
    if PEERS in door.guards:
        return await audiosocket_strangers(s, until)
    known = {HOST, TOKEN, METRICS_TOKEN, TWILIO, ORIGIN}
    assert set(door.guards) <= known, f"door {door.name!r} has a guard this run does not attack: {door.guards}"
    attempts = stranger_attempts(door)
    port, path = port_of(s, door.listener), door_path(door)
    method = door.methods[0] if door.methods else "GET"
    ws = door.listener in (MAIN, FUNASR)
    n = 0
    while time.monotonic() < until:
        name, code, status = attempts[n % len(attempts)]
        host = f"{FOREIGN}:{port}" if name == "foreign Host" else f"127.0.0.1:{port}"
        headers = [("Host", host)]
        if name == "foreign Host":
            headers.append(("Origin", f"http://{host}"))  # a rebinding page: its Origin matches its Host
        elif name == "foreign Origin":
            headers.append(("Origin", "https://evil.example"))
        if name != "no token":
            headers.append(("Authorization", f"Bearer {TOKEN_VALUE if name != 'wrong token' else 'not-' + TOKEN_VALUE}"))
        if ws and method == "GET":
            headers += [("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13"),
                        ("Sec-WebSocket-Key", base64.b64encode(uuid.uuid4().bytes).decode())]
        got, _, body = await request(port, method, path, headers)
        assert (got, error_code(body)) == (status, code), (door.name, name, got, body[:300])
        n += 1
        await asyncio.sleep(KNOCK_EVERY_S)
    return n


async def audiosocket_strangers(s: ServerThread, until: float) -> int:
    """Calls from a peer not allowed: each closed before a byte is read (nothing sent back)."""
    n = 0
    before = await asyncio.to_thread(metric, s, "chorus_sessions_rejected_total", reason="peer")
    while time.monotonic() < until:
        run = await audiosocket_call(s.app.audiosocket_port, uuid.uuid4(), np.zeros(800, np.float32), speed=4.0,
                                     read_timeout=10, local_addr=(ATTACKER, 0))
        assert run.received == b"", run
        n += 1
        await asyncio.sleep(KNOCK_EVERY_S * 3)
    assert await asyncio.to_thread(metric, s, "chorus_sessions_rejected_total", reason="peer") - before == n
    return n


# ---------------------------------------------------------------------- the worst a client with the token can do
def ws_url(s: ServerThread, listener: str, path: str) -> str:
    return f"ws://127.0.0.1:{port_of(s, listener)}{path}"


async def send_until(ws, frames, until: float) -> int:
    """Send frames while TCP takes them, until ``until``; never read. Returns how many went."""
    n = 0
    for f in frames:
        left = until - time.monotonic()
        if left <= 0:
            break
        try:
            await asyncio.wait_for(ws.send(f), left)
        except Exception:  # TCP stalled (TimeoutError: the server stopped reading us), or the server closed us
            break
        n += 1
    return n


async def metadata_flood(s: ServerThread, until: float) -> int:
    """Three calls, each opened with 0.1 s of silence, then stray 64 KiB control-character frames
    (each a ~393 KB `metadata` event in the call's history); never read; leave without `stop`."""
    async def one(i: int) -> int:
        url = ws_url(s, MAIN, f"/v1/stream?language=en&call_id=abuse-meta-{i}-{uuid.uuid4().hex[:6]}")
        async with connect(url, additional_headers=AUTH, max_size=None, ping_interval=None,
                           local_addr=(ATTACKER, 0)) as ws:
            await ws.send(pcm16(np.zeros(1600, np.float32)))
            n = await send_until(ws, [FLOOD_FRAME] * 30, until)
            ws.transport.abort()
        return n
    return sum(await asyncio.gather(*(one(i) for i in range(3))))


async def frame_flood(s: ServerThread, listener: str, path: str, greet: list[str], frames: list[bytes | str],
                      until: float) -> int:
    """Greet, then send ``frames`` as fast as TCP takes them, never reading; then vanish."""
    async with connect(ws_url(s, listener, path), additional_headers=AUTH, max_size=None, ping_interval=None,
                       local_addr=(ATTACKER, 0)) as ws:
        for g in greet:
            await ws.send(g)
        n = await send_until(ws, frames, until)
        ws.transport.abort()
    return n


async def stream_flood(s: ServerThread, until: float) -> int:
    # 4 MiB frames: over `server.max_message_bytes` (each an error the client never reads), then
    # 1 MiB of silence each (32 s of audio per frame).
    big, silence = bytes(4 * MiB), pcm16(np.zeros(MiB // 2, np.float32))
    return await frame_flood(s, MAIN, "/v1/stream", [json.dumps({"type": "start", "sample_rate": 16000})],
                             [big] * 8 + [silence] * 8, until)


async def nan_metadata(s: ServerThread, until: float) -> int:
    """Metadata JSON cannot carry, on a call: non-fatal `bad_metadata` errors, the stream goes on
    and ends with `done`, and no call is left open (checked at the end: calls_active 0)."""
    url = ws_url(s, MAIN, f"/v1/stream?language=en&call_id=abuse-nan-{uuid.uuid4().hex[:6]}")
    n = 0
    while time.monotonic() < until and n < 5:
        async with connect(url, additional_headers=AUTH, max_size=None, local_addr=(ATTACKER, 0)) as ws:
            await ws.send('{"campaign": NaN}')
            await ws.send(pcm16(np.zeros(4800, np.float32)))
            await ws.send('{"score": Infinity}')
            await ws.send(json.dumps({"type": "stop"}))
            got = [json.loads(m) async for m in ws]
        errors = [m for m in got if m["type"] == "error"]
        assert [e["code"] for e in errors] == ["bad_metadata"] * 2 and not any(e["fatal"] for e in errors), got
        assert got[-1]["type"] == "done", got
        n += 1
    return n


async def calls_subscriber(s: ServerThread, until: float) -> int:
    """Subscribes to every call's words and never reads, while the metadata flood's events come."""
    async with connect(ws_url(s, MAIN, "/v1/calls?call_id=*"), additional_headers=AUTH, max_size=None,
                       ping_interval=None, local_addr=(ATTACKER, 0)) as ws:
        ws.transport.pause_reading()  # not reading, down to the socket: the server's outbox fills
        await asyncio.sleep(max(0.0, until - time.monotonic()))
        ws.transport.abort()
    return 1


async def realtime_flood(s: ServerThread, until: float) -> int:
    append = json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(bytes(700_000)).decode()})
    garbage = ["{", json.dumps({"type": "session.update", "session": {"type": "nonsense" * 1000}}), "\x00" * 65536]
    return await frame_flood(s, MAIN, "/v1/realtime?intent=transcription", [], (garbage + [append] * 4) * 4, until)


async def twilio_flood(s: ServerThread, until: float) -> int:
    """A two-track call, then media that is not base64, stray events and huge frames; then gone."""
    sender = TwilioSender("CA" + uuid.uuid4().hex)
    bad = json.dumps({"event": "media", "media": {"track": "inbound", "payload": "!" * 60000}})
    odd = json.dumps({"event": "nope", "x": "\x01" * 60000})
    frames = ([sender.media("inbound", i, i * 20, b"\xff" * 160) for i in range(50)] + [bad, odd] * 10
              + ["x" * (4 * MiB)] * 4)
    return await frame_flood(s, MAIN, "/v1/twilio", [sender.connected(), sender.start(["inbound", "outbound"])],
                             frames, until)


async def static_traversal(s: ServerThread, until: float) -> int:
    port = s.app.port
    n = 0
    for path in ("/static/../server/config.py", "/static/%2e%2e/%2e%2e/pyproject.toml", "/static/..%2fpyproject.toml",
                 "/static/" + "a" * 4000, "/static//etc/passwd"):
        got, _, body = await request(port, "GET", path, [("Host", f"127.0.0.1:{port}")])
        assert got in (400, 404) and b"dataclass" not in body and b"[project]" not in body and b"root:" not in body, \
            (path, got, body[:200])
        n += 1
    return n


async def funasr_attacks(s: ServerThread, until: float) -> int:
    """A WAV declaring 1 Hz (15 KB that would decode to 7500 s), then a flood of 4 MiB frames of
    silence on an online stream that is never read."""
    first = {"mode": "offline", "wav_name": "onehz", "wav_format": "wav", "is_speaking": True}
    run = await run_funasr(f"ws://127.0.0.1:{s.app.funasr_port}/", wav_declaring(1, 15_000), first, one_frame=True,
                           speed=None, headers=AUTH, timeout=20)
    assert [e["error"] for e in run.errors()] == ["bad_audio"], run.messages
    silence = pcm16(np.zeros(2 * MiB, np.float32))
    online = json.dumps({"mode": "online", "wav_name": "flood", "is_speaking": True, "chunk_size": [5, 10, 5]})
    return 1 + await frame_flood(s, FUNASR, "/", [online], [silence] * 6, until)


async def api_post(s: ServerThread, fields: dict[str, str], file: bytes) -> tuple[int, str | None]:
    form = aiohttp.FormData()
    for k, v in fields.items():
        form.add_field(k, v)
    form.add_field("file", file, filename="a.wav")
    conn = aiohttp.TCPConnector(local_addr=(ATTACKER, 0))
    async with aiohttp.ClientSession(connector=conn) as session:
        async with session.post(f"http://127.0.0.1:{s.app.api_port}/v1/audio/transcriptions", data=form,
                                headers=AUTH) as r:
            return r.status, error_code(await r.read())


async def trickle(s: ServerThread, until: float) -> None:
    """An upload that sends 100 bytes every 0.25 s, then vanishes."""
    port = s.app.api_port
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(ATTACKER, 0))
    length = len(FORM_HEAD) + 1_000_000 + len(FORM_TAIL)
    writer.write(f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                 f"Authorization: Bearer {TOKEN_VALUE}\r\n"
                 f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {length}\r\n\r\n".encode()
                 + FORM_HEAD)
    try:
        while time.monotonic() < until and not reader.at_eof():
            writer.write(b"\0" * 100)
            await writer.drain()
            await asyncio.sleep(0.25)
    finally:
        writer.transport.abort()


async def api_attacks(s: ServerThread, until: float) -> int:
    tricklers = [asyncio.create_task(trickle(s, until)) for _ in range(4)]
    silence = wav_declaring(16000, 3200)
    n = 0
    while time.monotonic() < until and n < 12:
        assert await api_post(s, {"model": "whisper-1"}, wav_declaring(1, 15_000)) == (400, "invalid_file")
        assert await api_post(s, {"model": "whisper-1", **{f"x{i}": "1" for i in range(40)}}, silence) == \
            (400, "too_many_fields")
        assert await api_post(s, {"model": "whisper-1", **{f"x{i}": "y" * 60_000 for i in range(8)}}, silence) == \
            (413, "fields_too_large")
        n += 3
    await asyncio.gather(*tricklers)
    return n + len(tricklers)


async def long_model_name(s: ServerThread, until: float) -> int:
    port = s.app.api_port
    got, _, _ = await request(port, "GET", "/v1/models/" + "m" * 4000, [("Host", f"127.0.0.1:{port}"),
                                                                        ("Authorization", f"Bearer {TOKEN_VALUE}")])
    assert 400 <= got < 500, got
    return 1


async def audiosocket_duplicates(s: ServerThread, until: float) -> int:
    """A live call (allowed peer), and three more connections with its UUID and a DTMF digit in
    the same write: each gets the hangup frame and is closed; the call goes on, without their
    digits. (The intruders send nothing after that write: a peer still writing when the server
    closes gets a reset, which may discard the hangup frame before the client reads it.)"""
    u = uuid.uuid4()
    live = asyncio.create_task(audiosocket_call(s.app.audiosocket_port, u, np.zeros(int(8000 * ATTACK_S), np.float32),
                                                speed=1.0, read_timeout=20))
    await asyncio.to_thread(s.recorder.wait_for, str(u), "call_started", 10)  # the live call is in first
    before = await asyncio.to_thread(metric, s, "chorus_sessions_rejected_total", reason="duplicate_call")
    for _ in range(3):
        run = await audiosocket_call(s.app.audiosocket_port, u, None, raw_after=frame(0x03, b"9"), hangup=False,
                                     read_timeout=10)
        assert run.closed_by_server and run.received == frame(0x00), run
    assert await asyncio.to_thread(metric, s, "chorus_sessions_rejected_total", reason="duplicate_call") - before == 3
    first = await live
    assert first.closed_by_server and first.received == b"", first
    events = await asyncio.to_thread(s.recorder.wait_for, str(u), "call_ended", 20)
    kinds = [e["type"] for e in events]
    assert kinds.count("call_started") == 1 and "dtmf" not in kinds and events[-1]["reason"] == "hangup", events
    return 4


# door name -> what a client with the token does to it beyond knocking (doors without an entry
# serve nothing a token holder could abuse beyond the strangers' knocks: the page, probes, metrics).
WORST = {
    "stream": (metadata_flood, stream_flood, nan_metadata),
    "calls": (calls_subscriber,),
    "realtime": (realtime_flood,),
    "twilio": (twilio_flood,),
    "page files": (static_traversal,),
    "funasr": (funasr_attacks,),
    "transcriptions": (api_attacks,),
    "model": (long_model_name,),
    "audiosocket": (audiosocket_duplicates,),
}


# ---------------------------------------------------------------------- the run
def honest_wer(srv: ServerThread, log) -> float:
    return clip_wer(JFK, " ".join(m["text"] for m in log.of("final")))


def test_every_door_attacked_beside_an_honest_session(srv):
    assert set(WORST) <= {d.name for d in DOORS}, "WORST names a door that no longer exists"
    jfk = read_clip(JFK)
    honest_url = f"{srv.url}?token={TOKEN_VALUE}"
    # Warm up every path the run uses (model batches, decoders, the allocator), so the RSS
    # measured is the attack's, not the first use of each path.
    warm = asyncio.run(stream_audio(honest_url, jfk, speed=1000.0))  # as fast as TCP takes it
    assert honest_wer(srv, warm) <= 0.1, warm.of("final")
    t_api = time.monotonic()
    assert client(srv, key=TOKEN_VALUE).audio.transcriptions.create(model="whisper-1", file=("s.wav", SHORT.read_bytes())).text
    print(f"\n  API request in the warm-up: {time.monotonic() - t_api:.1f} s")

    async def main() -> tuple[object, dict[str, int], float]:
        honest = asyncio.create_task(stream_audio(honest_url, jfk, speed=2.0, timeout=90))
        await async_wait_until(lambda: srv.app.sessions >= 1, 10, what="the honest session is in before the attackers")
        t0 = time.monotonic()
        until = t0 + ATTACK_S
        names, coros = [], []
        for door in DOORS:
            names.append(f"{door.name}: strangers")
            coros.append(strangers(srv, door, until))
            for attack in WORST.get(door.name, ()):
                names.append(f"{door.name}: {attack.__name__}")
                coros.append(attack(srv, until))
        tasks = [asyncio.create_task(c) for c in coros]
        try:
            async with asyncio.timeout(ATTACK_S + 30):
                done = await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
        took = time.monotonic() - t0
        result = await asyncio.wait_for(honest, 90)
        print(f"\nhonest session done {time.monotonic() - t0:.1f} s after the attack began")
        return result, dict(zip(names, done)), took

    t_start = time.monotonic()
    with PeakRss() as rss:
        log, counts, took = asyncio.run(main())
    print(f"\nabuse run: {len(counts)} attackers on {len(DOORS)} doors for {took:.1f} s "
          f"({sum(counts.values())} attempts); RSS +{rss.grew_mb:.1f} MiB at peak (bound {RSS_BOUND / MiB:.0f})")
    for name, n in counts.items():
        print(f"  {name}: {n}")

    assert all(n > 0 for n in counts.values()), counts  # every attacker got to try
    assert honest_wer(srv, log) <= 0.1, log.of("final")
    assert log.messages[-1]["type"] == "done", log.messages[-3:]
    assert rss.peak - rss.base < RSS_BOUND, f"RSS grew {rss.grew_mb:.1f} MiB"

    # Afterwards: every call has ended, both HTTP listeners answer, the API still transcribes.
    wait_until(lambda: metric(srv, "chorus_calls_active") == 0, 20, 0.1, "every call has ended")
    print(f"  calls ended {time.monotonic() - t_start:.1f} s after warm-up")
    for port in (srv.app.port, srv.app.api_port):
        got, _, body = asyncio.run(request(port, "GET", "/healthz", [("Host", f"127.0.0.1:{port}")]))
        assert got == 200, body
    t_api = time.monotonic()
    r = client(srv, key=TOKEN_VALUE).audio.transcriptions.create(model="whisper-1", file=("s.wav", SHORT.read_bytes()))
    print(f"  API request after the run: {time.monotonic() - t_api:.1f} s; audio fed "
          f"{metric(srv, 'chorus_audio_seconds_total'):.0f} s")
    assert clip_wer(SHORT, r.text) <= 0.1, r.text
    print(f"  whole run {time.monotonic() - t_start:.1f} s after warm-up")
