"""Twilio Media Streams at /v1/twilio, end to end: real sockets, the real Whisper model.

The sender (tests/twilioclient.py) is written from Twilio's message descriptions. Calls
stream real speech as 8 kHz mu-law, faster than real time (the call's clock is its media
timestamps), except the one whose claim is about time (partials while someone reads them);
their transcripts are read where an application reads them: the webhook
(tests/webhookreceiver.py, which checks every signature itself) and /v1/calls subscriptions,
and compared with the same clips sent at 16 kHz over the native protocol.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Callable

import numpy as np
import pytest
from websockets.asyncio.client import connect

from server.audio.codecs import encode_mulaw
from server.protocol.twilio import signature
from tests.callrecorder import CallRecorder
from tests.serverharness import DATA, ServerThread, clip_wer, handshake, make_config
from tests.telephony import at_8k, clips_8k, final_text, pooled_reference, pooled_wer, reference_bound
from tests.twilioclient import FRAME_SAMPLES, TwilioSender, stop_and_wait_closed, twilio_call
from tests.waiting import async_wait_until
from tests.webhookreceiver import WebhookReceiver

JFK = DATA / "jfk.wav"
SHORT = DATA / "sense_and_sensibility_01_austen_64kb-0880.wav"
OTHER = DATA / "sense_and_sensibility_01_austen_64kb-0890.wav"
READ = DATA / "sense_and_sensibility_01_austen_64kb-0870.wav"  # 7 s of continuous reading
# Two speakers of one call, each several clips long (a clip of 8 words makes one word 12 points of WER).
CALLER = [JFK, DATA / "sense_and_sensibility_01_austen_64kb-0870.wav", DATA / "sense_and_sensibility_01_austen_64kb-0920.wav"]
CALLEE = [SHORT, OTHER, DATA / "sense_and_sensibility_01_austen_64kb-0930.wav"]
SECRET = b"whsec-test-secret"


def ended(*call_ids: str) -> Callable[[list[dict]], bool]:
    """Whether events read so far include every one of these calls' `call_ended`."""
    return lambda events: set(call_ids) <= {e["call_id"] for e in events if e["type"] == "call_ended"}


async def subscribe(server: ServerThread, call_id: str, ready: asyncio.Event | None = None,
                    timeout: float = 120.0, until: Callable[[list[dict]], bool] | None = None,
                    out: list[dict] | None = None) -> tuple[list[dict], int | None]:
    """Follow one call (or `*`) on /v1/calls until the server closes (or ``until`` holds for the
    events read so far; a `*` subscription stays open); (events, close code). Events are appended
    to ``out`` as they arrive, for a test that looks while the call goes on."""
    out = [] if out is None else out
    async with connect(f"ws://127.0.0.1:{server.app.port}/v1/calls?call_id={call_id}") as ws:
        first = json.loads(await ws.recv())
        assert first == {"type": "subscribed", "call_id": call_id}
        if ready is not None:
            ready.set()
        async with asyncio.timeout(timeout):
            async for msg in ws:
                out.append(json.loads(msg))
                if until is not None and until(out):
                    break
        return out, ws.close_code


def check_call(events: list[dict], call_id: str, tracks: set[str], reason: str) -> None:
    """The shape of one call's event sequence, as the application sees it."""
    assert events, "no events"
    assert events[0]["type"] == "call_started" and events[-1]["type"] == "call_ended", [e["type"] for e in events]
    assert events[-1]["reason"] == reason, events[-1]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert len({e["event_id"] for e in events}) == len(events)
    for e in events:
        assert e["call_id"] == call_id and e["source"] == "twilio", e
    finals = [e for e in events if e["type"] == "final"]
    assert {e["track"] for e in finals} == tracks
    for f in finals:
        assert 0 <= f["start_ms"] < f["end_ms"], f
        words = [w for w in f["words"]]
        assert " ".join(w["word"].strip() for w in words).split() == f["text"].split(), f
        for w in words:
            assert f["start_ms"] <= w["start_ms"] <= w["end_ms"] <= f["end_ms"], f
    for track in tracks:
        ids = [e["segment_id"] for e in finals if e["track"] == track]
        assert ids == sorted(ids) and len(set(ids)) == len(ids), ids


@pytest.fixture(scope="module")
def rx():
    with WebhookReceiver(secret=SECRET) as receiver:
        yield receiver


