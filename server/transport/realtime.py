"""The OpenAI Realtime transcription adapter at `/v1/realtime` on the main port.

Clients written for OpenAI's Realtime *transcription* sessions (``?intent=transcription``;
the official SDK's ``client.realtime.connect``, or the beta ``client.beta.realtime.connect``)
stream base64 audio in JSON events and get OpenAI's events back. The codec and the mapping
of segments onto items are pure (server/protocol/realtime.py); this module feeds a Session
and sends what the codec says.

One connection has one Session at a time, started at the first audio. An update that
changes what the Session was built with (format, language, turn detection) after audio has
flowed stops that Session (its finals are delivered) and starts the next one at the next
audio, its clock continuing where the last one ended. With server VAD, the end of a turn is
seen as soon as the endpointer cuts it (the session's open segment is checked after each
append), so ``speech_stopped`` and ``committed`` do not wait for the model.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from websockets.asyncio.server import ServerConnection

from server.audio.codecs import BYTES_PER_SAMPLE, AudioFormatError
from server.protocol import realtime
from server.protocol.realtime import (
    BETA, GA, MIN_COMMIT_MS, Append, Clear, Commit, RealtimeError, RealtimeSettings, SessionUpdate, Turns,
)
from server.session import Session
from server.stream_config import StreamConfig
from server.transport import connection
from server.transport.connection import CLOSE_POLICY, Close, Connection

if TYPE_CHECKING:
    from server.app import ChorusServer
    from server.runners.base import Word

log = logging.getLogger(__name__)

PATH = "/v1/realtime"
# A large append is fed to the session in slices of this many bytes (1 s of 24 kHz PCM16),
# waiting for backpressure between them, as a live stream's would be.
_SLICE_BYTES = 48000
# Errors the client caused, as OpenAI types them; every other error is the server's.
_CLIENT_CODES = frozenset(("message_too_large", "bad_audio", "idle_timeout", "session_limit"))


class _Output:
    """SessionOutput of one of the connection's Sessions: its segments, on the connection's
    clock, go to the connection's Turns."""

    def __init__(self, conn: "RealtimeConnection", generation: int, offset_ms: int) -> None:
        self.conn = conn
        self.generation = generation
        self.offset_ms = offset_ms
        self._failure: tuple[str, str] | None = None  # the error the next failed final carries

    def on_speech_started(self, segment_id: int, start_ms: int) -> None:
        self.conn.emit(self.conn.turns.speech_started((self.generation, segment_id), self.offset_ms + start_ms))

    def on_partial(self, segment_id: int, text: str, start_ms: int, end_ms: int, fields: dict[str, Any],
                   words: list[Word] | None = None) -> None:
        self.conn.emit(self.conn.turns.partial((self.generation, segment_id), text))

    def on_final(self, segment_id: int, text: str, start_ms: int, end_ms: int, cut_ms: int, fields: dict[str, Any],
                 words: list[Word] | None = None) -> None:
        failure = None
        if "error" in fields:
            failure = self._failure or (str(fields["error"]), "the segment could not be recognised")
            self._failure = None
        self.conn.emit(self.conn.turns.final((self.generation, segment_id), text, (end_ms - start_ms) / 1000,
                                             self.offset_ms + cut_ms, failure))

    def on_error(self, code: str, message: str, fatal: bool) -> None:
        if fatal:
            self.conn.on_error(code, message, fatal)
            return
        # A segment the model could not recognise (its final follows at once): OpenAI clients
        # hear of it as that item's `...transcription.failed`, not as a separate `error`.
        self.conn.app.metrics.errors.labels(code).inc()
        self._failure = (code, message)


