"""The FunASR dialect's connection adapter (the listener on `funasr.port`, 10095).

One connection may carry several utterances or files, each ended by the client's
``{"is_speaking": false}``: each of them is one Session (its own clock from 0, as FunASR's
servers restart theirs), going through the same batcher, limits and admission as a
native stream. Modes map onto what a session produces:

- ``2pass``: partials become append-only ``2pass-online`` increments (protocol.funasr.
  OnlineText); every final is a ``2pass-offline`` sentence with ``timestamp``.
- ``online``: the same increments as ``online``; at a sentence's end the rest of its
  final text follows. Which messages carry ``is_final`` true (``funasr.is_final``), and
  the sentence fields, are protocol.funasr.Results's.
- ``offline``: no partials; the sentences are gathered and sent as one ``offline``
  message when the audio ends. With a ``wav_format`` other than pcm the audio is a file,
  decoded when it ends: in a worker thread, a chunk at a time, each chunk fed to the session
  in slices (``_FileFeed``), so the decoded audio held is a chunk, never the file.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
from typing import TYPE_CHECKING, Any, Awaitable, Iterator

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

from server.audio.codecs import AudioFormatError
from server.protocol import funasr
from server.protocol.funasr import FunasrError, FunasrSettings, OnlineText
from server.runners.base import Word
from server.session import Session
from server.stream_config import StreamConfig, language_list
from server.spacing import join
from server.transport import connection
from server.transport.connection import CLOSE_POLICY, Close, Connection

if TYPE_CHECKING:
    from server.app import ChorusServer

log = logging.getLogger(__name__)

# A large binary message (an offline client's whole file) is fed to its session in slices of
# this many bytes, waiting for backpressure between them, so a file's segments queue for the
# model a few at a time like a live stream's, and the loop serves other clients in between.
_SLICE_BYTES = 32000
_hotwords_logged = False


@dataclasses.dataclass
class _Sentence:
    text: str
    words: list[Word]


class FunasrConnection(Connection):
    """Implements SessionOutput for one client speaking FunASR's WebSocket protocol."""

    def __init__(self, app: "ChorusServer", ws: ServerConnection) -> None:
        super().__init__(app, ws)
        self.fcfg = app.config.funasr
        self.settings = FunasrSettings()
        self._round: FunasrSettings | None = None  # the settings the current utterance started with
        self._odd = b""  # a PCM16 message may end mid-sample: its last byte waits for the next
        self._file: io.BytesIO | None = None  # offline mode, non-pcm wav_format: the file so far
        self._feeding: _FileFeed | None = None  # that file once it ended, until all of it is fed
        self._sentences: list[_Sentence] = []  # offline mode: this utterance's finals so far
        self._online: dict[int, OnlineText] = {}
        # The end of what the client shows (its finished sentences, then the open one's online
        # text), for the space a client concatenating messages needs between sentences.
        self._final_text = ""
        self._online_text = ""
        self._errors: list[str] = []  # for the is_end acknowledgement
        self._results = funasr.Results(self.fcfg.is_final)  # is_final and sentence fields (2pass, online)

    # ------------------------------------------------------------------ SessionOutput
    def on_speech_started(self, segment_id: int, start_ms: int) -> None:
        self._online[segment_id] = OnlineText()

    def on_partial(self, segment_id: int, text: str, start_ms: int, end_ms: int, fields: dict[str, Any],
                   words: list[Word] | None = None) -> None:
        mode = self._mode
        tracker = self._online.get(segment_id)
        if mode == "offline" or tracker is None:
            return
        delta = tracker.partial(text)
        if delta:
            out = funasr.joiner(self._final_text + self._online_text, delta) + delta
            self._online_text += out
            self._send_all(self._results.online(funasr.mode_label(mode, True), self._wav_name, out))

    def on_final(self, segment_id: int, text: str, start_ms: int, end_ms: int, cut_ms: int, fields: dict[str, Any],
                 words: list[Word] | None = None) -> None:
        mode = self._mode
        tracker = self._online.pop(segment_id, None) or OnlineText()
        tags = funasr.sensevoice_tags(fields) if (text and self.fcfg.keep_sensevoice_tags) else ""
        words = words or []
        if mode == "offline":
            self._sentences.append(_Sentence(tags + text, words))
            return
        if mode == "online":
            # Clients show online text appended: the sentence's unsent rest completes it.
            shown = self._final_text + self._online_text
            rest = tracker.final(text)
            out = funasr.joiner(shown, rest) + rest
            self._final_text, self._online_text = (shown + out)[-64:], ""
            self._send_all(self._results.online_end(self._wav_name, out))
            return
        # 2pass: clients replace the sentence's online text with this one.
        out = funasr.joiner(self._final_text, tags + text) + tags + text
        self._final_text, self._online_text = (self._final_text + out)[-64:], ""
        self._send_all(self._results.sentence(self._wav_name, out, start_ms, end_ms, words))

    def report(self, code: str, message: str, fatal: bool) -> None:
        if not fatal:
            self._errors.append(f"{code}: {message}")
        self.send(funasr.error(self.settings.wav_name, code, message, fatal))

    # ------------------------------------------------------------------ helpers
    def _send_all(self, messages: list[str]) -> None:
        for text in messages:
            self.send(text)

    @property
    def _mode(self) -> str:
        return (self._round or self.settings).mode

    @property
    def _wav_name(self) -> str:
        return self.settings.wav_name

    def _stream_config(self, settings: FunasrSettings, pcm: bool) -> StreamConfig:
        language = settings.svs_lang or self.cfg.default_language.strip().lower()
        languages = self.app.runner.languages()
        if languages is not None and language not in languages:
            raise FunasrError("bad_config", f"svs_lang {language[:16]!r} is not supported by this model; "
                                            f"use one of: {language_list(languages)}")
        itn = settings.svs_itn if settings.svs_itn is not None else settings.itn
        return StreamConfig(
            sample_rate=settings.audio_fs if pcm else 16000,
            encoding="pcm_s16le" if pcm else "pcm_f32le",
            language=language,
            interim_results=settings.mode != "offline",
            itn=itn,
            partial_interval_ms=settings.chunk_ms,
        )

    def _begin_utterance(self, pcm: bool) -> Session:
        assert self.session is None
        self._round = self.settings
        stream = self._stream_config(self.settings, pcm)
        self.session = Session(self.app.config, stream, self.app.batcher, self, self.app.metrics)
        log.info("session %s started (funasr, mode %s, %d Hz, wav_name %r)", self.session.id,
                 self.settings.mode, stream.sample_rate, self.settings.wav_name[:64])
        return self.session

    async def _end_utterance(self, ack: bool, answer: bool = True) -> None:
        """The client's audio ended: recognise what is left, send what its mode owes, and
        (for ``is_end``) acknowledge. ``answer``: a streamed mode's end gets its final message
        even with nothing left to say (the client asked; not so when the connection ends)."""
        self.hold()
        if self._mode != "offline" and (answer or self.session is not None):
            self._results.end()
        if self._file is not None:
            self._feeding = _FileFeed(self._file, self._max_file_s())
            self._file = None
        if self._feeding is not None:
            # A drain may cancel this mid-feed and call it again (finish): the feed goes on from
            # where it was, so no audio reaches the session twice.
            await self._feed_file(self._feeding)
            self._feeding.close()
            self._feeding = None
        if self.session is not None:
            await self.session.stop()
            self.session.close()
        mode = self._mode
        self._send_all(self._results.ended(funasr.mode_label(mode, False), self._wav_name))
        if mode == "offline":
            text = join([s.text for s in self._sentences])
            words: list[Word] = [w for s in self._sentences for w in s.words]
            self.send(funasr.result("offline", self._wav_name, text, True, words))
        if ack:
            self.send(funasr.end_ack(mode, self._wav_name, self._errors))
        self.session = None
        self._round = None
        self._odd = b""
        self._sentences = []
        self._online = {}
        self._final_text = self._online_text = ""
        self._errors = []

    def _max_file_s(self) -> float:
        """Decoded seconds one file may have: `files.max_audio_s`, and no more than a session may
        last (`server.max_session_s`, when set)."""
        limit = self.app.config.files.max_audio_s
        return min(limit, self.cfg.max_session_s) if self.cfg.max_session_s > 0 else limit

    async def _feed_file(self, feed: "_FileFeed") -> None:
        """Feed what is left of ``feed`` to the session (begun at its first chunk); an
        undecodable or too long file gets an error, and what was fed of it is still recognised."""
        # Imported here: PyAV (FFmpeg, ~36 MB) is needed only by clients that send files, so a
        # machine without it (e.g. the air-gapped GPU kit) still serves every stream.
        from server.audio.media import AudioTooLong

        step = 2 * _SLICE_BYTES  # float32: one second of 16 kHz audio
        try:
            # Nobody to answer (kicked, or gone): decoding the rest would be wasted work.
            while not (self.kicked or self.ws.state is State.CLOSED):
                piece = await feed.next_slice(step)
                if piece is None:
                    return
                session = self.session or self._begin_utterance(pcm=False)
                session.feed_audio(piece)
                if session.held_back:
                    await self.backpressure()
                else:
                    await asyncio.sleep(0)
        except AudioTooLong as e:
            rest = "; the audio up to the limit is recognised" if self.session is not None else ""
            self.on_error("audio_too_long", f"{e} (files.max_audio_s){rest}", False)
        except AudioFormatError as e:
            self.on_error("bad_audio", f"the file could not be decoded: {e}", False)

    async def _feed(self, session: Session, data: bytes) -> None:
        await self.feed(session, data, _SLICE_BYTES * (2 if session.stream.encoding == "pcm_f32le" else 1))

    # ------------------------------------------------------------------ hooks
    async def finish(self, drain: bool) -> None:
        await self._end_utterance(ack=False, answer=False)

    async def on_text(self, text: str) -> Close | None:
        try:
            msg = funasr.parse_message(text, self.settings)
            if self.session is None and msg.is_speaking is not False:
                # Check now what the next utterance will need, so a bad setting is answered
                # at once rather than at the first audio.
                self._stream_config(msg.settings, msg.settings.is_pcm)
                if not msg.settings.is_pcm and msg.settings.mode != "offline":
                    raise FunasrError("bad_config", f"wav_format {msg.settings.wav_format!r} needs mode offline: "
                                                    "only PCM can be streamed (send files in offline mode)")
        except FunasrError as e:
            self.on_error(e.code, e.message, True)
            return CLOSE_POLICY, e.code
        if msg.hotwords_given:
            _log_hotwords_once(self.app.runner.name)
        self.settings = msg.settings
        if msg.is_speaking is False or msg.is_end:
            await self._end_utterance(ack=msg.is_end)
        return None

    def on_audio(self, data: bytes) -> Awaitable[None] | None:  # type: ignore[override]
        limit = self.fcfg.max_file_bytes
        if self.settings.mode == "offline" and not self.settings.is_pcm:
            self._file = self._file if self._file is not None else io.BytesIO()
            if self._file.tell() + len(data) > limit:
                self.on_error("file_too_large", f"the file exceeds funasr.max_file_bytes ({limit} bytes); dropped", False)
                self._file = io.BytesIO()
                return None
            self._file.write(data)
            return None
        if len(data) > limit:
            self.on_error("message_too_large", f"audio message of {len(data)} bytes exceeds {limit}; dropped", False)
            return None
        data = self._odd + data
        usable = len(data) - len(data) % 2
        self._odd = data[usable:]
        data = data[:usable]
        if not data:
            return None
        session = self.session
        if session is None:
            try:
                session = self._begin_utterance(pcm=True)
            except FunasrError as e:  # the server's default language is checked at load: not reached
                self.on_error(e.code, e.message, False)
                return None
        try:
            if len(data) <= _SLICE_BYTES:
                session.feed_audio(data)
                return None
        except AudioFormatError as e:
            self.on_error("bad_audio", f"{e}; message dropped", False)
            return None
        return self._feed(session, data)


