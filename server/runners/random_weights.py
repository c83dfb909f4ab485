"""Write SenseVoiceSmall model directories with random weights, in the real file layout.

Tests and compute benchmarks need a model directory without a network. This writes the
files a downloaded SenseVoiceSmall directory has (config.yaml, model.pt, am.mvn, the
sentencepiece BPE model, tokens.json, configuration.json), built through funasr's own
model class so every name and shape matches what funasr (and our runner) loads.
Outputs are meaningless: throughput can be measured with these, accuracy cannot.
"""

from __future__ import annotations

import io
import json
import logging
import random
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

log = logging.getLogger(__name__)

BPE_FILE = "chn_jpn_yue_eng_ko_spectok.bpe.model"

# SenseVoice's rich-transcription tags; the real BPE model holds them as single pieces.
RICH_TAGS = (
    "<|zh|>", "<|en|>", "<|yue|>", "<|ja|>", "<|ko|>", "<|nospeech|>",
    "<|HAPPY|>", "<|SAD|>", "<|ANGRY|>", "<|NEUTRAL|>", "<|FEARFUL|>", "<|DISGUSTED|>",
    "<|SURPRISED|>", "<|EMO_UNKNOWN|>",
    "<|Speech|>", "<|BGM|>", "<|Applause|>", "<|Laughter|>", "<|Cry|>", "<|Sneeze|>",
    "<|Breath|>", "<|Cough|>", "<|Event_UNK|>",
    "<|withitn|>", "<|woitn|>",
)

# Sizes of the released SenseVoiceSmall (234 M parameters) and a small stand-in for tests.
_SCALES: dict[str, dict[str, Any]] = {
    "full": {
        "vocab_size": 25055,
        "encoder_conf": {"output_size": 512, "attention_heads": 4, "linear_units": 2048,
                         "num_blocks": 50, "tp_blocks": 20},
    },
    "tiny": {
        "vocab_size": 400,
        "encoder_conf": {"output_size": 64, "attention_heads": 4, "linear_units": 128,
                         "num_blocks": 3, "tp_blocks": 2},
    },
}

_WORDS = (
    "the of and to a in that is was he for it with as his on be at by i had not are but "
    "from or have an they which one you were her all she there would their we him been has "
    "when who will more no if out so said what up its about into than them can only other "
    "new some could time these two may then do first any my now such like our over man me "
    "even most made after also did many before must through back years where much your way "
    "well down should because each just those people how too little state good very make "
    "world still own see men work long get here between both life being under never day "
    "same another know while last might us great old year off come since against go came "
    "right used take three sense sensibility marianne elinor dashwood norland park"
).split()


def _config(scale: str) -> dict[str, Any]:
    sizes = _SCALES[scale]
    encoder_conf = {
        **sizes["encoder_conf"],
        "dropout_rate": 0.1,
        "positional_dropout_rate": 0.1,
        "attention_dropout_rate": 0.1,
        "input_layer": "pe",
        "pos_enc_class": "SinusoidalPositionEncoder",
        "normalize_before": True,
        "kernel_size": 11,
        "sanm_shfit": 0,
        "selfattention_layer_type": "sanm",
    }
    # Mirrors the released config.yaml; the vocabulary size is restated here for readers
    # (funasr derives it from the tokenizer, which is written with exactly this size).
    return {
        "encoder": "SenseVoiceEncoderSmall",
        "encoder_conf": encoder_conf,
        "model": "SenseVoiceSmall",
        "model_conf": {"length_normalized_loss": True, "sos": 1, "eos": 2, "ignore_id": -1,
                       "vocab_size": sizes["vocab_size"]},
        "tokenizer": "SentencepiecesTokenizer",
        "tokenizer_conf": {"bpemodel": None, "unk_symbol": "<unk>", "split_with_space": True},
        "frontend": "WavFrontend",
        "frontend_conf": {"fs": 16000, "window": "hamming", "n_mels": 80, "frame_length": 25,
                          "frame_shift": 10, "lfr_m": 7, "lfr_n": 6, "cmvn_file": None},
        "dataset": "SenseVoiceCTCDataset",
        "dataset_conf": {"index_ds": "IndexDSJsonl", "batch_sampler": "EspnetStyleBatchSampler",
                         "data_split_num": 32, "batch_type": "token", "batch_size": 14000,
                         "max_token_length": 2000, "min_token_length": 60, "max_source_length": 2000,
                         "min_source_length": 60, "max_target_length": 200, "min_target_length": 0,
                         "shuffle": True, "num_workers": 4, "sos": 1, "eos": 2, "IndexDSJsonl": "IndexDSJsonl",
                         "retry": 20},
        "specaug": "SpecAugLFR",
        "specaug_conf": {"apply_time_warp": False, "time_warp_window": 5, "time_warp_mode": "bicubic",
                         "apply_freq_mask": True, "freq_mask_width_range": [0, 30], "lfr_rate": 6,
                         "num_freq_mask": 1, "apply_time_mask": True, "time_mask_width_range": [0, 12],
                         "num_time_mask": 1},
        "ctc_conf": {"dropout_rate": 0.0, "ctc_type": "builtin", "reduce": True, "ignore_nan_grad": True},
        "normalize": None,
    }


