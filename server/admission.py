"""Admission: whether a new session may start, and the slots of those that did.

A slot is taken in ``process_request``, before the WebSocket upgrade, and given back
when that TCP connection closes, whatever happened in between (refused, failed
handshake, session ended). Counting at admission rather than in the session handler
means concurrent handshakes cannot overshoot ``server.max_sessions``.

Besides the fixed limits (sessions in all, sessions per client address) admission is
capacity-aware, so that the sessions already admitted keep their latency and a load
balancer sends newcomers to another replica (503 + Retry-After; /healthz says
``accepting: false``):
- projection: from the final calls of the last minute (``MicroBatcher.final_costs``) the
  server fits how a call's time grows with its batch size, ``call(k) = base + per_item * k``,
  and how often a session sends a final. A final typically finds a call in flight (a partial
  call, or another final's), waits for it, and the other sessions' finals that arrive
  meanwhile join its own call: with one more session open, the projected time of a final is
  ``wait + call(1 + others' rate * wait)``, refused above ``server.admission_target_final_s``.
  The finals' busy share of the model, ``rate * call(k) / k``, is refused above
  ``server.admission_max_model_load``: near it a queue builds that the projected time does
  not show (and above 1 nothing keeps up at all). Every open session is charged from its
  first second, though it has sent no final yet, and an idle one as if it spoke like the
  others: it may start any time. Until calls of at least two sizes were measured, a call of k
  items is taken to cost ``(1 - m) + m * k`` times a call of one
  (``m = server.admission_batch_marginal``).
- safe start: before the model's first final nothing is measured, and at most
  ``server.admission_unmeasured_sessions`` sessions are admitted (a burst at a fresh server
  would otherwise all get in before the first cost shows);
- backlog: finals already waiting longer than ``server.admission_max_final_wait_s``.
Sessions are counted as the model sees them: a stereo stream or a two-track call is charged
for each of its tracks (``charge``). Admitted sessions are never closed for load: their
finals queue and are delivered.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Hashable, Sequence

from server.batcher import FinalCosts, MicroBatcher
from server.config import ServerConfig
from server.metrics import Metrics


@dataclass(frozen=True)
class Refusal:
    status: int  # HTTP status of the refused handshake
    reason: str  # short label: metrics, logs, and the `reason` of /healthz
    message: str  # for the client; never holds exception text or paths
    retry_after_s: int | None = None


@dataclass(frozen=True)
class Projection:
    """What the model's finals would look like with ``sessions`` open (see the module doc)."""

    sessions: int
    batch: float  # expected items per final call
    call_s: float  # seconds of such a call
    latency_s: float  # a final's wait for the call in flight plus its own call
    load: float  # the finals' busy share of the model (1.0 when no batch size keeps up)

    @property
    def keeps_up(self) -> bool:
        return self.load < 1.0


def fit_call_cost(calls: Sequence[tuple[int, float]], marginal_prior: float) -> tuple[float, float]:
    """``(base, per_item)`` seconds of a final call of k items, ``base + per_item * k``, by least
    squares over measured (items, seconds). With calls of one size only the slope is unknown:
    a call of k is taken to cost ``(1 - m) + m * k`` calls of one (m = ``marginal_prior``).
    The slope is kept within [0, the dearest per-item cost seen]: noise must not make items
    look free beyond what was measured, nor dearer than any call showed."""
    ks = [float(k) for k, _ in calls]
    ts = [t for _, t in calls]
    n = len(calls)
    mean_k, mean_t = sum(ks) / n, sum(ts) / n
    var_k = sum((k - mean_k) ** 2 for k in ks)
    if var_k > 0:
        per_item = sum((k - mean_k) * (t - mean_t) for k, t in zip(ks, ts)) / var_k
        per_item = min(max(per_item, 0.0), max(t / k for k, t in zip(ks, ts)))
        return max(0.0, mean_t - per_item * mean_k), per_item
    one = mean_t / ((1.0 - marginal_prior) + marginal_prior * mean_k)
    return one * (1.0 - marginal_prior), one * marginal_prior


def project(costs: FinalCosts, sessions: int, marginal_prior: float) -> Projection:
    """The finals of ``sessions`` open sessions, batched as the batcher batches them (see the
    module doc)."""
    base, per_item = fit_call_cost(costs.calls, marginal_prior)
    rate = sessions / costs.stream_per_final_s  # finals per second, all sessions together
    others = max(0, sessions - 1) / costs.stream_per_final_s
    # What a final typically finds in flight: a partial call, or another final's call.
    wait = max(costs.partial_call_s, base + per_item)
    # The other sessions' finals that arrive meanwhile join its call.
    batch = min(float(max(1, sessions)), 1.0 + others * wait)
    call = base + per_item * batch
    load = rate * call / batch
    if rate * per_item >= 1.0 or load >= 1.0:  # more work arrives than any batch size gets done
        return Projection(sessions, batch, call, math.inf, 1.0)
    return Projection(sessions, batch, call, wait + call, load)


