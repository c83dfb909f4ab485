"""The FunASR WebSocket codec (server/protocol/funasr.py), unit by unit, without sockets.

FunASR's protocol (its runtime/docs/websocket_protocol.md): a first JSON message of
settings (``mode``, ``wav_name``, ``chunk_size``, ``audio_fs``, ``hotwords``, ``itn``, ...),
binary PCM16 audio, ``{"is_speaking": false}`` at the end; results
``{"mode", "wav_name", "text", "is_final"}`` plus ``timestamp`` (a JSON *string* of
``[start_ms, end_ms]`` pairs) and ``stamp_sents``.

Sections follow the module: parsing (tolerance, then errors), text units and joining,
OnlineText (append-only increments), timestamps and stamp_sents, SenseVoice tags, and the
server's messages. Every expected value is written out by hand here, never computed by the
code under test.
"""

from __future__ import annotations

import json

import pytest

from server.protocol import funasr as codec
from server.protocol.funasr import (
    ClientMessage, FunasrError, FunasrSettings, OnlineText, end_ack, error, joiner, mode_label,
    parse_message, result, sensevoice_tags, stamp_sents, timestamp, units,
)
from server.runners.base import Word

DEFAULT = FunasrSettings()
MB = 1_000_000


def parse(text: str, current: FunasrSettings = DEFAULT) -> ClientMessage:
    return parse_message(text, current)


def parse_obj(obj: dict, current: FunasrSettings = DEFAULT) -> ClientMessage:
    return parse_message(json.dumps(obj, ensure_ascii=False), current)


def error_of(text: str, current: FunasrSettings = DEFAULT) -> FunasrError:
    with pytest.raises(FunasrError) as info:
        parse_message(text, current)
    return info.value


# ====================================================================== parse_message: tolerance


def test_defaults_are_funasr_servers_defaults():
    assert DEFAULT == FunasrSettings(
        mode="2pass", wav_name="microphone", wav_format="pcm", audio_fs=16000, chunk_size=(5, 10, 5),
        chunk_interval=10, encoder_chunk_look_back=None, decoder_chunk_look_back=None, hotwords=None,
        itn=None, svs_lang=None, svs_itn=None)
    assert DEFAULT.is_pcm is True
    assert DEFAULT.chunk_ms == 600


def test_funasr_clients_first_message():
    text = ('{"mode": "2pass", "wav_name": "x", "is_speaking": true, "wav_format": "pcm", '
            '"chunk_size": [5,10,5], "audio_fs": 16000, "hotwords": "{\\"阿里巴巴\\":20}", "itn": true}')
    msg = parse(text, FunasrSettings(mode="offline", wav_name="old", chunk_size=(0, 8, 4), audio_fs=8000))
    assert msg.settings == FunasrSettings(
        mode="2pass", wav_name="x", wav_format="pcm", audio_fs=16000, chunk_size=(5, 10, 5),
        chunk_interval=10, hotwords='{"阿里巴巴":20}', itn=True)
    assert msg.is_speaking is True
    assert msg.is_end is False
    assert msg.hotwords_given is True


def test_all_settings_at_once():
    msg = parse_obj({"mode": "online", "wav_name": "a.wav", "wav_format": "WAV", "audio_fs": 8000,
                     "chunk_size": [0, 8, 4], "chunk_interval": 5, "encoder_chunk_look_back": 4,
                     "decoder_chunk_look_back": -1, "hotwords": "魔搭", "itn": False, "svs_lang": "ZH",
                     "svs_itn": True})
    assert msg.settings == FunasrSettings(
        mode="online", wav_name="a.wav", wav_format="wav", audio_fs=8000, chunk_size=(0, 8, 4),
        chunk_interval=5, encoder_chunk_look_back=4, decoder_chunk_look_back=-1, hotwords="魔搭",
        itn=False, svs_lang="zh", svs_itn=True)
    assert msg.settings.is_pcm is False
    assert msg.settings.chunk_ms == 480


@pytest.mark.parametrize("value,expected", [
    ([5, 10, 5], (5, 10, 5)),
    ([0, 8, 4], (0, 8, 4)),
    ("5,10,5", (5, 10, 5)),
    ("5, 10, 5", (5, 10, 5)),
    (" 0,8,4 ", (0, 8, 4)),
    ("5 10 5", (5, 10, 5)),
    (["5", "10", "5"], (5, 10, 5)),
    ([" 0", "8 ", "4"], (0, 8, 4)),
    ([5.0, 10.0, 5.0], (5, 10, 5)),
    ([0, 1, 0], (0, 1, 0)),
    ([100, 100, 100], (100, 100, 100)),
])
def test_chunk_size_forms(value, expected):
    settings = parse_obj({"chunk_size": value}).settings
    assert settings.chunk_size == expected
    assert all(type(n) is int for n in settings.chunk_size)
    assert settings.chunk_ms == expected[1] * 60


@pytest.mark.parametrize("obj,field,expected", [
    ({"audio_fs": "16000"}, "audio_fs", 16000),
    ({"audio_fs": " 8000 "}, "audio_fs", 8000),
    ({"audio_fs": 48000.0}, "audio_fs", 48000),
    ({"audio_fs": 44100}, "audio_fs", 44100),
    ({"chunk_interval": "10"}, "chunk_interval", 10),
    ({"chunk_interval": 1}, "chunk_interval", 1),
    ({"chunk_interval": "1000"}, "chunk_interval", 1000),
    ({"encoder_chunk_look_back": "4"}, "encoder_chunk_look_back", 4),
    ({"decoder_chunk_look_back": "-1"}, "decoder_chunk_look_back", -1),
    ({"decoder_chunk_look_back": 0}, "decoder_chunk_look_back", 0),
])
def test_numbers_as_numbers_or_strings(obj, field, expected):
    value = getattr(parse_obj(obj).settings, field)
    assert value == expected
    assert type(value) is int


