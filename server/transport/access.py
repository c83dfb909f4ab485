"""Who may connect: token auth, allowed browser Origins, and the TLS context.

``AccessPolicy.check`` runs in ``process_request``, before the WebSocket upgrade: a
refused client gets a plain HTTP 401 or 403 with a JSON body and never gets a
WebSocket, a session or any share of the model, and a browser sees a failed handshake
(the only refusal a page's JavaScript can observe) instead of an open socket that
closes at once.

- Token auth (off unless a token is configured): ``Authorization: Bearer <token>`` or
  ``?token=<token>`` (browsers cannot set headers on a WebSocket). Compared in constant
  time against every configured token. /healthz and /livez are always open (orchestrator
  probes must not need a secret); /metrics needs a token only with
  ``server.metrics_require_token``. Tokens are never logged, and
  websockets' own debug log of the request line and headers is redacted.
- Origins: a browser page on another site must not be able to open streams (and spend
  this server's capacity) just because a user visits it. No ``Origin`` header (a
  non-browser client), the server's own origin, or one listed in
  ``server.allowed_origins`` (``*`` = any) may open streams; other Origins get 403.
- Hosts: a page on another site can make the browser's name for this server point at it
  (DNS rebinding) and so talk to it as "its own origin". Only known ``Host`` names are
  answered, on every port: the loopback names, IP addresses when the server is bound to a
  non-loopback address (an address cannot be rebound, and orchestrator probes send one), and
  ``server.allowed_hosts`` (``*`` = any). Others get 421.
- TLS: ``ssl_context`` builds the server context for wss:// and https:// on one port.

``DOORS`` is the one table of every way in (listener, path) and the guards each one has;
``AccessPolicy.guard`` applies a door's guards, so the table is what the listeners enforce
(tests/test_doors.py tries every door with and without each credential).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import logging
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping
from urllib.parse import parse_qsl, urlsplit

from websockets.http11 import Request, Response

from server.config import ConfigError, ServerConfig

log = logging.getLogger(__name__)

TOKENS_ENV = "CHORUS_AUTH_TOKENS"
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
_HOST_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*\.?")

# ---------------------------------------------------------------------- doors
# What guards a door, in the order they are checked.
HOST = "host"  # a known Host name (421 otherwise)
TOKEN = "token"  # a token when auth is on (401)
METRICS_TOKEN = "token if server.metrics_require_token"  # (401)
TWILIO = "X-Twilio-Signature, or a token without a Twilio Auth Token"  # (403 / 401)
ORIGIN = "origin"  # no Origin, the server's own, or a listed one (403)
PEERS = "audiosocket.allowed_peers"  # the peer's address (connection closed unread)

MAIN, FUNASR, API, AUDIOSOCKET = "main", "funasr", "api", "audiosocket"


@dataclass(frozen=True)
class Door:
    """One way in: a listener, a path pattern (exact; ``{name}`` is one path segment; a trailing
    ``*`` is any rest, alone it is every path), the HTTP methods it takes (none named: any) and
    its guards."""

    name: str
    listener: str
    path: str
    guards: tuple[str, ...]
    serves: str
    methods: tuple[str, ...] = ()
    routed: bool = True  # False: the listener's catch-all for paths it has no route for

    def matches(self, listener: str, path: str, method: str | None = None) -> bool:
        if listener != self.listener or (self.methods and method not in self.methods):
            return False
        return _path_re(self.path).fullmatch(path) is not None


@functools.lru_cache(maxsize=None)
def _path_re(pattern: str) -> re.Pattern[str]:
    rest = pattern.endswith("*")
    body = re.sub(r"\\\{[^}]*\\\}", "[^/]+", re.escape(pattern[:-1] if rest else pattern))
    return re.compile(body + (".*" if rest else ""))


_STREAM = (HOST, TOKEN, ORIGIN)
_GET = ("GET", "HEAD")
# Every door of every listener. A listener asks ``find_door`` which door a request came in by
# and applies that door's guards; a path no door names gets the listener's catch-all (Host,
# token and Origin, then "no such route"), so an unknown path tells an unauthenticated client
# nothing.
DOORS: tuple[Door, ...] = (
    Door("stream", MAIN, "/v1/stream", _STREAM, "native streams (docs/protocol.md)"),
    Door("realtime", MAIN, "/v1/realtime", _STREAM, "OpenAI Realtime transcription streams"),
    Door("calls", MAIN, "/v1/calls", _STREAM, "call event subscriptions (every call's words with call_id=*)"),
    Door("twilio", MAIN, "/v1/twilio", (HOST, TWILIO, ORIGIN), "Twilio Media Streams"),
    Door("page", MAIN, "/", (HOST,), "the captioning page (static; it asks for the token itself)"),
    Door("page index", MAIN, "/index.html", (HOST,), "the captioning page"),
    Door("page files", MAIN, "/static/*", (HOST,), "the page's static files"),
    Door("healthz", MAIN, "/healthz", (HOST,), "readiness probe"),
    Door("livez", MAIN, "/livez", (HOST,), "liveness probe"),
    Door("metrics", MAIN, "/metrics", (HOST, METRICS_TOKEN), "Prometheus metrics"),
    Door("main other", MAIN, "*", _STREAM, "404", routed=False),
    # FunASR clients connect to any path (usually `/`): every path, /healthz too, is a stream.
    Door("funasr", FUNASR, "*", _STREAM, "FunASR-compatible streams, on every path"),
    Door("transcriptions", API, "/v1/audio/transcriptions", _STREAM, "file transcription", methods=("POST",)),
    Door("models", API, "/v1/models", _STREAM, "model list", methods=_GET),
    Door("model", API, "/v1/models/{model}", _STREAM, "one model", methods=_GET),
    Door("api healthz", API, "/healthz", (HOST,), "readiness probe for recordings", methods=_GET),
    Door("api livez", API, "/livez", (HOST,), "liveness probe", methods=_GET),
    # A browser's preflight cannot carry Authorization: it is answered for allowed Origins only.
    Door("api preflight", API, "*", (HOST, ORIGIN), "CORS preflight", methods=("OPTIONS",)),
    Door("api other", API, "*", _STREAM, "405 (every path has the preflight route), after the guards", routed=False),
    Door("audiosocket", AUDIOSOCKET, "*", (PEERS,), "Asterisk AudioSocket calls (raw TCP)"),
)


def find_door(listener: str, path: str, method: str | None = None) -> Door:
    """The door a request to ``path`` (no query) on ``listener`` comes in by."""
    for door in DOORS:
        if door.matches(listener, path, method):
            return door
    raise LookupError(f"no door for {listener} {path}")  # every listener has a catch-all door


# (scheme, host, port) with the scheme and host lower-cased and a default port filled in.
OriginKey = tuple[str, str, int | None]


def _origin_key(value: str) -> OriginKey | None:
    """``scheme://host[:port]`` normalised for comparison, or None if it is not such an origin."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:  # a bad port or a malformed IPv6 literal
        return None
    if not parts.scheme or not parts.hostname or parts.username is not None or parts.password is not None:
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        return None
    scheme = parts.scheme.lower()
    return scheme, parts.hostname.lower(), port if port is not None else _DEFAULT_PORTS.get(scheme)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _digest(token: str) -> bytes:
    # Compare fixed-length digests, so the comparison time says nothing about a token's length either.
    return hashlib.sha256(token.encode("utf-8", "backslashreplace")).digest()


