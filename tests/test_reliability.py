"""Reliability over real sockets: shutdown, backpressure vs keepalive, broken and hung models,
admission, limits, and what error messages may say.

Every test runs a real server (the production ChorusServer on a loopback port; one test
runs `chorus serve` as a process to send it SIGTERM) with the real Whisper model, and
counts what each client received: a segment whose `speech_started` has no `final` is a
lost final, and the count of lost finals must be 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from client_demo.pacing import send_paced
from server.app import ChorusServer
from tests.faultrunner import FaultyRunner
from tests.ports import free_port
from tests.serverharness import DATA, ServerThread, StreamLog, handshake, make_config, pcm16, read_clip
from tests.waiting import async_wait_until, wait_until

log = logging.getLogger(__name__)
ROOT = Path(__file__).parent.parent
JFK = read_clip(DATA / "jfk.wav")


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * 16000), np.float32)


def lost_finals(out: StreamLog) -> list[int]:
    """Segments that started (speech_started) but never got a final."""
    started = {m["segment_id"] for m in out.of("speech_started")}
    finished = {m["segment_id"] for m in out.of("final")}
    return sorted(started - finished)


def http_get(port: int, path: str) -> tuple[int, dict, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, dict(r.headers), json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read() or b"{}")


async def collect(ws, out: StreamLog, on_message=None) -> None:
    try:
        async for raw in ws:
            m = json.loads(raw)
            out.messages.append(m)
            if on_message is not None:
                on_message(m)
    except ConnectionClosed:
        pass
    out.close_code = ws.close_code


async def session_until_closed(url: str, send, timeout: float) -> StreamLog:
    """One session: every message collected in the background while `send(ws)` runs (the
    server may close the connection first), then every message until the server closes."""
    out = StreamLog()
    async with connect(url, max_size=None) as ws:
        reader = asyncio.create_task(collect(ws, out))
        try:
            await send(ws)
        except ConnectionClosed:
            pass
        await asyncio.wait_for(reader, timeout)
    return out


async def speak_and_stop(url: str, audio: np.ndarray, speed: float, timeout: float = 90) -> StreamLog:
    """One session: 0.3 s of silence, the audio, 1 s of silence at `speed` x real time, then
    `stop`; every message until the server closes."""
    out = StreamLog()
    async with connect(url + "?language=en", max_size=None) as ws:
        reader = asyncio.create_task(collect(ws, out))
        await send_paced(ws, np.concatenate([silence(0.3), audio, silence(1.0)]), 16000, 100, speed, encode=pcm16)
        await ws.send(json.dumps({"type": "stop"}))
        await asyncio.wait_for(reader, timeout)
    return out


# ---------------------------------------------------------------------- shutdown


def test_sigterm_finalises_the_open_segment_and_delivers_every_final(tmp_path):
    """`chorus serve` gets SIGTERM while a client is mid-sentence: the client still gets a final
    for every segment (the open one included), then `done`, then close 1001, and the process
    exits 0 within the shutdown timeout. (It once closed 1001 at once: no final, no done.)"""
    port = free_port()
    chorus = Path(sys.executable).parent / "chorus"
    errlog = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen(
        [str(chorus), "serve", "--config", str(ROOT / "configs" / "default.yaml"), "--port", str(port),
         "--funasr-port", "0", "--set", "server.shutdown_timeout_s=20"],
        stdout=subprocess.DEVNULL, stderr=errlog,
    )
    try:
        def ready() -> bool:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                return http_get(port, "/healthz")[0] == 200
            except OSError:
                return False

        wait_until(ready, 180, 0.3, "chorus serve answers /healthz 200")

        async def main() -> tuple[StreamLog, float]:
            out = StreamLog()
            signalled: list[float] = []

            def watch(m: dict) -> None:
                # Mid-sentence: the second segment has started and is still open (0.4 s of
                # audio later, at the 2x pace below).
                if m["type"] == "speech_started" and m["segment_id"] >= 1 and not signalled:
                    async def later() -> None:
                        await asyncio.sleep(0.2)
                        proc.send_signal(signal.SIGTERM)
                        signalled.append(time.monotonic())
                    asyncio.get_running_loop().create_task(later())

            async with connect(f"ws://127.0.0.1:{port}/v1/stream?language=en", max_size=None) as ws:
                reader = asyncio.create_task(collect(ws, out, watch))
                try:
                    # Audio keeps coming (2x real time), and no stop: the server must end this
                    # session by itself.
                    await send_paced(ws, np.concatenate([silence(0.5), JFK, silence(3.0)]), 16000, 100, 2.0, encode=pcm16)
                except ConnectionClosed:
                    pass
                await asyncio.wait_for(reader, 60)
            assert signalled, "never saw a second segment start"
            return out, signalled[0]

        out, t_sig = asyncio.run(main())
        rc = proc.wait(30)
        exited_after = time.monotonic() - t_sig
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    server_log = (tmp_path / "server.log").read_text()
    types = [m["type"] for m in out.messages]
    assert out.close_code == 1001, (out.close_code, types)
    assert types[-1] == "done", types
    assert len(out.of("speech_started")) >= 2
    assert lost_finals(out) == [], (types, server_log[-2000:])
    assert all(f["text"] and "error" not in f for f in out.of("final")), out.of("final")
    assert rc == 0, server_log[-2000:]
    assert exited_after < 20, exited_after


def test_drain_under_load_refuses_newcomers_and_loses_nothing(whisper_runner):
    """Graceful stop while three sessions are mid-stream on a slow model: new handshakes get
    503 (reason draining) and /healthz 503, every session gets all its finals, `done`, close
    1001; the event loop keeps answering while the worker finishes (its join is not on the loop:
    /healthz is answered before the worker's last model call has returned)."""
    runner = FaultyRunner(whisper_runner)
    cfg = make_config(**{"batcher.partial_interval_ms": 0, "server.shutdown_timeout_s": 60})
    with ServerThread(cfg, runner) as srv:
        runner.delay_s = 0.8
        clips = [JFK, read_clip(DATA / "sense_and_sensibility_01_austen_64kb-0870.wav"),
                 read_clip(DATA / "sense_and_sensibility_01_austen_64kb-0890.wav")]

        async def client(audio: np.ndarray, speaking: asyncio.Event, out: StreamLog) -> StreamLog:
            async with connect(srv.url + "?language=en", max_size=None) as ws:
                reader = asyncio.create_task(collect(ws, out, lambda m: m["type"] == "final" and speaking.set()))
                try:
                    await send_paced(ws, np.concatenate([silence(0.3), audio, silence(5.0)]), 16000, 100, 2.0, encode=pcm16)
                except ConnectionClosed:
                    pass
                await asyncio.wait_for(reader, 90)
            return out

        async def main():
            events = [asyncio.Event() for _ in clips]
            outs = [StreamLog() for _ in clips]
            tasks = [asyncio.create_task(client(a, e, o)) for a, e, o in zip(clips, events, outs)]
            # Every session has had a final and is still streaming (its speech or its 5 s tail).
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
            stopping = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(srv.app.stop(), srv.loop))
            at_stop[:] = [len(o.messages) for o in outs]
            await async_wait_until(lambda: srv.app.draining, 10, what="the server is draining")
            health = await asyncio.to_thread(http_get, srv.app.port, "/healthz")
            health_at = time.monotonic()
            refused = await handshake(srv.url)
            logs = await asyncio.gather(*tasks)
            await stopping
            return logs, health, health_at, refused

        at_stop: list[int] = []
        logs, health, health_at, refused = asyncio.run(main())
    # The drain had work to do: finals were still to come when the stop began.
    assert any(m["type"] == "final" for out, n in zip(logs, at_stop) for m in out.messages[n:]), at_stop
    assert refused.status == 503 and refused.body["reason"] == "draining", refused
    assert health[0] == 503 and health[2]["draining"] is True, health
    assert health_at < runner.last_return, "/healthz was answered only once the worker had finished"
    for out in logs:
        types = [m["type"] for m in out.messages]
        assert out.close_code == 1001, (out.close_code, types)
        assert types[-1] == "done", types
        assert out.of("final") and lost_finals(out) == [], types
        assert all(f["text"] and "error" not in f for f in out.of("final")), out.of("final")


