"""Plain HTTP answers on the WebSocket port, and admission before the upgrade.

websockets calls ``process_request`` before the handshake; returning a Response
answers over HTTP instead of upgrading. That is where /healthz, /livez and /metrics
live, where access is checked (each door's guards: Host, token, Origin, Twilio's
signature; server/transport/access.py), and where a full, overloaded, draining or
not-yet-warm server refuses with 503 (429 past the per-address limit), so the server
never spends a WebSocket (or a session) on a client it cannot serve.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Callable
from urllib.parse import parse_qsl, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from server.admission import Refusal
from server.protocol.twilio import signature_valid
from server.transport import calls as calls_transport
from server.transport import realtime as realtime_transport
from server.transport import twilio as twilio_transport
from server.transport.access import FUNASR, MAIN, find_door
from server.transport.twilio import signed_urls
from server.transport.page import page_response

if TYPE_CHECKING:
    from server.app import ChorusServer

log = logging.getLogger(__name__)

STREAM_PATHS = ("/v1/stream", realtime_transport.PATH)


def _response(status: int, reason: str, body: bytes, content_type: str) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body))), ("Cache-Control", "no-store")])
    return Response(status, reason, headers, body)


def json_response(status: int, reason: str, payload: dict) -> Response:
    return _response(status, reason, json.dumps(payload).encode(), "application/json")


def refusal_response(refusal: Refusal) -> Response:
    error = {429: "too_many_sessions"}.get(refusal.status, "overloaded" if refusal.reason in ("full", "capacity") else "unavailable")
    resp = json_response(refusal.status, "Too Many Requests" if refusal.status == 429 else "Service Unavailable",
                         {"error": error, "reason": refusal.reason, "message": refusal.message})
    if refusal.retry_after_s is not None:
        resp.headers["Retry-After"] = str(refusal.retry_after_s)
    return resp


def make_process_request(app: "ChorusServer") -> Callable:
    secure = bool(app.config.server.tls_cert)

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        # The door (server/transport/access.py DOORS) says what guards this path; Twilio can
        # send neither a header nor a query string of ours: its signature is the credential.
        door = find_door(MAIN, path)
        signed = (lambda: _twilio_signature(app, request, path)) if app.twilio_auth_token is not None else None
        denied = app.access.guard(door, request, path, secure, twilio_signature=signed)
        if denied is not None:
            return denied
        if path == "/healthz":
            # Readiness: 200 only while a new session would be admitted (load balancers route on it).
            info = app.health()
            return json_response(200 if info["accepting"] else 503, "OK" if info["accepting"] else "Service Unavailable", info)
        if path == "/livez":
            # Liveness: 503 only when restarting the process is the cure (broken or hung model).
            reason = app.liveness()
            return json_response(200 if reason is None else 503, "OK" if reason is None else "Service Unavailable",
                                 {"live": reason is None, "reason": reason})
        # The captioning page is static and holds no secret: it asks for the token itself and
        # sends it with its stream, where the stream's door applies.
        page = page_response(path)
        if page is not None:
            return page
        if path == "/metrics":
            return _response(200, "OK", app.metrics.render(), "text/plain; version=0.0.4; charset=utf-8")
        if path == calls_transport.PATH:
            return _subscribe(app, request)
        if path not in STREAM_PATHS and not (path == twilio_transport.PATH and app.config.twilio.enabled):
            return json_response(404, "Not Found", {"error": "not_found", "message": "no such route; streams are at /v1/stream"})
        return _admit(app, connection, request)

    return process_request


def make_funasr_process_request(app: "ChorusServer") -> Callable:
    """The FunASR listener's gate: FunASR clients connect to any path (usually `/`), so every
    path is a stream, /healthz and /metrics included: its one door needs what the main port's
    streams need, and the same admission applies."""
    secure = bool(app.config.server.tls_cert)

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        denied = app.access.guard(find_door(FUNASR, path), request, path, secure)
        if denied is not None:
            return denied
        return _admit(app, connection, request)

    return process_request


def _twilio_signature(app: "ChorusServer", request: Request, path: str) -> Response | None:
    """403 unless ``X-Twilio-Signature`` signs this stream's URL with the configured Auth Token."""
    given = request.headers.get("X-Twilio-Signature", "")
    hosts = request.headers.get_all("Host")
    token = app.twilio_auth_token
    assert token is not None
    if given and signature_valid(token, given, signed_urls(app.config, hosts[0] if len(hosts) == 1 else None, path)):
        return None
    log.info("refused %s: %s X-Twilio-Signature", path, "invalid" if given else "no")
    return json_response(403, "Forbidden", {
        "error": "forbidden", "message": "X-Twilio-Signature is missing or does not sign this URL with the "
        "configured Twilio Auth Token (behind a proxy, set twilio.public_url to the URL in your TwiML)"})


def _subscribe(app: "ChorusServer", request: Request) -> Response | None:
    """A /v1/calls handshake: the call to follow is required; subscribers use no model
    capacity, so only their own limit (and a drain) refuses them."""
    not_upgrade = _not_an_upgrade(request)
    if not_upgrade is not None:
        return not_upgrade
    call_ids = [v for k, v in parse_qsl(urlsplit(request.path).query, keep_blank_values=True) if k == "call_id"]
    if len(call_ids) != 1 or not call_ids[0] or len(call_ids[0]) > 128:
        return json_response(400, "Bad Request", {"error": "bad_request", "message":
                             "give one call_id of 1-128 characters (?call_id=<id>, or ?call_id=* for every call)"})
    if app.draining or app.calls.closed:
        return json_response(503, "Service Unavailable", {"error": "unavailable", "reason": "draining",
                                                          "message": "server is shutting down"})
    if not app.calls.has_room():
        return json_response(503, "Service Unavailable", {"error": "overloaded", "reason": "subscribers",
                                                          "message": "too many /v1/calls subscribers"})
    return None


def _admit(app: "ChorusServer", connection: ServerConnection, request: Request) -> Response | None:
    """A stream handshake: refused (426/503/429) or admitted, its slot held until it closes."""
    not_upgrade = _not_an_upgrade(request)
    if not_upgrade is not None:
        return not_upgrade
    refusal = app.refusal() or app.admission.admit(connection, _address(connection))
    if refusal is not None:
        app.metrics.sessions_rejected.labels(refusal.reason).inc()
        return refusal_response(refusal)
    # The slot is this TCP connection's until it closes, whether or not the upgrade completes.
    asyncio.get_running_loop().create_task(_release_when_closed(app, connection))
    return None


def _not_an_upgrade(request: Request) -> Response | None:
    """426 for a plain HTTP request to a WebSocket route, else None."""
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return None
    return json_response(426, "Upgrade Required", {"error": "upgrade_required", "message": "connect with a WebSocket client"})


def _address(connection: ServerConnection) -> str:
    peer = connection.remote_address
    return str(peer[0]) if peer else "?"


async def _release_when_closed(app: "ChorusServer", connection: ServerConnection) -> None:
    try:
        await connection.wait_closed()
    finally:
        app.admission.release(connection)
