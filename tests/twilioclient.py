"""A Twilio Media Streams sender, written from Twilio's public description of the messages.

It plays Twilio's side of a `<Start><Stream>`/`<Connect><Stream>`: it opens the WebSocket,
sends ``connected`` and ``start`` (callSid, streamSid, tracks, mediaFormat audio/x-mulaw
8000 Hz mono, customParameters), then one ``media`` frame per track every 20 ms (base64
mu-law, ``track``, ``chunk`` and ``timestamp`` in ms as strings, a ``sequenceNumber``),
optionally ``dtmf`` and ``mark``, and ``stop``. Twilio does not expect anything back on a
transcription stream; whatever the server sends is recorded.
"""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from server.audio.codecs import encode_mulaw

FRAME_MS = 20
FRAME_SAMPLES = 8000 * FRAME_MS // 1000


@dataclass
class TwilioRun:
    received: list[Any] = field(default_factory=list)
    close_code: int | None = None


class TwilioSender:
    def __init__(self, call_sid: str, stream_sid: str = "MZ00000000000000000000000000000001",
                 account_sid: str = "AC00000000000000000000000000000001") -> None:
        self.call_sid = call_sid
        self.stream_sid = stream_sid
        self.account_sid = account_sid
        self.seq = 0

    def _frame(self, event: str, body: dict[str, Any] | None = None) -> str:
        self.seq += 1
        msg: dict[str, Any] = {"event": event, "sequenceNumber": str(self.seq), "streamSid": self.stream_sid}
        if body:
            msg.update(body)
        return json.dumps(msg)

    def connected(self) -> str:
        return json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})

    def start(self, tracks: list[str], custom: dict[str, str] | None = None, encoding: str = "audio/x-mulaw",
              rate: int = 8000) -> str:
        return self._frame("start", {"start": {
            "accountSid": self.account_sid, "streamSid": self.stream_sid, "callSid": self.call_sid,
            "tracks": tracks, "mediaFormat": {"encoding": encoding, "sampleRate": rate, "channels": 1},
            "customParameters": custom or {},
        }})

    def media(self, track: str, chunk: int, timestamp_ms: int, mulaw: bytes) -> str:
        return self._frame("media", {"media": {"track": track, "chunk": str(chunk), "timestamp": str(timestamp_ms),
                                               "payload": base64.b64encode(mulaw).decode()}})

    def dtmf(self, digit: str, track: str = "inbound_track") -> str:
        return self._frame("dtmf", {"dtmf": {"track": track, "digit": digit}})

    def mark(self, name: str) -> str:
        return self._frame("mark", {"mark": {"name": name}})

    def stop(self) -> str:
        return self._frame("stop", {"stop": {"accountSid": self.account_sid, "callSid": self.call_sid}})


async def stop_and_wait_closed(ws, sender: "TwilioSender") -> int | None:
    """Send ``stop`` and read the socket until the server closes it; its close code."""
    await ws.send(sender.stop())
    try:
        async for _ in ws:
            pass
    except ConnectionClosed:
        pass
    return ws.close_code


async def twilio_call(
    url: str,
    call_sid: str,
    tracks: dict[str, np.ndarray],
    *,
    speed: float | None = 1.0,
    custom: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    stream_sid: str = "MZ00000000000000000000000000000001",
    dtmf_at_ms: dict[int, str] | None = None,
    timestamp_jump: tuple[int, int] | None = None,
    stop: bool = True,
    before_start: list[str | bytes] | None = None,
    after_start: list[str | bytes] | None = None,
) -> TwilioRun:
    """Stream ``tracks`` (8 kHz float audio per track name) as one Twilio stream, paced at
    ``speed`` x real time (None: as fast as the socket takes it), all tracks in step (one frame of
    each every 20 ms of audio).

    ``timestamp_jump=(at_ms, by_ms)``: from ``at_ms`` of audio on, timestamps run ``by_ms``
    ahead (frames Twilio did not send). ``stop=False`` closes the socket without ``stop``.
    ``before_start``/``after_start``: extra raw frames (malformed ones, say) sent there."""
    run = TwilioRun()
    sender = TwilioSender(call_sid, stream_sid)
    payloads = {name: encode_mulaw(np.asarray(x, dtype=np.float32)) for name, x in tracks.items()}
    frames = max(-(-len(p) // FRAME_SAMPLES) for p in payloads.values())
    loop = asyncio.get_running_loop()
    async with connect(url, additional_headers=headers or {}, max_size=None) as ws:
        async def reader() -> None:
            try:
                async for msg in ws:
                    run.received.append(msg)
            except ConnectionClosed:
                pass

        rd = asyncio.create_task(reader())
        try:
            await ws.send(sender.connected())
            for raw in before_start or ():
                await ws.send(raw)
            await ws.send(sender.start(list(tracks), custom))
            for raw in after_start or ():
                await ws.send(raw)
            t0 = loop.time()
            for i in range(frames):
                ms = i * FRAME_MS
                stamp = ms + (timestamp_jump[1] if timestamp_jump and ms >= timestamp_jump[0] else 0)
                for name, p in payloads.items():
                    chunk = p[i * FRAME_SAMPLES:(i + 1) * FRAME_SAMPLES]
                    if chunk:
                        await ws.send(sender.media(name, i + 1, stamp, chunk))
                if dtmf_at_ms and ms in dtmf_at_ms:
                    await ws.send(sender.dtmf(dtmf_at_ms[ms]))
                if speed is None:
                    continue
                delay = t0 + (i + 1) * FRAME_MS / 1000.0 / speed - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            if stop:
                await ws.send(sender.mark("end-of-audio"))
                await ws.send(sender.stop())
                await asyncio.wait_for(rd, 120)
        except ConnectionClosed:
            pass
        finally:
            run.close_code = ws.close_code
            rd.cancel()
    if run.close_code is None:
        run.close_code = ws.close_code
    return run
