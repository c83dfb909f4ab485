"""What one client chose for its stream, in no dialect's words.

Every protocol adapter (native, FunASR, ...) parses its own messages and builds a
``StreamConfig``; the session sees only this. Adding a dialect adds a parser, never a
session field named after a wire format.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class StreamConfig:
    sample_rate: int = 16000  # Hz of the audio the client sends, one of STANDARD_RATES; resampled to 16 kHz
    encoding: str = "pcm_s16le"  # one of server.audio.codecs.ENCODINGS
    language: str = "auto"  # "auto" or a language code the model accepts
    interim_results: bool = True  # send partials
    endpointing_ms: int | None = None  # trailing silence that ends a segment; None = server default
    max_segment_ms: int | None = None  # longest segment; None = server default
    partial_words: bool = False  # word timings in partials too (finals always carry them)
    itn: bool | None = None  # inverse text normalisation where the model has it (SenseVoice); None = server default
    partial_interval_ms: int | None = None  # partials at most this often; None = server default (never faster than it)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