@pytest.mark.timing
def test_stop_with_a_hung_worker_keeps_the_loop_free_and_ends_in_time(whisper_runner):
    """The worker is stuck in a model call at shutdown: stop() ends within its timeout and the
    event loop is never blocked meanwhile (joining the worker thread once ran on the loop).
    The stop is the thing tested, so the server is stopped here, not by ServerThread's exit."""
    runner = FaultyRunner(whisper_runner)
    srv = ServerThread(make_config(**{"batcher.watchdog_s": 0}), runner).__enter__()
    stopped = False
    try:
        async def main():
            runner.hang()
            async with connect(srv.url + "?language=en", max_size=None) as ws:
                await send_paced(ws, np.concatenate([silence(0.3), JFK[:48000], silence(1.0)]), 16000, 100, 8.0, encode=pcm16)
                await ws.send(json.dumps({"type": "finalize"}))
                await async_wait_until(lambda: runner.calls, 5, what="the model call has started (and hangs)")

        asyncio.run(main())

        async def stop_and_tick() -> tuple[float, float]:
            gaps: list[float] = []
            stopping = asyncio.create_task(srv.app.stop(timeout=3.0))
            t0 = last = time.monotonic()
            while not stopping.done():
                await asyncio.sleep(0.05)
                now = time.monotonic()
                gaps.append(now - last)
                last = now
            await stopping
            return time.monotonic() - t0, max(gaps)

        took, worst_gap = asyncio.run_coroutine_threadsafe(stop_and_tick(), srv.loop).result(30)
        stopped = True
    finally:
        runner.release()
        if not stopped:
            asyncio.run_coroutine_threadsafe(srv.app.stop(timeout=3.0), srv.loop).result(30)
        srv.loop.call_soon_threadsafe(srv.loop.stop)
        srv._thread.join(10)
    assert took < 5.0, took
    assert worst_gap < 0.5, f"event loop blocked for {worst_gap:.2f} s during stop"


