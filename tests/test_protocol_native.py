"""The native /v1/stream codec: parsing, validation with error codes, and built messages."""

from __future__ import annotations

import json

import pytest

from server.audio.codecs import ENCODINGS
from server.audio.resample import STANDARD_RATES
from server.runners.base import Word
from server.protocol import native
from server.protocol.native import (
    CONFIG_KEYS, PROTOCOL_VERSION, Finalize, KeepAlive, ProtocolError, Start, Stop, StreamConfig,
    build_config,
    call_options, parse_query, parse_text,
)


def code_of(fn, *args, **kwargs) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        fn(*args, **kwargs)
    return info.value


# ---------------------------------------------------------------------- parse_text


@pytest.mark.parametrize("text,expected", [
    ('{"type":"finalize"}', Finalize()), ('{"type":"keepalive"}', KeepAlive()), ('{"type":"stop"}', Stop()),
    ('{"type":"stop","reason":"bye"}', Stop()),  # extra keys on controls are ignored
])
def test_controls(text, expected):
    assert parse_text(text) == expected


def test_start_keeps_the_given_fields_only():
    msg = parse_text('{"type":"start","sample_rate":8000,"encoding":"mulaw","interim_results":false,'
                     '"endpointing_ms":null}')
    assert msg == Start({"sample_rate": 8000, "encoding": "mulaw", "interim_results": False, "endpointing_ms": None})
    assert parse_text('{"type":"start"}') == Start({})


@pytest.mark.parametrize("text", ["not json", "{", "", '{"type":"start",}'])
def test_bad_json(text):
    e = code_of(parse_text, text)
    assert e.code == "bad_json" and not e.fatal


@pytest.mark.parametrize("text", ["[1,2]", '"start"', "42", "null"])
def test_json_that_is_not_an_object(text):
    assert code_of(parse_text, text).code == "bad_json"


@pytest.mark.parametrize("text", ['{"type":"begin"}', '{}', '{"type":7}', '{"type":null}', '{"kind":"stop"}'])
def test_unknown_type(text):
    e = code_of(parse_text, text)
    assert e.code == "unknown_type" and not e.fatal and "start, finalize, keepalive or stop" in e.message


@pytest.mark.parametrize("field,value", [
    ("sample_rate", '"16000"'), ("sample_rate", "16000.5"), ("sample_rate", "true"), ("encoding", "1"),
    ("language", "null"), ("interim_results", '"yes"'), ("interim_results", "1"),
    ("endpointing_ms", '"500"'), ("max_segment_ms", "[1]"),
])
def test_start_with_wrong_json_types(field, value):
    e = code_of(parse_text, f'{{"type":"start","{field}":{value}}}')
    assert e.code == "bad_config" and e.fatal and field in e.message


def test_start_with_unknown_field():
    e = code_of(parse_text, '{"type":"start","sampel_rate":16000}')
    assert e.code == "bad_config" and "sampel_rate" in e.message and "sample_rate" in e.message


# ---------------------------------------------------------------------- parse_query + build_config


def test_query_strings_round_trip():
    q = {"sample_rate": "8000", "encoding": "alaw", "language": "EN", "interim_results": "false",
         "partial_words": "1", "endpointing_ms": "300", "max_segment_ms": "15000", "token": "secret",
         "channels": "2", "call_id": "b2a7-call.1"}
    fields = parse_query(q)
    assert "token" not in fields and set(fields) == set(CONFIG_KEYS)
    assert build_config(fields) == StreamConfig(sample_rate=8000, encoding="alaw", language="en", interim_results=False,
                                                partial_words=True, endpointing_ms=300, max_segment_ms=15000)
    assert call_options(fields) == (2, "b2a7-call.1")


def test_call_options():
    assert call_options({}) == (1, None)
    assert call_options({"channels": 1, "call_id": "CA0123"}) == (1, "CA0123")
    for bad in ({"channels": "3"}, {"channels": 0}, {"call_id": ""}, {"call_id": "a b"}, {"call_id": "x" * 129},
                {"call_id": 5}):
        e = code_of(call_options, bad)
        assert e.code == "bad_config" and e.fatal, bad
        # build_config checks them too, so a bad call_id in a start is refused with the rest.
        assert code_of(build_config, bad).code == "bad_config"
    e = code_of(parse_text, '{"type":"start","channels":"2"}')
    assert e.code == "bad_config" and "channels must be an integer" in e.message


def test_empty_query_means_no_config():
    assert parse_query({}) == {} and parse_query({"token": "x"}) == {}


def test_unknown_query_parameter():
    e = code_of(parse_query, {"samplerate": "8000"})
    assert e.code == "bad_config" and e.fatal and "samplerate" in e.message


@pytest.mark.parametrize("value,expected", [("true", True), ("1", True), ("false", False), ("0", False),
                                            ("TRUE", True), (True, True), (False, False)])
