"""Shared by the telephony tests: clips at 8 kHz, word error rates pooled over clips, and
the same clips' WER at 16 kHz over the native protocol (the reference a call must match)."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import soxr

from server.wer import word_error_rate
from tests.serverharness import TRANSCRIPTS, ServerThread, clip_wer, read_clip, stream_audio

_REFERENCE: dict[str, str] = {}  # clip name -> its text sent at 16 kHz (one model, so one answer per clip)


def at_8k(path) -> np.ndarray:
    return soxr.resample(read_clip(path), 16000, 8000)


def final_text(events: list[dict], track: str | None = None) -> str:
    return " ".join(e["text"] for e in events if e["type"] == "final" and (track is None or e.get("track") == track)).strip()


def reference_wer(server: ServerThread, path) -> float:
    """The clip's WER sent at 16 kHz over the native protocol, on this server."""
    if path.name not in _REFERENCE:
        log = asyncio.run(stream_audio(server.url, read_clip(path), speed=math.inf))  # as fast as it takes
        _REFERENCE[path.name] = " ".join(m["text"] for m in log.of("final"))
    return clip_wer(path, _REFERENCE[path.name])


def reference_bound(server: ServerThread, path) -> float:
    """The most WER a call's transcript of one clip may have: the clip's WER at 16 kHz plus 5
    points (the README's claim), or, on a clip too short for 5 points to be a whole word, plus
    one word (8 kHz mu-law turns the 8-word 0880 clip's "ill-disposed" into "ill-sposed")."""
    words = len(TRANSCRIPTS[path.name].split())
    return reference_wer(server, path) + max(0.05, 1.0 / words)


def clips_8k(paths, lead_s: float = 0.0) -> np.ndarray:
    """Clips one after another with a pause between, at 8 kHz."""
    gap = np.zeros(int(8000 * 0.8), dtype=np.float32)
    parts = [np.zeros(int(8000 * lead_s), dtype=np.float32)]
    for p in paths:
        parts += [at_8k(p), gap]
    return np.concatenate(parts)


def pooled_wer(paths, text: str) -> float:
    return word_error_rate([" ".join(TRANSCRIPTS[p.name] for p in paths)], [text])


def pooled_reference(server: ServerThread, paths) -> float:
    for p in paths:
        reference_wer(server, p)
    return word_error_rate([" ".join(TRANSCRIPTS[p.name] for p in paths)], [" ".join(_REFERENCE[p.name] for p in paths)])


