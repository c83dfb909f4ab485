"""Wiring: config -> runner -> batcher -> listener. No model code, no protocol code.

The listener opens first and answers /healthz with 503 while the model loads in a
thread, so orchestrators can watch the warm-up; stream handshakes are refused with
503 until the model is warm. /healthz is readiness (may this process take a new
session now?), /livez is liveness (should it be restarted?). Shutdown drains: every
open session gets its finals before its connection closes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from typing import Any, Sequence

from websockets.asyncio.server import Server, serve

from server import __version__, incidents
from server.admission import Admission, Refusal
from server.batcher import MicroBatcher
from server.calls.redis_hub import create_hub
from server.config import Config, ConfigError
from server.metrics import Metrics
from server.runners import ModelRunner, create_runner
from server.stream_config import language_list
from server.transport import audiosocket as audiosocket_transport
from server.transport import api as api_transport
from server.transport import calls as calls_transport
from server.transport import funasr as funasr_transport
from server.transport import native as native_transport
from server.transport import realtime as realtime_transport
from server.transport import twilio as twilio_transport
from server.transport.access import AccessPolicy, ssl_context
from server.transport.api import ApiServer
from server.transport.http import make_funasr_process_request, make_process_request
from server.transport.connection import Connection

log = logging.getLogger(__name__)


class ChorusServer:
    def __init__(self, config: Config, runner: ModelRunner | None = None, preloaded: bool = False) -> None:
        """``runner``/``preloaded``: tests and benchmarks share one loaded model between servers."""
        self.config = config
        self._preloaded = preloaded
        self.metrics = Metrics()
        self.runner = runner if runner is not None else create_runner(config.runner, max_batch_size=config.batcher.largest_batch)
        self.batcher = MicroBatcher(self.runner, config.batcher, self.metrics)
        self.admission = Admission(config.server, self.batcher, self.metrics)
        # Read at each scrape: the autoscaler's signal (docs/deploy.md) is never a second stale.
        self.metrics.load_ratio.set_function(self.load_ratio)
        self.access = AccessPolicy.from_config(config.server, os.environ)
        # In-process, or mirrored to Redis for subscribers on other replicas (`calls.redis_url`).
        self.calls = create_hub(config, self.metrics, _webhook(config, self.metrics))
        # Twilio's handshakes are checked by their X-Twilio-Signature when this is set.
        self.twilio_auth_token = twilio_transport.load_auth_token(config, os.environ) if config.twilio.enabled else None
        proxied = twilio_transport.public_url_warning(config, self.twilio_auth_token)
        if proxied is not None:
            log.warning("%s", proxied)
        # Everything stop() drains: WebSocket connections of every dialect and AudioSocket calls
        # (anything with drain(close_code) and a `finished` future).
        self.connections: set[Connection] = set()
        # Open /v1/calls subscriptions' `finished` futures: they close after the calls drain.
        self.subscriptions: set[asyncio.Future] = set()
        self.ready = False
        self.draining = False
        self.load_error: str | None = None
        self.started_at = time.time()
        self._server: Server | None = None
        self._funasr_server: Server | None = None
        self._audiosocket_server: asyncio.AbstractServer | None = None
        self.api: ApiServer | None = ApiServer(self) if config.api_port is not None else None
        self._load_task: asyncio.Task | None = None
        self._monitor_task: asyncio.Task | None = None
        self._stopped = False

    # ------------------------------------------------------------------ state
    @property
    def sessions(self) -> int:
        return self.admission.sessions

    def load_ratio(self) -> float:
        """Load relative to capacity (`chorus_load_ratio`): 1.0 where admission refuses newcomers.
        Only the limits that grow with the open sessions count; the projected final time does not
        fall to 0 on an idle replica, so it would hold an autoscaler above its minimum."""
        cfg = self.config.server
        ratio = self.admission.charged / cfg.max_sessions
        projection = self.admission.projection(newcomers=0) if self.ready else None
        if projection is not None:
            ratio = max(ratio, projection.load / (cfg.admission_max_model_load or 1.0))
        return ratio

    def refusal(self) -> Refusal | None:
        """Why no new session may start now (any client), or None."""
        return self.availability() or self.admission.capacity_refusal()

    def availability(self) -> Refusal | None:
        """Why the model cannot take any new work now (draining, loading, failed, broken), or
        None. Recordings (the HTTP API) are refused only for this: they wait at the lowest
        priority instead of counting against live capacity."""
        if self.draining:
            return Refusal(503, "draining", "server is shutting down", 1)
        if self.load_error is not None:
            return Refusal(503, "load_failed", "the model failed to load")
        if not self.ready:
            return Refusal(503, "loading", "the model is still loading", 5)
        if self.batcher.broken_reason() is not None:
            return Refusal(503, "broken", "the model is unavailable")
        return None

    def liveness(self) -> str | None:
        """Why this process should be restarted, or None. Loading is alive (give it a startup
        probe); a failed load, a hung model or one whose calls keep failing is not."""
        if self.load_error is not None:
            return "model failed to load"
        return self.batcher.broken_reason()

    def health(self) -> dict[str, Any]:
        refusal = self.refusal()
        dead = self.liveness()
        info: dict[str, Any] = {
            "ready": self.ready and dead is None,
            "accepting": refusal is None,
            "live": dead is None,
            "reason": dead or (refusal.message if refusal else None),
            "draining": self.draining,
            "version": __version__,
            "sessions": self.sessions,
            "max_sessions": self.config.server.max_sessions,
            "final_wait_s": round(self.batcher.final_wait_s(), 3) if self.ready else 0.0,
            "uptime_s": round(time.time() - self.started_at, 1),
        }
        if self.ready:
            info["model"] = self.model_info()
        if self.load_error:
            info["error"] = self.load_error
        return info

    def model_info(self) -> dict[str, Any]:
        return {k: v for k, v in self.runner.describe().items() if isinstance(v, (str, int, float, bool))}

    def max_segment_ms_limit(self) -> int:
        # Clients may lower the operator's segment length, never raise it; the runner's
        # longest item bounds it too.
        limit = min(self.config.vad.max_segment_ms, 60_000)
        item_s = self.runner.max_item_seconds
        return int(min(limit, item_s * 1000)) if item_s != float("inf") else limit

    def check_default_language(self) -> None:
        """Raise ConfigError if ``server.default_language`` is not a language the loaded model
        accepts: every session that does not choose its own language would be refused."""
        supported = self.runner.languages()
        for key, given in (("server.default_language", self.config.server.default_language),
                           ("audiosocket.language", self.config.audiosocket.language)):
            value = given.strip().lower()
            if supported is not None and value not in supported:
                raise ConfigError(
                    f"{key} is {given!r}, which the {self.runner.name} model does not support; "
                    f"set it to one of: {language_list(supported)}"
                )

    # ------------------------------------------------------------------ lifecycle
    async def start(self, wait_ready: bool = True) -> None:
        cfg = self.config.server
        tls = ssl_context(cfg)
        await self.calls.start()  # with `calls.redis_url`: Redis must answer, or the server does not start
        try:
            self._server = await serve(
                self._route,
                cfg.host,
                cfg.port,
                process_request=make_process_request(self),
                ssl=tls,
                # Oversize audio gets a structured error from the adapter; only far larger frames are cut by 1009.
                max_size=4 * cfg.max_message_bytes,
                # websockets counts received frames, not bytes: with max_size this bounds what a client
                # can make the server buffer while it is not reading (see `max_received_frames`).
                max_queue=cfg.max_received_frames,  # resumes reading at a quarter of it
                # The adapter runs its own keepalive: websockets' would close a connection whose pong
                # is unread only because the server is holding that client back (backpressure).
                ping_interval=None,
                ping_timeout=None,
                compression=None,  # audio does not compress; deflate would only cost CPU
            )
        except OSError as exc:
            raise self._cannot_listen("WebSocket listener", cfg.port, exc, "choose another with --port N") from exc
        log.info("listening on %s://%s:%d/v1/stream", "wss" if tls else "ws", cfg.host, self.port)
        if self.config.funasr.port:
            try:
                self._funasr_server = await serve(
                    lambda ws: funasr_transport.handle(self, ws),
                    cfg.host,
                    self.config.funasr.port,
                    process_request=make_funasr_process_request(self),
                    ssl=tls,
                    # FunASR clients ask for the `binary` subprotocol; those that ask for none are
                    # served too (websockets refuses them when given a `subprotocols` list).
                    select_subprotocol=_binary_if_asked,
                    # A file comes in messages of up to this (FunASR's clients send chunks of a few KB
                    # to ~100 KB); the FunASR adapter gathers them up to funasr.max_file_bytes.
                    max_size=self.config.funasr.max_message_bytes,
                    max_queue=cfg.max_received_frames,  # resumes reading at a quarter of it
                    ping_interval=None,
                    ping_timeout=None,
                    compression=None,
                )
            except OSError as exc:
                raise self._cannot_listen("FunASR-compatible listener", self.config.funasr.port, exc,
                                          "choose another with --funasr-port N, or turn it off with --funasr-port 0") from exc
            log.info("FunASR-compatible listener on %s://%s:%d", "wss" if tls else "ws", cfg.host, self.funasr_port)
        if self.config.audiosocket.port:
            try:
                self._audiosocket_server = await audiosocket_transport.serve(self)
            except OSError as exc:
                raise self._cannot_listen("AudioSocket listener", self.config.audiosocket.port, exc,
                                          "choose another with --audiosocket-port N") from exc
            log.info("AudioSocket listener on tcp://%s:%d", self.config.audiosocket.host, self.audiosocket_port)
        if self.api is not None:
            try:
                await self.api.start(self.config.api_port or 0, tls)
            except OSError as exc:
                raise self._cannot_listen("HTTP API", self.config.api_port or 0, exc,
                                          "choose another with --api-port N, or turn it off with --api-port 0") from exc
            log.info("HTTP API (OpenAI-compatible transcriptions) on %s://%s:%d%s", "https" if tls else "http",
                     cfg.host, self.api.port, api_transport.TRANSCRIPTIONS_PATH)
        self._monitor_task = asyncio.create_task(self._monitor())
        self._load_task = asyncio.create_task(self._load_model())
        if wait_ready:
            await self._load_task

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    def _cannot_listen(self, what: str, port: int, exc: OSError, hint: str) -> ConfigError:
        """A listener's port is taken: close the listeners already open, so a failed start
        leaves none behind, and say which setting to change."""
        for listener in (self._server, self._funasr_server, self._audiosocket_server):
            if listener is not None:
                listener.close()
        return ConfigError(f"the {what} cannot open port {port} ({exc.strerror}); {hint}")

    @property
    def api_port(self) -> int | None:
        """The HTTP API's port, or None when it is off."""
        return self.api.port if self.api is not None else None

    @property
    def funasr_port(self) -> int | None:
        """The FunASR listener's port, or None when it is off."""
        if self._funasr_server is None:
            return None
        return self._funasr_server.sockets[0].getsockname()[1]

    @property
    def audiosocket_port(self) -> int | None:
        """The AudioSocket listener's port, or None when it is off."""
        if self._audiosocket_server is None:
            return None
        return self._audiosocket_server.sockets[0].getsockname()[1]

    async def _route(self, ws: Any) -> None:
        """websockets' handler on the main port; process_request already admitted the path."""
        path = ws.request.path.split("?", 1)[0]
        if path == twilio_transport.PATH:
            await twilio_transport.handle(self, ws)
        elif path == realtime_transport.PATH:
            await realtime_transport.handle(self, ws)
        elif path == calls_transport.PATH:
            await calls_transport.handle(self, ws)
        else:
            await native_transport.handle(self, ws)

    async def _load_model(self) -> None:
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        try:
            # Loading reads ~150 MB and runs warm-up batches: keep it off the event loop.
            if not self._preloaded:
                await loop.run_in_executor(None, self.runner.load)
            # Also for a preloaded runner: the check is about this server's config.
            self.check_default_language()
        except ConfigError as exc:
            # The operator's own settings, named by key: worth showing on /healthz.
            self.load_error = str(exc)
            log.error("model failed to load: %s", exc)
            raise
        except Exception as exc:
            # Load errors can hold paths and internals: /healthz shows only the incident id.
            incident = incidents.report(log, "model failed to load: %s", exc, exc)
            self.load_error = f"model failed to load (incident {incident}; see the server log)"
            raise
        self.batcher.start(loop)
        self.ready = True
        self.metrics.model_ready.set(1)
        log.info("model ready in %.1f s: %s", time.monotonic() - t0, self.model_info())

    async def _monitor(self, period: float = 0.1) -> None:
        """Event-loop lag: how late a timer fires is how long other callbacks held the loop.
        Blocking work on the loop would delay every session's audio and results at once.
        Also the loop thread's CPU time (all of it: websockets framing, JSON, sessions), which
        is what bounds the number of streams one server process can carry. Once a second:
        the batcher's watchdog and the health gauges."""
        loop = asyncio.get_running_loop()
        cpu = time.thread_time()
        ticks = 0
        while True:
            due = loop.time() + period
            await asyncio.sleep(period)
            self.metrics.event_loop_lag.observe(max(0.0, loop.time() - due))
            now = time.thread_time()
            self.metrics.event_loop_cpu.inc(now - cpu)
            cpu = now
            ticks += 1
            if ticks % 10 == 0 and self.ready:
                self.metrics.final_load.set(self.batcher.final_load())
                self.metrics.final_cost.set(self.batcher.final_cost() or 0.0)
                projection = self.admission.projection()
                self.metrics.projected_final.set(0.0 if projection is None else min(projection.latency_s, 3600.0))
                self.metrics.final_wait.set(self.batcher.final_wait_s())
                self.batcher.check_watchdog()
                self.metrics.model_healthy.set(0 if self.batcher.broken_reason() else 1)
                self.metrics.accepting.set(0 if self.refusal() else 1)

    async def stop(self, timeout: float | None = None) -> None:
        """Graceful shutdown, within ``timeout`` (default `server.shutdown_timeout_s`): refuse
        new clients (503), let every open session finalise its open segment and receive every
        final and `done`, close them with `server.shutdown_close_code`, stop the batcher last.
        Sessions still open at the deadline are closed anyway."""
        if self._stopped:
            return
        self._stopped = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.config.server.shutdown_timeout_s if timeout is None else timeout)
        left = lambda: max(0.1, deadline - loop.time())  # noqa: E731
        self.draining = True
        self.metrics.accepting.set(0)
        if self._audiosocket_server is not None:
            self._audiosocket_server.close()  # no new calls; open ones drain below
        conns = list(self.connections)
        if conns:
            log.info("draining %d session(s)", len(conns))
            for conn in conns:
                conn.drain(self.config.server.shutdown_close_code)
            _, late = await asyncio.wait([c.finished for c in conns], timeout=left())
            if late:
                log.warning("%d session(s) not drained within the shutdown timeout; closing them", len(late))
        if self.api is not None:
            # Running transcriptions finish (the batcher still runs); new ones get 503 meanwhile.
            await self.api.stop(left())
        # Every call has ended (its finals published): subscribers get the rest of their events
        # and close; the webhook delivers what it holds, within the deadline.
        await self.calls.close(left())
        if self.subscriptions:
            await asyncio.wait(list(self.subscriptions), timeout=left())
        if self._monitor_task is not None:
            self._monitor_task.cancel()
        for listener in (self._server, self._funasr_server):
            if listener is None:
                continue
            listener.close(close_connections=True)
            try:
                await asyncio.wait_for(listener.wait_closed(), left())
            except asyncio.TimeoutError:
                log.warning("connections still open at the shutdown deadline")
        # Joining the worker thread blocks (up to the rest of the deadline): not on the loop.
        await loop.run_in_executor(None, self.batcher.stop, left())
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
        log.info("shutting down: draining sessions (at most %g s)", self.config.server.shutdown_timeout_s)
        await self.stop()
        log.info("shut down")


def _webhook(config: Config, metrics: Metrics) -> Any:
    """The webhook sink, or None when no webhook is configured (aiohttp is imported only then)."""
    if not config.webhook.url:
        return None
    from server.calls.webhook import WebhookSender

    return WebhookSender.from_config(config, metrics, os.environ)


def _binary_if_asked(connection: Any, offered: Sequence[str]) -> str | None:
    return "binary" if "binary" in offered else None


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