def test_interim_results_spellings(value, expected):
    assert build_config({"interim_results": value}).interim_results is expected


def test_defaults_and_default_language():
    assert build_config({}) == StreamConfig()
    assert build_config({}, default_language="de").language == "de"
    assert build_config({"language": "auto"}, default_language="de").language == "auto"
    assert build_config({"language": "zh-yue"}).language == "zh-yue"


@pytest.mark.parametrize("cfg", [
    StreamConfig(), StreamConfig(48000, "pcm_f32le", "fr", True, 100, 1000),
    StreamConfig(96000, "mulaw", "auto", False, 5000, 30000), StreamConfig(8000, "alaw", "en", True, None, None),
    StreamConfig(44100, "pcm_s16le", "de", True, None, 1000), StreamConfig(16000, "pcm_s16le", "en", True, None, None, True),
])
def test_round_trip_of_valid_configs(cfg):
    # what a client sends in a start message (JSON types) comes back as the same config; the
    # native dialect has words for CONFIG_KEYS only (StreamConfig is shared by every dialect)
    native_fields = {k: v for k, v in cfg.to_dict().items() if k in CONFIG_KEYS}
    msg = parse_text(json.dumps({"type": "start", **native_fields}))
    assert build_config(msg.config_fields) == cfg
    # ... and the same values as URL strings
    query = {k: ("true" if v is True else "false" if v is False else str(v)) for k, v in native_fields.items()
             if v is not None}
    assert build_config(parse_query(query)) == cfg


RATES_TEXT = "8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 96000"


@pytest.mark.parametrize("field,value,allowed", [
    ("sample_rate", 7999, RATES_TEXT), ("sample_rate", 192001, RATES_TEXT),
    ("sample_rate", "16k", RATES_TEXT), ("sample_rate", "", RATES_TEXT),
    ("sample_rate", 16000.0, RATES_TEXT), ("sample_rate", True, RATES_TEXT),
    ("encoding", "opus", ", ".join(ENCODINGS)), ("encoding", 1, ", ".join(ENCODINGS)),
    ("language", "e", "2-8 letter"), ("language", "english-us", "2-8 letter"), ("language", "en_US", "2-8 letter"),
    ("language", "", "2-8 letter"), ("language", 5, "auto"),
    ("interim_results", "yes", "true or false"), ("interim_results", 1, "true or false"),
    ("endpointing_ms", 99, "100 to 5000"), ("endpointing_ms", 5001, "100 to 5000"),
    ("endpointing_ms", "-1", "100 to 5000"),
    ("max_segment_ms", 999, "1000 to 30000"), ("max_segment_ms", 30001, "1000 to 30000"),
])
def test_bad_config_names_field_and_allowed_values(field, value, allowed):
    e = code_of(build_config, {field: value})
    assert e.code == "bad_config" and e.fatal
    assert field in e.message and allowed in e.message


def test_standard_rates_are_the_documented_ones():
    assert ", ".join(map(str, STANDARD_RATES)) == RATES_TEXT


@pytest.mark.parametrize("rate", STANDARD_RATES)
def test_each_standard_sample_rate_is_accepted(rate):
    assert build_config({"sample_rate": rate}).sample_rate == rate
    assert build_config(parse_query({"sample_rate": str(rate)})).sample_rate == rate
    assert build_config(parse_text(f'{{"type":"start","sample_rate":{rate}}}').config_fields).sample_rate == rate


@pytest.mark.parametrize("rate", [44099, 191999, 192000, 44101, 16001, 15999, 8001, 7999, 0, -16000, 176400, 88200])
def test_other_sample_rates_are_refused_with_the_accepted_list(rate):
    for value, echoed in ((rate, str(rate)), (str(rate), repr(str(rate)))):
        e = code_of(build_config, {"sample_rate": value})
        assert e.code == "bad_config" and e.fatal
        assert e.message == f"sample_rate must be one of {RATES_TEXT} (Hz), got {echoed}"


def test_max_segment_limit_is_the_servers():
    assert build_config({"max_segment_ms": 20000}, max_segment_ms_limit=20000).max_segment_ms == 20000
    e = code_of(build_config, {"max_segment_ms": 20001}, max_segment_ms_limit=20000)
    assert "1000 to 20000" in e.message


def test_build_config_rejects_unknown_fields():
    assert code_of(build_config, {"rate": 16000}).code == "bad_config"


# The codes a loaded model accepts (ModelRunner.languages()); a made-up set keeps these fast.
MODEL_LANGUAGES = frozenset({"auto", "zh", "en", "yue", "ja", "ko", "nospeech"})


