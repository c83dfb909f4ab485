"""`chorus transcribe` on the file path (server/files/), in-process through server.cli.main:
real clips in several codecs, a long recording, subtitles, progress, bad files, and
`--server` against a real running server's HTTP API.

The CLI's model is the session's loaded Whisper runner, handed in through `server.cli._load_runner`
(the same runner config the CLI builds; building and loading one is tests/test_cli.py's, which
runs `chorus` as a process). The ~50 s long file is transcribed once per module; the subtitle
test renders that same transcription through the CLI.
"""

from __future__ import annotations

import dataclasses
import contextlib
import io
import json
import re
from pathlib import Path

import av
import numpy as np
import pytest

import server.transport.api  # noqa: F401  the server's HTTP API, which `--server` talks to: a plain import, not a skip
from server import cli
from server.cli import main
from server.files.client import LocalTranscriber
from server.wer import word_error_rate
from tests import audiofiles
from tests.ports import free_port
from tests.serverharness import CLIPS, TRANSCRIPTS, ServerThread, make_config, read_clip
from tests.waiting import wait_until

JFK = next(c for c in CLIPS if c.name == "jfk.wav")
AUSTEN = [c for c in CLIPS if c.name != "jfk.wav"]
GAP_S = 2.0  # silence between clips in the long file: well over vad.endpoint_ms, so each clip ends a segment
CUE_RE = re.compile(r"^(\d\d):(\d\d):(\d\d)[,.](\d\d\d) --> (\d\d):(\d\d):(\d\d)[,.](\d\d\d)$")


def encode(path: Path, audio: np.ndarray, fmt: str) -> Path:
    """Write 16 kHz mono float audio as a file of format ``fmt`` (tests/audiofiles.py)."""
    path.write_bytes(audiofiles.encode(audio, fmt)[1])
    return path


@pytest.fixture(scope="module")
def long_file(tmp_path_factory) -> tuple[Path, list[tuple[str, float, float]]]:
    """An MP3 of every Austen clip then JFK, with silences: (path, [(clip, start_s, end_s)])."""
    gap = np.zeros(int(GAP_S * 16000), np.float32)
    parts, spans, t = [gap], [], GAP_S
    for clip in AUSTEN + [JFK]:
        audio = read_clip(clip)
        spans.append((clip.name, t, t + len(audio) / 16000))
        parts += [audio, gap]
        t += len(audio) / 16000 + GAP_S
    path = encode(tmp_path_factory.mktemp("long") / "long.mp3", np.concatenate(parts), "mp3")
    assert t > 45  # longer than Whisper's window, and than files.max_segment_s
    return path, spans


@pytest.fixture(scope="module", autouse=True)
def loaded_model(whisper_runner):
    """The CLI gets the session's loaded runner instead of building and loading its own, when
    the config asks for the same model (anything else would not be what the CLI runs)."""
    def load(config):
        # The same model; the thread count is the test worker's (tests/conftest.py).
        assert config.runner == dataclasses.replace(whisper_runner.config, num_threads=config.runner.num_threads), config.runner
        return whisper_runner

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "_load_runner", load)
        yield


@pytest.fixture(scope="module")
def long_run(long_file):
    """`chorus transcribe --format verbose_json --progress` of the long file, once: (exit code,
    stdout, stderr, the FileTranscript the file path returned)."""
    path, _ = long_file
    made: dict = {}
    real = LocalTranscriber.transcribe

    async def record(self, p, on_segment, duration_s):
        made[(Path(p), self.options)] = t = await real(self, p, on_segment, duration_s)
        return t

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setattr(LocalTranscriber, "transcribe", record)
        code = main(["transcribe", "--language", "en", "--format", "verbose_json", "--progress", str(path)])
    return code, out.getvalue(), err.getvalue(), made


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["transcribe", *args])
    out, err = capsys.readouterr()
    return code, out, err


def cue_times(lines: list[str]) -> list[tuple[int, int]]:
    times = []
    for line in lines:
        m = CUE_RE.match(line)
        if m:
            h1, m1, s1, ms1, h2, m2, s2, ms2 = map(int, m.groups())
            times.append(((h1 * 60 + m1) * 60_000 + s1 * 1000 + ms1, (h2 * 60 + m2) * 60_000 + s2 * 1000 + ms2))
    return times


def check_cue_times(times: list[tuple[int, int]], duration_ms: float) -> None:
    assert times
    assert all(0 <= a < b <= duration_ms for a, b in times), times
    assert all(b1 <= a2 for (_, b1), (a2, _) in zip(times, times[1:])), times  # in order, not overlapping


