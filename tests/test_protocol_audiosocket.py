"""The AudioSocket frame parser (server/protocol/audiosocket.py), against frames built here
with ``struct`` from Asterisk's protocol description."""

from __future__ import annotations

import struct
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.protocol.audiosocket import (
    AUDIO_RATES, HANGUP_FRAME, Audio, Dtmf, Error, FrameParser, Hangup, Invalid, Uuid, encode,
)


def frame(kind: int, payload: bytes = b"") -> bytes:
    return struct.pack(">BH", kind, len(payload)) + payload


CALL = uuid.UUID("6ba7b810-9dad-11d1-80b4-00c04fd430c8")
STREAM = (frame(0x01, CALL.bytes) + frame(0x10, b"\x01\x00" * 160) + frame(0x03, b"7")
          + frame(0x12, b"\xff\x7f" * 320) + frame(0xFF, b"\x02") + frame(0xFF) + frame(0x00))
EXPECTED = [Uuid("6ba7b810-9dad-11d1-80b4-00c04fd430c8"), Audio(8000, b"\x01\x00" * 160), Dtmf("7"),
            Audio(16000, b"\xff\x7f" * 320), Error(2), Error(None), Hangup()]


def test_rates_are_asterisks():
    assert AUDIO_RATES == {0x10: 8000, 0x11: 12000, 0x12: 16000, 0x13: 24000, 0x14: 32000, 0x15: 44100,
                           0x16: 48000, 0x17: 96000, 0x18: 192000}
    assert HANGUP_FRAME == b"\x00\x00\x00" and encode(0x03, b"1") == frame(0x03, b"1")


def test_whole_stream_in_one_chunk():
    assert FrameParser().feed(STREAM) == EXPECTED


def test_split_at_every_byte():
    for cut in range(1, len(STREAM)):
        p = FrameParser()
        assert p.feed(STREAM[:cut]) + p.feed(STREAM[cut:]) == EXPECTED, cut
        assert p.pending == 0


def test_byte_by_byte():
    p = FrameParser()
    out = []
    for i in range(len(STREAM)):
        out += p.feed(STREAM[i:i + 1])
    assert out == EXPECTED


def test_uuid_is_canonical_lower_case():
    (u,) = FrameParser().feed(frame(0x01, bytes.fromhex("0F1E2D3C4B5A69788796A5B4C3D2E1F0")))
    assert u == Uuid("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")


@pytest.mark.parametrize("bad,why", [
    (frame(0x42, b"xx"), "unknown frame kind 0x42"),
    (frame(0x10, b"\x00" * 161), "not whole 16-bit samples"),
    (frame(0x10), "not whole 16-bit samples"),
    (frame(0x01, b"\x00" * 15), "16 bytes"),
    (frame(0x01, b"\x00" * 17), "16 bytes"),
    (frame(0x03, b"12"), "one digit"),
    (frame(0x03, b"Z"), "one digit"),
    (frame(0x00, b"\x00"), "no payload"),
])
def test_malformed_frames_come_out_invalid_after_the_good_ones(bad, why):
    p = FrameParser()
    out = p.feed(frame(0x01, CALL.bytes) + bad + frame(0x10, b"\x00\x00"))
    assert out[0] == Uuid(str(CALL)) and len(out) == 2
    assert isinstance(out[1], Invalid) and why in out[1].message
    assert p.broken and p.feed(frame(0x00)) == []  # nothing after an invalid frame


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), max_size=20))
def test_any_bytes_parse_or_come_out_invalid(chunks):
    p = FrameParser()
    frames = []
    for c in chunks:
        frames += p.feed(c)
    assert all(isinstance(f, (Uuid, Audio, Dtmf, Hangup, Error, Invalid)) for f in frames)
    assert sum(isinstance(f, Invalid) for f in frames) <= 1
    if frames and isinstance(frames[-1], Invalid):
        assert p.broken
