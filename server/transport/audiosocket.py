"""The Asterisk AudioSocket listener: one TCP connection is one call.

Asterisk's ``AudioSocket()`` dialplan application connects, sends the call's UUID, then
20 ms frames of signed linear audio, DTMF and finally a hangup (or just closes). The call is
one speaker (track ``inbound``): one Session, whose results a ``TrackOutput`` publishes on
the call hub (webhook, /v1/calls). AudioSocket carries no options, so every call uses
`audiosocket.language`. It has no authentication either: the listener binds its own address
(`audiosocket.host`, loopback by default) and closes a connection from any peer outside
`audiosocket.allowed_peers` before reading a byte of it. A UUID names one live call: a second
connection sending the UUID of a call that is still connected is hung up, and the first keeps
its call (else a peer that learned the UUID could inject words and DTMF, or hold the call open).

Admission is the same as for WebSocket streams (a refused call gets the hangup frame). A
malformed frame ends that call only: an ``error`` event, the finals of what was heard,
``call_ended`` with reason ``protocol_error``, and the hangup frame. However a call ends
(hangup, the socket closing, a drain, a limit), its open segment is recognised first and its
finals published: the application is the reader, not this socket.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import TYPE_CHECKING, Any

from server import incidents
from server.calls.hub import CallStream
from server.calls.track import TrackOutput
from server.protocol import audiosocket as proto
from server.session import Session
from server.stream_config import StreamConfig

if TYPE_CHECKING:
    from server.app import ChorusServer

log = logging.getLogger(__name__)

TRACK = "inbound"
# Asterisk sends the UUID as soon as it connects; a peer that does not is not Asterisk.
UUID_TIMEOUT_S = 5.0
_READ_BYTES = 1 << 16
_CLOSE_TIMEOUT_S = 5.0


class _Ended(Exception):
    """The call is over: ``reason`` for `call_ended`, with extra fields."""

    def __init__(self, reason: str, **fields: Any) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fields = fields


class AudioSocketCall:
    """One AudioSocket connection; drained like a WebSocket connection (see app.stop)."""

    def __init__(self, app: "ChorusServer", reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 live: set[str] | None = None) -> None:
        self.app = app
        # UUIDs of the calls this listener has connected now (shared by its connections).
        self.live = live if live is not None else set()
        self.reader = reader
        self.writer = writer
        self.cfg = app.config.server
        self.parser = proto.FrameParser()
        self.call: CallStream | None = None
        self.session: Session | None = None
        self.output: TrackOutput | None = None
        self.rate: int | None = None
        self.finished: asyncio.Future = asyncio.get_running_loop().create_future()
        self._serving: asyncio.Task | None = None
        self._draining = False
        self._hangup = False  # send Asterisk the hangup frame before closing

    def sid(self) -> str:
        return self.call.call_id if self.call else "-"

    def drain(self, close_code: int) -> None:
        """Graceful shutdown: stop reading; the rest happens in run() (finals, call_ended, close)."""
        if self._serving is not None and not self._draining:
            self._draining = True
            self._serving.cancel()

    # ------------------------------------------------------------------ errors
    def _protocol_error(self, message: str) -> _Ended:
        self.app.metrics.errors.labels("bad_frame").inc()
        log.warning("audiosocket call %s: %s; ending the call", self.sid(), message)
        if self.call is not None:
            self.call.publish("error", None, {"code": "bad_frame", "message": message, "fatal": True})
        self._hangup = True
        return _Ended("protocol_error")

    def _session_error(self, code: str, message: str, fatal: bool) -> None:
        self.app.metrics.errors.labels(code).inc()
        log.warning("audiosocket call %s: %s: %s", self.sid(), code, message)

    # ------------------------------------------------------------------ frames
    async def _frame(self, frame: proto.Frame) -> None:
        if isinstance(frame, proto.Audio):
            if self.call is None:
                raise self._protocol_error("audio before the call's UUID")
            if self.session is None:
                self._start_session(frame.rate)
            elif frame.rate != self.rate:
                raise self._protocol_error(f"audio at {frame.rate} Hz in a call that started at {self.rate} Hz")
            assert self.session is not None
            self.session.feed_audio(frame.pcm)
            if self.session.held_back:
                # TCP backpressure: Asterisk's writes wait rather than the batcher's queue growing.
                await self.session.backpressure()
        elif isinstance(frame, proto.Uuid):
            if self.call is not None:
                raise self._protocol_error("a second UUID frame")
            if frame.call_id in self.live:
                # Not this connection's call: nothing is published on it, the live one goes on.
                self.app.metrics.sessions_rejected.labels("duplicate_call").inc()
                log.warning("audiosocket connection from %s refused: call %s is already connected",
                            _peer_address(self.writer), frame.call_id)
                self._hangup = True
                raise _Ended("duplicate_call")
            self.live.add(frame.call_id)
            self.call = self.app.calls.open(frame.call_id, "audiosocket", tracks=(TRACK,))
            log.info("audiosocket call %s started", frame.call_id)
        elif isinstance(frame, proto.Dtmf):
            if self.call is None:
                raise self._protocol_error("DTMF before the call's UUID")
            self.call.publish("dtmf", TRACK, {"digit": frame.digit})
        elif isinstance(frame, proto.Hangup):
            raise _Ended("hangup")
        elif isinstance(frame, proto.Error):
            log.info("audiosocket call %s: Asterisk reported error code %s", self.sid(), frame.code)
            raise _Ended("asterisk_error", code=frame.code)
        else:  # proto.Invalid
            raise self._protocol_error(frame.message)

    def _start_session(self, rate: int) -> None:
        assert self.call is not None
        self.rate = rate
        stream = StreamConfig(sample_rate=rate, encoding="pcm_s16le",
                              language=self.app.config.audiosocket.language.strip().lower())
        self.output = TrackOutput(self.call, TRACK, on_error=self._session_error)
        self.session = Session(self.app.config, stream, self.app.batcher, self.output, self.app.metrics,
                               partials_wanted=self.output.wants_partials)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        ends = loop.time() + self.cfg.max_session_s if self.cfg.max_session_s > 0 else float("inf")
        while True:
            idle = UUID_TIMEOUT_S if self.call is None else self.cfg.idle_timeout_s
            try:
                async with asyncio.timeout(min(idle, max(0.0, ends - loop.time()))):
                    data = await self.reader.read(_READ_BYTES)
            except TimeoutError:
                if loop.time() >= ends:
                    raise _Ended("session_limit") from None
                if self.call is None:
                    raise self._protocol_error(f"no UUID frame within {UUID_TIMEOUT_S:g} s") from None
                self.app.metrics.errors.labels("idle_timeout").inc()
                self.call.publish("error", None, {"code": "idle_timeout", "fatal": True,
                                                  "message": f"nothing received for {idle:g} s"})
                raise _Ended("idle_timeout") from None
            if not data:
                raise _Ended("hangup")  # Asterisk closed the socket: the call is over
            for frame in self.parser.feed(data):
                await self._frame(frame)

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        serving = self._serving = asyncio.create_task(self._serve())
        reason, fields = "hangup", {}
        try:
            await serving
        except _Ended as end:
            reason, fields = end.reason, end.fields
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not self._draining or (current is not None and current.cancelling()):
                await self._finish("shutdown", {})
                raise
            reason = "shutdown"
        except (ConnectionError, OSError):
            reason = "hangup"
        except Exception as exc:  # noqa: BLE001 - a bug here must end this call only
            incident = incidents.report(log, "audiosocket call %s: internal error", exc, self.sid())
            if self.call is not None:
                self.call.publish("error", None, {"code": "internal", "fatal": True,
                                                  "message": f"internal server error (incident {incident})"})
            reason = "error"
        await self._finish(reason, fields)

    async def _finish(self, reason: str, fields: dict[str, Any]) -> None:
        """Recognise what is left, publish the finals and `call_ended`, close the socket."""
        try:
            if self.session is not None:
                try:
                    await asyncio.wait_for(self.session.stop(), self.app.config.server.shutdown_timeout_s)
                except asyncio.TimeoutError:
                    log.warning("audiosocket call %s: finals not done in time; the rest is lost", self.sid())
                finally:
                    self.session.close()
        finally:  # the call ends even if finishing the session failed or was cancelled
            if self.call is not None:
                self.live.discard(self.call.call_id)
                self.call.end(reason, **fields)
                log.info("audiosocket call %s ended: %s", self.call.call_id, reason)
        await _close(self.writer, hang_up=self._hangup)


async def _close(writer: asyncio.StreamWriter, hang_up: bool) -> None:
    """Close the socket (after the hangup frame, when Chorus ends the call); a peer that does not
    let it close in time is aborted."""
    try:
        if hang_up:
            writer.write(proto.HANGUP_FRAME)
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), _CLOSE_TIMEOUT_S)
    except (ConnectionError, OSError, asyncio.TimeoutError):
        writer.transport.abort()


def _peer_address(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return str(peer[0]) if peer else "?"


def allowed_networks(peers: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """`audiosocket.allowed_peers` as networks (config validation has checked each entry)."""
    return tuple(ipaddress.ip_network(p.strip(), strict=False) for p in peers)


def peer_allowed(address: str, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone id is not part of the address
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # an IPv4 peer on a dual-stack socket
    return any(ip in net for net in networks)


async def _handle(app: "ChorusServer", reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...], live: set[str]) -> None:
    address = _peer_address(writer)
    if not peer_allowed(address, networks):
        # Before reading anything: a stranger gets no call, no session and no admission slot.
        app.metrics.sessions_rejected.labels("peer").inc()
        log.warning("audiosocket connection from %s refused: not in audiosocket.allowed_peers", address)
        writer.transport.abort()
        return
    key = object()
    refusal = app.refusal() or app.admission.admit(key, address)
    if refusal is not None:
        app.metrics.sessions_rejected.labels(refusal.reason).inc()
        log.info("audiosocket call from %s refused: %s", address, refusal.message)
        await _close(writer, hang_up=True)
        return
    call = AudioSocketCall(app, reader, writer, live)
    app.connections.add(call)  # type: ignore[arg-type]  # drained like a WebSocket connection
    try:
        await call.run()
    finally:
        app.connections.discard(call)  # type: ignore[arg-type]
        app.admission.release(key)
        if not call.finished.done():
            call.finished.set_result(None)


async def serve(app: "ChorusServer") -> asyncio.AbstractServer:
    """Listen on `audiosocket.host`:`audiosocket.port`."""
    cfg = app.config.audiosocket
    networks = allowed_networks(cfg.allowed_peers)
    live: set[str] = set()
    return await asyncio.start_server(lambda r, w: _handle(app, r, w, networks, live), cfg.host, cfg.port,
                                      limit=_READ_BYTES)


__all__ = ["AudioSocketCall", "serve"]
