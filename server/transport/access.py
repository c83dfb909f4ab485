"""Who may connect: token auth, allowed browser Origins, and the TLS context.

``AccessPolicy.check`` runs in ``process_request``, before the WebSocket upgrade: a
refused client gets a plain HTTP 401 or 403 with a JSON body and never gets a
WebSocket, a session or any share of the model, and a browser sees a failed handshake
(the only refusal a page's JavaScript can observe) instead of an open socket that
closes at once.

- Token auth (off unless a token is configured): ``Authorization: Bearer <token>`` or
  ``?token=<token>`` (browsers cannot set headers on a WebSocket). Compared in constant
  time against every configured token. /healthz and /livez are always open; /metrics
  needs a token only with ``server.metrics_require_token``. Tokens are never logged, and
  websockets' own debug log of the request line and headers is redacted.
- Origins: a browser page on another site must not be able to open streams (and spend
  this server's capacity) just because a user visits it. No ``Origin`` header (a
  non-browser client), the server's own origin, or one listed in
  ``server.allowed_origins`` (``*`` = any) may open streams; other Origins get 403.
- TLS: ``ssl_context`` builds the server context for wss:// and https:// on one port.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import ssl
from pathlib import Path
from typing import Iterable, Mapping
from urllib.parse import parse_qsl, urlsplit

from websockets.http11 import Request, Response

from server.config import ConfigError, ServerConfig

log = logging.getLogger(__name__)

TOKENS_ENV = "CHORUS_AUTH_TOKENS"
# Always open: orchestrator probes must not need a secret.
OPEN_PATHS = frozenset({"/healthz", "/livez"})
METRICS_PATH = "/metrics"
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}

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
        policy = cls(tokens, metrics_require_token=cfg.metrics_require_token, allowed_origins=cfg.allowed_origins)
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
        """None if this request may go on to its route, else the 401/403 response.

        ``path`` is ``request.path`` without the query; ``secure`` says whether the listener
        uses TLS (the server's own origin is then https://, else http://). Every path but
        /healthz, /livez and /metrics (streams and unknown paths alike) needs the token when
        auth is on, and an allowed Origin (or none).
        """
        if path in OPEN_PATHS:
            return None
        if path == METRICS_PATH:
            return self._check_token(request, path) if self.metrics_require_token else None
        refusal = self._check_token(request, path)
        if refusal is not None:
            return refusal
        return self.check_origin(request, path, secure)

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
)


class _RedactTokens(logging.Filter):
    """Rewrites a record whose text holds a ``token=`` query value or an Authorization value."""

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
    each request line (``GET /v1/stream?token=...``) and every header (Authorization) on
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
