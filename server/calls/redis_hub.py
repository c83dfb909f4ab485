"""Call events across replicas: the in-process hub, mirrored to Redis (`calls.redis_url`).

The replica that holds a call (the one its bridge connected to) runs it exactly as one process
does (server/calls/hub.py): it numbers the events, keeps the bounded history, feeds its local
subscribers and sends the webhook. Redis adds, per call, a stream that mirrors the history:

- ``<prefix>call:<id>``: a Redis stream whose entry ids are the events' ``seq`` (``<seq>-0``), so
  entries are in call order and any replica can name one. Each event is added (fields ``t``: type,
  ``e``: the encoded event, the same bytes local subscribers get); an event the history does not
  keep (a partial, or one past the bounds) is deleted when the next one is added, and one that
  leaves the history (``calls.history_events``/``history_bytes``) is deleted then, so the stream
  holds what a late subscriber on the owner would get, plus at most the latest event.
- ``<prefix>call:<id>:info``: a hash: ``owner`` (replica id), ``source``, ``dropped`` (history
  events missing, for ``history_dropped``).
- ``<prefix>live``: a hash of every live call in the fleet -> its owner's replica id.
- ``<prefix>replica:<rid>``: the owner's heartbeat, set every ``calls.redis_heartbeat_s`` with a
  TTL of three times that.
- ``<prefix>events``: every call's events in one stream (trimmed ``MAXLEN ~``), for ``*`` subscribers.
- ``<prefix>watch:<id>``: set (with a TTL) by remote subscribers, so the owner decodes partials for
  a call that someone on another replica watches.

A call's keys expire ``calls.retain_s`` after its end (and, should its owner die, that long after
its last heartbeat). Redis commands go out in order from one writer task per replica, pipelined;
publishing stays synchronous and never waits for Redis, and what waits for Redis is bounded in
bytes (``calls.max_history_bytes``): past it events are not mirrored (logged, counted as the error
``redis_backlog``). A subscriber to a call not held here reads the stream: ``XRANGE`` for the
history, then ``XREAD BLOCK`` live, until ``call_ended``.

**Webhook once fleet-wide**: only the owner sends a call's events, as in one process. **A lost
replica**: every replica, once per heartbeat, looks at ``<prefix>live`` for calls whose owner's
heartbeat has expired, and claims each by adding ``call_ended`` (reason ``replica_lost``) with the
next ``seq`` as the entry id: Redis refuses an id that is not greater than the last, so exactly one
replica wins; it alone sends that event to its webhook. Subscribers anywhere read it from the stream.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable

from server.calls.hub import ALL_CALLS, CallHub, EventSink, Subscription, _Call, encode

if TYPE_CHECKING:
    from server.config import Config
    from server.metrics import Metrics

log = logging.getLogger(__name__)

ALL_EVENTS_MAXLEN = 10_000  # the `*` stream: live followers read it as it grows; nobody replays it
_WATCH_TTL_FACTOR = 3


class RemoteSubscription(Subscription):
    """A subscription read from Redis: its history is fetched before the first event is sent."""

    def __init__(self, call_id: str, max_messages: int, max_bytes: int) -> None:
        super().__init__(call_id, max_messages, max_bytes)
        self._ready = asyncio.Event()
        self.task: asyncio.Task | None = None

    async def ready(self) -> None:
        await self._ready.wait()

    def end(self) -> None:
        super().end()
        self._ready.set()


class RedisCallHub(CallHub):
    def __init__(self, config: "Config", metrics: "Metrics", sink: EventSink | None = None) -> None:
        super().__init__(config, metrics, sink)
        try:
            import redis.asyncio  # only with calls.redis_url set (the `fleet` extra)
        except ImportError:
            raise RuntimeError("calls.redis_url is set but the redis client is not installed: "
                               "pip install 'chorus-asr[fleet]' (or: pip install redis)") from None

        self._client = redis.asyncio.from_url(self.cfg.redis_url)
        self._response_error = redis.exceptions.ResponseError
        self._p = self.cfg.redis_prefix
        self.replica_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._hb = self.cfg.redis_heartbeat_s
        self._ops: list[tuple[Callable[[Any], None], int]] = []  # (adds commands to a pipeline, bytes)
        self._ops_bytes = 0
        self._writing = False  # a batch is on its way to Redis
        self._wake = asyncio.Event()
        self._transient: dict[str, int] = {}  # call id -> seq of its newest event not in its history
        self._watched: set[str] = set()  # calls that someone on another replica watches
        self._remote: set[RemoteSubscription] = set()
        self._tasks: list[asyncio.Task] = []
        self._last_backlog_log = 0.0

    def _key(self, call_id: str) -> str:
        return f"{self._p}call:{call_id}"

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        await self._client.set(f"{self._p}replica:{self.replica_id}", b"1", px=int(self._hb * 3000))
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._write()), loop.create_task(self._heartbeat())]
        log.info("call events are shared through Redis (replica id %s)", self.replica_id)

    async def close(self, timeout: float) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        self.closed = True  # before the ends: their handlers close with the shutdown code
        for sub in list(self._remote):
            sub.end()
            self.unsubscribe(sub)
        await super().close(timeout)
        # What is still queued for Redis (the calls' ends) goes out before the writer stops.
        while (self._ops or self._writing) and asyncio.get_running_loop().time() < deadline:
            self._wake.set()
            await asyncio.sleep(0.02)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self._client.delete(f"{self._p}replica:{self.replica_id}")
        except Exception as exc:  # noqa: BLE001 - Redis gone: the key expires by itself
            log.warning("redis: could not remove this replica's heartbeat (%s)", exc)
        await self._client.aclose()

    # ------------------------------------------------------------------ owner: mirror events
    def _queue(self, op: Callable[[Any], None], size: int = 0) -> None:
        if self._ops_bytes + size > self.cfg.max_history_bytes:
            self.metrics.errors.labels("redis_backlog").inc()
            now = time.monotonic()
            if now - self._last_backlog_log >= 10:
                self._last_backlog_log = now
                log.warning("redis is behind (%d bytes waiting): call events are not mirrored", self._ops_bytes)
            return
        self._ops.append((op, size))
        self._ops_bytes += size
        self._wake.set()

    def _mirror(self, call: _Call, kind: str, body: bytes, kept: bool) -> None:
        key, info, seq, cid = self._key(call.call_id), self._key(call.call_id) + ":info", call.seq, call.call_id
        transient = self._transient.pop(cid, None)
        if not kept:
            self._transient[cid] = seq
        owner, source, dropped = self.replica_id, call.source, call.dropped
        ttl = max(1, int(self.cfg.retain_s))

        def op(pipe: Any) -> None:
            if kind == "call_started" and seq == 1:
                pipe.delete(key, info)  # an ended call of the same id: the new one replaces it
                pipe.hset(f"{self._p}live", cid, owner)
            pipe.xadd(key, {"t": kind, "e": body}, id=f"{seq}-0")
            if transient is not None:
                pipe.xdel(key, f"{transient}-0")
            pipe.hset(info, mapping={"owner": owner, "source": source, "dropped": dropped})
            if kind == "call_started" and seq == 1:
                # Until the first heartbeat refreshes them: keys of an owner that dies at once expire too.
                pipe.expire(key, ttl + int(3 * self._hb) + 1)
                pipe.expire(info, ttl + int(3 * self._hb) + 1)
            pipe.xadd(f"{self._p}events", {"t": kind, "e": body}, maxlen=ALL_EVENTS_MAXLEN, approximate=True)
            if kind == "call_ended":
                pipe.hdel(f"{self._p}live", cid)
                pipe.expire(key, ttl)
                pipe.expire(info, ttl)

        self._queue(op, len(body))
        if kind == "call_ended":
            self._transient.pop(cid, None)

    def _removed(self, call: _Call, seq: int) -> None:
        key = self._key(call.call_id)
        self._queue(lambda pipe: pipe.xdel(key, f"{seq}-0"))

    async def _write(self) -> None:
        """The one writer: every command in publish order, pipelined."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._ops:
                batch, self._ops = self._ops, []
                self._writing = True
                pipe = self._client.pipeline(transaction=False)
                for op, _ in batch:
                    op(pipe)
                try:
                    results = await pipe.execute(raise_on_error=False)
                except Exception as exc:  # noqa: BLE001 - Redis unreachable: log, drop, go on
                    log.warning("redis: %d call event write(s) lost (%s)", len(batch), exc)
                    self.metrics.errors.labels("redis").inc()
                    await asyncio.sleep(0.5)
                else:
                    failed = [r for r in results if isinstance(r, Exception)]
                    if failed:
                        log.warning("redis: %d command(s) failed, first: %s", len(failed), failed[0])
                finally:
                    self._writing = False
                    self._ops_bytes -= sum(size for _, size in batch)

    # ------------------------------------------------------------------ heartbeat, lost replicas
    async def _heartbeat(self) -> None:
        while True:
            try:
                await self._beat()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Redis unreachable: try again next beat
                log.warning("redis heartbeat failed: %s", exc)
            await asyncio.sleep(self._hb)

    async def _beat(self) -> None:
        p, ttl_ms = self._p, int(self._hb * 3000)
        live_here = [cid for cid, call in self._calls.items() if not call.ended]
        pipe = self._client.pipeline(transaction=False)
        pipe.set(f"{p}replica:{self.replica_id}", b"1", px=ttl_ms)
        for cid in live_here:
            # A live call's keys outlive its owner by `retain_s` at most.
            pipe.pexpire(self._key(cid), ttl_ms + int(self.cfg.retain_s * 1000) + 1000)
            pipe.pexpire(self._key(cid) + ":info", ttl_ms + int(self.cfg.retain_s * 1000) + 1000)
        pipe.exists(f"{p}watch:{ALL_CALLS}")
        if live_here:
            pipe.mget([f"{p}watch:{cid}" for cid in live_here])
        pipe.hgetall(f"{p}live")
        results = await pipe.execute()
        watch_all = bool(results[1 + 2 * len(live_here)])
        watched = results[2 + 2 * len(live_here)] if live_here else []
        self._watched = set(live_here) if watch_all else {cid for cid, w in zip(live_here, watched) if w}
        live: dict[bytes, bytes] = results[-1]
        owners = sorted({o for o in live.values() if o.decode() != self.replica_id})
        if not owners:
            return
        pipe = self._client.pipeline(transaction=False)
        for o in owners:
            pipe.exists(f"{p}replica:{o.decode()}")
        dead = {o for o, up in zip(owners, await pipe.execute()) if not up}
        for cid, owner in live.items():
            if owner in dead:
                await self._claim(cid.decode(), owner.decode())

    async def _claim(self, call_id: str, owner: str) -> None:
        """End a call whose replica is gone; exactly one replica's claim succeeds."""
        key, info = self._key(call_id), self._key(call_id) + ":info"
        last = await self._client.xrevrange(key, count=1)
        source = await self._client.hget(info, "source")
        if not last or last[0][1].get(b"t") == b"call_ended":
            await self._client.hdel(f"{self._p}live", call_id)
            return
        seq = int(last[0][0].split(b"-")[0]) + 1
        event = {"type": "call_ended", "call_id": call_id, "reason": "replica_lost",
                 "source": (source or b"").decode(), "seq": seq, "event_id": uuid.uuid4().hex,
                 "time": round(time.time(), 3)}
        body = encode(event)
        try:
            await self._client.xadd(key, {"t": "call_ended", "e": body}, id=f"{seq}-0")
        except self._response_error:
            return  # another replica claimed it first (or the owner came back)
        ttl = max(1, int(self.cfg.retain_s))
        pipe = self._client.pipeline(transaction=False)
        pipe.xadd(f"{self._p}events", {"t": "call_ended", "e": body}, maxlen=ALL_EVENTS_MAXLEN, approximate=True)
        pipe.hdel(f"{self._p}live", call_id)
        pipe.expire(key, ttl)
        pipe.expire(info, ttl)
        await pipe.execute()
        log.warning("call %s: its replica %s stopped its heartbeat; ended it (replica_lost)", call_id[:64], owner)
        if self.sink is not None:
            self.sink.deliver(call_id, "call_ended", event["event_id"], body)

    # ------------------------------------------------------------------ subscribers
    def wants_partials(self, call_id: str) -> bool:
        return call_id in self._watched or super().wants_partials(call_id)

    def subscribe(self, call_id: str) -> Subscription | None:
        """A call held here (live or retained) is followed as in one process; any other call, and
        ``*``, is read from Redis."""
        if call_id != ALL_CALLS and call_id in self._calls:
            return super().subscribe(call_id)
        if not self.has_room():
            return None
        sub = RemoteSubscription(call_id, self._max_messages, self._max_bytes)
        sub.task = asyncio.get_running_loop().create_task(self._follow(sub))
        self._remote.add(sub)
        self._count += 1
        self.metrics.call_subscribers.set(self._count)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        if isinstance(sub, RemoteSubscription):
            if sub in self._remote:
                self._remote.discard(sub)
                self._count -= 1
                self.metrics.call_subscribers.set(self._count)
                if sub.task is not None:
                    sub.task.cancel()
            return
        super().unsubscribe(sub)

    async def _follow(self, sub: RemoteSubscription) -> None:
        try:
            await self._read(sub)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - Redis unreachable: the subscriber is told by the close
            log.warning("redis: a /v1/calls subscriber to %r lost its stream (%s)", sub.call_id[:64], exc)
            self.metrics.errors.labels("redis").inc()
        finally:
            sub.end()

    async def _read(self, sub: RemoteSubscription) -> None:
        r, p = self._client, self._p
        watch = f"{p}watch:{sub.call_id}"
        if sub.call_id == ALL_CALLS:
            key = f"{p}events"
            last = await r.xrevrange(key, count=1)
            after = last[0][0] if last else b"0-0"
        else:
            key = self._key(sub.call_id)
            history, dropped = await asyncio.gather(r.xrange(key), r.hget(key + ":info", "dropped"))
            sub.history_dropped = int(dropped or 0)
            after = b"0-0"
            for entry_id, fields in history:
                after = entry_id
                if fields[b"t"] != b"partial":
                    sub._history.append(fields[b"e"])
                if fields[b"t"] == b"call_ended":
                    sub.end()
                    return
        sub._ready.set()
        watched_at = 0.0
        block_ms = max(1, int(self._hb * 1000))
        while not (sub.overflowed or sub._ended):
            now = time.monotonic()
            if now - watched_at >= self._hb:
                await r.set(watch, b"1", px=int(self._hb * 1000 * _WATCH_TTL_FACTOR))
                watched_at = now
            got = await r.xread({key: after}, block=block_ms, count=256)
            for _, entries in got or ():
                for entry_id, fields in entries:
                    after = entry_id
                    sub.put(fields[b"e"])
                    if sub.overflowed:  # the handler closes it (1008) and unsubscribes
                        self.metrics.call_subscribers_dropped.inc()
                        log.warning("a /v1/calls subscriber to %r fell behind; disconnecting it", sub.call_id[:64])
                        return
                    if fields[b"t"] == b"call_ended" and sub.call_id != ALL_CALLS:
                        return


def create_hub(config: "Config", metrics: "Metrics", sink: EventSink | None) -> CallHub:
    """The in-process hub, or the Redis-mirrored one when `calls.redis_url` is set."""
    if config.calls.redis_url:
        return RedisCallHub(config, metrics, sink)
    return CallHub(config, metrics, sink)


__all__ = ["RedisCallHub", "RemoteSubscription", "create_hub"]
