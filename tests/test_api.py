"""The OpenAI-compatible HTTP API, with the official `openai` package as the client.

A real server (tests/serverharness.py) on loopback ports, the real Whisper-base model, real
speech re-encoded as users' recordings come (tests/audiofiles.py). Text is checked against
the clips' transcripts, times against the clips' positions in the file. The ~50 s long file
is transcribed once (`drained_long`: on a server that is stopped while it runs), and both the
drain and the long-file tests check that one result.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import aiohttp
import numpy as np
import openai
import pytest

from server.wer import word_error_rate
from tests.audiofiles import encode
from tests.serverharness import CLIPS, DATA, TRANSCRIPTS, ServerThread, make_config, read_clip, stream_audio
from tests.waiting import async_wait_until, wait_until

JFK = DATA / "jfk.wav"
SHORT = DATA / "sense_and_sensibility_01_austen_64kb-0880.wav"
GAP_S = 1.5


def wer(ref: str, hyp: str) -> float:
    return word_error_rate([ref], [hyp])


@pytest.fixture(scope="module")
def server(whisper_runner):
    with ServerThread(make_config(), whisper_runner) as srv:
        yield srv


def client(srv: ServerThread, key: str = "unused", **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{srv.app.api_port}/v1", api_key=key, max_retries=0, **kw)


def jfk_bytes() -> bytes:
    return JFK.read_bytes()


def long_file() -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """Every clip once, 1.5 s of silence between them: the audio and each clip's (start, end, text)."""
    parts, spans, t = [], [], 0.0
    for path in CLIPS:
        audio = read_clip(path)
        parts += [audio, np.zeros(int(GAP_S * 16000), np.float32)]
        spans.append((t, t + len(audio) / 16000, TRANSCRIPTS[path.name]))
        t += len(audio) / 16000 + GAP_S
    return np.concatenate(parts), spans


# ---------------------------------------------------------------------- formats
def test_every_response_format_gives_the_text_and_its_times(server):
    c = client(server)
    ref = TRANSCRIPTS[JFK.name]
    asks = {"plain": {}, "text": {"response_format": "text"},
            "verbose": {"response_format": "verbose_json", "timestamp_granularities": ["word", "segment"], "language": "en"},
            "segments_only": {"response_format": "verbose_json"}, "srt": {"response_format": "srt"},
            "vtt": {"response_format": "vtt"}}
    # All at once, as several clients would send them: their segments share the model's batches.
    with ThreadPoolExecutor(len(asks)) as pool:
        futures = {k: pool.submit(c.audio.transcriptions.create, model="whisper-1", file=("jfk.wav", jfk_bytes()), **kw)
                   for k, kw in asks.items()}
        got = {k: f.result() for k, f in futures.items()}
    plain = got["plain"]
    assert wer(ref, plain.text) <= 0.1, plain.text

    text = got["text"]
    assert isinstance(text, str) and text.endswith("\n") and not text.startswith('"')  # plain text, not a JSON string
    assert text.strip() == plain.text

    verbose = got["verbose"]
    assert abs(verbose.duration - 11.0) < 0.05 and verbose.language == "en"
    assert verbose.text == plain.text
    assert verbose.segments and verbose.words
    prev = 0.0
    for s in verbose.segments:
        assert prev <= s.start < s.end <= verbose.duration, s
        assert s.avg_logprob < 0 and 0 <= s.no_speech_prob < 0.5 and s.tokens, s
        prev = s.end
    prev = 0.0
    for w in verbose.words:
        assert prev <= w.start <= w.end <= verbose.duration and w.word == w.word.strip() and w.word, w
        prev = w.end
    assert " ".join(w.word for w in verbose.words) == verbose.text
    # "ask not what your country can do for you" starts at about 3.3 s of jfk.wav.
    ask = next(w for w in verbose.words if w.word.lower().strip(",.") == "ask")
    assert 2.9 <= ask.start <= 3.8, ask

    segments_only = got["segments_only"]
    assert segments_only.segments and segments_only.words is None

    for fmt in ("srt", "vtt"):
        subtitles = got[fmt]
        assert isinstance(subtitles, str)
        cues = parse_cues(subtitles, fmt)
        assert len(cues) >= 2
        prev = 0.0
        for start, end, _ in cues:
            assert prev <= start < end <= 11.0, cues
            prev = end
        assert wer(ref, " ".join(t for _, _, t in cues)) <= 0.1, cues


