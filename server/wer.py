"""Word error rate with a small, documented text normalisation (for tests, loadgen and benchmarks).

Normalisation: lowercase; hyphens and slashes become spaces; other punctuation is
removed (apostrophes inside words are kept: "don't"); a few English abbreviations are
spelled out (mr -> mister, mrs -> missus, dr -> doctor) because reference transcripts
of read speech spell them out; whitespace is collapsed. Numbers are left as they are.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Sequence

_ABBREVIATIONS = {"mr": "mister", "mrs": "missus", "dr": "doctor", "st": "saint"}


def normalize_text(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[-/‐–—]", " ", text)
    text = re.sub(r"[^\w\s']", " ", text)
    text = re.sub(r"(?<!\w)'|'(?!\w)", " ", text)
    words = [_ABBREVIATIONS.get(w, w) for w in text.split()]
    return " ".join(words)


def edit_distance(a: Sequence, b: Sequence) -> int:
    """Levenshtein distance between two sequences (substitution, insertion, deletion cost 1)."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i] + [0] * len(b)
        for j, y in enumerate(b, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y))
        prev = cur
    return prev[-1]


def word_error_rate(refs: Sequence[str], hyps: Sequence[str]) -> float:
    """Total word edits over total reference words, after normalisation."""
    if len(refs) != len(hyps):
        raise ValueError("refs and hyps differ in length")
    errors = words = 0
    for r, h in zip(refs, hyps):
        rw, hw = normalize_text(r).split(), normalize_text(h).split()
        errors += edit_distance(rw, hw)
        words += len(rw)
    if words == 0:
        return 0.0 if errors == 0 else float("inf")
    return errors / words