# ---------------------------------------------------------------------- backpressure vs keepalive


def test_keepalive_does_not_kill_a_client_the_server_is_holding_back(whisper_runner):
    """A client sends a long recording as fast as it can while the model is slow: the server
    stops reading it (backpressure), so its pongs sit unread behind its audio. The connection
    must survive (it once closed 1011 'keepalive ping timeout', losing the queued finals)."""
    runner = FaultyRunner(whisper_runner)
    cfg = make_config(**{"server.ping_interval_s": 0.3, "server.max_pending_finals": 1,
                         "batcher.partial_interval_ms": 0})
    speech = [read_clip(DATA / n) for n in ("sense_and_sensibility_01_austen_64kb-0880.wav",
                                            "sense_and_sensibility_01_austen_64kb-0930.wav")]
    audio = np.concatenate([x for s in speech * 3 for x in (silence(1.0), s)] + [silence(1.0)])
    with ServerThread(cfg, runner) as srv:
        runner.delay_s = 0.6

        async def flood(ws) -> None:
            data = pcm16(audio)
            for i in range(0, len(data), 640):  # 20 ms frames, no pacing at all
                await ws.send(data[i:i + 640])
            await ws.send(json.dumps({"type": "stop"}))

        out = asyncio.run(session_until_closed(srv.url + "?language=en", flood, 120))
    types = [m["type"] for m in out.messages]
    assert out.close_code == 1000, (out.close_code, types)
    assert types[-1] == "done", types
    assert len(out.of("final")) >= 5 and lost_finals(out) == [], types


# ---------------------------------------------------------------------- broken and hung models


def test_a_model_failing_every_call_turns_not_live_and_not_ready(whisper_runner, caplog):
    """A sticky device error fails every call: after `max_consecutive_failures`, /livez and
    /healthz say 503 with the reason and newcomers are refused. Clients get an error final
    with an incident id, never the exception's text (paths, internals)."""
    runner = FaultyRunner(whisper_runner)
    cfg = make_config(**{"batcher.max_consecutive_failures": 2, "batcher.partial_interval_ms": 0})
    with ServerThread(cfg, runner) as srv:
        assert http_get(srv.app.port, "/livez")[0] == 200
        runner.fail_with = RuntimeError("CUDA error: an illegal memory access at /srv/secret/model.bin")

        with caplog.at_level(logging.ERROR):
            out = asyncio.run(speak_and_stop(srv.url, JFK, 8.0, 60))
        live = http_get(srv.app.port, "/livez")
        ready = http_get(srv.app.port, "/healthz")
        refused = asyncio.run(handshake(srv.url))
    errors = out.of("error")
    assert len(out.of("final")) >= 2 and lost_finals(out) == []
    assert all(f["text"] == "" and f["error"] == "internal" for f in out.of("final"))
    assert errors and all("incident" in e["message"] and "/srv/secret" not in e["message"] for e in errors), errors
    incident = errors[0]["message"].split("incident ")[1].split(")")[0]
    assert incident in caplog.text and "/srv/secret" in caplog.text
    assert live[0] == 503 and "failed in a row" in live[2]["reason"], live
    assert ready[0] == 503 and ready[2]["live"] is False and ready[2]["accepting"] is False, ready
    assert refused.status == 503 and refused.body["reason"] == "broken", refused


