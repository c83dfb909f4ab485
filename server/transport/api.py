"""The HTTP API for recordings: OpenAI's `POST /v1/audio/transcriptions` and `GET /v1/models`.

Served by aiohttp on its own port (`api.port`, the main port + 1 by default) on the same
event loop as the WebSocket listener: websockets' server owns the main port's connections
and reads no request bodies, and an upload is a request body. Access is the main port's
(server/transport/access.py: token, Origins, TLS); a browser page of an allowed Origin
also gets the CORS headers it needs to read the answer.

An upload is spooled to a temporary file as it arrives (never held in memory whole), then
transcribed by a ``FileJob`` (server/files/job.py): decoded in a worker thread, cut at
pauses, batched at the lowest priority with every other recording's segments, stitched
back in order. With ``stream=true`` the answer is server-sent events, one per segment as
soon as it and every earlier one are done. A client that goes away cancels its job's
queued work. Errors are OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Awaitable, Callable

from aiohttp import BodyPartReader, web
from websockets.datastructures import Headers
from websockets.http11 import Request as WsRequest

from server import incidents
from server.files import formats
from server.files.job import FileError, FileJob, FileTranscript, Segment, segment_settings
from server.runners.base import ItemOptions
from server.spacing import joiner
from server.stream_config import language_list
from server.transport.access import API, find_door
from server.vad.endpointer import EndpointerSettings

if TYPE_CHECKING:
    from server.app import ChorusServer

log = logging.getLogger(__name__)

TRANSCRIPTIONS_PATH = "/v1/audio/transcriptions"
MODELS_PATH = "/v1/models"
_CHUNK = 1 << 16
_SPOOL_IN_MEMORY = 1 << 20  # uploads up to this stay in memory; larger ones go to disk
_FIELD_LIMIT = 64 << 10  # bytes of one non-file form field (a prompt is the longest)
_RETRY_SPOOL_S = 5  # Retry-After when the spool is full: uploads in progress take seconds to finish
# Model names a request may always give, besides `api.model_names` and the runner's own name.
_OWN_MODEL = "chorus"
_ROUTES = frozenset({TRANSCRIPTIONS_PATH, MODELS_PATH, "/healthz", "/livez"})
_CREATED = 1735689600  # `created` of the listed models: a fixed date, there is no release to date them by


class ApiError(Exception):
    """An HTTP error in OpenAI's shape."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 kind: str = "invalid_request_error", retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.param, self.kind, self.retry_after = status, code, param, kind, retry_after

    def response(self) -> web.Response:
        resp = web.json_response(error_body(str(self), self.code, self.param, self.kind), status=self.status)
        if self.retry_after is not None:
            resp.headers["Retry-After"] = str(self.retry_after)
        return resp


