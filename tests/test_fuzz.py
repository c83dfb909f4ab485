"""Property-based fuzzing of everything that parses untrusted bytes or text.

Client text messages and URL queries (server/protocol/native.py), audio message bytes
(server/audio/codecs.py), WAV files (server/audio/wavfile.py) and the endpointer's audio
input (server/vad/endpointer.py). The contract checked everywhere: a parser returns a
well-formed value or raises its one documented error type; nothing else escapes, error
messages are bounded whatever the input size (no reflection of megabytes of client
input), decoded audio is finite float32 in [-1, 1], and no header can make the reader
allocate more than the input justifies.

Example counts are chosen so that this file runs in well under a minute on 2 shared
cores; ``deadline=None`` because timing on a shared machine is noise. No example
database is written (``database=None``): a failure prints its example and its
``@reproduce_failure`` blob instead.
"""

from __future__ import annotations

import json
import math
import struct
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from server.audio.codecs import BYTES_PER_SAMPLE, ENCODINGS, AudioFormatError, decode, encode
from server.audio.resample import STANDARD_RATES
from server.audio.wavfile import MAX_RATE, MIN_RATE, load_audio_16k, read_wav
from server.protocol import native
from server.runners.base import Word
from server.protocol.native import (
    CONFIG_KEYS, Finalize, KeepAlive, ProtocolError, Start, Stop, StreamConfig, build_config, parse_query,
    parse_text,
)
from server.vad.endpointer import Endpointer, EndpointerSettings, SegmentEnded, SpeechStarted

DATA = Path(__file__).parent / "data"