class AccessPolicy:
    """Token and Origin rules for one server; built once at startup by ``from_config``."""

    def __init__(
        self,
        tokens: Iterable[str] = (),
        *,
        metrics_require_token: bool = False,
        allowed_origins: Iterable[str] = (),
        allowed_hosts: Iterable[str] = (),
        bind_host: str = "127.0.0.1",
    ) -> None:
        # Only digests are kept: the tokens themselves never sit in a repr, a traceback or a log.
        self._digests = tuple(_digest(t) for t in tokens)
        self.metrics_require_token = metrics_require_token
        self._any_origin = False
        allowed: set[OriginKey] = set()
        for i, entry in enumerate(allowed_origins):
            if entry.strip() == "*":
                self._any_origin = True
                continue
            key = _origin_key(entry)
            if key is None:
                raise ConfigError(
                    f"server.allowed_origins[{i}]: {entry!r} is not an origin; write scheme://host[:port] "
                    "with no path, e.g. https://captions.example.com (or * for any)"
                )
            allowed.add(key)
        self._allowed = frozenset(allowed)
        self._any_host = False
        hosts: set[str] = set(LOOPBACK_NAMES)
        for i, entry in enumerate(allowed_hosts):
            name = entry.strip().lower()
            if name == "*":
                self._any_host = True
                continue
            if name.startswith("[") and name.endswith("]"):
                name = name[1:-1]
            if not (_HOST_NAME_RE.fullmatch(name) or _ip(name) is not None):
                raise ConfigError(
                    f"server.allowed_hosts[{i}]: {entry!r} is not a host name; write the name alone, with no "
                    "scheme, port or path, e.g. asr.example.com (or * for any)"
                )
            hosts.add(name.rstrip("."))
        self._hosts = frozenset(hosts)
        # Bound to a non-loopback address, the server is reached by its addresses too (an
        # orchestrator's probe sends Host: <pod IP>:<port>); an IP address cannot be rebound.
        bind = _ip(bind_host.strip("[]"))
        self._any_ip = bind_host.strip().lower() != "localhost" and (bind is None or not bind.is_loopback)

    @classmethod
    def from_config(cls, cfg: ServerConfig, environ: Mapping[str, str]) -> "AccessPolicy":
        """Tokens from ``cfg.auth_tokens_file`` and ``environ[CHORUS_AUTH_TOKENS]``.

        Raises ConfigError for a configured token file that is missing, unreadable or holds
        no token, and for a non-empty environment variable that holds no token: a typo must
        not silently turn auth off. Also redacts tokens from websockets' debug log.
        """
        tokens: list[str] = []
        sources: list[str] = []
        if cfg.auth_tokens_file:
            path = Path(cfg.auth_tokens_file).expanduser()
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                why = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
                raise ConfigError(f"server.auth_tokens_file: cannot read {str(path)!r}: {why}") from None
            found = [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]
            if not found:
                raise ConfigError(
                    f"server.auth_tokens_file: {str(path)!r} holds no token (one per line; blank lines and "
                    "# comments are ignored)"
                )
            tokens += found
            sources.append(f"{len(found)} from {path}")
        raw = environ.get(TOKENS_ENV, "")
        if raw.strip():
            found = [s.strip() for s in raw.split(",") if s.strip()]
            if not found:
                raise ConfigError(f"${TOKENS_ENV} is set but holds no token (comma-separated tokens expected)")
            tokens += found
            sources.append(f"{len(found)} from ${TOKENS_ENV}")
        policy = cls(tokens, metrics_require_token=cfg.metrics_require_token, allowed_origins=cfg.allowed_origins,
                     allowed_hosts=cfg.allowed_hosts, bind_host=cfg.host)
        redact_tokens_in_logs()
        if policy.auth_enabled:
            log.info("token auth on: %d token(s) (%s); /metrics %s", len(set(tokens)), ", ".join(sources),
                     "needs a token" if cfg.metrics_require_token else "is open")
        else:
            log.info("token auth off (no server.auth_tokens_file, no $%s)", TOKENS_ENV)
            if cfg.metrics_require_token:
                log.warning("server.metrics_require_token has no effect: token auth is off")
        return policy

    @property
    def auth_enabled(self) -> bool:
        return bool(self._digests)

    def check(self, request: Request, path: str, secure: bool) -> Response | None:
        """None if this request to the main port may go on to its route, else the refusal.

        ``path`` is ``request.path`` without the query; ``secure`` says whether the listener
        uses TLS (the server's own origin is then https://, else http://). The guards are the
        door's (``DOORS``); /v1/twilio is checked as the other streams are, by token.
        """
        return self.guard(find_door(MAIN, path), request, path, secure)

    def guard(self, door: Door, request: Request, path: str, secure: bool,
              twilio_signature: Callable[[], Response | None] | None = None) -> Response | None:
        """None if ``request`` may come in by ``door``, else the 421/401/403 response.
        ``twilio_signature`` checks X-Twilio-Signature where a Twilio Auth Token is configured;
        without one the Twilio door needs a token like the streams."""
        for g in door.guards:
            if g == HOST:
                refusal = self.check_host(request, path)
            elif g == TOKEN:
                refusal = self._check_token(request, path)
            elif g == METRICS_TOKEN:
                refusal = self._check_token(request, path) if self.metrics_require_token else None
            elif g == TWILIO:
                refusal = twilio_signature() if twilio_signature is not None else self._check_token(request, path)
            elif g == ORIGIN:
                refusal = self.check_origin(request, path, secure)
            else:  # PEERS belongs to a TCP listener, not to an HTTP request
                raise ValueError(f"door {door.name!r}: guard {g!r} cannot be checked on an HTTP request")
            if refusal is not None:
                return refusal
        return None

    # ------------------------------------------------------------------ hosts
    def host_allowed(self, request: Request) -> bool:
        """Whether the request's Host names this server (see the module docstring)."""
        hosts = request.headers.get_all("Host")
        if not hosts:
            return True  # HTTP/1.0 without Host: not a browser, so no rebinding page behind it
        if len(hosts) > 1 or self._any_host:
            return len(hosts) == 1
        try:
            parts = urlsplit("//" + hosts[0].strip())
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            return False
        name = (parts.hostname or "").rstrip(".")
        if not name or parts.username is not None or parts.path or parts.query:
            return False
        if name in self._hosts:
            return True
        return self._any_ip and _ip(name) is not None

    def check_host(self, request: Request, path: str) -> Response | None:
        if self.host_allowed(request):
            return None
        host = ", ".join(request.headers.get_all("Host"))
        log.info("refused %s: Host %r is not one of this server's names", path, host[:200])
        return _refuse(421, "Misdirected Request", "unknown_host",
                       f"Host {host[:200]!r} is not a name of this server; list it in server.allowed_hosts")

    # ------------------------------------------------------------------ tokens
    def _check_token(self, request: Request, path: str) -> Response | None:
        if not self.auth_enabled:
            return None
        candidates = _presented_tokens(request)
        if not candidates:
            log.info("refused %s: no token", path)
            return _refuse(401, "Unauthorized", "unauthorized",
                           "this server requires a token: send 'Authorization: Bearer <token>' or ?token=<token>",
                           www_authenticate="Bearer")
        if not self.token_valid(candidates):
            log.info("refused %s: invalid token", path)
            return _refuse(401, "Unauthorized", "unauthorized", "the token is not valid",
                           www_authenticate='Bearer error="invalid_token"')
        return None

    def token_valid(self, candidates: Iterable[str]) -> bool:
        """Whether any candidate is a configured token. Every candidate is compared with every
        token, in constant time, without stopping at a match."""
        ok = False
        for candidate in candidates:
            d = _digest(candidate)
            for t in self._digests:
                ok |= hmac.compare_digest(d, t)
        return ok

    # ------------------------------------------------------------------ origins
    def origin_allowed(self, request: Request, secure: bool) -> bool:
        origins = request.headers.get_all("Origin")
        if not origins:
            return True  # not a browser: an Origin check protects browsers' users only
        if len(origins) > 1:
            return False
        if self._any_origin:
            return True
        origin = _origin_key(origins[0])
        if origin is None:  # e.g. "null" (sandboxed frames, file:// pages)
            return False
        if origin in self._allowed:
            return True
        hosts = request.headers.get_all("Host")
        if len(hosts) != 1:
            return False
        # A page served by this server: same scheme, host and port as this request. The
        # page's origin is http(s)://, even though its socket's URL is ws(s)://.
        return origin == _origin_key(f"{'https' if secure else 'http'}://{hosts[0]}")

    def check_origin(self, request: Request, path: str, secure: bool) -> Response | None:
        if self.origin_allowed(request, secure):
            return None
        origin = ", ".join(request.headers.get_all("Origin"))
        log.info("refused %s: Origin %r is not allowed", path, origin[:200])
        return _refuse(403, "Forbidden", "forbidden_origin",
                       f"Origin {origin[:200]!r} may not open streams on this server; "
                       "list it in server.allowed_origins")


