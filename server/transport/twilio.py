"""The Twilio Media Streams adapter at `/v1/twilio` on the main port.

One WebSocket is one Twilio stream of one call (``callSid``). Each of its tracks (the
caller's ``inbound`` audio, and ``outbound`` with ``track="both_tracks"``) is one speaker:
its own Session, with a ``TrackOutput`` publishing its results on the call hub, from where
they reach the webhook and /v1/calls subscribers. Nothing goes back down Twilio's socket.

Unlike a native client, Twilio is not the reader of the results, so a stream that ends
without ``stop`` (a dropped connection, an idle timeout) still has its open segments
finalised and its finals published: the application gets every word that was said.

Media timestamps keep each track on the call's clock: a track's first frame sets its
offset, and a gap in the timestamps (frames Twilio did not send) is filled with up to
``_MAX_FILL_MS`` of silence (enough to end the segment that was open) and the rest
recorded as a jump of the track's clock.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
from typing import TYPE_CHECKING, Mapping

import numpy as np
from websockets.asyncio.server import ServerConnection

from server.audio.codecs import AudioFormatError, encode
from server.calls.hub import CallStream, UnencodableEvent
from server.calls.track import TrackOutput
from server.config import Config
from server.protocol import native, twilio
from server.protocol.native import ProtocolError
from server.protocol.twilio import TwilioError
from server.secrets import read_secret
from server.session import Session
from server.stream_config import StreamConfig
from server.transport import connection
from server.transport.connection import CLOSE_NORMAL, CLOSE_POLICY, CLOSE_TRY_AGAIN, Close, Connection

if TYPE_CHECKING:
    from server.app import ChorusServer

log = logging.getLogger(__name__)

PATH = "/v1/twilio"
AUTH_TOKEN_ENV = "CHORUS_TWILIO_AUTH_TOKEN"
# A timestamp gap up to this is filled with silence (the longest endpointing a client may set is
# 5 s, so any segment open before the gap ends); beyond it the track's clock jumps instead.
_MAX_FILL_MS = 5000
# Frames may jitter by a packet or two; only a larger gap is a gap.
_GAP_TOLERANCE_MS = 60
# Bound on per-call error logging: a broken sender must not flood the log.
_LOGGED_ERRORS = 5


def load_auth_token(config: Config, environ: Mapping[str, str]) -> str | None:
    """The Twilio Auth Token from ``$CHORUS_TWILIO_AUTH_TOKEN`` or `twilio.auth_token_file`, or None."""
    return read_secret(environ, AUTH_TOKEN_ENV, config.twilio.auth_token_file, "twilio.auth_token_file")


def public_url_warning(config: Config, auth_token: str | None) -> str | None:
    """Why `twilio.public_url` is probably needed and is not set, or None.

    Only a server that checks signatures (an Auth Token is set) needs the URL Twilio signed. Twilio
    connects only to ``wss://`` URLs at public addresses, so a server bound to loopback, or one
    serving without TLS, is reached through something in front of it (a tunnel such as ngrok, a
    TLS-terminating proxy or load balancer). That is what "behind a proxy" means here: detectable
    from the configuration at startup. Such a front may pass on a Host other than the one in the
    TwiML's URL (nginx sends its upstream's name unless told `proxy_set_header Host $host`), and
    then every signature check fails."""
    if not config.twilio.enabled or auth_token is None or config.twilio.public_url:
        return None
    host = config.server.host.strip("[]")
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        why = f"listens on loopback ({config.server.host})"
    elif not config.server.tls_cert:
        why = "serves without TLS (Twilio connects only to wss:// URLs)"
    else:
        return None
    return (f"twilio.public_url is not set and this server {why}, so Twilio reaches it through a proxy or "
            f"tunnel: its X-Twilio-Signature is checked against wss://<the Host header the proxy passes on>"
            f"{PATH}, and every stream is refused (403) if that Host is not the one in your TwiML's URL; set "
            f"twilio.public_url to that URL")


def signed_urls(config: Config, host: str | None, path: str) -> list[str]:
    """The URLs Twilio may have signed for this handshake: `twilio.public_url`, else
    ``wss://<Host><path>``, with and without the default port (Twilio's own validators try both)."""
    if config.twilio.public_url:
        return [config.twilio.public_url]
    if not host:
        return []
    bare = host[:-4] if host.endswith(":443") else host
    return [f"wss://{bare}{path}", f"wss://{bare}:443{path}"]


