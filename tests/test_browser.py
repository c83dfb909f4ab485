"""The live-captioning page (GET /) in a real headless Chromium against a real server.

Debian's Chromium (/usr/bin/chromium, installed by scripts/setup.sh when run as root) is
driven by Playwright's Python package with ``executable_path``: Playwright's own browser
download is never used (``playwright install`` needs a CDN). Chromium's fake capture device
plays a WAV file as the microphone (``--use-file-for-fake-audio-capture``); the page captures
it through its AudioWorklet at the AudioContext's own rate (44.1 or 48 kHz), resamples it to
16 kHz and streams it to a real server running the real Whisper model. The captions the page
shows are then compared with the clip's reference transcript.

Only a missing Chromium skips these tests; anything else (Playwright missing, the browser
failing to start, a page error) fails them.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import time
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pytest

from server.transport import page as page_module
from server.wer import word_error_rate
from tests.serverharness import DATA, TRANSCRIPTS, ServerThread, make_config, read_clip
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "browser"
CHROMIUM = os.environ.get("CHORUS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
TOKEN = "browser-test-token-5b1d"
MIC_CLIP = DATA / "jfk.wav"
FILE_CLIP = DATA / "sense_and_sensibility_01_austen_64kb-0870.wav"
# Whisper-base's streaming WER on these clips is 0-5% (docs/benchmarks.md); 15% leaves room for
# a word or two lost to capture timing, and still fails on a garbled or truncated stream.
MAX_WER = 0.15


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def srv(whisper_runner):
    with ServerThread(make_config(), whisper_runner) as s:
        yield s


@pytest.fixture(scope="module")
def auth_srv(whisper_runner, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("auth") / "tokens.txt"
    tokens.write_text(TOKEN + "\n")
    # Partials every 500 ms (instead of 1 s) so that even with the machine busy (finals go
    # first) each segment of the microphone test has several chances to show one.
    cfg = make_config(**{"server.auth_tokens_file": str(tokens), "batcher.partial_interval_ms": 500})
    with ServerThread(cfg, whisper_runner) as s:
        yield s


@pytest.fixture(scope="module")
def mic_wav(tmp_path_factory) -> Path:
    """The microphone's audio: 1 s of silence, the clip, 3 s of silence.

    Chromium opens the fake device when the page calls getUserMedia and plays the file from
    its start; the lead silence covers the moments before the page's worklet is connected.
    Played with `%noloop`, at its end Chromium's FileSource returns no frames and leaves its
    last buffer in place, so the "microphone" repeats the file's last ~10 ms forever
    (media/audio/simple_sources.cc): the trailing zeros make that repeat silence, so the
    endpointer sees the speech end.
    """
    x = read_clip(MIC_CLIP)
    pad = lambda s: np.zeros(int(16000 * s), dtype=np.float32)  # noqa: E731
    audio = np.concatenate([pad(1.0), x, pad(3.0)])
    path = tmp_path_factory.mktemp("mic") / "mic.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes())
    return path


@pytest.fixture(scope="module")
def browser(mic_wav):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"chromium not installed: no {CHROMIUM} (run scripts/setup.sh as root, or "
                    "apt-get install chromium); the live-captioning page is NOT tested in a browser")
    # Imported here so that a machine without Chromium can skip; with Chromium present a
    # missing Playwright is an error (it is in the [test] extra), not a reason to skip.
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--use-fake-ui-for-media-stream",  # grant the microphone without a prompt
                "--use-fake-device-for-media-stream",
                f"--use-file-for-fake-audio-capture={mic_wav}%noloop",
            ],
        )
        try:
            yield b
        finally:
            b.close()


class PageErrors:
    """Uncaught exceptions and console errors of a page: a page that throws fails its test."""

    def __init__(self, page) -> None:
        self.errors: list[str] = []
        page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        page.on("console", lambda m: self.errors.append(f"console.{m.type}: {m.text}") if m.type == "error" else None)


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1100, "height": 820})
    errors = PageErrors(page)
    page.goto(url)
    page.wait_for_function("() => document.documentElement.dataset.ready === 'true'", timeout=10_000)
    # Record every state the status passes through and every partial caption as it is shown,
    # with its computed style: the test looks at them after the stream ends.
    page.evaluate("""() => {
        window.__states = [document.getElementById('status').dataset.state];
        window.__partials = [];
        const seen = (el) => {
            const cs = getComputedStyle(el);
            window.__partials.push({text: el.textContent, cls: el.className, fontStyle: cs.fontStyle,
                                    color: cs.color, segment: el.dataset.segment});
        };
        new MutationObserver((records) => {
            const st = document.getElementById('status').dataset.state;
            if (window.__states[window.__states.length - 1] !== st) window.__states.push(st);
            for (const r of records) {
                const el = r.target.nodeType === 1 ? r.target : r.target.parentElement;
                if (el && el.classList.contains('partial')) seen(el);
                for (const n of r.addedNodes) if (n.nodeType === 1 && n.classList.contains('partial')) seen(n);
            }
        }).observe(document.body, {subtree: true, childList: true, characterData: true, attributes: true});
    }""")
    return page, errors


def final_texts(page) -> list[str]:
    return page.eval_on_selector_all("#captions .final .text", "els => els.map(e => e.textContent)")


def wait_for_text(page, reference: str, timeout_s: float) -> list[str]:
    """Poll the final captions until they match the reference within MAX_WER (or time out)."""
    texts: list[str] = []

    def matched() -> list[str]:
        nonlocal texts
        texts = final_texts(page)
        return texts if texts and word_error_rate([reference], [" ".join(texts)]) <= MAX_WER else []

    try:
        return wait_until(matched, timeout_s, 0.25)
    except AssertionError:
        status = page.text_content("#status")
        raise AssertionError(f"final captions {texts!r} never matched {reference!r} within {MAX_WER:.0%} WER "
                             f"in {timeout_s} s; status {status!r}") from None


def download(page, selector: str) -> str:
    """Click a download link as a user would and return the file's text."""
    with page.expect_download(timeout=10_000) as info:
        page.click(selector)
    return Path(info.value.path()).read_text(encoding="utf-8")