_BEARER_RE = re.compile(r"bearer(?:\s*;\s*|\s+)(\S.*)", re.IGNORECASE)


def _presented_tokens(request: Request) -> list[str]:
    out = []
    for value in request.headers.get_all("Authorization"):
        # `Bearer <token>`, and `Bearer; <token>` as some FunASR clients (xiaozhi-esp32-server)
        # write it.
        m = _BEARER_RE.fullmatch(value.strip())
        if m:
            out.append(m.group(1).strip())
    query = urlsplit(request.path).query
    out += [v for k, v in parse_qsl(query, keep_blank_values=True) if k == "token" and v]
    return out


def _refuse(status: int, reason: str, error: str, message: str, www_authenticate: str | None = None) -> Response:
    # Imported here: http.py is the router that calls this module, so a module-level import
    # would be a cycle as soon as it imports anything from here.
    from server.transport.http import json_response

    resp = json_response(status, reason, {"error": error, "message": message})
    if www_authenticate is not None:
        resp.headers["WWW-Authenticate"] = www_authenticate
    return resp


# ---------------------------------------------------------------------- logs
_SECRET_PATTERNS = (
    (re.compile(r"([?&]token=)[^&#\s]*", re.IGNORECASE), r"\1<redacted>"),
    (re.compile(r"(\bauthorization:\s*).*", re.IGNORECASE), r"\1<redacted>"),
    # Not a secret itself, but a credential for its URL: whoever reads it could replay it.
    (re.compile(r"(\bx-twilio-signature:\s*).*", re.IGNORECASE), r"\1<redacted>"),
)


