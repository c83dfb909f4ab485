"""Every door of the server, tried over real sockets from one table.

``server.transport.access.DOORS`` lists every way in (listener and path) and what guards it.
``test_door`` is generated from that table: each door is tried by an honest client (the right
credential, a listed browser Origin, the server's own Host) and by that client with one thing
changed: no credential, a wrong one, a foreign Origin, a foreign Host (a DNS-rebinding page,
whose Origin matches its Host). What each attempt must get follows from the door's guards
alone, so a guard that a listener forgets to apply fails here. ``test_every_route_is_a_door``
asks the running server which paths it serves and checks that each one has its own door, and
every door needs a way to knock in ``KNOCKS``: a door added later without an entry fails.
"""

from __future__ import annotations

import ast
import asyncio
import base64
import io
import json
import logging
import os
import re
import socket
import uuid
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from server.protocol.twilio import signature
from server.transport import access
from server.transport.access import API, AUDIOSOCKET, DOORS, FUNASR, HOST, MAIN, METRICS_TOKEN, ORIGIN, PEERS, TOKEN, TWILIO, Door
from tests.audiosocketclient import audiosocket_call
from tests.callrecorder import CallRecorder
from tests.ports import free_port
from tests.serverharness import ServerThread, handshake, make_config

TOKEN_VALUE = "door-token-5Hq8"
TWILIO_TOKEN = "door-twilio-token-2Lm7"
LISTED = "https://captions.example.com"
FOREIGN = "evil.example"
ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def srv(whisper_runner, tmp_path_factory):
    """Everything on, every guard on: token auth, /metrics behind the token, a Twilio Auth Token,
    the FunASR listener, the API, AudioSocket with one allowed peer (127.0.0.1; 127.0.0.2 is
    another peer on the same machine)."""
    f = tmp_path_factory.mktemp("doors") / "tokens"
    f.write_text(TOKEN_VALUE + "\n")
    cfg = make_config(**{
        "server.auth_tokens_file": str(f), "server.allowed_origins": f"[{LISTED}]", "server.metrics_require_token": "true",
        "funasr.port": free_port(), "api.port": free_port(), "audiosocket.port": free_port(),
        "audiosocket.allowed_peers": "[127.0.0.1/32]",
    })
    with pytest.MonkeyPatch.context() as mp:  # read when the server is built
        mp.setenv("CHORUS_TWILIO_AUTH_TOKEN", TWILIO_TOKEN)
        mp.delenv("CHORUS_AUTH_TOKENS", raising=False)
        server = ServerThread(cfg, whisper_runner)
    with server as s:
        s.recorder = s.app.calls.sink = CallRecorder()
        yield s


def port_of(s: ServerThread, listener: str) -> int:
    return {MAIN: s.app.port, FUNASR: s.app.funasr_port, API: s.app.api_port, AUDIOSOCKET: s.app.audiosocket_port}[listener]


# ---------------------------------------------------------------------- a raw HTTP client
@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> str | None:
        """The error code of a JSON refusal: ours ({"error": code}) or the API's (OpenAI's shape)."""
        try:
            payload = json.loads(self.body)
        except ValueError:
            return None
        err = payload.get("error") if isinstance(payload, dict) else None
        return err.get("code") if isinstance(err, dict) else err