FAST = settings(max_examples=800, deadline=None, database=None)
MEDIUM = settings(max_examples=300, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
SLOW = settings(max_examples=400, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# The longest error message a client may get back, whatever it sent.
MAX_MESSAGE = 1000
PROTOCOL_CODES = {"bad_json", "unknown_type", "bad_config"}


# ====================================================================== strategies

# Any code point, lone surrogates included (st.text() leaves them out by default): JSON
# escapes such as "\\ud800" put them in client strings.
ALL_CHARS = st.characters(codec=None, exclude_categories=())


def utext(min_size: int = 0, max_size: int | None = None) -> st.SearchStrategy[str]:
    return st.text(ALL_CHARS, min_size=min_size, max_size=max_size)


def _repeat(piece: str, n: int) -> str:
    return piece * n


# Strings from empty to megabytes (built by repetition, so shrinking stays cheap), with
# any code point: lone surrogates, NUL, RTL marks, astral planes.
big_text = st.builds(_repeat, utext(min_size=1, max_size=4), st.integers(1, 400_000))
huge_int = st.integers(min_value=-(10 ** 4200), max_value=10 ** 4200)
small_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats() | utext(max_size=40)
    | st.sampled_from([0, -1, 16000, 44100, 48000, 192000, 2 ** 63, 1e309, -1e309, 16000.0, 1e-400])
)
json_scalars = small_scalars | huge_int | big_text
json_values = st.recursive(
    json_scalars,
    lambda children: (st.lists(children, max_size=6)
                      | st.dictionaries(utext(max_size=12), children, max_size=6)),
    max_leaves=25,
)
# Wide rather than deep: thousands of items or keys (of small values: a few MB in all).
wide_values = (
    st.builds(lambda v, n: [v] * n, small_scalars, st.integers(0, 30_000))
    | st.builds(lambda n, w: {f"key{i}" + "x" * w: i for i in range(n)}, st.integers(0, 5_000), st.integers(0, 40))
)
field_values = json_values | wide_values
field_keys = st.sampled_from(CONFIG_KEYS) | utext(max_size=20) | big_text

# Number spellings that the json module treats specially.
odd_numbers = st.sampled_from([
    "1e309", "-1e309", "NaN", "-NaN", "Infinity", "-Infinity", "nan", "inf", "1" * 4300, "1" * 4301,
    "-" + "9" * 5000, "0.0", "-0", "1e-400", "16000.0", "1.6e4", "0x3e80", "016000", "+16000",
])


def _nest(depth: int, opener: str, leaf: str) -> str:
    closer = {"[": "]", '{"a":': "}"}[opener]
    return opener * depth + leaf + closer * depth


deep_json = st.builds(_nest, st.integers(1, 3000), st.sampled_from(["[", '{"a":']), st.sampled_from(["", "1", '"x"']))
start_messages = st.fixed_dictionaries(
    {"type": st.just("start")},
    optional={**{k: field_values for k in CONFIG_KEYS}, "sampel_rate": json_values},
).map(lambda d: json.dumps(d))
# Start messages whose values are plausible: these also reach build_config's range checks.
plausible = {
    "sample_rate": st.sampled_from(STANDARD_RATES) | st.integers(-10, 300_000) | st.sampled_from(["16000", None]),
    "encoding": st.sampled_from(ENCODINGS) | utext(max_size=10),
    "language": st.sampled_from(["auto", "en", "EN", " zh ", "zh-yue", "xx", "en_US", "", "\u212an"])
    | utext(max_size=10),
    "interim_results": st.booleans() | st.sampled_from(["true", "0", 1, None]),
    "endpointing_ms": st.none() | st.integers(-10, 10_000),
    "max_segment_ms": st.none() | st.integers(-10, 100_000),
}
plausible_starts = st.fixed_dictionaries({"type": st.just("start")}, optional=plausible).map(json.dumps)
messages = (
    utext(max_size=200)
    | big_text
    | json_values.map(lambda v: json.dumps(v))
    | st.builds(lambda kind, rest: json.dumps({"type": kind, **rest}),
                field_values | st.sampled_from(["start", "finalize", "keepalive", "stop", "Stop", "stop "]),
                st.dictionaries(utext(max_size=10), json_values, max_size=4))
    | odd_numbers.map(lambda n: '{"type":"start","sample_rate":%s}' % n)
    | odd_numbers
    | deep_json
    | deep_json.map(lambda d: '{"type":%s}' % d)
    | deep_json.map(lambda d: '{"type":"start","sample_rate":%s}' % d)
    | start_messages
    | plausible_starts
)

query_values = (
    utext(max_size=20) | big_text
    | st.integers(-100_000, 300_000).map(str)
    | st.sampled_from(["16000", " 8000 ", "1e4", "16000.0", "٣٣٣٣", "true", "FALSE", "0", "auto", "mulaw", ""])
)
queries = st.dictionaries(st.sampled_from(CONFIG_KEYS + ("token",)) | utext(max_size=30) | big_text,
                          query_values, max_size=12)
# Thousands of unknown parameters (?a0=&a1=&...): the error must not list them all.
many_keys = st.builds(lambda n, w: {f"p{i:05d}" + "y" * w: "" for i in range(n)},
                      st.integers(1, 5_000), st.integers(0, 60))
# The model's codes (ModelRunner.languages()): trusted, so plain text (no lone surrogates).
language_sets = st.none() | st.frozensets(st.text(min_size=1, max_size=12), max_size=40).map(lambda s: s | {"auto"}) \
    | st.sampled_from([frozenset({"auto", "en", "zh", "yue", "ja", "ko", "nospeech"}), frozenset({"en"}),
                       frozenset({"auto"} | {f"l{i:05d}" for i in range(3000)})])


# ====================================================================== shared checks

def check_error(e: ProtocolError, codes: set[str] = PROTOCOL_CODES) -> None:
    """A protocol error is safe to send back: known code, short message, valid UTF-8 JSON."""
    assert type(e.code) is str and e.code in codes, e.code
    assert type(e.message) is str and 0 < len(e.message) <= MAX_MESSAGE, (len(e.message), e.message[:200])
    assert isinstance(e.fatal, bool)
    out = native.error(e.code, e.message, e.fatal)
    out.encode("utf-8")  # no lone surrogates: the WebSocket layer must be able to send it
    assert json.loads(out)["message"] == e.message


def check_config(cfg: StreamConfig, limit: int, languages) -> None:
    """Every value of a config build_config returned is in its documented range."""
    assert isinstance(cfg, StreamConfig)
    assert type(cfg.sample_rate) is int and cfg.sample_rate in STANDARD_RATES
    assert cfg.encoding in ENCODINGS
    assert type(cfg.language) is str
    assert cfg.language == "auto" or (2 <= len(cfg.language) <= 8 and set(cfg.language) <= set("abcdefghijklmnopqrstuvwxyz-"))
    if languages is not None:
        assert cfg.language in languages
    assert type(cfg.interim_results) is bool
    assert cfg.endpointing_ms is None or (type(cfg.endpointing_ms) is int and 100 <= cfg.endpointing_ms <= 5000)
    assert cfg.max_segment_ms is None or (type(cfg.max_segment_ms) is int and 1000 <= cfg.max_segment_ms <= limit)
    json.loads(native.ready("s", cfg, {}))  # the config can be sent back


def try_parse_text(text: str):
    try:
        msg = parse_text(text)
    except ProtocolError as e:
        check_error(e)
        return None
    assert isinstance(msg, (Start, Finalize, KeepAlive, Stop)), msg
    if isinstance(msg, Start):
        assert set(msg.config_fields) <= set(CONFIG_KEYS)
    return msg


def try_build_config(fields, limit: int = 30000, languages=None, default_language: str = "auto"):
    try:
        cfg = build_config(fields, default_language=default_language, max_segment_ms_limit=limit,
                           languages=languages)
    except ProtocolError as e:
        check_error(e, {"bad_config"})
        assert e.fatal
        return None
    check_config(cfg, limit, languages)
    return cfg


# ====================================================================== protocol: parse_text

@FAST
@given(messages)
def test_parse_text_returns_a_message_or_a_bounded_protocol_error(text):
    msg = try_parse_text(text)
    if isinstance(msg, Start):
        # what the transport does next with it
        try_build_config(msg.config_fields)


_ECHO_TEMPLATES = {
    "value": lambda v: json.dumps(v),
    "type": lambda v: json.dumps({"type": v}),
    "start key": lambda v: json.dumps({"type": "start", str(v): 1}),
    "start value": lambda v: json.dumps({"type": "start", "encoding": v}),
    "query key": lambda v: {str(v): "1"},
    "query value": lambda v: {"sample_rate": str(v)},
}


@MEDIUM
@given(field_values, st.sampled_from(sorted(_ECHO_TEMPLATES)))
def test_client_input_is_never_echoed_unbounded(value, where):
    """The reflection defect: a 3 MB ``type`` (or key, or value) came back as a 3 MB error."""
    made = _ECHO_TEMPLATES[where](value)
    if isinstance(made, str):
        msg = try_parse_text(made)
        if isinstance(msg, Start):
            try_build_config(msg.config_fields)
    else:
        try:
            fields = parse_query(made)
        except ProtocolError as e:
            check_error(e, {"bad_config"})
            return
        try_build_config(fields)


@MEDIUM
@given(plausible_starts, language_sets, st.integers(1000, 60_000))
def test_plausible_start_messages_give_a_valid_config_or_bad_config(text, languages, limit):
    msg = try_parse_text(text)
    if isinstance(msg, Start):
        try_build_config(msg.config_fields, limit=limit, languages=languages)


@pytest.mark.parametrize("template", ['{"type":%s}', '{"type":"start","sample_rate":%s}',
                                      '{"type":"start","language":%s}', '{"type":"start","x":%s}', "%s"])
def test_every_nesting_depth_around_the_recursion_limit(template):
    # A value json.loads just manages to parse must not make the error path (repr, dumps)
    # overflow the stack: every depth up to past the recursion limit is tried.
    for depth in range(1, sys.getrecursionlimit() + 50):
        for opener in ("[", '{"a":'):
            try_parse_text(template % _nest(depth, opener, "1"))


# Built when the test runs (not at collection): megabytes each.
MEGABYTE_REQUESTS = {
    "3 MB type": lambda: '{"type":"' + "A" * 3_000_000 + '"}',
    "3 MB start key": lambda: '{"type":"start","' + "k" * 3_000_000 + '":1}',
    "100k start keys": lambda: '{"type":"start",' + ",".join(f'"k{i}":1' for i in range(100_000)) + "}",
    "3 MB encoding": lambda: '{"type":"start","encoding":"' + "e" * 3_000_000 + '"}',
    "1M-item sample_rate": lambda: '{"type":"start","sample_rate":[' + ",".join(["1"] * 1_000_000) + "]}",
    "4299-digit sample_rate": lambda: '{"type":"start","sample_rate":' + "9" * 4299 + "}",
    "3 MB interim_results": lambda: '{"type":"start","interim_results":"' + "y" * 3_000_000 + '"}',
    "3 MB key in language": lambda: '{"type":"start","language":{"' + "a" * 3_000_000 + '":1}}',
    "1 MB string in type": lambda: '{"type":["' + "x" * 1_000_000 + '"]}',
    "lone surrogates in type": lambda: '{"type":"\\ud800' + "\\udfff" * 1000 + '"}',
}


@pytest.mark.parametrize("name", sorted(MEGABYTE_REQUESTS))
def test_known_megabyte_requests_get_short_errors(name):
    msg = try_parse_text(MEGABYTE_REQUESTS[name]())
    if isinstance(msg, Start):
        try_build_config(msg.config_fields)


# ====================================================================== protocol: query + build_config

@FAST
@given(queries | many_keys, language_sets, st.integers(1000, 60_000))
def test_parse_query_then_build_config(query, languages, limit):
    try:
        fields = parse_query(query)
    except ProtocolError as e:
        check_error(e, {"bad_config"})
        return
    assert set(fields) <= set(CONFIG_KEYS) and all(fields[k] == query[k] for k in fields)
    try_build_config(fields, limit=limit, languages=languages)


@FAST
@given(st.dictionaries(field_keys, field_values, max_size=8) | many_keys, language_sets,
       st.integers(1000, 60_000), st.sampled_from(["auto", "en", "xx"]))
def test_build_config_on_arbitrary_fields(fields, languages, limit, default_language):
    try_build_config(fields, limit=limit, languages=languages, default_language=default_language)


@FAST
@given(st.fixed_dictionaries({}, optional=plausible), language_sets)
def test_build_config_on_plausible_fields(fields, languages):
    cfg = try_build_config(fields, languages=languages)
    if cfg is not None and fields.get("sample_rate") is not None:
        assert cfg.sample_rate == int(fields["sample_rate"])


@FAST
@given(st.sampled_from(STANDARD_RATES) | st.integers(0, 400_000), st.booleans())
def test_only_standard_sample_rates_are_accepted(rate, as_text):
    value = str(rate) if as_text else rate
    cfg = try_build_config({"sample_rate": value})
    assert (cfg is not None) == (rate in STANDARD_RATES)


# ====================================================================== protocol: server -> client builders

# What models put in extras and model info (server-side values, so plain text): any scalars,
# NaN and inf included, nested containers, non-string keys, objects JSON cannot hold.
model_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    | st.sampled_from([object(), b"bytes", {1, 2}, 1 + 2j]),
    lambda c: st.lists(c, max_size=4) | st.tuples(c, c) | st.dictionaries(st.text(max_size=8) | st.integers(), c,
                                                                          max_size=4),
    max_leaves=12,
)
model_fields = st.dictionaries(st.sampled_from(["type", "text", "segment_id", "cut_ms", "start_ms", "end_ms",
                                                "language", "emotion", "score"]) | st.text(max_size=10)
                               | st.integers(), model_values, max_size=8)


