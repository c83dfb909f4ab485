"""Asterisk AudioSocket calls, end to end: real TCP sockets, the real Whisper model.

The sender (tests/audiosocketclient.py) builds every frame itself from Asterisk's protocol
description. Calls stream real speech at 8 kHz (and 16 kHz), faster than real time (no claim
here is about time; AudioSocket's clock is the audio itself); what the application would get
(the call hub's events, exactly as the webhook receives them) is compared with the same clips at
16 kHz over the native protocol.
"""

from __future__ import annotations

import asyncio
import json
import socket
import uuid

import numpy as np
import pytest
from websockets.asyncio.client import connect

from server.wer import word_error_rate
from tests.audiosocketclient import audiosocket_call, frame
from tests.callrecorder import CallRecorder
from tests.ports import free_port
from tests.serverharness import DATA, TRANSCRIPTS, ServerThread, clip_wer, make_config, read_clip
from tests.telephony import clips_8k, final_text, pooled_reference, pooled_wer, reference_bound, reference_wer
from tests.waiting import async_wait_until

JFK = DATA / "jfk.wav"
SHORT = DATA / "sense_and_sensibility_01_austen_64kb-0880.wav"
CALL_A = [JFK, DATA / "sense_and_sensibility_01_austen_64kb-0870.wav", DATA / "sense_and_sensibility_01_austen_64kb-0920.wav"]
CALL_B = [SHORT, DATA / "sense_and_sensibility_01_austen_64kb-0890.wav", DATA / "sense_and_sensibility_01_austen_64kb-0930.wav"]


def server(runner, **overrides) -> ServerThread:
    return ServerThread(make_config(**{"audiosocket.port": free_port(), **overrides}), runner)


def check_events(events: list[dict], call_id: str, reason: str) -> None:
    assert events[0]["type"] == "call_started" and events[0]["tracks"] == ["inbound"], events[:1]
    assert events[-1]["type"] == "call_ended" and events[-1]["reason"] == reason, events[-1]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    for e in events:
        assert e["call_id"] == call_id and e["source"] == "audiosocket"
    for f in (e for e in events if e["type"] == "final"):
        assert f["track"] == "inbound" and 0 <= f["start_ms"] < f["end_ms"] and isinstance(f["words"], list), f


def test_two_calls_at_8k_match_16k(whisper_runner):
    """Two concurrent 8 kHz calls (one split into 7-byte TCP writes): each call's transcript is
    within 5 points of WER of the same clips at 16 kHz; the call id is the UUID in canonical
    form; DTMF comes through; a hangup ends the call after its last final."""
    with server(whisper_runner) as s:
        recorder = s.app.calls.sink = CallRecorder()
        ref_a, ref_b = pooled_reference(s, CALL_A), pooled_reference(s, CALL_B)
        ua, ub = uuid.UUID("0F1E2D3C-4B5A-6978-8796-A5B4C3D2E1F0"), uuid.uuid4()

        async def main():
            return await asyncio.gather(
                audiosocket_call(s.app.audiosocket_port, ua, clips_8k(CALL_A), speed=None, dtmf_at_ms={1000: "5", 1500: "#"}),
                audiosocket_call(s.app.audiosocket_port, ub, clips_8k(CALL_B, lead_s=1.0), speed=None, split=7),
            )

        run_a, run_b = asyncio.run(main())
        a = recorder.wait_for("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", "call_ended")
        b = recorder.wait_for(str(ub), "call_ended")
    assert run_a.closed_by_server and run_a.received == b""  # Chorus sends nothing on a normal hangup
    check_events(a, "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0", "hangup")
    check_events(b, str(ub), "hangup")
    assert [e["digit"] for e in a if e["type"] == "dtmf"] == ["5", "#"]
    w_a, w_b = pooled_wer(CALL_A, final_text(a)), pooled_wer(CALL_B, final_text(b))
    assert w_a <= ref_a + 0.05 and w_b <= ref_b + 0.05, (w_a, ref_a, w_b, ref_b, final_text(a), final_text(b))
    assert w_a < 0.15 and w_b < 0.15


