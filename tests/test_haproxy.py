"""Debian's HAProxy, running deploy/haproxy/haproxy.cfg as shipped, in front of two real
`chorus serve` processes on loopback (docs/deploy.md).

One pair of replicas and one balancer serve the whole module (each replica loads the model
once); the tests run in order and leave the pair as they found it. Replica ``a`` has a small
``server.max_sessions`` so that "full" can be reached; capacity-aware admission is off on both
(as in tests/serverharness.py): on this shared 2-core machine it would refuse by load, which is
not what these tests are about. Audio is streamed faster than real time.

Skipped, saying why, where haproxy is not installed (scripts/setup.sh installs Debian's).
"""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.request
import uuid

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from client_demo.pacing import send_paced
from server.wer import normalize_text
from tests.audiofiles import encode
from tests.audiosocketclient import audiosocket_call
from tests.fleet import HAProxy, Replica, haproxy_binary, http_get
from tests.funasrclient import run_funasr
from tests.scrape import metric
from tests.serverharness import ADMISSION_OFF, DATA, StreamLog, pcm16, read_clip
from tests.waiting import async_wait_until, wait_until

HAPROXY = haproxy_binary()
pytestmark = [pytest.mark.skipif(
    HAPROXY is None,
    reason="SKIPPED: haproxy is not installed, so the load-balancing tests cannot run "
           "(scripts/setup.sh installs Debian's haproxy when run as root; or: apt-get install haproxy)",
)]

JFK = read_clip(DATA / "jfk.wav")
A_MAX_SESSIONS = 3
SIX_S = 6 * 16000  # "And so my fellow Americans, ask not ..."
COMMON = (*(f"{k}={v}" for k, v in ADMISSION_OFF.items()), "server.shutdown_timeout_s=60", "runner.num_threads=1")


class Fleet:
    def __init__(self) -> None:
        self.a = Replica("a", f"server.max_sessions={A_MAX_SESSIONS}", *COMMON)
        self.b = Replica("b", "server.max_sessions=32", *COMMON)
        self.lb = HAProxy(self.a, self.b)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.lb.port}/v1/stream?language=en"

    def counts(self) -> tuple[int, int]:
        return _sessions(self.a), _sessions(self.b)


def _sessions(r: Replica) -> int:
    """Open sessions on a replica; 0 for one that is gone (killed, or exited after its drain)."""
    try:
        return r.sessions()
    except OSError:
        try:
            r.wait(2)  # a killed process may not be reaped yet
        except Exception:
            raise AssertionError(f"replica {r.name} is running but does not answer /healthz") from None
        return 0


@pytest.fixture(scope="module")
def fleet():
    f = Fleet()
    try:
        f.a.start()
        f.b.start()
        f.a.wait_ready()
        f.b.wait_ready()
        f.lb.start(HAPROXY)
        for backend in ("chorus_ws", "chorus_funasr", "chorus_api", "chorus_audiosocket"):
            f.lb.wait_up(backend, {"a", "b"})
        yield f
    finally:
        f.lb.close()
        f.a.close()
        f.b.close()


class Client:
    """One stream through the balancer, its messages collected in the background."""

    def __init__(self, ws: ClientConnection, replica: str) -> None:
        self.ws = ws
        self.replica = replica
        self.log = StreamLog()
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                self.log.messages.append(json.loads(raw))
        except ConnectionClosed:
            pass
        self.log.close_code = self.ws.close_code

    async def speak(self, audio: np.ndarray, *, stop: bool, tail_s: float = 1.0, speed: float = 8.0) -> None:
        x = np.concatenate([np.zeros(4800, np.float32), audio, np.zeros(int(tail_s * 16000), np.float32)])
        await send_paced(self.ws, x, 16000, 100, speed, encode=pcm16)
        if stop:
            await self.ws.send(json.dumps({"type": "stop"}))

    async def finish(self, timeout: float = 240) -> StreamLog:
        await asyncio.wait_for(self.reader, timeout)
        return self.log

    def text(self) -> str:
        return " ".join(f["text"] for f in self.log.of("final"))


async def open_client(fleet: Fleet) -> Client:
    """Connect through the balancer and find which replica took the session: the one whose
    count of open sessions went up (clients are opened one at a time)."""
    before = await asyncio.to_thread(fleet.counts)
    ws = await connect(fleet.url, max_size=None, open_timeout=30)

    async def grew() -> list[str]:
        after = await asyncio.to_thread(fleet.counts)
        grown = [name for name, x, y in zip("ab", before, after) if y > x]
        return grown if len(grown) == 1 else []

    return Client(ws, (await async_wait_until(grew, 5, 0.05, f"one replica's count grew from {before}"))[0])


