"""The FunASR-compatible listener, over real sockets, with the real Whisper model.

The client (tests/funasrclient.py) is written from FunASR's protocol document, not from
FunASR's client code. Every mode (online, offline, 2pass) at 16 and 8 kHz streams real
speech; the checks are the message shapes FunASR clients parse, ``is_final``, the
``timestamp`` string, and the text (word error rate against the clips' transcripts).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl

import numpy as np
import pytest
import soxr
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from server.cli import _config, build_parser
from server.config import ConfigError
from server.runners import create_runner
from server.runners.random_weights import write_sensevoice_dir
from server.transport import funasr as funasr_transport
from server.wer import normalize_text
from tests import audiofiles
from tests.funasrclient import FunasrRun, run_funasr
from tests.ports import free_port
from tests.test_security import make_cert
from tests.serverharness import DATA, TRANSCRIPTS, ServerThread, make_config, pcm16, read_clip, stream_audio
from tests.serverharness import clip_wer as wer
from tests.waiting import async_wait_until

JFK = DATA / "jfk.wav"
LONG = DATA / "sense_and_sensibility_01_austen_64kb-0870.wav"
SHORT = DATA / "sense_and_sensibility_01_austen_64kb-0880.wav"
RESULT_KEYS = {"mode", "wav_name", "text", "is_final"}
STAMP_KEYS = {"timestamp", "stamp_sents"}
SENTENCE_KEYS = {"slice_type", "index", "start_time", "end_time"}  # FunASR's C++ runtime's


def pcm_at(path, rate: int) -> bytes:
    x = read_clip(path)
    if rate != 16000:
        x = soxr.resample(x, 16000, rate)
    return pcm16(x)


@pytest.fixture(scope="module")
def fa(whisper_runner):
    with ServerThread(make_config(**{"funasr.port": free_port()}), whisper_runner) as s:
        s.funasr_url = f"ws://127.0.0.1:{s.app.funasr_port}"
        yield s


def fed_s(srv: ServerThread) -> float:
    """Seconds of audio the server's sessions have been fed (in-process: also after it stopped listening)."""
    return srv.app.metrics.registry.get_sample_value("chorus_audio_seconds_total") or 0.0


def check_stamps(result: dict, clip_ms: int) -> list[list[int]]:
    """`timestamp` is a string of [start, end] pairs, one per word, inside the audio, in order;
    `stamp_sents` cuts the same pairs into sentences."""
    assert isinstance(result["timestamp"], str), result
    pairs = json.loads(result["timestamp"])
    words = [w for w in result["text"].split() if any(c.isalnum() for c in w)]
    assert len(pairs) == len(words), (pairs, words)
    for (s, e), nxt in zip(pairs, pairs[1:] + [[clip_ms, clip_ms]]):
        assert isinstance(s, int) and isinstance(e, int) and 0 <= s <= e <= clip_ms + 100, pairs
        assert s <= nxt[0], pairs
    sents = result["stamp_sents"]
    assert [p for s in sents for p in s["ts_list"]] == pairs
    assert " ".join(s["text_seg"] for s in sents).split() == [w.strip(",.?!;:") for w in words]
    for s in sents:
        assert s["start"] == s["ts_list"][0][0] and s["end"] == s["ts_list"][-1][1]
        assert s["punc"] in ("", ",", ".", "?", "!", ";", ":")
    return pairs


