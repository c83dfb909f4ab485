"""A FunASR WebSocket client written from FunASR's protocol document
(runtime/docs/websocket_protocol.md), for the tests of Chorus's FunASR listener.

It sends what the document describes (a JSON message of settings, raw PCM16 in binary
messages, ``{"is_speaking": false}`` at the end) and assembles the text the way the
document's modes mean it: ``online`` / ``2pass-online`` text is appended as it comes;
a ``2pass-offline`` message replaces the online text of its sentence; ``offline``
messages carry finished text. With ``until_final`` it reads as clients of FunASR's C++
runtime do (runtime/websocket/bin/funasr-wss-client-2pass.cpp closes the connection at the
first message with ``is_final`` true).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed


@dataclass
class FunasrRun:
    messages: list[dict[str, Any]] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # seconds from the first audio sent
    audio_done_at: float = 0.0  # when the end-of-audio message went out
    close_code: int | None = None
    subprotocol: str | None = None

    def results(self) -> list[dict[str, Any]]:
        """Recognition results (the messages with a mode and a text)."""
        return [m for m in self.messages if "mode" in m and "text" in m]

    def errors(self) -> list[dict[str, Any]]:
        return [m for m in self.messages if "error" in m and "is_end" not in m]

    def ack(self) -> dict[str, Any] | None:
        acks = [m for m in self.messages if m.get("is_end") is True]
        return acks[-1] if acks else None

    def text(self) -> str:
        """The transcript as a FunASR client shows it."""
        finished, online = "", ""
        for m in self.results():
            if m["mode"] in ("online", "2pass-online"):
                online += m["text"]
            elif m["mode"] == "2pass-offline":
                finished += m["text"]
                online = ""
            elif m["mode"] == "offline":
                finished += m["text"]
        return finished + online


async def run_funasr(
    uri: str,
    pcm: bytes,
    first: dict[str, Any],
    *,
    chunk_bytes: int | None = None,
    speed: float | None = 1.0,
    end: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    subprotocols: list[str] | None = None,
    timeout: float = 120.0,
    one_frame: bool = False,
    until_final: bool = False,
) -> FunasrRun:
    """Stream ``pcm`` (16-bit little-endian at ``first['audio_fs']``, default 16 kHz) and
    collect every message until the end acknowledgement (``"is_end": true`` in ``end``), or
    for an offline run without it, the first offline result; or until the server closes.

    ``chunk_bytes``: bytes per message (default: the document's chunk, chunk_size[1] x 60 ms
    divided by chunk_interval); ``speed``: pacing against real time (None = as fast as
    possible); ``one_frame``: the whole audio in one binary message; ``until_final``: stop
    sending and reading at the first message with ``is_final`` true, whenever it comes."""
    end = {"is_speaking": False, "is_end": True} if end is None else end
    rate = int(first.get("audio_fs", 16000))
    chunk = first.get("chunk_size", [5, 10, 5])
    if isinstance(chunk, str):
        chunk = [int(x) for x in chunk.split(",")]
    interval = int(first.get("chunk_interval", 10))
    if chunk_bytes is None:
        chunk_bytes = int(60 * chunk[1] / interval / 1000 * rate * 2)
    run = FunasrRun()
    wait_for_offline = first.get("mode") == "offline" and not end.get("is_end")
    kwargs: dict[str, Any] = {"subprotocols": subprotocols, "additional_headers": headers, "ping_interval": None,
                              "max_size": None}
    async with connect(uri, **{k: v for k, v in kwargs.items() if v is not None or k == "ping_interval"}) as ws:
        run.subprotocol = ws.subprotocol
        t0 = time.monotonic()

        async def receive() -> None:
            try:
                async for raw in ws:
                    msg = json.loads(raw)
                    run.messages.append(msg)
                    run.times.append(time.monotonic() - t0)
                    if msg.get("is_end") is True or until_final and msg.get("is_final") is True:
                        return
                    if wait_for_offline and msg.get("mode") == "offline":
                        return
            except ConnectionClosed:
                pass

        receiver = asyncio.create_task(receive())
        try:
            await ws.send(json.dumps(first, ensure_ascii=False))
            frames = [pcm] if one_frame else [pcm[i:i + chunk_bytes] for i in range(0, len(pcm), chunk_bytes)]
            sent_bytes = 0
            for frame in frames:
                if receiver.done():
                    break
                await ws.send(frame)
                sent_bytes += len(frame)
                if speed:
                    ahead = t0 + sent_bytes / (2 * rate) / speed - time.monotonic()
                    if ahead > 0:
                        await asyncio.sleep(ahead)
            if not receiver.done():
                await ws.send(json.dumps(end))
            run.audio_done_at = time.monotonic() - t0
            await asyncio.wait_for(receiver, timeout)
        except ConnectionClosed:
            await receiver
        finally:
            receiver.cancel()
    run.close_code = ws.close_code
    return run