async def close_all(clients: list[Client]) -> None:
    for c in clients:
        await c.ws.close()
    await asyncio.gather(*(c.finish() for c in clients))


def wait_idle(fleet: Fleet) -> None:
    """Between tests: every session closed and both replicas back in rotation."""
    wait_until(lambda: fleet.counts() == (0, 0), 60, 0.1, "every session closed on both replicas")
    fleet.lb.wait_up("chorus_ws", {"a", "b"})


def wait_draining(r: Replica, timeout: float = 5) -> None:
    wait_until(lambda: r.health().get("draining"), timeout, 0.01, "the replica starts draining after SIGTERM")


def heard_the_start(text: str) -> bool:
    """The first six seconds of the JFK clip were recognised (routing is the claim here, not
    accuracy: each dialect's WER is held by its own tests, tests/test_funasr.py, test_api.py)."""
    return normalize_text(text).startswith("and so my fellow americans")


def lost_finals(out: StreamLog) -> list[int]:
    started = {m["segment_id"] for m in out.of("speech_started")}
    return sorted(started - {m["segment_id"] for m in out.of("final")})


def test_sessions_spread_over_both_replicas_and_are_transcribed(fleet):
    async def main() -> list[Client]:
        clients = [await open_client(fleet) for _ in range(2)]
        await asyncio.gather(*(c.speak(JFK[:SIX_S], stop=True) for c in clients))
        await asyncio.gather(*(c.finish() for c in clients))
        return clients

    clients = asyncio.run(main())
    assert sorted(c.replica for c in clients) == ["a", "b"]  # least connections: one each
    for c in clients:
        assert c.log.of("done") and c.log.close_code == 1000, c.log.messages[-3:]
        assert heard_the_start(c.text()), c.text()
    wait_idle(fleet)


def test_a_full_replica_gets_no_newcomers_and_keeps_its_sessions(fleet):
    """Replica a admits A_MAX_SESSIONS: once it holds that many, every new session goes to b
    with no error seen by the client (a 503 from a is retried on b until the health check
    takes a out of rotation), and a's own sessions go on."""

    async def main() -> tuple[list[Client], list[Client]]:
        first = [await open_client(fleet) for _ in range(2 * A_MAX_SESSIONS)]
        # Opened straight away: a newcomer sent to a before the health check has seen it full is
        # refused (503) and must be retried on b by HAProxy, not reported to the client.
        newcomers = [await open_client(fleet) for _ in range(3)]
        await asyncio.to_thread(fleet.lb.wait_up, "chorus_ws", {"b"})  # a is out of rotation, not cut
        # a's sessions are still served (they end normally, as their clients ask); a newcomer on b
        # is transcribed.
        on_a = [c for c in first if c.replica == "a"]
        await asyncio.gather(newcomers[0].speak(JFK[:SIX_S], stop=True), *(c.ws.send(json.dumps({"type": "stop"})) for c in on_a))
        await asyncio.gather(*(c.finish() for c in on_a + newcomers[:1]))
        await close_all([c for c in first + newcomers if c not in on_a + newcomers[:1]])
        return first, newcomers

    first, newcomers = asyncio.run(main())
    assert sorted(c.replica for c in first) == ["a"] * A_MAX_SESSIONS + ["b"] * A_MAX_SESSIONS
    assert [c.replica for c in newcomers] == ["b", "b", "b"]
    for c in [c for c in first if c.replica == "a"] + newcomers[:1]:
        assert c.log.of("done") and c.log.close_code == 1000, c.log.messages[-3:]
    assert heard_the_start(newcomers[0].text()), newcomers[0].text()
    # Once a has room again it is back in rotation.
    wait_idle(fleet)