def parse_cues(body: str, fmt: str) -> list[tuple[float, float, str]]:
    sep = "," if fmt == "srt" else "."
    if fmt == "vtt":
        assert body.startswith("WEBVTT\n\n"), body[:40]
        body = body[len("WEBVTT\n\n"):]
    clock = rf"(\d\d):(\d\d):(\d\d){re.escape(sep)}(\d\d\d)"
    cues = []
    for i, block in enumerate(b for b in body.strip().split("\n\n") if b):
        lines = block.split("\n")
        if fmt == "srt":
            assert lines[0] == str(i + 1), block
            lines = lines[1:]
        m = re.fullmatch(f"{clock} --> {clock}", lines[0])
        assert m, block
        g = [int(x) for x in m.groups()]
        start = g[0] * 3600 + g[1] * 60 + g[2] + g[3] / 1000
        end = g[4] * 3600 + g[5] * 60 + g[6] + g[7] / 1000
        assert len(lines) >= 2 and all(lines[1:]), block
        cues.append((start, end, " ".join(lines[1:])))
    return cues


@pytest.mark.parametrize("fmt", ["mp3", "opus", "flac", "m4a", "webm"])
def test_compressed_recordings(server, fmt):
    name, data = encode(read_clip(SHORT), fmt)
    r = client(server).audio.transcriptions.create(model="whisper-1", file=(name, data), response_format="verbose_json")
    assert wer(TRANSCRIPTS[SHORT.name], r.text) <= 0.15, (fmt, r.text)
    assert abs(r.duration - len(read_clip(SHORT)) / 16000) < 0.1, r.duration


# ---------------------------------------------------------------------- long files
@pytest.fixture(scope="module")
def drained_long(whisper_runner):
    """The long file (MP3, verbose_json with segments) on a server of its own that is stopped
    (SIGTERM's drain) once the job is under way: what the server answered meanwhile, and the
    transcription the drain let finish, with the file-class model metrics it added."""
    audio, spans = long_file()
    name, data = encode(audio, "mp3")
    seen: dict = {"spans": spans, "duration": len(audio) / 16000}
    with ServerThread(make_config(), whisper_runner) as srv:
        registry = srv.app.metrics.registry  # read in-process: the listeners are closed after the drain

        def file_counter(name: str) -> float:
            return registry.get_sample_value(name, {"kind": "file"}) or 0.0

        items0, batches0 = file_counter("chorus_requests_total"), file_counter("chorus_batches_total")

        def post():
            seen["result"] = client(srv).audio.transcriptions.create(
                model="whisper-1", file=(name, data), response_format="verbose_json", timestamp_granularities=["segment"])

        t = threading.Thread(target=post)
        t.start()
        wait_until(lambda: file_counter("chorus_batches_total") > batches0, 60, what="the long job under way")
        stopping = asyncio.run_coroutine_threadsafe(srv.app.stop(), srv.loop)
        wait_until(lambda: srv.app.draining, 10, what="the server draining")
        with pytest.raises(openai.InternalServerError) as e:  # 503 while it drains
            client(srv).audio.transcriptions.create(model="whisper-1", file=("jfk.wav", jfk_bytes()))
        seen["refused"] = (e.value.status_code, e.value.response.headers.get("Retry-After"))
        with pytest.raises(urllib.error.HTTPError) as probe:  # and its probe sends load balancers elsewhere
            urllib.request.urlopen(f"http://127.0.0.1:{srv.app.api_port}/healthz", timeout=10)
        seen["probe"] = probe.value.code
        stopping.result(120)
        t.join(10)
        seen["items"] = file_counter("chorus_requests_total") - items0
        seen["batches"] = file_counter("chorus_batches_total") - batches0
    return seen


