"""The call webhook sender against a real HTTP receiver on loopback (no model needed).

The receiver (tests/webhookreceiver.py) checks signatures with its own HMAC; these tests
drive ``WebhookSender`` directly, as the call hub does, and read its metrics.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from server.calls.webhook import WebhookSender, load_secret
from server.config import ConfigError, load_config
from server.metrics import Metrics
from tests.ports import free_port
from tests.waiting import async_wait_until
from tests.webhookreceiver import WebhookReceiver

SECRET = b"s3cret-for-tests"


def sender(url: str, secret: bytes | None = SECRET, **overrides) -> tuple[WebhookSender, Metrics]:
    sets = {"webhook.url": url, "webhook.backoff_s": "0.05", "webhook.max_backoff_s": "0.2", "webhook.timeout_s": "2",
            **{k: str(v) for k, v in overrides.items()}}
    metrics = Metrics()
    return WebhookSender(load_config(None, sets).webhook, secret, metrics), metrics


def body(call_id: str, seq: int, kind: str = "final") -> tuple[str, str, str, bytes]:
    event_id = f"{call_id}-{seq}"
    return call_id, kind, event_id, json.dumps({"type": kind, "call_id": call_id, "seq": seq, "event_id": event_id}).encode()


def count(metrics: Metrics, outcome: str) -> float:
    return metrics.registry.get_sample_value("chorus_webhook_events_total", {"outcome": outcome}) or 0.0


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/hook"  # a port nothing listens on, and no one else is given


def test_signed_in_order_per_call_with_identical_retries():
    with WebhookReceiver(secret=SECRET) as rx:
        rx.fail_next(2, status=503)

        async def main():
            ws, metrics = sender(rx.url)
            for seq in range(1, 6):
                for call in ("A", "B"):
                    ws.deliver(*body(call, seq))
            await ws.close(10)
            return metrics

        metrics = asyncio.run(main())
    for call in ("A", "B"):
        assert [e["seq"] for e in rx.events_for(call)] == [1, 2, 3, 4, 5]
    assert all(r.signature_ok for r in rx.requests)
    assert count(metrics, "delivered") == 10 and count(metrics, "failed") == 0
    retried = [r for r in rx.requests if r.headers["X-Chorus-Attempt"] != "1"]
    assert len(retried) == 2, [(r.status, r.headers["X-Chorus-Attempt"]) for r in rx.requests]
    for r in retried:
        first = next(q for q in rx.requests if q.headers["X-Chorus-Event-Id"] == r.headers["X-Chorus-Event-Id"]
                     and q.headers["X-Chorus-Attempt"] == "1")
        assert first.status == 503 and first.body == r.body
        assert first.headers["X-Chorus-Signature"] == r.headers["X-Chorus-Signature"]
    assert {r.headers["X-Chorus-Event"] for r in rx.requests} == {"final"}
    assert rx.requests[0].headers["User-Agent"].startswith("chorus/")


def test_the_receiver_would_catch_a_bad_signature():
    with WebhookReceiver(secret=b"another-secret") as rx:
        async def main():
            ws, metrics = sender(rx.url)
            ws.deliver(*body("A", 1))
            await ws.close(10)
            return metrics

        metrics = asyncio.run(main())
    assert [r.signature_ok for r in rx.requests] == [False]
    assert count(metrics, "failed") == 1  # 401 is not retried


def test_unsigned_without_a_secret_and_partials_only_when_asked():
    with WebhookReceiver() as rx:
        async def main(partials: bool):
            ws, _ = sender(rx.url, secret=None, **{"webhook.partials": str(partials).lower()})
            ws.deliver(*body("P" + str(partials), 1, "partial"))
            ws.deliver(*body("P" + str(partials), 2, "final"))
            await ws.close(10)

        asyncio.run(main(False))
        asyncio.run(main(True))
    assert [e["type"] for e in rx.events_for("PFalse")] == ["final"]
    assert [e["type"] for e in rx.events_for("PTrue")] == ["partial", "final"]
    assert all("X-Chorus-Signature" not in r.headers for r in rx.requests)


def test_refused_and_exhausted_events_fail_alone():
    with WebhookReceiver(secret=SECRET) as rx:
        async def main():
            ws, metrics = sender(rx.url, **{"webhook.max_attempts": "3"})
            rx.fail_next(1, status=400)  # not retried
            ws.deliver(*body("A", 1))
            ws.deliver(*body("A", 2))
            await async_wait_until(lambda: len(rx.requests) == 2, what="events 1 and 2 answered")
            rx.fail_next(3, status=500)  # every try of event 3 fails
            ws.deliver(*body("A", 3))
            ws.deliver(*body("A", 4))
            await ws.close(10)
            return metrics

        metrics = asyncio.run(main())
    assert [e["seq"] for e in rx.events_for("A")] == [2, 4]
    tries = [r.headers["X-Chorus-Attempt"] for r in rx.requests if r.event["seq"] == 3]
    assert tries == ["1", "2", "3"]
    assert [r.headers["X-Chorus-Attempt"] for r in rx.requests if r.event["seq"] == 1] == ["1"]
    assert count(metrics, "failed") == 2 and count(metrics, "delivered") == 2
    assert metrics.registry.get_sample_value("chorus_webhook_requests_total", {"result": "4xx"}) == 1
    assert metrics.registry.get_sample_value("chorus_webhook_requests_total", {"result": "5xx"}) == 3


def test_retry_after_is_honoured():
    with WebhookReceiver(secret=SECRET) as rx:
        async def main():
            ws, _ = sender(rx.url, **{"webhook.max_backoff_s": "5"})
            rx.fail_next(1, status=429, retry_after="1")
            ws.deliver(*body("A", 1))
            await ws.close(10)

        asyncio.run(main())
    first, second = rx.requests
    assert first.status == 429 and second.status == 200
    assert second.at - first.at >= 0.95  # the backoff alone would be 0.05 s


def test_a_slow_call_does_not_hold_back_another():
    """A call whose webhook requests hang does not hold back another call's events; its own go
    one after another, in order."""
    with WebhookReceiver(secret=SECRET) as rx:
        rx.hold_call("slow")  # its requests get no answer until released

        async def main():
            ws, _ = sender(rx.url, **{"webhook.timeout_s": "60"})
            for seq in range(1, 4):
                ws.deliver(*body("slow", seq))
                ws.deliver(*body("fast", seq))
            await async_wait_until(lambda: len(rx.events_for("fast")) == 3 and rx.arrived("slow"),
                                   what="the fast call's 3 events delivered and the slow call's first sent")
            slow_meanwhile = (rx.arrived("slow"), rx.events_for("slow"))
            await asyncio.to_thread(rx.release_call, "slow")
            await ws.close(10)
            return slow_meanwhile

        slow_arrived, slow_answered = asyncio.run(main())
    # All of the fast call went while the slow call's first request still hung, and the slow
    # call's second was not sent before its first was answered.
    assert slow_arrived == ["slow-1"] and slow_answered == []
    assert [e["seq"] for e in rx.events_for("slow")] == [1, 2, 3]
    assert [r.event["seq"] for r in rx.requests_for("slow")] == [1, 2, 3]  # each sent once


@pytest.mark.timing  # a bound on wall time
def test_deliver_never_waits_and_drops_oldest_partials_first():
    url = dead_url()

    async def main():
        ws, metrics = sender(url, **{"webhook.max_pending_events": "4", "webhook.max_attempts": "1", "webhook.partials": "true"})
        # No await until the checks below: no worker runs, so nothing leaves the queues.
        t0 = time.perf_counter()
        for seq, kind in enumerate(("final", "partial", "final", "partial", "final", "final"), 1):
            ws.deliver(*body("A", seq, kind))
        for i in range(1000):
            ws.deliver(*body(f"call{i}", 1))
        took = time.perf_counter() - t0
        queued = [e.event_id for e in ws._queues["A"]]
        for task in ws._workers.values():
            task.cancel()
        ws._workers.clear()
        ws._queues.clear()
        return took, queued, metrics

    took, queued, metrics = asyncio.run(main())
    assert took < 1006 * 0.005, took  # < 5 ms per deliver, in all
    # Six events into four places: the two partials went (the in-flight head never does).
    assert queued == ["A-1", "A-3", "A-5", "A-6"]
    assert count(metrics, "dropped") == 2


@pytest.mark.timing  # a bound on wall time
def test_close_gives_up_at_its_deadline_and_counts_the_loss():
    async def main():
        ws, metrics = sender(dead_url(), **{"webhook.max_attempts": "100", "webhook.max_backoff_s": "0.5"})
        for seq in range(1, 4):
            ws.deliver(*body("A", seq))
        t0 = time.monotonic()
        await ws.close(1.0)
        took = time.monotonic() - t0
        ws.deliver(*body("A", 9))  # after close: ignored
        return took, metrics

    took, metrics = asyncio.run(main())
    assert 0.9 <= took < 2.0, took
    # Tried and given up at the deadline (failed), or never tried (dropped): none delivered, none left.
    assert count(metrics, "dropped") + count(metrics, "failed") == 3 and count(metrics, "delivered") == 0
    assert metrics.registry.get_sample_value("chorus_webhook_pending_events") == 0


def test_secret_from_env_or_file(tmp_path):
    cfg = load_config(None, {"webhook.url": "http://x/hook", "webhook.secret_file": str(tmp_path / "secret")})
    (tmp_path / "secret").write_text("from-file\n")
    assert load_secret(cfg, {}) == b"from-file"
    assert load_secret(cfg, {"CHORUS_WEBHOOK_SECRET": "from-env"}) == b"from-env"
    (tmp_path / "secret").write_text("  \n")
    with pytest.raises(ConfigError, match="empty"):
        load_secret(cfg, {})
    (tmp_path / "secret").unlink()
    with pytest.raises(ConfigError, match="cannot read"):
        load_secret(cfg, {})
    assert load_secret(load_config(None, {"webhook.url": "http://x/hook"}), {}) is None


@pytest.mark.timing  # a bound on wall time
def test_close_cancels_a_hanging_request():
    with WebhookReceiver(secret=SECRET) as rx:
        rx.hold_call("A")  # no answer until released

        async def main():
            ws, metrics = sender(rx.url, **{"webhook.timeout_s": "30"})
            ws.deliver(*body("A", 1))
            ws.deliver(*body("A", 2))
            await async_wait_until(lambda: rx.arrived("A"), what="the first request in flight")
            t0 = time.monotonic()
            await ws.close(1.0)
            took = time.monotonic() - t0
            await asyncio.to_thread(rx.release_call, "A")
            return took, metrics

        took, metrics = asyncio.run(main())
    assert took < 2.0, took
    assert count(metrics, "dropped") == 2 and count(metrics, "delivered") == 0