@pytest.fixture(scope="module")
def tw(whisper_runner, rx):
    os.environ["CHORUS_WEBHOOK_SECRET"] = SECRET.decode()
    try:
        with ServerThread(make_config(**{"webhook.url": rx.url, "webhook.partials": "true"}), whisper_runner) as s:
            s.twilio_url = f"ws://127.0.0.1:{s.app.port}/v1/twilio"
            yield s
    finally:
        del os.environ["CHORUS_WEBHOOK_SECRET"]


def test_two_track_call_reaches_webhook_and_subscribers(tw, rx):
    """A call with both tracks (two speakers), 8 kHz mu-law: each track's transcript is as good
    as the same clip at 16 kHz; the webhook gets every event signed and in order; subscribers
    that joined before the call (to the call, and to every call) get exactly the same events. A
    second, broken stream at the same time (malformed frames) gets errors and leaves the call
    alone."""
    ref_a, ref_b = pooled_reference(tw, CALLER), pooled_reference(tw, CALLEE)
    call, bad_call = "CA" + "a" * 32, "CA" + "b" * 32

    async def main():
        one_ready, all_ready = asyncio.Event(), asyncio.Event()
        one = asyncio.create_task(subscribe(tw, call, one_ready))
        every = asyncio.create_task(subscribe(tw, "*", all_ready, until=ended(call, bad_call)))
        await one_ready.wait()
        await all_ready.wait()
        good = asyncio.create_task(twilio_call(
            tw.twilio_url, call, {"inbound": clips_8k(CALLER), "outbound": clips_8k(CALLEE, lead_s=4.0)},
            speed=None, custom={"language": "en", "crm_ticket": "T-17"}, dtmf_at_ms={2000: "7"}))
        bad = asyncio.create_task(twilio_call(
            tw.twilio_url, bad_call, {"inbound": at_8k(OTHER)[:8000 * 3]}, speed=None, stream_sid="MZ" + "b" * 32,
            before_start=['{"event":"media","media":{"track":"inbound","payload":"AAAA"}}', "not json", b"\x00\x01"],
            after_start=['{"event":"media","media":{"track":"inbound","timestamp":"0","payload":"@@@not base64"}}',
                         '{"event":"media","media":{"track":"outbound","timestamp":"0","payload":"AAAA"}}',
                         '{"event":"transcription-future-event","x":1}',
                         '{"event":"dtmf","dtmf":{"track":"inbound_track","digit":"X"}}']))
        good_run, bad_run = await asyncio.gather(good, bad)
        events, code = await one
        everything, _ = await every
        return good_run, bad_run, events, code, everything

    good_run, bad_run, events, code, everything = asyncio.run(main())
    assert good_run.close_code == 1000 and good_run.received == []  # nothing goes back down Twilio's socket
    assert code == 1000  # the subscription ends with its call
    check_call(events, call, {"inbound", "outbound"}, "stop")
    started = events[0]
    assert started["stream_id"] == "MZ00000000000000000000000000000001" and set(started["tracks"]) == {"inbound", "outbound"}
    assert started["metadata"]["custom_parameters"] == {"language": "en", "crm_ticket": "T-17"}
    assert [e["digit"] for e in events if e["type"] == "dtmf"] == ["7"]
    w_in, w_out = pooled_wer(CALLER, final_text(events, "inbound")), pooled_wer(CALLEE, final_text(events, "outbound"))
    assert w_in <= ref_a + 0.05 and w_out <= ref_b + 0.05, (w_in, ref_a, w_out, ref_b, final_text(events))
    assert w_in < 0.15 and w_out < 0.15, (w_in, w_out)
    callee = [e for e in events if e["type"] == "final" and e["track"] == "outbound" and e["text"]]
    assert callee[0]["start_ms"] >= 3500  # the callee spoke after 4 s of the call

    # The webhook: every event of the call, each signed (checked by the receiver), in order,
    # the same ids and bodies the subscriber got.
    hooked = rx.wait_for(lambda r: any(e["type"] == "call_ended" for e in r.events_for(call)), 30)
    assert hooked
    delivered = rx.events_for(call)
    assert [e["seq"] for e in delivered] == [e["seq"] for e in events]
    assert [e["event_id"] for e in delivered] == [e["event_id"] for e in events]
    assert delivered == events
    assert all(r.signature_ok for r in rx.requests_for(call))

    # The broken stream: its errors are on its own call, which still ended normally.
    rx.wait_for(lambda r: any(e["type"] == "call_ended" for e in r.events_for(bad_call)), 30)
    bad_events = rx.events_for(bad_call)
    codes = [e["code"] for e in bad_events if e["type"] == "error"]
    assert {"bad_media", "bad_track", "bad_dtmf"} <= set(codes), codes
    assert bad_events[-1]["type"] == "call_ended" and bad_run.close_code == 1000
    assert not any(e["call_id"] == bad_call for e in events)
    assert tw.http("/healthz")[0] == 200
    assert tw.metric("chorus_errors_total", code="not_started") >= 1

    # The subscriber to every call: both calls, each exactly as its own subscriber and the
    # webhook got it.
    assert {e["call_id"] for e in everything} == {call, bad_call}
    assert [e for e in everything if e["call_id"] == call] == events
    assert [e for e in everything if e["call_id"] == bad_call] == bad_events


