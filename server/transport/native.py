"""The native dialect's connection adapter: /v1/stream messages <-> one Session per audio channel.

This is the only place where the native JSON codec meets a socket; what every dialect
shares (outbox bounds, keepalive, limits, drain) is in server/transport/connection.py.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

import numpy as np
from websockets.asyncio.server import ServerConnection

from server.audio.codecs import BYTES_PER_SAMPLE, AudioFormatError
from server.calls.hub import CallStream, UnencodableEvent
from server.calls.track import TrackOutput
from server.protocol import native
from server.protocol.native import Finalize, KeepAlive, ProtocolError, Start, Stop
from server.session import Session
from server.transport import connection
from server.transport.connection import CLOSE_NORMAL, CLOSE_POLICY, Close, Connection

if TYPE_CHECKING:
    from server.app import ChorusServer
    from server.runners.base import Word

log = logging.getLogger(__name__)

# Call tracks of a stream that names a call, by its number of channels (FreeSWITCH's stereo
# puts the caller on the first channel, the callee on the second).
TRACK_NAMES = {1: ("mono",), 2: ("caller", "callee")}


class _Channel:
    """SessionOutput of one channel's session: native messages to the client (with
    ``channel`` on a two-channel stream), and the call's events when the stream names a call."""

    def __init__(self, conn: "NativeConnection", index: int | None) -> None:
        self.conn = conn
        self.index = index
        self.track: TrackOutput | None = None  # set when the call opens

    def on_speech_started(self, segment_id: int, start_ms: int) -> None:
        self.conn.send(native.speech_started(segment_id, start_ms, self.index))
        if self.track is not None:
            self.track.on_speech_started(segment_id, start_ms)

    def on_partial(self, segment_id: int, text: str, start_ms: int, end_ms: int, fields: dict[str, Any],
                   words: list[Word] | None = None) -> None:
        self.conn.send(native.partial(segment_id, text, start_ms, end_ms, fields, words, self.index))
        if self.track is not None:
            self.track.on_partial(segment_id, text, start_ms, end_ms, fields, words)

    def on_final(self, segment_id: int, text: str, start_ms: int, end_ms: int, cut_ms: int, fields: dict[str, Any],
                 words: list[Word] | None = None) -> None:
        self.conn.send(native.final(segment_id, text, start_ms, end_ms, cut_ms, fields, words, self.index))
        if self.track is not None:
            self.track.on_final(segment_id, text, start_ms, end_ms, cut_ms, fields, words)

    def on_error(self, code: str, message: str, fatal: bool) -> None:
        if self.track is not None:
            self.track.on_error(code, message, fatal)
        self.conn.on_error(code, message, fatal)


