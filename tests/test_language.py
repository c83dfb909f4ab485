"""Session languages end to end: real listener, real socket, real Whisper-base weights.

A language the loaded model does not support is refused when the session starts (with the
model's codes in the message), so it never reaches a batch shared with other sessions; a
server whose own default language is unsupported never becomes ready.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from server.app import ChorusServer
from server.config import ConfigError
from server.wer import normalize_text, word_error_rate
from tests.serverharness import CLIPS, TRANSCRIPTS, ServerThread, make_config, pcm16, read_clip, stream_audio

JFK = next(c for c in CLIPS if c.name == "jfk.wav")


@pytest.fixture(scope="module")
def srv(whisper_runner):
    cfg = make_config(**{"batcher.partial_interval_ms": 500, "batcher.batch_wait_ms": 10})
    with ServerThread(cfg, whisper_runner) as s:
        yield s


async def recv_json(ws, timeout: float = 10.0) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def drain(ws, got: list[dict]) -> None:
    """Append every message until the server closes (for any close code)."""
    try:
        async for m in ws:
            got.append(json.loads(m))
    except ConnectionClosed:
        pass


def assert_lists_supported_codes(message: str) -> None:
    assert "'xx'" in message and "not supported" in message, message
    # (after a start message the error adds "; start ignored")
    codes = message.rsplit("use one of: ", 1)[1].split(";")[0].split(", ")
    assert codes[0] == "auto" and {"en", "de", "zh", "ja"} <= set(codes), message
    assert len(message) < 1000


def test_unsupported_language_in_start_is_refused_with_the_supported_codes(srv):
    """`start` with "xx": bad_config (not fatal, as for any bad start) naming the codes; no session
    starts, a corrected start works, and the connection closes normally at stop."""

    async def main():
        async with connect(srv.url) as ws:
            await ws.send(json.dumps({"type": "start", "language": "xx"}))
            err = await recv_json(ws)
            await ws.send(json.dumps({"type": "start", "language": "EN"}))
            ready = await recv_json(ws)
            await ws.send(json.dumps({"type": "stop"}))
            rest = [json.loads(m) async for m in ws]
            return err, ready, rest, ws.close_code

    err, ready, rest, close_code = asyncio.run(main())
    assert err["type"] == "error" and err["code"] == "bad_config" and err["fatal"] is False, err
    assert_lists_supported_codes(err["message"])
    assert ready["type"] == "ready" and ready["config"]["language"] == "en", ready
    assert rest == [{"type": "done"}] and close_code == 1000


def test_unsupported_language_in_query_is_fatal(srv):
    async def main():
        async with connect(srv.url + "?sample_rate=16000&language=xx") as ws:
            messages: list[dict] = []
            await asyncio.wait_for(drain(ws, messages), 10)
            return messages, ws.close_code

    messages, close_code = asyncio.run(main())
    assert len(messages) == 1, messages
    err = messages[0]
    assert err["type"] == "error" and err["code"] == "bad_config" and err["fatal"] is True, err
    assert_lists_supported_codes(err["message"])
    assert close_code == 1008


def test_unsupported_language_session_does_not_disturb_a_concurrent_session(srv):
    """An `en` session streams jfk.wav while two `xx` clients (start message and URL) try to
    start at the same moment, each ready to stream the same audio should it be admitted
    (so that its segments would share batches with the `en` session's). The `en` session
    gets its full text and no error; the `xx` clients get bad_config and never a `ready`."""
    jfk = read_clip(JFK)

    async def intruder(url: str, start: dict | None) -> list[dict]:
        got: list[dict] = []
        async with connect(url, max_size=None) as ws:
            if start is not None:
                await ws.send(json.dumps({"type": "start", **start}))
            first = await recv_json(ws)
            got.append(first)
            if first["type"] == "ready":
                # Admitted (the bug): stream like the en session so both share batches.
                rest = asyncio.create_task(drain(ws, got))
                pcm = pcm16(jfk)
                try:
                    for i in range(0, len(pcm), 3200):
                        await ws.send(pcm[i : i + 3200])
                        await asyncio.sleep(0.025)  # 4x real time, like the en session
                    await ws.send(json.dumps({"type": "stop"}))
                except ConnectionClosed:
                    pass
                await asyncio.wait_for(rest, 120)
            else:
                if not first.get("fatal"):
                    await ws.send(json.dumps({"type": "stop"}))
                await asyncio.wait_for(drain(ws, got), 10)
        return got

    async def main():
        return await asyncio.gather(
            stream_audio(srv.url, jfk, speed=4.0, start={"language": "en"}, lead_silence_s=0.0),
            intruder(srv.url, {"language": "xx"}),
            intruder(srv.url + "?language=xx", None),
        )

    en_log, via_start, via_query = asyncio.run(main())

    assert en_log.of("error") == [], en_log.of("error")
    assert en_log.of("ready")[0]["config"]["language"] == "en"
    finals = en_log.of("final")
    hyp = " ".join(f["text"] for f in finals)
    wer = word_error_rate([TRANSCRIPTS["jfk.wav"]], [hyp])
    print(f"en session WER {wer:.3%}: {normalize_text(hyp)!r}")
    assert wer <= 0.05, f"WER {wer:.3f}: {normalize_text(hyp)!r}"
    assert all(f.get("language") == "en" and "error" not in f for f in finals), finals
    assert en_log.messages[-1]["type"] == "done" and en_log.close_code == 1000

    for got in (via_start, via_query):
        assert got[0]["type"] == "error" and got[0]["code"] == "bad_config", got
        assert_lists_supported_codes(got[0]["message"])
        assert not [m for m in got if m["type"] in ("ready", "speech_started", "partial", "final")], got
    assert via_start[-1] == {"type": "done"}
    assert len(via_query) == 1


def test_supported_default_language_is_used_when_the_client_sets_none(whisper_runner):
    cfg = make_config(**{"server.default_language": "EN"})

    async def main(url: str):
        async with connect(url) as ws:
            await ws.send(json.dumps({"type": "start"}))
            ready = await recv_json(ws)
            await ws.send(json.dumps({"type": "stop"}))
            assert await recv_json(ws) == {"type": "done"}
            return ready

    with ServerThread(cfg, whisper_runner) as s:
        ready = asyncio.run(main(s.url))
    assert ready["type"] == "ready" and ready["config"]["language"] == "en"


def test_unsupported_default_language_fails_the_load_and_server_never_ready(whisper_runner):
    """server.default_language=xx: the load step fails with an error naming the knob (for a
    preloaded runner too), /healthz says 503 with that error, and streams are refused."""
    import urllib.error
    import urllib.request

    app = ChorusServer(make_config(**{"server.default_language": "xx"}), runner=whisper_runner, preloaded=True)

    def healthz(port: int) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    async def main():
        await app.start(wait_ready=False)
        try:
            assert app._load_task is not None
            with pytest.raises(ConfigError) as info:
                await app._load_task
            health = await asyncio.get_running_loop().run_in_executor(None, healthz, app.port)
            with pytest.raises(InvalidStatus) as refused:
                async with connect(f"ws://127.0.0.1:{app.port}/v1/stream?language=en"):
                    pass
            return info.value, health, refused.value.response.status_code
        finally:
            await app.stop()

    error, (status, body), ws_status = asyncio.run(main())
    message = str(error)
    assert "server.default_language" in message and "'xx'" in message, message
    assert "auto, " in message and ", en, " in message
    assert app.ready is False and app.load_error == message
    assert status == 503 and body["ready"] is False and "server.default_language" in body["error"], body
    assert ws_status == 503