def test_shutdown_finishes_running_transcriptions_and_refuses_new_ones(drained_long):
    assert drained_long["refused"][0] == 503 and drained_long["refused"][1], drained_long["refused"]
    assert drained_long["probe"] == 503
    assert "result" in drained_long, "the running transcription did not finish"
    spans = drained_long["spans"]
    assert wer(" ".join(ref for _, _, ref in spans), drained_long["result"].text) <= 0.12, drained_long["result"].text


def test_a_long_file_is_cut_at_pauses_batched_and_stitched_in_order(drained_long):
    r, spans = drained_long["result"], drained_long["spans"]
    assert abs(r.duration - drained_long["duration"]) < 0.2
    # Every clip's words come back, in order, in the segments that cover that clip's time.
    assert len(r.segments) >= len(spans), [(s.start, s.end) for s in r.segments]
    assert [s.id for s in r.segments] == list(range(len(r.segments)))
    prev = 0.0
    for s in r.segments:
        assert prev <= s.start < s.end <= r.duration, (prev, s)
        prev = s.end
    for start, end, ref in spans:
        inside = " ".join(s.text for s in r.segments if s.start < end and s.end > start)
        assert wer(ref, inside) <= 0.2, (start, ref, inside)
    refs = " ".join(ref for _, _, ref in spans)
    assert wer(refs, r.text) <= 0.12, r.text
    # The file's segments went to the model in batches, not one call each.
    items, batches = drained_long["items"], drained_long["batches"]
    assert items == len(r.segments) and 0 < batches < items, (items, batches)


def test_stream_true_sends_each_segment_as_it_finishes(server):
    audio, spans = long_file()
    short = audio[: int((spans[2][1] + 0.5) * 16000)]  # the first three clips
    name, data = encode(short, "opus")
    stream = client(server).audio.transcriptions.create(model="whisper-1", file=(name, data), stream=True)
    events = list(stream)
    assert [e.type for e in events[:-1]] == ["transcript.text.delta"] * (len(events) - 1)
    assert events[-1].type == "transcript.text.done" and len(events) >= 4
    text = "".join(e.delta for e in events[:-1])
    assert text == events[-1].text
    assert wer(" ".join(ref for _, _, ref in spans[:3]), text) <= 0.15, text
    starts = [e.segment["start"] for e in events[:-1]]  # Chorus's extension: the segment itself
    assert starts == sorted(starts)


def test_a_client_that_hangs_up_cancels_its_queued_segments(server):
    audio, _ = long_file()
    name, data = encode(np.concatenate([audio, audio]), "mp3")  # ~4 min of speech: minutes of model time here
    dropped0 = server.metric("chorus_requests_dropped_total", kind="file", why="cancelled")
    with pytest.raises(openai.APITimeoutError):
        client(server, timeout=4.0).audio.transcriptions.create(model="whisper-1", file=(name, data))
    wait_until(lambda: server.metric("chorus_requests_dropped_total", kind="file", why="cancelled") > dropped0, 30,
               interval=0.2, what="the job's queued segments cancelled")
    # The model is free again: nothing of the job is left waiting in the batcher (minutes of it
    # would be), and a new request is answered.
    wait_until(lambda: server.metric("chorus_batcher_queue_depth") == 0, 30, interval=0.1, what="the batcher's queue empty")
    r = client(server).audio.transcriptions.create(model="whisper-1", file=("jfk.wav", jfk_bytes()))
    assert wer(TRANSCRIPTS[JFK.name], r.text) <= 0.1


