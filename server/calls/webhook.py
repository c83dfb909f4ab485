"""The call webhook: every call event POSTed to the application, signed, in order per call.

Why it is shaped so:

- **Never blocks recognition.** ``deliver`` only appends to the call's queue and returns; the
  POSTs run in tasks. A call's queue is bounded in events and encoded bytes
  (`webhook.max_pending_events`, `webhook.max_pending_bytes`), and all queues together in bytes
  (`webhook.max_total_pending_bytes`, taken from the call with the most bytes waiting): past a
  bound the oldest partial goes first (it is superseded by its final anyway), else the oldest
  event, and each drop is counted. A slow or dead webhook costs memory up to those bounds,
  never latency.
- **In order per call.** One worker task per call that has events waiting sends them one at a
  time, so the application sees a call's events in `seq` order; calls proceed concurrently
  (at most `webhook.max_concurrency` requests in flight), so one call's slow responses do not
  hold back another's.
- **Idempotent retries.** A retry sends the same bytes, so the same signature and the same
  ``X-Chorus-Event-Id``; an application that has seen the id can drop the repeat.
- **Signed.** ``X-Chorus-Signature: sha256=<hex HMAC-SHA256 of the raw body>`` with the
  operator's secret, so the application can check the body came from this server.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import itertools
import logging
import random
import time
from typing import TYPE_CHECKING, Mapping
from urllib.parse import urlsplit

import aiohttp

from server import __version__
from server.secrets import read_secret

if TYPE_CHECKING:
    from server.config import Config, WebhookConfig
    from server.metrics import Metrics

log = logging.getLogger(__name__)

SECRET_ENV = "CHORUS_WEBHOOK_SECRET"
# Statuses worth another try: the receiver may accept the same request later.
_RETRY_STATUSES = frozenset({408, 429})
# A warning about dropped events at most this often (a dead webhook must not flood the log).
_DROP_LOG_INTERVAL_S = 10.0


class _Event:
    __slots__ = ("call_id", "kind", "event_id", "body", "queued_at")

    def __init__(self, call_id: str, kind: str, event_id: str, body: bytes) -> None:
        self.call_id = call_id
        self.kind = kind
        self.event_id = event_id
        self.body = body
        self.queued_at = time.monotonic()


def load_secret(config: "Config", environ: Mapping[str, str]) -> bytes | None:
    """The signing secret from ``$CHORUS_WEBHOOK_SECRET`` or `webhook.secret_file`, or None."""
    secret = read_secret(environ, SECRET_ENV, config.webhook.secret_file, "webhook.secret_file")
    return secret.encode() if secret is not None else None


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class WebhookSender:
    """The hub's EventSink for `webhook.url` (server/calls/hub.py)."""

    def __init__(self, cfg: "WebhookConfig", secret: bytes | None, metrics: "Metrics") -> None:
        self.cfg = cfg
        self.secret = secret
        self.metrics = metrics
        self.wants_partials = cfg.partials
        self._queues: dict[str, collections.deque[_Event]] = {}
        self._queue_bytes: dict[str, int] = {}  # encoded bytes per call's queue (in flight included)
        self._bytes = 0  # over every queue
        self._workers: dict[str, asyncio.Task] = {}
        self._pending = 0  # queued or in flight
        self._limit = asyncio.Semaphore(cfg.max_concurrency)
        self._session: aiohttp.ClientSession | None = None
        self._closing = False
        self._deadline: float | None = None  # loop time by which close() gives up
        self._dropped_since_log = 0
        self._last_drop_log = 0.0

    @classmethod
    def from_config(cls, config: "Config", metrics: "Metrics", environ: Mapping[str, str]) -> "WebhookSender":
        secret = load_secret(config, environ)
        if secret is None:
            log.warning("webhook requests to %s are unsigned: set %s (or webhook.secret_file) so the "
                        "application can verify them", _redacted(config.webhook.url), SECRET_ENV)
        else:
            log.info("call events go to the webhook %s, signed", _redacted(config.webhook.url))
        return cls(config.webhook, secret, metrics)

    # ------------------------------------------------------------------ EventSink
    def deliver(self, call_id: str, event_type: str, event_id: str, body: bytes) -> None:
        if self._closing or (event_type == "partial" and not self.cfg.partials):
            return
        event = _Event(call_id, event_type, event_id, body)
        size = len(body)
        if size > self.cfg.max_pending_bytes:
            self._dropped(event)  # larger than a call's whole queue may be
            return
        queue = self._queues.get(call_id)
        while queue and (len(queue) >= self.cfg.max_pending_events
                         or self._queue_bytes[call_id] + size > self.cfg.max_pending_bytes):
            if not self._drop_one(call_id):
                self._dropped(event)  # only the event in flight waits: the newcomer goes
                return
        while self._bytes + size > self.cfg.max_total_pending_bytes:
            # Fair to every call: the one with the most bytes waiting gives way first.
            if not any(self._drop_one(c) for c in sorted(self._queue_bytes, key=self._queue_bytes.__getitem__,
                                                             reverse=True)):
                self._dropped(event)
                return
        if queue is None:
            queue = self._queues[call_id] = collections.deque()
            self._queue_bytes[call_id] = 0
        queue.append(event)
        self._pending += 1
        self._account(call_id, size)
        if call_id not in self._workers:
            self._workers[call_id] = asyncio.get_running_loop().create_task(self._work(call_id))

    def _drop_one(self, call_id: str) -> bool:
        """Drop one waiting event of ``call_id`` (see _victim); False if none may go."""
        queue = self._queues[call_id]
        victim = self._victim(queue)
        if victim is None:
            return False
        queue.remove(victim)
        self._pending -= 1
        self._account(call_id, -len(victim.body))
        self._dropped(victim)
        return True

    def _account(self, call_id: str, delta: int) -> None:
        self._queue_bytes[call_id] += delta
        self._bytes += delta
        self.metrics.webhook_pending.set(self._pending)
        self.metrics.webhook_pending_bytes.set(self._bytes)

    @staticmethod
    def _victim(queue: collections.deque[_Event]) -> _Event | None:
        """The oldest waiting partial, else the oldest waiting event; never the head, which
        may be in flight."""
        oldest = None
        for event in itertools.islice(queue, 1, None):  # no copy of a full queue per event
            if event.kind == "partial":
                return event
            oldest = oldest or event
        return oldest

    def _dropped(self, event: _Event) -> None:
        self.metrics.webhook_events.labels("dropped").inc()
        self._dropped_since_log += 1
        now = time.monotonic()
        if now - self._last_drop_log >= _DROP_LOG_INTERVAL_S:
            log.warning("webhook is behind: dropped %d event(s) (latest: %s %s of call %s); at most "
                        "webhook.max_pending_events=%d and max_pending_bytes=%d wait per call, "
                        "max_total_pending_bytes=%d in all", self._dropped_since_log, event.kind, event.event_id,
                        event.call_id[:64], self.cfg.max_pending_events, self.cfg.max_pending_bytes,
                        self.cfg.max_total_pending_bytes)
            self._dropped_since_log = 0
            self._last_drop_log = now

    # ------------------------------------------------------------------ delivery
    async def _work(self, call_id: str) -> None:
        queue = self._queues[call_id]
        try:
            while queue:
                event = queue[0]
                delivered = await self._send(event)
                queue.popleft()
                self._pending -= 1
                self._account(call_id, -len(event.body))
                if delivered:
                    self.metrics.webhook_events.labels("delivered").inc()
                    self.metrics.webhook_delay.observe(time.monotonic() - event.queued_at)
                else:
                    self.metrics.webhook_events.labels("failed").inc()
        finally:
            self._workers.pop(call_id, None)
            if not queue and self._queues.get(call_id) is queue:
                del self._queues[call_id]
                self._bytes -= self._queue_bytes.pop(call_id)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.cfg.timeout_s),
                connector=aiohttp.TCPConnector(limit=self.cfg.max_concurrency),
                headers={"User-Agent": f"chorus/{__version__}"},
            )
        return self._session

    async def _send(self, event: _Event) -> bool:
        """POST one event until it is accepted, refused for good, or out of tries."""
        loop = asyncio.get_running_loop()
        headers = {"Content-Type": "application/json", "X-Chorus-Event-Id": event.event_id, "X-Chorus-Event": event.kind}
        if self.secret is not None:
            headers["X-Chorus-Signature"] = sign(self.secret, event.body)
        why = ""
        for attempt in range(1, self.cfg.max_attempts + 1):
            # Only the attempt number changes between tries; the body and its signature do not.
            headers["X-Chorus-Attempt"] = str(attempt)
            retry_after: float | None = None
            try:
                async with self._limit:
                    async with self._client().post(self.cfg.url, data=event.body, headers=headers,
                                                   allow_redirects=False) as resp:
                        status = resp.status
                        await resp.read()
                        retry_after = _retry_after(resp.headers.get("Retry-After"))
            except asyncio.TimeoutError:
                self.metrics.webhook_requests.labels("timeout").inc()
                why = f"no answer in {self.cfg.timeout_s:g} s"
            except aiohttp.ClientError as exc:
                self.metrics.webhook_requests.labels("error").inc()
                why = f"{type(exc).__name__}: {exc}"[:200]
            else:
                self.metrics.webhook_requests.labels(f"{min(status // 100, 5)}xx").inc()
                if 200 <= status < 300:
                    return True
                why = f"HTTP {status}"
                if not (status >= 500 or status in _RETRY_STATUSES):
                    break  # the receiver refused this request for good
            if attempt == self.cfg.max_attempts:
                break
            wait = min(self.cfg.backoff_s * 2 ** (attempt - 1), self.cfg.max_backoff_s)
            if retry_after is not None:
                wait = max(wait, min(retry_after, self.cfg.max_backoff_s))
            wait *= 1 + random.uniform(0, 0.1)  # spread retries of many calls
            if self._deadline is not None and loop.time() + wait > self._deadline:
                break  # shutting down: no time for another try
            await asyncio.sleep(wait)
        log.warning("webhook: %s event %s of call %s not delivered (%s)", event.kind, event.event_id,
                    event.call_id[:64], why)
        return False

    # ------------------------------------------------------------------ shutdown
    async def close(self, timeout: float) -> None:
        """Stop taking events; deliver what is queued within ``timeout`` s, then give up on the rest."""
        loop = asyncio.get_running_loop()
        self._closing = True
        self._deadline = loop.time() + timeout
        workers = list(self._workers.values())
        if workers:
            _, late = await asyncio.wait(workers, timeout=timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        lost = sum(len(q) for q in self._queues.values())
        if lost:
            self.metrics.webhook_events.labels("dropped").inc(lost)
            log.warning("webhook: %d event(s) not delivered before the shutdown deadline", lost)
        self._queues.clear()
        self._queue_bytes.clear()
        self._pending = 0
        self._bytes = 0
        self.metrics.webhook_pending.set(0)
        self.metrics.webhook_pending_bytes.set(0)
        if self._session is not None:
            await self._session.close()
            self._session = None


def _retry_after(value: str | None) -> float | None:
    if value is None or not value.strip().isdigit():
        return None  # an HTTP-date Retry-After is rare from webhooks; the backoff applies
    return float(value.strip())


def _redacted(url: str) -> str:
    """The webhook URL for a log line: no credentials and no query (either may hold a secret)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"
