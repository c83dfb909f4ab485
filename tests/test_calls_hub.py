"""The call hub and TrackOutput, without a model or sockets: numbering, history for late
subscribers, fan-out, slow subscribers, several streams of one call, and the call clock."""

from __future__ import annotations

import asyncio
import json

from server.calls.hub import CallHub
from server.calls.track import TrackOutput
from server.config import load_config
from server.metrics import Metrics
from server.runners.base import Word
from tests.callrecorder import CallRecorder


def hub(**sets) -> tuple[CallHub, CallRecorder, Metrics]:
    metrics = Metrics()
    recorder = CallRecorder()
    cfg = load_config(None, {k: str(v) for k, v in sets.items()})
    return CallHub(cfg, metrics, recorder), recorder, metrics


def drain(sub) -> list[dict | None]:
    out = []
    while True:
        try:
            body = sub.get_nowait()
        except asyncio.QueueEmpty:
            return out
        out.append(None if body is None else json.loads(body))


def test_numbering_envelope_and_fan_out():
    async def main():
        h, rec, metrics = hub()
        early = h.subscribe("CA1")
        everything = h.subscribe("*")
        s = h.open("CA1", "twilio", stream_id="MZ1", metadata={"k": "v"}, tracks=("inbound", "outbound"))
        out = TrackOutput(s, "inbound")
        out.on_speech_started(0, 100)
        out.on_partial(0, "hel", 100, 600, {"language": "en"})
        # A model field named like the envelope never overrides it.
        out.on_final(0, "hello", 100, 900, 900, {"language": "en", "call_id": "evil", "type": "evil", "seq": 99},
                     [Word("hello", 120, 800)])
        s.publish("dtmf", "inbound", {"digit": "5"})
        s.end("stop")
        s.end("again")  # ignored
        s.publish("final", "inbound", {"text": "late"})  # ignored after the end
        return h, rec, metrics, drain(early), drain(everything)

    h, rec, metrics, early, everything = asyncio.run(main())
    events = rec.of("CA1")
    assert [e["type"] for e in events] == ["call_started", "speech_started", "partial", "final", "dtmf", "call_ended"]
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert len({e["event_id"] for e in events}) == 6
    assert all(e["call_id"] == "CA1" and e["source"] == "twilio" and e["stream_id"] == "MZ1" for e in events)
    assert events[0]["tracks"] == ["inbound", "outbound"] and events[0]["metadata"] == {"k": "v"}
    final = events[3]
    assert final["type"] == "final" and final["text"] == "hello" and final["seq"] == 4 and final["track"] == "inbound"
    assert final["words"] == [{"word": "hello", "start_ms": 120, "end_ms": 800}] and final["language"] == "en"
    assert events[-1]["reason"] == "stop"
    assert early[:-1] == events and early[-1] is None  # the one-call subscription ends with its call
    assert everything == events  # `*` stays open
    assert metrics.registry.get_sample_value("chorus_call_events_total", {"type": "final"}) == 1
    assert metrics.registry.get_sample_value("chorus_calls_active") == 0


def test_late_subscribers_get_the_history_without_partials():
    async def main():
        h, rec, _ = hub(**{"calls.retain_s": "0.2"})
        s = h.open("CA2", "audiosocket", tracks=("inbound",))
        out = TrackOutput(s, "inbound")
        out.on_speech_started(0, 0)
        out.on_partial(0, "a", 0, 500, {})
        out.on_final(0, "a b", 0, 900, 900, {})
        during = h.subscribe("CA2")
        out.on_final(1, "c", 1000, 1500, 1500, {})
        s.end("hangup")
        after = h.subscribe("CA2")
        await asyncio.sleep(0.3)
        forgotten = h.subscribe("CA2")
        return rec.of("CA2"), drain(during), drain(after), drain(forgotten)

    events, during, after, forgotten = asyncio.run(main())
    lasting = [e for e in events if e["type"] != "partial"]
    assert during[-1] is None and during[:-1] == lasting
    assert after[-1] is None and after[:-1] == lasting
    assert forgotten == []  # after calls.retain_s a subscription waits for a new call of that id


