"""`chorus transcribe`: recordings transcribed here (a local model) or by a running server.

Both ways produce a ``FileTranscript`` per file, so the CLI renders them alike (formats.py):

- ``LocalTranscriber`` runs the server's own file path in-process: a ``MicroBatcher`` over the
  loaded runner and one ``FileJob`` per file, so several files' segments share model calls.
- ``RemoteTranscriber`` sends each file to a server's OpenAI-compatible API
  (``POST /v1/audio/transcriptions``, ``stream=true``) and rebuilds the transcript from the
  server-sent events, one per finished segment.

``transcribe_files`` runs a few files at a time with either and yields their results in the
order given, each as soon as it and every earlier one are done. ``Progress`` draws a bar per
file on stderr (the end of the last finished segment over the file's probed duration).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import mimetypes
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Protocol, TextIO
from urllib.parse import urlsplit

import av

from server.batcher import MicroBatcher
from server.config import Config
from server.files import formats
from server.files.job import FileError, FileJob, FileTranscript, Segment, segment_settings
from server.metrics import Metrics
from server.runners.base import ItemOptions, ModelRunner, Word

log = logging.getLogger(__name__)

TRANSCRIPTIONS_PATH = "/v1/audio/transcriptions"
# Files sent to a server at once: enough that the server batches their segments together,
# few enough not to take all of a shared server's request slots.
REMOTE_CONCURRENCY = 4
# A segment of a recording waits behind live traffic (lowest priority), so the server may be
# silent a long while between two events; this only catches a server that has hung.
_READ_TIMEOUT_S = 600.0
_CONNECT_TIMEOUT_S = 10.0
_EVENT_LINE_LIMIT = 1 << 20  # one event is one segment and its words: a few KB


class TranscribeError(Exception):
    """One file could not be transcribed; the message is one line for the user."""


class ServerUnreachable(TranscribeError):
    """No file can be sent (connection refused, bad token): stop instead of failing each file."""


@dataclass(frozen=True)
class FileResult:
    path: Path
    transcript: FileTranscript | None
    error: str | None
    """Why the file as a whole failed (then ``transcript`` is None)."""
    compute_s: float


OnSegment = Callable[[Segment], None]


class Transcriber(Protocol):
    concurrency: int

    async def transcribe(self, path: Path, on_segment: OnSegment, duration_s: float | None) -> FileTranscript: ...


# ---------------------------------------------------------------------- local
class LocalTranscriber:
    """The server's file path in this process; use as ``async with``."""

    def __init__(self, runner: ModelRunner, config: Config, options: ItemOptions) -> None:
        self.runner = runner
        self.config = config
        self.options = options
        # One decode thread per file in progress (FileJob holds it for the whole decode).
        self.concurrency = max(1, config.files.decode_threads)
        self._settings = segment_settings(config.vad, config.files, runner.max_item_seconds)
        self._batcher: MicroBatcher | None = None
        self._executor: ThreadPoolExecutor | None = None

    async def __aenter__(self) -> "LocalTranscriber":
        self._batcher = MicroBatcher(self.runner, self.config.batcher, Metrics())
        self._batcher.start(asyncio.get_running_loop())
        self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="file-decode")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._batcher is not None:
            # stop() joins the worker, which may be inside a model call: off the loop.
            await asyncio.to_thread(self._batcher.stop)
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    async def transcribe(self, path: Path, on_segment: OnSegment, duration_s: float | None) -> FileTranscript:
        assert self._batcher is not None, "use LocalTranscriber as an async context manager"
        job = FileJob(self._batcher, self._settings, self.config.files, self.options, on_segment=on_segment)
        try:
            return await job.run(path, self._executor)
        except FileError as e:
            raise TranscribeError(str(e)) from None