def test_a_hung_model_fails_waiting_finals_instead_of_hanging_and_recovers(whisper_runner):
    """A model call that never returns: after `watchdog_s` the waiting final fails with
    `model_unavailable` (the client gets its error final and `done` instead of waiting
    forever), /livez says 503; once the call returns the server is live again. The call hangs
    until after the client got `done`, so that `done` can only have come from the watchdog."""
    runner = FaultyRunner(whisper_runner)
    cfg = make_config(**{"batcher.watchdog_s": 1.0, "batcher.partial_interval_ms": 0})
    with ServerThread(cfg, runner) as srv:
        runner.hang()

        async def main() -> tuple[StreamLog, float]:
            out = StreamLog()
            async with connect(srv.url + "?language=en", max_size=None) as ws:
                reader = asyncio.create_task(collect(ws, out))
                await send_paced(ws, np.concatenate([silence(0.3), JFK[:40000], silence(1.0)]), 16000, 100, 8.0, encode=pcm16)
                await ws.send(json.dumps({"type": "stop"}))
                await asyncio.wait_for(reader, 20)
            return out

        try:
            out = asyncio.run(main())
            live_hung = http_get(srv.app.port, "/livez")
        finally:
            runner.release()
        wait_until(lambda: http_get(srv.app.port, "/livez")[0] == 200, 30, 0.1, "live again once the call returned")
        live_after = http_get(srv.app.port, "/livez")
    assert [m["type"] for m in out.messages][-1] == "done"
    assert out.of("final") and lost_finals(out) == []
    assert all(f["error"] == "model_unavailable" for f in out.of("final")), out.of("final")
    assert live_hung[0] == 503 and "watchdog" in live_hung[2]["reason"], live_hung
    assert live_after[0] == 200, live_after


def test_out_of_memory_under_load_loses_no_final(whisper_runner):
    """Batches over one item run out of device memory: the batcher splits them and every
    session still gets every final, with text."""
    runner = FaultyRunner(whisper_runner)
    cfg = make_config(**{"batcher.partial_interval_ms": 0, "batcher.batch_wait_ms": 50})
    clips = [JFK, read_clip(DATA / "sense_and_sensibility_01_austen_64kb-0890.wav"),
             read_clip(DATA / "sense_and_sensibility_01_austen_64kb-0920.wav")]
    with ServerThread(cfg, runner) as srv:
        runner.oom_over = 1

        async def main():
            return await asyncio.gather(*(speak_and_stop(srv.url, a, 4.0) for a in clips))

        logs = asyncio.run(main())
        splits = srv.metric("chorus_batch_splits_total")
    assert max(runner.batch_sizes) > 1 and splits >= 1, (runner.batch_sizes, splits)
    for out in logs:
        assert out.of("final") and lost_finals(out) == []
        assert all(f["text"] and "error" not in f for f in out.of("final")), out.of("final")


def test_a_client_that_vanishes_mid_segment_costs_nobody_else(whisper_runner):
    """One client drops its TCP connection mid-sentence; another session's finals all arrive,
    and nothing of the vanished session stays queued or counted."""
    cfg = make_config(**{"batcher.partial_interval_ms": 300})
    with ServerThread(cfg, whisper_runner) as srv:
        async def vanisher() -> None:
            ws = await connect(srv.url + "?language=en", max_size=None)
            await send_paced(ws, np.concatenate([silence(0.3), JFK[:50000]]), 16000, 100, 4.0, encode=pcm16)
            ws.transport.abort()

        async def main():
            return (await asyncio.gather(vanisher(), speak_and_stop(srv.url, JFK, 2.0, 60)))[1]

        out = asyncio.run(main())
        wait_until(lambda: srv.app.sessions == 0, 5, what="the vanished session is freed")
        sessions, depth = srv.app.sessions, srv.metric("chorus_batcher_queue_depth")
    assert out.of("final") and lost_finals(out) == [] and out.close_code == 1000
    assert all(f["text"] for f in out.of("final"))
    assert sessions == 0 and depth == 0


# ---------------------------------------------------------------------- admission


