"""Where two pieces of recognised text join with a space, and where they do not.

Every output that concatenates segments (FunASR's online text and sentences, a file's
transcript, subtitle cues) joins them the same way: one space, except in scripts written
without spaces between words (Chinese, Japanese) and next to their punctuation.
"""

from __future__ import annotations

import re

# Scripts written without spaces between words (Chinese, Japanese). Korean puts spaces
# between words, so it is not among them.
CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
# Their punctuation (、。「」，！？ ...): no space next to it either.
CJK_PUNCT = "\u3000-\u303f\uff00-\uffef"
_NO_SPACE_RE = re.compile(f"[{CJK}{CJK_PUNCT}]")


def joiner(before: str, after: str) -> str:
    """The space between two pieces of text a client will concatenate: none for Chinese and
    Japanese, written without spaces, or when either side is empty or has one already."""
    if not before or not after or before[-1].isspace() or after[0].isspace():
        return ""
    if _NO_SPACE_RE.match(before[-1]) or _NO_SPACE_RE.match(after[0]):
        return ""
    return " "


def join(pieces: list[str]) -> str:
    """Pieces of text (segments, words) joined as the language writes them."""
    out = ""
    for piece in pieces:
        if piece:
            out += joiner(out, piece) + piece
    return out