def check_shapes(run: FunasrRun, mode: str, wav_name: str, clip_ms: int, is_final: str = "runtime") -> None:
    """The messages of one utterance, ended by `is_end`. `is_final`: "runtime" (the default), as
    FunASR's C++ runtime marks it (only the answer to the end of audio is final), or
    "per_sentence", as FunASR's Python server does."""
    assert not run.errors(), run.errors()
    results = run.results()
    assert results, run.messages
    for m in results:
        assert m["wav_name"] == wav_name
        assert RESULT_KEYS <= set(m) <= RESULT_KEYS | STAMP_KEYS | SENTENCE_KEYS, m
        assert isinstance(m["text"], str) and isinstance(m["is_final"], bool)
    if mode == "offline":
        # One answer per end of audio, with every sentence, final.
        assert len(results) == 1 and results[0]["mode"] == "offline" and results[0]["is_final"] is True
        assert not SENTENCE_KEYS & set(results[0])
        check_stamps(results[0], clip_ms)
    elif mode == "2pass":
        assert {m["mode"] for m in results} <= {"2pass-online", "2pass-offline"}
        for m in results:
            if is_final == "per_sentence":
                # Online increments are not final; each corrected sentence is (FunASR's Python server).
                assert m["is_final"] is (m["mode"] == "2pass-offline"), m
            if m["mode"] == "2pass-offline" and m is results[-1] and not STAMP_KEYS & set(m):
                # The runtime's answer to the end of audio when no sentence was left open.
                assert is_final == "runtime" and m == {"mode": "2pass-offline", "wav_name": wav_name, "text": "",
                                                       "is_final": True}, m
                continue
            assert (STAMP_KEYS <= set(m)) is (m["mode"] == "2pass-offline"), m
            if m["mode"] == "2pass-offline":
                check_stamps(m, clip_ms)
                assert m["slice_type"] == 2 and 0 <= m["start_time"] < m["end_time"] <= clip_ms + 100, m
            else:
                assert m["text"], m  # increments carry new text only
                assert not {"start_time", "end_time"} & set(m), m
        check_sentence_numbers([m for m in results if "index" in m], ended=True)
        sentences = [m for m in results if m["mode"] == "2pass-offline" and "index" in m]
        assert [m["index"] for m in sentences] == list(range(len(sentences)))
        times = [t for m in sentences for t in (m["start_time"], m["end_time"])]
        assert times == sorted(times), times
    else:
        assert {m["mode"] for m in results} == {"online"}
        assert not any(STAMP_KEYS & set(m) for m in results)
        assert results[-1]["is_final"] is True  # the last sentence's end, or the answer to the end of audio
        check_sentence_numbers([m for m in results if "index" in m], ended=False)
        assert all("index" in m for m in results if m["text"])
    if is_final == "runtime":
        # Final: the answer to is_speaking false, and nothing before it.
        assert [m["is_final"] for m in results] == [False] * (len(results) - 1) + [True], results
    ack = run.ack()
    assert ack == {"mode": mode, "wav_name": wav_name, "is_final": True, "is_end": True}, run.messages[-3:]
    assert run.messages[-1] is ack


def check_sentence_numbers(msgs: list[dict], ended: bool) -> None:
    """`index` numbers the sentences from 0, in order; `slice_type` is 0 on a sentence's first
    online message and 1 on its later ones; with `ended` (2pass) each sentence ends in one
    2pass-offline message, slice_type 2."""
    indexes = [m["index"] for m in msgs]
    assert all(b - a in (0, 1) for a, b in zip([-1] + indexes, indexes)), indexes
    for i in sorted(set(indexes)):
        types = [m["slice_type"] for m in msgs if m["index"] == i]
        online = [0] + [1] * (len(types) - 1 - ended)
        assert types == (online[:len(types) - 1] + [2] if ended else online), (i, types)


FIRST = {"chunk_size": [5, 10, 5], "chunk_interval": 10, "wav_name": "jfk", "is_speaking": True, "itn": True,
         "hotwords": json.dumps({"Americans": 20})}


@pytest.mark.timing
def test_online_text_arrives_while_the_speaker_speaks_as_increments(fa):
    """A real-time online stream: text arrives while the speaker is still speaking, as
    increments that add up (no word repeated), and the text is right. The suite's one
    real-time FunASR stream (the claim is about time: it runs alone)."""
    run = asyncio.run(run_funasr(fa.funasr_url, pcm_at(JFK, 16000), {**FIRST, "mode": "online"},
                                 subprotocols=["binary"]))
    check_shapes(run, "online", "jfk", 11000)
    early = [t for m, t in zip(run.messages, run.times) if m.get("mode") == "online" and not m["is_final"]]
    assert early and early[0] < run.audio_done_at, run.messages  # while the client still speaks
    assert wer(JFK, run.text()) <= 0.1, run.text()
    # Append-only: the increments and the sentences' rests spell each word once.
    words = normalize_text(run.text()).split()
    assert words[:5] == ["and", "so", "my", "fellow", "americans"], words
    assert len(words) <= len(normalize_text(TRANSCRIPTS["jfk.wav"]).split()) + 1, words