# ---------------------------------------------------------------------- bad requests
def raw_post(srv: ServerThread, fields: dict, file: tuple[str, bytes] | None = None, path: str = "/v1/audio/transcriptions",
             headers: dict | None = None) -> tuple[int, dict]:
    async def main():
        form = aiohttp.FormData()
        for k, v in fields.items():
            for item in v if isinstance(v, list) else [v]:
                form.add_field(k, item)
        if file is not None:
            form.add_field("file", file[1], filename=file[0])
        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{srv.app.api_port}{path}", data=form, headers=headers or {}) as r:
                return r.status, json.loads(await r.text())
    return asyncio.run(main())


def test_bad_requests_get_clear_errors_and_a_live_stream_beside_them_keeps_its_text(server):
    live: dict = {}

    def stream_live():
        live["log"] = asyncio.run(stream_audio(server.url, read_clip(JFK), speed=4.0))

    t = threading.Thread(target=stream_live)
    t.start()
    jfk = ("jfk.wav", jfk_bytes())
    cases = [
        ({"model": "whisper-1"}, ("x.wav", b"RIFF not really a wav file" * 50), 400, "invalid_file"),
        ({"model": "whisper-1"}, ("x.mp3", bytes(range(256)) * 40), 400, "invalid_file"),
        ({"model": "whisper-1"}, ("x.wav", b""), 400, "invalid_file"),
        ({"model": "whisper-1"}, None, 400, "invalid_request"),
        ({}, jfk, 400, "invalid_request"),
        ({"model": "gpt-99"}, jfk, 400, "model_not_found"),
        ({"model": "whisper-1", "response_format": "docx"}, jfk, 400, "invalid_value"),
        ({"model": "whisper-1", "language": "xx"}, jfk, 400, "unsupported_language"),
        ({"model": "whisper-1", "timestamp_granularities[]": "char"}, jfk, 400, "invalid_value"),
        ({"model": "whisper-1", "prompt": "x" * 100_000}, jfk, 400, "invalid_request"),
    ]
    for fields, file, status, code in cases:
        got, body = raw_post(server, fields, file)
        assert (got, body["error"]["code"]) == (status, code), (fields, body)
        assert body["error"]["message"] and body["error"]["type"] == "invalid_request_error", body
    # Not multipart at all.
    req = urllib.request.Request(f"http://127.0.0.1:{server.app.api_port}/v1/audio/transcriptions", data=b"{}",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400
    # The SDK maps them to its own exceptions.
    with pytest.raises(openai.BadRequestError):
        client(server).audio.transcriptions.create(model="whisper-1", file=("x.wav", b"garbage" * 100))
    with pytest.raises(openai.NotFoundError):
        client(server).models.retrieve("gpt-99")
    t.join(120)
    finals = [m for m in live["log"].of("final") if m["text"]]
    assert wer(TRANSCRIPTS[JFK.name], " ".join(m["text"] for m in finals)) <= 0.1, finals
    # And the API still answers.
    assert wer(TRANSCRIPTS[JFK.name], client(server).audio.transcriptions.create(model="whisper-1", file=jfk).text) <= 0.1


def test_size_and_duration_limits_are_413(whisper_runner):
    cfg = make_config(**{"api.max_upload_bytes": 200_000, "files.max_audio_s": 5})
    with ServerThread(cfg, whisper_runner) as srv:
        got, body = raw_post(srv, {"model": "whisper-1"}, ("jfk.wav", jfk_bytes()))  # 352 KB
        assert got == 413 and body["error"]["code"] == "file_too_large", body
        name, data = encode(read_clip(JFK), "mp3")  # 11 s of audio in 44 KB
        got, body = raw_post(srv, {"model": "whisper-1"}, (name, data))
        assert got == 413 and body["error"]["code"] == "audio_too_long", body
        short = encode(read_clip(SHORT), "mp3")
        r = client(srv).audio.transcriptions.create(model="whisper-1", file=short)
        assert wer(TRANSCRIPTS[SHORT.name], r.text) <= 0.15


def test_models_are_listed(server):
    ids = [m.id for m in client(server).models.list().data]
    assert {"whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe", "chorus", "whisper"} <= set(ids)
    assert client(server).models.retrieve("whisper-1").id == "whisper-1"
    r = client(server).audio.transcriptions.create(model="gpt-4o-mini-transcribe", file=("jfk.wav", jfk_bytes()))
    assert wer(TRANSCRIPTS[JFK.name], r.text) <= 0.1


# ---------------------------------------------------------------------- access
def test_token_auth_and_origins_as_on_the_main_port(whisper_runner, monkeypatch):
    monkeypatch.setenv("CHORUS_AUTH_TOKENS", "s3cret")
    cfg = make_config(**{"server.allowed_origins": '["https://app.example.com"]'})
    with ServerThread(cfg, whisper_runner) as srv:
        with pytest.raises(openai.AuthenticationError):
            client(srv, key="wrong").audio.transcriptions.create(model="whisper-1", file=("jfk.wav", jfk_bytes()))
        with pytest.raises(openai.AuthenticationError):
            client(srv, key="wrong").models.list()
        got, body = raw_post(srv, {"model": "whisper-1"}, ("jfk.wav", jfk_bytes()))
        assert got == 401 and body["error"]["type"] == "authentication_error", body
        got, body = raw_post(srv, {"model": "whisper-1"}, ("jfk.wav", jfk_bytes()),
                             headers={"Authorization": "Bearer s3cret", "Origin": "https://evil.example.com"})
        assert got == 403, body
        r = client(srv, key="s3cret").audio.transcriptions.create(model="whisper-1", file=("jfk.wav", jfk_bytes()))
        assert wer(TRANSCRIPTS[JFK.name], r.text) <= 0.1
        # An allowed browser page may read the answer (CORS), after its preflight.
        async def browser():
            async with aiohttp.ClientSession() as s:
                url = f"http://127.0.0.1:{srv.app.api_port}/v1/models"
                async with s.options(url, headers={"Origin": "https://app.example.com",
                                                   "Access-Control-Request-Method": "GET",
                                                   "Access-Control-Request-Headers": "authorization"}) as pre:
                    assert pre.status == 204 and "Authorization" in pre.headers["Access-Control-Allow-Headers"]
                async with s.get(url, headers={"Origin": "https://app.example.com", "Authorization": "Bearer s3cret"}) as r:
                    assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
                async with s.options(url, headers={"Origin": "https://evil.example.com"}) as pre:
                    assert pre.status == 403
                form = aiohttp.FormData()
                form.add_field("model", "whisper-1")
                form.add_field("stream", "true")
                form.add_field("file", jfk_bytes(), filename="jfk.wav")
                async with s.post(f"http://127.0.0.1:{srv.app.api_port}/v1/audio/transcriptions", data=form,
                                  headers={"Origin": "https://app.example.com", "Authorization": "Bearer s3cret"}) as r:
                    assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream"
                    assert r.headers["Access-Control-Allow-Origin"] == "https://app.example.com"  # streamed answers too
                    assert "transcript.text.done" in await r.text()
        asyncio.run(browser())
        # Probes stay open.
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.app.api_port}/healthz", timeout=10) as r:
            assert r.status == 200