@pytest.mark.parametrize("value,expected", [
    (True, True), (False, False), (1, True), (0, False),
    ("true", True), ("false", False), ("1", True), ("0", False),
    ("True", True), (" FALSE ", False), ("yes", True), ("no", False),
])
@pytest.mark.parametrize("field", ["itn", "svs_itn"])
def test_booleans_in_settings(field, value, expected):
    got = getattr(parse_obj({field: value}).settings, field)
    assert got is expected


@pytest.mark.parametrize("value,expected", [
    (True, True), (False, False), (1, True), (0, False),
    ("true", True), ("false", False), ("1", True), ("0", False),
])
def test_booleans_is_speaking_and_is_end(value, expected):
    assert parse_obj({"is_speaking": value}).is_speaking is expected
    assert parse_obj({"is_end": value}).is_end is expected


@pytest.mark.parametrize("value,expected", [
    ("2pass", "2pass"), ("2PASS ", "2pass"), ("Online", "online"), (" offline", "offline"),
    ("ONLINE", "online"), ("\t2Pass\n", "2pass"),
])
def test_mode_ignores_case_and_space(value, expected):
    # start from a different mode so that the change is visible
    current = FunasrSettings(mode="offline" if expected != "offline" else "online")
    assert parse_obj({"mode": value}, current).settings.mode == expected


@pytest.mark.parametrize("obj,expected", [
    ({"hotwords": '{"阿里巴巴":20}'}, '{"阿里巴巴":20}'),  # FunASR's form: a JSON object in a string
    ({"hotword": '{"阿里巴巴":20}'}, '{"阿里巴巴":20}'),  # FunASR's Python server reads this spelling too
    ({"hotwords": "阿里巴巴 达摩院"}, "阿里巴巴 达摩院"),  # plain words, as older clients send them
    ({"hotword": "Chorus"}, "Chorus"),
    ({"hotwords": {"阿里巴巴": 20, "魔搭": 10}}, '{"阿里巴巴":20,"魔搭":10}'),  # an object: compact JSON text
    ({"hotwords": ["a", "b"]}, '["a","b"]'),
])
def test_hotwords(obj, expected):
    msg = parse_obj(obj)
    assert msg.settings.hotwords == expected
    assert msg.hotwords_given is True


@pytest.mark.parametrize("obj", [{}, {"hotwords": ""}, {"hotwords": None}, {"hotword": ""}, {"mode": "online"}])
def test_hotwords_not_given(obj):
    msg = parse_obj(obj, FunasrSettings(hotwords="kept"))
    assert msg.hotwords_given is False
    assert msg.settings.hotwords == "kept"


def test_hotwords_are_bounded():
    msg = parse_obj({"hotwords": "字" * 20000})
    assert msg.settings.hotwords == "字" * 8192


def test_unknown_fields_are_ignored():
    msg = parse_obj({"wav_name": "w", "foo": 1, "hotwords_list": [1, 2], "is_final": True,
                     "chunk": "bogus", "mode2": "bogus", "ssl": {"x": "y"}})
    assert msg.settings == FunasrSettings(wav_name="w")
    assert msg.is_speaking is None
    assert msg.is_end is False


@pytest.mark.parametrize("text", ["{}", '{"foo": "bar"}', '{"mode": null, "audio_fs": null, "itn": null}'])
def test_message_without_settings_keeps_them(text):
    current = FunasrSettings(mode="online", wav_name="keep", audio_fs=8000, itn=True)
    msg = parse(text, current)
    assert msg.settings == FunasrSettings(mode="online", wav_name="keep", audio_fs=8000, itn=True)
    assert msg.is_speaking is None
    assert msg.is_end is False
    assert msg.hotwords_given is False


def test_settings_accumulate_across_messages():
    first = parse_obj({"mode": "online", "wav_name": "one", "chunk_size": "0,8,4", "audio_fs": 8000,
                       "hotwords": "魔搭", "itn": False, "is_speaking": True})
    assert first.settings == FunasrSettings(mode="online", wav_name="one", chunk_size=(0, 8, 4), audio_fs=8000,
                                            hotwords="魔搭", itn=False)
    second = parse_obj({"wav_name": "two"}, first.settings)
    assert second.settings == FunasrSettings(mode="online", wav_name="two", chunk_size=(0, 8, 4), audio_fs=8000,
                                             hotwords="魔搭", itn=False)
    assert second.is_speaking is None  # is_speaking is per message, not a setting
    third = parse_obj({"is_speaking": False, "mode": "2pass"}, second.settings)
    assert third.settings == FunasrSettings(mode="2pass", wav_name="two", chunk_size=(0, 8, 4), audio_fs=8000,
                                            hotwords="魔搭", itn=False)
    assert third.is_speaking is False
    assert first.settings.wav_name == "one"  # settings are values: the older ones are untouched


@pytest.mark.parametrize("name,expected", [
    ("x" * 256, "x" * 256),
    ("x" * 257, "x" * 256),
    ("名" * 1000, "名" * 256),
    ("a" * MB, "a" * 256),
    ("", ""),
    (12, "12"),
    (1.5, "1.5"),
])
def test_wav_name(name, expected):
    assert parse_obj({"wav_name": name}).settings.wav_name == expected


