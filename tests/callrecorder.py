"""A stand-in for the webhook sink that records every call event a server publishes.

Install it on a running test server (``server.app.calls.sink = CallRecorder()``) to see
exactly what the hub hands the webhook; the hub calls it on the server's loop thread.
"""

from __future__ import annotations

import json
import threading

from tests.waiting import wait_until


class CallRecorder:
    def __init__(self) -> None:
        self.events: list[dict] = []
        self._lock = threading.Lock()

    def deliver(self, call_id: str, event_type: str, event_id: str, body: bytes) -> None:
        event = json.loads(body)
        assert event["call_id"] == call_id and event["type"] == event_type and event["event_id"] == event_id
        with self._lock:
            self.events.append(event)

    async def close(self, timeout: float) -> None:
        return None

    def of(self, call_id: str, kind: str | None = None) -> list[dict]:
        with self._lock:
            return [e for e in self.events if e["call_id"] == call_id and (kind is None or e["type"] == kind)]

    def wait_for(self, call_id: str, kind: str, timeout: float = 60.0) -> list[dict]:
        """Wait until ``call_id`` has an event of ``kind``; returns all of its events."""
        try:
            wait_until(lambda: self.of(call_id, kind), timeout, 0.05, f"a {kind} event for call {call_id!r}")
        except AssertionError as e:
            raise AssertionError(f"{e}; got {self.of(call_id)}") from None
        return self.of(call_id)
