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


# ---------------------------------------------------------------------------- Paraformer

# Sizes of the released Paraformer-large (paraformer-zh, vocab 8404, ~220 M parameters) and a
# small stand-in for tests.
_PARAFORMER_SCALES: dict[str, dict[str, Any]] = {
    "full": {
        "vocab_size": 8404,
        "encoder_conf": {"output_size": 512, "attention_heads": 4, "linear_units": 2048, "num_blocks": 50},
        "decoder_conf": {"attention_heads": 4, "linear_units": 2048, "num_blocks": 16, "att_layer_num": 16},
    },
    "tiny": {
        "vocab_size": 400,
        "encoder_conf": {"output_size": 64, "attention_heads": 4, "linear_units": 128, "num_blocks": 3},
        "decoder_conf": {"attention_heads": 4, "linear_units": 128, "num_blocks": 2, "att_layer_num": 2},
    },
}


def _paraformer_config(scale: str) -> dict[str, Any]:
    sizes = _PARAFORMER_SCALES[scale]
    width = sizes["encoder_conf"]["output_size"]
    # Mirrors the released paraformer-large config.yaml (model Paraformer, SANM encoder, SANM
    # decoder, CifPredictorV2 with a 0.45 tail), except `dither: 0.0`: funasr's WavFrontend
    # dithers by default, which would make its reference output random from run to run.
    return {
        "model": "Paraformer",
        "model_conf": {"ctc_weight": 0.0, "lsm_weight": 0.1, "length_normalized_loss": True,
                       "predictor_weight": 1.0, "predictor_bias": 1, "sampling_ratio": 0.75},
        "encoder": "SANMEncoder",
        "encoder_conf": {
            **sizes["encoder_conf"],
            "dropout_rate": 0.1, "positional_dropout_rate": 0.1, "attention_dropout_rate": 0.1,
            "input_layer": "pe", "pos_enc_class": "SinusoidalPositionEncoder", "normalize_before": True,
            "kernel_size": 11, "sanm_shfit": 0, "selfattention_layer_type": "sanm",
        },
        "decoder": "ParaformerSANMDecoder",
        "decoder_conf": {
            **sizes["decoder_conf"],
            "dropout_rate": 0.1, "positional_dropout_rate": 0.1, "self_attention_dropout_rate": 0.1,
            "src_attention_dropout_rate": 0.1, "kernel_size": 11, "sanm_shfit": 0,
        },
        "predictor": "CifPredictorV2",
        "predictor_conf": {"idim": width, "threshold": 1.0, "l_order": 1, "r_order": 1, "tail_threshold": 0.45},
        "frontend": "WavFrontend",
        "frontend_conf": {"fs": 16000, "window": "hamming", "n_mels": 80, "frame_length": 25,
                          "frame_shift": 10, "lfr_m": 7, "lfr_n": 6, "dither": 0.0},
        "specaug": "SpecAugLFR",
        "specaug_conf": {"apply_time_warp": False, "time_warp_window": 5, "time_warp_mode": "bicubic",
                         "apply_freq_mask": True, "freq_mask_width_range": [0, 30], "lfr_rate": 6,
                         "num_freq_mask": 1, "apply_time_mask": True, "time_mask_width_range": [0, 12],
                         "num_time_mask": 1},
        "tokenizer": "CharTokenizer",
        "tokenizer_conf": {"unk_symbol": "<unk>", "split_with_space": True},
        "ctc_conf": {"dropout_rate": 0.0, "ctc_type": "builtin", "reduce": True, "ignore_nan_grad": True},
        "normalize": None,
    }