def error_body(message: str, code: str, param: str | None = None, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


@dataclass(frozen=True)
class TranscriptionRequest:
    """The form fields of one request, checked."""

    model: str
    language: str
    response_format: str
    words: bool  # timestamp_granularities[] has `word`
    segments: bool  # verbose_json lists segments (the default, or `segment` asked for)
    stream: bool
    prompt: str


class ApiServer:
    def __init__(self, app: "ChorusServer") -> None:
        self.app = app
        self.config = app.config
        self._executor = ThreadPoolExecutor(self.config.files.decode_threads, thread_name_prefix="file-decode")
        self._jobs: set[asyncio.Task] = set()  # transcription requests in progress
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._port: int | None = None
        self._requests = app.metrics.api_requests
        self._secure = bool(self.config.server.tls_cert)
        self._per_address: dict[str, int] = {}  # transcription requests in progress per client address
        self._spooled = 0  # bytes of the uploads in progress together (api.max_spool_bytes)

    # ------------------------------------------------------------------ lifecycle
    async def start(self, port: int, ssl: Any) -> None:
        web_app = web.Application(middlewares=[self._guard], client_max_size=_FIELD_LIMIT)
        web_app.router.add_post(TRANSCRIPTIONS_PATH, self._transcriptions)
        web_app.router.add_get(MODELS_PATH, self._models)
        web_app.router.add_get(MODELS_PATH + "/{model}", self._model)
        web_app.router.add_get("/healthz", self._healthz)
        web_app.router.add_get("/livez", self._livez)
        web_app.router.add_route("OPTIONS", "/{tail:.*}", self._preflight)
        # A client that hangs up cancels its handler, and with it its job's queued segments.
        self._runner = web.AppRunner(web_app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, self.config.server.host, port, ssl_context=ssl)
        await self._site.start()
        self._port = self._runner.addresses[0][1]

    @property
    def port(self) -> int:
        assert self._port is not None, "not started"
        return self._port

    async def stop(self, timeout: float) -> None:
        """Let running transcriptions finish within ``timeout`` (the batcher is still running;
        new requests meanwhile get 503 from the drain, as streams do), then close."""
        if self._jobs:
            log.info("waiting for %d transcription(s) to finish", len(self._jobs))
            _, late = await asyncio.wait(list(self._jobs), timeout=timeout)
            if late:
                log.warning("%d transcription(s) not finished within the shutdown timeout; cancelling them", len(late))
        if self._site is not None:
            await self._site.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ middleware
    @web.middleware
    async def _guard(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """Access (each door's guards: Host, token, Origin; server/transport/access.py DOORS),
        CORS for allowed browser Origins, OpenAI-shaped errors, and nothing a request does
        escapes as a traceback."""
        route = MODELS_PATH if request.path.startswith(MODELS_PATH) else request.path if request.path in _ROUTES else "other"
        status = 500
        try:
            # A preflight's door needs no token (a browser cannot send one with it).
            door = find_door(API, request.path, request.method)
            denied = self.app.access.guard(door, _as_ws_request(request), request.path, self._secure)
            if denied is not None:
                body = json.loads(denied.body or b"{}")
                kind = {401: "authentication_error", 421: "invalid_request_error"}.get(denied.status_code, "permission_error")
                raise ApiError(denied.status_code, body.get("message", "refused"), body.get("error", "refused"), kind=kind)
            response = await handler(request)
            status = response.status
        except ApiError as e:
            response = e.response()
            status = e.status
        except web.HTTPException as e:  # aiohttp's own: 404, 405, 413 ...
            status = e.status
            response = web.json_response(error_body(e.reason, e.reason.lower().replace(" ", "_")), status=e.status)
        except asyncio.CancelledError:
            status = 499  # the client went away
            raise
        except Exception as exc:  # noqa: BLE001 - a bug fails this request only
            incident = incidents.report(log, "API request %s failed", exc, request.path)
            response = ApiError(500, f"internal server error (incident {incident})", "internal", kind="server_error").response()
        finally:
            self._requests.labels(route, str(status)).inc()
        if not response.prepared:  # a streamed answer got them before its headers went
            response.headers.update(self._cors(request))
        return response

    def _browser_allowed(self, request: web.Request) -> bool:
        """A browser page (it sent an Origin) whose Origin may use this server."""
        return bool(request.headers.get("Origin")) and self.app.access.origin_allowed(_as_ws_request(request), self._secure)

    def _cors(self, request: web.Request) -> dict[str, str]:
        """The CORS headers that let an allowed browser Origin's script read the answer."""
        if self._browser_allowed(request):
            return {"Access-Control-Allow-Origin": request.headers["Origin"], "Vary": "Origin"}
        return {}

    async def _preflight(self, request: web.Request) -> web.Response:
        """CORS preflight (a browser asks before sending Authorization): allowed Origins only."""
        if not self._browser_allowed(request):
            raise ApiError(403, "this Origin may not use this server; list it in server.allowed_origins", "forbidden_origin",
                           kind="permission_error")
        return web.Response(status=204, headers={
            "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
            "Access-Control-Allow-Headers": "Authorization, Content-Type",
            "Access-Control-Max-Age": "600",
        })

    # ------------------------------------------------------------------ small routes
    async def _healthz(self, request: web.Request) -> web.Response:
        # Ready for recordings: they are never refused for live capacity (`accepting`), only
        # while loading, broken or draining.
        info = self.app.health()
        return web.json_response(info, status=200 if info["ready"] and not info["draining"] else 503)

    async def _livez(self, request: web.Request) -> web.Response:
        reason = self.app.liveness()
        return web.json_response({"live": reason is None, "reason": reason}, status=200 if reason is None else 503)

    def model_names(self) -> list[str]:
        names = list(self.config.api.model_names) + [_OWN_MODEL, self.app.runner.name]
        return list(dict.fromkeys(names))

    def _model_entry(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": _CREATED, "owned_by": "chorus"}

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_entry(n) for n in self.model_names()]})

    async def _model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name not in self.model_names():
            raise ApiError(404, f"the model {name[:100]!r} does not exist", "model_not_found", "model")
        return web.json_response(self._model_entry(name))

    # ------------------------------------------------------------------ transcriptions
    async def _transcriptions(self, request: web.Request) -> web.StreamResponse:
        refusal = self.app.availability()
        if refusal is not None:
            raise ApiError(503, refusal.message, "unavailable", kind="server_error", retry_after=refusal.retry_after_s or 1)
        if len(self._jobs) >= self.config.api.max_concurrent_requests:
            raise ApiError(503, "too many transcriptions in progress; try again shortly", "overloaded",
                           kind="server_error", retry_after=1)
        # Behind a proxy every client has the proxy's address (the knob's doc says so).
        address = request.remote or ""
        per_address = self.config.api.max_requests_per_address
        if per_address and self._per_address.get(address, 0) >= per_address:
            raise ApiError(429, f"too many transcriptions in progress from this address (at most {per_address}, "
                           "api.max_requests_per_address); try again when one has finished", "rate_limit_exceeded",
                           kind="requests", retry_after=1)
        task = asyncio.current_task()
        assert task is not None
        self._jobs.add(task)
        self._per_address[address] = self._per_address.get(address, 0) + 1
        spool = _Spool(self)
        try:
            with tempfile.SpooledTemporaryFile(_SPOOL_IN_MEMORY) as upload:
                try:
                    fields = await self._read_form(request, upload, spool)
                except _BodyTimeout as e:
                    return await self._cut(request, e)
                req = self._check(fields, uploaded="file" in fields)
                upload.seek(0)
                return await self._run(request, req, upload)
        finally:
            spool.release()
            self._jobs.discard(task)
            left = self._per_address.pop(address) - 1
            if left:
                self._per_address[address] = left

    async def _cut(self, request: web.Request, e: "_BodyTimeout") -> web.StreamResponse:
        """A body that arrives too slowly: 408, then the connection is closed at once (aiohttp
        would otherwise go on reading the rest of the body for a while, to be polite)."""
        response = e.response()
        response.force_close()
        response.headers.update(self._cors(request))
        await response.prepare(request)
        await response.write_eof()
        request.protocol.force_close()
        return response

    async def _read_form(self, request: web.Request, upload: IO[bytes], spool: "_Spool") -> dict[str, list[str]]:
        """The multipart form's fields; the `file` part's bytes go to ``upload``, streamed. Every
        read is timed (`_BodyClock`); the fields are bounded in number and in bytes together."""
        if not request.content_type.startswith("multipart/"):
            raise ApiError(400, "send the request as multipart/form-data with a `file` field", "invalid_request")
        cfg = self.config.api
        limit = cfg.max_upload_bytes
        clock = _BodyClock(cfg)
        fields: dict[str, list[str]] = {}
        count = field_bytes = 0
        try:
            reader = await request.multipart()
            # reader.next() reads the next part's headers (and skips what is left of the last part).
            while (part := await clock.read(reader.next())) is not None:
                if not (isinstance(part, BodyPartReader) and part.name == "file"):
                    count += 1  # every part but the file counts, nameless or nested ones too
                    if count > cfg.max_form_fields:
                        raise ApiError(400, f"more than {cfg.max_form_fields} form fields besides `file` "
                                       "(api.max_form_fields)", "too_many_fields")
                if not isinstance(part, BodyPartReader) or part.name is None:
                    continue
                if part.name == "file":
                    if "file" in fields:
                        raise ApiError(400, "send one `file`", "invalid_request", "file")
                    size = 0
                    while chunk := await clock.read(part.read_chunk(_CHUNK)):
                        size += len(chunk)
                        if size > limit:
                            raise ApiError(413, f"the file is larger than this server's limit of {limit} bytes "
                                           "(api.max_upload_bytes)", "file_too_large", "file")
                        spool.take(len(chunk))
                        upload.write(chunk)
                    if size == 0:
                        raise ApiError(400, "the file is empty", "invalid_file", "file")
                    fields["file"] = [part.filename or ""]
                    continue
                value = bytearray()
                while chunk := await clock.read(part.read_chunk(_CHUNK)):
                    value += chunk
                    field_bytes += len(chunk)
                    if len(value) > _FIELD_LIMIT:
                        raise ApiError(400, f"the field {part.name[:40]!r} is longer than {_FIELD_LIMIT} bytes",
                                       "invalid_request", part.name[:40])
                    if field_bytes > cfg.max_form_bytes:
                        raise ApiError(413, f"the form fields besides `file` are larger than {cfg.max_form_bytes} "
                                       "bytes together (api.max_form_bytes)", "fields_too_large", part.name[:40])
                fields.setdefault(part.name, []).append(value.decode("utf-8", "replace"))
        except (ValueError, AssertionError, UnicodeDecodeError) as e:  # aiohttp's malformed multipart
            raise ApiError(400, f"malformed multipart body ({type(e).__name__})", "invalid_request") from None
        return fields

    def _check(self, fields: dict[str, list[str]], uploaded: bool) -> TranscriptionRequest:
        def one(name: str, default: str = "") -> str:
            values = fields.get(name) or fields.get(name + "[]") or [default]
            return values[-1].strip()

        if not uploaded:
            raise ApiError(400, "the `file` field is required", "invalid_request", "file")
        model = one("model")
        if not model:
            raise ApiError(400, "the `model` field is required (e.g. whisper-1)", "invalid_request", "model")
        if model not in self.model_names():
            raise ApiError(400, f"the model {model[:100]!r} does not exist; use one of: {', '.join(self.model_names())}",
                           "model_not_found", "model")
        response_format = one("response_format", "json") or "json"
        if response_format not in formats.FORMATS:
            raise ApiError(400, f"response_format {response_format[:40]!r} is not supported; use one of: "
                           f"{', '.join(formats.FORMATS)}", "invalid_value", "response_format")
        language = one("language", "auto").lower() or "auto"
        supported = self.app.runner.languages()
        if supported is not None and language not in supported:
            raise ApiError(400, f"language {language[:20]!r} is not supported by this model; use one of: "
                           f"{language_list(supported)}", "unsupported_language", "language")
        granularities = {g.strip() for name in ("timestamp_granularities[]", "timestamp_granularities")
                         for g in fields.get(name, []) for g in g.split(",") if g.strip()}
        if granularities - {"word", "segment"}:
            raise ApiError(400, "timestamp_granularities[] takes `word` and `segment`", "invalid_value",
                           "timestamp_granularities")
        stream = one("stream", "false").lower()
        if stream not in ("true", "false", "1", "0", ""):
            raise ApiError(400, "stream must be true or false", "invalid_value", "stream")
        temperature = one("temperature", "0")
        try:
            float(temperature or 0)
        except ValueError:
            raise ApiError(400, "temperature must be a number", "invalid_value", "temperature") from None
        return TranscriptionRequest(
            model=model, language=language, response_format=response_format,
            words="word" in granularities, segments=not granularities or "segment" in granularities,
            stream=stream in ("true", "1"), prompt=one("prompt"),
        )

    async def _run(self, request: web.Request, req: TranscriptionRequest, upload: IO[bytes]) -> web.StreamResponse:
        # Words cost an alignment pass: computed when asked for, and for subtitles (cues are cut at word gaps).
        words = req.words or req.response_format in ("srt", "vtt") or req.stream
        options = ItemOptions(language=req.language, words=words)
        settings = segment_settings(self.config.vad, self.config.files, self.app.runner.max_item_seconds)
        if req.stream:
            return await self._stream(request, req, options, settings, upload)
        job = FileJob(self.app.batcher, settings, self.config.files, options)
        t0 = time.monotonic()
        transcript = await self._transcribe(job, upload)
        log.info("transcribed %.1f s of audio in %.1f s (%d segments)", transcript.duration_s,
                 time.monotonic() - t0, len(transcript.segments))
        fmt = req.response_format
        if fmt == "json":
            return web.json_response(formats.as_json(transcript))
        if fmt == "verbose_json":
            return web.json_response(formats.as_verbose_json(transcript, words=req.words, segments=req.segments))
        text = {"text": formats.as_text, "srt": formats.as_srt, "vtt": formats.as_vtt}[fmt](transcript)
        return web.Response(text=text, content_type="text/plain", charset="utf-8")

    async def _transcribe(self, job: FileJob, upload: IO[bytes]) -> FileTranscript:
        try:
            transcript = await job.run(upload, self._executor)
        except FileError as e:
            raise _file_error(e) from None
        self.app.metrics.file_audio_seconds.inc(transcript.duration_s)
        return transcript

    async def _stream(self, request: web.Request, req: TranscriptionRequest, options: ItemOptions,
                      settings: EndpointerSettings, upload: IO[bytes]) -> web.StreamResponse:
        """Server-sent events: a `transcript.text.delta` per segment, in order, as it finishes
        (with the segment itself, times in seconds, as a Chorus extension), then
        `transcript.text.done`; an `error` event if the job fails once the stream has begun."""
        events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        shown = ""

        def on_segment(s: Segment) -> None:
            nonlocal shown
            if not s.text and not s.error:
                return
            delta = joiner(shown, s.text) + s.text
            shown += delta
            segment = formats.segment_json(s)
            if req.words:
                segment["words"] = [formats.word_json(w) for w in s.words or ()]
            events.put_nowait({"type": "transcript.text.delta", "delta": delta, "segment": segment})

        job = FileJob(self.app.batcher, settings, self.config.files, options, on_segment=on_segment)
        running = asyncio.ensure_future(self._transcribe(job, upload))
        running.add_done_callback(lambda _t: events.put_nowait(None))
        first = await events.get()
        if first is None and running.exception() is not None:
            # Nothing sent yet: a bad file is still a plain HTTP error.
            raise running.exception()  # type: ignore[misc]
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                               **self._cors(request)})
        await response.prepare(request)
        try:
            event = first
            while event is not None:
                await response.write(_sse(event))
                event = await events.get()
            exc = running.exception()
            if exc is None:
                done = running.result()
                # `usage` in the duration form of OpenAI's non-streamed answers (their streamed
                # `done` counts tokens, which a duration-billed model has none of).
                await response.write(_sse({"type": "transcript.text.done", "text": done.text,
                                           "usage": {"type": "duration", "seconds": round(done.duration_s, 3)}}))
            else:
                err = exc if isinstance(exc, ApiError) else ApiError(500, "internal server error", "internal", kind="server_error")
                await response.write(_sse({"type": "error", **error_body(str(err), err.code, err.param, err.kind)}))
            await response.write_eof()
        finally:
            running.cancel()
        return response