def test_disconnect_without_stop_still_delivers_and_timestamps_keep_the_call_clock(tw, rx):
    """Twilio's socket drops mid-call (no `stop`): the words said so far still reach the
    application. Media timestamps that jump 8 s ahead (frames never sent) put the speech after
    the jump on the call's clock."""
    call = "CA" + "c" * 32
    clip = at_8k(SHORT)
    # 1 s of the clip; then (after the jump) 0.5 s of silence and the whole clip.
    audio = {"inbound": np.concatenate([clip[:8000], np.zeros(4000, dtype=np.float32), clip])}
    asyncio.run(twilio_call(tw.twilio_url, call, audio, speed=None, timestamp_jump=(1000, 8000), stop=False))
    events = rx.wait_for(lambda r: any(e["type"] == "call_ended" for e in r.events_for(call)), 60) and rx.events_for(call)
    check_call(events, call, {"inbound"}, "disconnected")
    finals = [e for e in events if e["type"] == "final" and e["text"]]
    assert finals and finals[-1]["start_ms"] >= 9000, [(f["start_ms"], f["text"]) for f in finals]
    after_jump = " ".join(f["text"] for f in finals if f["start_ms"] >= 9000)
    assert clip_wer(SHORT, after_jump) <= reference_bound(tw, SHORT), after_jump


def test_late_subscriber_gets_the_call_so_far(tw, rx):
    call = "CA" + "d" * 32
    asyncio.run(twilio_call(tw.twilio_url, call, {"inbound": at_8k(SHORT)}, speed=None))
    events, code = asyncio.run(subscribe(tw, call))
    assert code == 1000
    assert not any(e["type"] == "partial" for e in events)  # history keeps what lasts
    check_call(events, call, {"inbound"}, "stop")
    rx.wait_for(lambda r: any(e["type"] == "call_ended" for e in r.events_for(call)), 30)
    hooked = [e for e in rx.events_for(call) if e["type"] != "partial"]
    assert [e["event_id"] for e in events] == [e["event_id"] for e in hooked]


def test_bad_custom_parameters_end_the_call_with_an_error(tw, rx):
    call = "CA" + "e" * 32
    run = asyncio.run(twilio_call(tw.twilio_url, call, {"inbound": at_8k(SHORT)[:8000]}, speed=None,
                                  custom={"language": "klingon"}))
    assert run.close_code == 1008
    events = rx.wait_for(lambda r: any(e["type"] == "call_ended" for e in r.events_for(call)), 30) and rx.events_for(call)
    assert [e["type"] for e in events] == ["call_started", "error", "call_ended"]
    assert events[1]["code"] == "bad_config" and "klingon" in events[1]["message"]
    assert events[2]["reason"] == "error"


def test_calls_route_needs_a_call_id(tw):
    async def attempt(query: str) -> int:
        return (await handshake(f"ws://127.0.0.1:{tw.app.port}/v1/calls{query}")).status

    assert asyncio.run(attempt("")) == 400
    assert asyncio.run(attempt("?call_id=")) == 400
    assert asyncio.run(attempt("?call_id=a&call_id=b")) == 400
    assert tw.http("/v1/calls?call_id=x")[0] == 426


# ---------------------------------------------------------------------- signatures