word_lists = st.one_of(st.none(), st.lists(st.builds(Word, st.text(max_size=20), st.integers(0, 2 ** 40),
                                                     st.integers(0, 2 ** 40)), max_size=5))


@MEDIUM
@given(st.integers(0, 2 ** 40), st.text(max_size=200), st.integers(0, 2 ** 40), st.integers(0, 2 ** 40),
       model_fields, st.sampled_from(["partial", "final"]), word_lists)
def test_result_messages_are_json_with_core_keys_intact(segment_id, text, start_ms, end_ms, fields, kind, words):
    out = (native.partial(segment_id, text, start_ms, end_ms, fields, words) if kind == "partial" else
           native.final(segment_id, text, start_ms, end_ms, end_ms + 1, fields, words))
    out.encode("utf-8")
    msg = json.loads(out)  # strict JSON: no NaN/Infinity tokens
    assert msg["type"] == kind and msg["segment_id"] == segment_id and msg["text"] == text
    assert (msg["start_ms"], msg["end_ms"]) == (start_ms, end_ms)
    want_words = [{"word": w.word, "start_ms": w.start_ms, "end_ms": w.end_ms} for w in words or ()]
    if kind == "final" or words is not None:
        assert msg.pop("words") == want_words
    assert "words" not in msg
    for k, v in msg.items():
        assert v is None or isinstance(v, (str, int, float, bool)), (k, v)
        assert not isinstance(v, float) or math.isfinite(v)