def test_a_recording_without_speech_streams_only_done(server):
    name, data = encode(np.zeros(3 * 16000, np.float32), "wav")
    events = list(client(server).audio.transcriptions.create(model="whisper-1", file=(name, data), stream=True))
    assert [e.type for e in events] == ["transcript.text.done"] and events[0].text == ""
    r = client(server).audio.transcriptions.create(model="whisper-1", file=(name, data), response_format="verbose_json")
    assert r.text == "" and r.segments == [] and abs(r.duration - 3.0) < 0.05


# ---------------------------------------------------------------------- bounds on requests (issue 22, item 5)
BOUNDARY = "chorus-test-boundary"
FORM_HEAD = (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
             f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
             "Content-Type: audio/wav\r\n\r\n").encode()
FORM_TAIL = f"\r\n--{BOUNDARY}--\r\n".encode()


@pytest.fixture(scope="module")
def limited(whisper_runner):
    cfg = make_config(**{"api.max_requests_per_address": 2, "api.max_spool_bytes": 400_000,
                         "api.body_timeout_s": 1.0, "api.min_body_rate": 1000, "api.max_body_s": 3.0})
    with ServerThread(cfg, whisper_runner) as srv:
        yield srv


async def open_upload(srv: ServerThread, file_bytes: int, first: bytes = b"") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw upload of a ``file_bytes`` file whose headers, form head and ``first`` bytes of
    the file are sent; the rest is up to the caller."""
    reader, writer = await asyncio.open_connection("127.0.0.1", srv.app.api_port)
    length = len(FORM_HEAD) + file_bytes + len(FORM_TAIL)
    writer.write(f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1:{srv.app.api_port}\r\n"
                 f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\nContent-Length: {length}\r\n\r\n".encode()
                 + FORM_HEAD + first)
    await writer.drain()
    return reader, writer


async def answer(reader: asyncio.StreamReader, timeout: float) -> tuple[int, bytes]:
    """The status and the rest of what the server sent until it closed the connection."""
    data = await asyncio.wait_for(reader.read(), timeout)
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0
    return status, data


async def wait_jobs(srv: ServerThread, n: int) -> None:
    """Until ``n`` transcription requests are in progress on the server."""
    await async_wait_until(lambda: len(srv.app.api._jobs) == n, 10, what=f"{n} requests in progress")


def silence_wav(seconds: float = 1.0) -> tuple[str, bytes]:
    return encode(np.zeros(int(seconds * 16000), np.float32), "wav")


def test_form_fields_are_bounded_in_number_and_in_bytes_together(server):
    many = {f"x{i}": "1" for i in range(33)}  # 33 fields besides `file` and `model`: 34 in all
    got, body = raw_post(server, {"model": "whisper-1", **many}, silence_wav())
    assert (got, body["error"]["code"]) == (400, "too_many_fields"), body
    # Each under the 64 KiB field limit, 300 KB together.
    big = {f"x{i}": "y" * 60_000 for i in range(5)}
    got, body = raw_post(server, {"model": "whisper-1", **big}, silence_wav())
    assert (got, body["error"]["code"]) == (413, "fields_too_large"), body
    assert body["error"]["type"] == "invalid_request_error" and "api.max_form_bytes" in body["error"]["message"]
    # OpenAI's own fields (8 of them, a long prompt) pass.
    r = client(server).audio.transcriptions.create(model="whisper-1", file=("jfk.wav", jfk_bytes()), language="en",
                                                   prompt="p" * 60_000, response_format="verbose_json",
                                                   temperature=0, timestamp_granularities=["word", "segment"])
    assert wer(TRANSCRIPTS[JFK.name], r.text) <= 0.1


@pytest.mark.timing
def test_a_body_that_stalls_or_trickles_is_cut_with_408_and_frees_its_slot(limited):
    async def main():
        # Stalls: 100 bytes of a 100 KB file, then nothing; 1 s + 0.1 s allowed.
        t0 = time.monotonic()
        reader, writer = await open_upload(limited, 100_000, b"\0" * 100)
        status, data = await answer(reader, 8)
        stalled = time.monotonic() - t0
        assert status == 408 and b'"code": "request_timeout"' in data, data[:400]
        assert 1.0 <= stalled < 2.5, stalled  # and the connection was closed right after (read() hit EOF)
        writer.close()
        # Trickles at 5 KB/s, above the minimum rate, but the whole body may take 3 s at most.
        t0 = time.monotonic()
        reader, writer = await open_upload(limited, 100_000)
        sent = 0
        while not reader.at_eof() and sent < 100_000 and time.monotonic() - t0 < 8:
            writer.write(b"\0" * 500)
            sent += 500
            await asyncio.sleep(0.1)
            if reader._buffer:  # the answer came
                break
        status, data = await answer(reader, 8)
        took = time.monotonic() - t0
        assert status == 408, data[:400]
        assert 3.0 <= took < 4.5 and sent < 50_000, (took, sent)
        print(f"\nbody cut: stalled after 100 bytes at {stalled:.2f} s, trickling {sent} bytes at {took:.2f} s")
        writer.close()
        await wait_jobs(limited, 0)  # both slots are free again

    asyncio.run(main())
    r = client(limited).audio.transcriptions.create(model="whisper-1", file=("jfk.wav", jfk_bytes()))
    assert wer(TRANSCRIPTS[JFK.name], r.text) <= 0.1


def test_spool_space_is_bounded_across_concurrent_uploads(limited):
    async def main():
        # One upload holds 300 KB of the 400 KB spool (its body has 3 s to finish).
        reader, writer = await open_upload(limited, 350_000, b"\0" * 300_000)
        await wait_jobs(limited, 1)
        second = silence_wav(5)[1]  # 160 KB
        # Enough of its 300 KB read and spooled (in 64 KiB chunks) that the second cannot fit beside it.
        await async_wait_until(lambda: limited.app.api._spooled + len(second) > 400_000, 10,
                               what="the first upload's bytes spooled")
        got = await asyncio.to_thread(raw_post, limited, {"model": "whisper-1"}, ("a.wav", second))
        writer.transport.abort()
        return got

    got, body = asyncio.run(main())
    assert (got, body["error"]["code"]) == (507, "insufficient_storage"), body
    # The space comes back when the first upload ends.
    asyncio.run(wait_jobs(limited, 0))
    got, body = raw_post(limited, {"model": "whisper-1"}, ("a.wav", silence_wav(5)[1]))
    assert got == 200 and body["text"] == "", body


def test_requests_per_address_are_bounded_with_429_and_retry_after(limited):
    async def main():
        holders = [await open_upload(limited, 50_000, b"\0" * 1000) for _ in range(2)]
        await wait_jobs(limited, 2)
        async with aiohttp.ClientSession() as s:
            form = aiohttp.FormData()
            form.add_field("model", "whisper-1")
            form.add_field("file", silence_wav()[1], filename="a.wav")
            async with s.post(f"http://127.0.0.1:{limited.app.api_port}/v1/audio/transcriptions", data=form) as r:
                status, retry, body = r.status, r.headers.get("Retry-After"), await r.json()
        for _, writer in holders:
            writer.transport.abort()
        return status, retry, body

    status, retry, body = asyncio.run(main())
    assert (status, body["error"]["code"]) == (429, "rate_limit_exceeded") and retry and int(retry) >= 1, body
    asyncio.run(wait_jobs(limited, 0))
    with pytest.raises(openai.RateLimitError):  # what the SDK makes of it (and retries, with max_retries > 0)
        async def again():
            holders = [await open_upload(limited, 50_000, b"\0" * 1000) for _ in range(2)]
            await wait_jobs(limited, 2)
            try:
                await asyncio.to_thread(client(limited).audio.transcriptions.create, model="whisper-1",
                                        file=silence_wav())
            finally:
                for _, writer in holders:
                    writer.transport.abort()
        asyncio.run(again())
    asyncio.run(wait_jobs(limited, 0))
    r = client(limited).audio.transcriptions.create(model="whisper-1", file=("jfk.wav", jfk_bytes()))
    assert wer(TRANSCRIPTS[JFK.name], r.text) <= 0.1
