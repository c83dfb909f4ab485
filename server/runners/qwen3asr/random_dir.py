"""Qwen3-ASR model directories with random weights, in the published layout, for tests and
benchmarks (no Qwen3-ASR weights exist offline here).

`write_qwen3asr_dir(path, size)` writes config.json, model.safetensors, vocab.json, merges.txt,
tokenizer_config.json, preprocessor_config.json, chat_template.json and generation_config.json.
Sizes: `tiny` (a few layers of width 32, for equality tests; `tiny-tied` with the head tied to
the embedding), `0.6b` and `1.7b` (the published
shapes: compute and memory are those of the real models, the text is noise).

The vocabulary keeps Qwen's ids for every token the model's prompt and stop rules use (151643
onwards) so that the reference implementation runs unchanged on the directory; its ordinary
tokens are a toy byte-level BPE (256 bytes, a few merged words, filler words), not Qwen's."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

_LANGUAGES = [
    "Chinese", "English", "Cantonese", "Arabic", "German", "French", "Spanish", "Portuguese", "Indonesian",
    "Italian", "Korean", "Russian", "Thai", "Vietnamese", "Japanese", "Turkish", "Hindi", "Malay", "Dutch",
    "Swedish", "Danish", "Finnish", "Polish", "Czech", "Filipino", "Persian", "Greek", "Romanian", "Hungarian",
    "Macedonian",
]

_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        audio=dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                   downsample_hidden_size=8, n_window=50, n_window_infer=200),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),
        mrope=[4, 2, 2],
    ),
    # tiny with the head tied to the embedding, as the published sizes have it
    "tiny-tied": dict(
        audio=dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
                   downsample_hidden_size=8, n_window=50, n_window_infer=200),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
        mrope=[4, 2, 2],
    ),
    "0.6b": dict(
        audio=dict(d_model=896, encoder_layers=18, encoder_attention_heads=14, encoder_ffn_dim=3584,
                   downsample_hidden_size=480, n_window=50, n_window_infer=800),
        text=dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
        mrope=[24, 20, 20],
    ),
    "1.7b": dict(
        audio=dict(d_model=1024, encoder_layers=24, encoder_attention_heads=16, encoder_ffn_dim=4096,
                   downsample_hidden_size=480, n_window=50, n_window_infer=800),
        text=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, tie_word_embeddings=True),
        mrope=[24, 20, 20],
    ),
}

VOCAB_SIZE = 151936
_BASE = 151643  # ordinary tokens are ids 0..151642; added tokens follow, as in Qwen's vocabulary
# Added tokens whose ids the model relies on; the rest of 151643..151704 are placeholders.
_NAMED = {
    151643: ("<|endoftext|>", True), 151644: ("<|im_start|>", True), 151645: ("<|im_end|>", True),
    151669: ("<|audio_start|>", True), 151670: ("<|audio_end|>", True), 151676: ("<|audio_pad|>", True),
    151704: ("<asr_text>", False),
}
_WORDS = ["system", "user", "assistant", "language", "None", *_LANGUAGES, "hello", "world", "the", "and"]

CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'audio' %}{{ '<|audio_start|><|audio_pad|><|audio_end|>' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (byte-level BPE's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def toy_vocabulary() -> tuple[dict[str, int], list[str]]:
    """A byte-level BPE vocabulary of Qwen's size: 256 bytes, the prompt's words merged, filler."""
    alphabet = _bytes_to_unicode()
    vocab = {alphabet[b]: b for b in range(256)}
    merges: list[str] = []
    for word in _WORDS:
        for form in (word, "Ġ" + word):
            cur = form[0]
            for ch in form[1:]:
                nxt = cur + ch
                if nxt not in vocab:
                    merges.append(f"{cur} {ch}")
                    vocab[nxt] = len(vocab)
                cur = nxt
    i = 0
    letters = "abcdefghijklmnopqrstuvwxyz"
    while len(vocab) < _BASE:
        n, s = i, ""
        while True:
            s = letters[n % 26] + s
            n //= 26
            if n == 0:
                break
        tok = "Ġq" + s  # words nobody speaks: never one of the merged words
        if tok not in vocab:
            vocab[tok] = len(vocab)
        i += 1
    return vocab, merges


def _config(size: str) -> dict[str, Any]:
    spec = _SIZES[size]
    a, t = spec["audio"], spec["text"]
    audio = dict(num_mel_bins=128, max_source_positions=1500, output_dim=t["hidden_size"], activation_function="gelu",
                 conv_chunksize=500, scale_embedding=False, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                 **a)
    text = dict(vocab_size=VOCAB_SIZE, hidden_act="silu", max_position_embeddings=65536, rms_norm_eps=1e-6,
                rope_theta=1000000.0, attention_bias=False, attention_dropout=0.0, use_cache=True,
                rope_scaling={"rope_type": "default", "mrope_section": spec["mrope"], "interleaved": True,
                              "mrope_interleaved": True},
                **t)
    return {
        "architectures": ["Qwen3ASRForConditionalGeneration"],
        "model_type": "qwen3_asr",
        "support_languages": _LANGUAGES,
        "thinker_config": {
            "model_type": "qwen3_asr_thinker",
            "audio_config": audio,
            "text_config": text,
            "audio_token_id": 151676,
            "audio_start_token_id": 151669,
            "audio_end_token_id": 151670,
            "user_token_id": 872,
        },
        "torch_dtype": "float32",
    }


def write_qwen3asr_dir(path: str | Path, size: str = "tiny", seed: int = 0, std: float = 0.5,
                      eos_scale: float = 1.0) -> Path:
    """Write a complete model directory with random weights (normal, `std` for matrices, LayerNorm
    and RMSNorm weights near 1) and return its path. `eos_scale` > 1 enlarges the head's row of
    <|im_end|>, so that random items end after different numbers of tokens (tests of rows
    being reused) instead of running to `max_new_tokens`."""
    from safetensors.torch import save_file

    from server.runners.qwen3asr.model import AudioDims, Qwen3ASR, TextDims

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    config = _config(size)
    (root / "config.json").write_text(json.dumps(config, indent=2))
    th = config["thinker_config"]
    model = Qwen3ASR(AudioDims.from_config(th["audio_config"]), TextDims.from_config(th["text_config"]))
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, p in model.state_dict().items():
        if name.endswith("norm.weight") or "layer_norm" in name or name.endswith("ln_post.weight"):
            v = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
        elif name.endswith(".bias"):
            v = 0.1 * torch.randn(p.shape, generator=gen)
        else:
            fan_in = p.shape[1] if p.dim() >= 2 else 1
            for s in p.shape[2:]:
                fan_in *= s
            v = torch.randn(p.shape, generator=gen) * (std / max(1.0, fan_in ** 0.5) * 4 if p.dim() >= 2 else std)
        state["thinker." + name] = v.contiguous()
    if eos_scale != 1.0:
        key = "thinker.lm_head.weight" if not th["text_config"]["tie_word_embeddings"] else "thinker.model.embed_tokens.weight"
        state[key][151645] *= eos_scale
    if th["text_config"]["tie_word_embeddings"]:
        # Saved anyway (same values): loaders that tie and loaders that read it agree.
        state["thinker.lm_head.weight"] = state["thinker.model.embed_tokens.weight"]
        state["thinker.lm_head.weight"] = state["thinker.lm_head.weight"].clone()
    save_file(state, str(root / "model.safetensors"), metadata={"format": "pt"})
    vocab, merges = toy_vocabulary()
    (root / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (root / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    added = {}
    for i in range(_BASE, 151705):
        content, special = _NAMED.get(i, (f"<|extra_{i - _BASE}|>", True))
        added[str(i)] = {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                         "single_word": False, "special": special}
    (root / "tokenizer_config.json").write_text(json.dumps({
        "added_tokens_decoder": added,
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": None,
        "clean_up_tokenization_spaces": False, "errors": "replace", "model_max_length": 131072,
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
        "extra_special_tokens": {"audio_token": "<|audio_pad|>", "audio_bos_token": "<|audio_start|>",
                                 "audio_eos_token": "<|audio_end|>"},
    }, indent=1))
    (root / "preprocessor_config.json").write_text(json.dumps({
        "feature_extractor_type": "WhisperFeatureExtractor", "feature_size": 128, "sampling_rate": 16000,
        "hop_length": 160, "n_fft": 400, "chunk_length": 30, "n_samples": 480000, "nb_max_frames": 3000,
        "padding_side": "right", "padding_value": 0.0, "return_attention_mask": True, "dither": 0.0,
    }, indent=1))
    (root / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": [151645, 151643], "do_sample": False}))
    return root