@MEDIUM
@given(model_fields, st.text(max_size=40))
def test_ready_carries_any_model_info(model, session_id):
    json.loads(native.ready(session_id, StreamConfig(), model), parse_constant=pytest.fail)


# ====================================================================== audio: codecs.decode

float32_bytes = st.lists(st.floats(width=32), max_size=300).map(lambda v: np.array(v, dtype="<f4").tobytes())
special_floats = st.lists(
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0, -0.0, 1.0, -1.0, 1.0000001, 3.4e38, 1e-45]),
    min_size=1, max_size=20,
).map(lambda v: np.array(v, dtype="<f4").tobytes())
# Every NaN payload (quiet and signalling, either sign): bytes a float parser never makes.
nan_payloads = st.lists(st.integers(0, 2 ** 23 - 1), min_size=1, max_size=20).map(
    lambda m: np.array([0x7F800000 | x | (1 if x == 0 else 0) for x in m], dtype="<u4").tobytes())
audio_bytes = st.binary(max_size=2048) | float32_bytes | special_floats | nan_payloads


def check_samples(x: np.ndarray, n: int) -> None:
    assert isinstance(x, np.ndarray) and x.dtype == np.float32 and x.ndim == 1 and len(x) == n
    assert np.isfinite(x).all()
    assert (np.abs(x) <= 1.0).all()


