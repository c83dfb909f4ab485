"""Qwen's byte-level BPE tokenizer, built with `tokenizers` from a published model directory.

Qwen3-ASR directories ship `vocab.json` + `merges.txt` + `tokenizer_config.json` (the slow
`Qwen2Tokenizer` layout) and sometimes `tokenizer.json`. Either is read into the same fast
tokenizer transformers' `Qwen2TokenizerFast` builds: NFC normalisation, Qwen's split pattern,
byte-level BPE, the added tokens of `tokenizer_config.json` (special or not, as listed there:
`<asr_text>` is not special, so it survives decoding as the reference relies on)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from server.runners.base import RunnerError

# Qwen2's pre-tokenizer pattern (transformers' Qwen2TokenizerFast / tokenization_qwen2.PRETOKENIZE_REGEX).
_PRETOKENIZE = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def _build(directory: Path) -> Tokenizer:
    tj = directory / "tokenizer.json"
    if tj.is_file():
        return Tokenizer.from_file(str(tj))
    vocab, merges = directory / "vocab.json", directory / "merges.txt"
    if not vocab.is_file() or not merges.is_file():
        raise RunnerError(f"{directory}: no tokenizer.json, nor vocab.json + merges.txt")
    tk = Tokenizer(models.BPE.from_file(str(vocab), str(merges), unk_token=None))
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRETOKENIZE), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    conf_path = directory / "tokenizer_config.json"
    conf = json.loads(conf_path.read_text(encoding="utf-8")) if conf_path.is_file() else {}
    added = sorted(((int(i), t) for i, t in (conf.get("added_tokens_decoder") or {}).items()), key=lambda x: x[0])
    for i, t in added:
        tok = AddedToken(t["content"], special=bool(t.get("special", False)), normalized=bool(t.get("normalized", False)),
                         lstrip=bool(t.get("lstrip", False)), rstrip=bool(t.get("rstrip", False)),
                         single_word=bool(t.get("single_word", False)))
        if t.get("special", False):
            tk.add_special_tokens([tok])
        else:
            tk.add_tokens([tok])
        if tk.token_to_id(t["content"]) != i:
            raise RunnerError(f"{conf_path}: added token {t['content']!r} should have id {i}, got {tk.token_to_id(t['content'])}")
    return tk


class QwenTokenizer:
    """Encodes prompt text and decodes generated ids for Qwen3-ASR."""

    def __init__(self, directory: Path) -> None:
        self.tk = _build(directory)

        def special(name: str) -> int:
            i = self.tk.token_to_id(name)
            if i is None:
                raise RunnerError(f"{directory}: the tokenizer lacks {name}")
            return i

        self.endoftext = special("<|endoftext|>")
        self.im_start = special("<|im_start|>")
        self.im_end = special("<|im_end|>")
        self.audio_start = special("<|audio_start|>")
        self.audio_end = special("<|audio_end|>")
        self.audio_pad = special("<|audio_pad|>")
        self.asr_text = special("<asr_text>")

    def encode(self, text: str) -> list[int]:
        """Plain text (no special tokens in it are honoured as such)."""
        return self.tk.encode(text, add_special_tokens=False).ids if text else []

    def prompt(self, audio_tokens: int, language: str | None, context: str = "") -> list[int]:
        """The reference's prompt (its chat template with the generation prompt, plus
        `language X<asr_text>` when the language is forced):

            <|im_start|>system\\n{context}<|im_end|>\\n<|im_start|>user\\n<|audio_start|>
            <|audio_pad|>*N<|audio_end|><|im_end|>\\n<|im_start|>assistant\\n[language X<asr_text>]
        """
        ids = [self.im_start, *self.encode("system\n" + context), self.im_end, *self.encode("\n"),
               self.im_start, *self.encode("user\n"), self.audio_start, *([self.audio_pad] * audio_tokens),
               self.audio_end, self.im_end, *self.encode("\n"), self.im_start]
        # One text run, as the reference's tokenizer sees "assistant\nlanguage X" between specials.
        ids += self.encode("assistant\n" + (f"language {language}" if language else ""))
        if language:
            ids.append(self.asr_text)
        return ids

    def decode(self, ids: list[int]) -> str:
        """As the reference decodes: special tokens skipped, spaces not cleaned up."""
        return self.tk.decode(ids, skip_special_tokens=True)