def test_twilio_signature_is_the_credential(whisper_runner, monkeypatch):
    """With a Twilio Auth Token configured, /v1/twilio needs Twilio's signature of its URL and no
    Chorus token (Twilio cannot send one), while every other route still needs the token."""
    monkeypatch.setenv("CHORUS_TWILIO_AUTH_TOKEN", "twilio-auth-token")
    monkeypatch.setenv("CHORUS_AUTH_TOKENS", "chorus-token")
    with ServerThread(make_config(), whisper_runner) as s:
        recorder = s.app.calls.sink = CallRecorder()
        base = f"ws://127.0.0.1:{s.app.port}"
        signed = f"wss://127.0.0.1:{s.app.port}/v1/twilio"  # what Twilio signs: the wss URL in the TwiML

        async def status(path: str, headers: dict) -> int:
            return (await handshake(base + path, additional_headers=headers)).status

        assert asyncio.run(status("/v1/twilio", {})) == 403
        assert asyncio.run(status("/v1/twilio", {"X-Twilio-Signature": signature("wrong-token", signed)})) == 403
        assert asyncio.run(status("/v1/twilio", {"X-Twilio-Signature": signature("twilio-auth-token", signed + "x")})) == 403
        assert asyncio.run(status("/v1/stream", {"X-Twilio-Signature": signature("twilio-auth-token", signed)})) == 401
        # Subscriptions read every call's words: the Chorus token, like any stream.
        assert asyncio.run(status("/v1/calls?call_id=*", {})) == 401
        assert asyncio.run(status("/v1/calls?call_id=*", {"Authorization": "Bearer chorus-token"})) == 101
        good = {"X-Twilio-Signature": signature("twilio-auth-token", signed)}
        run = asyncio.run(twilio_call(base + "/v1/twilio", "CA" + "f" * 32, {"inbound": at_8k(SHORT)}, speed=None, headers=good))
        assert run.close_code == 1000
        events = recorder.wait_for("CA" + "f" * 32, "call_ended")
        assert clip_wer(SHORT, final_text(events)) <= reference_bound(s, SHORT), final_text(events)


def test_twilio_signature_behind_a_proxy(whisper_runner, monkeypatch):
    monkeypatch.setenv("CHORUS_TWILIO_AUTH_TOKEN", "twilio-auth-token")
    public = "wss://asr.example.com/v1/twilio"
    with ServerThread(make_config(**{"twilio.public_url": public}), whisper_runner) as s:
        url = f"ws://127.0.0.1:{s.app.port}/v1/twilio"

        async def status(sig: str) -> int:
            return (await handshake(url, additional_headers={"X-Twilio-Signature": sig})).status

        assert asyncio.run(status(signature("twilio-auth-token", public))) == 101
        assert asyncio.run(status(signature("twilio-auth-token", f"wss://127.0.0.1:{s.app.port}/v1/twilio"))) == 403