@FAST
@given(audio_bytes, st.sampled_from(ENCODINGS) | utext(max_size=12))
def test_decode_gives_finite_samples_in_range_or_audio_format_error(data, encoding):
    try:
        x = decode(data, encoding)
    except AudioFormatError as e:
        assert 0 < len(str(e)) <= MAX_MESSAGE
        return
    assert encoding in ENCODINGS
    check_samples(x, len(data) // BYTES_PER_SAMPLE[encoding])


@FAST
@given(nan_payloads | special_floats, st.binary(max_size=64))
def test_decode_never_lets_nan_or_inf_through(bad, good):
    data = good[: len(good) - len(good) % 4] + bad
    try:
        x = decode(data, "pcm_f32le")
    except AudioFormatError:
        return
    check_samples(x, len(data) // 4)


@FAST
@given(st.lists(st.floats(-4.0, 4.0, width=32), max_size=200), st.sampled_from(ENCODINGS))
def test_encode_decode_round_trip_is_close_and_saturates(values, encoding):
    x = np.array(values, dtype=np.float32)
    y = decode(encode(x, encoding), encoding)
    check_samples(y, len(x))
    # G.711's coarsest step is 1024 (of 32768) and it saturates at 32124 (mu-law)
    tol = {"pcm_s16le": 1.0, "pcm_f32le": 0.0, "mulaw": 645.0, "alaw": 513.0}[encoding] / 32768
    assert np.all(np.abs(y - np.clip(x, -1, 1)) <= tol + 1e-7)


# ====================================================================== audio: WAV files

def _riff(chunks: list[tuple[bytes, bytes]], riff_size: int | None = None) -> bytes:
    body = b"WAVE"
    for cid, payload in chunks:
        body += cid + struct.pack("<I", len(payload)) + payload + (b"\x00" if len(payload) & 1 else b"")
    return b"RIFF" + struct.pack("<I", len(body) if riff_size is None else riff_size) + body


@st.composite
def wav_files(draw) -> bytes:
    """A WAV file, usually well-formed (any supported kind), often with a lying or broken header."""
    supported = {1: [8, 16, 24, 32], 3: [32, 64], 6: [8], 7: [8]}
    if draw(st.integers(0, 3)):  # mostly a consistent header, so that reading gets far
        tag = draw(st.sampled_from([1, 3, 6, 7, 0xFFFE]))
        sub = draw(st.sampled_from([1, 3, 6, 7]))
        bits = draw(st.sampled_from(supported[sub if tag == 0xFFFE else tag]))
        channels = draw(st.integers(1, 4))
        block = channels * bits // 8
    else:
        tag = draw(st.sampled_from([1, 3, 6, 7, 2, 0xFFFE, 0]))
        sub = draw(st.sampled_from([1, 3, 6, 7, 2, 0xFFFE]))
        bits = draw(st.sampled_from([8, 16, 24, 32, 64, 0, 4, 12, 20, 48]))
        channels = draw(st.integers(0, 6))
        block = draw(st.just(channels * ((bits + 7) // 8)) | st.integers(0, 2 ** 16 - 1))
    standard = st.sampled_from(STANDARD_RATES + (MIN_RATE, MAX_RATE, 44099, 176400))
    rate = draw(st.one_of(standard, standard, st.sampled_from((0, 1, 7, 999, 768_001, 2 ** 32 - 1)),
                          st.integers(0, 2 ** 32 - 1)))
    frames = draw(st.sampled_from([0, 1, 2, 100, 300]) | st.integers(0, 300))
    if tag == 3 and bits == 32 and draw(st.booleans()):  # plausible float audio, NaN/inf sometimes
        payload = np.array(draw(st.lists(st.floats(width=32), max_size=frames * channels)), "<f4").tobytes()
    else:
        size = min(4096, frames * block)
        payload = draw(st.binary(min_size=size, max_size=size) | st.binary(max_size=size))
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * block % 2 ** 32, block, bits)
    if tag == 0xFFFE:
        fmt += struct.pack("<HHI", 22, bits, 0) + struct.pack("<H", sub) + b"\x00" * 14
    chunks = [(b"fmt ", fmt), (b"data", payload)]
    if draw(st.booleans()):
        chunks.insert(draw(st.integers(0, 2)), (draw(st.sampled_from([b"LIST", b"fact", b"data", b"fmt "])),
                                                draw(st.binary(max_size=40))))
    data = bytearray(_riff(chunks))
    # Mutations (none half the time): flip bytes, lie about sizes, truncate, append.
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2, 4]))):
        kind = draw(st.sampled_from(["byte", "size", "truncate", "append"]))
        if kind == "byte" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif kind == "size" and len(data) >= 8:
            at = draw(st.sampled_from([4, 16, 40, 44, len(data) - 4] + [i + 4 for i in range(12, len(data) - 8)
                                                                         if data[i:i + 4] in (b"data", b"fmt ")]))
            if at + 4 <= len(data):
                data[at:at + 4] = struct.pack("<I", draw(st.sampled_from([0, 1, 15, 16, 39, 2 ** 31, 2 ** 32 - 1])
                                                         | st.integers(0, 2 ** 32 - 1)))
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif kind == "append":
            data += draw(st.binary(max_size=64))
    return bytes(data)


