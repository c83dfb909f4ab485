"""The Twilio Media Streams codec (server/protocol/twilio.py), on messages shaped as Twilio's
documentation shows them, and the request-signature algorithm on Twilio's documented example."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.protocol.twilio import (
    Connected, Dtmf, Mark, Media, Other, Start, Stop, TwilioError, options, parse, signature, signature_valid,
)

START = {"event": "start", "sequenceNumber": "1", "streamSid": "MZ18ad3ab5a668481ce02b83e7395059f0",
         "start": {"accountSid": "AC123", "streamSid": "MZ18ad3ab5a668481ce02b83e7395059f0", "callSid": "CA456",
                   "tracks": ["inbound", "outbound"],
                   "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                   "customParameters": {"language": "en", "crm_id": "42"}}}


def media(**fields) -> str:
    body = {"track": "inbound", "chunk": "2", "timestamp": "5", "payload": base64.b64encode(b"\xff\x7f\x00").decode()}
    body.update(fields)
    return json.dumps({"event": "media", "sequenceNumber": "3", "media": body, "streamSid": "MZ1"})


def start(**changes) -> str:
    msg = json.loads(json.dumps(START))
    msg["start"].update(changes)
    return json.dumps(msg)


def test_each_message_type():
    assert parse('{"event":"connected","protocol":"Call","version":"1.0.0"}') == Connected("Call", "1.0.0")
    s = parse(json.dumps(START))
    assert s == Start("MZ18ad3ab5a668481ce02b83e7395059f0", "CA456", "AC123", ("inbound", "outbound"), "mulaw", 8000,
                      {"language": "en", "crm_id": "42"})
    assert parse(media()) == Media("inbound", 5, b"\xff\x7f\x00")
    assert parse(media(track="outbound", timestamp="120")) == Media("outbound", 120, b"\xff\x7f\x00")
    assert parse('{"event":"dtmf","streamSid":"MZ1","sequenceNumber":"5","dtmf":{"track":"inbound_track","digit":"1"}}') == Dtmf("inbound", "1")
    assert parse('{"event":"mark","sequenceNumber":"4","streamSid":"MZ1","mark":{"name":"my label"}}') == Mark("my label")
    assert parse('{"event":"stop","sequenceNumber":"5","streamSid":"MZ1","stop":{"accountSid":"AC1","callSid":"CA1"}}') == Stop()
    assert parse('{"event":"clear-future-thing","x":1}') == Other("clear-future-thing")
    assert parse(start(mediaFormat={"encoding": "audio/x-alaw", "sampleRate": "8000", "channels": "1"})).encoding == "alaw"


@pytest.mark.parametrize("text,code", [
    ("not json", "bad_json"), ("[1]", "bad_json"), ('{"streamSid":"x"}', "bad_message"),
    (media(payload="@@@"), "bad_media"), (media(payload=5), "bad_media"), (media(payload="A" * 100_000), "bad_media"),
    (media(timestamp="soon"), "bad_media"), (media(track="both"), "bad_track"),
    ('{"event":"media","media":"x"}', "bad_media"),
    ('{"event":"dtmf","dtmf":{"track":"inbound_track","digit":"X"}}', "bad_dtmf"),
    ('{"event":"dtmf","dtmf":{"track":"inbound_track","digit":"12"}}', "bad_dtmf"),
    (start(callSid=None), "bad_start"), (start(callSid="has space"), "bad_start"),
    (start(tracks=[]), "bad_start"), (start(tracks="inbound"), "bad_start"), (start(tracks=["sideways"]), "bad_track"),
    (start(mediaFormat={"encoding": "audio/x-l16", "sampleRate": 8000, "channels": 1}), "unsupported_format"),
    (start(mediaFormat={"encoding": "audio/x-mulaw", "sampleRate": 16000, "channels": 1}), "unsupported_format"),
    (start(mediaFormat={"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 2}), "unsupported_format"),
    (start(customParameters=["a"]), "bad_start"), ('{"event":"start","start":5}', "bad_start"),
])
def test_malformed(text, code):
    with pytest.raises(TwilioError) as info:
        parse(text)
    assert info.value.code == code


def test_options_and_bounded_parameters():
    assert options({"language": "en", "crm_id": "42", "endpointing_ms": "300"}) == {"language": "en", "endpointing_ms": "300"}
    many = {f"k{i}": "v" * 5000 for i in range(200)}
    s = parse(start(customParameters=many))
    assert len(s.custom) == 64 and all(len(v) == 1024 for v in s.custom.values())


def test_signature_on_twilios_documented_example():
    # Twilio's security documentation: auth token 12345, this URL and these POST parameters sign
    # to GvWf1cFY/Q7PnoempGyD5oXAezc= (the URL, then each parameter's name and value, sorted).
    url = "https://mycompany.com/myapp.php?foo=1&bar=2"
    params = {"CallSid": "CA1234567890ABCDE", "Caller": "+14158675310", "Digits": "1234",
              "From": "+14158675310", "To": "+18005551212"}
    signed = url + "".join(k + params[k] for k in sorted(params))
    assert signature("12345", signed) == "GvWf1cFY/Q7PnoempGyD5oXAezc="
    assert signature_valid("12345", "GvWf1cFY/Q7PnoempGyD5oXAezc=", ["wss://other/v1/twilio", signed])
    assert not signature_valid("12346", "GvWf1cFY/Q7PnoempGyD5oXAezc=", [signed])
    assert not signature_valid("12345", "", [signed])
    assert not signature_valid("12345", "GvWf1cFY/Q7PnoempGyD5oXAezc=", [])


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                           max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), json_values.map(json.dumps),
                 st.dictionaries(st.sampled_from(["event", "media", "start", "dtmf", "mark"]),
                                 st.one_of(st.sampled_from(["media", "start", "dtmf", "mark", "stop"]), json_values)).map(json.dumps)))
def test_fuzz_only_twilio_errors(text):
    try:
        parse(text)
    except TwilioError:
        pass