def _paraformer_tokens(vocab_size: int, rng: random.Random) -> list[str]:
    """A vocabulary in paraformer-zh's tokens.json layout: <blank>, <s>, </s>, then CJK
    characters, English words and "@@" subword pieces (so funasr's mixed-script text rules are
    exercised), and <unk> last."""
    words = sorted(set(_WORDS))
    english = [w for w in words[: max(0, (vocab_size - 4) // 8)]]
    subwords = [w[:2] + "@@" for w in english if len(w) > 2][: max(0, (vocab_size - 4) // 16)]
    body = english + sorted(set(subwords))
    cjk_needed = vocab_size - 4 - len(body)
    cjk = [chr(0x4E00 + i) for i in range(cjk_needed)]
    mixed = cjk + body
    rng.shuffle(mixed)
    tokens = ["<blank>", "<s>", "</s>", *mixed, "<unk>"]
    if len(tokens) != vocab_size:
        raise RuntimeError(f"built {len(tokens)} tokens, wanted {vocab_size}")
    return tokens


def write_paraformer_dir(
    path: str | Path, scale: Literal["tiny", "full"] = "tiny", seed: int = 0
) -> Path:
    """Write a Paraformer (paraformer-zh layout) directory with random weights; returns the path.

    Files as a downloaded paraformer-large directory has them: config.yaml, model.pt, am.mvn,
    tokens.json, seg_dict, configuration.json. "tiny": a 3-block, 64-wide encoder, a 2-block
    decoder and 400 tokens, for fast tests. "full": the released architecture (50 encoder
    blocks, 16 decoder blocks, width 512, vocab 8404; model.pt ~0.9 GB) for compute
    benchmarks. Weights are random: outputs are meaningless.
    """
    if scale not in _PARAFORMER_SCALES:
        raise ValueError(f"scale must be one of {sorted(_PARAFORMER_SCALES)}, got {scale!r}")
    import torch
    import funasr.models.paraformer.model  # noqa: F401 - registers Paraformer and its parts
    from funasr.register import tables

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = _paraformer_config(scale)
    vocab_size = _PARAFORMER_SCALES[scale]["vocab_size"]
    tokens = _paraformer_tokens(vocab_size, random.Random(seed))
    (out / "tokens.json").write_text(json.dumps(tokens, ensure_ascii=False, indent=0), encoding="utf-8")
    # seg_dict maps words to their pieces (funasr uses it to tokenise hotwords and training text).
    seg = [f"{t} {t}" for t in tokens[3:-1] if not t.endswith("@@")]
    (out / "seg_dict").write_text("\n".join(seg) + "\n", encoding="utf-8")
    (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")
    (out / "am.mvn").write_text(cmvn_text(560, seed), encoding="utf-8")
    (out / "configuration.json").write_text(json.dumps({
        "framework": "pytorch",
        "task": "auto-speech-recognition",
        "model": {"type": "funasr"},
        "pipeline": {"type": "funasr-pipeline"},
        "model_name_in_hub": {"ms": "iic/speech_paraformer-large_asr_nat-zh-cn-16k-common-vocab8404-pytorch"},
        "file_path_metas": {
            "init_param": "model.pt",
            "config": "config.yaml",
            "tokenizer_conf": {"token_list": "tokens.json", "seg_dict_file": "seg_dict"},
            "frontend_conf": {"cmvn_file": "am.mvn"},
        },
        "chorus_note": "random weights written by server.runners.random_weights; outputs are meaningless",
    }, indent=2), encoding="utf-8")

    torch.manual_seed(seed)
    model_class = tables.model_classes.get(config["model"])
    model = model_class(
        encoder=config["encoder"], encoder_conf=config["encoder_conf"],
        decoder=config["decoder"], decoder_conf=config["decoder_conf"],
        predictor=config["predictor"], predictor_conf=config["predictor_conf"],
        ctc_conf=config["ctc_conf"], input_size=560, vocab_size=vocab_size, **config["model_conf"],
    )
    # Random init gives CIF weights (alphas) near 0.5 everywhere: a token every two frames
    # (120 ms), far denser than speech. A bias shift brings it near the real ~4 tokens per
    # second so that token counts, timestamps and decoder shapes look like a real model's.
    with torch.no_grad():
        model.predictor.cif_output.bias.fill_(-1.0)
    torch.save(model.state_dict(), out / "model.pt")
    n_params = sum(p.numel() for p in model.parameters())
    log.info("wrote random-weight Paraformer (%s, %.1f M params) to %s", scale, n_params / 1e6, out)
    return out