def test_wideband_kind_and_socket_close_without_hangup(whisper_runner):
    """A 16 kHz call (kind 0x12) whose socket just closes: still recognised, reason hangup."""
    with server(whisper_runner) as s:
        recorder = s.app.calls.sink = CallRecorder()
        u = uuid.uuid4()
        clip = np.concatenate([read_clip(SHORT), np.zeros(8000, dtype=np.float32)])
        asyncio.run(audiosocket_call(s.app.audiosocket_port, u, clip, rate=16000, speed=None, hangup=False, read_timeout=0.5))
        events = recorder.wait_for(str(u), "call_ended")
        bound = reference_wer(s, SHORT) + 0.05  # 16 kHz: the reference's own audio
    check_events(events, str(u), "hangup")
    assert clip_wer(SHORT, final_text(events)) <= bound, final_text(events)


def test_malformed_frames_end_only_their_own_call(whisper_runner):
    """While a good call streams, other connections send what Asterisk never would: each gets
    the hangup frame and, once its call is known, an error event and call_ended
    protocol_error (with the finals of what it said first); the good call is untouched."""
    with server(whisper_runner) as s:
        recorder = s.app.calls.sink = CallRecorder()
        port = s.app.audiosocket_port
        good = uuid.uuid4()
        bad = {name: uuid.uuid4() for name in ("kind", "odd", "dtmf", "second_uuid", "rate_change")}
        speech = clips_8k([SHORT])
        ref_good, ref_kind = pooled_reference(s, CALL_A[:2]), reference_bound(s, SHORT)

        async def main():
            # The good call pauses 2 s into its audio (connected, its segment open) until every
            # bad connection has been dealt with, then goes on.
            resume = asyncio.Event()
            good_call = asyncio.create_task(audiosocket_call(port, good, clips_8k(CALL_A[:2]), speed=None,
                                                             pause=(2000, resume)))
            await async_wait_until(lambda: recorder.of(str(good), "call_started"), what="the good call started")
            runs = await asyncio.gather(
                audiosocket_call(port, bad["kind"], speech, speed=None, raw_after=frame(0x42, b"xx"), hangup=False),
                audiosocket_call(port, bad["odd"], None, raw_after=frame(0x10, b"\x00" * 161), hangup=False),
                audiosocket_call(port, bad["dtmf"], None, raw_after=frame(0x03, b"Z"), hangup=False),
                audiosocket_call(port, bad["second_uuid"], None, raw_after=frame(0x01, uuid.uuid4().bytes), hangup=False),
                audiosocket_call(port, bad["rate_change"], None,
                                 raw_after=frame(0x10, b"\x00" * 320) + frame(0x12, b"\x00" * 640), hangup=False),
                audiosocket_call(port, None, None, raw_before=frame(0x10, b"\x00" * 320), hangup=False),  # audio first
                audiosocket_call(port, None, None, raw_before=frame(0x01, b"\x01" * 15), hangup=False),  # short UUID
                audiosocket_call(port, None, None, raw_before=b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", hangup=False),
            )
            during = not good_call.done()
            resume.set()
            return await good_call, runs, during

        good_run, runs, good_was_on = asyncio.run(main())
        good_events = recorder.wait_for(str(good), "call_ended")
        bad_events = {name: recorder.wait_for(str(u), "call_ended") for name, u in bad.items()}
        healthy = s.http("/healthz")[0]
        errors = s.metric("chorus_errors_total", code="bad_frame")
    for run in runs:
        assert run.closed_by_server and run.received == frame(0x00), run
    for name, events in bad_events.items():
        errors_of_call = [e for e in events if e["type"] == "error"]
        assert events[-1]["reason"] == "protocol_error", (name, [e["type"] for e in events])
        assert [(e["code"], e["fatal"]) for e in errors_of_call] == [("bad_frame", True)], (name, errors_of_call)
    # What it said before the bad frame still counts.
    assert clip_wer(SHORT, final_text(bad_events["kind"])) <= ref_kind, final_text(bad_events["kind"])
    assert errors == 8
    assert good_was_on  # every bad connection came and went while the good call was connected
    check_events(good_events, str(good), "hangup")
    assert good_run.received == b""
    w_good = pooled_wer(CALL_A[:2], final_text(good_events))
    assert w_good <= ref_good + 0.05 and w_good < 0.15, (w_good, ref_good, final_text(good_events))
    assert healthy == 200


def test_refused_when_full_and_drained_on_shutdown(whisper_runner):
    """At `server.max_sessions` a new call gets the hangup frame (and is counted); a call still
    streaming when the server stops gets its finals and call_ended `shutdown`."""
    with server(whisper_runner, **{"server.max_sessions": "1"}) as s:
        recorder = s.app.calls.sink = CallRecorder()
        port = s.app.audiosocket_port
        u = uuid.uuid4()
        received = lambda: s.app.metrics.registry.get_sample_value("chorus_audio_seconds_total") or 0.0  # noqa: E731

        async def follow(subscribed: asyncio.Event) -> tuple[list[dict], int | None]:
            seen = []
            async with connect(f"ws://127.0.0.1:{s.app.port}/v1/calls?call_id=*") as ws:
                async for msg in ws:
                    seen.append(json.loads(msg))
                    subscribed.set()  # `*` has no history: the call must start after this
                return seen, ws.close_code

        async def main():
            subscribed = asyncio.Event()
            watcher = asyncio.create_task(follow(subscribed))
            await asyncio.wait_for(subscribed.wait(), 10)
            # The call sends the first 5 s of JFK's 11 s (mid-sentence) and stays connected.
            call = asyncio.create_task(audiosocket_call(port, u, clips_8k(CALL_A[:2]), speed=None, hangup=False,
                                                        pause=(5000, asyncio.Event())))
            await async_wait_until(lambda: recorder.of(str(u), "call_started"), what="the call started")
            refused = await audiosocket_call(port, uuid.uuid4(), None, hangup=False, read_timeout=5)
            # (The streaming resampler holds back a few ms of what it was given.)
            await async_wait_until(lambda: received() >= 4.9, timeout=30, what="5 s of the call's audio received")
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(s.app.stop(), s.loop))
            return refused, await call, await watcher

        refused, run, (watched, watch_code) = asyncio.run(main())
        events = recorder.wait_for(str(u), "call_ended")
        rejected = s.app.metrics.registry.get_sample_value("chorus_sessions_rejected_total", {"reason": "full"})
    assert refused.closed_by_server and refused.received == frame(0x00)
    assert rejected == 1
    assert run.closed_by_server
    check_events(events, str(u), "shutdown")
    # A `*` subscriber got the whole call, its end included, and then the server's goodbye (1001).
    assert watch_code == 1001
    assert [e for e in watched[1:] if e.get("call_id") == str(u)] == events
    # 5 s of JFK's 11 s were sent before the stop: the segment open then was finalised, so its
    # words are there, and they are the start of the clip's transcript (the last word or two may
    # be cut mid-word by the stop).
    said = final_text(events).split()
    assert len(said) >= 6, said
    heard = " ".join(TRANSCRIPTS[JFK.name].split()[:len(said) - 2])
    assert word_error_rate([heard], [" ".join(said[:-2])]) < 0.4, (heard, said)