@pytest.mark.parametrize("given,expected", [("en", "en"), (" EN ", "en"), ("Yue", "yue"), ("auto", "auto")])
def test_languages_accepts_the_models_codes(given, expected):
    assert build_config({"language": given}, languages=MODEL_LANGUAGES).language == expected
    assert build_config({}, default_language=given, languages=MODEL_LANGUAGES).language == expected


@pytest.mark.parametrize("given", ["xx", "de", "zh-yue", "AUTOX"])
def test_languages_refuses_other_codes_and_lists_the_supported_ones(given):
    e = code_of(build_config, {"language": given}, languages=MODEL_LANGUAGES)
    assert e.code == "bad_config" and e.fatal
    assert repr(given) in e.message and "not supported" in e.message
    assert e.message.endswith("use one of: auto, en, ja, ko, nospeech, yue, zh"), e.message


def test_languages_refuses_an_unsupported_default_language_too():
    e = code_of(build_config, {}, default_language="xx", languages=MODEL_LANGUAGES)
    assert e.code == "bad_config" and "'xx'" in e.message


def test_languages_without_auto_refuses_auto():
    e = code_of(build_config, {"language": "auto"}, languages={"en", "de"})
    assert e.code == "bad_config" and e.message.endswith("use one of: de, en")


def test_languages_none_keeps_the_format_check_only():
    assert build_config({"language": "xx"}).language == "xx"
    assert build_config({"language": "xx"}, languages=None).language == "xx"
    e = code_of(build_config, {"language": "en_US"}, languages=None)
    assert "2-8 letter" in e.message and "supports" not in e.message


def test_languages_malformed_code_gets_format_message_and_the_list():
    e = code_of(build_config, {"language": "en_US"}, languages=MODEL_LANGUAGES)
    assert e.code == "bad_config" and "2-8 letter" in e.message and "'en_US'" in e.message
    assert e.message.endswith("this model supports: auto, en, ja, ko, nospeech, yue, zh")


@pytest.mark.parametrize("languages", [MODEL_LANGUAGES, None])
def test_long_language_value_is_not_echoed_back(languages):
    garbage = "q" * 31 + "<script>" + "z" * 100_000
    e = code_of(build_config, {"language": garbage}, languages=languages)
    assert e.code == "bad_config"
    assert "q" * 31 + "<" in e.message and "script" not in e.message and "zzz" not in e.message
    assert "100039 characters" in e.message and len(e.message) < 1000


# Error messages never reflect unbounded client input (a 3 MB request once got a 3 MB error).


def test_long_message_type_is_not_echoed_back():
    e = code_of(parse_text, json.dumps({"type": "B" * 3_000_000}))
    assert e.code == "unknown_type" and len(e.message) < 200
    assert "'" + "B" * 32 + "'... (3000000 characters)" in e.message


@pytest.mark.parametrize("kind,echoed", [
    ([1, 2, 3], "an array of 3 item(s)"), ({"a": [1]}, "an object of 1 key(s)"), (7, "7"), (None, "null"),
    (1e309, "Infinity"), (10 ** 4000, "an integer of about 4001 digits"), ("\ud800", "'\\ud800'"),
])
def test_message_type_echo_is_bounded_for_any_json_value(kind, echoed):
    e = code_of(parse_text, json.dumps({"type": kind}) if kind != 10 ** 4000 else '{"type":1' + "0" * 4000 + "}")
    assert e.message == f"unknown message type {echoed}; expected start, finalize, keepalive or stop"
    native.error(e.code, e.message, e.fatal).encode("utf-8")  # lone surrogates are escaped


def test_many_or_long_unknown_fields_are_not_all_echoed_back():
    e = code_of(parse_text, json.dumps({"type": "start", **{f"k{i:06d}": 1 for i in range(100_000)}}))
    assert e.code == "bad_config" and len(e.message) < 300
    assert "unknown start field(s) 'k000000', 'k000001', 'k000002', 'k000003' and 99996 more; allowed:" in e.message
    e = code_of(parse_query, {"x" * 3_000_000: "1", "sample_rate": "8000"})
    assert e.message.startswith("unknown query parameter(s) '" + "x" * 32 + "'... (3000000 characters); allowed:")
    e = code_of(parse_query, {f"p{i}": "" for i in range(5000)})
    assert "and 4996 more" in e.message and len(e.message) < 300
    e = code_of(build_config, {"\U0001f600" * 1000: 1})
    assert e.code == "bad_config" and len(e.message) < 300


@pytest.mark.parametrize("fields", [
    {"encoding": "e" * 3_000_000}, {"interim_results": "y" * 3_000_000}, {"endpointing_ms": "9" * 3_000_000},
    {"max_segment_ms": [0] * 1_000_000}, {"sample_rate": "1" * 3_000_000}, {"sample_rate": 10 ** 5000},
    {"language": {"a" * 3_000_000: 1}},
])
def test_long_config_values_are_not_echoed_back(fields):
    e = code_of(build_config, fields)
    assert e.code == "bad_config" and len(e.message) < 300 and next(iter(fields)) in e.message