class _FileFeed:
    """One offline file: decoded in a worker thread a chunk (10 s) at a time, handed out in
    slices. Its place survives an interruption: a drain that cancels the feed mid-file and
    then finishes it gets the next slice, not the file again, and a chunk whose decode was
    under way when the wait was cancelled is not lost (the wait is shielded)."""

    def __init__(self, file: io.BytesIO, max_seconds: float) -> None:
        from server.audio.media import iter_file

        file.seek(0)
        self._chunks: Iterator[np.ndarray] = iter_file(file, max_seconds)
        self._decoding: asyncio.Future[memoryview | None] | None = None
        self._chunk = memoryview(b"")
        self._pos = 0

    async def next_slice(self, size: int) -> memoryview | None:
        """The next ``size`` bytes of float32 audio (a view, not a copy), None at the end.
        Raises AudioFormatError as the decoder does."""
        if self._pos >= len(self._chunk):
            if self._decoding is None:
                # Decoding is seconds of CPU for a long file: not on the event loop.
                self._decoding = asyncio.get_running_loop().run_in_executor(None, _next_chunk, self._chunks)
            try:
                chunk = await asyncio.shield(self._decoding)
            finally:
                if self._decoding is not None and self._decoding.done():
                    self._decoding = None
            if chunk is None:
                return None
            self._chunk, self._pos = chunk, 0
        piece = self._chunk[self._pos:self._pos + size]
        self._pos += len(piece)
        return piece

    def close(self) -> None:
        """Stop decoding and close the file (after the decode under way, if one is)."""
        decoding, self._decoding = self._decoding, None
        if decoding is not None and not decoding.done():
            decoding.add_done_callback(lambda f: (f.cancelled() or f.exception(), self._chunks.close()))
        else:
            self._chunks.close()


def _next_chunk(chunks: Iterator[np.ndarray]) -> memoryview | None:
    """The next decoded chunk as bytes, without a copy (worker thread)."""
    chunk = next(chunks, None)
    return None if chunk is None else memoryview(chunk).cast("B")


def _log_hotwords_once(model: str) -> None:
    global _hotwords_logged
    if not _hotwords_logged:
        _hotwords_logged = True
        log.info("FunASR clients send hotwords; the %s model has no hotword biasing, so they are ignored", model)


async def handle(app: "ChorusServer", ws: ServerConnection) -> None:
    """websockets' handler for the FunASR listener; admission already counted this connection."""
    await connection.handle(app, ws, FunasrConnection(app, ws))


__all__ = ["FunasrConnection", "handle"]
