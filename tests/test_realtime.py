"""OpenAI Realtime transcription sessions at /v1/realtime, over real sockets, with the real
Whisper model: a client written from OpenAI's documentation (tests/realtimeclient.py) and the
official `openai` SDK's own realtime clients (GA and beta). Real speech at 24 kHz PCM16 and
8 kHz G.711; the checks are OpenAI's event shapes and order, append-only deltas, and the text
(word error rate against the clips' transcripts).
"""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest
import soxr
from openai import AsyncOpenAI
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from server.audio.codecs import encode
from server.wer import normalize_text
from tests.realtimeclient import RealtimeClient, beta_update, ga_update
from tests.serverharness import DATA, ServerThread, make_config, pcm16, read_clip
from tests.serverharness import clip_wer as wer
from tests.waiting import async_wait_until

JFK = DATA / "jfk.wav"
SHORT = DATA / "sense_and_sensibility_01_austen_64kb-0880.wav"  # 3.0 s
MID = DATA / "sense_and_sensibility_01_austen_64kb-0890.wav"  # 5.3 s
OTHER = DATA / "sense_and_sensibility_01_austen_64kb-0930.wav"  # 3.3 s
TOKEN = "sk-chorus-test"
COMPLETED = "conversation.item.input_audio_transcription.completed"
DELTA = "conversation.item.input_audio_transcription.delta"


def audio(path, rate: int, encoding: str = "pcm_s16le", lead_s: float = 0.3, tail_s: float = 1.0) -> bytes:
    """The clip at ``rate`` in ``encoding``, with silence around it (the tail ends the turn)."""
    x = read_clip(path)
    if rate != 16000:
        x = soxr.resample(x, 16000, rate)
    x = np.concatenate([np.zeros(int(lead_s * rate)), x, np.zeros(int(tail_s * rate))]).astype(np.float32)
    return pcm16(x) if encoding == "pcm_s16le" else encode(x, encoding)