def http(port: int, method: str, path: str, headers: list[tuple[str, str]], body: bytes = b"") -> Answer:
    """One request with exactly these headers (Host included: urllib and WebSocket clients set
    their own); a 101 answer is read up to its headers and the connection closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        head = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers), f"Content-Length: {len(body)}",
                "Connection: close" if not any(k == "Upgrade" for k, _ in headers) else "Connection: Upgrade", "", ""]
        sock.sendall("\r\n".join(head).encode() + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before an answer to {method} {path}: {data!r}"
            data += chunk
        raw_head, rest = data.split(b"\r\n\r\n", 1)
        lines = raw_head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        hdrs = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
        if status == 101:
            return Answer(status, hdrs, b"")
        length = int(hdrs.get("content-length", "-1"))
        while len(rest) < length or length < 0:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return Answer(status, hdrs, rest[:length] if length >= 0 else rest)


def upgrade_headers() -> list[tuple[str, str]]:
    return [("Upgrade", "websocket"), ("Sec-WebSocket-Key", base64.b64encode(os.urandom(16)).decode()),
            ("Sec-WebSocket-Version", "13")]


# ---------------------------------------------------------------------- attempts
@dataclass(frozen=True)
class Attempt:
    """The honest client (`right`) or it with one thing changed."""

    name: str
    credential: str = "right"  # right | none | wrong
    origin: str = LISTED
    foreign_host: bool = False


ATTEMPTS = (
    Attempt("right"),
    Attempt("no credential", credential="none"),
    Attempt("wrong credential", credential="wrong"),
    Attempt("foreign Origin", origin="https://evil.example"),
    Attempt("foreign Host", foreign_host=True),  # the Origin is then http://<that Host>, as a rebinding page's
)


def expected(door: Door, attempt: Attempt) -> str:
    """What the door's guards say this attempt gets: "open", or the refusal."""
    g = door.guards
    if attempt.foreign_host and HOST in g:
        return "unknown_host"
    if attempt.credential != "right":
        if TOKEN in g or METRICS_TOKEN in g:  # the test server requires the token for /metrics
            return "unauthorized"
        if TWILIO in g:  # the test server has a Twilio Auth Token: the signature is the credential
            return "forbidden"
        if PEERS in g:
            return "peer_refused"
    if attempt.origin != LISTED and not attempt.foreign_host and ORIGIN in g:
        return "forbidden_origin"
    return "open"


REFUSAL_STATUS = {"unknown_host": 421, "unauthorized": 401, "forbidden": 403, "forbidden_origin": 403}


def http_headers(s: ServerThread, door: Door, attempt: Attempt, path: str) -> list[tuple[str, str]]:
    port = port_of(s, door.listener)
    host = f"{FOREIGN}:{port}" if attempt.foreign_host else f"127.0.0.1:{port}"
    origin = f"http://{host}" if attempt.foreign_host else attempt.origin
    headers = [("Host", host), ("Origin", origin)]
    if TWILIO in door.guards:
        # Twilio sends no token of ours: its signature of the URL (as it would have signed this Host's URL).
        if attempt.credential != "none":
            key = TWILIO_TOKEN if attempt.credential == "right" else "not-the-twilio-token"
            headers.append(("X-Twilio-Signature", signature(key, f"wss://{host}{path}")))
    elif attempt.credential != "none":
        headers.append(("Authorization", f"Bearer {TOKEN_VALUE if attempt.credential == 'right' else 'wrong-token'}"))
    return headers


def silent_wav(seconds: float = 0.3) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(b"\x00\x00" * int(16000 * seconds))
    return buf.getvalue()


def multipart(fields: dict[str, str], file: bytes) -> tuple[str, bytes]:
    boundary = "doorboundary7d2"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
                 "Content-Type: audio/wav\r\n\r\n".encode() + file + b"\r\n")
    return f"multipart/form-data; boundary={boundary}", b"".join(parts) + f"--{boundary}--\r\n".encode()


# ---------------------------------------------------------------------- how each door is knocked on
# A knock returns what came back: "open" when the door let the client in (checked to be the
# door's real answer), else the refusal's error code.
def ws_knock(path: str) -> Callable:
    def knock(s: ServerThread, door: Door, attempt: Attempt) -> str:
        a = http(port_of(s, door.listener), "GET", path, http_headers(s, door, attempt, path) + upgrade_headers())
        return "open" if a.status == 101 else refusal(a)
    return knock


def get_knock(path: str, status: int, content_type: str, method: str = "GET", body: Callable | None = None,
              extra: tuple[tuple[str, str], ...] = ()) -> Callable:
    def knock(s: ServerThread, door: Door, attempt: Attempt) -> str:
        headers = http_headers(s, door, attempt, path) + list(extra)
        payload = b""
        if body is not None:
            ctype, payload = body()
            headers.append(("Content-Type", ctype))
        a = http(port_of(s, door.listener), method, path, headers, payload)
        if a.status in REFUSAL_STATUS.values() and a.error() in REFUSAL_STATUS:
            return refusal(a)
        assert (a.status, a.headers.get("content-type", "").split(";")[0]) == (status, content_type), (door.name, a)
        return "open"
    return knock


def refusal(a: Answer) -> str:
    code = a.error()
    assert code in REFUSAL_STATUS and REFUSAL_STATUS[code] == a.status, a
    assert a.headers["content-type"].startswith("application/json"), a
    return code


