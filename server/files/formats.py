"""A file's transcript in the response formats of OpenAI's transcription API.

`text` (the text and a newline), `json` ({"text"}), `verbose_json` (duration, language,
segments with their times and the model's scores, words when asked for), `srt` and `vtt`
(subtitles). Subtitle cues are cut from the words where the model gave them, so a 30 s
segment becomes cues of a readable length instead of one half-minute caption.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from server.files.job import FileTranscript, Segment
from server.runners.base import Word
from server.spacing import join

FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
# A cue ends at a pause this long between words, or before it would pass either bound.
_CUE_PAUSE_MS = 700
_CUE_MAX_MS = 6000
_CUE_MAX_CHARS = 84  # two lines of 42, the common subtitle guideline


@dataclass(frozen=True)
class Cue:
    start_ms: int
    end_ms: int
    text: str


def as_json(t: FileTranscript) -> dict[str, Any]:
    return {"text": t.text, "usage": {"type": "duration", "seconds": round(t.duration_s, 3)}}


def as_verbose_json(t: FileTranscript, words: bool, segments: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {
        "task": "transcribe",
        "language": t.language or "",
        "duration": round(t.duration_s, 3),
        "text": t.text,
    }
    if segments:
        out["segments"] = [segment_json(s) for s in t.segments]
    if words:
        out["words"] = [word_json(w) for w in t.words]
    out["usage"] = {"type": "duration", "seconds": round(t.duration_s, 3)}
    return out


def segment_json(s: Segment) -> dict[str, Any]:
    """One segment as OpenAI's verbose_json writes it (seek in 10 ms frames, as Whisper's)."""
    f = s.fields
    out: dict[str, Any] = {
        "id": s.id,
        "seek": s.start_ms // 10,
        "start": s.start_ms / 1000.0,
        "end": s.end_ms / 1000.0,
        "text": s.text,
        "tokens": s.tokens,
        "temperature": float(f.get("temperature", 0.0)),
        "avg_logprob": float(f.get("avg_logprob", 0.0)),
        "compression_ratio": float(f.get("compression_ratio", 0.0)),
        "no_speech_prob": float(f.get("no_speech_prob", 0.0)),
    }
    if s.language:
        out["language"] = s.language
    if s.error:
        out["error"] = s.error
    return out


def word_json(w: Word) -> dict[str, Any]:
    return {"word": w.word, "start": w.start_ms / 1000.0, "end": w.end_ms / 1000.0}


def as_text(t: FileTranscript) -> str:
    return t.text + "\n"


def cues(t: FileTranscript) -> list[Cue]:
    """Subtitle cues: each segment's words grouped at pauses and length bounds; a segment
    without words is one cue."""
    out: list[Cue] = []
    for s in t.segments:
        if not s.text:
            continue
        if not s.words:
            out.append(Cue(s.start_ms, s.end_ms, s.text))
            continue
        group: list[Word] = []
        for w in s.words:
            if group and (w.start_ms - group[-1].end_ms >= _CUE_PAUSE_MS
                          or w.end_ms - group[0].start_ms > _CUE_MAX_MS
                          or len(join([g.word for g in group] + [w.word])) > _CUE_MAX_CHARS):
                out.append(_cue(group))
                group = []
            group.append(w)
        if group:
            out.append(_cue(group))
    return out


def _cue(words: list[Word]) -> Cue:
    return Cue(words[0].start_ms, max(words[-1].end_ms, words[0].start_ms + 1), join([w.word for w in words]))


def _clock(ms: int, separator: str) -> str:
    h, rest = divmod(max(0, ms), 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{separator}{ms:03d}"


def as_srt(t: FileTranscript) -> str:
    blocks = [f"{i}\n{_clock(c.start_ms, ',')} --> {_clock(c.end_ms, ',')}\n{c.text}\n"
              for i, c in enumerate(cues(t), start=1)]
    return "\n".join(blocks)


def as_vtt(t: FileTranscript) -> str:
    blocks = [f"{_clock(c.start_ms, '.')} --> {_clock(c.end_ms, '.')}\n{c.text}\n" for c in cues(t)]
    return "WEBVTT\n\n" + "\n".join(blocks)