@pytest.fixture(scope="module")
def wav_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "f.wav"


def _read(path: Path, data: bytes):
    path.write_bytes(data)
    try:
        x, rate = read_wav(path)
    except AudioFormatError as e:
        assert 0 < len(str(e)) <= MAX_MESSAGE + len(str(path))
        return None
    # No header can make the reader produce more samples than there are bytes.
    check_samples(x, len(x))
    assert len(x) <= len(data)
    assert type(rate) is int and MIN_RATE <= rate <= MAX_RATE, rate
    return x, rate


@MEDIUM
@given(wav_files() | st.binary(max_size=512) | st.binary(max_size=64).map(lambda b: b"RIFF\xff\xff\xff\xffWAVE" + b))
def test_read_wav_on_arbitrary_and_mutated_files(wav_path, data):
    _read(wav_path, data)


@MEDIUM
@given(wav_files())
def test_load_audio_16k_output_is_bounded_by_the_file(wav_path, data):
    if _read(wav_path, data) is None:
        return
    y = load_audio_16k(wav_path)
    # 16 kHz from at least MIN_RATE: a bounded number of output samples per input byte, whatever
    # the header says. (Not checked: |y| <= 1; band-limited resampling may overshoot full scale.)
    assert y.dtype == np.float32 and y.ndim == 1 and np.isfinite(y).all()
    assert len(y) <= 16000 // MIN_RATE * len(data) + 16