def audiosocket_knock(s: ServerThread, door: Door, attempt: Attempt) -> str:
    """A call from 127.0.0.1 (allowed) or, for a missing or wrong credential, from 127.0.0.2."""
    u = uuid.uuid4()
    src = "127.0.0.1" if attempt.credential == "right" else "127.0.0.2"
    before = s.app.metrics.registry.get_sample_value("chorus_sessions_rejected_total", {"reason": "peer"}) or 0.0
    run = asyncio.run(audiosocket_call(port_of(s, AUDIOSOCKET), u, np.zeros(1600, np.float32), speed=4.0,
                                       read_timeout=10, local_addr=(src, 0)))
    assert run.received == b""  # no hangup frame either: a stranger is not told anything
    after = s.app.metrics.registry.get_sample_value("chorus_sessions_rejected_total", {"reason": "peer"}) or 0.0
    if after == before + 1:
        # Refused before reading: its UUID never reached the call hub. (The client may see the
        # reset as a failed write rather than as the end of its reads.)
        assert s.recorder.of(str(u)) == [], "a refused peer's UUID reached the call hub"
        return "peer_refused"
    assert run.closed_by_server
    events = s.recorder.wait_for(str(u), "call_ended", timeout=20)
    assert [e["type"] for e in events][:1] == ["call_started"] and events[-1]["reason"] == "hangup", events
    return "open"


ASR_FORM = lambda: multipart({"model": "whisper-1"}, silent_wav())  # noqa: E731
PREFLIGHT = (("Access-Control-Request-Method", "POST"), ("Access-Control-Request-Headers", "authorization"))
KNOCKS: dict[str, Callable] = {
    "stream": ws_knock("/v1/stream"),
    "realtime": ws_knock("/v1/realtime"),
    "calls": ws_knock("/v1/calls?call_id=*"),
    "twilio": ws_knock("/v1/twilio"),
    "page": get_knock("/", 200, "text/html"),
    "page index": get_knock("/index.html", 200, "text/html"),
    "page files": get_knock("/static/app.js", 200, "text/javascript"),
    "healthz": get_knock("/healthz", 200, "application/json"),
    "livez": get_knock("/livez", 200, "application/json"),
    "metrics": get_knock("/metrics", 200, "text/plain"),
    "main other": get_knock("/nope", 404, "application/json"),
    # The probe paths are streams here: the hole of issue 22 was a stream at /healthz without a token.
    "funasr": ws_knock("/healthz"),
    "transcriptions": get_knock("/v1/audio/transcriptions", 200, "application/json", "POST", ASR_FORM),
    "models": get_knock("/v1/models", 200, "application/json"),
    "model": get_knock("/v1/models/chorus", 200, "application/json"),
    "api healthz": get_knock("/healthz", 200, "application/json"),
    "api livez": get_knock("/livez", 200, "application/json"),
    "api preflight": get_knock("/v1/audio/transcriptions", 204, "", "OPTIONS", extra=PREFLIGHT),
    "api other": get_knock("/nope", 405, "application/json"),  # every path has the preflight route
    "audiosocket": audiosocket_knock,
}


@pytest.mark.parametrize("attempt", ATTEMPTS, ids=lambda a: a.name)
@pytest.mark.parametrize("door", DOORS, ids=lambda d: d.name)
def test_door(srv, door: Door, attempt: Attempt):
    assert door.name in KNOCKS, f"door {door.name!r} has no knock in tests/test_doors.py: add one"
    assert KNOCKS[door.name](srv, door, attempt) == expected(door, attempt)


def test_funasr_probe_paths_are_guarded_streams(srv):
    """Issue 22's hole, on every probe-like path of the FunASR port: no token, or a foreign
    Origin, gets no stream; with both right each path is a stream (101)."""
    door = access.find_door(FUNASR, "/")
    for path in ("/", "/healthz", "/livez", "/metrics", "/v1/stream"):
        for attempt in ATTEMPTS:
            assert ws_knock(path)(srv, door, attempt) == expected(door, attempt), (path, attempt.name)


# ---------------------------------------------------------------------- no door outside the table
def source_paths() -> set[str]:
    """Every string in the server's code that looks like a URL path."""
    out = set()
    for py in (ROOT / "server").rglob("*.py"):
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"/[\w./{}-]*", node.value):
                out.add(re.sub(r"\{[^}]*\}", "x", node.value))
    return out


