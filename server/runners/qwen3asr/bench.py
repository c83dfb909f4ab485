"""Encoder and decode-step cost of Qwen3-ASR at full size on RANDOM weights.

    python -m server.runners.qwen3asr.bench --size 0.6b --batches 1,8,32 --seconds 5 [--device cuda --dtype bfloat16]

Compute does not depend on weight values for a fixed number of tokens, so this times the real
shapes; accuracy is meaningless. Builds the model in memory (no directory), allocates the
static KV cache for the largest batch (positions for `--max-item-s` plus `--max-new-tokens`),
and reports per batch size: encoder seconds for that many items, the prompts' prefill, and one
decode step over that many rows (median of `--repeats`), as JSON lines."""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import torch

from server.runners.qwen3asr.model import AudioDims, KVCache, Qwen3ASR, TextDims, audio_tokens, param_count
from server.runners.qwen3asr.random_dir import _config

log = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, repeats: int) -> float:
    fn()
    _sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=["tiny", "0.6b", "1.7b"], default="0.6b")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--seconds", type=float, default=5.0, help="audio per item")
    p.add_argument("--max-item-s", type=float, default=30.0)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    th = _config(args.size)["thinker_config"]
    audio, text = AudioDims.from_config(th["audio_config"]), TextDims.from_config(th["text_config"])
    torch.manual_seed(0)
    model = Qwen3ASR(audio, text)
    if text.tie_word_embeddings:
        model.tie_weights()
    model = model.to(device, dtype).eval()
    batches = [int(b) for b in args.batches.split(",")]
    frames = int(args.seconds * 100)
    n_audio = audio_tokens(frames, audio)
    max_len = 32 + audio_tokens(int(args.max_item_s * 100), audio) + args.max_new_tokens
    cache = KVCache(text, max(batches), max_len, dtype, device)
    print(json.dumps({"note": "RANDOM weights: compute of the real shapes, text meaningless", "size": args.size,
                      "params_m": round(param_count(model) / 1e6, 1), "device": str(device), "dtype": args.dtype,
                      "torch_threads": torch.get_num_threads(), "audio_s": args.seconds, "audio_tokens": n_audio,
                      "cache_positions": max_len}), flush=True)
    with torch.inference_mode():
        for b in batches:
            mels = [torch.randn(audio.num_mel_bins, frames, device=device, dtype=dtype) for _ in range(b)]
            enc_s = _time(lambda: model.audio_tower(mels), device, args.repeats)
            emb = torch.randn(b, n_audio + 20, text.hidden_size, device=device, dtype=dtype)
            lengths = torch.full((b,), n_audio + 20, dtype=torch.long, device=device)
            rows = torch.arange(b, device=device)
            view = KVCache.__new__(KVCache)
            view.kv, view.rows, view.max_len = cache.kv[:, :, :b], b, max_len
            pre_s = _time(lambda: model.prefill(emb, lengths, view, rows), device, args.repeats)
            tokens = torch.zeros(b, dtype=torch.long, device=device)
            pos = torch.full((b,), n_audio + 20, dtype=torch.long, device=device)
            step_s = _time(lambda: model.step(tokens, pos, view), device, args.repeats)
            print(json.dumps({"batch": b, "encoder_s": round(enc_s, 4), "prefill_s": round(pre_s, 4),
                              "decode_step_s": round(step_s, 4),
                              "tokens_per_s": round(b / step_s, 1)}), flush=True)


if __name__ == "__main__":
    main()
