"""Where every call's events meet the applications that want them.

A telephony bridge (Twilio, AudioSocket, a native stream given a ``call_id``) opens a
``CallStream`` per stream and publishes its events through it: ``call_started``,
``speech_started``, ``partial``, ``final``, ``dtmf``, ``metadata``, ``error``, ``call_ended``
(and ``stream_started``/``stream_ended`` for a call's further streams). The hub
numbers each call's events (``seq``), gives each an ``event_id``, encodes it once, and
hands the same text to

- live subscribers (``/v1/calls?call_id=ID`` or ``*``; server/transport/calls.py), each
  through its own bounded queue: a subscriber that stops reading is cut loose, never
  waited for;
- the webhook sink (server/calls/webhook.py), which queues per call and never blocks.

Publishing is synchronous and never waits, so no consumer can slow recognition. A call's
events except partials are kept while it runs and for ``calls.retain_s`` after, so a
subscriber that connects late first gets the call so far. What is kept is bounded in encoded
bytes, because a client chooses the size of some events (a bridge's metadata frames): per call
(`calls.history_events`, `calls.history_bytes`: past either the oldest `metadata` event goes
first, as the application already has it in `call_started` or can do without it, else the
oldest event), over every call (`calls.max_history_bytes`: ended calls are forgotten first,
oldest first), and in the number of ended calls kept (`calls.max_retained_calls`). Every event
left out is counted (``chorus_call_history_dropped_events_total``) and a late subscriber is
told how many (``history_dropped`` in its ``subscribed`` message; the ``seq`` gaps say which).

An event that JSON cannot carry (metadata with NaN or an unpaired surrogate) is refused before
anything changes: ``open`` raises ``UnencodableEvent`` before the call is registered, so a
bridge never leaves a call open that cannot end, and ``publish`` drops the event (counted as
the error ``unencodable_event``) and returns False.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from server.config import Config
    from server.metrics import Metrics

log = logging.getLogger(__name__)

ALL_CALLS = "*"


class EventSink(Protocol):
    """Something that takes every call event as encoded once (the webhook)."""

    wants_partials: bool  # whether it takes `partial` events (optional; absent = no)

    def deliver(self, call_id: str, event_type: str, event_id: str, body: bytes) -> None:
        """Queue one event; must return at once."""

    async def close(self, timeout: float) -> None:
        """Deliver what is queued within ``timeout`` seconds, then stop."""


class UnencodableEvent(ValueError):
    """An event with a value JSON cannot carry (NaN, infinity, an unpaired surrogate, nesting
    too deep to encode)."""


def encode(event: dict[str, Any]) -> bytes:
    """One event as the UTF-8 JSON every consumer gets; raises UnencodableEvent."""
    try:
        return json.dumps(event, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except (ValueError, TypeError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        raise UnencodableEvent(f"{type(exc).__name__}: {str(exc)[:120]}") from None


class Subscription:
    """One subscriber's events: first the call's history as it was when it subscribed (already
    held by the hub, so replaying it costs no copy), then live events through a queue bounded in
    messages and bytes. ``None`` ends it (its call ended, or the server is stopping)."""

    def __init__(self, call_id: str, max_messages: int, max_bytes: int,
                 history: list[bytes] | None = None, history_dropped: int = 0) -> None:
        self.call_id = call_id
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.overflowed = False
        self.overflowed_event = asyncio.Event()  # lets the handler cut loose a client stuck on a full socket
        self.history_dropped = history_dropped  # events of this call no longer (or never) in its history
        self._history = collections.deque(history or ())
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._bytes = 0
        self._ended = False

    def put(self, body: bytes) -> None:
        if self._ended or self.overflowed:
            return
        if self.queue.qsize() >= self._max_messages or self._bytes + len(body) > self._max_bytes:
            # The subscriber is not reading: end it rather than hold an unbounded backlog.
            self.overflowed = True
            self._ended = True
            self._history.clear()
            self.queue.put_nowait(None)
            self.overflowed_event.set()
            return
        self._bytes += len(body)
        self.queue.put_nowait(body)

    def end(self) -> None:
        if not self._ended:
            self._ended = True
            self.queue.put_nowait(None)

    def get_nowait(self) -> bytes | None:
        """The next event, history first; raises asyncio.QueueEmpty when none waits."""
        if self._history:
            return self._history.popleft()
        body = self.queue.get_nowait()
        if body is not None:
            self._bytes -= len(body)
        return body

    async def ready(self) -> None:
        """Until ``history_dropped`` and the history are known (at once here; a subscription read
        from Redis fetches them first, server/calls/redis_hub.py)."""

    async def get(self) -> bytes | None:
        if self._history:
            return self._history.popleft()
        body = await self.queue.get()
        if body is not None:
            self._bytes -= len(body)
        return body


@dataclass
class _Call:
    call_id: str
    source: str
    streams: int = 0  # bridge streams open under this id (Twilio may send a call's tracks as two streams)
    seq: int = 0
    # (event type, encoded event, seq) of every event but partials, oldest first, within the bounds.
    history: collections.deque[tuple[str, bytes, int]] = field(default_factory=collections.deque)
    history_bytes: int = 0
    dropped: int = 0  # events left out of `history` (or dropped from it)
    ended: bool = False
    expiry: asyncio.TimerHandle | None = None


class CallHub:
    def __init__(self, config: "Config", metrics: "Metrics", sink: EventSink | None = None) -> None:
        self.cfg = config.calls
        self.metrics = metrics
        self.sink = sink
        self._max_messages = config.server.max_outgoing_messages
        self._max_bytes = config.server.max_outgoing_bytes
        self._calls: dict[str, _Call] = {}
        # Ended calls still kept for late subscribers, in the order they ended (oldest first).
        self._retained: dict[str, _Call] = {}
        self._history_bytes = 0  # encoded bytes in every call's history
        self._subscribers: dict[str, set[Subscription]] = collections.defaultdict(set)
        self._count = 0
        self.closed = False

    @property
    def history_bytes(self) -> int:
        """Encoded bytes of events held for late subscribers, over every call."""
        return self._history_bytes

    # ------------------------------------------------------------------ bridges
    def open(self, call_id: str, source: str, *, stream_id: str | None = None,
             metadata: dict[str, Any] | None = None, tracks: tuple[str, ...] = ()) -> "CallStream":
        """A bridge stream of call ``call_id`` began; publishes ``call_started`` (or
        ``stream_started`` for a further stream of a call that is open). Raises
        UnencodableEvent, with nothing registered, if the metadata cannot be encoded."""
        call = self._calls.get(call_id)
        fresh = call is None or call.ended
        if fresh:
            call = _Call(call_id, source)
        assert call is not None
        stream = CallStream(self, call, source, stream_id)
        started: dict[str, Any] = {"tracks": list(tracks), "metadata": metadata or {}}
        # A call's tracks may come as separate streams (Twilio): the first starts the call.
        event, body = self._stamp(call, stream._event("call_started" if fresh else "stream_started", None, started))
        if fresh:
            old = self._calls.get(call_id)
            if old is not None:
                self._forget(old)  # an ended call of the same id: the new one replaces it
            self._calls[call_id] = call
            self.metrics.calls_active.inc()
        call.streams += 1
        self._deliver(call, event, body)
        return stream

    def _stamp(self, call: _Call, event: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        """The event numbered and encoded, the call unchanged (raises UnencodableEvent)."""
        event["seq"] = call.seq + 1
        event["event_id"] = uuid.uuid4().hex
        event["time"] = round(time.time(), 3)
        return event, encode(event)

    def _publish(self, call: _Call, event: dict[str, Any]) -> bool:
        try:
            event, body = self._stamp(call, event)
        except UnencodableEvent as exc:
            self.metrics.errors.labels("unencodable_event").inc()
            log.warning("call %s: a %s event cannot be encoded (%s); dropped", call.call_id[:64], event["type"], exc)
            return False
        self._deliver(call, event, body)
        return True

    def _deliver(self, call: _Call, event: dict[str, Any], body: bytes) -> None:
        call.seq = event["seq"]
        kind = event["type"]
        self.metrics.call_events.labels(kind).inc()
        kept = kind != "partial" and self._keep(call, kind, body)
        for sub in (*self._subscribers.get(call.call_id, ()), *self._subscribers.get(ALL_CALLS, ())):
            sub.put(body)
            if sub.overflowed:
                self._drop(sub)
                self.metrics.call_subscribers_dropped.inc()
                log.warning("a /v1/calls subscriber to %r fell behind; disconnecting it", sub.call_id[:64])
        if self.sink is not None:
            self.sink.deliver(call.call_id, kind, event["event_id"], body)
        self._mirror(call, kind, body, kept)

    def _mirror(self, call: _Call, kind: str, body: bytes, kept: bool) -> None:
        """Hook for a shared bus (server/calls/redis_hub.py): event ``call.seq`` was delivered,
        and ``kept`` in the call's history or not."""

    def _removed(self, call: _Call, seq: int) -> None:
        """Hook for a shared bus: event ``seq`` left the call's history (a bound)."""

    # ------------------------------------------------------------------ history bounds
    def _keep(self, call: _Call, kind: str, body: bytes) -> bool:
        """Add one event to the call's history within every bound, dropping what must go;
        False if it could not be kept."""
        size = len(body)
        if self.cfg.history_events == 0 or size > min(self.cfg.history_bytes, self.cfg.max_history_bytes):
            self._dropped(call, 1, "call_limit")  # larger than any history may be: never kept
            return False
        while len(call.history) >= self.cfg.history_events or call.history_bytes + size > self.cfg.history_bytes:
            self._drop_oldest(call, "call_limit")
        while self._history_bytes + size > self.cfg.max_history_bytes:
            if self._retained:
                self._forget(next(iter(self._retained.values())), evicted=True)
            elif call.history:
                self._drop_oldest(call, "total_limit")
            else:  # every byte is in other live calls' histories, each within its own bound
                self._dropped(call, 1, "total_limit")
                return False
        call.history.append((kind, body, call.seq))
        call.history_bytes += size
        self._history_bytes += size
        self.metrics.call_history_bytes.set(self._history_bytes)
        return True

    def _drop_oldest(self, call: _Call, reason: str) -> None:
        """The oldest `metadata` event goes first (a bridge's client sizes those), else the oldest."""
        victim = next((i for i, (kind, _, _) in enumerate(call.history) if kind == "metadata"), 0)
        _, body, seq = call.history[victim]
        del call.history[victim]
        call.history_bytes -= len(body)
        self._history_bytes -= len(body)
        self.metrics.call_history_bytes.set(self._history_bytes)
        self._dropped(call, 1, reason)
        self._removed(call, seq)

    def _dropped(self, call: _Call, n: int, reason: str) -> None:
        call.dropped += n
        self.metrics.call_history_dropped.labels(reason).inc(n)

    def _forget(self, call: _Call, evicted: bool = False) -> None:
        """Let go of a call and its history (retained past its time, evicted, or replaced)."""
        if call.expiry is not None:
            call.expiry.cancel()
            call.expiry = None
        if self._calls.get(call.call_id) is call:
            del self._calls[call.call_id]
        if self._retained.get(call.call_id) is call:
            del self._retained[call.call_id]
        if evicted and call.history:
            self.metrics.call_history_dropped.labels("evicted").inc(len(call.history))
        self._history_bytes -= call.history_bytes
        self.metrics.call_history_bytes.set(self._history_bytes)
        call.history.clear()
        call.history_bytes = 0

    def _ended(self, call: _Call) -> None:
        call.streams -= 1
        if call.streams > 0:
            return
        call.ended = True
        self.metrics.calls_active.dec()
        for sub in list(self._subscribers.get(call.call_id, ())):
            sub.end()
            self._drop(sub)
        if self.cfg.retain_s > 0 and self.cfg.max_retained_calls > 0 and not self.closed:
            while len(self._retained) >= self.cfg.max_retained_calls:
                self._forget(next(iter(self._retained.values())), evicted=True)
            self._retained[call.call_id] = call
            call.expiry = asyncio.get_running_loop().call_later(self.cfg.retain_s, self._forget, call)
        else:
            self._forget(call)

    # ------------------------------------------------------------------ subscribers
    def wants_partials(self, call_id: str) -> bool:
        """Whether anyone reads this call's partials now: a subscriber to it (or to every call),
        or a webhook that takes them. Bridges ask before each partial, so a call nobody watches
        live spends no model time on text that would be thrown away."""
        if getattr(self.sink, "wants_partials", False):
            return True
        return bool(self._subscribers.get(call_id) or self._subscribers.get(ALL_CALLS))

    def has_room(self) -> bool:
        return self._count < self.cfg.max_subscribers and not self.closed

    def subscribe(self, call_id: str) -> Subscription | None:
        """A new subscriber to one call (or ``*``), or None when `calls.max_subscribers` are
        open. For one call, what it said so far comes first; an ended call's subscription
        ends after that."""
        if not self.has_room():
            return None
        call = self._calls.get(call_id) if call_id != ALL_CALLS else None
        if call is None:
            sub = Subscription(call_id, self._max_messages, self._max_bytes)
        else:
            sub = Subscription(call_id, self._max_messages, self._max_bytes,
                               [body for _, body, _ in call.history], call.dropped)
            if call.ended:
                sub.end()
                return sub
        self._subscribers[call_id].add(sub)
        self._count += 1
        self.metrics.call_subscribers.set(self._count)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._drop(sub)

    def _drop(self, sub: Subscription) -> None:
        subs = self._subscribers.get(sub.call_id)
        if subs is not None and sub in subs:
            subs.discard(sub)
            if not subs:
                del self._subscribers[sub.call_id]
            self._count -= 1
            self.metrics.call_subscribers.set(self._count)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Nothing to start in one process (the Redis hub connects here)."""

    async def close(self, timeout: float) -> None:
        """After every bridge has drained: end the subscriptions (each gets what is queued
        first), and give the webhook until ``timeout`` to deliver what it holds."""
        self.closed = True
        for subs in list(self._subscribers.values()):
            for sub in list(subs):
                sub.end()
        for call in self._calls.values():
            if call.expiry is not None:
                call.expiry.cancel()
        if self.sink is not None:
            await self.sink.close(timeout)


class CallStream:
    """One bridge stream's handle on its call: publish events, end once."""

    def __init__(self, hub: CallHub, call: _Call, source: str, stream_id: str | None) -> None:
        self.hub = hub
        self._call = call
        self.call_id = call.call_id
        self.source = source
        self.stream_id = stream_id
        self._done = False

    def _event(self, kind: str, track: str | None, fields: dict[str, Any] | None) -> dict[str, Any]:
        event: dict[str, Any] = {"type": kind, "call_id": self.call_id}
        if track is not None:
            event["track"] = track
        for key, value in (fields or {}).items():
            event.setdefault(key, value)  # a model's extra field never overrides the envelope
        event["source"] = self.source
        if self.stream_id is not None:
            event["stream_id"] = self.stream_id
        return event

    def publish(self, kind: str, track: str | None, fields: dict[str, Any] | None = None) -> bool:
        """Publish one event; False if it was not (the stream ended, or the event has a value
        JSON cannot carry: it is dropped, logged and counted)."""
        if self._done:
            return False
        return self.hub._publish(self._call, self._event(kind, track, fields))

    def end(self, reason: str, **fields: Any) -> None:
        """This stream is over. The call's last stream to end publishes ``call_ended`` (once),
        and the hub forgets the call after `calls.retain_s`. Never fails: if ``fields`` cannot
        be encoded, the event goes without them."""
        if self._done:
            return
        kind = "call_ended" if self._call.streams == 1 else "stream_ended"
        if not self.publish(kind, None, {"reason": reason, **fields}):
            self.publish(kind, None, {"reason": reason})
        self._done = True
        self.hub._ended(self._call)

    @property
    def ended(self) -> bool:
        return self._done
