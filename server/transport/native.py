"""The native dialect's connection adapter: /v1/stream messages <-> one Session.

This is the only place where the native JSON codec meets a socket; what every dialect
shares (outbox bounds, keepalive, limits, drain) is in server/transport/connection.py.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from websockets.asyncio.server import ServerConnection

from server.audio.codecs import AudioFormatError
from server.protocol import native
from server.protocol.native import Finalize, KeepAlive, ProtocolError, Start, Stop
from server.session import Session
from server.transport import connection
from server.transport.connection import CLOSE_NORMAL, CLOSE_POLICY, Close, Connection

if TYPE_CHECKING:
    from server.app import ChorusServer
    from server.runners.base import Word

log = logging.getLogger(__name__)


class NativeConnection(Connection):
    """Implements SessionOutput for one WebSocket client speaking the native protocol."""

    # ------------------------------------------------------------------ SessionOutput
    def on_speech_started(self, segment_id: int, start_ms: int) -> None:
        self.send(native.speech_started(segment_id, start_ms))

    def on_partial(self, segment_id: int, text: str, start_ms: int, end_ms: int, fields: dict[str, Any],
                   words: list[Word] | None = None) -> None:
        self.send(native.partial(segment_id, text, start_ms, end_ms, fields, words))

    def on_final(self, segment_id: int, text: str, start_ms: int, end_ms: int, cut_ms: int, fields: dict[str, Any],
                 words: list[Word] | None = None) -> None:
        self.send(native.final(segment_id, text, start_ms, end_ms, cut_ms, fields, words))

    def report(self, code: str, message: str, fatal: bool) -> None:
        self.send(native.error(code, message, fatal))

    # ------------------------------------------------------------------ hooks
    async def finish(self, drain: bool) -> None:
        if self.session is not None:
            await self.session.stop()
            if drain:
                self.send(native.done())

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
        self.send(native.ready(self.session.id, type(stream)(**eff), self.app.model_info()))
        log.info("session %s started: %s", self.session.id, eff)

    async def begin(self) -> Close | None:
        query = dict(parse_qsl(urlsplit(self.ws.request.path).query, keep_blank_values=True))
        try:
            fields = native.parse_query(query)
            if fields:
                self._start(fields)
        except ProtocolError as e:
            self.on_error(e.code, e.message, True)
            return CLOSE_POLICY, e.code
        return None

    async def on_text(self, text: str) -> Close | None:
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
                self.hold()
                await self.session.stop()
            self.send(native.done())
            return CLOSE_NORMAL, "done"
        return None

    def on_audio(self, data: bytes) -> None:
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
    await connection.handle(app, ws, NativeConnection(app, ws))
