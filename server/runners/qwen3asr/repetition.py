"""Repair of runaway repetition in decoded text, with the reference's rule (qwen-asr's
`detect_and_fix_repetitions`, threshold 20): a character repeated more than 20 times in a row
becomes one, then the first pattern of 1..20 characters repeated 20 or more times in a row
becomes one copy (and the rest of the text is repaired the same way). The tests hold this to
the reference's function."""

from __future__ import annotations

THRESHOLD = 20
MAX_PATTERN = 20


def _collapse_char_runs(s: str, threshold: int) -> str:
    out: list[str] = []
    i, n = 0, len(s)
    while i < n:
        j = i
        while j < n and s[j] == s[i]:
            j += 1
        out.append(s[i] if j - i > threshold else s[i:j])
        i = j
    return "".join(out)


def _collapse_patterns(s: str, threshold: int, max_len: int = MAX_PATTERN) -> str:
    n = len(s)
    if n < threshold * 2:
        return s
    out: list[str] = []
    i = 0
    while i <= n - threshold * 2:
        for k in range(1, max_len + 1):
            if i + k * threshold > n:
                break
            pattern = s[i:i + k]
            if all(s[i + r * k:i + (r + 1) * k] == pattern for r in range(1, threshold)):
                end = i + threshold * k
                while end + k <= n and s[end:end + k] == pattern:
                    end += k
                return "".join(out) + pattern + _collapse_patterns(s[end:], threshold, max_len)
        out.append(s[i])
        i += 1
    return "".join(out) + s[i:]


def detect_and_fix_repetitions(text: str, threshold: int = THRESHOLD) -> str:
    return _collapse_patterns(_collapse_char_runs(text, threshold), threshold)