@pytest.fixture(scope="module")
def srv(whisper_runner, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("rt") / "tokens"
    tokens.write_text(TOKEN + "\n")
    with ServerThread(make_config(**{"server.auth_tokens_file": str(tokens)}), whisper_runner) as s:
        s.rt_url = f"ws://127.0.0.1:{s.app.port}/v1/realtime?intent=transcription"
        yield s


def fed_s(srv: ServerThread) -> float:
    """Seconds of audio the server's sessions have been fed (in-process)."""
    return srv.app.metrics.registry.get_sample_value("chorus_audio_seconds_total") or 0.0


def check_events(c: RealtimeClient) -> None:
    """Every server event has a type and an event_id no other event has."""
    ids = [e["event_id"] for e in c.events]
    assert all(isinstance(e.get("type"), str) for e in c.events)
    assert all(isinstance(i, str) and i for i in ids) and len(set(ids)) == len(ids)


def check_items(c: RealtimeClient, vad: bool) -> list[dict]:
    """Each completed item went through OpenAI's sequence, in order; its deltas came between its
    first announcement and its completion, and spell its transcript (up to punctuation and case)."""
    position = {id(e): i for i, e in enumerate(c.events)}
    done = c.of(COMPLETED)
    assert done, [e["type"] for e in c.events]
    previous = None
    for item in done:
        iid = item["item_id"]
        mine = [e for e in c.events if e.get("item_id") == iid]
        kinds = [e["type"] for e in mine]
        committed = [e for e in mine if e["type"] == "input_audio_buffer.committed"]
        assert len(committed) == 1 and kinds.count(COMPLETED) == 1, kinds
        assert committed[0]["previous_item_id"] == previous
        previous = iid
        if vad:
            assert kinds[0] == "input_audio_buffer.speech_started", kinds
            start, stop = mine[0], next(e for e in mine if e["type"] == "input_audio_buffer.speech_stopped")
            assert position[id(start)] < position[id(stop)] < position[id(committed[0])]
            assert 0 <= start["audio_start_ms"] < stop["audio_end_ms"]
        else:
            assert "input_audio_buffer.speech_started" not in kinds and "input_audio_buffer.speech_stopped" not in kinds
            # Manual mode: nothing is said of an item before its commit.
            assert kinds[0] == "input_audio_buffer.committed", kinds
        assert kinds[-1] == COMPLETED and all(e["content_index"] == 0 for e in mine if "content_index" in e)
        said = normalize_text(c.deltas(iid)).split()
        final = normalize_text(item["transcript"]).split()
        assert said and final[:len(said)] == said, (said, final)
    return done


@pytest.mark.timing
def test_24khz_pcm16_at_real_time_pace_with_server_vad(srv):
    """The GA form, as OpenAI's transcription guide configures it: speech_started while the clip
    plays, live deltas before its end, then speech_stopped, committed and completed per turn.
    The suite's one paced Realtime stream (deltas while the speaker speaks: it runs alone)."""
    async def main():
        async with RealtimeClient(srv.rt_url, token=TOKEN) as c:
            await c.wait_type("session.created")
            await c.send({**ga_update(language="en", turn_detection={"type": "server_vad", "silence_duration_ms": 500}),
                          "event_id": "cfg1"})
            await c.wait_type("session.updated")
            sent = await c.stream(audio(JFK, 24000), 24000, 2, chunk_ms=100, speed=1.0)
            await c.wait_for(lambda c: len(c.of(COMPLETED)) >= 2 and not c.of("input_audio_buffer.speech_started")[2:],
                             timeout=30)
            return c, sent

    c, sent = asyncio.run(main())
    check_events(c)
    assert not c.errors(), c.errors()
    created, updated = c.events[0], c.events[1]
    assert created["type"] == "session.created" and created["session"]["type"] == "transcription"
    audio_in = updated["session"]["audio"]["input"]
    assert audio_in["format"] == {"type": "audio/pcm", "rate": 24000} and audio_in["transcription"]["language"] == "en"
    assert audio_in["turn_detection"]["silence_duration_ms"] == 500
    done = check_items(c, vad=True)
    assert len(done) == 2  # the clip's two sentences, cut at its pause
    first_delta = c.times[c.events.index(c.of(DELTA)[0])]
    assert first_delta < sent  # text while the speaker is still speaking
    # The end of a turn is told when the endpointer cuts it, not once the model has recognised it.
    for item in done:
        stopped = next(e for e in c.events if e["type"] == "input_audio_buffer.speech_stopped"
                       and e["item_id"] == item["item_id"])
        assert c.times[c.events.index(item)] - c.times[c.events.index(stopped)] > 0.05
    assert wer(JFK, c.transcript()) < 0.15, c.transcript()


def test_manual_commits_clear_and_a_mid_session_switch(srv):
    """Beta form. First server VAD; then `turn_detection: null` (a new session, on the same
    clock): nothing happens until a commit; clear drops what was appended before it; a commit
    of nothing is an error."""
    async def main():
        async with RealtimeClient(srv.rt_url, token=TOKEN, headers={"OpenAI-Beta": "realtime=v1"}) as c:
            await c.wait_type("transcription_session.created")
            await c.stream(audio(SHORT, 24000), 24000, 2, speed=None)
            await c.wait_type(COMPLETED, 1, timeout=30)
            await c.send(beta_update(turn_detection=None, language="en"))
            await c.wait_type("transcription_session.updated")
            await c.stream(audio(MID, 24000, tail_s=0.2), 24000, 2, speed=None)
            await c.send({"type": "input_audio_buffer.clear", "event_id": "clr"})
            await c.wait_type("input_audio_buffer.cleared")
            # 2 s appends: 128 KB of base64 text each, past the text-message limit of other dialects.
            await c.stream(audio(OTHER, 24000, tail_s=0.2), 24000, 2, chunk_ms=2000, speed=None)
            await c.send({"type": "input_audio_buffer.commit", "event_id": "c1"})
            await c.send({"type": "input_audio_buffer.commit", "event_id": "c2"})  # nothing new
            await c.wait_type(COMPLETED, 2, timeout=30)
            await c.wait_type("error")
            return c

    c = asyncio.run(main())
    check_events(c)
    assert c.events[0]["session"]["turn_detection"]["type"] == "server_vad"
    updated = c.of("transcription_session.updated")[0]["session"]
    assert updated["turn_detection"] is None and updated["input_audio_transcription"]["language"] == "en"
    vad_item, manual_item = c.of(COMPLETED)
    assert wer(SHORT, vad_item["transcript"]) < 0.15, vad_item
    # Only what came after the clear: MID's words would make this WER far above the bound.
    assert wer(OTHER, manual_item["transcript"]) < 0.15, manual_item
    [empty] = c.errors()
    assert empty["error"]["code"] == "input_audio_buffer_commit_empty" and empty["error"]["event_id"] == "c2"
    manual_events = c.events[c.events.index(c.of("transcription_session.updated")[0]):]
    assert not [e for e in manual_events if e["type"].startswith("input_audio_buffer.speech_")]
    kinds = [e["type"] for e in c.events if e.get("item_id") == manual_item["item_id"]]
    assert kinds[0] == "input_audio_buffer.committed" and kinds[-1] == COMPLETED and DELTA in kinds, kinds
    committed = c.of("input_audio_buffer.committed")
    assert [e["previous_item_id"] for e in committed] == [None, vad_item["item_id"]]


def test_g711_ulaw_at_8khz(srv):
    async def main():
        async with RealtimeClient(srv.rt_url, token=TOKEN) as c:
            await c.send(ga_update(fmt={"type": "audio/pcmu"}, model="whisper-1"))
            await c.wait_type("session.updated")
            await c.stream(audio(SHORT, 8000, "mulaw"), 8000, 1, chunk_ms=20, speed=4.0)
            await c.wait_type(COMPLETED, timeout=30)
            return c

    c = asyncio.run(main())
    assert not c.errors(), c.errors()
    assert c.of("session.updated")[0]["session"]["audio"]["input"]["format"] == {"type": "audio/pcmu"}
    check_items(c, vad=True)
    assert wer(SHORT, c.transcript()) < 0.15, c.transcript()


BAD = [
    ("not json", "invalid_json", None),
    ("[1, 2, 3]", "invalid_json", None),
    (json.dumps({"type": "bogus", "event_id": "b1"}), "unknown_event", "b1"),
    (json.dumps({"type": "response.create", "event_id": "b2"}), "unsupported_event", "b2"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": "%%%not-base64", "event_id": "b3"}), "invalid_base64", "b3"),
    (json.dumps({**beta_update(fmt="opus"), "event_id": "b4"}), "unsupported_format", "b4"),
    (json.dumps({**ga_update(fmt={"type": "audio/pcm", "rate": 16000}), "event_id": "b5"}), "unsupported_format", "b5"),
    (json.dumps({**ga_update(language="xx"), "event_id": "b6"}), "unsupported_language", "b6"),
    (json.dumps({"type": "session.update", "session": {"type": "realtime"}, "event_id": "b7"}),
     "unsupported_session_type", "b7"),
    (json.dumps({"type": "input_audio_buffer.commit", "event_id": "b8"}), "input_audio_buffer_commit_empty", "b8"),
    ("[" * 50000, "invalid_json", None),
]


def test_bad_events_get_errors_the_session_goes_on_and_a_concurrent_one_is_untouched(srv):
    async def bad():
        async with RealtimeClient(srv.rt_url, token=TOKEN) as c:
            await c.wait_type("session.created")
            for text, _, _ in BAD:
                await c.send_raw(text)
            assert c.ws is not None
            await c.ws.send(b"\x00\x01")  # audio must be base64 in events
            await c.wait_type("error", len(BAD) + 1, timeout=20)
            # Still serving, with the settings the bad updates did not change.
            await c.send(ga_update(model="whisper-1"))
            await c.wait_type("session.updated")
            pcm = audio(OTHER, 24000)
            for i in range(0, len(pcm), 4801):  # odd sizes: samples split across appends
                await c.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm[i:i + 4801]).decode()})
            await c.wait_type(COMPLETED, timeout=30)
            return c

    async def good():
        async with RealtimeClient(srv.rt_url, token=TOKEN) as c:
            await c.send(ga_update(language="en"))
            await c.stream(audio(SHORT, 24000), 24000, 2, speed=4.0)  # still arriving while the bad events come
            await c.wait_type(COMPLETED, timeout=30)
            return c

    async def main():
        return await asyncio.gather(bad(), good())

    b, g = asyncio.run(main())
    check_events(b)
    errors = b.errors()
    assert [(e["error"]["code"], e["error"]["event_id"]) for e in errors] == \
        [(code, eid) for _, code, eid in BAD] + [("unexpected_binary", None)]
    for e in errors:
        assert e["error"]["type"] == "invalid_request_error" and e["error"]["message"] and len(json.dumps(e)) < 2000
    lang = next(e for e in errors if e["error"]["code"] == "unsupported_language")["error"]
    assert lang["param"] == "session.audio.input.transcription.language" and "en" in lang["message"]
    updated = b.of("session.updated")[0]["session"]["audio"]["input"]
    assert updated["format"] == {"type": "audio/pcm", "rate": 24000} and updated["transcription"]["language"] is None
    assert wer(OTHER, b.transcript()) < 0.15, b.transcript()
    assert not g.errors(), g.errors()
    check_items(g, vad=True)
    assert wer(SHORT, g.transcript()) < 0.15, g.transcript()
    assert srv.http("/healthz")[0] == 200


