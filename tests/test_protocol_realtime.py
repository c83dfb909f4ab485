"""The OpenAI Realtime transcription codec (server/protocol/realtime.py): client events as
OpenAI's API reference shapes them (beta and GA forms), the mapping onto a StreamConfig, the
server events, the segment -> item bookkeeping (``Turns``), and a fuzz of the parser."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from server.protocol import realtime
from server.protocol.realtime import (
    BETA, GA, Append, Clear, Commit, Ids, RealtimeError, RealtimeSettings, SessionUpdate, TurnDetection, Turns,
    apply_update, parse_event, stream_config,
)
from server.stream_config import StreamConfig
from server.wer import normalize_text

LANGS = frozenset({"auto", "en", "de", "zh"})


def update(session: dict, form: str = GA, event_id: str | None = None) -> SessionUpdate:
    return SessionUpdate(event_id, form, session)


def config(s: RealtimeSettings, form: str = GA) -> StreamConfig:
    return stream_config(s, "auto", LANGS, 20000, form)


def err(fn, *args) -> RealtimeError:
    with pytest.raises(RealtimeError) as e:
        fn(*args)
    return e.value


# ---------------------------------------------------------------------- client events


def test_each_client_event():
    pcm = b"\x01\x00\xff\x7f"
    assert parse_event(json.dumps({"type": "input_audio_buffer.append", "event_id": "e1",
                                   "audio": base64.b64encode(pcm).decode()})) == Append("e1", pcm)
    assert parse_event('{"type":"input_audio_buffer.commit"}') == Commit(None)
    assert parse_event('{"type":"input_audio_buffer.clear","event_id":"c"}') == Clear("c")
    beta = parse_event(json.dumps({"type": "transcription_session.update", "session": {"input_audio_format": "pcm16"}}))
    assert beta == SessionUpdate(None, BETA, {"input_audio_format": "pcm16"})
    ga = parse_event(json.dumps({"type": "session.update", "event_id": "u", "session": {"type": "transcription"}}))
    assert ga == SessionUpdate("u", GA, {"type": "transcription"})


@pytest.mark.parametrize("text,code,param", [
    ("not json", "invalid_json", None),
    ("[1, 2]", "invalid_json", None),
    ('{"type": "bogus", "event_id": "e9"}', "unknown_event", "type"),
    ('{"event_id": "e9"}', "unknown_event", "type"),
    ('{"type": "response.create", "event_id": "e9"}', "unsupported_event", "type"),
    ('{"type": "input_audio_buffer.append", "audio": "not base64!", "event_id": "e9"}', "invalid_base64", "audio"),
    ('{"type": "input_audio_buffer.append", "audio": 5, "event_id": "e9"}', "invalid_type", "audio"),
    ('{"type": "session.update", "session": [], "event_id": "e9"}', "invalid_type", "session"),
])
def test_bad_client_events(text, code, param):
    e = err(parse_event, text)
    assert (e.code, e.param, e.kind) == (code, param, "invalid_request_error")
    assert e.event_id == ("e9" if "e9" in text else None)
    out = json.loads(realtime.error("event_x", e))
    assert out == {"type": "error", "event_id": "event_x", "error": {"type": "invalid_request_error", "code": code,
                   "message": e.message, "param": param, "event_id": e.event_id}}


# ---------------------------------------------------------------------- settings


def test_defaults_are_24khz_pcm16_with_server_vad():
    s = RealtimeSettings()
    cfg = config(s)
    assert (cfg.sample_rate, cfg.encoding, cfg.endpointing_ms, cfg.interim_results, cfg.language) == \
        (24000, "pcm_s16le", 500, True, "auto")


def test_beta_update():
    s = apply_update(RealtimeSettings(), update({
        "input_audio_format": "g711_ulaw",
        "input_audio_transcription": {"model": "whisper-1", "language": "EN", "prompt": "names"},
        "turn_detection": {"type": "server_vad", "threshold": 0.7, "prefix_padding_ms": 200, "silence_duration_ms": 800},
        "input_audio_noise_reduction": {"type": "far_field"},
        "some_future_field": {"x": 1},  # unknown fields are ignored
    }, BETA))
    assert s == RealtimeSettings("g711_ulaw", "whisper-1", "en", "names", TurnDetection(800, 0.7), "far_field")
    cfg = config(s, BETA)
    assert (cfg.sample_rate, cfg.encoding, cfg.endpointing_ms, cfg.language) == (8000, "mulaw", 800, "en")
    # Nested objects are merged: a later update of the language keeps the model.
    s2 = apply_update(s, update({"input_audio_transcription": {"language": "de"}}, BETA))
    assert (s2.model, s2.language, s2.turn_detection) == ("whisper-1", "de", s.turn_detection)


def test_ga_update_and_manual_commits():
    s = apply_update(RealtimeSettings(), update({"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcma"}, "transcription": {"model": "gpt-4o-mini-transcribe"}, "turn_detection": None}},
        "include": ["item.input_audio_transcription.logprobs"]}))
    assert (s.audio_format, s.model, s.turn_detection, s.include) == \
        ("g711_alaw", "gpt-4o-mini-transcribe", None, ("item.input_audio_transcription.logprobs",))
    cfg = config(s)
    # Manual commits: the endpointer only splits a turn (at the longest silence allowed), no partials.
    assert (cfg.sample_rate, cfg.encoding, cfg.endpointing_ms, cfg.interim_results) == (8000, "alaw", 5000, False)
    back = apply_update(s, update({"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": 24000}, "turn_detection": {"type": "semantic_vad", "eagerness": "low"}}}}))
    # semantic_vad is served as server_vad with its defaults.
    assert (back.audio_format, back.turn_detection) == ("pcm16", TurnDetection())


def test_silence_duration_is_clamped_to_the_native_bounds():
    def silence(v):
        return apply_update(RealtimeSettings(), update({"turn_detection": {"silence_duration_ms": v}}, BETA)).turn_detection
    assert silence(20).silence_duration_ms == 100
    assert silence(60_000).silence_duration_ms == 5000
    assert silence(650.7).silence_duration_ms == 650


@pytest.mark.parametrize("session,form,code,param", [
    ({"input_audio_format": "opus"}, BETA, "unsupported_format", "session.input_audio_format"),
    ({"input_audio_format": ["pcm16"]}, BETA, "unsupported_format", "session.input_audio_format"),
    ({"type": "transcription", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}}, GA,
     "unsupported_format", "session.audio.input.format.rate"),
    ({"type": "transcription", "audio": {"input": {"format": {"type": "audio/opus"}}}}, GA,
     "unsupported_format", "session.audio.input.format.type"),
    ({"type": "realtime"}, GA, "unsupported_session_type", "session.type"),
    ({"turn_detection": {"type": "push_to_talk"}}, BETA, "invalid_value", "session.turn_detection.type"),
    ({"turn_detection": {"threshold": 2}}, BETA, "invalid_value", "session.turn_detection.threshold"),
    ({"turn_detection": {"silence_duration_ms": "long"}}, BETA, "invalid_value",
     "session.turn_detection.silence_duration_ms"),
    ({"input_audio_transcription": {"language": 5}}, BETA, "invalid_type", "session.input_audio_transcription.language"),
    ({"input_audio_transcription": "whisper-1"}, BETA, "invalid_type", "session.input_audio_transcription"),
    ({"type": "transcription", "audio": []}, GA, "invalid_type", "session.audio"),
])
def test_bad_updates(session, form, code, param):
    e = err(apply_update, RealtimeSettings(), update(session, form, "u1"))
    assert (e.code, e.param, e.event_id) == (code, param, "u1"), e.message


@pytest.mark.parametrize("form,param", [(BETA, "session.input_audio_transcription.language"),
                                        (GA, "session.audio.input.transcription.language")])
def test_a_language_the_model_lacks_is_refused_with_the_list(form, param):
    s = RealtimeSettings(language="xx")
    e = err(config, s, form)
    assert (e.code, e.param) == ("unsupported_language", param)
    assert "auto, de, en, zh" in e.message


# ---------------------------------------------------------------------- server events


@pytest.mark.parametrize("form", [BETA, GA])
def test_session_objects(form):
    s = RealtimeSettings(audio_format="g711_ulaw", model="whisper-1", language="en")
    ev = json.loads(realtime.session_event("event_1", "created", s, "sess_1", form, 300))
    assert ev["type"] == ("transcription_session.created" if form == BETA else "session.created")
    session = ev["session"]
    assert session["id"] == "sess_1" and session["object"] == "realtime.transcription_session"
    vad = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500}
    if form == BETA:
        assert session["input_audio_format"] == "g711_ulaw" and session["turn_detection"] == vad
        assert session["input_audio_transcription"] == {"model": "whisper-1", "language": "en", "prompt": ""}
    else:
        audio_in = session["audio"]["input"]
        assert session["type"] == "transcription" and audio_in["format"] == {"type": "audio/pcmu"}
        assert audio_in["turn_detection"] == vad and audio_in["transcription"]["language"] == "en"
    pcm = json.loads(realtime.session_event("e", "updated", RealtimeSettings(turn_detection=None), "s", GA, 300))
    assert pcm["type"] == "session.updated"
    assert pcm["session"]["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert pcm["session"]["audio"]["input"]["turn_detection"] is None


def test_ids_are_unique_across_kinds_and_connections():
    a, b = Ids("aaaaaaaaaaaa"), Ids("bbbbbbbbbbbb")
    seen = {a.next("event") for _ in range(300)} | {a.next("item") for _ in range(300)} | \
        {b.next("event") for _ in range(300)}
    assert len(seen) == 900


# ---------------------------------------------------------------------- turns


def events(out: list[str]) -> list[dict]:
    return [json.loads(e) for e in out]


def test_server_vad_turns():
    t = Turns(Ids("p"), vad=True)
    started = events(t.speech_started((0, 0), 120))
    assert [e["type"] for e in started] == ["input_audio_buffer.speech_started"]
    item = started[0]["item_id"]
    assert started[0]["audio_start_ms"] == 120 and t.speaking
    # Two partials must agree before a word is sent; the last, unstable word waits.
    assert t.partial((0, 0), "And so") == []
    d1 = events(t.partial((0, 0), "And so my fellow"))
    assert [(e["item_id"], e["delta"]) for e in d1] == [(item, "And so")]
    d2 = events(t.partial((0, 0), "And so my fellow Americans,"))
    assert [e["delta"] for e in d2] == [" my fellow"]
    assert t.poll((0, 0), 2000) == []  # still open
    cut = events(t.poll(None, 2500))
    assert [e["type"] for e in cut] == ["input_audio_buffer.speech_stopped", "input_audio_buffer.committed"]
    assert cut[0]["audio_end_ms"] == 2500 and cut[1] == {**cut[1], "item_id": item, "previous_item_id": None}
    assert not t.speaking
    done = events(t.final((0, 0), "And so my fellow Americans, ask not.", 2.2, 2500))
    assert [e["type"].rsplit(".", 1)[-1] for e in done] == ["delta", "completed"]
    assert done[0]["delta"] == " Americans, ask not."
    assert done[1]["transcript"] == "And so my fellow Americans, ask not." and done[1]["usage"]["seconds"] == 2.2
    assert "".join(e["delta"] for e in d1 + d2 + done[:1]) == done[1]["transcript"]
    # The next turn's committed names this one as its predecessor.
    nxt = events(t.speech_started((0, 1), 3000) + t.final((0, 1), "Ask.", 0.5, 3600))
    assert [e["type"].rsplit(".", 1)[-1] for e in nxt] == \
        ["speech_started", "speech_stopped", "committed", "delta", "completed"]
    assert nxt[2]["previous_item_id"] == item and nxt[1]["audio_end_ms"] == 3600


def test_a_new_turn_ends_the_one_before_it():
    t = Turns(Ids("p"), vad=True)
    t.speech_started((0, 0), 0)
    out = events(t.speech_started((0, 1), 900))
    assert [e["type"] for e in out] == ["input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
                                        "input_audio_buffer.speech_started"]
    assert out[0]["item_id"] == out[1]["item_id"] != out[2]["item_id"]


def test_manual_turns_hold_deltas_until_the_commit():
    t = Turns(Ids("p"), vad=False)
    assert t.speech_started((0, 0), 100) == []  # no VAD events without server VAD
    assert t.partial((0, 0), "he was") == [] and t.partial((0, 0), "he was not") == []
    assert t.final((0, 0), "He was not", 1.0, 1500) == []  # uncommitted: held
    t.speech_started((0, 1), 7000)  # the endpointer split the turn at a long pause
    out = events(t.commit())
    item = out[0]["item_id"]
    # The held deltas (the agreed words of the partials, then the final's rest) follow the commit.
    assert [e["type"].rsplit(".", 1)[-1] for e in out] == ["committed", "delta", "delta"]
    assert [(e["item_id"], e["delta"]) for e in out[1:]] == [(item, "he was"), (item, " not")]
    out = events(t.final((0, 1), "an ill disposed man.", 1.5, 9000))
    assert [e["type"].rsplit(".", 1)[-1] for e in out] == ["delta", "completed"]
    assert out[0]["delta"] == " an ill disposed man."
    assert out[1]["transcript"] == "He was not an ill disposed man." and out[1]["usage"]["seconds"] == 2.5
    # A commit of audio without speech is an item with an empty transcript.
    empty = events(t.commit())
    assert [e["type"].rsplit(".", 1)[-1] for e in empty] == ["committed", "completed"]
    assert empty[0]["previous_item_id"] == item and empty[1]["transcript"] == ""


def test_clear_drops_the_uncommitted_turn():
    t = Turns(Ids("p"), vad=False)
    t.speech_started((0, 0), 0)
    assert [e["type"] for e in events(t.clear())] == ["input_audio_buffer.cleared"]
    assert t.final((0, 0), "never said", 1.0, 900) == []
    t.speech_started((0, 1), 2000)
    out = events(t.commit() + t.final((0, 1), "kept", 1.0, 3000))
    assert [e["transcript"] for e in out if "transcript" in e] == ["kept"]
    v = Turns(Ids("q"), vad=True)
    v.speech_started((0, 0), 0)
    v.partial((0, 0), "a b"), v.partial((0, 0), "a b c")
    v.clear()
    assert not v.speaking
    assert v.partial((0, 0), "a b c d") == [] and v.poll(None, 500) == [] and v.final((0, 0), "a b c d", 1, 500) == []


def test_a_failed_segment_fails_its_item():
    t = Turns(Ids("p"), vad=True)
    t.speech_started((0, 0), 0)
    out = events(t.final((0, 0), "", 1.0, 900, ("overloaded", "segment 0 could not be recognised: busy")))
    assert out[-1]["type"] == "conversation.item.input_audio_transcription.failed"
    assert out[-1]["error"] == {"type": "server_error", "code": "overloaded",
                                "message": "segment 0 could not be recognised: busy", "param": None}


def test_switching_to_server_vad_commits_a_manual_turn_and_flush_commits_at_the_end():
    t = Turns(Ids("p"), vad=False)
    t.speech_started((0, 0), 0)
    t.final((0, 0), "one", 1.0, 900)
    out = events(t.set_vad(True))
    assert [e["type"].rsplit(".", 1)[-1] for e in out] == ["committed", "delta", "completed"]
    m = Turns(Ids("q"), vad=False)
    assert m.flush() == []  # nothing said: nothing to commit
    m.speech_started((0, 0), 0)
    m.final((0, 0), "two", 1.0, 900)
    assert events(m.flush())[-1]["transcript"] == "two"


def test_deltas_spell_the_final_on_a_realistic_sequence():
    """Whisper's partials of a growing segment revise their last words; the deltas only ever
    append, and they spell (up to punctuation and case) the final."""
    partials = ["And so", "And so my fellow", "And so my fellow Americans.", "And so my fellow Americans, ask",
                "And so my fellow Americans, ask not what your", "And so my fellow Americans, ask not what your country"]
    final = "And so my fellow Americans, ask not what your country can do for you."
    t = Turns(Ids("p"), vad=True)
    t.speech_started((0, 0), 0)
    out = []
    for p in partials:
        out += t.partial((0, 0), p)
    out += t.final((0, 0), final, 5.0, 5000)
    got = events(out)
    deltas = "".join(e["delta"] for e in got if e["type"].endswith(".delta"))
    assert len([e for e in got if e["type"].endswith(".delta")]) >= 4
    assert normalize_text(deltas) == normalize_text(final)


# ---------------------------------------------------------------------- fuzz

FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CODES = {"invalid_json", "unknown_event", "unsupported_event", "invalid_base64", "invalid_type", "invalid_value",
         "unsupported_format", "unsupported_session_type", "unsupported_language"}
ALL_CHARS = st.characters(codec=None, exclude_categories=())
text = st.text(ALL_CHARS, max_size=30)
scalars = st.none() | st.booleans() | st.integers() | st.integers(-10 ** 400, 10 ** 400) | st.floats() | text
values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(text, c, max_size=4), max_leaves=12)
plausible_value = st.sampled_from(["pcm16", "g711_ulaw", "audio/pcm", "audio/pcmu", "server_vad", "semantic_vad",
                                   "transcription", "en", "xx", 24000, 16000, 500, -1, 0.5, None, "", "EN "]) | values
nested_keys = st.sampled_from(["input_audio_format", "input_audio_transcription", "turn_detection", "model", "language",
                               "prompt", "type", "audio", "input", "format", "rate", "transcription", "threshold",
                               "silence_duration_ms", "prefix_padding_ms", "include", "noise_reduction",
                               "input_audio_noise_reduction"]) | text
sessions = st.recursive(plausible_value, lambda c: st.dictionaries(nested_keys, c, max_size=5), max_leaves=20)
event_types = st.sampled_from(list(realtime.CLIENT_EVENTS) + ["response.create", "bogus", ""]) | values
b64 = st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()) | text
client_events = (
    st.fixed_dictionaries({"type": event_types}, optional={"event_id": values | text, "session": sessions,
                                                            "audio": b64 | values}).map(json.dumps)
    | values.map(json.dumps) | st.text(ALL_CHARS, max_size=200)
)


def check_error(e: RealtimeError) -> None:
    assert e.code in CODES, e.code
    assert 0 < len(e.message) <= 600, e.message
    assert e.param is None or (isinstance(e.param, str) and len(e.param) < 80)
    out = realtime.error("event_1", e)
    out.encode("utf-8")  # no lone surrogates: it can be sent
    assert json.loads(out)["error"]["code"] == e.code


@FUZZ
@given(client_events, st.sampled_from([None, LANGS]))
def test_any_client_event_parses_applies_or_errs(text_in, languages):
    try:
        ev = parse_event(text_in)
    except RealtimeError as e:
        check_error(e)
        return
    assert isinstance(ev, (SessionUpdate, Append, Commit, Clear))
    assert ev.event_id is None or (isinstance(ev.event_id, str) and len(ev.event_id) <= 128)
    if not isinstance(ev, SessionUpdate):
        return
    try:
        s = apply_update(RealtimeSettings(), ev)
        cfg = stream_config(s, "auto", languages, 20000, ev.form)
    except RealtimeError as e:
        check_error(e)
        return
    assert (cfg.sample_rate, cfg.encoding) in {(24000, "pcm_s16le"), (8000, "mulaw"), (8000, "alaw")}
    assert 100 <= cfg.endpointing_ms <= 5000
    assert languages is None or cfg.language in languages
    for form in (BETA, GA):
        out = realtime.session_event("e", "updated", s, "sess", form, 300)
        out.encode("utf-8")
        assert len(out) < 10_000


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(["start", "partial", "poll", "final", "commit", "clear", "vad"]),
                          st.integers(0, 3), st.text(" abc.,", max_size=12)), max_size=40), st.booleans())
def test_turns_never_repeat_an_item_and_complete_each_once(ops, vad):
    """Any order of session callbacks and client controls: every item is committed at most once
    and completed (or failed) at most once, after its commit; deltas only for announced items."""
    t = Turns(Ids("f"), vad=vad)
    started: set = set()
    ended: set = set()
    out: list[str] = []
    for op, seg, words in ops:
        key = (0, seg)
        if op == "start" and seg not in started:
            started.add(seg)
            out += t.speech_started(key, seg * 1000)
        elif op == "partial" and seg in started - ended:
            out += t.partial(key, words)
        elif op == "poll":
            out += t.poll(None if seg == 0 else key, seg * 1000)
        elif op == "final" and seg in started - ended:
            ended.add(seg)
            out += t.final(key, words.strip(), 1.0, seg * 1000 + 500)
        elif op == "commit" and not t.vad:
            out += t.commit()
        elif op == "clear":
            out += t.clear()
        elif op == "vad":
            out += t.set_vad(not t.vad)
    committed: list[str] = []
    finished: set = set()
    announced: set = set()
    for e in events(out):
        kind, item = e["type"], e.get("item_id")
        if kind == "input_audio_buffer.speech_started":
            announced.add(item)
        elif kind == "input_audio_buffer.committed":
            assert item not in committed
            assert e["previous_item_id"] == (committed[-1] if committed else None)
            committed.append(item)
            announced.add(item)
        elif kind.endswith(".delta"):
            assert item in announced and item not in finished and e["delta"]
        elif kind.endswith((".completed", ".failed")):
            assert item in committed and item not in finished
            finished.add(item)