def test_concurrent_handshakes_cannot_overshoot_max_sessions(whisper_runner):
    """Eight handshakes at once against max_sessions=3: exactly three get a session, the rest a
    clean 503 with Retry-After (the limit was once checked before the upgrade but counted after)."""
    with ServerThread(make_config(**{"server.max_sessions": 3}), whisper_runner) as srv:
        async def one():
            try:
                ws = await connect(srv.url)
            except InvalidStatus as e:
                return e.response.status_code, e.response.headers.get("Retry-After")
            return ws, None

        async def main():
            results = await asyncio.gather(*(one() for _ in range(8)))
            opened = [r[0] for r in results if not isinstance(r[0], int)]
            during = srv.app.sessions
            for ws in opened:
                await ws.close()
            return results, len(opened), during

        results, opened, during = asyncio.run(main())
        wait_until(lambda: srv.app.sessions == 0, 5, what="every closed session is freed")
        after = srv.app.sessions
    refused = [r for r in results if isinstance(r[0], int)]
    assert opened == 3 and during == 3, (opened, during)
    assert len(refused) == 5 and all(code == 503 and retry for code, retry in refused), refused
    assert after == 0


def test_per_address_limit(whisper_runner):
    with ServerThread(make_config(**{"server.max_sessions_per_address": 2}), whisper_runner) as srv:
        async def main():
            a = await connect(srv.url)
            b = await connect(srv.url)
            refused = await handshake(srv.url)
            await a.close()
            await async_wait_until(lambda: srv.app.sessions < 2, 5, what="the slot is free once that connection has closed")
            c = await connect(srv.url)
            await b.close()
            await c.close()
            return refused

        refused = asyncio.run(main())
    assert refused.status == 429 and refused.body["reason"] == "address_limit" and "Retry-After" in refused.headers, refused


def test_capacity_aware_admission_refuses_newcomers_while_finals_wait(whisper_runner):
    """The model falls behind (finals wait longer than admission_max_final_wait_s): newcomers get
    503 + Retry-After with reason `capacity`, /healthz says accepting: false (load balancers
    route elsewhere), the admitted session still gets every final; once the backlog clears
    new sessions are admitted again."""
    runner = FaultyRunner(whisper_runner)
    cfg = make_config(**{"server.admission_max_final_wait_s": 0.5, "batcher.partial_interval_ms": 0,
                         "batcher.max_batch_size": 1, "server.max_pending_finals": 8})
    speech = [read_clip(DATA / n) for n in ("sense_and_sensibility_01_austen_64kb-0880.wav",
                                            "sense_and_sensibility_01_austen_64kb-0930.wav")]
    audio = np.concatenate([x for s in speech * 2 for x in (silence(0.8), s)] + [silence(1.0)])
    with ServerThread(cfg, runner) as srv:
        runner.delay_s = 1.0

        async def main():
            out = StreamLog()
            seen: dict = {}
            async with connect(srv.url + "?language=en", max_size=None) as ws:
                reader = asyncio.create_task(collect(ws, out))
                await send_paced(ws, audio, 16000, 100, 10.0, encode=pcm16)
                await ws.send(json.dumps({"type": "finalize"}))
                async def refusing() -> tuple | None:  # the backlog builds up
                    health = await asyncio.to_thread(http_get, srv.app.port, "/healthz")
                    return health if health[0] == 503 else None

                seen["health"] = await async_wait_until(refusing, 30, 0.1, "finals wait long enough to refuse newcomers")
                seen["refused"] = await handshake(srv.url)
                await ws.send(json.dumps({"type": "stop"}))
                await asyncio.wait_for(reader, 90)
            runner.delay_s = 0.0

            async def accepting() -> bool:  # the 5 s window of recent waits passes
                return (await asyncio.to_thread(http_get, srv.app.port, "/healthz"))[0] == 200

            await async_wait_until(accepting, 20, 0.2, "accepting again once the backlog cleared")
            async with connect(srv.url) as ws:
                seen["admitted_after"] = True
            return out, seen

        out, seen = asyncio.run(main())
    status, _, body = seen["health"]
    assert status == 503 and body["accepting"] is False and body["live"] is True, body
    refused = seen["refused"]
    assert refused.status == 503 and refused.body["reason"] == "capacity" and int(refused.headers["Retry-After"]) >= 1, refused
    assert len(out.of("final")) >= 3 and lost_finals(out) == []
    assert all(f["text"] for f in out.of("final"))
    assert seen.get("admitted_after")


# ---------------------------------------------------------------------- limits and reflection