@pytest.mark.parametrize("field,value", [("sample_rate", [[1]] * 100_000), ("encoding", ["x" * 3_000_000]),
                                         ("interim_results", {"k": "v" * 3_000_000})])
def test_wrong_json_types_in_start_are_not_echoed_back(field, value):
    e = code_of(parse_text, json.dumps({"type": "start", field: value}))
    assert e.code == "bad_config" and field in e.message and len(e.message) < 300


def test_long_list_of_languages_is_bounded():
    many = frozenset({"auto"} | {f"l{i:05d}" for i in range(5000)})
    e = code_of(build_config, {"language": "xx"}, languages=many)
    assert e.code == "bad_config" and len(e.message) < 1000
    assert "use one of: auto, l00000, l00001," in e.message and "more)" in e.message


# ---------------------------------------------------------------------- server messages


def test_ready():
    cfg = StreamConfig(8000, "mulaw", "en", False, 400, 10000)
    out = native.ready("abc", cfg, {"name": "whisper", "languages": ("en", "de"), "device": object()})
    msg = json.loads(out)
    assert out == json.dumps(msg, separators=(",", ":"), ensure_ascii=False)  # compact
    assert msg["type"] == "ready" and msg["session_id"] == "abc" and msg["protocol_version"] == PROTOCOL_VERSION
    assert msg["config"] == {**{k: v for k, v in cfg.to_dict().items() if k in CONFIG_KEYS}, "channels": 1, "call_id": None}
    assert set(msg["config"]) == set(CONFIG_KEYS)
    two = json.loads(native.ready("abc", cfg, {}, channels=2, call_id="CA1"))
    assert two["config"]["channels"] == 2 and two["config"]["call_id"] == "CA1"
    assert msg["model"]["name"] == "whisper" and msg["model"]["languages"] == ["en", "de"]
    assert isinstance(msg["model"]["device"], str)


def test_speech_started_partial_final():
    assert json.loads(native.speech_started(3, 1200)) == {"type": "speech_started", "segment_id": 3, "start_ms": 1200}
    p = json.loads(native.partial(3, "hello wor", 1200, 2200, {"language": "en"}))
    assert p == {"type": "partial", "segment_id": 3, "text": "hello wor", "start_ms": 1200, "end_ms": 2200,
                 "language": "en"}
    f = json.loads(native.final(3, "hello world", 1200, 2500, 3000,
                                {"language": "en", "emotion": "NEUTRAL", "event": "Speech", "score": 0.5},
                                [Word("hello", 1250, 1600), Word("world", 1640, 2400)]))
    assert f == {"type": "final", "segment_id": 3, "text": "hello world", "start_ms": 1200, "end_ms": 2500,
                 "cut_ms": 3000, "words": [{"word": "hello", "start_ms": 1250, "end_ms": 1600},
                                           {"word": "world", "start_ms": 1640, "end_ms": 2400}],
                 "language": "en", "emotion": "NEUTRAL", "event": "Speech", "score": 0.5}
    # Partials carry words only when given (the client asked for them).
    p = json.loads(native.partial(3, "hello", 1200, 1700, {}, [Word("hello", 1250, 1600)]))
    assert p["words"] == [{"word": "hello", "start_ms": 1250, "end_ms": 1600}]
    # A final always has the key, empty when there are no words.
    assert json.loads(native.final(4, "", 0, 10, 10, {}))["words"] == []


def test_extras_never_override_core_keys_and_only_scalars_pass():
    f = json.loads(native.final(1, "text", 10, 20, 30, {
        "type": "x", "text": "evil", "segment_id": 9, "cut_ms": 0, "start_ms": 0, "end_ms": 0,
        "tokens": [1, 2, 3], "probs": {"a": 1}, "words": "evil", "nan": float("nan"), "inf": float("inf"), "none": None,
        "flag": True, 5: "int key",
    }))
    assert f == {"type": "final", "segment_id": 1, "text": "text", "start_ms": 10, "end_ms": 20, "cut_ms": 30,
                 "words": [], "none": None, "flag": True}


def test_unicode_text_is_sent_as_is():
    out = native.final(0, "你好，世界", 0, 10, 10, {})
    assert "你好" in out and json.loads(out)["text"] == "你好，世界"


def test_error_and_done():
    assert json.loads(native.error("bad_audio", "odd byte count", False)) == {
        "type": "error", "code": "bad_audio", "message": "odd byte count", "fatal": False}
    assert json.loads(native.done()) == {"type": "done"}


def test_protocol_error_attributes():
    e = ProtocolError("bad_json", "nope")
    assert (e.code, e.message, e.fatal) == ("bad_json", "nope", False) and "bad_json" in str(e)
