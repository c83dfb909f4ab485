"""Prometheus metrics, one registry per server instance.

A registry per instance (not the global default) so that tests and benchmarks can
run several servers in one process without duplicate-registration errors.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 128)


class Metrics:
    """Every metric the server exports; names are stable API for dashboards."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions_active = Gauge("chorus_sessions_active", "Open streaming sessions.", registry=r)
        self.sessions_total = Counter("chorus_sessions", "Sessions accepted.", registry=r)
        self.sessions_rejected = Counter(
            "chorus_sessions_rejected", "Handshakes refused before the upgrade, by reason (loading, broken, draining, "
            "full, address_limit, capacity).", ["reason"], registry=r,
        )
        self.segments = Counter("chorus_segments", "Speech segments finalised.", ["reason"], registry=r)
        self.audio_seconds = Counter("chorus_audio_seconds", "Audio received, in seconds (after resampling).", registry=r)
        self.errors = Counter("chorus_errors", "Error messages sent to clients.", ["code"], registry=r)
        self.requests = Counter("chorus_requests", "Model requests submitted to the batcher.", ["kind"], registry=r)
        self.requests_dropped = Counter(
            "chorus_requests_dropped", "Requests not run: superseded partials, overload, cancelled sessions.", ["kind", "why"], registry=r
        )
        self.batch_size = Histogram("chorus_batch_size", "Items per model call.", buckets=_BATCH_BUCKETS, registry=r)
        self.batch_audio_seconds = Histogram(
            "chorus_batch_audio_seconds", "Audio seconds per model call.", buckets=(1, 2, 5, 10, 20, 40, 80, 160, 320), registry=r
        )
        self.queue_wait = Histogram(
            "chorus_queue_wait_seconds", "Time a request waited in the batcher.", ["kind"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.model_seconds = Histogram("chorus_model_seconds", "Wall time of one model call.", buckets=_LATENCY_BUCKETS, registry=r)
        self.rtf = Histogram(
            "chorus_real_time_factor", "Model wall time / audio seconds in the batch (lower is better).",
            buckets=(0.001, 0.003, 0.01, 0.03, 0.1, 0.2, 0.5, 1.0, 2.0), registry=r,
        )
        self.partial_latency = Histogram(
            "chorus_partial_latency_seconds", "From partial request to the partial being queued for the client.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.final_latency = Histogram(
            "chorus_final_latency_seconds", "From the end-of-segment decision to the final being queued for the client.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.item_errors = Counter(
            "chorus_item_errors", "Items that failed alone (bad options or audio, non-finite model output), by error code.",
            ["code"], registry=r,
        )
        self.batch_failures = Counter(
            "chorus_batch_failures", "Model calls that failed as a whole (every item in them failed).", registry=r,
        )
        self.batch_splits = Counter("chorus_batch_splits", "Batches split in halves after running out of device memory.", registry=r)
        self.queue_depth = Gauge("chorus_batcher_queue_depth", "Requests waiting in the batcher.", registry=r)
        self.api_requests = Counter(
            "chorus_api_requests", "HTTP API requests answered, by route and status (499: the client went away).",
            ["route", "status"], registry=r,
        )
        self.file_audio_seconds = Counter(
            "chorus_file_audio_seconds", "Audio of recordings transcribed through the HTTP API, in seconds.", registry=r,
        )
        self.queue_waiting = Gauge(
            "chorus_batcher_waiting", "Requests waiting in the batcher, by priority class (final, partial, file).",
            ["kind"], registry=r,
        )
        self.batches = Counter("chorus_batches", "Model calls completed, by priority class (final, partial, file).",
                               ["kind"], registry=r)
        self.model_busy_seconds = Counter(
            "chorus_model_busy_seconds", "Wall time of completed model calls, by priority class (final, partial, file).",
            ["kind"], registry=r,
        )
        self.model_ready = Gauge("chorus_model_ready", "1 once the model is loaded and warm.", registry=r)
        self.model_healthy = Gauge(
            "chorus_model_healthy", "0 while the model is broken (calls failing in a row) or hung (watchdog); else 1.",
            registry=r,
        )
        self.accepting = Gauge(
            "chorus_accepting_sessions", "1 while new sessions are admitted (ready, healthy, not full, finals not "
            "waiting too long, not draining).", registry=r,
        )
        self.final_load = Gauge(
            "chorus_model_final_load", "Share of the last 20 s the model spent on finals.", registry=r,
        )
        self.final_cost = Gauge(
            "chorus_model_final_cost", "Model seconds spent on finals per second of live stream, over the last "
            "60 s of finals (0 before the first final); capacity-aware admission projects from the same calls.",
            registry=r,
        )
        self.projected_final = Gauge(
            "chorus_admission_projected_final_seconds", "What capacity-aware admission projects a final to take "
            "in the model (waiting for the call in flight, then its own batched call) with one more session "
            "open; compared with server.admission_target_final_s. 0 before the first final.", registry=r,
        )
        self.load_ratio = Gauge(
            "chorus_load_ratio", "Load relative to what this replica admits, for autoscalers (deploy/kubernetes): "
            "the larger of open sessions (as the model sees them) / server.max_sessions and, once a final has "
            "been measured, the finals' projected busy share of the model / server.admission_max_model_load "
            "(/ 1 when that is off). 1 = newcomers are refused; 0 = idle.", registry=r,
        )
        self.final_wait = Gauge(
            "chorus_final_wait_seconds", "How long finals wait for the model now (what capacity-aware admission reads).",
            registry=r,
        )
        self.stage_seconds = Counter(
            "chorus_stage_seconds",
            "Time spent per stage of the data path: decode (audio decode + resample), vad, and send "
            "(socket writes, including waits on a full socket buffer) on the event loop; features, encoder, decoder, "
            "model and postprocess in the batcher's worker (device time on GPU, measured with events).",
            ["stage"], registry=r,
        )
        self.event_loop_lag = Histogram(
            "chorus_event_loop_lag_seconds",
            "How late the event loop woke a 100 ms timer: time other callbacks held the loop.",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0), registry=r,
        )
        self.event_loop_cpu = Counter(
            "chorus_event_loop_cpu_seconds",
            "CPU time of the event-loop thread (sockets, websockets framing, JSON, sessions, VAD).",
            registry=r,
        )
        self.calls_active = Gauge("chorus_calls_active", "Telephony calls open (Twilio, AudioSocket, native streams with a call_id).", registry=r)
        self.call_events = Counter("chorus_call_events", "Call events published, by type.", ["type"], registry=r)
        self.call_subscribers = Gauge("chorus_call_subscribers", "Open /v1/calls subscriptions.", registry=r)
        self.call_subscribers_dropped = Counter(
            "chorus_call_subscribers_dropped", "/v1/calls subscribers disconnected for not reading their events.", registry=r,
        )
        self.call_history_bytes = Gauge(
            "chorus_call_history_bytes", "Encoded bytes of call events kept for late /v1/calls subscribers, over "
            "every call (bounded by calls.max_history_bytes).", registry=r,
        )
        self.call_history_dropped = Counter(
            "chorus_call_history_dropped_events", "Call events left out of (or dropped from) the history kept for late "
            "subscribers, by reason: call_limit (calls.history_events/history_bytes), total_limit "
            "(calls.max_history_bytes), evicted (an ended call forgotten early to make room).", ["reason"], registry=r,
        )
        self.webhook_events = Counter(
            "chorus_webhook_events", "Call events handed to the webhook, by outcome: delivered, failed (every try "
            "failed, or a 4xx that is not retried), dropped (a queue bound was reached, or shutdown came first).",
            ["outcome"], registry=r,
        )
        self.webhook_requests = Counter(
            "chorus_webhook_requests", "Webhook POSTs, by result: 2xx, 3xx, 4xx, 5xx, timeout, error (no response).",
            ["result"], registry=r,
        )
        self.webhook_pending = Gauge("chorus_webhook_pending_events", "Call events waiting for webhook delivery.", registry=r)
        self.webhook_pending_bytes = Gauge(
            "chorus_webhook_pending_bytes", "Encoded bytes of call events waiting for webhook delivery (bounded by "
            "webhook.max_pending_bytes per call and webhook.max_total_pending_bytes).", registry=r,
        )
        self.webhook_delay = Histogram(
            "chorus_webhook_delivery_seconds", "From an event's publication to its successful delivery (retries included).",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        # process_cpu_seconds_total etc., so the stage times can be set against the whole process.
        ProcessCollector(registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
