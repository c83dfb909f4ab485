"""Wiring: config -> runner -> batcher -> listener. No model code, no protocol code.

The listener opens first and answers /healthz with 503 while the model loads in a
thread, so orchestrators can watch the warm-up; stream handshakes are refused with
503 until the model is warm.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any

from websockets.asyncio.server import Server, serve

from server import __version__
from server.batcher import MicroBatcher
from server.config import Config, ConfigError
from server.metrics import Metrics
from server.runners import ModelRunner, create_runner
from server.transport import native as native_transport
from server.transport.http import make_process_request

log = logging.getLogger(__name__)


class ChorusServer:
    def __init__(self, config: Config, runner: ModelRunner | None = None, preloaded: bool = False) -> None:
        """``runner``/``preloaded``: tests and benchmarks share one loaded model between servers."""
        self.config = config
        self._preloaded = preloaded
        self.metrics = Metrics()
        self.runner = runner if runner is not None else create_runner(config.runner, max_batch_size=config.batcher.largest_batch)
        self.batcher = MicroBatcher(self.runner, config.batcher, self.metrics)
        self.ready = False
        self.load_error: str | None = None
        self.sessions = 0
        self.started_at = time.time()
        self._server: Server | None = None
        self._load_task: asyncio.Task | None = None
        self._lag_task: asyncio.Task | None = None

    # ------------------------------------------------------------------ state
    def health(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "ready": self.ready,
            "version": __version__,
            "sessions": self.sessions,
            "max_sessions": self.config.server.max_sessions,
            "uptime_s": round(time.time() - self.started_at, 1),
        }
        if self.ready:
            info["model"] = self.model_info()
        if self.load_error:
            info["error"] = self.load_error
        return info

    def model_info(self) -> dict[str, Any]:
        return {k: v for k, v in self.runner.describe().items() if isinstance(v, (str, int, float, bool))}

    def admission_refusal(self) -> str | None:
        if not self.ready:
            return "model is still loading" if self.load_error is None else f"model failed to load: {self.load_error}"
        if self.sessions >= self.config.server.max_sessions:
            return f"server is at its session limit ({self.config.server.max_sessions})"
        return None

    def max_segment_ms_limit(self) -> int:
        # A runner's longest item bounds the segment length a client may ask for.
        limit = self.runner.max_item_seconds
        return int(min(limit * 1000, 60_000)) if limit != float("inf") else 60_000

    def check_default_language(self) -> None:
        """Raise ConfigError if ``server.default_language`` is not a language the loaded model
        accepts: every session that does not choose its own language would be refused."""
        supported = self.runner.languages()
        value = self.config.server.default_language.strip().lower()
        if supported is not None and value not in supported:
            codes = (["auto"] if "auto" in supported else []) + sorted(c for c in supported if c != "auto")
            raise ConfigError(
                f"server.default_language is {self.config.server.default_language!r}, which the "
                f"{self.runner.name} model does not support; set it to one of: {', '.join(codes)}"
            )

    def session_opened(self) -> None:
        self.sessions += 1
        self.metrics.sessions_total.inc()
        self.metrics.sessions_active.set(self.sessions)

    def session_closed(self) -> None:
        self.sessions -= 1
        self.metrics.sessions_active.set(self.sessions)

    # ------------------------------------------------------------------ lifecycle
    async def start(self, wait_ready: bool = True) -> None:
        cfg = self.config.server
        self._server = await serve(
            lambda ws: native_transport.handle(self, ws),
            cfg.host,
            cfg.port,
            process_request=make_process_request(self),
            # Oversize audio gets a structured error from the adapter; only far larger frames are cut by 1009.
            max_size=4 * cfg.max_message_bytes,
            max_queue=64,
            ping_interval=cfg.ping_interval_s or None,
            ping_timeout=cfg.ping_interval_s or None,
            compression=None,  # audio does not compress; deflate would only cost CPU
        )
        log.info("listening on ws://%s:%d/v1/stream", cfg.host, self.port)
        self._lag_task = asyncio.create_task(self._watch_loop_lag())
        self._load_task = asyncio.create_task(self._load_model())
        if wait_ready:
            await self._load_task

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def _load_model(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        try:
            # Loading reads ~150 MB and runs warm-up batches: keep it off the event loop.
            if not self._preloaded:
                await loop.run_in_executor(None, self.runner.load)
            # Also for a preloaded runner: the check is about this server's config.
            self.check_default_language()
        except Exception as exc:
            self.load_error = str(exc)
            log.error("model failed to load: %s", exc)
            raise
        self.batcher.start(loop)
        self.ready = True
        self.metrics.model_ready.set(1)
        log.info("model ready in %.1f s: %s", time.monotonic() - t0, self.model_info())

    async def _watch_loop_lag(self, period: float = 0.1) -> None:
        """Event-loop lag: how late a timer fires is how long other callbacks held the loop.
        Blocking work on the loop would delay every session's audio and results at once.
        Also the loop thread's CPU time (all of it: websockets framing, JSON, sessions), which
        is what bounds the number of streams one server process can carry."""
        loop = asyncio.get_running_loop()
        cpu = time.thread_time()
        while True:
            due = loop.time() + period
            await asyncio.sleep(period)
            self.metrics.event_loop_lag.observe(max(0.0, loop.time() - due))
            now = time.thread_time()
            self.metrics.event_loop_cpu.inc(now - cpu)
            cpu = now

    async def stop(self) -> None:
        """Refuse new clients, close open ones (1001), stop the worker."""
        if self._lag_task is not None:
            self._lag_task.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.batcher.stop()
        self.ready = False
        self.metrics.model_ready.set(0)

    async def serve_forever(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, stop.set)
            except (NotImplementedError, RuntimeError):
                pass
        await self.start(wait_ready=False)
        load = self._load_task
        assert load is not None
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait([waiter, load], return_when=asyncio.FIRST_COMPLETED)
        if load.done() and load.exception() is not None:
            waiter.cancel()
            await self.stop()
            raise load.exception()  # type: ignore[misc]
        await waiter
        log.info("shutting down")
        await self.stop()


def run(config: Config) -> None:
    """Blocking entry point used by `chorus serve`."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but keep serving without it
        uvloop = None
    server = ChorusServer(config)
    if uvloop is not None:
        uvloop.run(server.serve_forever())
    else:
        asyncio.run(server.serve_forever())
