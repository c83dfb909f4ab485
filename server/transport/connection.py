"""One client connection of any dialect: the outgoing queue, keepalive, limits, drain.

What every protocol adapter shares lives here; a dialect (server/transport/native.py,
server/transport/funasr.py) subclasses ``Connection`` and implements the hooks that
speak its messages. The outbox is bounded in messages and bytes: a client that stops
reading is disconnected with 1008 instead of being buffered for without limit. Nothing
a client sends may escape an adapter as an exception: the worst outcome for a client
is its own close.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Awaitable, Callable

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from server import incidents

if TYPE_CHECKING:
    from server.app import ChorusServer
    from server.calls.hub import CallStream
    from server.session import Session

log = logging.getLogger(__name__)

CLOSE_NORMAL = 1000
CLOSE_POLICY = 1008
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013  # refused for load: the client may retry later
# A close handshake needs the client to read what is queued before the close frame; one that
# has not completed in this long (a client that stopped reading) is ended by aborting the TCP
# connection, so a stalled client cannot hold its session slot.
CLOSE_GRACE_S = 5.0
SLOW_CONSUMER = "slow_consumer: client is not reading results"

Close = tuple[int, str]  # close code and reason


class Connection:
    """The dialect-independent part of one WebSocket client. Subclasses implement:

    - ``begin()``: anything to do before the first message (e.g. config in the URL);
    - ``on_text(text)`` / ``on_audio(data)``: one client message;
    - ``finish(drain)``: deliver everything still owed (finals, a last message) when the
      connection ends by a drain or the session-length limit;
    - ``report(code, message, fatal)``: an error in the dialect's words;
    - ``settle()``, optionally: when results also go to someone other than this client (a
      call's application), deliver them however the connection ended;
    - ``results_have_other_readers()``, with ``settle()``: whether such readers wait now (then
      a kicked client's sessions are not dropped at the kick but finished by ``settle()``).

    A dialect whose connection carries several sessions (a stereo stream's channels)
    lists them in ``all_sessions()``; ``session`` is the first.
    """

    def __init__(self, app: "ChorusServer", ws: ServerConnection) -> None:
        self.app = app
        self.ws = ws
        self.cfg = app.config.server
        self.session: Session | None = None
        self.outbox: asyncio.Queue[str | None] = asyncio.Queue(maxsize=self.cfg.max_outgoing_messages)
        self._outbox_bytes = 0  # characters queued, bounded by max_outgoing_bytes
        self._kicked = False
        self._gone = False  # the client closed the connection: nothing more can reach it
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

    # ------------------------------------------------------------------ dialect hooks
    async def begin(self) -> Close | None:
        return None

    async def on_text(self, text: str) -> Close | None:
        raise NotImplementedError

    def on_audio(self, data: bytes) -> Awaitable[None] | None:
        """One binary message. Returns an awaitable when the message needs more than one step
        (a large one fed in slices): the read loop awaits it before reading on."""
        raise NotImplementedError

    async def finish(self, drain: bool) -> None:
        """Deliver what is still owed before a drain (``drain``) or the session-length limit
        closes the connection: the open segment's final and every queued one, at least."""

    def report(self, code: str, message: str, fatal: bool) -> None:
        raise NotImplementedError

    async def settle(self) -> None:
        """The read loop is over, however it ended (stop, drain, limit, the client gone, a
        bug): deliver what is owed to readers other than this client. The sessions are
        closed right after."""

    def results_have_other_readers(self) -> bool:
        return False

    async def settle_call(self, call: "CallStream | None", finalise: Callable[[], Awaitable[None]]) -> None:
        """For a dialect whose results also go to a call (the application is their reader, not
        this socket): ``finalise`` the sessions, so the words said so far reach the call, within
        the shutdown budget, then end the call ``disconnected`` (``slow_consumer`` for a client
        kicked for not reading). Segments whose finals were not out when the budget ran out are
        counted in the event's ``lost_segments``. Nothing if the
        call already ended."""
        if call is None or call.ended:
            return
        reason = "slow_consumer" if self._kicked else "disconnected"
        try:
            await asyncio.wait_for(finalise(), self.cfg.shutdown_timeout_s)
        except asyncio.CancelledError:
            self._end_call(call, reason)
            raise
        except Exception as exc:  # noqa: BLE001 - the call must still end
            log.warning("session %s: finals after the disconnect were lost: %r", self.sid(), exc)
        self._end_call(call, reason)

    def _end_call(self, call: "CallStream", reason: str) -> None:
        lost = sum(session.pending_finals for session in self.all_sessions())
        if lost:
            log.warning("session %s: call %s ended with %d segment(s) not recognised", self.sid(), call.call_id[:64], lost)
            call.end(reason, lost_segments=lost)
        else:
            call.end(reason)

    def all_sessions(self) -> list["Session"]:
        return [self.session] if self.session is not None else []

    def on_error(self, code: str, message: str, fatal: bool) -> None:
        """SessionOutput's error callback; also counts errors by code."""
        self.app.metrics.errors.labels(code).inc()
        self.report(code, message, fatal)

    # ------------------------------------------------------------------ outgoing
    def send(self, text: str) -> None:
        if self._kicked or self._gone:
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
        stops now (no more model work for results nobody reads; a session whose results also
        go to a call is finished by ``settle()`` instead), the read loop ends at its next message, and the connection closes with 1008 or, if the client does not take
        the close frame within the grace period, is aborted (which also ends the read loop)."""
        self._kicked = True
        log.warning("session %s: client fell %d messages (%d characters) behind; closing 1008",
                    self.sid(), self.outbox.qsize(), self._outbox_bytes)
        self.app.metrics.errors.labels("slow_consumer").inc()
        if not self.results_have_other_readers():
            for session in self.all_sessions():
                session.close()
        # else settle() finishes the sessions: the finals they owe reach the call's readers.
        if self._writing is not None:
            self._writing.cancel()  # it is stuck on the full socket; the close frame goes next
        self._kick_close = asyncio.get_running_loop().create_task(self.close(CLOSE_POLICY, SLOW_CONSUMER))

    @property
    def kicked(self) -> bool:
        return self._kicked

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

    def sid(self) -> str:
        return self.session.id if self.session else "-"

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        writer = self._writing = asyncio.create_task(self._writer())
        keepalive = asyncio.create_task(self._keepalive()) if self.cfg.ping_interval_s > 0 else None
        # The read loop runs in its own task so that drain() can interrupt it between messages.
        serving = self._serving = asyncio.create_task(self._serve())
        close_code, reason = CLOSE_NORMAL, ""
        try:
            try:
                close_code, reason = await serving
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if self._drain_code is None or (current is not None and current.cancelling()):
                    raise  # this handler itself is being cancelled, not a drain
                close_code, reason = await self._drained()
        except ConnectionClosed:
            self._gone = True
        except Exception as exc:  # noqa: BLE001 - a bug here must close this client only
            incident = incidents.report(log, "session %s: internal error", exc, self.sid())
            self.on_error("internal", f"internal server error (incident {incident}); the session is closed", True)
            close_code, reason = CLOSE_INTERNAL, "internal error"
        finally:
            serving.cancel()
            if keepalive is not None:
                keepalive.cancel()
            try:
                await self.settle()
            finally:
                for session in self.all_sessions():
                    session.close()
        if self._kick_close is not None:
            writer.cancel()
            await self._kick_close
            return
        # Let queued messages (finals, done, errors) reach the client before closing.
        try:
            self.outbox.put_nowait(None)
            await asyncio.wait_for(writer, timeout=CLOSE_GRACE_S)
        except (asyncio.QueueFull, asyncio.TimeoutError):
            pass
        writer.cancel()
        await self.close(close_code, reason)

    def drain(self, close_code: int) -> None:
        """Graceful shutdown: stop reading, finalise the open segment, deliver every final
        (and whatever the dialect sends last), then close with ``close_code`` (1001, or 1012
        for a restart)."""
        if self._drain_code is not None or self._serving is None:
            return
        self._drain_code = close_code
        self._serving.cancel()

    async def _drained(self) -> Close:
        assert self._drain_code is not None
        if self._kicked:
            return CLOSE_POLICY, SLOW_CONSUMER
        self.hold()
        await self.finish(drain=True)
        return self._drain_code, "server shutting down"

    def hold(self) -> None:
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
                    log.info("session %s: no pong in %g s; closing 1011", self.sid(), interval)
                    await self.close(CLOSE_INTERNAL, "keepalive ping timeout")
                    return
        except ConnectionClosed:
            return

    async def close(self, code: int, reason: str) -> None:
        if not await close_or_abort(self.ws, code, reason):
            log.warning("session %s: close handshake not completed in %g s; aborted the connection",
                        self.sid(), CLOSE_GRACE_S)

    async def stop_sessions(self) -> None:
        """Stop reading and finalise every session: their open segments are recognised and
        every final delivered (to this client, and to the call where there is one)."""
        self.hold()
        for session in self.all_sessions():
            await session.stop()

    async def feed(self, session: "Session", data: bytes, step: int, after: Callable[[], None] | None = None) -> None:
        """A large message fed to ``session`` in slices of ``step`` bytes: between slices it
        waits for backpressure (which marks the socket held, so keepalive forgives a late pong)
        or lets other sessions run, so one message never holds the event loop or fills the
        batcher at once. ``after`` runs after each slice. Raises AudioFormatError as
        ``Session.feed_audio`` does."""
        for i in range(0, len(data), step):
            session.feed_audio(data[i:i + step])
            if after is not None:
                after()
            if session.held_back:
                await self.backpressure()
            else:
                await asyncio.sleep(0)

    async def backpressure(self) -> None:
        """Wait (not reading the socket) while a session has too many finals queued."""
        for session in self.all_sessions():
            if session.held_back:
                self.hold()
                try:
                    await session.backpressure()
                finally:
                    self._holding = False

    async def _serve(self) -> Close:
        early = await self.begin()
        if early is not None:
            return early
        loop = asyncio.get_running_loop()
        ends = loop.time() + self.cfg.max_session_s if self.cfg.max_session_s > 0 else float("inf")
        while not self._kicked:
            await self.backpressure()
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
                return CLOSE_NORMAL, "idle timeout"
            if isinstance(message, str):
                limit = self.cfg.max_text_message_bytes
                if len(message) > limit or (4 * len(message) > limit and len(message.encode()) > limit):
                    self.on_error("message_too_large", f"text message over {limit} bytes; dropped", False)
                    continue
                done = await self.on_text(message)
                if done is not None:
                    return done
            else:
                pending = self.on_audio(message)
                if pending is not None:
                    await pending
        return CLOSE_POLICY, SLOW_CONSUMER

    async def _session_limit(self) -> Close:
        """`max_session_s` reached: deliver what was said, then close."""
        limit = self.cfg.max_session_s
        self.hold()
        await self.finish(drain=False)
        self.on_error("session_limit", f"sessions last at most {limit:g} s; reconnect to go on", True)
        return CLOSE_POLICY, "session limit"


async def close_or_abort(ws: ServerConnection, code: int, reason: str) -> bool:
    """Close with ``code``; a client that does not complete the close handshake within
    CLOSE_GRACE_S (it stopped reading) has its TCP connection aborted. False if aborted.

    What the client still sends meanwhile is read and thrown away: with the receive queue full
    (`server.max_received_frames`) websockets stops reading the socket, and the client's close
    frame would sit unread behind its audio until the grace period ran out."""
    discard = asyncio.ensure_future(_discard_incoming(ws))
    try:
        await asyncio.wait_for(ws.close(code, reason), timeout=CLOSE_GRACE_S)
        return True
    except asyncio.TimeoutError:
        ws.transport.abort()
        return False
    finally:
        discard.cancel()


async def _discard_incoming(ws: ServerConnection) -> None:
    try:
        while True:
            await ws.recv(decode=False)
    except Exception:  # noqa: BLE001 - closed, or another coroutine is reading: nothing left to do
        pass


async def handle(app: "ChorusServer", ws: ServerConnection, conn: Connection) -> None:
    """websockets' handler body for any dialect; admission already counted this connection."""
    app.connections.add(conn)
    try:
        if app.draining:  # admitted just before the drain began: nothing to deliver yet
            await conn.close(app.config.server.shutdown_close_code, "server shutting down")
            return
        await conn.run()
    finally:
        app.connections.discard(conn)
        conn.finished.set_result(None)
