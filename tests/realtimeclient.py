"""A small OpenAI Realtime transcription client, written from OpenAI's documentation (the
Realtime API reference and its transcription guide), not from Chorus's code.

It connects to ``<base>/v1/realtime?intent=transcription`` with ``Authorization: Bearer``,
sends JSON client events (``session.update`` / ``transcription_session.update``,
``input_audio_buffer.append`` with base64 audio, ``.commit``, ``.clear``) and records every
server event with the time it arrived.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from websockets.asyncio.client import ClientConnection, connect

from client_demo.pacing import send_paced


def ga_update(fmt: dict | None = None, turn_detection: Any = "default", language: str | None = None,
              model: str = "gpt-4o-transcribe", **transcription: Any) -> dict:
    """A GA ``session.update`` of a transcription session."""
    audio_in: dict[str, Any] = {"format": fmt or {"type": "audio/pcm", "rate": 24000},
                                "transcription": {"model": model, **({"language": language} if language else {}),
                                                  **transcription}}
    if turn_detection != "default":
        audio_in["turn_detection"] = turn_detection
    return {"type": "session.update", "session": {"type": "transcription", "audio": {"input": audio_in}}}


def beta_update(fmt: str = "pcm16", turn_detection: Any = "default", language: str | None = None,
                model: str = "whisper-1") -> dict:
    """A beta ``transcription_session.update``."""
    session: dict[str, Any] = {"input_audio_format": fmt,
                               "input_audio_transcription": {"model": model, **({"language": language} if language else {})}}
    if turn_detection != "default":
        session["turn_detection"] = turn_detection
    return {"type": "transcription_session.update", "session": session}


def append_event(audio: bytes) -> str:
    return json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(audio).decode()})


class _Appender:
    """What send_paced sends to: each chunk of bytes becomes one append event."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def send(self, data: bytes) -> None:
        await self.ws.send(append_event(data))


@dataclass
class RealtimeClient:
    url: str
    token: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    close_code: int | None = None
    ws: ClientConnection | None = None
    _reader: asyncio.Task | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def __aenter__(self) -> "RealtimeClient":
        headers = dict(self.headers)
        if self.token is not None:
            headers["Authorization"] = f"Bearer {self.token}"
        self.ws = await connect(self.url, additional_headers=headers, max_size=None, ping_interval=None)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.ws is not None and self._reader is not None
        await self.ws.close()
        await self._reader
        self.close_code = self.ws.close_code

    async def _read(self) -> None:
        assert self.ws is not None
        try:
            async for raw in self.ws:
                self.events.append(json.loads(raw))
                self.times.append(time.monotonic())
                self._changed.set()
        except Exception:  # noqa: BLE001 - a dropped connection ends the log; tests check what arrived
            pass
        self._changed.set()

    async def send(self, event: dict) -> None:
        assert self.ws is not None
        await self.ws.send(json.dumps(event))

    async def send_raw(self, text: str) -> None:
        assert self.ws is not None
        await self.ws.send(text)

    async def stream(self, audio: bytes | np.ndarray, rate: int, width: int, chunk_ms: int = 100,
                     speed: float | None = 1.0) -> float:
        """Append the audio in chunk_ms pieces at ``speed`` x real time (None: as fast as the
        socket takes it); returns when the last chunk left."""
        assert self.ws is not None
        data = audio if isinstance(audio, bytes) else audio.tobytes()
        if speed is None:
            step = rate * width * chunk_ms // 1000
            for i in range(0, len(data), step):
                await self.ws.send(append_event(data[i:i + step]))
        else:
            # send_paced slices arrays of samples: one byte-sized "sample" per byte keeps it generic.
            samples = np.frombuffer(data, dtype=np.uint8)
            await send_paced(_Appender(self.ws), samples, rate * width, chunk_ms, speed, encode=lambda c: c.tobytes())
        return time.monotonic()

    def of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e.get("type") == kind]

    def errors(self) -> list[dict]:
        return self.of("error")

    async def wait_for(self, done: Callable[["RealtimeClient"], bool], timeout: float = 60.0) -> None:
        """Until ``done(self)`` holds (checked at every event), or fail after ``timeout`` s."""
        async with asyncio.timeout(timeout):
            while not done(self):
                self._changed.clear()
                if self._reader is not None and self._reader.done():
                    raise AssertionError(f"connection closed; events: {[e.get('type') for e in self.events]}")
                await self._changed.wait()

    async def wait_type(self, kind: str, count: int = 1, timeout: float = 60.0) -> list[dict]:
        await self.wait_for(lambda c: len(c.of(kind)) >= count, timeout)
        return self.of(kind)

    def transcript(self) -> str:
        return " ".join(e["transcript"] for e in self.of("conversation.item.input_audio_transcription.completed"))

    def deltas(self, item_id: str) -> str:
        return "".join(e["delta"] for e in self.of("conversation.item.input_audio_transcription.delta")
                       if e["item_id"] == item_id)
