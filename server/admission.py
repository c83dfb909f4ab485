"""Admission: whether a new session may start, and the slots of those that did.

A slot is taken in ``process_request``, before the WebSocket upgrade, and given back
when that TCP connection closes, whatever happened in between (refused, failed
handshake, session ended). Counting at admission rather than in the session handler
means concurrent handshakes cannot overshoot ``server.max_sessions``.

Besides the fixed limits (sessions in all, sessions per client address) admission is
capacity-aware, so that the sessions already admitted keep their latency and a load
balancer sends newcomers to another replica (503 + Retry-After; /healthz says
``accepting: false``):
- projected load: what one second of live stream costs the model on finals (measured over
  the recent finals, each matched to the stream time since its session's previous final:
  ``MicroBatcher.final_cost``), times the sessions one more admission would make; refused
  above ``server.admission_max_model_load``. This looks ahead: a queue only shows overload
  once the sessions that cause it are already in. Every open session is charged from its
  first second, though it has sent no final yet: a session's own finals come only after its
  first utterance, and waiting for them let several too many in while sessions arrived. An
  idle session is charged as if it spoke like the others, because it may start any time;
- backlog: finals already waiting longer than ``server.admission_max_final_wait_s``.
Before the model's first final nothing is measured and only the backlog and the fixed
limits apply. Admitted sessions are never closed for load: their finals queue and are
delivered.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Hashable

from server.batcher import MicroBatcher
from server.config import ServerConfig
from server.metrics import Metrics


@dataclass(frozen=True)
class Refusal:
    status: int  # HTTP status of the refused handshake
    reason: str  # short label: metrics, logs, and the `reason` of /healthz
    message: str  # for the client; never holds exception text or paths
    retry_after_s: int | None = None


class Admission:
    def __init__(self, cfg: ServerConfig, batcher: MicroBatcher, metrics: Metrics) -> None:
        self.cfg = cfg
        self.batcher = batcher
        self.metrics = metrics
        self.sessions = 0
        self._address_of: dict[Hashable, str] = {}
        self._per_address: collections.Counter[str] = collections.Counter()

    def projected_load(self) -> float:
        """The model's busy share on finals if one more session were admitted (see module doc);
        0 while nothing is measured."""
        cost = self.batcher.final_cost()
        return 0.0 if cost is None else cost * (self.sessions + 1)

    def capacity_refusal(self) -> Refusal | None:
        """Refusal for any newcomer because of load (full, or finals waiting too long)."""
        if self.sessions >= self.cfg.max_sessions:
            return Refusal(503, "full", f"server is at its session limit ({self.cfg.max_sessions})", 5)
        limit = self.cfg.admission_max_model_load
        if limit > 0:
            projected = self.projected_load()
            if projected > limit:
                return Refusal(
                    503, "capacity", f"the model is near capacity (projected {projected:.0%} busy on finals); "
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
        self.metrics.sessions_active.set(self.sessions)
        return None

    def release(self, key: Hashable) -> None:
        address = self._address_of.pop(key, None)
        if address is None:
            return
        self.sessions -= 1
        self._per_address[address] -= 1
        if self._per_address[address] <= 0:
            del self._per_address[address]
        self.metrics.sessions_active.set(self.sessions)
