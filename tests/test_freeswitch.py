"""FreeSWITCH's mod_audio_stream (and PCM-over-WebSocket forks like it) on the native protocol.

The sender below does what mod_audio_stream's documentation says it does: it opens the
URL given to ``uuid_audio_stream <uuid> start <url> <mix-type> <rate> <metadata>`` (config
in the query string), sends the metadata as its first text frame, then binary L16 frames
of 20 ms (``stereo``: two interleaved channels, caller first), may send more text
(``send_text``), and on ``stop`` just closes the socket. With ``call_id`` in the URL, the
call's transcripts reach the application (webhook, /v1/calls) as well as the socket. Audio goes
faster than real time: no claim here is about time (the stream's clock is its audio).
"""

from __future__ import annotations

import asyncio
import json
from typing import Callable

import numpy as np
import soxr
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from server.audio.codecs import to_pcm16
from tests.callrecorder import CallRecorder
from tests.serverharness import DATA, ServerThread, clip_wer, make_config, read_clip
from tests.telephony import reference_bound
from tests.waiting import async_wait_until

JFK = DATA / "jfk.wav"
SHORT = DATA / "sense_and_sensibility_01_austen_64kb-0880.wav"
CALL = "0b5f1c3e-8d2a-4c7b-9e61-3f0a2d4b5c6e"


async def audio_stream(url: str, channels: list[np.ndarray], rate: int, *, metadata: str | None = None,
                       send_text_at_ms: dict[int, str] | None = None, extra_binary: list[bytes] | None = None,
                       speed: float | None = None, until: Callable[[list[dict]], bool]) -> list[dict]:
    """Stream like mod_audio_stream (``speed`` x real time; None: as fast as the socket takes
    it); close without a stop message once what the server sent satisfies ``until``. Returns
    what the server sent."""
    n = max(len(c) for c in channels)
    pcm = np.zeros((n, len(channels)), dtype=np.int16)
    for i, c in enumerate(channels):
        pcm[:len(c), i] = to_pcm16(c)
    frame = rate // 50  # 20 ms
    received: list[dict] = []
    loop = asyncio.get_running_loop()
    async with connect(url) as ws:
        async def reader() -> None:
            try:
                async for msg in ws:
                    received.append(json.loads(msg))
            except ConnectionClosed:
                pass

        rd = asyncio.create_task(reader())
        if metadata is not None:
            await ws.send(metadata)
        for raw in extra_binary or ():
            await ws.send(raw)
        t0 = loop.time()
        for i, start in enumerate(range(0, n, frame)):
            await ws.send(pcm[start:start + frame].astype("<i2").tobytes())  # interleaved: c0 c1 c0 c1 ...
            if send_text_at_ms and i * 20 in send_text_at_ms:
                await ws.send(send_text_at_ms[i * 20])
            if speed is None:
                continue
            delay = t0 + (i + 1) * 0.02 / speed - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        await async_wait_until(lambda: until(received), timeout=60, what="the server's answer the sender waits for")
        rd.cancel()
    return received


def test_stereo_call_two_speakers_and_metadata(whisper_runner):
    """`uuid_audio_stream <uuid> start ws://.../v1/stream?sample_rate=8000&channels=2&call_id=<uuid> stereo 8k
    {"campaign":"c-9"}`: caller and callee are two speakers with their own finals, on the socket
    (with `channel`) and on the call (tracks caller and callee), each as good as the clip alone
    at 16 kHz; the metadata frame is the call's metadata, not an error; closing without `stop`
    still delivers the call's last words to the application."""
    with ServerThread(make_config(), whisper_runner) as s:
        recorder = s.app.calls.sink = CallRecorder()
        bounds = {path: reference_bound(s, path) for path in (JFK, SHORT)}
        caller = soxr.resample(read_clip(JFK), 16000, 8000)
        # The callee answers after the caller's first sentence, as in a conversation.
        callee = np.concatenate([np.zeros(8000 * 3, dtype=np.float32), soxr.resample(read_clip(SHORT), 16000, 8000)])
        url = f"{s.url}?sample_rate=8000&encoding=pcm_s16le&channels=2&call_id={CALL}"
        # The sender hangs up once each speaker has had a final on the socket; the finals still
        # owed then go to the application only.
        got = asyncio.run(audio_stream(url, [caller, callee], 8000, metadata='{"campaign":"c-9"}',
                                       send_text_at_ms={4000: "agent note: escalated"}, extra_binary=[b"\x00" * 6],
                                       until=lambda got: {m.get("channel") for m in got if m["type"] == "final"} >= {0, 1}))
        events = recorder.wait_for(CALL, "call_ended", 60)

    ready = got[0]
    assert ready["type"] == "ready" and ready["config"]["channels"] == 2 and ready["config"]["call_id"] == CALL
    errors = [m for m in got if m["type"] == "error"]
    # 6 bytes is not a whole number of 4-byte stereo frames: that message alone is refused.
    assert [e["code"] for e in errors] == ["bad_audio"], errors
    finals = [m for m in got if m["type"] == "final"]
    assert {m["channel"] for m in finals} == {0, 1}
    for ch in (0, 1):
        ids = [m["segment_id"] for m in finals if m["channel"] == ch]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)

    assert events[0]["type"] == "call_started" and events[0]["source"] == "native"
    assert events[0]["metadata"] == {"campaign": "c-9"} and events[0]["tracks"] == ["caller", "callee"]
    assert [e["metadata"] for e in events if e["type"] == "metadata"] == [{"text": "agent note: escalated"}]
    assert events[-1]["type"] == "call_ended" and events[-1]["reason"] == "disconnected"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    text = {t: " ".join(e["text"] for e in events if e["type"] == "final" and e["track"] == t) for t in ("caller", "callee")}
    w_caller, w_callee = clip_wer(JFK, text["caller"]), clip_wer(SHORT, text["callee"])
    assert w_caller <= bounds[JFK] and w_callee <= bounds[SHORT], (text, bounds)
    callee_finals = [e for e in events if e["type"] == "final" and e["track"] == "callee" and e["text"]]
    assert callee_finals[0]["start_ms"] >= 2500  # the callee's clock is the call's: they spoke after 3 s
    # The socket saw the same finals as the application, channel by channel, up to its close (the
    # sender closed without waiting: the last words reached only the application).
    for ch, track in ((0, "caller"), (1, "callee")):
        on_socket = [m["text"] for m in finals if m["channel"] == ch]
        on_call = [e["text"] for e in events if e["type"] == "final" and e["track"] == track]
        assert on_socket == on_call[:len(on_socket)] and len(on_call) >= len(on_socket), (ch, on_socket, on_call)


def test_mono_without_call_id_is_a_plain_stream(whisper_runner):
    """No call_id: nothing is published as a call; a metadata frame is still not an error, and
    messages carry no `channel`."""
    with ServerThread(make_config(), whisper_runner) as s:
        recorder = s.app.calls.sink = CallRecorder()
        clip = soxr.resample(read_clip(SHORT), 16000, 8000)
        clip = np.concatenate([clip, np.zeros(8000 * 2, dtype=np.float32)])  # its end is heard before the socket closes
        got = asyncio.run(audio_stream(f"{s.url}?sample_rate=8000", [clip], 8000, metadata="hello from freeswitch",
                                       until=lambda got: any(m["type"] == "final" for m in got)))
    assert not [m for m in got if m["type"] == "error"], got
    finals = [m for m in got if m["type"] == "final"]
    assert finals and all("channel" not in m for m in finals)
    assert recorder.events == []