# ====================================================================== endpointer

@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    x, rate = read_wav(DATA / "sense_and_sensibility_01_austen_64kb-0880.wav")
    assert rate == 16000
    return x


endpointer_settings = st.builds(
    EndpointerSettings,
    frame_ms=st.sampled_from([10, 20, 30]),
    aggressiveness=st.integers(0, 3),
    pre_roll_ms=st.integers(0, 600),
    start_speech_ms=st.integers(0, 300),
    endpoint_ms=st.integers(0, 1500),
    min_speech_ms=st.integers(0, 600),
    max_segment_ms=st.integers(60, 4000),
)


@st.composite
def signals(draw, speech: np.ndarray) -> np.ndarray:
    """Up to ~5 s of speech pieces, silence, noise, tones and extreme (finite) values."""
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    parts = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["speech", "speech", "silence", "noise", "tone", "extreme", "values"]))
        n = draw(st.sampled_from([0, 1, 479, 4800, 16000, 32000]) | st.integers(0, 32000))
        if kind == "speech":
            at = draw(st.integers(0, len(speech) - 1))
            parts.append(speech[at:at + n] * np.float32(draw(st.sampled_from([1.0, 0.1, 4.0]))))
        elif kind == "silence":
            parts.append(np.zeros(n, np.float32))
        elif kind == "noise":
            parts.append((rng.standard_normal(n) * draw(st.sampled_from([0.001, 0.1, 1.0]))).astype(np.float32))
        elif kind == "tone":
            t = np.arange(n) / 16000
            parts.append((0.5 * np.sin(2 * np.pi * draw(st.integers(50, 7900)) * t)).astype(np.float32))
        elif kind == "extreme":
            big = np.float32(draw(st.sampled_from([1.0, 1e10, 3.4e38])))
            parts.append(rng.choice(np.array([-big, big, 0, 1e-45], np.float32), n))
        else:
            parts.append(np.array(draw(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False),
                                                max_size=500)), np.float32))
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def _chunks(draw, n: int) -> list[tuple[int, int]]:
    """Consecutive [a, b) spans covering 0..n, empty ones included."""
    out, at = [], 0
    while at < n:
        size = draw(st.sampled_from([0, 1, 7, 160, 320, 479, 480, 481, 1600, 16000]) | st.integers(0, 20000))
        out.append((at, min(n, at + size)))
        at = min(n, at + size)
    out.append((n, n))
    return out


