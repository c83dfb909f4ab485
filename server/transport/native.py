"""The native dialect's connection adapter: /v1/stream messages <-> one Session.

This is the only place where the native JSON codec meets a socket. It owns the
outgoing queue of one client (bounded: a client that stops reading is disconnected
with 1008 instead of being buffered for without limit) and translates protocol
errors into structured ``error`` messages. Nothing a client sends may escape this
adapter as an exception: the worst outcome for a client is its own close.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from server import incidents
from server.audio.codecs import AudioFormatError
from server.protocol import native
from server.protocol.native import Finalize, KeepAlive, ProtocolError, Start, Stop
from server.session import Session

if TYPE_CHECKING:
    from server.app import ChorusServer
    from server.runners.base import Word

log = logging.getLogger(__name__)

_CLOSE_NORMAL = 1000
_CLOSE_POLICY = 1008
_CLOSE_INTERNAL = 1011
# A close handshake needs the client to read what is queued before the close frame; one that
# has not completed in this long (a client that stopped reading) is ended by aborting the TCP
# connection, so a stalled client cannot hold its session slot.
_CLOSE_GRACE_S = 5.0
_SLOW_CONSUMER = "slow_consumer: client is not reading results"


class NativeConnection:
    """Implements SessionOutput for one WebSocket client speaking the native protocol."""

    def __init__(self, app: "ChorusServer", ws: ServerConnection) -> None:
        self.app = app
        self.ws = ws
        self.cfg = app.config.server
        self.session: Session | None = None
        self.outbox: asyncio.Queue[str | None] = asyncio.Queue(maxsize=self.cfg.max_outgoing_messages)
        self._outbox_bytes = 0  # characters queued, bounded by max_outgoing_bytes
        self._kicked = False
        self._writing: asyncio.Task | None = None
        self._kick_close: asyncio.Task | None = None
        self._serving: asyncio.Task | None = None
        self._drain_code: int | None = None  # set by drain(): close with this once finals are out
        # Keepalive (see _keepalive): whether, and since which stall, the server is not reading.
        self._holding = False
        self._stalls = 0
        self.finished: asyncio.Future = asyncio.get_running_loop().create_future()
        # Includes waiting for a full socket buffer, so a slow reader shows up here too.
        self._send_seconds = app.metrics.stage_seconds.labels("send")

    # ------------------------------------------------------------------ SessionOutput
    def on_speech_started(self, segment_id: int, start_ms: int) -> None:
        self._send(native.speech_started(segment_id, start_ms))

    def on_partial(self, segment_id: int, text: str, start_ms: int, end_ms: int, fields: dict[str, Any],
                   words: list[Word] | None = None) -> None:
        self._send(native.partial(segment_id, text, start_ms, end_ms, fields, words))

    def on_final(self, segment_id: int, text: str, start_ms: int, end_ms: int, cut_ms: int, fields: dict[str, Any],
                 words: list[Word] | None = None) -> None:
        self._send(native.final(segment_id, text, start_ms, end_ms, cut_ms, fields, words))

    def on_error(self, code: str, message: str, fatal: bool) -> None:
        self.app.metrics.errors.labels(code).inc()
        self._send(native.error(code, message, fatal))

    # ------------------------------------------------------------------ outgoing
    def _send(self, text: str) -> None:
        if self._kicked:
            return
        if self._outbox_bytes + len(text) > self.cfg.max_outgoing_bytes:
            self._kick()
            return
        try:
            self.outbox.put_nowait(text)
        except asyncio.QueueFull:
            self._kick()
            return
        self._outbox_bytes += len(text)

    def _kick(self) -> None:
        """The client is not reading: cut it loose rather than hold its backlog. Its session
        stops now (no more model work for results nobody reads), the read loop ends at its
        next message, and the connection closes with 1008 or, if the client does not take
        the close frame within the grace period, is aborted (which also ends the read loop)."""
        self._kicked = True
        log.warning("session %s: client fell %d messages (%d characters) behind; closing 1008",
                    self._sid(), self.outbox.qsize(), self._outbox_bytes)
        self.app.metrics.errors.labels("slow_consumer").inc()
        if self.session is not None:
            self.session.close()
        if self._writing is not None:
            self._writing.cancel()  # it is stuck on the full socket; the close frame goes next
        self._kick_close = asyncio.get_running_loop().create_task(self._close(_CLOSE_POLICY, _SLOW_CONSUMER))

    async def _writer(self) -> None:
        try:
            while True:
                text = await self.outbox.get()
                if text is None:
                    return
                self._outbox_bytes -= len(text)
                t0 = time.perf_counter()
                await self.ws.send(text)
                self._send_seconds.inc(time.perf_counter() - t0)
        except ConnectionClosed:
            return

    def _sid(self) -> str:
        return self.session.id if self.session else "-"

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        writer = self._writing = asyncio.create_task(self._writer())
        keepalive = asyncio.create_task(self._keepalive()) if self.cfg.ping_interval_s > 0 else None
        # The read loop runs in its own task so that drain() can interrupt it between messages.
        serving = self._serving = asyncio.create_task(self._serve())
        close_code, reason = _CLOSE_NORMAL, ""
        try:
            try:
                close_code, reason = await serving
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if self._drain_code is None or (current is not None and current.cancelling()):
                    raise  # this handler itself is being cancelled, not a drain
                close_code, reason = await self._drained()
        except ConnectionClosed:
            pass
        except Exception as exc:  # noqa: BLE001 - a bug here must close this client only
            incident = incidents.report(log, "session %s: internal error", exc, self._sid())
            self.on_error("internal", f"internal server error (incident {incident}); the session is closed", True)
            close_code, reason = _CLOSE_INTERNAL, "internal error"
        finally:
            serving.cancel()
            if keepalive is not None:
                keepalive.cancel()
            if self.session is not None:
                self.session.close()
        if self._kick_close is not None:
            writer.cancel()
            await self._kick_close
            return
        # Let queued messages (finals, done, errors) reach the client before closing.
        try:
            self.outbox.put_nowait(None)
            await asyncio.wait_for(writer, timeout=_CLOSE_GRACE_S)
        except (asyncio.QueueFull, asyncio.TimeoutError):
            pass
        writer.cancel()
        await self._close(close_code, reason)

    def drain(self, close_code: int) -> None:
        """Graceful shutdown: stop reading, finalise the open segment, deliver every final
        and `done`, then close with ``close_code`` (1001, or 1012 for a restart)."""
        if self._drain_code is not None or self._serving is None:
            return
        self._drain_code = close_code
        self._serving.cancel()

    async def _drained(self) -> tuple[int, str]:
        assert self._drain_code is not None
        if self._kicked:
            return _CLOSE_POLICY, _SLOW_CONSUMER
        if self.session is not None:
            self._hold()
            await self.session.stop()
            self._send(native.done())
        return self._drain_code, "server shutting down"

    def _hold(self) -> None:
        """The server stops reading this socket for a while (see _keepalive)."""
        self._holding = True
        self._stalls += 1

    async def _keepalive(self) -> None:
        """Ping every `ping_interval_s`; a pong later than that closes the connection (1011),
        as websockets' own keepalive would, except while the server itself is not reading
        this socket (backpressure, or waiting for finals after stop): then the pong may be
        sitting unread behind the audio the server is holding back, and the client is not
        at fault. websockets' keepalive cannot know that, so it is off (see app.start)."""
        interval = self.cfg.ping_interval_s
        try:
            while True:
                await asyncio.sleep(interval)
                stalls = self._stalls
                pong = await self.ws.ping()
                try:
                    async with asyncio.timeout(interval):
                        await pong
                except TimeoutError:
                    if self._holding or self._stalls != stalls:
                        continue
                    log.info("session %s: no pong in %g s; closing 1011", self._sid(), interval)
                    await self._close(_CLOSE_INTERNAL, "keepalive ping timeout")
                    return
        except ConnectionClosed:
            return

    async def _close(self, code: int, reason: str) -> None:
        try:
            await asyncio.wait_for(self.ws.close(code, reason), timeout=_CLOSE_GRACE_S)
        except asyncio.TimeoutError:
            log.warning("session %s: close handshake not completed in %g s; aborting the connection",
                        self._sid(), _CLOSE_GRACE_S)
            self.ws.transport.abort()

    def _start(self, fields: dict) -> None:
        stream = native.build_config(
            fields,
            default_language=self.cfg.default_language,
            max_segment_ms_limit=self.app.max_segment_ms_limit(),
            # Sessions are admitted only once the model is loaded, so this set is known here; a
            # language outside it is refused now rather than failing the batches it would join.
            languages=self.app.runner.languages(),
        )
        self.session = Session(self.app.config, stream, self.app.batcher, self, self.app.metrics)
        eff = stream.to_dict()
        eff["endpointing_ms"] = self.session.settings.endpoint_ms
        eff["max_segment_ms"] = self.session.settings.max_segment_ms
        eff["interim_results"] = bool(self.session.partial_interval_ms)
        self._send(native.ready(self.session.id, native.StreamConfig(**eff), self.app.model_info()))
        log.info("session %s started: %s", self.session.id, eff)

    async def _serve(self) -> tuple[int, str]:
        query = dict(parse_qsl(urlsplit(self.ws.request.path).query, keep_blank_values=True))
        try:
            fields = native.parse_query(query)
            if fields:
                self._start(fields)
        except ProtocolError as e:
            self.on_error(e.code, e.message, True)
            return _CLOSE_POLICY, e.code

        loop = asyncio.get_running_loop()
        ends = loop.time() + self.cfg.max_session_s if self.cfg.max_session_s > 0 else float("inf")
        while not self._kicked:
            if self.session is not None and self.session.held_back:
                self._hold()
                try:
                    await self.session.backpressure()
                finally:
                    self._holding = False
            if not self.outbox.empty():
                # ws.recv() returns without yielding while frames are buffered: let the writer
                # flush first, so that the outbox bound measures the client's reading and not
                # this loop's scheduling (a burst of messages must not look like a slow client).
                await asyncio.sleep(0)
            # Idle time counts from the last message; the session's length from its start
            # (keepalive messages reset the first, never the second).
            idle = self.cfg.idle_timeout_s
            try:
                # asyncio.timeout, not wait_for: wait_for wraps every receive in a new Task,
                # which is a measurable share of the loop's CPU per audio message.
                async with asyncio.timeout(min(idle, max(0.0, ends - loop.time()))):
                    message = await self.ws.recv()
            except TimeoutError:
                if loop.time() >= ends:
                    return await self._session_limit()
                self.on_error("idle_timeout", f"nothing received for {idle:g} s", True)
                return _CLOSE_NORMAL, "idle timeout"
            if isinstance(message, str):
                done = await self._on_text(message)
                if done is not None:
                    return done
            else:
                self._on_audio(message)
        return _CLOSE_POLICY, _SLOW_CONSUMER

    async def _session_limit(self) -> tuple[int, str]:
        """`max_session_s` reached: deliver what was said, then close."""
        limit = self.cfg.max_session_s
        if self.session is not None:
            self._hold()
            await self.session.stop()
        self.on_error("session_limit", f"sessions last at most {limit:g} s; reconnect to go on", True)
        return _CLOSE_POLICY, "session limit"

    async def _on_text(self, text: str) -> tuple[int, str] | None:
        limit = self.cfg.max_text_message_bytes
        if len(text) > limit or (4 * len(text) > limit and len(text.encode()) > limit):
            self.on_error("message_too_large", f"text message over {limit} bytes; dropped", False)
            return None
        try:
            msg = native.parse_text(text)
        except ProtocolError as e:
            # A bad text message is dropped; the stream itself is still fine.
            self.on_error(e.code, e.message, False)
            return None
        if isinstance(msg, Start):
            if self.session is not None:
                self.on_error("already_started", "the session is already configured; start ignored", False)
                return None
            try:
                self._start(msg.config_fields)
            except ProtocolError as e:
                # Nothing has started yet: the client may send a corrected start.
                self.on_error(e.code, f"{e.message}; start ignored", False)
        elif isinstance(msg, Finalize):
            if self.session is not None:
                self.session.finalize()
        elif isinstance(msg, KeepAlive):
            pass
        elif isinstance(msg, Stop):
            if self.session is not None:
                self._hold()
                await self.session.stop()
            self._send(native.done())
            return _CLOSE_NORMAL, "done"
        return None

    def _on_audio(self, data: bytes) -> None:
        if len(data) > self.cfg.max_message_bytes:
            self.on_error("message_too_large", f"audio message of {len(data)} bytes exceeds {self.cfg.max_message_bytes}; dropped", False)
            return
        if self.session is None:
            if self.cfg.require_config:
                self.on_error("config_required", "send a start message (or URL parameters) before audio; audio dropped", False)
                return
            self._start({})
        assert self.session is not None
        try:
            self.session.feed_audio(data)
        except AudioFormatError as e:
            self.on_error("bad_audio", f"{e}; message dropped", False)


async def handle(app: "ChorusServer", ws: ServerConnection) -> None:
    """websockets' handler for a stream path; admission already counted this connection."""
    conn = NativeConnection(app, ws)
    app.connections.add(conn)
    try:
        if app.draining:  # admitted just before the drain began: nothing to deliver yet
            await conn._close(app.config.server.shutdown_close_code, "server shutting down")
            return
        await conn.run()
    finally:
        app.connections.discard(conn)
        conn.finished.set_result(None)