def test_cli_flags():
    from server.cli import _config, build_parser
    from server.config import ConfigError

    args = build_parser().parse_args(["serve", "--audiosocket-port", "9092", "--webhook-url", "https://app.example.com/hook"])
    cfg = _config(args)
    assert cfg.audiosocket.port == 9092 and cfg.webhook.url == "https://app.example.com/hook"
    assert _config(build_parser().parse_args(["serve"])).audiosocket.port == 0  # off by default
    with pytest.raises(ConfigError, match="webhook.url"):
        _config(build_parser().parse_args(["serve", "--webhook-url", "ftp://x"]))


def test_a_second_connection_for_a_live_uuid_is_refused(whisper_runner):
    """A peer that learned a live call's UUID connects with it, speaks and sends DTMF: it gets the
    hangup frame, and the call (which keeps streaming) has none of its events; the listener binds
    `audiosocket.host`, its own address, not `server.host`."""
    with server(whisper_runner, **{"audiosocket.host": "127.0.0.2"}) as s:
        recorder = s.app.calls.sink = CallRecorder()
        port = s.app.audiosocket_port
        assert s.app._audiosocket_server.sockets[0].getsockname()[0] == "127.0.0.2"
        with pytest.raises(OSError):  # nothing listens on server.host's address for AudioSocket
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        u = uuid.uuid4()

        async def main():
            # The call pauses 1 s into its audio (mid-word, connected) while the intruder tries.
            resume = asyncio.Event()
            first = asyncio.create_task(audiosocket_call(port, u, clips_8k([SHORT]), speed=None, host="127.0.0.2",
                                                         pause=(1000, resume)))
            await async_wait_until(lambda: recorder.of(str(u), "call_started"), what="the call started")
            intruder = await audiosocket_call(port, u, clips_8k([JFK])[:16000], speed=None, dtmf_at_ms={200: "9"},
                                              host="127.0.0.2", read_timeout=10)
            resume.set()
            return await first, intruder

        first, intruder = asyncio.run(main())
        events = recorder.wait_for(str(u), "call_ended")
        refused = s.app.metrics.registry.get_sample_value("chorus_sessions_rejected_total", {"reason": "duplicate_call"})
        # The UUID is free again once its call has ended: Asterisk may reuse a channel's UUID.
        again = uuid.UUID(str(u))
        asyncio.run(audiosocket_call(port, again, np.zeros(1600, np.float32), speed=None, host="127.0.0.2"))
        later = recorder.wait_for(str(u), "call_ended")
        bound = reference_bound(s, SHORT)
    assert intruder.closed_by_server and intruder.received == frame(0x00)
    assert refused == 1
    assert first.closed_by_server and first.received == b""
    check_events(events, str(u), "hangup")
    assert [e["type"] for e in events].count("call_started") == 1
    assert not [e for e in events if e["type"] in ("dtmf", "stream_ended", "error")], events
    assert clip_wer(SHORT, final_text(events)) <= bound, final_text(events)
    assert [e["type"] for e in later].count("call_started") == 2


