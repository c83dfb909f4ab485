"""Whisper's byte-level BPE tokenizer and special tokens, read from tokenizer.json (+ config.json)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from server.runners.base import RunnerError


class WhisperTokenizer:
    def __init__(self, tokenizer_json: Path, config_json: Path | None) -> None:
        self.tk = Tokenizer.from_file(str(tokenizer_json))
        conf = json.loads(config_json.read_text()) if config_json is not None and config_json.is_file() else {}

        def special(name: str) -> int:
            i = self.tk.token_to_id(name)
            if i is None:
                raise RunnerError(f"{tokenizer_json}: special token {name} not found")
            return i

        self.eot = special("<|endoftext|>")
        self.sot = special("<|startoftranscript|>")
        self.transcribe = special("<|transcribe|>")
        self.no_timestamps = special("<|notimestamps|>")
        ns = self.tk.token_to_id("<|nospeech|>")
        self.no_speech = ns if ns is not None else special("<|nocaptions|>")
        lang_ids = conf.get("lang_ids") or [i for i in range(self.sot + 1, self.transcribe - 1)]
        self.languages: dict[str, int] = {}
        for i in lang_ids:
            tok = self.tk.id_to_token(i)
            if tok and tok.startswith("<|") and tok.endswith("|>"):
                self.languages[tok[2:-2]] = i
        self.language_of = {i: code for code, i in self.languages.items()}
        # Suppressed at every step (OpenAI's non-speech symbols) and at the first step (blank, eot).
        self.suppress = list(conf.get("suppress_ids") or [])
        self.suppress_begin = list(conf.get("suppress_ids_begin") or [self.tk.token_to_id(" "), self.eot])

    def decode(self, ids: list[int]) -> str:
        return self.tk.decode([i for i in ids if i < self.eot], skip_special_tokens=True).strip()
