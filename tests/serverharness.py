"""Run a real ChorusServer on a loopback port in a background thread, and a small client.

The server is the production object (websockets listener, batcher thread, real
model); only its event loop lives in a test thread so tests can share one loaded
model between several servers with different configs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
import urllib.error
import urllib.request
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from client_demo.pacing import send_paced
from server.app import ChorusServer
from server.config import Config, load_config
from server.runners.base import ModelRunner
from server.wer import word_error_rate
from tests import scrape

DATA = Path(__file__).parent / "data"
CLIPS = sorted(DATA.glob("*.wav"))
TRANSCRIPTS = json.loads((DATA / "transcripts.json").read_text())


def read_clip(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0


def clip_wer(path: Path, text: str) -> float:
    """Word error rate of ``text`` against the transcript of the clip at ``path``."""
    return word_error_rate([TRANSCRIPTS[path.name]], [text])


# Every capacity-aware trigger off (the fixed session limits stay).
ADMISSION_OFF = {"server.admission_max_final_wait_s": "0", "server.admission_max_model_load": "0",
                 "server.admission_target_final_s": "0"}


def make_config(shipped_admission: bool = False, **overrides: Any) -> Config:
    """Defaults from configs/default.yaml with a free port and the given dotted overrides;
    capacity-aware admission as shipped only with ``shipped_admission``."""
    # Capacity-aware admission off unless a test turns it on: tests stream many sessions faster
    # than real time on a shared 2-core machine, and one test's backlog must not refuse the next
    # test's clients (tests/test_reliability.py tests admission itself).
    # The FunASR listener is off unless a test asks for it: its fixed default port (10095) would
    # collide between servers (tests/test_funasr.py gives it a free port).
    sets = {"server.port": "0", "funasr.port": "0", **({} if shipped_admission else ADMISSION_OFF),
            **{k: str(v) for k, v in overrides.items()}}
    return load_config(Path(__file__).parent.parent / "configs" / "default.yaml", sets)


class ServerThread:
    def __init__(self, config: Config, runner: ModelRunner) -> None:
        self.app = ChorusServer(config, runner=runner, preloaded=True)
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.app.start())
        self._started.set()
        self.loop.run_forever()

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        assert self._started.wait(60), "server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        fut = asyncio.run_coroutine_threadsafe(self.app.stop(), self.loop)
        fut.result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.app.port}/v1/stream"

    def http(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.app.port}{path}", timeout=10) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def metric(self, name: str, default: float | None = 0.0, **labels: str) -> float | None:
        """One sample of this server's /metrics, read over its socket (``default`` if absent)."""
        return scrape.metric(self.app.port, name, default, **labels)


@dataclass
class StreamLog:
    messages: list[dict] = field(default_factory=list)
    close_code: int | None = None

    def of(self, kind: str) -> list[dict]:
        return [m for m in self.messages if m["type"] == kind]


def pcm16(x: np.ndarray) -> bytes:
    return (np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()


async def stream_audio(
    url: str,
    audio: np.ndarray,
    *,
    speed: float = 4.0,
    chunk_ms: int = 100,
    start: dict | None = None,
    lead_silence_s: float = 0.5,
    tail_silence_s: float = 1.0,
    stop: bool = True,
    encode=pcm16,
    rate: int = 16000,
    timeout: float = 120.0,
) -> StreamLog:
    """Stream audio paced at `speed` x real time, then stop; collect every server message."""
    log = StreamLog()
    sil = lambda s: np.zeros(int(s * rate), dtype=np.float32)  # noqa: E731
    x = np.concatenate([sil(lead_silence_s), audio, sil(tail_silence_s)])
    async with connect(url, max_size=None) as ws:
        if start is not None:
            await ws.send(json.dumps({"type": "start", **start}))

        async def reader() -> None:
            async for msg in ws:
                log.messages.append(json.loads(msg))

        rd = asyncio.create_task(reader())
        await send_paced(ws, x, rate, chunk_ms, speed, encode=encode)
        if stop:
            await ws.send(json.dumps({"type": "stop"}))
        await asyncio.wait_for(rd, timeout)
        log.close_code = ws.close_code
    return log


def config_replace(cfg: Config, **sections: Any) -> Config:
    return dataclasses.replace(cfg, **sections)


def check_words(result: dict) -> None:
    """A result's words: on the stream's clock, inside the segment, in order, not overlapping,
    and together they are the text."""
    words = result["words"]
    assert bool(words) == bool(result["text"]), result
    prev = result["start_ms"]
    for w in words:
        assert set(w) == {"word", "start_ms", "end_ms"} and w["word"] == w["word"].strip() and w["word"], w
        assert prev <= w["start_ms"] <= w["end_ms"] <= result["end_ms"], (w, result["start_ms"], result["end_ms"])
        prev = w["end_ms"]
    assert "".join(w["word"] for w in words).replace(" ", "") == result["text"].replace(" ", "")


@dataclass
class Handshake:
    """How a server answered a WebSocket handshake: 101, or the refusal's status, headers and
    JSON body."""
    status: int
    headers: Any = None
    body: dict = field(default_factory=dict)


async def handshake(url: str, **connect_kw: Any) -> Handshake:
    """Open a WebSocket to ``url`` and close it at once; a refusal must carry a JSON body."""
    try:
        async with connect(url, **connect_kw):
            return Handshake(101)
    except InvalidStatus as e:
        body = e.response.body or b""
        payload = json.loads(body) if body else {}
        return Handshake(e.response.status_code, e.response.headers, payload)