class _BodyTimeout(ApiError):
    def __init__(self, message: str) -> None:
        super().__init__(408, message, "request_timeout")


class _BodyClock:
    """How long a request body may take (Apache's mod_reqtimeout model): `body_timeout_s`, plus
    1 s for every `min_body_rate` bytes that arrived, at most `max_body_s` in all. An upload
    that trickles cannot hold a request slot (and its spool) for long."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.start = time.monotonic()
        self.received = 0

    def deadline(self) -> float:
        cfg = self.cfg
        return self.start + min(cfg.max_body_s, cfg.body_timeout_s + self.received / cfg.min_body_rate)

    async def read(self, reading: Awaitable[Any]) -> Any:
        """``reading`` (a read of the body), cut at the deadline."""
        try:
            async with asyncio.timeout(max(0.0, self.deadline() - time.monotonic())):
                got = await reading
        except TimeoutError:
            took = time.monotonic() - self.start
            cfg = self.cfg
            raise _BodyTimeout(f"the request body arrived too slowly ({self.received} bytes in {took:.1f} s; this "
                               f"server needs {cfg.min_body_rate} bytes/s after the first {cfg.body_timeout_s:g} s "
                               f"and the whole body within {cfg.max_body_s:g} s: api.min_body_rate, "
                               "api.body_timeout_s, api.max_body_s)") from None
        if isinstance(got, (bytes, bytearray)):
            self.received += len(got)
        return got


class _Spool:
    """One request's share of `api.max_spool_bytes`: the bytes of all uploads in progress together."""

    def __init__(self, api: ApiServer) -> None:
        self.api = api
        self.taken = 0

    def take(self, n: int) -> None:
        limit = self.api.config.api.max_spool_bytes
        if self.api._spooled + n > limit:
            raise ApiError(507, f"the uploads in progress fill this server's spool ({limit} bytes, "
                           "api.max_spool_bytes); try again shortly", "insufficient_storage",
                           kind="server_error", retry_after=_RETRY_SPOOL_S)
        self.api._spooled += n
        self.taken += n

    def release(self) -> None:
        self.api._spooled -= self.taken
        self.taken = 0


def _as_ws_request(request: web.Request) -> WsRequest:
    """The request as server/transport/access.py reads one (websockets' form)."""
    return WsRequest(request.path_qs, Headers(list(request.headers.items())))


def _sse(event: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


def _file_error(e: FileError) -> ApiError:
    if e.code == "too_long":
        return ApiError(413, f"{e}: this server's limit (files.max_audio_s)", "audio_too_long", "file")
    if e.code == "bad_file":
        return ApiError(400, f"the file could not be decoded: {e}", "invalid_file", "file")
    return ApiError(503, str(e), e.code, kind="server_error", retry_after=5)