def test_a_call_is_one_session_and_subscribers_have_their_own_limit(whisper_runner):
    """A two-track Twilio stream runs two sessions for the model and is charged two (a second
    stream is refused with 503 at `server.max_sessions` 2); subscriptions take none, and are
    bounded by `calls.max_subscribers`."""
    with ServerThread(make_config(**{"server.max_sessions": "2", "calls.max_subscribers": "1"}), whisper_runner) as s:
        base = f"ws://127.0.0.1:{s.app.port}"
        sender = TwilioSender("CA" + "9" * 32)
        speech = encode_mulaw(at_8k(SHORT)[:16000])
        calls_active = lambda: s.app.metrics.registry.get_sample_value("chorus_calls_active")  # noqa: E731

        async def status(path: str) -> int:
            return (await handshake(base + path)).status

        async def main():
            # The call stays open (between two frames of its audio) while the others knock.
            async with connect(base + "/v1/twilio") as call:
                await call.send(sender.connected())
                await call.send(sender.start(["inbound", "outbound"]))
                for i in range(0, len(speech) // 2, FRAME_SAMPLES):
                    for track in ("inbound", "outbound"):
                        await call.send(sender.media(track, i // FRAME_SAMPLES + 1, i // 8, speech[i:i + FRAME_SAMPLES]))
                await async_wait_until(lambda: calls_active() == 1, what="the call is open")
                charged = s.app.admission.charged
                refused = await status("/v1/twilio")
                async with connect(base + "/v1/calls?call_id=*"):  # while both session slots are taken
                    second_sub = await status("/v1/calls?call_id=*")
                closed = await stop_and_wait_closed(call, sender)
            return charged, refused, second_sub, closed, await status("/v1/twilio")

        charged, refused, second_sub, closed, later = asyncio.run(main())
    assert charged == 2
    assert refused == 503 and second_sub == 503
    assert closed == 1000
    assert later == 101  # the slot came back when the call ended


@pytest.mark.timing
def test_partials_only_while_someone_reads_them(whisper_runner):
    """A call nobody follows live (no subscriber, a webhook without partials) costs the model no
    partial decodes; with a subscriber to every call, the same speech, spoken at real time, is
    decoded for partials, and the subscriber reads them while the caller is still speaking.
    (The one Twilio call at real time: partials are a claim about time.)"""
    with WebhookReceiver() as hook, \
            ServerThread(make_config(**{"webhook.url": hook.url}), whisper_runner) as s:
        url = f"ws://127.0.0.1:{s.app.port}/v1/twilio"
        speech = {"inbound": clips_8k([READ])}
        unwatched_call, watched_call = "CA" + "1" * 32, "CA" + "2" * 32
        partials = lambda: s.app.metrics.registry.get_sample_value("chorus_requests_total", {"kind": "partial"}) or 0.0  # noqa: E731
        # Partial requests are counted when submitted, whatever the pace: the unwatched call need
        # not be slow to show that none is made.
        asyncio.run(twilio_call(url, unwatched_call, speech, speed=None))
        hook.wait_for(lambda r: any(e["type"] == "call_ended" for e in r.events_for(unwatched_call)), 60)
        unwatched = partials()
        unwatched_finals = [e for e in hook.events_for(unwatched_call) if e["type"] == "final" and e["text"]]

        async def watched():
            ready, seen = asyncio.Event(), []
            sub = asyncio.create_task(subscribe(s, "*", ready, timeout=60, until=ended(watched_call), out=seen))
            await ready.wait()
            call = asyncio.create_task(twilio_call(url, watched_call, speech, speed=1.0))
            partial_seen = lambda: any(e["type"] == "partial" for e in seen)  # noqa: E731
            await async_wait_until(lambda: call.done() or partial_seen(), timeout=60, what="a partial or the call's end")
            partial_while_speaking = partial_seen() and not call.done()
            run = await call
            events, _ = await sub
            return run, events, partial_while_speaking

        run, events, partial_while_speaking = asyncio.run(watched())
        with_reader = partials()
    assert unwatched_finals, "the unwatched call was not transcribed"
    assert unwatched == 0
    assert run.close_code == 1000
    assert with_reader > 0
    events = [e for e in events if e["call_id"] == watched_call]
    assert any(e["type"] == "partial" for e in events)
    assert partial_while_speaking, "no partial reached the subscriber while the call was on"
    # The webhook (without partials) got the same call less its partials.
    hook.wait_for(lambda r: any(e["type"] == "call_ended" for e in r.events_for(watched_call)), 30)
    assert hook.events_for(watched_call) == [e for e in events if e["type"] != "partial"]


def test_startup_warns_when_a_proxy_may_hide_the_signed_url(whisper_runner, monkeypatch, caplog):
    """With signatures checked (an Auth Token set) and no `twilio.public_url`, a server that
    Twilio can only reach through a proxy or tunnel (bound to loopback, or without TLS) warns
    at startup that the signed URL is rebuilt from the Host header; with `public_url` set, or
    without a token (no signature is checked), it does not."""
    from server.config import load_config
    from server.transport.twilio import public_url_warning

    monkeypatch.setenv("CHORUS_TWILIO_AUTH_TOKEN", "tw-auth-token")
    with caplog.at_level("WARNING", logger="server.app"):
        with ServerThread(make_config(), whisper_runner):
            pass
    warned = [r.getMessage() for r in caplog.records if "twilio.public_url" in r.getMessage()]
    assert len(warned) == 1 and "loopback" in warned[0], warned
    caplog.clear()
    with caplog.at_level("WARNING", logger="server.app"):
        with ServerThread(make_config(**{"twilio.public_url": "wss://asr.example.com/v1/twilio"}), whisper_runner):
            pass
    assert not [r for r in caplog.records if "twilio.public_url" in r.getMessage()]

    def cfg(**sets):
        return load_config(None, {k: str(v) for k, v in sets.items()})

    assert "without TLS" in public_url_warning(cfg(**{"server.host": "0.0.0.0"}), "t")
    assert public_url_warning(cfg(**{"server.host": "0.0.0.0", "server.tls_cert": "c.pem", "server.tls_key": "k.pem"}), "t") is None
    assert public_url_warning(cfg(), None) is None  # no token: no signature to check
    assert public_url_warning(cfg(**{"twilio.enabled": "false"}), "t") is None