@pytest.mark.parametrize("beta", [False, True])
def test_the_official_openai_sdk_client(srv, beta):
    """openai's own realtime client, pointed at Chorus with `websocket_base_url`: it connects to
    <base>/realtime, sends `Authorization: Bearer <api_key>`, and parses our events into its types."""
    pcm = audio(SHORT, 24000)

    async def main():
        client = AsyncOpenAI(api_key=TOKEN, websocket_base_url=f"ws://127.0.0.1:{srv.app.port}/v1")
        if beta:
            manager = client.beta.realtime.connect(model="gpt-4o-transcribe", extra_query={"intent": "transcription"})
        else:
            manager = client.realtime.connect(extra_query={"intent": "transcription"})
        got = []
        async with manager as conn:
            if beta:
                await conn.transcription_session.update(session={
                    "input_audio_format": "pcm16", "input_audio_transcription": {"model": "whisper-1", "language": "en"}})
            else:
                await conn.session.update(session={"type": "transcription", "audio": {"input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "transcription": {"model": "gpt-4o-transcribe", "language": "en"}}}})
            for i in range(0, len(pcm), 9600):
                await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i:i + 9600]).decode())
            async with asyncio.timeout(30):
                async for event in conn:
                    got.append(event)
                    if event.type == COMPLETED:
                        break
        return got

    got = asyncio.run(main())
    kinds = [e.type for e in got]
    prefix = "transcription_session" if beta else "session"
    assert kinds[:2] == [f"{prefix}.created", f"{prefix}.updated"], kinds
    assert "error" not in kinds and DELTA in kinds, kinds
    assert kinds.index("input_audio_buffer.speech_started") < kinds.index("input_audio_buffer.speech_stopped") \
        < kinds.index("input_audio_buffer.committed") < kinds.index(COMPLETED)
    final = got[-1]
    assert type(final).__name__ == "ConversationItemInputAudioTranscriptionCompletedEvent"
    assert wer(SHORT, final.transcript) < 0.15, final.transcript