def test_2pass_sentences_with_the_settings_funasr_clients_send(fa):
    """2pass with the settings FunASR's clients send (chunk_size, hotwords, itn): the message
    shapes, one corrected sentence per sentence of the clip, the space between sentences, the
    text. Faster than real time: that online text arrives while the speaker speaks is
    test_online_text_arrives_while_the_speaker_speaks_as_increments's claim."""
    run = asyncio.run(run_funasr(fa.funasr_url, pcm_at(JFK, 16000), {**FIRST, "mode": "2pass"},
                                 subprotocols=["binary"], speed=None))
    check_shapes(run, "2pass", "jfk", 11000)
    assert wer(JFK, run.text()) <= 0.1, run.text()
    offline = [m for m in run.results() if m["mode"] == "2pass-offline"]
    assert len(offline) >= 2  # the clip has two sentences, cut at its pause
    # A client concatenating sentences gets the space between them, and none before the first.
    assert not offline[0]["text"].startswith(" ") and all(m["text"].startswith(" ") for m in offline[1:])
    assert wer(JFK, "".join(m["text"] for m in offline)) <= 0.1


@pytest.mark.parametrize("mode", ["2pass", "online", "offline"])
def test_a_client_of_funasrs_runtime_gets_every_sentence(fa, mode):
    """As clients written for FunASR's C++ runtime (its Docker images) read: every message until
    the first with `is_final` true, then close. `is_final` is true only on the answer to
    `is_speaking: false`, so a two-sentence recording comes back whole, not cut after its first
    sentence. Sent faster than real time: the claim is not about timing."""
    run = asyncio.run(run_funasr(fa.funasr_url, pcm_at(JFK, 16000), {"mode": mode, "wav_name": "rt"},
                                 end={"is_speaking": False}, until_final=True, speed=None))
    results = run.results()
    assert not run.errors() and results and results[-1] is run.messages[-1], run.messages
    assert [m["is_final"] for m in results] == [False] * (len(results) - 1) + [True], results
    if mode == "2pass":
        sentences = [m for m in results if m["mode"] == "2pass-offline" and m["text"]]
        assert len(sentences) >= 2, results  # the clip has two sentences, cut at its pause
        assert [m["index"] for m in sentences] == list(range(len(sentences)))
    assert wer(JFK, run.text()) <= 0.1, run.text()


@pytest.mark.parametrize("mode", ["2pass", "online"])
def test_funasr_python_from_pypi_gets_every_sentence(fa, mode):
    """A FunASR client no one here wrote: `funasr-python` (PyPI), `AsyncFunASRClient.
    recognize_file` with callbacks. It stops reading at the first `is_final` true; with
    per-sentence marking that was the first sentence, and the rest of the recording was lost."""
    from funasr_client import AsyncFunASRClient, AsyncSimpleCallback, ClientConfig, RecognitionMode

    texts: list[tuple[bool, str]] = []
    errors: list = []

    async def partial(result) -> None:
        texts.append((False, result.text))

    async def final(result) -> None:
        texts.append((True, result.text))

    async def error(e) -> None:
        errors.append(e)

    async def main():
        # 100 ms per audio message (chunk_interval, in ms here), sent as fast as it goes.
        config = ClientConfig(server_url=fa.funasr_url, mode=RecognitionMode(mode), chunk_interval=100, timeout=60.0,
                              auto_reconnect=False)
        client = AsyncFunASRClient(config=config)
        try:
            return await client.recognize_file(str(JFK), callback=AsyncSimpleCallback(partial, final, on_error=error))
        finally:
            await client.close()

    answer = asyncio.run(main())
    assert not errors and texts and texts[-1] == (True, answer.text) and [f for f, _ in texts].count(True) == 1, texts
    # The callbacks get the text stripped and without its mode: in online mode they are the
    # increments, which add up; in 2pass mode the increments and the sentences repeat each other,
    # so the check is that the last sentence came: the recording's last words, in order.
    heard = normalize_text(" ".join(t for _, t in texts)).split()
    if mode == "online":
        assert wer(JFK, " ".join(heard)) <= 0.1, texts
    tail = normalize_text(TRANSCRIPTS["jfk.wav"]).split()[-8:]  # "ask what you can do for your country"
    assert " ".join(tail) in " ".join(heard), texts