# ---------------------------------------------------------------------- remote
def api_endpoint(url: str) -> str:
    """The transcriptions URL of a server given as ``http(s)://host:port`` (a path up to
    ``/v1/audio/transcriptions`` is kept). Raises ValueError for anything else."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--server expects http://host:port or https://host:port, got {url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith(TRANSCRIPTIONS_PATH):
        path += TRANSCRIPTIONS_PATH
    return f"{parts.scheme}://{parts.netloc}{path}"


class RemoteTranscriber:
    """Files sent to a Chorus server's HTTP API; use as ``async with``."""

    concurrency = REMOTE_CONCURRENCY

    def __init__(self, url: str, language: str, token: str | None = None) -> None:
        self.endpoint = api_endpoint(url)
        self.language = language
        self.token = token
        self._session: Any = None

    async def __aenter__(self) -> "RemoteTranscriber":
        import aiohttp

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=_CONNECT_TIMEOUT_S, sock_read=_READ_TIMEOUT_S)
        self._session = aiohttp.ClientSession(headers=headers, timeout=timeout, read_bufsize=_EVENT_LINE_LIMIT)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    def _form(self, path: Path, upload: Any) -> Any:
        import aiohttp

        form = aiohttp.FormData()
        # A file object is streamed from disk as the request is sent, never read whole.
        form.add_field("file", upload, filename=path.name,
                       content_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream")
        form.add_field("model", "whisper-1")
        if self.language and self.language != "auto":
            form.add_field("language", self.language)
        form.add_field("response_format", "verbose_json")
        form.add_field("timestamp_granularities[]", "word")
        form.add_field("timestamp_granularities[]", "segment")
        form.add_field("stream", "true")
        return form

    async def transcribe(self, path: Path, on_segment: OnSegment, duration_s: float | None) -> FileTranscript:
        import aiohttp

        assert self._session is not None, "use RemoteTranscriber as an async context manager"
        host = urlsplit(self.endpoint).netloc
        try:
            with open(path, "rb") as upload:
                async with self._session.post(self.endpoint, data=self._form(path, upload)) as resp:
                    if resp.status >= 400:
                        raise await _http_error(resp)
                    if resp.content_type == "text/event-stream":
                        return await _read_events(resp, on_segment, duration_s)
                    if resp.content_type == "application/json":  # a server that does not stream
                        return transcript_from_verbose(await resp.json(), duration_s)
                    raise TranscribeError(f"the server answered {resp.content_type or 'no content type'}, "
                                          "not a transcript: is this a Chorus server's API port?")
        except aiohttp.ClientConnectorError as e:
            raise ServerUnreachable(f"cannot reach the server at {host}: {e.os_error.strerror or e}") from None
        except aiohttp.ClientPayloadError as e:
            raise TranscribeError(f"the connection to {host} broke during the answer ({e})") from None
        except aiohttp.ClientError as e:
            raise TranscribeError(f"the request to {host} failed: {type(e).__name__}: {e}") from None
        except asyncio.TimeoutError:
            raise TranscribeError(f"the server at {host} sent nothing for {_READ_TIMEOUT_S:g} s") from None


async def _http_error(resp: Any) -> TranscribeError:
    """The server's own message for an HTTP error (OpenAI's ``{"error": {"message"}}``)."""
    text = await resp.text(errors="replace")
    try:
        message = json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = " ".join(text.split())[:200] or resp.reason or "no message"
    line = f"the server answered HTTP {resp.status}: {message}"
    if resp.status in (401, 403):
        # Every other file would be refused the same way.
        return ServerUnreachable(line + (" (pass --token or set $CHORUS_TOKEN)" if resp.status == 401 else ""))
    if resp.status == 404:
        return ServerUnreachable(line + f" (is {TRANSCRIPTIONS_PATH} served on this port? "
                                 "the API is on the main port + 1 by default)")
    return TranscribeError(line)


async def _read_events(resp: Any, on_segment: OnSegment, duration_s: float | None) -> FileTranscript:
    segments: list[Segment] = []
    async for event in sse_events(resp.content):
        kind = event.get("type")
        if kind == "transcript.text.delta":
            segment = segment_from_json(event.get("segment") or {"text": event.get("delta", "").strip()}, len(segments))
            segments.append(segment)
            on_segment(segment)
        elif kind == "transcript.text.done":
            usage = event.get("usage") or {}
            seconds = usage.get("seconds") if usage.get("type") == "duration" else None
            return _transcript(segments, seconds if isinstance(seconds, (int, float)) else duration_s)
        elif kind == "error":
            err = event.get("error") or {}
            code = f" ({err['code']})" if err.get("code") else ""
            raise TranscribeError(f"the server failed: {err.get('message') or 'no message'}{code}")
    raise TranscribeError("the server closed the stream before the transcript was done")


async def sse_events(lines: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """The JSON ``data:`` of each server-sent event (lines up to a blank one); comments,
    other fields and ``[DONE]`` are skipped."""
    data: list[str] = []
    async for raw in lines:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if line:
            if line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
            continue
        payload, data = "\n".join(data), []
        if payload and payload != "[DONE]":
            try:
                yield json.loads(payload)
            except ValueError:
                raise TranscribeError(f"the server sent an event that is not JSON: {payload[:80]!r}") from None
    if data:
        payload = "\n".join(data)
        if payload != "[DONE]":
            yield json.loads(payload)


def _ms(seconds: Any) -> int:
    return int(round(float(seconds or 0) * 1000))


def segment_from_json(d: dict[str, Any], index: int) -> Segment:
    """A segment as formats.segment_json writes it (times in seconds), back as a Segment."""
    words = d.get("words")
    fields = {k: d[k] for k in ("temperature", "avg_logprob", "compression_ratio", "no_speech_prob") if k in d}
    return Segment(
        id=int(d.get("id", index)), start_ms=_ms(d.get("start")), end_ms=_ms(d.get("end")), text=d.get("text", "").strip(),
        language=d.get("language"),
        words=[Word(w["word"], _ms(w["start"]), _ms(w["end"])) for w in words] if isinstance(words, list) else None,
        fields=fields, tokens=list(d.get("tokens") or []), error=d.get("error"),
    )


def transcript_from_verbose(body: dict[str, Any], duration_s: float | None) -> FileTranscript:
    """A verbose_json answer; its top-level words go to the segments they fall in."""
    segments = [segment_from_json(s, i) for i, s in enumerate(body.get("segments") or [])]
    words = [Word(w["word"], _ms(w["start"]), _ms(w["end"])) for w in body.get("words") or []]
    if words and segments:
        segments = [dataclasses.replace(s, words=[w for w in words if s.start_ms <= w.start_ms < s.end_ms or
                                                  (s is segments[-1] and w.start_ms >= s.start_ms)]) for s in segments]
    duration = body.get("duration")
    return _transcript(segments, float(duration) if isinstance(duration, (int, float)) else duration_s)


def _transcript(segments: list[Segment], duration_s: float | None) -> FileTranscript:
    # The stream does not say the duration: the probed one, else up to the last speech.
    if duration_s is None:
        duration_s = segments[-1].end_ms / 1000.0 if segments else 0.0
    return FileTranscript(segments, duration_s)


# ---------------------------------------------------------------------- running files
def probe_duration(path: Path) -> float | None:
    """The file's length in seconds from its headers (no decoding), or None when it does not
    say (a WebM from a browser's MediaRecorder) or cannot be opened."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                return None
            stream = container.streams.audio[0]
            if stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
            if container.duration is not None:
                return container.duration / av.time_base
    except (av.FFmpegError, OSError, ValueError):
        pass
    return None


class Progress:
    """A bar per file in progress on ``stream`` (tqdm), or nothing when off. Output written
    through ``write`` while bars are drawn does not tear them."""

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream

    def bar(self, path: Path, duration_s: float | None) -> "FileBar":
        return FileBar(path, duration_s, self.stream or sys.stderr) if self.enabled else FileBar(None, None, None)

    def write(self, text: str, out: TextIO | None = None) -> None:
        out = out or sys.stdout
        if self.enabled:
            from tqdm import tqdm

            tqdm.write(text, file=out, end="")
        else:
            out.write(text)
        out.flush()


class FileBar:
    """One file's progress: the share of its duration up to the last finished segment; a
    count of segments when the duration is unknown."""

    def __init__(self, path: Path | None, duration_s: float | None, stream: TextIO | None) -> None:
        self._bar: Any = None
        self._total = duration_s if duration_s and duration_s > 0 else None
        if path is None or stream is None:
            return
        from tqdm import tqdm

        name = path.name if len(path.name) <= 30 else path.name[:27] + "..."
        if self._total is not None:
            fmt = "{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}]"
            self._bar = tqdm(total=round(self._total, 1), desc=name, file=stream, bar_format=fmt, dynamic_ncols=True, leave=True)
        else:
            self._bar = tqdm(desc=name, unit=" segments", file=stream, dynamic_ncols=True, leave=True)

    def segment(self, s: Segment) -> None:
        if self._bar is None:
            return
        if self._total is not None:
            self._bar.n = min(round(s.end_ms / 1000.0, 1), self._bar.total)
        else:
            self._bar.n += 1
        # refresh() draws now: segments arrive a few a second at most, and a forced bar
        # (--progress into a log) should show every step, not tqdm's rate-limited few.
        self._bar.refresh()

    def close(self, done: bool) -> None:
        if self._bar is None:
            return
        if done and self._total is not None:
            self._bar.n = self._bar.total  # the trailing silence after the last segment; close() draws it
        self._bar.close()


async def transcribe_files(transcriber: Transcriber, paths: list[Path], progress: Progress) -> AsyncIterator[FileResult]:
    """Transcribe ``paths``, a few at a time, and yield each result in the order given as
    soon as it and every earlier one are done. ServerUnreachable ends it all."""
    slots = asyncio.Semaphore(max(1, transcriber.concurrency))

    async def one(path: Path) -> FileResult:
        async with slots:
            duration = await asyncio.to_thread(probe_duration, path)
            bar = progress.bar(path, duration)
            t0 = time.monotonic()
            done = False
            try:
                transcript = await transcriber.transcribe(path, bar.segment, duration)
                done = True
            except ServerUnreachable:
                raise
            except TranscribeError as e:
                return FileResult(path, None, str(e), time.monotonic() - t0)
            finally:
                bar.close(done)
            took = time.monotonic() - t0
            log.info("%s: %.1f s of audio in %.1f s (%d segments)", path, transcript.duration_s, took, len(transcript.segments))
            return FileResult(path, transcript, None, took)

    tasks = [asyncio.ensure_future(one(p)) for p in paths]
    try:
        for task in tasks:
            yield await task
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ---------------------------------------------------------------------- output
EXTENSIONS = {"text": "txt", "json": "json", "verbose_json": "json", "srt": "srt", "vtt": "vtt", "legacy_json": "json"}


def render(result: FileResult, fmt: str, name_it: bool) -> str:
    """One file's output in ``fmt`` (formats.FORMATS, or ``legacy_json``: the `--json` shape).
    ``name_it``: several files to one stream, so each says which file it is."""
    t = result.transcript
    assert t is not None
    if fmt == "legacy_json":
        return json.dumps(legacy_json(result), ensure_ascii=False) + "\n"
    if fmt == "text":
        return f"{result.path}: {t.text}\n" if name_it else formats.as_text(t)
    if fmt in ("json", "verbose_json"):
        body = formats.as_json(t) if fmt == "json" else formats.as_verbose_json(t, words=True)
        if name_it:
            body = {"file": str(result.path), **body}
        return json.dumps(body, ensure_ascii=False) + "\n"
    return formats.as_srt(t) if fmt == "srt" else formats.as_vtt(t)


def legacy_json(result: FileResult) -> dict[str, Any]:
    """`chorus transcribe --json`: one object per file, times in ms from the file's start."""
    t = result.transcript
    assert t is not None
    return {
        "file": str(result.path),
        "text": t.text,
        "seconds": round(t.duration_s, 3),
        "compute_s": round(result.compute_s, 3),
        "segments": [
            {"start_ms": s.start_ms, "end_ms": s.end_ms, "text": s.text, "language": s.language,
             "words": [{"word": w.word, "start_ms": w.start_ms, "end_ms": w.end_ms} for w in s.words or ()],
             **{k: v for k, v in s.fields.items() if isinstance(v, (str, int, float, bool))},
             **({"error": s.error} if s.error else {})}
            for s in t.segments
        ],
    }