def test_every_route_is_a_door(srv):
    """Each path the running server serves (answers with anything but 404 given every
    credential) comes in by its own door, not by its listener's catch-all; the API's router
    has no route without its door; every door has a knock."""
    assert {d.name for d in DOORS} == set(KNOCKS), "DOORS and KNOCKS differ"
    candidates = source_paths() | {"/static/" + p.name for p in (ROOT / "server" / "web").iterdir()}
    assert {"/v1/stream", "/v1/calls", "/healthz", "/"} <= candidates  # the scan sees the routes
    served: dict[str, list[str]] = {}
    for listener in (MAIN, FUNASR, API):
        port = port_of(srv, listener)
        for path in sorted(candidates):
            for method in (("GET", "POST") if listener == API else ("GET",)):
                headers = [("Host", f"127.0.0.1:{port}"), ("Authorization", f"Bearer {TOKEN_VALUE}")] + upgrade_headers()
                if method == "POST":
                    headers = headers[:2]
                a = http(port, method, path, headers)
                if a.status in (404, 405):
                    continue
                door = access.find_door(listener, path, method)
                served.setdefault(listener, []).append(path)
                assert door.routed, f"{listener} serves {method} {path} ({a.status}) by no door of its own"
    assert {"/v1/stream", "/v1/realtime", "/v1/calls", "/v1/twilio", "/healthz", "/livez", "/metrics", "/",
            "/static/app.js"} <= set(served[MAIN])
    assert {"/v1/models", "/healthz", "/livez", "/v1/audio/transcriptions"} <= set(served[API])
    router = srv.app.api._runner.app.router
    for route in router.routes():
        canonical = route.resource.canonical if route.resource is not None else ""
        path = re.sub(r"\{[^}]*\}", "x", canonical)
        door = access.find_door(API, path, route.method)
        assert door.routed and (door.path == canonical or door.path == "*"), (route.method, canonical, door)


# ---------------------------------------------------------------------- the rebinding page, in the default setup
def test_dns_rebinding_refused_on_every_port_by_default(whisper_runner):
    """The default setup (loopback, auth off): a page whose name was rebound to 127.0.0.1
    sends Host evil.example and the matching Origin; it is refused (421) on the main port,
    the FunASR port and the API, /v1/calls?call_id=* included, while localhost still works."""
    cfg = make_config(**{"funasr.port": free_port(), "api.port": free_port()})
    with ServerThread(cfg, whisper_runner) as s:
        for listener, method, path, ws in ((MAIN, "GET", "/v1/calls?call_id=*", True), (MAIN, "GET", "/v1/stream", True),
                                            (MAIN, "GET", "/healthz", False), (FUNASR, "GET", "/", True),
                                            (API, "GET", "/v1/models", False), (API, "POST", "/v1/audio/transcriptions", False)):
            port = port_of(s, listener)
            for host, want in ((f"{FOREIGN}:{port}", 421), (f"localhost:{port}", 101 if ws else None)):
                headers = [("Host", host), ("Origin", f"http://{host}")] + (upgrade_headers() if ws else [])
                a = http(port, method, path, headers)
                if want == 421:
                    assert (a.status, a.error()) == (421, "unknown_host"), (listener, path, a)
                elif want == 101:
                    assert a.status == 101, (listener, path, a)
                else:
                    assert a.status not in (401, 403, 421), (listener, path, a)


# ---------------------------------------------------------------------- Twilio's signature in the logs
def test_twilio_signature_never_logged(srv, caplog):
    """With DEBUG logging, a Twilio handshake (signed, and wrongly signed) leaves no signature in
    the server's log (websockets logs every request header at DEBUG)."""
    caplog.set_level(logging.DEBUG)
    port = srv.app.port
    door = access.find_door(MAIN, "/v1/twilio")
    good = signature(TWILIO_TOKEN, f"wss://127.0.0.1:{port}/v1/twilio")
    bad = signature("not-the-twilio-token", f"wss://127.0.0.1:{port}/v1/twilio")

    def call(sig: str) -> int:
        return asyncio.run(handshake(f"ws://127.0.0.1:{port}/v1/twilio", additional_headers={"X-Twilio-Signature": sig})).status

    assert call(good) == 101 and call(bad) == 403
    assert door.guards == (HOST, TWILIO, ORIGIN)
    server_records = [r for r in caplog.records if not r.name.startswith("websockets.client")]
    text = "\n".join(r.getMessage() for r in server_records)
    assert "GET /v1/twilio" in text and "X-Twilio-Signature" in text, "the test must see websockets' header log"
    for secret in (good, bad):
        assert secret not in text, "an X-Twilio-Signature in the server log"