def test_client_cannot_raise_max_segment_ms_above_the_operators(whisper_runner):
    cfg = make_config(**{"vad.max_segment_ms": 8000})
    with ServerThread(cfg, whisper_runner) as srv:
        async def main(value: int) -> dict:
            async with connect(srv.url + f"?max_segment_ms={value}") as ws:
                return json.loads(await asyncio.wait_for(ws.recv(), 10))

        over = asyncio.run(main(20000))
        under = asyncio.run(main(5000))
    assert over["type"] == "error" and over["code"] == "bad_config" and "8000" in over["message"], over
    assert under["type"] == "ready" and under["config"]["max_segment_ms"] == 5000, under


def test_keepalive_does_not_extend_a_session_past_max_session_s(whisper_runner):
    """A client that only sends keepalives, one every 0.1 s for 10 s, is closed at max_session_s
    (1008, session_limit) long before it is done sending them."""
    cfg = make_config(**{"server.max_session_s": 1.5})
    sent = 0
    with ServerThread(cfg, whisper_runner) as srv:
        async def keepalives(ws) -> None:
            nonlocal sent
            for _ in range(100):
                await ws.send(json.dumps({"type": "keepalive"}))
                sent += 1
                await asyncio.sleep(0.1)

        out = asyncio.run(session_until_closed(srv.url, keepalives, 10))
    assert out.close_code == 1008 and sent < 100, (out.close_code, sent)
    assert [e["code"] for e in out.of("error")] == ["session_limit"]


def test_session_limit_delivers_the_finals_first(whisper_runner):
    cfg = make_config(**{"server.max_session_s": 4.0, "batcher.partial_interval_ms": 0})
    with ServerThread(cfg, whisper_runner) as srv:
        async def speak(ws) -> None:
            await send_paced(ws, np.concatenate([silence(0.3), JFK, silence(1.0)]), 16000, 100, 1.0, encode=pcm16)

        out = asyncio.run(session_until_closed(srv.url + "?language=en", speak, 30))
    types = [m["type"] for m in out.messages]
    assert out.close_code == 1008 and types[-1] == "error" and out.messages[-1]["code"] == "session_limit", types
    assert out.of("speech_started") and lost_finals(out) == [], types
    assert all(f["text"] for f in out.of("final"))


def test_large_text_messages_are_refused_without_echo(whisper_runner):
    """A 3 MB text message gets a short `message_too_large` error (it once got a 3 MB error
    echoing it back); one under the cap with a huge unknown type gets a bounded echo."""
    with ServerThread(make_config(), whisper_runner) as srv:
        async def main() -> list[str]:
            async with connect(srv.url, max_size=None) as ws:
                await ws.send(json.dumps({"type": "x" * 3_000_000}))
                big = await asyncio.wait_for(ws.recv(), 10)
                await ws.send(json.dumps({"type": "y" * 60_000}))
                mid = await asyncio.wait_for(ws.recv(), 10)
                await ws.send(json.dumps({"type": "start", "encoding": "z" * 60_000}))
                enc = await asyncio.wait_for(ws.recv(), 10)
                return [big, mid, enc]

        replies = asyncio.run(main())
    assert json.loads(replies[0])["code"] == "message_too_large"
    assert json.loads(replies[1])["code"] == "unknown_type"
    assert json.loads(replies[2])["code"] == "bad_config"
    assert all(len(r) < 600 for r in replies), [len(r) for r in replies]


def test_load_errors_reach_clients_without_their_text(whisper_runner, caplog):
    """A model that fails to load: /healthz and /livez say 503 with an incident id (the
    exception text, with its path, is only in the log); streams get a generic 503."""
    runner = FaultyRunner(whisper_runner, load_error=RuntimeError("cannot open /srv/secret/weights.bin"))
    app = ChorusServer(make_config(), runner=runner)

    async def main():
        await app.start(wait_ready=False)
        try:
            with pytest.raises(RuntimeError):
                await app._load_task
            health = await asyncio.to_thread(http_get, app.port, "/healthz")
            live = await asyncio.to_thread(http_get, app.port, "/livez")
            refused = await handshake(f"ws://127.0.0.1:{app.port}/v1/stream")
            return health, live, refused
        finally:
            await app.stop()

    with caplog.at_level(logging.ERROR):
        health, live, refused = asyncio.run(main())
    for status, _, body in (health, live, (refused.status, refused.headers, refused.body)):
        assert status == 503 and "/srv/secret" not in json.dumps(body), body
    assert "incident" in health[2]["error"]
    incident = health[2]["error"].split("incident ")[1].split(";")[0]
    assert incident in caplog.text and "/srv/secret/weights.bin" in caplog.text
    assert live[2]["live"] is False