@pytest.mark.parametrize("value,expected", [
    ("pcm", "pcm"), ("PCM", "pcm"), ("wav", "wav"), (".wav", "wav"), (" .MP3 ", "mp3"), ("..ogg", "ogg"),
])
def test_wav_format(value, expected):
    assert parse_obj({"wav_format": value}).settings.wav_format == expected


@pytest.mark.parametrize("value,is_pcm", [("pcm", True), ("", True), ("wav", False), ("mp4", False)])
def test_is_pcm(value, is_pcm):
    assert parse_obj({"wav_format": value}, FunasrSettings(wav_format="flac")).settings.is_pcm is is_pcm


@pytest.mark.parametrize("value,expected", [
    ("EN", "en"), ("zh", "zh"), (" Yue ", "yue"), ("auto", "auto"), ("AUTO", "auto"), ("zh-cn", "zh-cn"),
    ("nospeech", "nospeech"),
])
def test_svs_lang(value, expected):
    assert parse_obj({"svs_lang": value}).settings.svs_lang == expected


@pytest.mark.parametrize("obj,is_speaking,is_end", [
    ({"is_speaking": True}, True, False),
    ({"is_speaking": False}, False, False),
    ({"is_speaking": False, "is_end": True}, False, True),
    ({"is_end": True}, None, True),
    ({"is_end": False}, None, False),
    ({"is_speaking": None, "is_end": None}, None, False),
    ({"mode": "online"}, None, False),
])
def test_is_speaking_and_is_end_reported(obj, is_speaking, is_end):
    msg = parse_obj(obj)
    assert msg.is_speaking is is_speaking
    assert msg.is_end is is_end


# ====================================================================== parse_message: errors


@pytest.mark.parametrize("text", [
    "", "not json", "{", "{'mode': 'online'}", '{"mode": "online",}', "[1, 2]", "[]", "42", "1.5",
    '"a string"', "null", "true",
    '{"audio_fs": ' + "1" * 5000 + "}",  # beyond Python's integer-parsing limit
])
def test_not_a_json_object(text):
    e = error_of(text)
    assert e.code == "bad_json"
    assert e.message
    assert str(e).startswith("bad_json: ")


@pytest.mark.parametrize("text", [
    "[" * 100_000,
    "[" * 100_000 + "]" * 100_000,
    '{"a":' * 100_000,
    '{"mode": ' + "[" * 100_000 + "]" * 100_000 + "}",
])
def test_deep_nesting_is_bad_json_not_recursion_error(text):
    e = error_of(text)
    assert e.code == "bad_json"
    assert len(e.message) < 300


def test_nesting_json_can_parse_is_handled():
    # nested as deep as the JSON parser accepts, in every kind of field
    nested = "[" * 500 + "]" * 500
    for key in ("mode", "audio_fs", "chunk_size", "is_speaking", "svs_lang", "wav_name"):
        e = error_of(f'{{"{key}": {nested}}}')
        assert e.code == "bad_config", key
        assert len(e.message) < 300, key
    msg = parse(f'{{"hotwords": {nested}}}')  # hotwords of any shape are accepted (and bounded)
    assert msg.hotwords_given is True
    assert isinstance(msg.settings.hotwords, str) and 0 < len(msg.settings.hotwords) <= 8192


@pytest.mark.parametrize("text,key", [
    ('{"mode": "bogus"}', "mode"),
    ('{"mode": "2-pass"}', "mode"),
    ('{"mode": "2pass-online"}', "mode"),
    ('{"mode": ""}', "mode"),
    ('{"mode": true}', "mode"),
    ('{"mode": ["online"]}', "mode"),
    ('{"mode": 2}', "mode"),
    ('{"audio_fs": 12345}', "audio_fs"),
    ('{"audio_fs": 0}', "audio_fs"),
    ('{"audio_fs": -1}', "audio_fs"),
    ('{"audio_fs": -16000}', "audio_fs"),
    ('{"audio_fs": "abc"}', "audio_fs"),
    ('{"audio_fs": "16k"}', "audio_fs"),
    ('{"audio_fs": "16000.0"}', "audio_fs"),
    ('{"audio_fs": 16000.5}', "audio_fs"),
    ('{"audio_fs": 1e400}', "audio_fs"),
    ('{"audio_fs": -1e400}', "audio_fs"),
    ('{"audio_fs": NaN}', "audio_fs"),
    ('{"audio_fs": Infinity}', "audio_fs"),
    ('{"audio_fs": true}', "audio_fs"),
    ('{"audio_fs": [16000]}', "audio_fs"),
    ('{"audio_fs": 192000}', "audio_fs"),
    ('{"chunk_size": "a,b,c"}', "chunk_size"),
    ('{"chunk_size": [1, 2]}', "chunk_size"),
    ('{"chunk_size": "5,10"}', "chunk_size"),
    ('{"chunk_size": [1, 2, 3, 4]}', "chunk_size"),
    ('{"chunk_size": [1, 0, 1]}', "chunk_size"),
    ('{"chunk_size": "5,0,5"}', "chunk_size"),
    ('{"chunk_size": 5}', "chunk_size"),
    ('{"chunk_size": ""}', "chunk_size"),
    ('{"chunk_size": [5, "x", 5]}', "chunk_size"),
    ('{"chunk_size": [5, 101, 5]}', "chunk_size"),
    ('{"chunk_size": [-1, 10, 5]}', "chunk_size"),
    ('{"chunk_size": [5, 10.5, 5]}', "chunk_size"),
    ('{"chunk_size": [5, true, 5]}', "chunk_size"),
    ('{"chunk_size": {"a": 1}}', "chunk_size"),
    ('{"chunk_interval": 0}', "chunk_interval"),
    ('{"chunk_interval": 1001}', "chunk_interval"),
    ('{"chunk_interval": "ten"}', "chunk_interval"),
    ('{"encoder_chunk_look_back": -2}', "encoder_chunk_look_back"),
    ('{"decoder_chunk_look_back": "x"}', "decoder_chunk_look_back"),
    ('{"is_speaking": "maybe"}', "is_speaking"),
    ('{"is_speaking": 2}', "is_speaking"),
    ('{"is_speaking": []}', "is_speaking"),
    ('{"is_speaking": ""}', "is_speaking"),
    ('{"is_end": "maybe"}', "is_end"),
    ('{"itn": "maybe"}', "itn"),
    ('{"svs_itn": 0.5}', "svs_itn"),
    ('{"svs_lang": "this-is-not-a-code"}', "svs_lang"),
    ('{"svs_lang": "e"}', "svs_lang"),
    ('{"svs_lang": "12"}', "svs_lang"),
    ('{"svs_lang": "en_US"}', "svs_lang"),
    ('{"svs_lang": true}', "svs_lang"),
    ('{"wav_name": true}', "wav_name"),
    ('{"wav_name": ["a"]}', "wav_name"),
    ('{"wav_format": {"a": 1}}', "wav_format"),
])
def test_unusable_values_are_bad_config(text, key):
    e = error_of(text)
    assert e.code == "bad_config"
    assert e.message.startswith(key), e.message  # the message names the setting
    assert str(e) == f"bad_config: {e.message}"