class Admission:
    def __init__(self, cfg: ServerConfig, batcher: MicroBatcher, metrics: Metrics) -> None:
        self.cfg = cfg
        self.batcher = batcher
        self.metrics = metrics
        self.sessions = 0
        self._address_of: dict[Hashable, str] = {}
        # Sessions beyond the first that an admitted connection runs (stereo, two-track calls).
        self._extra: dict[Hashable, int] = {}
        self._per_address: collections.Counter[str] = collections.Counter()

    @property
    def charged(self) -> int:
        """Sessions as the model sees them: every track of every admitted connection."""
        return self.sessions + sum(self._extra.values())

    def projection(self, newcomers: int = 1) -> Projection | None:
        """The model's finals if ``newcomers`` more sessions were admitted; None while nothing
        is measured."""
        costs = self.batcher.final_costs()
        if costs is None:
            return None
        return project(costs, self.charged + newcomers, self.cfg.admission_batch_marginal)

    def capacity_refusal(self, newcomers: int = 1) -> Refusal | None:
        """Refusal for ``newcomers`` more sessions because of load (full, projected over the
        target, or finals waiting too long)."""
        if self.charged + newcomers > self.cfg.max_sessions:
            return Refusal(503, "full", f"server is at its session limit ({self.cfg.max_sessions})", 5)
        target, limit = self.cfg.admission_target_final_s, self.cfg.admission_max_model_load
        if target > 0 or limit > 0:
            p = self.projection(newcomers)
            if p is None:
                unmeasured = self.cfg.admission_unmeasured_sessions
                if unmeasured and self.charged + newcomers > unmeasured:
                    return Refusal(
                        503, "capacity", "the model's cost is not measured yet (no final so far); "
                        "try again shortly", 2,
                    )
            elif (limit > 0 and p.load > limit) or not p.keeps_up:
                return Refusal(
                    503, "capacity", f"the model is near capacity (projected {p.load:.0%} busy on finals); "
                    "try again shortly", 5,
                )
            elif target > 0 and p.latency_s > target:
                return Refusal(
                    503, "capacity", f"the model is near capacity (finals projected to take {p.latency_s:.1f} s); "
                    "try again shortly", 5,
                )
        bound = self.cfg.admission_max_final_wait_s
        if bound > 0:
            wait = self.batcher.final_wait_s()
            if wait > bound:
                return Refusal(
                    503, "capacity", f"the model is behind (finals wait {wait:.1f} s); try again shortly",
                    max(1, math.ceil(wait)),
                )
        return None

    def admit(self, key: Hashable, address: str) -> Refusal | None:
        """Take a slot for connection ``key`` from ``address``, or say why not."""
        refusal = self.capacity_refusal()
        if refusal is None:
            per = self.cfg.max_sessions_per_address
            if per and self._per_address[address] >= per:
                refusal = Refusal(429, "address_limit", f"too many sessions from one address (limit {per})", 5)
        if refusal is not None:
            return refusal
        self.sessions += 1
        self._address_of[key] = address
        self._per_address[address] += 1
        self.metrics.sessions_total.inc()
        self.metrics.sessions_active.set(self.charged)
        return None

    def charge(self, key: Hashable, tracks: int) -> Refusal | None:
        """Admitted connection ``key`` runs ``tracks`` sessions (a stereo stream, a two-track
        call): charge the ones beyond its first, or say why they do not fit (the connection
        keeps its first)."""
        if key not in self._address_of:
            return None
        more = max(0, tracks - 1) - self._extra.get(key, 0)
        if more > 0:
            refusal = self.capacity_refusal(newcomers=more)
            if refusal is not None:
                return refusal
        if tracks > 1:
            self._extra[key] = tracks - 1
        else:
            self._extra.pop(key, None)
        self.metrics.sessions_active.set(self.charged)
        return None

    def release(self, key: Hashable) -> None:
        address = self._address_of.pop(key, None)
        self._extra.pop(key, None)
        if address is None:
            return
        self.sessions -= 1
        self._per_address[address] -= 1
        if self._per_address[address] <= 0:
            del self._per_address[address]
        self.metrics.sessions_active.set(self.charged)