def _run(settings_: EndpointerSettings, x: np.ndarray, spans, finalize_after=frozenset()) -> list:
    with warnings.catch_warnings():
        # numpy's RuntimeWarnings (overflow, invalid cast) count as failures: on a server they
        # are log noise at best, and an exception under -W error.
        warnings.simplefilter("error")
        return _run_quietly(settings_, x, spans, finalize_after)


def _run_quietly(settings_: EndpointerSettings, x: np.ndarray, spans, finalize_after) -> list:
    ep = Endpointer(settings_)
    events: list = []
    for i, (a, b) in enumerate(spans):
        new = ep.feed(x[a:b])
        events += new
        assert ep.stream_ms == b // 16
        if i in finalize_after:
            events += ep.finalize()
        opened = ep.open_segment()
        if opened is not None:
            sid, start_ms, view = opened
            assert not view.flags.writeable
            assert np.array_equal(view, x[start_ms * 16:start_ms * 16 + len(view)])
    events += ep.flush()
    assert ep.flush() == []
    with pytest.raises(RuntimeError):
        ep.feed(np.zeros(1, np.float32))
    return events


def _check_events(events: list, x: np.ndarray, s: EndpointerSettings) -> None:
    started: list[int] = []
    ended: list[int] = []
    last_end = 0
    for e in events:
        if isinstance(e, SpeechStarted):
            assert len(started) == len(ended)  # one segment open at a time
            started.append(e.segment_id)
            continue
        assert isinstance(e, SegmentEnded)
        assert started and e.segment_id == started[-1] and len(ended) == len(started) - 1
        ended.append(e.segment_id)
        assert e.reason in ("silence", "max_length", "finalize", "flush")
        assert last_end <= e.start_ms <= e.end_ms <= e.cut_ms <= len(x) // 16
        assert e.end_ms - e.start_ms <= s.max_segment_ms
        assert e.audio.dtype == np.float32 and len(e.audio) == 16 * (e.end_ms - e.start_ms)
        assert np.array_equal(e.audio, x[e.start_ms * 16:e.end_ms * 16])
        last_end = e.end_ms
    assert started == list(range(len(started)))  # 0, 1, 2, ...: increasing by one
    assert ended == started  # every started segment ends (flush ends the last)
    event(f"segments: {min(len(started), 3)}{'+' if len(started) >= 3 else ''}")


def _key(events: list) -> list:
    return [(type(e).__name__, e.segment_id, e.start_ms) if isinstance(e, SpeechStarted) else
            (type(e).__name__, e.segment_id, e.start_ms, e.end_ms, e.cut_ms, e.reason, e.audio.tobytes())
            for e in events]


@SLOW
@given(data=st.data(), s=endpointer_settings)
def test_endpointer_on_arbitrary_chunks(speech, data, s):
    x = data.draw(signals(speech))
    spans = _chunks(data.draw, len(x))
    events = _run(s, x, spans)
    _check_events(events, x, s)
    # Documented: the same audio gives the same events however it is chunked.
    other = _chunks(data.draw, len(x))
    assert _key(_run(s, x, other)) == _key(events)


@SLOW
@given(data=st.data(), s=endpointer_settings)
def test_endpointer_with_finalize_between_chunks(speech, data, s):
    x = data.draw(signals(speech))
    spans = _chunks(data.draw, len(x))
    finalize_after = data.draw(st.frozensets(st.integers(0, len(spans) - 1), max_size=4))
    _check_events(_run(s, x, spans, finalize_after), x, s)