class RealtimeConnection(Connection):
    """One client speaking OpenAI's Realtime transcription protocol."""

    def __init__(self, app: "ChorusServer", ws: ServerConnection) -> None:
        super().__init__(app, ws)
        # Audio travels as base64 text in this dialect: an append as large as the largest
        # audio message the server accepts must pass the text limit.
        b64 = 4 * -(-self.cfg.max_message_bytes // 3) + 4096
        self.cfg = dataclasses.replace(self.cfg, max_text_message_bytes=max(self.cfg.max_text_message_bytes, b64))
        self.ids = realtime.Ids(uuid.uuid4().hex[:12])
        self.session_id = "sess_" + uuid.uuid4().hex[:20]
        self.form = GA
        self.settings = RealtimeSettings()
        self.turns = Turns(self.ids, vad=True)
        self._stream: StreamConfig | None = None  # what the next Session is built with
        self._generation = 0
        self._offset_ms = 0  # audio of the Sessions before this one: the connection's clock
        self._odd = b""  # PCM16 split mid-sample: its last byte waits for the next append
        self._buffered_bytes = 0  # appended since the last commit or clear (manual mode's check)

    # ------------------------------------------------------------------ sending
    def emit(self, events: list[str]) -> None:
        for event in events:
            self.send(event)

    def _reject(self, e: RealtimeError) -> None:
        self.app.metrics.errors.labels(e.code).inc()
        self.send(realtime.error(self.ids.next("event"), e))

    def report(self, code: str, message: str, fatal: bool) -> None:
        kind = "invalid_request_error" if code in _CLIENT_CODES else "server_error"
        self.send(realtime.error(self.ids.next("event"), RealtimeError(code, message, kind=kind)))

    def _session_event(self, kind: str) -> None:
        self.send(realtime.session_event(self.ids.next("event"), kind, self.settings, self.session_id, self.form,
                                         self.app.config.vad.pre_roll_ms))

    def _config(self, settings: RealtimeSettings, form: str) -> StreamConfig:
        return realtime.stream_config(settings, self.cfg.default_language, self.app.runner.languages(),
                                      self.app.max_segment_ms_limit(), form)

    # ------------------------------------------------------------------ hooks
    async def begin(self) -> Close | None:
        query = dict(parse_qsl(urlsplit(self.ws.request.path).query, keep_blank_values=True))
        intent = query.get("intent")
        if intent is not None and intent != "transcription":
            self._reject(RealtimeError("unsupported_intent", "this server serves transcription sessions only; connect "
                                       "with ?intent=transcription", "intent"))
            return CLOSE_POLICY, "unsupported_intent"
        # The beta SDK announces itself; its clients expect the transcription_session.* events.
        if "realtime=v1" in self.ws.request.headers.get("OpenAI-Beta", ""):
            self.form = BETA
        self._stream = self._config(self.settings, self.form)
        self._session_event("created")
        return None

    async def finish(self, drain: bool) -> None:
        await self.stop_sessions()
        # Manual mode: a turn the client never committed still has its words delivered.
        self.emit(self.turns.flush())

    async def on_text(self, text: str) -> Close | None:
        try:
            event = realtime.parse_event(text)
        except RealtimeError as e:
            # A bad event is dropped; the session goes on.
            self._reject(e)
            return None
        if isinstance(event, Append):
            await self._append(event)
        elif isinstance(event, SessionUpdate):
            await self._update(event)
        elif isinstance(event, Commit):
            self._commit(event)
        elif isinstance(event, Clear):
            self.emit(self.turns.clear())
            if self.session is not None:
                # Ends the open segment; Turns ignores its final. The endpointer keeps up to its
                # pre-roll of earlier audio, which may still begin the next segment.
                self.session.finalize()
            self._buffered_bytes = 0
        return None

    def on_audio(self, data: bytes) -> None:
        self._reject(RealtimeError("unexpected_binary", "audio goes in input_audio_buffer.append events (base64); "
                                   "binary frame dropped"))

    # ------------------------------------------------------------------ events
    async def _update(self, event: SessionUpdate) -> None:
        try:
            settings = realtime.apply_update(self.settings, event)
            stream = self._config(settings, event.form)
        except RealtimeError as e:
            e.event_id = event.event_id
            self._reject(e)  # the session keeps its settings
            return
        if self.session is not None and stream != self.session.stream:
            await self._end_session()
        self.emit(self.turns.set_vad(settings.turn_detection is not None))
        self.settings, self._stream, self.form = settings, stream, event.form
        self._session_event("updated")

    async def _end_session(self) -> None:
        """Stop the current Session (its finals are delivered); the next audio starts another."""
        session = self.session
        assert session is not None
        self.hold()
        try:
            await session.stop()
        finally:
            self._holding = False
        self._offset_ms += session.endpointer.stream_ms
        session.close()
        self.session = None
        self._generation += 1
        self._odd = b""
        log.info("session %s: settings changed; its next audio starts a new session", session.id)

    def _start(self) -> Session:
        assert self._stream is not None
        out = _Output(self, self._generation, self._offset_ms)
        self.session = Session(self.app.config, self._stream, self.app.batcher, out, self.app.metrics)
        s = self.settings
        log.info("session %s started (realtime %s, %s, %s, language %s, model %r)", self.session.id, self.session_id,
                 s.audio_format, "server_vad" if s.turn_detection else "manual commits", self._stream.language,
                 (s.model or "")[:40])
        return self.session

    async def _append(self, event: Append) -> None:
        data = event.audio
        if len(data) > self.cfg.max_message_bytes:
            self._reject(RealtimeError("message_too_large", f"{len(data)} bytes of audio in one append exceeds "
                                       f"{self.cfg.max_message_bytes}; dropped", "audio", event.event_id))
            return
        session = self.session or self._start()
        if session.stream.encoding == "pcm_s16le":
            data = self._odd + data
            usable = len(data) - len(data) % 2
            data, self._odd = data[:usable], data[usable:]
        self._buffered_bytes += len(data)
        try:
            await self.feed(session, data, _SLICE_BYTES, lambda: self._poll(session))
        except AudioFormatError as e:  # not reached: whole samples of these encodings always decode
            self._reject(RealtimeError("bad_audio", f"{e}; audio dropped", "audio", event.event_id))

    def _poll(self, session: Session) -> None:
        """Server VAD: a turn ends when the endpointer cuts its segment, not when the model
        has recognised it."""
        if not self.turns.vad or not self.turns.speaking:
            return
        seg = session.endpointer.open_segment()
        key = (self._generation, seg[0]) if seg is not None else None
        self.emit(self.turns.poll(key, self._offset_ms + session.endpointer.stream_ms))

    def _commit(self, event: Commit) -> None:
        session = self.session
        if self.turns.vad:
            if session is None or not self.turns.speaking:
                self._reject(RealtimeError("input_audio_buffer_commit_empty", "no speech is in progress to commit "
                                           "(with server VAD, turns are committed when speech stops)", None,
                                           event.event_id))
                return
            session.finalize()
            self.emit(self.turns.segment_cut(self._offset_ms + session.endpointer.stream_ms))
            return
        stream = self._stream if session is None else session.stream
        assert stream is not None
        ms = self._buffered_bytes * 1000 // (BYTES_PER_SAMPLE[stream.encoding] * stream.sample_rate)
        if ms < MIN_COMMIT_MS:
            self._reject(RealtimeError("input_audio_buffer_commit_empty", f"buffer too small: expected at least "
                                       f"{MIN_COMMIT_MS} ms of audio, but the buffer has {ms} ms", None, event.event_id))
            return
        if session is not None:
            session.finalize()
        self._buffered_bytes = 0
        self.emit(self.turns.commit())


async def handle(app: "ChorusServer", ws: ServerConnection) -> None:
    """websockets' handler for /v1/realtime; admission already counted this connection."""
    await connection.handle(app, ws, RealtimeConnection(app, ws))


__all__ = ["PATH", "RealtimeConnection", "handle"]
