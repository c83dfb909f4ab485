"""An Asterisk AudioSocket sender, written from Asterisk's protocol description.

Frames are ``kind (1 byte) | payload length (uint16 big-endian) | payload``: the call's UUID
(0x01, 16 bytes) first, then signed linear 16-bit little-endian mono audio (0x10 at 8 kHz,
0x11-0x18 at 12/16/24/32/44.1/48/96/192 kHz), DTMF (0x03, one ASCII digit), and a hangup
(0x00, empty). Every frame is built here with ``struct``, independently of the server's codec.
"""

from __future__ import annotations

import asyncio
import struct
import uuid as uuidlib
from dataclasses import dataclass

import numpy as np

RATE_KINDS = {8000: 0x10, 12000: 0x11, 16000: 0x12, 24000: 0x13, 32000: 0x14, 44100: 0x15, 48000: 0x16,
              96000: 0x17, 192000: 0x18}


def frame(kind: int, payload: bytes = b"") -> bytes:
    return struct.pack(">BH", kind, len(payload)) + payload


def pcm16(x: np.ndarray) -> bytes:
    return np.clip(np.rint(np.asarray(x, dtype=np.float64) * 32768.0), -32768, 32767).astype("<i2").tobytes()


@dataclass
class AudioSocketRun:
    received: bytes  # what the server sent (only a hangup frame, if anything)
    closed_by_server: bool


async def audiosocket_call(port: int, call_uuid: uuidlib.UUID | None, audio: np.ndarray | None, rate: int = 8000, *,
                           speed: float | None = 1.0, dtmf_at_ms: dict[int, str] | None = None, hangup: bool = True,
                           raw_before: bytes = b"", raw_after: bytes = b"", split: int | None = None,
                           read_timeout: float = 60.0, host: str = "127.0.0.1",
                           local_addr: tuple[str, int] | None = None,
                           pause: tuple[int, asyncio.Event] | None = None) -> AudioSocketRun:
    """One call: UUID, 20 ms audio frames paced at ``speed`` x real time (None: as fast as the
    socket takes them), then a hangup frame. ``pause=(ms, event)``: after ``ms`` of audio, wait
    for ``event`` before sending the rest (the call stays connected meanwhile), unless the server
    hangs up first.
    ``raw_before``/``raw_after`` go out as given (malformed frames); ``split`` sends every frame in
    pieces of that many bytes (TCP may split anywhere). ``host``: the listener's address;
    ``local_addr``: the address to call from (another loopback address is another peer)."""
    reader, writer = await asyncio.open_connection(host, port, local_addr=local_addr)
    loop = asyncio.get_running_loop()
    received = bytearray()
    closed = False

    async def read() -> None:
        nonlocal closed
        while True:
            try:
                data = await reader.read(4096)
            except ConnectionError:  # the server closed with our data unread: a reset
                data = b""
            if not data:
                closed = True
                return
            received.extend(data)

    rd = asyncio.create_task(read())

    async def send(data: bytes) -> None:
        if split:
            for i in range(0, len(data), split):
                writer.write(data[i:i + split])
                await writer.drain()
        else:
            writer.write(data)
            await writer.drain()

    try:
        if raw_before:
            await send(raw_before)
        if call_uuid is not None:
            await send(frame(0x01, call_uuid.bytes))
        if audio is not None:
            step = rate // 50
            pcm = pcm16(audio)
            t0 = loop.time()
            for i, start in enumerate(range(0, len(audio), step)):
                if rd.done():
                    break
                await send(frame(RATE_KINDS[rate], pcm[2 * start:2 * (start + step)]))
                if dtmf_at_ms and i * 20 in dtmf_at_ms:
                    await send(frame(0x03, dtmf_at_ms[i * 20].encode()))
                if pause is not None and (i + 1) * 20 == pause[0]:
                    resume = asyncio.ensure_future(pause[1].wait())
                    await asyncio.wait([resume, rd], return_when=asyncio.FIRST_COMPLETED)  # or the server hangs up
                    resume.cancel()
                    t0 = loop.time() - (i + 1) * 0.02 / (speed or 1.0)
                if speed is None:
                    continue
                delay = t0 + (i + 1) * 0.02 / speed - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
        if raw_after:
            await send(raw_after)
        if hangup:
            await send(frame(0x00))
        await asyncio.wait_for(asyncio.shield(rd), read_timeout)
    except (ConnectionError, asyncio.TimeoutError):
        pass
    finally:
        rd.cancel()
        writer.close()
    return AudioSocketRun(bytes(received), closed)
