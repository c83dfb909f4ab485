"""A webhook receiver for tests: a real HTTP server (aiohttp.web) on its own thread.

It records every request, checks each ``X-Chorus-Signature`` itself (HMAC-SHA256 of the raw
body with the secret it was given, computed here, not by server code), and answers as told:
``fail_next(n, status, retry_after)`` fails the next n requests, ``delay_call(call_id, s)`` answers that
call's requests late, ``hold_call(call_id)`` holds them unanswered until ``release_call(call_id)``.
``arrivals`` lists every request as it arrives (call id, event id), before it is answered.
Thread-safe: the server runs on its own loop, tests read from theirs.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass
from typing import Callable

from aiohttp import web

from tests.ports import free_port
from tests.waiting import wait_until


@dataclass
class Request:
    headers: dict[str, str]
    body: bytes
    status: int  # what the receiver answered
    at: float  # time.monotonic() on arrival
    signature_ok: bool | None  # None when the receiver has no secret

    @property
    def event(self) -> dict:
        return json.loads(self.body)


class WebhookReceiver:
    def __init__(self, secret: bytes | None = None) -> None:
        self.secret = secret
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._fail: list[tuple[int, str | None]] = []  # (status, Retry-After) for the next requests
        self._delays: dict[str, float] = {}
        self._holds: dict[str, asyncio.Event] = {}  # created and set on the receiver's loop
        self.arrivals: list[tuple[str | None, str | None]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    # ------------------------------------------------------------------ behaviour
    def fail_next(self, n: int, status: int = 503, retry_after: str | None = None) -> None:
        with self._lock:
            self._fail.extend([(status, retry_after)] * n)

    def delay_call(self, call_id: str, seconds: float) -> None:
        with self._lock:
            self._delays[call_id] = seconds

    def hold_call(self, call_id: str) -> None:
        """Leave that call's requests unanswered until ``release_call``."""
        asyncio.run_coroutine_threadsafe(self._hold(call_id), self._loop).result(10)

    def release_call(self, call_id: str) -> None:
        asyncio.run_coroutine_threadsafe(self._release(call_id), self._loop).result(10)

    async def _hold(self, call_id: str) -> None:
        self._holds[call_id] = asyncio.Event()

    async def _release(self, call_id: str) -> None:
        self._holds.pop(call_id).set()

    def arrived(self, call_id: str) -> list[str | None]:
        """Event ids of that call's requests that have arrived, answered or not."""
        with self._lock:
            return [event_id for c, event_id in self.arrivals if c == call_id]

    def check(self, body: bytes, header: str | None) -> bool | None:
        if self.secret is None:
            return None
        expected = "sha256=" + hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        return header is not None and hmac.compare_digest(expected, header)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        at = time.monotonic()
        try:
            call_id = json.loads(body).get("call_id")
        except ValueError:
            call_id = None
        with self._lock:
            self.arrivals.append((call_id, request.headers.get("X-Chorus-Event-Id")))
            delay = self._delays.get(call_id, 0.0)
            status, retry_after = self._fail.pop(0) if self._fail else (200, None)
        if delay:
            await asyncio.sleep(delay)
        hold = self._holds.get(call_id)
        if hold is not None:
            await hold.wait()
        sig = self.check(body, request.headers.get("X-Chorus-Signature"))
        if sig is False:
            status = 401
        with self._lock:
            self.requests.append(Request(dict(request.headers), body, status, at, sig))
        headers = {"Retry-After": retry_after} if retry_after is not None else None
        return web.Response(status=status, text="ok" if status < 300 else "no", headers=headers)

    # ------------------------------------------------------------------ reading
    def delivered(self) -> list[dict]:
        """Events acknowledged (2xx), in arrival order, each once (a retry repeats an event id)."""
        seen: set[str] = set()
        out = []
        with self._lock:
            for r in self.requests:
                if 200 <= r.status < 300 and r.headers.get("X-Chorus-Event-Id") not in seen:
                    seen.add(r.headers.get("X-Chorus-Event-Id", ""))
                    out.append(r.event)
        return out

    def events_for(self, call_id: str) -> list[dict]:
        return [e for e in self.delivered() if e["call_id"] == call_id]

    def requests_for(self, call_id: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.event.get("call_id") == call_id]

    def wait_for(self, predicate: Callable[["WebhookReceiver"], bool], timeout: float = 30.0) -> bool:
        try:
            return wait_until(lambda: predicate(self), timeout, 0.05, "webhook condition")
        except AssertionError as e:
            raise AssertionError(f"{e}; {len(self.requests)} request(s) so far") from None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "WebhookReceiver":
        self._thread.start()
        app = web.Application()
        app.router.add_post("/hook", self._handle)

        async def start() -> None:
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        asyncio.run_coroutine_threadsafe(start(), self._loop).result(10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