class _RedactTokens(logging.Filter):
    """Rewrites a record whose text holds a ``token=`` query value, an Authorization value or an
    X-Twilio-Signature."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken record is the logging module's to report
            return True
        redacted = text
        for pattern, replacement in _SECRET_PATTERNS:
            redacted = pattern.sub(replacement, redacted)
        if redacted != text:
            record.msg, record.args = redacted, None
        return True


_REDACTOR = _RedactTokens()


def redact_tokens_in_logs(logger_name: str = "websockets.server") -> None:
    """Install (once) the redacting filter on a logger. With DEBUG logging, websockets logs
    each request line (``GET /v1/stream?token=...``) and every header (Authorization,
    X-Twilio-Signature) on
    ``websockets.server``, the logger ``serve`` uses unless given another."""
    logger = logging.getLogger(logger_name)
    if _REDACTOR not in logger.filters:
        logger.addFilter(_REDACTOR)


# ---------------------------------------------------------------------- TLS
def ssl_context(cfg: ServerConfig) -> ssl.SSLContext | None:
    """The server's TLS context (TLS 1.2 or later), or None without ``tls_cert``/``tls_key``."""
    if not cfg.tls_cert and not cfg.tls_key:
        return None
    if not cfg.tls_cert or not cfg.tls_key:
        raise ConfigError("server.tls_cert and server.tls_key must be given together")
    cert, key = Path(cfg.tls_cert).expanduser(), Path(cfg.tls_key).expanduser()
    for name, p in (("tls_cert", cert), ("tls_key", key)):
        if not p.is_file():
            raise ConfigError(f"server.{name}: {str(p)!r} is not a file")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2

    def no_passphrase() -> bytes:
        # Without a callback OpenSSL would prompt on the terminal and block startup.
        raise ConfigError(f"server.tls_key: {str(key)!r} is encrypted; give an unencrypted PEM key")

    try:
        ctx.load_cert_chain(cert, key, password=no_passphrase)
    except ConfigError:
        raise
    except ssl.SSLError as e:
        raise ConfigError(_tls_problem(cert, key, e)) from None
    except OSError as e:
        raise ConfigError(f"server.tls_cert/tls_key: cannot read {str(cert)!r} / {str(key)!r}: {e.strerror or e}") from None
    return ctx


def _tls_problem(cert: Path, key: Path, e: ssl.SSLError) -> str:
    """Say which file is wrong, as far as a look at the PEM armour tells."""
    def holds(p: Path, marker: str) -> bool:
        try:
            return marker in p.read_text(encoding="ascii", errors="replace")
        except OSError:
            return False

    if not holds(cert, "-----BEGIN CERTIFICATE-----"):
        return f"server.tls_cert: {str(cert)!r} is not a PEM certificate (-----BEGIN CERTIFICATE-----)"
    if not holds(key, "PRIVATE KEY-----"):
        return f"server.tls_key: {str(key)!r} is not a PEM private key (-----BEGIN PRIVATE KEY-----)"
    if e.reason in ("KEY_VALUES_MISMATCH", "KEY_TYPE_MISMATCH", "NO_CERTIFICATE_ASSIGNED"):
        return f"server.tls_key: {str(key)!r} is not the private key of the certificate in {str(cert)!r}"
    return f"server.tls_cert/tls_key: cannot load {str(cert)!r} with {str(key)!r}: {e.reason or e}"