def _training_text(vocab_size: int, rng: random.Random) -> list[str]:
    """Sentences with enough distinct characters for a BPE vocabulary of `vocab_size`.

    Every distinct character becomes a piece (character_coverage 1.0), so CJK ideographs,
    kana and Hangul supply the bulk of a large vocabulary, as they do in the real model.
    """
    alphabet: list[str] = []
    need = max(0, vocab_size - 300)
    for lo, hi in ((0x4E00, 0x9FFF), (0x3041, 0x3096), (0x30A1, 0x30FA), (0xAC00, 0xD7A3)):
        alphabet.extend(chr(c) for c in range(lo, hi + 1))
        if len(alphabet) >= need:
            break
    alphabet = alphabet[:need]
    lines = [" ".join(rng.choice(_WORDS) for _ in range(12)) for _ in range(400)]
    for start in range(0, len(alphabet), 40):
        chunk = alphabet[start:start + 40]
        lines.append("".join(chunk))
    return lines


def _train_bpe(path: Path, vocab_size: int, seed: int) -> list[str]:
    """Train a sentencepiece BPE model of exactly `vocab_size` pieces; return its pieces."""
    import sentencepiece as spm

    rng = random.Random(seed)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_text(vocab_size, rng)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        character_coverage=1.0,
        user_defined_symbols=list(RICH_TAGS),
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=True,
        minloglevel=2,
        num_threads=1,
    )
    path.write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(path))
    if sp.get_piece_size() != vocab_size:
        raise RuntimeError(f"trained {sp.get_piece_size()} pieces, wanted {vocab_size}")
    return [sp.id_to_piece(i) for i in range(vocab_size)]


def cmvn_text(dim: int, seed: int = 0) -> str:
    """A Kaldi nnet CMVN file in am.mvn's layout: negated means, then inverse deviations.

    Log-mel energies of int16-scale speech sit around 8-16 with deviations of 2-5; the
    80-dim statistics are tiled over the 7 stacked LFR frames, as in the real file.
    """
    rng = np.random.default_rng(seed)
    n_mels = 80
    mean = rng.uniform(8.0, 16.0, n_mels)
    std = rng.uniform(2.0, 5.0, n_mels)
    reps = dim // n_mels
    shift = np.tile(-mean, reps)
    scale = np.tile(1.0 / std, reps)
    fmt = lambda v: " ".join(f"{x:.6f}" for x in v)  # noqa: E731
    return (
        "<Nnet>\n"
        f"<Splice> {dim} {dim}\n[ 0 ]\n"
        f"<AddShift> {dim} {dim}\n<LearnRateCoef> 0 [ {fmt(shift)} ]\n"
        f"<Rescale> {dim} {dim}\n<LearnRateCoef> 0 [ {fmt(scale)} ]\n"
        "</Nnet>\n"
    )


def write_sensevoice_dir(
    path: str | Path, scale: Literal["tiny", "full"] = "tiny", seed: int = 0
) -> Path:
    """Write a SenseVoiceSmall directory with random weights at `path`; returns the path.

    "tiny": a 5-block, 64-wide encoder and a 400-piece vocabulary, for fast tests.
    "full": the released architecture (50 + 20 SANM blocks, width 512, vocab 25055,
    ~234 M parameters, model.pt ~0.9 GB) for compute benchmarks. Weights are random.
    """
    if scale not in _SCALES:
        raise ValueError(f"scale must be one of {sorted(_SCALES)}, got {scale!r}")
    import torch
    from funasr.models.sense_voice.model import SenseVoiceSmall  # noqa: F401 - registers classes
    from funasr.register import tables

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = _config(scale)
    vocab_size = config["model_conf"]["vocab_size"]

    pieces = _train_bpe(out / BPE_FILE, vocab_size, seed)
    (out / "tokens.json").write_text(json.dumps(pieces, ensure_ascii=False, indent=0), encoding="utf-8")
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    (out / "am.mvn").write_text(cmvn_text(560, seed), encoding="utf-8")
    (out / "configuration.json").write_text(json.dumps({
        "framework": "pytorch",
        "task": "auto-speech-recognition",
        "model": {"type": "funasr"},
        "pipeline": {"type": "funasr-pipeline"},
        "model_name_in_hub": {"ms": "iic/SenseVoiceSmall", "hf": "FunAudioLLM/SenseVoiceSmall"},
        "file_path_metas": {
            "init_param": "model.pt",
            "config": "config.yaml",
            "tokenizer_conf": {"bpemodel": BPE_FILE},
            "frontend_conf": {"cmvn_file": "am.mvn"},
        },
        "chorus_note": "random weights written by server.runners.random_weights; outputs are meaningless",
    }, indent=2), encoding="utf-8")

    torch.manual_seed(seed)
    model_class = tables.model_classes.get(config["model"])
    conf = {k: v for k, v in config["model_conf"].items() if k != "vocab_size"}
    model = model_class(
        encoder=config["encoder"], encoder_conf=config["encoder_conf"], ctc_conf=config["ctc_conf"],
        input_size=560, vocab_size=vocab_size, **conf,
    )
    torch.save(model.state_dict(), out / "model.pt")
    n_params = sum(p.numel() for p in model.parameters())
    log.info("wrote random-weight SenseVoiceSmall (%s, %.1f M params) to %s", scale, n_params / 1e6, out)
    return out