def test_local_decodes_any_format(tmp_path, capsys):
    clip = read_clip(AUSTEN[0])
    files = [JFK,
             encode(tmp_path / "a.mp3", clip, "mp3"),
             encode(tmp_path / "b.ogg", read_clip(AUSTEN[2]), "opus"),
             encode(tmp_path / "c.flac", read_clip(AUSTEN[3]), "flac")]
    refs = [TRANSCRIPTS[JFK.name], TRANSCRIPTS[AUSTEN[0].name], TRANSCRIPTS[AUSTEN[2].name], TRANSCRIPTS[AUSTEN[3].name]]
    code, out, err = run(capsys, "--language", "en", "--json", *map(str, files))
    assert code == 0, err
    results = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["file"] for r in results] == [str(f) for f in files]  # in the order given, though run at once
    for r, ref, f in zip(results, refs, files):
        assert r["text"] and word_error_rate([ref], [r["text"]]) < 0.15, (f, r["text"])
        assert abs(r["seconds"] - av.open(str(f)).duration / av.time_base) < 0.2, r
        assert r["segments"] and all(s["end_ms"] > s["start_ms"] for s in r["segments"])
        words = [w for s in r["segments"] for w in s["words"]]
        assert words and all(a["end_ms"] <= b["start_ms"] for a, b in zip(words, words[1:]))

    # Plain text of several files: `path: text` lines, in order.
    code, out, err = run(capsys, "--language", "en", str(files[1]), str(files[3]))
    assert code == 0, err
    lines = out.strip().splitlines()
    assert [line.split(": ", 1)[0] for line in lines] == [str(files[1]), str(files[3])]
    assert word_error_rate([refs[1]], [lines[0].split(": ", 1)[1]]) < 0.15, lines


def test_long_file_segments_in_order_with_progress(long_file, long_run):
    path, spans = long_file
    code, out, err, _ = long_run
    assert code == 0, err
    body = json.loads(out)
    segments = [s for s in body["segments"] if s["text"]]
    assert len(segments) >= len(spans)  # each clip ended a segment at its silence
    assert [s["id"] for s in body["segments"]] == list(range(len(body["segments"])))
    assert all(a["end"] <= b["start"] for a, b in zip(body["segments"], body["segments"][1:]))
    assert abs(body["duration"] - spans[-1][2] - GAP_S) < 0.2
    # The text covers every clip, each where it was placed in the file.
    for name, start, end in spans:
        inside = " ".join(s["text"] for s in segments if start - 0.5 <= (s["start"] + s["end"]) / 2 <= end + 0.5)
        assert word_error_rate([TRANSCRIPTS[name]], [inside]) < 0.2, (name, inside)
    ref = " ".join(TRANSCRIPTS[name] for name, _, _ in spans)
    assert word_error_rate([ref], [body["text"]]) < 0.15, body["text"]
    assert body["words"] and all(a["end"] <= b["start"] for a, b in zip(body["words"], body["words"][1:]))
    # The bar moved through the file segment by segment, then ended full.
    shown = [int(p) for p in re.findall(r"(\d+)%\|", err)]
    assert len([p for p in shown if 0 < p < 100]) >= 3, err
    assert shown == sorted(shown) and shown[-1] == 100, err


def test_subtitles_are_well_formed(long_file, long_run, tmp_path, capsys, monkeypatch):
    path, spans = long_file
    made = long_run[3]
    real = LocalTranscriber.transcribe
    replayed = []

    async def replay(self, p, on_segment, duration_s):
        # The long file's transcription from `long_run` (same file, same item options: words on,
        # language en); anything else goes to the model.
        if (Path(p), self.options) in made:
            replayed.append(p)
            return made[(Path(p), self.options)]
        return await real(self, p, on_segment, duration_s)

    monkeypatch.setattr(LocalTranscriber, "transcribe", replay)
    code, out, err = run(capsys, "--language", "en", "--format", "srt", "--no-progress", str(path))
    assert code == 0 and replayed == [path], (err, replayed)
    assert not err
    blocks = out.strip().split("\n\n")
    assert len(blocks) >= len(spans)
    for i, block in enumerate(blocks, start=1):
        lines = block.split("\n")
        assert lines[0] == str(i) and CUE_RE.match(lines[1]) and "," in lines[1] and lines[2].strip(), block
    duration_ms = spans[-1][2] * 1000 + GAP_S * 1000
    check_cue_times(cue_times(out.splitlines()), duration_ms)
    text = " ".join(line for b in blocks for line in b.split("\n")[2:])
    ref = " ".join(TRANSCRIPTS[name] for name, _, _ in spans)
    assert word_error_rate([ref], [text]) < 0.15, text

    # WebVTT, several files written to a folder.
    flac = encode(tmp_path / "austen.flac", read_clip(AUSTEN[1]), "flac")
    code, out, err = run(capsys, "--language", "en", "-f", "vtt", "-o", str(tmp_path / "subs"), str(JFK), str(flac))
    assert code == 0, err
    for name, clip, seconds in (("jfk.vtt", JFK.name, 11.0), ("austen.vtt", AUSTEN[1].name, len(read_clip(AUSTEN[1])) / 16000)):
        vtt = (tmp_path / "subs" / name).read_text()
        assert vtt.startswith("WEBVTT\n\n"), vtt
        blocks = vtt[len("WEBVTT\n\n"):].strip().split("\n\n")
        assert all(CUE_RE.match(b.split("\n")[0]) and "." in b.split("\n")[0] for b in blocks), vtt
        check_cue_times(cue_times(vtt.splitlines()), seconds * 1000)
        text = " ".join(line for b in blocks for line in b.split("\n")[1:])
        assert word_error_rate([TRANSCRIPTS[clip]], [text]) < 0.15, text


