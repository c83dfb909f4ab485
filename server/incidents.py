"""Server-side failures reported to clients by id, never by their text.

Exception text can hold paths, model internals or the client's own input; a client gets
a generic message and an incident id, and the log has the details under the same id,
so an operator can find them from a client's bug report.
"""

from __future__ import annotations

import logging
import uuid


def report(log: logging.Logger, what: str, exc: BaseException | None = None, *args: object) -> str:
    """Log ``what`` (a %-format with ``args``) with the exception and a new incident id; return the id."""
    incident = uuid.uuid4().hex[:12]
    log.error("[incident %s] " + what, incident, *args, exc_info=exc)
    return incident