def test_errors_say_what_was_sent_and_what_is_allowed():
    e = error_of('{"mode": "bogus"}')
    assert e.message == "mode must be online, offline or 2pass, got 'bogus'"
    e = error_of('{"audio_fs": 12345}')
    assert e.message == ("audio_fs must be one of 8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, "
                         "48000, 96000 (Hz), got 12345")
    e = error_of('{"chunk_size": [1, 0, 1]}')
    assert e.message == "chunk_size's middle value (the chunk, in 60 ms units) must be at least 1"
    e = error_of('{"is_speaking": "maybe"}')
    assert e.message == "is_speaking must be true or false, got 'maybe'"


def test_a_bad_value_changes_nothing():
    current = FunasrSettings(mode="online", wav_name="keep")
    error_of('{"wav_name": "new", "audio_fs": 12345}', current)
    assert current == FunasrSettings(mode="online", wav_name="keep")


@pytest.mark.parametrize("text", [
    "{" + "x" * MB,  # not JSON
    json.dumps({"mode": "x" * MB}),
    json.dumps({"mode": "名" * MB}),
    json.dumps({"audio_fs": "9" * MB}),
    json.dumps({"audio_fs": [16000] * 300_000}),
    json.dumps({"audio_fs": {"k" * MB: 1}}),
    '{"audio_fs": ' + "9" * 4000 + "}",  # a 4000-digit integer: parsed, and far out of range
    json.dumps({"chunk_size": "1," * (MB // 2)}),
    json.dumps({"chunk_size": ["x" * MB, 1, 1]}),
    json.dumps({"chunk_size": [1] * 300_000}),
    json.dumps({"chunk_interval": "1" * MB}),
    json.dumps({"is_speaking": "x" * MB}),
    json.dumps({"is_end": ["x" * MB]}),
    json.dumps({"itn": "y" * MB}),
    json.dumps({"svs_lang": "a" * MB}),
    json.dumps({"wav_name": ["x" * MB]}),
    '{"mode": "' + "\\ud800" * (MB // 6) + '"}',  # lone surrogates, by JSON escapes
])
def test_error_messages_do_not_echo_huge_input(text):
    e = error_of(text)
    assert e.code in ("bad_json", "bad_config")
    assert 0 < len(e.message) < 300
    assert len(str(e)) < 320
    e.message.encode("utf-8")  # sendable: no lone surrogates copied from the input


# ====================================================================== units and joiner


@pytest.mark.parametrize("text,expected", [
    ("ask not what", ["ask", " not", " what"]),
    ("  ask not  what  ", ["ask", " not", "  what"]),
    ("Americans, ask", ["Americans,", " ask"]),
    ("我爱北京", ["我", "爱", "北", "京"]),
    ("你好，世界。", ["你", "好，", "世", "界。"]),  # punctuation stays with the character before it
    ("我爱 New York", ["我", "爱", " New", " York"]),
    ("AI技术", ["AI", "技", "术"]),
    ("こんにちは", ["こ", "ん", "に", "ち", "は"]),
    ("word", ["word"]),
    ("", []),
    ("   ", []),
])
def test_units(text, expected):
    got = units(text)
    assert got == expected
    assert "".join(got) == text.strip()


@pytest.mark.parametrize("before,after,expected", [
    ("hello", "world", " "),
    ("Hello, world.", "And so", " "),
    ("fellow", "Americans,", " "),
    ("你好", "世界", ""),
    ("你好", "world", ""),
    ("hello", "世界", ""),
    ("hello", "", ""),
    ("", "hello", ""),
    ("", "", ""),
    ("hello ", "world", ""),
    ("hello", " world", ""),
    ("hello\n", "world", ""),
])
def test_joiner(before, after, expected):
    assert joiner(before, after) == expected


# ====================================================================== OnlineText


def test_first_partial_sends_nothing():
    o = OnlineText()
    assert o.partial("ask not what your country") == ""
    assert o.sent == []


def test_a_word_is_sent_once_two_partials_agree_on_it():
    o = OnlineText()
    assert o.partial("hello wor") == ""
    assert o.partial("hello world") == "hello"  # "wor" -> "world": the revised last word waits
    assert o.sent == ["hello"]
    assert o.partial("hello world how") == " world"
    assert o.partial("hello world how are") == " how"
    assert o.final("hello world how are you") == " are you"


@pytest.mark.parametrize("partials,outputs,final,rest", [
    # growing, with the last word revised along the way ("count" -> "country", "can" -> "cannot")
    (["ask", "ask not", "ask not what", "ask not what your count", "ask not what your country can",
      "ask not what your country cannot", "ask not what your country cannot do"],
     ["", "ask", " not", " what", " your", " country", " cannot"],
     "ask not what your country cannot do for you", " do for you"),
    # a partial that shrinks, then grows back
    # (agreement is with the previous partial: "the quick" agrees on nothing new)
    (["the quick brown", "the quick brown fox", "the quick", "the quick brown fox jumps",
      "the quick brown fox jumps over"],
     ["", "the quick brown", "", "", " fox jumps"],
     "the quick brown fox jumps over the lazy dog", " over the lazy dog"),
    # two partials that disagree everywhere, then agree
    (["eye scream", "ice cream", "ice cream is", "ice cream is good"],
     ["", "", "ice cream", " is"],
     "ice cream is good", " good"),
    # nothing ever agrees: the final carries everything
    (["a", "b", "c"], ["", "", ""], "d e f", "d e f"),
])
def test_increments_add_up_to_the_final_text(partials, outputs, final, rest):
    o = OnlineText()
    assert [o.partial(p) for p in partials] == outputs
    assert o.final(final) == rest
    assert "".join(outputs) + rest == final  # nothing repeated, nothing lost


def test_added_punctuation_and_case_do_not_block_later_words():
    o = OnlineText()
    got = [o.partial(p) for p in [
        "and so my",
        "and so my fellow",
        "And so, my fellow Americans",  # case and a comma on words already sent
        "And so, my fellow Americans, ask",
        "AND SO, MY FELLOW AMERICANS, ASK NOT",
        "And so, my fellow \"Americans\", ask not what",
    ]]
    assert got == ["", "and so my", " fellow", " Americans,", " ASK", " not"]
    assert o.final("And so, my fellow Americans, ask not what your country can do for you.") == \
        " what your country can do for you."
    # What the client shows: each word once, in the spelling it was first sent in.
    assert "".join(got) + " what your country can do for you." == \
        "and so my fellow Americans, ASK not what your country can do for you."


def test_a_revised_sent_word_stops_increments_and_nothing_is_repeated():
    o = OnlineText()
    assert [o.partial(p) for p in ["I scream", "I scream for"]] == ["", "I scream"]
    # the model changes its mind about words already sent: clients cannot take them back
    assert [o.partial(p) for p in ["ice cream for", "ice cream for you", "ice cream for you all"]] == ["", "", ""]
    assert o.sent == ["i", "scream"]
    assert o.final("ice cream for you all") == " for you all"


def test_final_returns_the_unsent_rest():
    o = OnlineText()
    assert o.final("nothing was sent") == "nothing was sent"
    o = OnlineText()
    o.partial("all of it")
    assert o.partial("all of it") == "all of it"
    assert o.final("all of it") == ""
    o = OnlineText()
    o.partial("one two")
    assert o.partial("one two three") == "one two"
    assert o.final("one two three four") == " three four"
    assert o.sent == ["one", "two", "three", "four"]


def test_cjk_text_goes_char_by_char():
    o = OnlineText()
    got = [o.partial(p) for p in ["今天", "今天天", "今天天汽", "今天天气很", "今天天气很好"]]
    assert got == ["", "今天", "天", "", "气很"]
    assert o.sent == ["今", "天", "天", "气", "很"]
    assert o.final("今天天气很好。") == "好。"
    assert "".join(got) + "好。" == "今天天气很好。"


def test_cjk_punctuation_after_the_sent_text_does_not_block():
    o = OnlineText()
    got = [o.partial(p) for p in ["你好", "你好世", "你好，世界", "你好，世界我"]]
    # A comma added after sent text is not sent (clients cannot insert); the words go on.
    assert got == ["", "你好", "世", "界"]
    assert o.final("你好，世界我们。") == "我们。"
    assert "".join(got) + "我们。" == "你好世界我们。"


# ====================================================================== timestamp


def pairs(words) -> list:
    text = timestamp(words)
    assert isinstance(text, str)
    out = json.loads(text)
    assert all(type(p) is list and len(p) == 2 and all(type(x) is int for x in p) for p in out)
    return out


def test_timestamp_is_a_compact_json_string():
    text = timestamp([Word("ask", 100, 200), Word("not", 200, 500)])
    assert text == "[[100,200],[200,500]]"
    assert json.loads(text) == [[100, 200], [200, 500]]


def test_timestamp_one_pair_per_english_word():
    words = [Word("And", 0, 180), Word("so,", 180, 420), Word("my", 600, 720), Word("fellow", 720, 1000),
             Word("Americans,", 1000, 1700), Word("ask", 2100, 2400), Word("not.", 2400, 2700)]
    assert pairs(words) == [[0, 180], [180, 420], [600, 720], [720, 1000], [1000, 1700], [2100, 2400],
                            [2400, 2700]]


def test_timestamp_one_pair_per_cjk_character():
    assert pairs([Word("阿里巴", 1000, 1300)]) == [[1000, 1100], [1100, 1200], [1200, 1300]]
    assert pairs([Word("你好吗", 0, 100)]) == [[0, 33], [33, 66], [66, 100]]  # split with integer ms
    assert pairs([Word("我", 0, 80), Word("爱北京", 80, 380), Word("。", 380, 380)]) == \
        [[0, 80], [80, 180], [180, 280], [280, 380]]
    assert pairs([Word("AI技术", 0, 300)]) == [[0, 100], [100, 200], [200, 300]]


def test_punctuation_words_add_no_pair():
    words = [Word("hello", 0, 100), Word(",", 100, 100), Word("world", 100, 300), Word(".", 300, 320),
             Word("你", 400, 500), Word("。", 500, 500), Word("?!", 500, 510), Word("…", 510, 520)]
    assert pairs(words) == [[0, 100], [100, 300], [400, 500]]


@pytest.mark.parametrize("word", ["Americans,", "Americans.", "Americans?", "Americans!", "Americans...",
                                  "Americans;", '"Americans"', "(Americans)", "Americans,!"])
def test_attached_punctuation_gives_no_extra_pair(word):
    assert pairs([Word("fellow", 0, 400), Word(word, 400, 1000)]) == [[0, 400], [400, 1000]]


def test_timestamp_of_nothing():
    assert timestamp([]) == "[]"
    assert timestamp([Word(",", 0, 10)]) == "[]"


def test_reversed_span_is_empty_not_negative():
    assert pairs([Word("你好", 500, 400)]) == [[500, 500], [500, 500]]


# ====================================================================== stamp_sents


def test_stamp_sents_cut_at_punctuation():
    words = [Word("And", 0, 180), Word("so,", 180, 420), Word("my", 600, 720), Word("fellow", 720, 1000),
             Word("Americans?", 1000, 1700), Word("Ask", 2100, 2400), Word("not!", 2400, 2700),
             Word("Do", 3000, 3100), Word("it.", 3100, 3300), Word("now", 3400, 3600)]
    assert stamp_sents(words) == [
        {"text_seg": "And so", "punc": ",", "start": 0, "end": 420, "ts_list": [[0, 180], [180, 420]]},
        {"text_seg": "my fellow Americans", "punc": "?", "start": 600, "end": 1700,
         "ts_list": [[600, 720], [720, 1000], [1000, 1700]]},
        {"text_seg": "Ask not", "punc": "!", "start": 2100, "end": 2700, "ts_list": [[2100, 2400], [2400, 2700]]},
        {"text_seg": "Do it", "punc": ".", "start": 3000, "end": 3300, "ts_list": [[3000, 3100], [3100, 3300]]},
        {"text_seg": "now", "punc": "", "start": 3400, "end": 3600, "ts_list": [[3400, 3600]]},
    ]


def test_stamp_sents_cjk():
    words = [Word("你好", 0, 200), Word("，", 200, 200), Word("世界", 200, 400), Word("。", 400, 400),
             Word("今天", 500, 700), Word("好吗？", 700, 900), Word("好！", 1000, 1100), Word("走", 1100, 1200)]
    assert stamp_sents(words) == [
        {"text_seg": "你 好", "punc": "，", "start": 0, "end": 200, "ts_list": [[0, 100], [100, 200]]},
        {"text_seg": "世 界", "punc": "。", "start": 200, "end": 400, "ts_list": [[200, 300], [300, 400]]},
        {"text_seg": "今 天 好 吗", "punc": "？", "start": 500, "end": 900,
         "ts_list": [[500, 600], [600, 700], [700, 800], [800, 900]]},
        {"text_seg": "好", "punc": "！", "start": 1000, "end": 1100, "ts_list": [[1000, 1100]]},
        {"text_seg": "走", "punc": "", "start": 1100, "end": 1200, "ts_list": [[1100, 1200]]},
    ]


def test_stamp_sents_without_punctuation_is_one_sentence():
    words = [Word("ask", 100, 200), Word("not", 200, 500), Word("what", 520, 700)]
    assert stamp_sents(words) == [
        {"text_seg": "ask not what", "punc": "", "start": 100, "end": 700,
         "ts_list": [[100, 200], [200, 500], [520, 700]]},
    ]


def test_stamp_sents_punc_is_one_character():
    words = [Word("What", 0, 100), Word("?!", 100, 100), Word("Well...", 200, 400)]
    assert stamp_sents(words) == [
        {"text_seg": "What", "punc": "?", "start": 0, "end": 100, "ts_list": [[0, 100]]},
        {"text_seg": "Well", "punc": ".", "start": 200, "end": 400, "ts_list": [[200, 400]]},
    ]


def test_stamp_sents_of_nothing():
    assert stamp_sents([]) == []
    assert stamp_sents([Word("。", 0, 0)]) == []


def test_stamp_sents_spans_match_timestamp():
    words = [Word("我", 0, 80), Word("爱北京，", 80, 380), Word("ok", 400, 500)]
    sents = stamp_sents(words)
    assert [p for s in sents for p in s["ts_list"]] == pairs(words) == \
        [[0, 80], [80, 180], [180, 280], [280, 380], [400, 500]]


# ====================================================================== sensevoice_tags


@pytest.mark.parametrize("fields,expected", [
    # what the SenseVoice runner (plus the session's "language") reports for
    # "<|en|><|NEUTRAL|><|Speech|><|woitn|>hello"
    ({"language": "en", "emotion": "NEUTRAL", "event": "Speech", "nospeech": False,
      "raw_text": "<|en|><|NEUTRAL|><|Speech|><|woitn|>hello"}, "<|en|><|NEUTRAL|><|Speech|>"),
    ({"language": "zh", "emotion": "HAPPY", "event": "BGM"}, "<|zh|><|HAPPY|><|BGM|>"),
    ({"language": "en", "emotion": None, "event": None}, "<|en|><|EMO_UNKNOWN|><|Event_UNK|>"),
    ({"language": None, "emotion": "SAD", "event": "Speech"}, "<|nospeech|><|SAD|><|Speech|>"),
    ({"emotion": "SAD", "event": "Speech"}, "<|nospeech|><|SAD|><|Speech|>"),
    ({"language": "en", "emotion": "NEUTRAL", "event": "Speech", "nospeech": True},
     "<|nospeech|><|NEUTRAL|><|Speech|>"),
])
def test_sensevoice_tags(fields, expected):
    assert sensevoice_tags(fields) == expected


@pytest.mark.parametrize("fields", [
    {},
    {"language": "en"},  # another model's result (whisper): no emotion, no event
    {"language": "en", "no_speech_prob": 0.1, "avg_logprob": -0.2},
    {"raw_text": "<|en|><|NEUTRAL|><|Speech|><|woitn|>hello"},  # tags are read from parsed fields only
    {"raw_text": 5, "language": "en"},
    {"language": "en", "emotion": "NEUTRAL"},
    {"language": "en", "event": "Speech"},
])
def test_no_sensevoice_tags(fields):
    assert sensevoice_tags(fields) == ""


# ====================================================================== server -> client messages


@pytest.mark.parametrize("mode,online,expected", [
    ("2pass", True, "2pass-online"), ("2pass", False, "2pass-offline"),
    ("online", True, "online"), ("online", False, "online"),
    ("offline", True, "offline"), ("offline", False, "offline"),
])
def test_mode_label(mode, online, expected):
    assert mode_label(mode, online) == expected


def test_result_without_words():
    text = result("2pass-online", "mic", " fellow", False)
    assert text == '{"mode":"2pass-online","wav_name":"mic","text":" fellow","is_final":false}'
    assert set(json.loads(text)) == {"mode", "wav_name", "text", "is_final"}


def test_result_keeps_chinese_as_characters():
    text = result("online", "麦克风", "你好，世界。", True)
    assert text == '{"mode":"online","wav_name":"麦克风","text":"你好，世界。","is_final":true}'
    assert "\\u" not in text


def test_result_with_words():
    words = [Word("你好", 0, 200), Word("，", 200, 200), Word("world.", 300, 700)]
    text = result("2pass-offline", "a.wav", "你好，world.", True, words)
    assert text == (
        '{"mode":"2pass-offline","wav_name":"a.wav","text":"你好，world.","is_final":true,'
        '"timestamp":"[[0,100],[100,200],[300,700]]",'
        '"stamp_sents":[{"text_seg":"你 好","punc":"，","start":0,"end":200,"ts_list":[[0,100],[100,200]]},'
        '{"text_seg":"world","punc":".","start":300,"end":700,"ts_list":[[300,700]]}]}'
    )
    obj = json.loads(text)
    assert set(obj) == {"mode", "wav_name", "text", "is_final", "timestamp", "stamp_sents"}
    assert isinstance(obj["timestamp"], str)
    assert json.loads(obj["timestamp"]) == [[0, 100], [100, 200], [300, 700]]


def test_result_with_no_words():
    assert result("offline", "w", "", True, []) == \
        '{"mode":"offline","wav_name":"w","text":"","is_final":true,"timestamp":"[]","stamp_sents":[]}'


def test_end_ack():
    text = end_ack("offline", "a.wav", [])
    assert text == '{"mode":"offline","wav_name":"a.wav","is_final":true,"is_end":true}'
    assert set(json.loads(text)) == {"mode", "wav_name", "is_final", "is_end"}


def test_end_ack_with_errors():
    text = end_ack("2pass", "会议", ["segment 3: overloaded", "segment 5: timeout"])
    assert text == ('{"mode":"2pass","wav_name":"会议","is_final":false,"is_end":true,'
                    '"error":"segment 3: overloaded; segment 5: timeout"}')
    assert set(json.loads(text)) == {"mode", "wav_name", "is_final", "is_end", "error"}


def test_end_ack_error_is_bounded():
    obj = json.loads(end_ack("online", "w", ["e" * 800, "f" * 800]))
    assert obj["error"] == "e" * 800 + "; " + "f" * 198
    assert obj["is_final"] is False


@pytest.mark.parametrize("fatal", [True, False])
def test_error_message(fatal):
    text = error("麦克风", "bad_config", "mode must be online, offline or 2pass, got 'x'", fatal)
    assert text == ('{"wav_name":"麦克风","text":"","is_final":' + ("true" if fatal else "false") +
                    ',"error":"bad_config","message":"mode must be online, offline or 2pass, got \'x\'"}')
    obj = json.loads(text)
    assert set(obj) == {"wav_name", "text", "is_final", "error", "message"}
    assert "mode" not in obj  # FunASR clients skip messages without a mode: not shown as text
    assert obj["text"] == ""


def test_a_parse_error_becomes_an_error_message():
    e = error_of(json.dumps({"audio_fs": "x" * MB}))
    text = error(DEFAULT.wav_name, e.code, e.message, False)
    assert len(text) < 400
    obj = json.loads(text)
    assert (obj["error"], obj["wav_name"], obj["is_final"]) == ("bad_config", "microphone", False)
    assert obj["message"] == "audio_fs must be an integer from 0 to 1000000000, got '" + "x" * 32 + "'..."


# ====================================================================== once defects (fixed)



# ====================================================================== is_final and sentence fields
# The expected sequences are FunASR's C++ runtime's (runtime/websocket/bin/websocket-server-2pass.cpp
# at FunASR 3c58cb5): while audio flows every message has is_final false; the one answer to
# is_speaking false has it true; slice_type 0/1/2 and index number each sentence's messages.

WORDS = [Word("Ask", 100, 300), Word("not.", 300, 600)]


def decoded(messages: list[str]) -> list[dict]:
    return [json.loads(m) for m in messages]


def marks(msgs: list[dict]) -> list[tuple]:
    return [(m["mode"], m["text"], m["is_final"], m.get("slice_type"), m.get("index")) for m in msgs]


def test_runtime_2pass_marks_only_the_answer_to_the_end_of_audio_final():
    r = codec.Results("runtime")
    out = []
    out += r.online("2pass-online", "w", "Ask")
    out += r.online("2pass-online", "w", " not")
    out += r.sentence("w", "Ask not.", 80, 640, WORDS)
    out += r.online("2pass-online", "w", " Ask")
    r.end()  # is_speaking false: the open sentence's final is the answer
    held = r.sentence("w", " Ask what.", 900, 1700, WORDS)
    assert held == []  # not yet known to be the last
    out += held + r.ended("2pass-offline", "w")
    msgs = decoded(out)
    assert marks(msgs) == [
        ("2pass-online", "Ask", False, 0, 0), ("2pass-online", " not", False, 1, 0),
        ("2pass-offline", "Ask not.", False, 2, 0),
        ("2pass-online", " Ask", False, 0, 1),
        ("2pass-offline", " Ask what.", True, 2, 1),
    ]
    assert (msgs[2]["start_time"], msgs[2]["end_time"]) == (80, 640)
    assert (msgs[4]["start_time"], msgs[4]["end_time"]) == (900, 1700)
    assert msgs[2]["timestamp"] == "[[100,300],[300,600]]" and msgs[2]["stamp_sents"][0]["text_seg"] == "Ask not"
    # Online increments carry no sentence times or stamps, as before and as the runtime.
    assert not {"start_time", "end_time", "timestamp", "stamp_sents"} & set(msgs[0])


def test_runtime_several_sentences_after_the_end_only_the_last_is_final():
    r = codec.Results("runtime")
    r.end()
    out = r.sentence("w", "One.", 0, 500, []) + r.sentence("w", " Two.", 700, 1200, []) + r.ended("2pass-offline", "w")
    assert marks(decoded(out)) == [("2pass-offline", "One.", False, 2, 0), ("2pass-offline", " Two.", True, 2, 1)]


@pytest.mark.parametrize("label", ["2pass-offline", "online"])
def test_runtime_end_with_nothing_left_is_an_empty_final_message(label):
    r = codec.Results("runtime")
    first = decoded(r.sentence("w", "Done.", 0, 500, []))
    r.end()
    last = decoded(r.ended(label, "w"))
    assert first[0]["is_final"] is False
    assert last == [{"mode": label, "wav_name": "w", "text": "", "is_final": True}]
    assert r.ended(label, "w") == []  # one answer per end


def test_runtime_online_mode_numbers_sentences_and_finals_only_at_the_end():
    r = codec.Results("runtime")
    out = r.online("online", "w", "Ask") + r.online_end("w", " not.")
    out += r.online("online", "w", " Ask") + r.online("online", "w", " what")
    r.end()
    out += r.online_end("w", " you can do.") + r.ended("online", "w")
    assert marks(decoded(out)) == [
        ("online", "Ask", False, 0, 0), ("online", " not.", False, 1, 0),
        ("online", " Ask", False, 0, 1), ("online", " what", False, 1, 1), ("online", " you can do.", True, 1, 1),
    ]


def test_online_sentence_with_nothing_sent_takes_no_number():
    r = codec.Results("runtime")
    assert r.online_end("w", "") == []
    assert decoded(r.online("online", "w", "Hi"))[0]["index"] == 0


def test_sentence_numbers_run_on_over_the_connections_utterances():
    r = codec.Results("runtime")
    r.sentence("w", "One.", 0, 500, [])
    r.end()
    r.ended("2pass-offline", "w")
    assert marks(decoded(r.online("2pass-online", "w", "Two")))[0][3:] == (0, 1)


def test_per_sentence_marks_as_funasrs_python_server():
    r = codec.Results("per_sentence")
    out = r.online("2pass-online", "w", "Ask") + r.sentence("w", "Ask not.", 0, 600, WORDS)
    r.end()
    out += r.sentence("w", " Ask what.", 900, 1700, WORDS)
    assert r.ended("2pass-offline", "w") == []  # no message of its own
    assert [(m["mode"], m["is_final"]) for m in decoded(out)] == [
        ("2pass-online", False), ("2pass-offline", True), ("2pass-offline", True)]
    online = codec.Results("per_sentence")
    out = online.online("online", "w", "Ask") + online.online_end("w", " not.")
    assert [m["is_final"] for m in decoded(out)] == [False, True]
    assert online.online_end("w", "") == []  # nothing left: no message, as before


def test_per_sentence_results_are_todays_plus_the_sentence_fields():
    r = codec.Results("per_sentence")
    (msg,) = decoded(r.sentence("w", "Ask not.", 0, 600, WORDS))
    before = json.loads(result("2pass-offline", "w", "Ask not.", True, WORDS))
    assert {k: v for k, v in msg.items() if k not in ("slice_type", "index", "start_time", "end_time")} == before


def test_results_refuse_an_unknown_marking():
    with pytest.raises(ValueError):
        codec.Results("sometimes")