def test_bad_files_fail_clearly(tmp_path, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("not audio at all")
    fake = tmp_path / "song.mp3"
    fake.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    missing = tmp_path / "missing.wav"
    code, out, err = run(capsys, str(notes), str(fake), str(missing), str(JFK))
    assert code == 1
    lines = err.strip().splitlines()
    for p in (notes, fake, missing):
        assert any(line.startswith(f"error: {p}: ") for line in lines), err
    assert "no such file" in err and "not a decodable audio file" in err
    assert "Traceback" not in err
    assert out.strip().splitlines()[-1].startswith(f"{JFK}: ") and "country" in out  # the good file still came out

    code, out, err = run(capsys, "--set", "files.max_audio_s=5", str(JFK))
    assert code == 1 and f"error: {JFK}: " in err and "longer than 5 s" in err, err
    assert out == ""

    # Usage errors: exit 2 before any model is loaded.
    assert run(capsys, "-f", "srt", str(JFK), str(JFK))[0] == 2
    assert run(capsys, "--server", "ftp://example.com", str(JFK))[0] == 2
    with pytest.raises(SystemExit) as e:
        run(capsys, "--json", "--format", "srt", str(JFK))
    assert e.value.code == 2


def test_against_a_running_server(whisper_runner, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CHORUS_TOKEN", raising=False)
    tokens = tmp_path / "tokens"
    tokens.write_text("s3cret\n")
    mp3 = encode(tmp_path / "austen.mp3", read_clip(AUSTEN[4]), "mp3")
    with ServerThread(make_config(**{"server.auth_tokens_file": str(tokens)}), whisper_runner) as server:
        wait_until(lambda: server.app.ready, 60, what="server ready")
        url = f"http://127.0.0.1:{server.app.api_port}"

        code, out, err = run(capsys, "--server", url, "--token", "s3cret", "--language", "en", "-f", "verbose_json",
                             "--progress", str(JFK), str(mp3))
        assert code == 0, err
        results = [json.loads(line) for line in out.strip().splitlines()]
        assert [r["file"] for r in results] == [str(JFK), str(mp3)]
        for r, name in zip(results, (JFK.name, AUSTEN[4].name)):
            assert word_error_rate([TRANSCRIPTS[name]], [r["text"]]) < 0.15, r["text"]
            assert r["segments"] and all(a["end"] <= b["start"] for a, b in zip(r["segments"], r["segments"][1:]))
            words = r["words"]  # on the file's clock, in order, inside the speech
            assert words and r["segments"][0]["start"] <= words[0]["start"] and words[-1]["end"] <= r["segments"][-1]["end"]
            assert all(a["end"] <= b["start"] for a, b in zip(words, words[1:]))
            assert r["language"] == "en"
        assert abs(results[0]["duration"] - 11.0) < 0.1
        assert re.search(r"jfk\.wav: 100%\|", err), err

        # The token from the environment, and subtitles built from the streamed segments' words.
        monkeypatch.setenv("CHORUS_TOKEN", "s3cret")
        code, out, err = run(capsys, "--server", url + "/", "-f", "srt", "--no-progress", str(JFK))
        assert code == 0, err
        check_cue_times(cue_times(out.splitlines()), 11_000)
        assert "country" in out
        monkeypatch.delenv("CHORUS_TOKEN")

        code, out, err = run(capsys, "--server", url, str(JFK))
        assert code == 1 and out == ""
        assert "HTTP 401" in err and "--token" in err and len(err.strip().splitlines()) == 1, err

        bad = tmp_path / "notes.txt"
        bad.write_text("not audio at all")
        code, out, err = run(capsys, "--server", url, "--token", "s3cret", str(bad), str(JFK))
        assert code == 1
        assert f"error: {bad}: the server answered HTTP 400: the file could not be decoded" in err, err
        assert "country" in out

    code, out, err = run(capsys, "--server", f"http://127.0.0.1:{free_port()}", str(JFK), str(mp3))
    assert code == 1 and out == ""
    assert "cannot reach the server" in err and len(err.strip().splitlines()) == 1, err
