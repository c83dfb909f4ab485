"""What one client chose for its stream, in no dialect's words.

Every protocol adapter (native, FunASR, ...) parses its own messages and builds a
``StreamConfig``; the session sees only this. Adding a dialect adds a parser, never a
session field named after a wire format.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Collection

# Error messages list the supported language codes up to about this many characters.
_LIST_CHARS = 700


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


def language_list(codes: Collection[str]) -> str:
    """The languages a model accepts, for a client's error message: "auto" first, then
    sorted; bounded, whatever the model's list."""
    ordered = (["auto"] if "auto" in codes else []) + sorted(c for c in codes if c != "auto")
    shown: list[str] = []
    used = 0
    for code in ordered:
        if used + len(code) + 2 > _LIST_CHARS:
            shown.append(f"... ({len(ordered) - len(shown)} more)")
            break
        shown.append(code)
        used += len(code) + 2
    return ", ".join(shown)
