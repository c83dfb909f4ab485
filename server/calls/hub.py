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
events except partials are kept (bounded) while it runs and for ``calls.retain_s`` after,
so a subscriber that connects late first gets the call so far.
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


def encode(event: dict[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


class Subscription:
    """One live subscriber's queue: bounded in messages and characters. ``None`` in the
    queue ends it (its call ended, or the server is stopping)."""

    def __init__(self, call_id: str, max_messages: int, max_chars: int) -> None:
        self.call_id = call_id
        self.queue: asyncio.Queue[str | None] = asyncio.Queue()
        self.overflowed = False
        self.overflowed_event = asyncio.Event()  # lets the handler cut loose a client stuck on a full socket
        self._max_messages = max_messages
        self._max_chars = max_chars
        self._chars = 0
        self._ended = False

    def put(self, text: str) -> None:
        if self._ended or self.overflowed:
            return
        if self.queue.qsize() >= self._max_messages or self._chars + len(text) > self._max_chars:
            # The subscriber is not reading: end it rather than hold an unbounded backlog.
            self.overflowed = True
            self._ended = True
            self.queue.put_nowait(None)
            self.overflowed_event.set()
            return
        self._chars += len(text)
        self.queue.put_nowait(text)

    def end(self) -> None:
        if not self._ended:
            self._ended = True
            self.queue.put_nowait(None)

    async def get(self) -> str | None:
        text = await self.queue.get()
        if text is not None:
            self._chars -= len(text)
        return text


@dataclass
class _Call:
    call_id: str
    source: str
    streams: int = 0  # bridge streams open under this id (Twilio may send a call's tracks as two streams)
    seq: int = 0
    history: collections.deque = field(default_factory=collections.deque)
    ended: bool = False
    expiry: asyncio.TimerHandle | None = None


class CallHub:
    def __init__(self, config: "Config", metrics: "Metrics", sink: EventSink | None = None) -> None:
        self.cfg = config.calls
        self.metrics = metrics
        self.sink = sink
        self._max_messages = config.server.max_outgoing_messages
        self._max_chars = config.server.max_outgoing_bytes
        self._calls: dict[str, _Call] = {}
        self._subscribers: dict[str, set[Subscription]] = collections.defaultdict(set)
        self._count = 0
        self.closed = False

    # ------------------------------------------------------------------ bridges
    def open(self, call_id: str, source: str, *, stream_id: str | None = None,
             metadata: dict[str, Any] | None = None, tracks: tuple[str, ...] = ()) -> "CallStream":
        """A bridge stream of call ``call_id`` began; publishes ``call_started``."""
        call = self._calls.get(call_id)
        if call is None or call.ended:
            if call is not None and call.expiry is not None:
                call.expiry.cancel()
            call = _Call(call_id, source, history=collections.deque(maxlen=self.cfg.history_events))
            self._calls[call_id] = call
            self.metrics.calls_active.inc()
        call.streams += 1
        stream = CallStream(self, call, source, stream_id)
        started: dict[str, Any] = {"tracks": list(tracks), "metadata": metadata or {}}
        # A call's tracks may come as separate streams (Twilio): the first starts the call.
        stream.publish("call_started" if call.streams == 1 else "stream_started", None, started)
        return stream

    def _publish(self, call: _Call, event: dict[str, Any]) -> None:
        call.seq += 1
        event["seq"] = call.seq
        event["event_id"] = uuid.uuid4().hex
        event["time"] = round(time.time(), 3)
        text = encode(event)
        kind = event["type"]
        self.metrics.call_events.labels(kind).inc()
        if kind != "partial":
            call.history.append(text)
        for sub in (*self._subscribers.get(call.call_id, ()), *self._subscribers.get(ALL_CALLS, ())):
            sub.put(text)
            if sub.overflowed:
                self._drop(sub)
                self.metrics.call_subscribers_dropped.inc()
                log.warning("a /v1/calls subscriber to %r fell behind; disconnecting it", sub.call_id[:64])
        if self.sink is not None:
            self.sink.deliver(call.call_id, kind, event["event_id"], text.encode())

    def _ended(self, call: _Call) -> None:
        call.streams -= 1
        if call.streams > 0:
            return
        call.ended = True
        self.metrics.calls_active.dec()
        for sub in list(self._subscribers.get(call.call_id, ())):
            sub.end()
            self._drop(sub)
        if self.cfg.retain_s > 0 and not self.closed:
            call.expiry = asyncio.get_running_loop().call_later(self.cfg.retain_s, self._expire, call)
        else:
            self._expire(call)

    def _expire(self, call: _Call) -> None:
        if self._calls.get(call.call_id) is call:
            del self._calls[call.call_id]

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
        open. For one call, what it said so far is queued first; an ended call's
        subscription ends after that."""
        if not self.has_room():
            return None
        sub = Subscription(call_id, self._max_messages, self._max_chars)
        call = self._calls.get(call_id) if call_id != ALL_CALLS else None
        if call is not None:
            for text in call.history:
                sub.put(text)
            if call.ended:
                sub.end()
                return sub
        if not sub.overflowed:
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

    # ------------------------------------------------------------------ shutdown
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

    def publish(self, kind: str, track: str | None, fields: dict[str, Any] | None = None) -> None:
        if self._done:
            return
        event: dict[str, Any] = {"type": kind, "call_id": self.call_id}
        if track is not None:
            event["track"] = track
        for key, value in (fields or {}).items():
            event.setdefault(key, value)  # a model's extra field never overrides the envelope
        event["source"] = self.source
        if self.stream_id is not None:
            event["stream_id"] = self.stream_id
        self.hub._publish(self._call, event)

    def end(self, reason: str, **fields: Any) -> None:
        """This stream is over. The call's last stream to end publishes ``call_ended`` (once),
        and the hub forgets the call after `calls.retain_s`."""
        if self._done:
            return
        self.publish("call_ended" if self._call.streams == 1 else "stream_ended", None, {"reason": reason, **fields})
        self._done = True
        self.hub._ended(self._call)

    @property
    def ended(self) -> bool:
        return self._done