def check_transcript_downloads(page, texts: list[str], reference: str) -> None:
    assert texts, "no final captions to compare the downloads with"
    txt = download(page, "#download-txt")
    assert txt == "\n".join(texts) + "\n", txt
    vtt = download(page, "#download-vtt")
    assert vtt.startswith("WEBVTT\n"), vtt[:100]
    cues = re.findall(r"\n\d+\n(\d\d:\d\d:\d\d\.\d{3}) --> (\d\d:\d\d:\d\d\.\d{3})\n([^\n]+)\n", vtt)
    assert [c[2] for c in cues] == texts, vtt
    secs = lambda t: sum(float(v) * m for v, m in zip(t.split(":"), (3600, 60, 1)))  # noqa: E731
    prev_end = 0.0
    for start, end, _ in cues:
        assert prev_end - 0.001 <= secs(start) < secs(end), vtt
        prev_end = secs(end)
    assert word_error_rate([reference], [" ".join(c[2] for c in cues)]) <= MAX_WER, vtt


def screenshot(page, name: str) -> Path:
    path = ARTIFACTS / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000, "screenshot is suspiciously small"
    return path


# ---------------------------------------------------------------------- plain HTTP
def raw_get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    """GET with the path sent exactly as given (urllib would not normalise it, but be explicit)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def test_page_and_static_files_over_http(srv):
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.app.port}/", timeout=10) as r:
        body = r.read().decode()
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/html; charset=utf-8"
        assert r.headers["Cache-Control"] == "no-cache"
        csp = r.headers["Content-Security-Policy"]
    assert '<button id="start"' in body and 'id="captions"' in body
    directives = dict((d.split()[0], d.split()[1:]) for d in csp.split("; "))
    assert directives["default-src"] == ["'self'"] and directives["script-src"] == ["'self'"]
    assert directives["connect-src"] == ["'self'", "ws:", "wss:"]
    assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp
    # Every script, style and icon the page names is served from /static/ with its type.
    refs = re.findall(r'(?:src|href)="(/static/[^"]+)"', body)
    assert {"/static/app.js", "/static/style.css"} <= set(refs), refs
    types = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
    for ref in refs + ["/static/capture-worklet.js", "/static/resampler.js"]:
        status, headers, data = raw_get(srv.app.port, ref)
        assert status == 200 and data, ref
        assert headers["content-type"] == types[Path(ref).suffix], (ref, headers)
        assert headers["content-security-policy"] == csp and headers["cache-control"] == "no-cache"
    assert raw_get(srv.app.port, "/index.html")[2].decode() == body


@pytest.mark.parametrize("path", [
    "/static/../server/app.py",
    "/static/../../pyproject.toml",
    "/static/..%2fserver%2fapp.py",
    "/static/%2e%2e/server/app.py",
    "/static/./app.js",
    "/static//etc/passwd",
    "/static/",
    "/static/nope.js",
    "/static/.hidden",
    "/static/app.js/",
])
def test_unknown_and_traversal_paths_are_404(srv, path):
    status, headers, data = raw_get(srv.app.port, path)
    assert status == 404, (path, status, data[:200])
    assert headers["content-type"] == "application/json"
    assert json.loads(data)["error"] == "not_found"
    assert b"import" not in data and b"[project]" not in data


def test_page_is_public_but_streams_still_need_the_token(auth_srv):
    """The page holds no secret and loads without a token; its stream is what is checked."""
    status, headers, body = raw_get(auth_srv.app.port, "/")
    assert status == 200 and headers["content-type"].startswith("text/html") and b'id="start"' in body
    status, _, body = raw_get(auth_srv.app.port, "/v1/stream")
    assert status == 401, body
    status, _, body = raw_get(auth_srv.app.port, "/no-such-page")
    assert status == 401, "unknown paths stay behind the token check"


def test_files_are_read_once(monkeypatch):
    assert page_module.page_response("/static/app.js").status_code == 200  # loaded (or already cached)

    def no_disk(*args, **kwargs):
        raise AssertionError("a static file was read from disk again")

    monkeypatch.setattr(Path, "read_bytes", no_disk)
    monkeypatch.setattr(Path, "iterdir", no_disk)
    for path in ("/", "/index.html", "/static/app.js", "/static/style.css"):
        assert page_module.page_response(path).status_code == 200
    assert page_module.page_response("/metrics") is None and page_module.page_response("/v1/stream") is None


# ---------------------------------------------------------------------- in Chromium
def test_resampler_in_browser_passes_speech_and_rejects_aliases(browser, srv):
    """The shipped resampler.js, run by Chromium: speech frequencies pass, everything above
    8 kHz (which would alias into the speech band at 16 kHz) is removed."""
    page, errors = open_page(browser, f"http://127.0.0.1:{srv.app.port}/")
    gains = page.evaluate("""async () => {
        const { Resampler } = await import('/static/resampler.js');
        const out = {};
        for (const rate of [44100, 48000]) for (const f of [300, 1000, 3000, 6000, 9000, 12000, 20000]) {
            const r = new Resampler(rate, 16000);
            const x = new Float32Array(rate);
            for (let i = 0; i < x.length; i++) x[i] = 0.5 * Math.sin(2 * Math.PI * f * i / rate);
            const parts = [];
            for (let i = 0; i < x.length; i += 128) parts.push(r.process(x.subarray(i, i + 128)));
            const y = Float32Array.from(parts.flatMap(p => Array.from(p)));
            let e = 0; for (let i = 800; i < y.length - 800; i++) e += y[i] * y[i];
            out[`${rate}/${f}`] = [y.length, 20 * Math.log10(Math.sqrt(e / (y.length - 1600)) / (0.5 / Math.SQRT2))];
        }
        return out;
    }""")
    for key, (n, db) in gains.items():
        rate, f = map(int, key.split("/"))
        assert abs(n - 16000) <= 50, (key, n)  # one second in, one second out (less the look-ahead)
        if f <= 6000:
            assert abs(db) < 0.5, (key, db)
        else:
            assert db < -60, (key, db)
    assert not errors.errors, errors.errors
    page.close()


@pytest.mark.timing
def test_microphone_captions_in_chromium(browser, auth_srv):
    """Start -> fake microphone (jfk.wav) -> AudioWorklet -> 16 kHz PCM -> server -> captions.
    A claim about time (partials shown while the microphone plays at real time, a final
    latency bound): it runs with no other test beside it."""
    reference = TRANSCRIPTS[MIC_CLIP.name]
    page, errors = open_page(browser, f"http://127.0.0.1:{auth_srv.app.port}/?token={TOKEN}")
    # The Start button is the first thing the keyboard reaches.
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "start"
    assert page.evaluate("document.getElementById('captions').getAttribute('aria-live')") == "polite"

    page.click("#start")
    page.wait_for_function("() => document.getElementById('status').dataset.state === 'live'", timeout=15_000)
    assert page.text_content("#status").startswith("Live")
    assert page.is_disabled("#start") and not page.is_disabled("#stop")
    # The page names the rate its AudioContext runs at, which it resamples from.
    status = page.text_content("#status")
    assert re.fullmatch(r"Live \(microphone, (44100|48000|\d+) Hz → 16 kHz\)", status), status

    # A partial with words (not just the "…" of speech_started), caught on screen.
    page.wait_for_function("""() => [...document.querySelectorAll('#captions .partial')]
                              .some(e => e.textContent.replace('…', '').trim())""", timeout=30_000)
    screenshot(page, "microphone-partial.png")
    texts = wait_for_text(page, reference, timeout_s=40)
    shot = screenshot(page, "microphone.png")

    page.click("#stop")
    page.wait_for_function("() => document.getElementById('status').dataset.state === 'closed'", timeout=20_000)
    texts = final_texts(page)
    assert word_error_rate([reference], [" ".join(texts)]) <= MAX_WER, texts
    assert not page.is_disabled("#start")

    states = page.evaluate("window.__states")
    assert states[:2] == ["idle", "connecting"] and "live" in states and states[-1] == "closed", states
    # Partials are greedy re-decodes of the open segment every partial_interval_ms (500 ms
    # here); the clip's 2-4 segments of 1.5-8 s each get several chances before their finals.
    partials = [p for p in page.evaluate("window.__partials") if p["text"].strip("… ")]
    assert partials, "no partial caption was shown"
    assert all(p["cls"] == "partial" and p["fontStyle"] == "italic" for p in partials), partials[:3]
    assert page.locator("#captions .partial").count() == 0, "a partial outlived its final"
    final_color = page.eval_on_selector("#captions .final .text", "e => getComputedStyle(e).color")
    assert partials[0]["color"] != final_color, "partials must look different from finals"

    assert page.text_content("#language") == "en"
    latency = float(page.get_attribute("#latency", "data-seconds"))
    assert 0 < latency < 15, latency
    assert re.fullmatch(r"\d+\.\d\d s \(average \d+\.\d\d s over \d+\)", page.text_content("#latency"))
    check_transcript_downloads(page, texts, reference)
    assert not errors.errors, errors.errors
    print(f"microphone captions {texts!r}, final latency {latency:.2f} s, screenshot {shot}")
    page.close()


def test_file_captions_in_chromium(browser, srv):
    """An audio file chosen in the file picker, streamed at real-time pace, captioned."""
    reference = TRANSCRIPTS[FILE_CLIP.name]
    page, errors = open_page(browser, f"http://127.0.0.1:{srv.app.port}/")
    t0 = time.monotonic()
    page.set_input_files("#file", str(FILE_CLIP))
    page.wait_for_function("() => document.getElementById('status').dataset.state === 'closed'", timeout=40_000)
    elapsed = time.monotonic() - t0
    duration = len(read_clip(FILE_CLIP)) / 16000
    # Real-time pace: the stream cannot end before the clip's own length has passed.
    assert elapsed >= duration - 0.2, (elapsed, duration)
    texts = final_texts(page)
    assert texts and word_error_rate([reference], [" ".join(texts)]) <= MAX_WER, texts
    states = page.evaluate("window.__states")
    assert "live" in states and "finishing" in states and states[-1] == "closed", states
    assert page.text_content("#language") == "en"
    check_transcript_downloads(page, texts, reference)
    screenshot(page, "file.png")
    assert not errors.errors, errors.errors
    page.close()


def test_refused_stream_shows_the_servers_reason(browser, auth_srv):
    """Without the token the handshake fails; the page says why, in the server's words."""
    page, _ = open_page(browser, f"http://127.0.0.1:{auth_srv.app.port}/")
    page.set_input_files("#file", str(FILE_CLIP))
    page.wait_for_function("() => document.getElementById('status').dataset.state === 'error'", timeout=20_000)
    status = page.text_content("#status")
    assert "requires a token" in status and "401" in status, status
    assert not page.is_disabled("#start") and page.is_disabled("#stop")
    # The page unfolds the token field for the user; a wrong token is named as such.
    assert page.evaluate("document.getElementById('settings').open") is True
    assert page.evaluate("document.activeElement.id") == "token"
    screenshot(page, "refused.png")
    page.fill("#token", "not-the-token")
    page.set_input_files("#file", str(FILE_CLIP))
    page.wait_for_function("() => document.getElementById('status').textContent.includes('not valid')", timeout=20_000)
    page.close()
