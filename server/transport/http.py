"""Plain HTTP answers on the WebSocket port, and admission before the upgrade.

websockets calls ``process_request`` before the handshake; returning a Response
answers over HTTP instead of upgrading. That is where /healthz and /metrics live,
and where a full or not-yet-warm server refuses with 503, so an overloaded server
never spends a WebSocket (or a session) on a client it cannot serve.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Callable

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

if TYPE_CHECKING:
    from server.app import ChorusServer

STREAM_PATHS = ("/v1/stream",)


def _response(status: int, reason: str, body: bytes, content_type: str) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")])
    return Response(status, reason, headers, body)


def json_response(status: int, reason: str, payload: dict) -> Response:
    return _response(status, reason, json.dumps(payload).encode(), "application/json")


def make_process_request(app: "ChorusServer") -> Callable:
    def process_request(connection, request: Request) -> Response | None:  # noqa: ANN001 - websockets type
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            info = app.health()
            return json_response(200 if info["ready"] else 503, "OK" if info["ready"] else "Service Unavailable", info)
        if path == "/metrics":
            return _response(200, "OK", app.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
        if path not in STREAM_PATHS:
            return json_response(404, "Not Found", {"error": "not_found", "message": f"no route {path}; streams are at /v1/stream"})
        if request.headers.get("Upgrade", "").lower() != "websocket":
            return json_response(426, "Upgrade Required", {"error": "upgrade_required", "message": "connect with a WebSocket client"})
        refusal = app.admission_refusal()
        if refusal is not None:
            app.metrics.sessions_rejected.inc()
            resp = json_response(503, "Service Unavailable", {"error": "overloaded", "message": refusal})
            resp.headers["Retry-After"] = "1"
            return resp
        return None

    return process_request