def test_auth_and_intent_are_checked(srv):
    async def main():
        with pytest.raises(InvalidStatus) as refused:
            async with connect(srv.rt_url):
                pass
        async with RealtimeClient(srv.rt_url.replace("intent=transcription", "intent=conversation"),
                                  token=TOKEN) as c:
            await c.wait_type("error", timeout=10)
            assert c.ws is not None
            await asyncio.wait_for(c.ws.wait_closed(), 10)  # the server closes it
        return refused.value.response.status_code, c

    status, c = asyncio.run(main())
    assert status == 401
    assert [e["error"]["code"] for e in c.errors()] == ["unsupported_intent"]
    assert c.close_code == 1008
    # ?token= works as on /v1/stream.
    async def by_query():
        async with RealtimeClient(srv.rt_url + f"&token={TOKEN}") as q:
            return await q.wait_type("session.created")
    assert asyncio.run(by_query())[0]["session"]["object"] == "realtime.transcription_session"


def test_drain_delivers_an_uncommitted_manual_turn(whisper_runner):
    """SIGTERM's drain: the words of a turn the client had not committed yet still arrive
    (committed, completed), then the close (1001)."""
    with ServerThread(make_config(), whisper_runner) as s:
        async def main():
            async with RealtimeClient(f"ws://127.0.0.1:{s.app.port}/v1/realtime?intent=transcription") as c:
                await c.send(ga_update(turn_detection=None))
                await c.wait_type("session.updated")
                pcm = audio(OTHER, 24000, tail_s=0.2)
                await c.stream(pcm, 24000, 2, speed=None)
                # Every append reached the session (audio seconds fed) before the drain begins.
                await async_wait_until(lambda: fed_s(s) >= len(pcm) / 48000 - 0.1, 30, what="the turn's audio fed")
                stopping = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(s.app.stop(), s.loop))
                await c.wait_type(COMPLETED, timeout=30)
                await stopping
                await c.wait_for(lambda c: c._reader is not None and c._reader.done(), 10)
                return c

        c = asyncio.run(main())
    assert c.ws is not None and c.ws.close_code == 1001
    assert wer(OTHER, c.transcript()) < 0.15, c.transcript()
    check_items(c, vad=False)


def test_limits_and_admission_as_on_the_native_stream(whisper_runner):
    """The connection's limits speak this dialect: an oversize append and the idle timeout are
    `error` events; a full server refuses the handshake (503) as it does /v1/stream."""
    cfg = make_config(**{"server.idle_timeout_s": "1.5", "server.max_message_bytes": "4096", "server.max_sessions": "1"})
    with ServerThread(cfg, whisper_runner) as s:
        url = f"ws://127.0.0.1:{s.app.port}/v1/realtime?intent=transcription"

        async def main():
            async with RealtimeClient(url) as c:
                await c.wait_type("session.created")
                await c.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(bytes(8000)).decode(),
                              "event_id": "big"})
                with pytest.raises(InvalidStatus) as full:
                    async with connect(url):
                        pass
                await c.wait_type("error", 2, timeout=10)
                assert c.ws is not None
                await asyncio.wait_for(c.ws.wait_closed(), 10)
                return c, full.value.response.status_code

        c, status = asyncio.run(main())
    assert status == 503
    assert [(e["error"]["code"], e["error"]["type"], e["error"]["event_id"]) for e in c.errors()] == \
        [("message_too_large", "invalid_request_error", "big"), ("idle_timeout", "invalid_request_error", None)]
    assert c.ws is not None and c.ws.close_code == 1000
