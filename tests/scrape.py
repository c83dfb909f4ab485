"""Reading one sample out of a Prometheus text page (a server's /metrics), with
prometheus_client's own parser."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def sample(text: str, name: str, default: float | None = 0.0, **labels: str) -> float | None:
    """The value of the sample called ``name`` whose labels are exactly ``labels``; ``default``
    when the page has none (a counter never incremented is often absent)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return default


def scrape(port: int, path: str = "/metrics", headers: dict[str, str] | None = None, host: str = "127.0.0.1") -> str:
    """The text of a server's metrics page, fetched over its socket."""
    req = urllib.request.Request(f"http://{host}:{port}{path}", headers=headers or {})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read().decode()


def metric(port: int, name: str, default: float | None = 0.0, headers: dict[str, str] | None = None, **labels: str) -> float | None:
    """One sample of the server's /metrics on ``port``."""
    return sample(scrape(port, headers=headers), name, default, **labels)