@pytest.fixture(scope="module")
def fa_per_sentence(whisper_runner):
    cfg = make_config(**{"funasr.port": free_port(), "funasr.is_final": "per_sentence"})
    with ServerThread(cfg, whisper_runner) as s:
        s.funasr_url = f"ws://127.0.0.1:{s.app.funasr_port}"
        yield s


@pytest.mark.parametrize("mode", ["2pass", "online"])
def test_per_sentence_marking_is_as_funasrs_python_server(fa_per_sentence, mode):
    """`funasr.is_final: per_sentence`: every 2pass sentence, and the last online message of each
    sentence, is final, as FunASR's Python server marks them (and as Chorus did before)."""
    run = asyncio.run(run_funasr(fa_per_sentence.funasr_url, pcm_at(JFK, 16000), {"mode": mode, "wav_name": "ps"},
                                 speed=None))
    check_shapes(run, mode, "ps", 11000, is_final="per_sentence")
    finals = [m for m in run.results() if m["is_final"]]
    assert len(finals) >= 2, run.results()  # one per sentence: the clip has two
    assert all(m["text"] for m in finals), finals
    assert wer(JFK, run.text()) <= 0.1, run.text()


def test_is_final_setting_is_checked():
    assert make_config().funasr.is_final == "runtime"
    with pytest.raises(ConfigError, match="funasr.is_final must be runtime or per_sentence"):
        make_config(**{"funasr.is_final": "per_word"})


@pytest.mark.parametrize("mode", ["2pass", "online", "offline"])
def test_8khz_audio_is_resampled(fa, mode):
    pcm = pcm_at(SHORT, 8000)
    run = asyncio.run(run_funasr(fa.funasr_url, pcm, {"mode": mode, "wav_name": "s", "audio_fs": 8000,
                                                      "chunk_size": "5,10,5", "is_speaking": True}, speed=None))
    clip_ms = len(pcm) * 1000 // 16000
    check_shapes(run, mode, "s", clip_ms)
    assert wer(SHORT, run.text()) <= 0.15, run.text()