def test_funasr_api_and_audiosocket_ports_go_through_the_balancer(fleet):
    status, body = http_get(fleet.lb.port, "/healthz")
    assert status == 200 and body["ready"] is True

    # FunASR dialect on the balancer's FunASR port.
    run = asyncio.run(run_funasr(f"ws://127.0.0.1:{fleet.lb.funasr_port}/", pcm16(JFK[:SIX_S]),
                                 {"mode": "offline", "wav_name": "jfk", "is_speaking": True}, speed=None, timeout=240))
    assert not run.errors(), run.messages
    assert heard_the_start(run.text()), run.text()

    # The HTTP API (OpenAI's transcriptions route) on the balancer's API port.
    name, data = encode(JFK[:SIX_S], "wav")
    boundary = "chorusfleet"
    body_bytes = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
                  f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
                  "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(f"http://127.0.0.1:{fleet.lb.api_port}/v1/audio/transcriptions", data=body_bytes,
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    with urllib.request.urlopen(req, timeout=240) as r:
        assert r.status == 200
        text = json.loads(r.read())["text"]
    assert heard_the_start(text), text

    # Asterisk AudioSocket, plain TCP: the call reaches a replica (its call_started event).
    def started() -> float:
        return sum(metric(r.port, "chorus_call_events_total", type="call_started") for r in (fleet.a, fleet.b))

    before = started()
    call = asyncio.run(audiosocket_call(fleet.lb.audiosocket_port, uuid.uuid4(), JFK[:SIX_S:2].copy(), 8000, speed=8.0,
                                        read_timeout=30))
    assert call.closed_by_server
    assert started() == before + 1
    wait_idle(fleet)


def test_sigterm_drains_a_replica_without_losing_a_word_while_newcomers_go_to_the_other(fleet):
    """SIGTERM to replica a while two sessions on it are mid-sentence: both get every final (the
    open segment's too) and `done`; sessions opened through the balancer right after the signal
    (a still draining) land on b with no error; a exits 0."""

    async def main():
        # Two on each: a is not full, so only the drain can take it out of rotation.
        clients = [await open_client(fleet) for _ in range(4)]
        on_a = [c for c in clients if c.replica == "a"]
        others = [c for c in clients if c.replica != "a"]
        # No trailing silence and no stop: the last segment is still open at the signal.
        await asyncio.gather(*(c.speak(JFK[:SIX_S], stop=False, tail_s=0.0) for c in on_a))
        fleet.a.signal(signal.SIGTERM)
        # The signal is handled asynchronously: newcomers go once a has begun draining (well
        # within HAProxy's 1 s check interval, so the balancer does not know yet).
        await asyncio.to_thread(wait_draining, fleet.a)
        newcomers = [await open_client(fleet) for _ in range(2)]
        a_was_draining = fleet.a.alive()
        await asyncio.gather(*(c.speak(JFK[:SIX_S], stop=True) for c in newcomers[:1]))
        await asyncio.gather(*(c.finish() for c in on_a + newcomers[:1]))
        await close_all(others + newcomers[1:])
        return on_a, newcomers, a_was_draining

    on_a, newcomers, a_was_draining = asyncio.run(main())
    try:
        rc = fleet.a.wait(70)
        assert rc == 0, fleet.a.tail()
        assert a_was_draining, "replica a had already exited when the newcomers connected: the drain was not exercised"
        assert [c.replica for c in newcomers] == ["b", "b"]
        assert len(on_a) == 2
        for c in on_a:
            types = [m["type"] for m in c.log.messages]
            assert types[-1] == "done" and c.log.close_code == 1001, (types, c.log.close_code)
            assert lost_finals(c.log) == [], types
            assert heard_the_start(c.text()), c.text()
        assert newcomers[0].log.of("done") and heard_the_start(newcomers[0].text()), newcomers[0].log.messages
    finally:
        # The next test needs two replicas again: a restarts on the same ports.
        fleet.a.start().wait_ready()
    wait_idle(fleet)


def test_kill_9_closes_its_clients_and_a_reconnect_lands_on_the_survivor(fleet):
    async def main():
        clients = [await open_client(fleet) for _ in range(2)]
        victim = next(c for c in clients if c.replica == "b")
        survivor_client = next(c for c in clients if c.replica == "a")
        await victim.speak(JFK[: 3 * 16000], stop=False, tail_s=0.0)
        fleet.b.signal(signal.SIGKILL)
        try:
            await asyncio.wait_for(victim.reader, 10)  # a close, not a hang
        except asyncio.TimeoutError:
            pytest.fail("the client of the killed replica saw no close within 10 s")
        again = await open_client(fleet)  # straight away: before the health check has noticed
        await again.speak(JFK[:SIX_S], stop=True)
        await again.finish()
        await close_all([survivor_client])
        return victim, again

    victim, again = asyncio.run(main())
    fleet.b.wait(10)
    assert victim.log.close_code not in (1000, 1001), victim.log.close_code  # abnormal: the replica died
    assert again.replica == "a"
    assert again.log.of("done") and heard_the_start(again.text()), again.text()
    fleet.lb.wait_up("chorus_ws", {"a"})
