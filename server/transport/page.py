"""The live-captioning page served at ``GET /`` on the main port, and its static files.

The page (server/web/) is a handful of small files shipped with the package. They are read
once, on the first request, and kept in memory: nothing on disk is opened per request, and
only the files present at that moment can ever be served. A request names a file by a key
in that table, never by a path joined onto a directory, so ``/static/../server/app.py`` and
its encoded forms simply miss (404).

Every answer carries a Content-Security-Policy allowing this origin only (plus WebSocket
connections for the stream): the page loads no third-party code, styles or fonts, and
an injected script could not send captions elsewhere over HTTP. ``Cache-Control: no-cache``
makes browsers revalidate, so a server upgrade never runs an old script against a new server.

Nothing here is secret, so the HTTP router calls this before the token check: the page asks
for the token itself and sends it with its stream, where the check applies.
"""

from __future__ import annotations

import functools
import logging
import re
from pathlib import Path

from websockets.datastructures import Headers
from websockets.http11 import Response

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
STATIC_PREFIX = "/static/"
INDEX = "index.html"
PAGE_PATHS = frozenset({"/", "/index.html"})

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self'",
    "connect-src 'self' ws: wss:",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
])

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# File names a request may name: no separators, no leading dot (so no "..", no dotfiles).
_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")


@functools.cache
def _files() -> dict[str, tuple[bytes, str]]:
    """name -> (content, content type) for every servable file in server/web/, read once."""
    files: dict[str, tuple[bytes, str]] = {}
    try:
        entries = sorted(WEB_DIR.iterdir())
    except OSError as e:
        log.error("captioning page unavailable: cannot list %s: %s", WEB_DIR, e.strerror or e)
        return files
    for p in entries:
        ctype = _CONTENT_TYPES.get(p.suffix.lower())
        if ctype is None or not p.is_file() or not _NAME_RE.fullmatch(p.name):
            continue
        try:
            files[p.name] = (p.read_bytes(), ctype)
        except OSError as e:
            log.error("captioning page: cannot read %s: %s", p, e.strerror or e)
    if INDEX not in files:
        log.error("captioning page unavailable: %s has no %s", WEB_DIR, INDEX)
    return files


def _ok(body: bytes, content_type: str) -> Response:
    headers = Headers([
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Cache-Control", "no-cache"),
        ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
        ("X-Content-Type-Options", "nosniff"),
        # The page's own address may hold ?token=...; it must not travel in a Referer.
        ("Referrer-Policy", "no-referrer"),
    ])
    return Response(200, "OK", headers, body)


def _not_found(message: str) -> Response:
    # Imported here: server.transport.http imports this module, so a module-level import
    # would be a cycle.
    from server.transport.http import json_response

    return json_response(404, "Not Found", {"error": "not_found", "message": message})


def page_response(path: str) -> Response | None:
    """The page (or one of its static files) for ``path``, or None for any other path.

    ``path`` is the request path without its query. Paths under /static/ that name no
    file get a 404 JSON answer like the router's own; other paths are left to the router.
    """
    if path in PAGE_PATHS:
        page = _files().get(INDEX)
        if page is None:
            return _not_found("the captioning page is not installed on this server")
        return _ok(*page)
    if path.startswith(STATIC_PREFIX):
        name = path[len(STATIC_PREFIX):]
        entry = _files().get(name) if _NAME_RE.fullmatch(name) else None
        if entry is None:
            return _not_found("no such file")
        return _ok(*entry)
    return None
