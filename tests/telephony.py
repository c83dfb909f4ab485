"""Shared by the telephony tests: clips at 8 kHz, word error rates pooled over clips, and
the same clips' WER at 16 kHz over the native protocol (the reference a call must match)."""

from __future__ import annotations

import asyncio

import numpy as np
import soxr

from server.wer import word_error_rate
from tests.serverharness import TRANSCRIPTS, ServerThread, read_clip, stream_audio

_REFERENCE: dict[str, str] = {}  # clip name -> its text sent at 16 kHz (one model, so one answer per clip)


def at_8k(path) -> np.ndarray:
    return soxr.resample(read_clip(path), 16000, 8000)


def wer(path, text: str) -> float:
    return word_error_rate([TRANSCRIPTS[path.name]], [text])


def final_text(events: list[dict], track: str | None = None) -> str:
    return " ".join(e["text"] for e in events if e["type"] == "final" and (track is None or e.get("track") == track)).strip()


def reference_wer(server: ServerThread, path) -> float:
    """The clip's WER sent at 16 kHz over the native protocol, on this server."""
    if path.name not in _REFERENCE:
        log = asyncio.run(stream_audio(server.url, read_clip(path), speed=4.0))
        _REFERENCE[path.name] = " ".join(m["text"] for m in log.of("final"))
    return wer(path, _REFERENCE[path.name])


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