def test_offline_16khz_long_clip(fa):
    pcm = pcm_at(LONG, 16000)
    run = asyncio.run(run_funasr(fa.funasr_url, pcm, {"mode": "offline", "wav_name": "long", "is_speaking": True},
                                 speed=None))
    check_shapes(run, "offline", "long", len(pcm) * 1000 // 32000)
    assert wer(LONG, run.text()) <= 0.1, run.text()


@pytest.mark.timing
def test_offline_whole_file_in_one_frame_with_a_bearer_key(whisper_runner, tmp_path):
    """As xiaozhi-esp32-server talks to FunASR: `Authorization: Bearer; <key>`, the settings, the
    whole utterance in one binary frame, `{"is_speaking": false}` (no is_end), then reads with a
    5 s timeout until a message with is_final true (its deadline: the test runs alone)."""
    tokens = tmp_path / "tokens"
    tokens.write_text("sesame\n")
    cfg = make_config(**{"funasr.port": free_port(), "server.auth_tokens_file": str(tokens)})
    pcm = pcm_at(SHORT, 16000)

    async def xiaozhi(key: str) -> str:
        async with connect(f"ws://127.0.0.1:{cfg.funasr.port}", additional_headers={"Authorization": f"Bearer; {key}"},
                           subprotocols=["binary"], ping_interval=None) as ws:
            await ws.send(json.dumps({"mode": "offline", "chunk_size": [5, 10, 5], "chunk_interval": 10,
                                      "wav_name": "xz", "is_speaking": True, "itn": False}))
            await ws.send(pcm)
            await ws.send(json.dumps({"is_speaking": False}))
            text = ""
            while True:
                msg = json.loads(await asyncio.wait_for(ws.recv(), timeout=5))
                text += msg.get("text", "")
                if msg.get("is_final", True):
                    return text

    with ServerThread(cfg, whisper_runner):
        text = asyncio.run(xiaozhi("sesame"))
        assert wer(SHORT, text) <= 0.1, text
        with pytest.raises(InvalidStatus) as refused:
            asyncio.run(xiaozhi("wrong"))
        assert refused.value.response.status_code == 401


@pytest.mark.parametrize("wav_format,fmt", [("wav", "wav"), ("ogg", "opus"), ("mp3", "mp3")])
def test_offline_files_are_decoded(fa, wav_format, fmt):
    pcm = pcm_at(SHORT, 16000)
    # A real file made with FFmpeg's encoders (PyAV), as a user's recorder would.
    _, data = audiofiles.encode(np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768, fmt)
    # Any message size: a file need not be cut at sample boundaries.
    run = asyncio.run(run_funasr(fa.funasr_url, data, {"mode": "offline", "wav_name": "f", "wav_format": wav_format,
                                                       "is_speaking": True}, chunk_bytes=7777, speed=None))
    check_shapes(run, "offline", "f", len(pcm) * 1000 // 32000 + 100)
    assert wer(SHORT, run.text()) <= 0.1, run.text()


def test_a_file_that_cannot_be_decoded_gets_an_error_and_an_empty_result(fa):
    run = asyncio.run(run_funasr(fa.funasr_url, b"\x00not audio\xff" * 500, {"mode": "offline", "wav_name": "bad",
                                                                            "wav_format": "mp3", "is_speaking": True},
                                 speed=None))
    assert [e["error"] for e in run.errors()] == ["bad_audio"], run.messages
    assert run.results() == [{"mode": "offline", "wav_name": "bad", "text": "", "is_final": True,
                              "timestamp": "[]", "stamp_sents": []}]
    ack = run.ack()
    assert ack is not None and ack["is_final"] is False and "bad_audio" in ack["error"]


def test_odd_sized_messages_and_two_utterances_on_one_connection(fa):
    """PCM16 in messages of any size (odd ones split samples), and a second utterance after the
    first one's `is_speaking: false`: each gets its own answer, its clock restarting at 0."""
    a, b = pcm_at(SHORT, 16000), pcm_at(JFK, 16000)

    async def main():
        out = []
        async with connect(fa.funasr_url, ping_interval=None) as ws:
            for name, pcm, end in (("a", a, {"is_speaking": False}), ("b", b, {"is_speaking": False, "is_end": True})):
                await ws.send(json.dumps({"mode": "offline", "wav_name": name, "is_speaking": True}))
                for i in range(0, len(pcm), 333):
                    await ws.send(pcm[i:i + 333])
                await ws.send(json.dumps(end))
                while True:
                    msg = json.loads(await asyncio.wait_for(ws.recv(), 60))
                    out.append(msg)
                    if msg.get("mode") == "offline" and name == "a" or msg.get("is_end"):
                        break
        return out

    msgs = asyncio.run(main())
    first, second, ack = msgs
    assert first["wav_name"] == "a" and wer(SHORT, first["text"]) <= 0.1, first
    assert second["wav_name"] == "b" and wer(JFK, second["text"]) <= 0.1, second
    assert json.loads(second["timestamp"])[0][0] < 1000  # "And" at 0.3 s of its own clock
    assert ack["is_end"] is True and ack["is_final"] is True


HOSTILE = [
    ("not json", "bad_json"),
    ("[1, 2, 3]", "bad_json"),
    ("[" * 50000, "bad_json"),
    (json.dumps({"mode": "bogus"}), "bad_config"),
    (json.dumps({"audio_fs": 12345}), "bad_config"),
    (json.dumps({"audio_fs": "sixteen thousand"}), "bad_config"),
    (json.dumps({"chunk_size": "a,b"}), "bad_config"),
    (json.dumps({"svs_lang": "xx"}), "bad_config"),
    (json.dumps({"mode": "2pass", "wav_format": "mp3"}), "bad_config"),
    (json.dumps({"is_speaking": "maybe"}), "bad_config"),
    (json.dumps({"mode": "offline", "wav_name": "z" * 30000, "hotwords": "x" * 30000}), None),
]


def test_hostile_first_messages_get_errors_and_other_sessions_keep_their_text(fa):
    async def hostile(text: str):
        async with connect(fa.funasr_url, ping_interval=None) as ws:
            await ws.send(text)
            await ws.send(json.dumps({"is_speaking": False, "is_end": True}))
            msgs = []
            try:
                async for raw in ws:
                    msgs.append(json.loads(raw))
                    assert len(raw) < 2000, raw[:200]  # no echo of the client's input
                    if msgs[-1].get("is_end"):
                        break
            except Exception:  # noqa: BLE001
                pass
        await ws.wait_closed()
        return msgs, ws.close_code

    async def main():
        good = asyncio.create_task(run_funasr(fa.funasr_url, pcm_at(JFK, 16000), {"mode": "2pass", "wav_name": "ok"},
                                              speed=6.0))  # still arriving while the hostile ones come
        bad = await asyncio.gather(*[hostile(text) for text, _ in HOSTILE])
        return await good, bad

    good, bad = asyncio.run(main())
    for (text, code), (msgs, close) in zip(HOSTILE, bad):
        if code is None:  # long but valid: accepted, names cut; an empty utterance is answered
            assert msgs[0]["mode"] == "offline" and msgs[0]["text"] == "" and len(msgs[0]["wav_name"]) == 256
            assert msgs[-1]["is_end"] is True
            continue
        assert len(msgs) == 1, (text[:40], msgs)
        assert msgs[0]["error"] == code and msgs[0]["is_final"] is True and "mode" not in msgs[0], msgs
        assert msgs[0]["text"] == "" and msgs[0]["message"]
        assert close == 1008, (text[:40], close)
    check_shapes(good, "2pass", "ok", 11000)
    assert wer(JFK, good.text()) <= 0.1
    assert fa.http("/healthz")[0] == 200


def test_tls_listener_uses_the_servers_certificate(whisper_runner, tmp_path):
    cert, key = make_cert(tmp_path)
    cfg = make_config(**{"funasr.port": free_port(), "server.tls_cert": str(cert), "server.tls_key": str(key)})
    context = ssl.create_default_context(cafile=str(cert))
    with ServerThread(cfg, whisper_runner):
        async def main():
            async with connect(f"wss://localhost:{cfg.funasr.port}", ssl=context, ping_interval=None) as ws:
                await ws.send(json.dumps({"mode": "offline", "wav_name": "tls"}))
                await ws.send(pcm_at(SHORT, 16000))
                await ws.send(json.dumps({"is_speaking": False}))
                return json.loads(await asyncio.wait_for(ws.recv(), 30))

        msg = asyncio.run(main())
    assert msg["mode"] == "offline" and wer(SHORT, msg["text"]) <= 0.1, msg


def test_hotwords_are_accepted_and_logged_once(fa, caplog, monkeypatch):
    monkeypatch.setattr(funasr_transport, "_hotwords_logged", False)
    first = {"mode": "offline", "wav_name": "h", "hotwords": "Dashwood 20"}

    async def main():
        for _ in range(2):
            await run_funasr(fa.funasr_url, pcm_at(SHORT, 16000)[:16000], first, speed=None)

    with caplog.at_level(logging.INFO, logger="server.transport.funasr"):
        asyncio.run(main())
    assert sum("hotwords" in r.getMessage() for r in caplog.records) == 1, caplog.text


def test_the_binary_subprotocol_is_accepted_not_required(fa):
    async def main(subprotocols):
        return await run_funasr(fa.funasr_url, pcm_at(SHORT, 16000)[:32000], {"mode": "offline"},
                                subprotocols=subprotocols, speed=None)

    assert asyncio.run(main(["binary"])).subprotocol == "binary"
    plain = asyncio.run(main(None))
    assert plain.subprotocol is None and plain.ack() is not None


def test_drain_sends_what_was_said_before_closing(whisper_runner):
    """SIGTERM's drain reaches FunASR clients too: an offline client gets its answer for the
    audio so far, then the close."""
    cfg = make_config(**{"funasr.port": free_port()})
    with ServerThread(cfg, whisper_runner) as srv:
        async def main():
            async with connect(f"ws://127.0.0.1:{cfg.funasr.port}", ping_interval=None) as ws:
                await ws.send(json.dumps({"mode": "offline", "wav_name": "d"}))
                pcm = pcm_at(SHORT, 16000)
                for i in range(0, len(pcm), 3200):
                    await ws.send(pcm[i:i + 3200])
                # Every sample reached the session before the drain begins.
                await async_wait_until(lambda: fed_s(srv) >= len(pcm) / 32000 - 0.01, 30, what="the clip fed")
                stopping = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(srv.app.stop(), srv.loop))
                msgs = [json.loads(m) async for m in ws]
                await stopping
                return msgs, ws.close_code

        msgs, code = asyncio.run(main())
    assert [m["mode"] for m in msgs] == ["offline"] and wer(SHORT, msgs[0]["text"]) <= 0.1, msgs
    assert code == 1001


def test_funasr_clients_count_against_the_same_session_limit(whisper_runner):
    cfg = make_config(**{"funasr.port": free_port(), "server.max_sessions": 1})
    with ServerThread(cfg, whisper_runner) as srv:
        async def main():
            async with connect(srv.url, ping_interval=None) as native_ws:
                await native_ws.send(json.dumps({"type": "start"}))
                assert json.loads(await native_ws.recv())["type"] == "ready"
                with pytest.raises(InvalidStatus) as refused:
                    async with connect(f"ws://127.0.0.1:{cfg.funasr.port}"):
                        pass
                return refused.value.response.status_code

        assert asyncio.run(main()) == 503


@pytest.fixture(scope="module")
def sv_runner(tmp_path_factory):
    model_dir = write_sensevoice_dir(tmp_path_factory.mktemp("sv") / "SenseVoiceSmall", scale="tiny", seed=1)
    cfg = make_config(**{"runner.name": "sensevoice", "runner.model": str(model_dir)})
    runner = create_runner(cfg.runner)
    runner.load()
    return cfg, runner


@pytest.mark.parametrize("keep", [True, False])
def test_sensevoice_tags_lead_each_sentence_unless_turned_off(sv_runner, keep):
    """Random weights (no real SenseVoice weights offline): the words are noise, but the
    `<|lang|><|EMO|><|Event|>` prefix that FunASR clients strip is there, or not."""
    base, runner = sv_runner
    cfg = make_config(**{"runner.name": "sensevoice", "runner.model": base.runner.model, "funasr.port": free_port(),
                         "funasr.keep_sensevoice_tags": str(keep).lower()})
    with ServerThread(cfg, runner):
        run = asyncio.run(run_funasr(f"ws://127.0.0.1:{cfg.funasr.port}", pcm_at(JFK, 16000),
                                     {"mode": "2pass", "wav_name": "sv", "svs_lang": "en", "svs_itn": True}, speed=None))
    sentences = [m["text"] for m in run.results() if m["mode"] == "2pass-offline" and m["text"].strip()]
    assert sentences, run.messages
    tagged = [t for t in sentences if t.lstrip().startswith("<|en|><|") and t.count("<|") == 3]
    assert len(tagged) == (len(sentences) if keep else 0), sentences
    if not keep:
        assert not any("<|" in t for t in sentences)


def test_cli_flag():
    """`--funasr-port` (a taken port is tests/test_listeners.py's)."""
    args = build_parser().parse_args(["serve", "--funasr-port", "0"])
    assert _config(args).funasr.port == 0
    assert _config(build_parser().parse_args(["serve"])).funasr.port == 10095


def test_native_streams_still_work_beside_the_funasr_listener(fa):
    log = asyncio.run(stream_audio(fa.url, read_clip(SHORT), speed=20.0))
    assert wer(SHORT, " ".join(f["text"] for f in log.of("final"))) <= 0.1