class NativeConnection(Connection):
    """One WebSocket client speaking the native protocol: one session per audio channel."""

    def __init__(self, app: "ChorusServer", ws: ServerConnection) -> None:
        super().__init__(app, ws)
        self.channels: list[Session] = []
        self._outputs: list[_Channel] = []
        self._width = 2  # bytes per sample of the stream's encoding
        self._from_url = False  # configured by URL: stray text frames are a bridge's metadata
        self._call_id: str | None = None
        self.call: CallStream | None = None

    def all_sessions(self) -> list[Session]:
        return self.channels

    def report(self, code: str, message: str, fatal: bool) -> None:
        self.send(native.error(code, message, fatal))

    def results_have_other_readers(self) -> bool:
        # The call's application reads this stream's finals too: a kick must not drop them.
        return self.call is not None and not self.call.ended

    # ------------------------------------------------------------------ calls
    def _open_call(self, metadata: dict[str, Any] | None) -> None:
        """A stream that names a call publishes it on the hub from its first audio or metadata.
        Raises UnencodableEvent (nothing opened) for metadata JSON cannot carry."""
        if self._call_id is None or self.call is not None:
            return
        names = TRACK_NAMES[len(self.channels)]
        self.call = self.app.calls.open(self._call_id, "native", stream_id=self.session.id if self.session else None,
                                        metadata=metadata, tracks=names)
        for output, name in zip(self._outputs, names):
            output.track = TrackOutput(self.call, name)

    def _metadata(self, metadata: dict[str, Any], size: int) -> None:
        """A bridge's metadata frame (mod_audio_stream sends the text given on its command line
        first, and more with send_text/stop): the call's metadata, never a protocol error. One
        that JSON cannot carry (NaN, an unpaired surrogate) is refused with a non-fatal error,
        before the call opens if it would have opened it."""
        published = True
        if self.call is None:
            try:
                self._open_call(metadata)
            except UnencodableEvent:
                published = False
        elif self._call_id is not None:
            published = self.call.publish("metadata", None, {"metadata": metadata}) or self.call.ended
        if not published:
            self.on_error("bad_metadata", "the metadata frame holds a value JSON cannot carry (NaN, Infinity or "
                          "an unpaired surrogate); dropped", False)
        log.debug("session %s: metadata frame of %d characters", self.sid(), size)

    # ------------------------------------------------------------------ hooks
    async def finish(self, drain: bool) -> None:
        if self.channels:
            await self.stop_sessions()
            if drain:
                self.send(native.done())
        if self.call is not None:
            self.call.end("shutdown" if drain else "session_limit")

    async def settle(self) -> None:
        # A stream that names a call still delivers that call's words when its client goes away
        # without `stop` (FreeSWITCH's `uuid_audio_stream stop` just closes the socket).
        if self._call_id is not None:
            await self.settle_call(self.call, self.stop_sessions)

    def _start(self, fields: dict) -> None:
        stream = native.build_config(
            fields,
            default_language=self.cfg.default_language,
            max_segment_ms_limit=self.app.max_segment_ms_limit(),
            # Sessions are admitted only once the model is loaded, so this set is known here; a
            # language outside it is refused now rather than failing the batches it would join.
            languages=self.app.runner.languages(),
        )
        n, self._call_id = native.call_options(fields)
        if n > 1:
            # Each channel is a session of its own for the model: admission charges every one.
            refusal = self.app.admission.charge(self.ws, n)
            if refusal is not None:
                raise ProtocolError("capacity", f"{n} channels need {n} sessions: {refusal.message}", fatal=True)
        self._width = BYTES_PER_SAMPLE[stream.encoding]
        self._outputs = [_Channel(self, i if n > 1 else None) for i in range(n)]
        self.channels = [Session(self.app.config, stream, self.app.batcher, out, self.app.metrics) for out in self._outputs]
        self.session = self.channels[0]
        eff = stream.to_dict()
        eff["endpointing_ms"] = self.session.settings.endpoint_ms
        eff["max_segment_ms"] = self.session.settings.max_segment_ms
        eff["interim_results"] = bool(self.session.partial_interval_ms)
        self.send(native.ready(self.session.id, type(stream)(**eff), self.app.model_info(), n, self._call_id))
        log.info("session %s started: %s%s", self.session.id, eff,
                 f", {n} channels" if n > 1 else "")

    async def begin(self) -> Close | None:
        query = dict(parse_qsl(urlsplit(self.ws.request.path).query, keep_blank_values=True))
        try:
            fields = native.parse_query(query)
            if fields:
                self._start(fields)
                self._from_url = True
        except ProtocolError as e:
            self.on_error(e.code, e.message, True)
            return CLOSE_POLICY, e.code
        return None

    async def on_text(self, text: str) -> Close | None:
        try:
            msg = native.parse_text(text)
        except ProtocolError as e:
            metadata = _as_metadata(text) if self._from_url and e.code in ("bad_json", "unknown_type") else None
            if metadata is not None:
                self._metadata(metadata, len(text))
                return None
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
            for session in self.channels:
                session.finalize()
        elif isinstance(msg, KeepAlive):
            pass
        elif isinstance(msg, Stop):
            await self.stop_sessions()
            self.send(native.done())
            if self.call is not None:
                self.call.end("stop")
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
        if self.call is None:
            self._open_call(None)
        try:
            if len(self.channels) == 1:
                self.channels[0].feed_audio(data)
                return
            frame = self._width * len(self.channels)
            if len(data) % frame:
                raise AudioFormatError(f"{len(data)} bytes is not a whole number of {len(self.channels)}-channel "
                                       f"frames ({frame} bytes each)")
            # Interleaved frames: channel c's samples are every n-th sample starting at c.
            frames = np.frombuffer(data, dtype=np.uint8).reshape(-1, len(self.channels), self._width)
            for c, session in enumerate(self.channels):
                session.feed_audio(frames[:, c, :].tobytes())
        except AudioFormatError as e:
            self.on_error("bad_audio", f"{e}; message dropped", False)


def _as_metadata(text: str) -> dict[str, Any] | None:
    """A text frame as metadata: a JSON object as it is, any other text as ``{"text": ...}``;
    None for a JSON object with a `type` (a native message, however wrong)."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return {"text": text}
    if isinstance(obj, dict):
        return None if "type" in obj else obj
    return {"text": text}


async def handle(app: "ChorusServer", ws: ServerConnection) -> None:
    """websockets' handler for a stream path; admission already counted this connection."""
    await connection.handle(app, ws, NativeConnection(app, ws))