def test_allowed_peers_config():
    from server.config import ConfigError

    cfg = make_config()
    assert cfg.audiosocket.host == "127.0.0.1"
    assert cfg.audiosocket.allowed_peers == ("127.0.0.0/8", "::1/128")
    assert make_config(**{"audiosocket.allowed_peers": "[10.0.0.5, 10.1.0.0/16]"}).audiosocket.allowed_peers == (
        "10.0.0.5", "10.1.0.0/16")
    for bad in ("[asterisk.example]", "[10.0.0.0/33]"):
        with pytest.raises(ConfigError, match=r"audiosocket.allowed_peers\[0\]"):
            make_config(**{"audiosocket.allowed_peers": bad})


def test_peer_allowed():
    from server.transport.audiosocket import allowed_networks, peer_allowed

    nets = allowed_networks(("10.0.0.5", "192.168.1.0/24", "::1/128"))
    for ok in ("10.0.0.5", "192.168.1.77", "::1", "::ffff:10.0.0.5"):
        assert peer_allowed(ok, nets), ok
    for no in ("10.0.0.6", "192.168.2.1", "127.0.0.1", "::2", "?", ""):
        assert not peer_allowed(no, nets), no
    assert peer_allowed("127.0.0.9", allowed_networks(make_config().audiosocket.allowed_peers))