@dataclasses.dataclass
class _Track:
    session: Session
    output: TrackOutput
    fed_samples: int = 0  # 8 kHz samples fed so far: the session's clock

    @property
    def fed_ms(self) -> int:
        return self.fed_samples // 8


class TwilioConnection(Connection):
    """One Twilio stream: its tracks' sessions and its call on the hub."""

    def __init__(self, app: "ChorusServer", ws: ServerConnection) -> None:
        super().__init__(app, ws)
        self.start: twilio.Start | None = None
        self.call: CallStream | None = None
        self.stream_config: StreamConfig | None = None
        self.tracks: dict[str, _Track] = {}
        self._errors_logged = 0

    def sid(self) -> str:
        return self.start.call_sid if self.start else "-"

    # ------------------------------------------------------------------ errors
    def report(self, code: str, message: str, fatal: bool) -> None:
        # Twilio reads nothing we send: the application hears of it on the call, the operator in the log.
        self._log_error(code, message)
        if self.call is not None:
            self.call.publish("error", None, {"code": code, "message": message, "fatal": fatal})

    def _track_error(self, code: str, message: str, fatal: bool) -> None:
        # A session's error (published on the call by its TrackOutput): count and log it only.
        self.app.metrics.errors.labels(code).inc()
        self._log_error(code, message)

    def _log_error(self, code: str, message: str) -> None:
        if self._errors_logged < _LOGGED_ERRORS:
            self._errors_logged += 1
            log.warning("twilio call %s: %s: %s%s", self.sid(), code, message,
                        "" if self._errors_logged < _LOGGED_ERRORS else " (further errors of this call are not logged)")

    # ------------------------------------------------------------------ messages
    async def on_text(self, text: str) -> Close | None:
        try:
            msg = twilio.parse(text)
        except TwilioError as e:
            self.on_error(e.code, f"{e.message}; frame dropped", False)
            return None
        if isinstance(msg, twilio.Media):
            self._media(msg)
            return None
        if isinstance(msg, twilio.Start):
            return self._start(msg)
        if isinstance(msg, twilio.Dtmf):
            if self.call is not None:
                self.call.publish("dtmf", msg.track, {"digit": msg.digit})
            return None
        if isinstance(msg, twilio.Stop):
            await self._end("stop")
            return CLOSE_NORMAL, "stop"
        return None  # connected, mark, and event types Twilio may add

    def _start(self, msg: twilio.Start) -> Close | None:
        if self.start is not None:
            self.on_error("already_started", "a second `start` on one stream; ignored", False)
            return None
        if len(msg.tracks) > 1:
            # Each track is a session of its own for the model: admission charges both.
            refusal = self.app.admission.charge(self.ws, len(msg.tracks))
            if refusal is not None:
                self.on_error("capacity", f"{len(msg.tracks)} tracks need {len(msg.tracks)} sessions: "
                              f"{refusal.message}; stream refused", True)
                return CLOSE_TRY_AGAIN, "capacity"
        try:
            self.call = self.app.calls.open(msg.call_sid, "twilio", stream_id=msg.stream_sid,
                                            metadata=self._metadata(msg), tracks=msg.tracks)
        except UnencodableEvent:
            # Refused before the call is registered: there is no call to leave open.
            self.on_error("bad_start", "`start.customParameters` hold a value JSON cannot carry (an unpaired "
                          "surrogate); stream refused", True)
            return CLOSE_POLICY, "bad_start"
        # The call opens either way: a bad option is an error the application sees on it.
        self.start = msg
        try:
            fields = native.build_config(
                twilio.options(msg.custom),
                default_language=self.cfg.default_language,
                max_segment_ms_limit=self.app.max_segment_ms_limit(),
                languages=self.app.runner.languages(),
            )
        except ProtocolError as e:
            self.on_error(e.code, f"customParameters: {e.message}", True)
            self.call.end("error")
            return CLOSE_POLICY, e.code
        self.stream_config = dataclasses.replace(fields, sample_rate=msg.sample_rate, encoding=msg.encoding)
        log.info("twilio call %s stream %s started: tracks %s, %s", msg.call_sid, msg.stream_sid,
                 ",".join(msg.tracks), {k: v for k, v in self.stream_config.to_dict().items() if k in native.CONFIG_KEYS})
        return None

    @staticmethod
    def _metadata(msg: twilio.Start) -> dict:
        return {"account_sid": msg.account_sid, "custom_parameters": msg.custom,
                "media_format": {"encoding": msg.encoding, "sample_rate": msg.sample_rate}}

    def _media(self, msg: twilio.Media) -> None:
        if self.start is None or self.call is None or self.stream_config is None:
            self.on_error("not_started", "`media` before `start`; frame dropped", False)
            return
        if msg.track not in self.start.tracks:
            self.on_error("bad_track", f"media of track {msg.track!r}, which `start` did not list; frame dropped", False)
            return
        track = self.tracks.get(msg.track)
        if track is None:
            output = TrackOutput(self.call, msg.track, on_error=self._track_error, offset_ms=msg.timestamp_ms or 0)
            session = Session(self.app.config, self.stream_config, self.app.batcher, output, self.app.metrics,
                              partials_wanted=output.wants_partials)
            track = self.tracks[msg.track] = _Track(session, output)
        elif msg.timestamp_ms is not None:
            self._fill_gap(track, msg.timestamp_ms)
        try:
            track.session.feed_audio(msg.payload)
        except AudioFormatError as e:  # not reached for G.711 (any byte is a sample); kept for safety
            self.on_error("bad_audio", f"{e}; frame dropped", False)
            return
        track.fed_samples += len(msg.payload)

    def _fill_gap(self, track: _Track, timestamp_ms: int) -> None:
        expected = track.output.call_ms(track.fed_ms)
        gap = timestamp_ms - expected
        if gap <= _GAP_TOLERANCE_MS:
            return
        fill = min(gap, _MAX_FILL_MS)
        assert self.stream_config is not None
        track.session.feed_audio(encode(np.zeros(fill * 8, dtype=np.float32), self.stream_config.encoding))
        track.fed_samples += fill * 8
        track.output.skip(track.fed_ms, gap - fill)

    def on_audio(self, data: bytes) -> None:
        self.on_error("unexpected_binary", "Twilio sends JSON text frames only; binary frame dropped", False)

    def all_sessions(self) -> list[Session]:
        return [t.session for t in self.tracks.values()]

    # ------------------------------------------------------------------ ending
    async def _end(self, reason: str) -> None:
        """Finalise every track (their finals go out on the call), then end the call."""
        await self.stop_sessions()
        if self.call is not None:
            self.call.end(reason)

    async def finish(self, drain: bool) -> None:
        await self._end("shutdown" if drain else "session_limit")

    async def settle(self) -> None:
        # Ended without `stop` (the connection dropped, an idle timeout, a bug).
        await self.settle_call(self.call, self.stop_sessions)


async def handle(app: "ChorusServer", ws: ServerConnection) -> None:
    """websockets' handler for /v1/twilio; admission already counted this connection."""
    await connection.handle(app, ws, TwilioConnection(app, ws))


__all__ = ["PATH", "TwilioConnection", "handle", "load_auth_token", "public_url_warning", "signed_urls"]