def test_a_subscriber_that_stops_reading_is_cut_loose():
    async def main():
        h, rec, metrics = hub(**{"server.max_outgoing_messages": "5"})
        slow, other = h.subscribe("CA3"), h.subscribe("*")
        s = h.open("CA3", "twilio")
        for i in range(10):
            s.publish("dtmf", "inbound", {"digit": str(i)})
            if i < 3:
                drain(other)
        return h, slow, other, rec, metrics

    h, slow, other, rec, metrics = asyncio.run(main())
    assert slow.overflowed and slow.overflowed_event.is_set()
    assert metrics.registry.get_sample_value("chorus_call_subscribers_dropped_total") == 2  # both stopped reading by then
    assert len(rec.of("CA3", "dtmf")) == 10  # the sink got everything regardless
    assert metrics.registry.get_sample_value("chorus_call_subscribers") == 0


def test_subscriber_limit():
    async def main():
        h, _, _ = hub(**{"calls.max_subscribers": "2"})
        a, b = h.subscribe("x"), h.subscribe("*")
        full = (h.has_room(), h.subscribe("y"))
        h.unsubscribe(a)
        return a, b, full, h.has_room()

    a, b, (room, third), room_after = asyncio.run(main())
    assert a is not None and b is not None and room is False and third is None and room_after is True


def test_two_streams_of_one_call_end_it_once():
    async def main():
        h, rec, metrics = hub()
        sub = h.subscribe("CA4")
        inbound = h.open("CA4", "twilio", stream_id="MZa", tracks=("inbound",))
        outbound = h.open("CA4", "twilio", stream_id="MZb", tracks=("outbound",))
        active = metrics.registry.get_sample_value("chorus_calls_active")
        inbound.end("stop")
        got = drain(sub)
        still_open = bool(got) and got[-1] is not None
        outbound.end("stop")
        return rec.of("CA4"), active, still_open, drain(sub)

    events, active, still_open, rest = asyncio.run(main())
    assert [(e["type"], e.get("stream_id")) for e in events] == [
        ("call_started", "MZa"), ("stream_started", "MZb"), ("stream_ended", "MZa"), ("call_ended", "MZb")]
    assert active == 1 and still_open
    assert rest[-1] is None and rest[-2]["type"] == "call_ended"


def test_close_ends_subscriptions_and_waits_for_the_sink():
    closed = []

    class Sink(CallRecorder):
        async def close(self, timeout: float) -> None:
            closed.append(timeout)

    async def main():
        h = CallHub(load_config(None, {}), Metrics(), Sink())
        sub = h.subscribe("*")
        await h.close(3.0)
        return drain(sub), h.has_room()

    left, room = asyncio.run(main())
    assert left == [None] and closed == [3.0] and room is False


def test_track_clock_offset_and_skips():
    async def main():
        h, rec, _ = hub()
        s = h.open("CA5", "twilio")
        out = TrackOutput(s, "outbound", offset_ms=2000)  # the track's first frame came 2 s into the call
        out.on_final(0, "a", 100, 900, 900, {}, [Word("a", 150, 850)])
        out.skip(1000, 3000)  # from session ms 1000 on, the call is 3 s further ahead
        out.skip(1000, 500)  # at the same point: they add up
        out.skip(4000, 1000)
        # Decided before the skips, published after: keeps its earlier times.
        out.on_final(1, "b", 400, 999, 999, {})
        out.on_final(2, "c", 1000, 3000, 3000, {})
        out.on_final(3, "d", 3500, 4500, 4500, {}, [Word("d", 3600, 4400)])  # words come on the session clock
        return [(e["text"], e["start_ms"], e["end_ms"], e["words"]) for e in rec.of("CA5", "final")]

    finals = asyncio.run(main())
    assert finals[0] == ("a", 2100, 2900, [{"word": "a", "start_ms": 2150, "end_ms": 2850}])
    assert finals[1][1:3] == (2400, 2999)
    assert finals[2][1:3] == (1000 + 5500, 3000 + 5500)
    assert finals[3][1:3] == (3500 + 5500, 4500 + 6500)
    assert finals[3][3] == [{"word": "d", "start_ms": 3600 + 5500, "end_ms": 4400 + 6500}]


def test_track_errors_are_published_and_reported():
    seen = []

    async def main():
        h, rec, _ = hub()
        s = h.open("CA6", "twilio")
        TrackOutput(s, "inbound", on_error=lambda *a: seen.append(a)).on_error("overloaded", "segment 3 ...", False)
        return rec.of("CA6", "error")

    (event,) = asyncio.run(main())
    assert event["code"] == "overloaded" and event["track"] == "inbound" and event["fatal"] is False
    assert seen == [("overloaded", "segment 3 ...", False)]
