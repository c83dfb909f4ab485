"""Read a Qwen3-ASR model directory as published (Qwen/Qwen3-ASR-0.6B, Qwen/Qwen3-ASR-1.7B).

Layout: config.json (`thinker_config` with `audio_config` and `text_config`), the weights as
model.safetensors or shards listed in model.safetensors.index.json, vocab.json + merges.txt +
tokenizer_config.json (or tokenizer.json), preprocessor_config.json (Whisper feature
extractor, 128 mel bins), optionally generation_config.json. A directory without weights, or
whose weights do not cover the model, is refused: never random weights by accident."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from server.runners.base import RunnerError
from server.runners.qwen3asr.model import AudioDims, Qwen3ASR, TextDims

_PREFIX = "thinker."
# The reference's `generate` stops at either (Qwen3ASRForConditionalGeneration.generate).
DEFAULT_EOS = (151645, 151643)


@dataclass(frozen=True)
class ModelFiles:
    root: Path
    config: dict[str, Any]
    shards: tuple[Path, ...]
    eos: tuple[int, ...]
    languages: tuple[str, ...]
    """`support_languages` of config.json (Qwen language names); empty if not listed."""

    @property
    def thinker(self) -> dict[str, Any]:
        return self.config.get("thinker_config") or {}

    @classmethod
    def from_dir(cls, root: str | Path) -> "ModelFiles":
        root = Path(root).expanduser()
        if not root.is_dir():
            raise RunnerError(
                f"runner.model={str(root)!r} is not a directory; download a Qwen3-ASR model directory "
                "(e.g. `huggingface-cli download Qwen/Qwen3-ASR-0.6B --local-dir DIR`) and point runner.model at it"
            )
        cj = root / "config.json"
        try:
            config = json.loads(cj.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise RunnerError(f"{root} has no config.json: not a Qwen3-ASR model directory") from None
        except (OSError, ValueError) as e:
            raise RunnerError(f"{cj} is not readable JSON ({e}); re-download the model directory") from None
        if config.get("model_type") != "qwen3_asr" or "thinker_config" not in config:
            raise RunnerError(f"{cj}: model_type {config.get('model_type')!r}, expected 'qwen3_asr' with a thinker_config")
        index = root / "model.safetensors.index.json"
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, ValueError, KeyError) as e:
                raise RunnerError(f"{index} is not a safetensors index ({e})") from None
            shards = tuple(root / n for n in names)
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise RunnerError(f"{root}: weight shards missing: {', '.join(missing)}; the download is incomplete")
        elif (root / "model.safetensors").is_file():
            shards = (root / "model.safetensors",)
        else:
            raise RunnerError(
                f"{root} has no weights (model.safetensors or model.safetensors.index.json with its shards); "
                "the download is incomplete"
            )
        eos: tuple[int, ...] = DEFAULT_EOS
        gj = root / "generation_config.json"
        if gj.is_file():
            try:
                e = json.loads(gj.read_text(encoding="utf-8")).get("eos_token_id")
                if e is not None:
                    eos = tuple(sorted(set(DEFAULT_EOS) | set([e] if isinstance(e, int) else e)))
            except (OSError, ValueError):
                pass
        langs = tuple(config.get("support_languages") or ())
        return cls(root, config, shards, eos, langs)

    def dims(self) -> tuple[AudioDims, TextDims]:
        t = self.thinker
        try:
            return AudioDims.from_config(t["audio_config"]), TextDims.from_config(t["text_config"])
        except (KeyError, TypeError, ValueError) as e:
            raise RunnerError(f"{self.root / 'config.json'}: incomplete thinker_config ({e})") from None

    def token_id(self, name: str, default: int) -> int:
        return int(self.thinker.get(name, default))


def load_model(files: ModelFiles, device: torch.device, dtype: torch.dtype) -> Qwen3ASR:
    """Build the model and load every weight; refuses missing or unexpected tensors."""
    from safetensors.torch import load_file

    audio, text = files.dims()
    with torch.device("meta"):
        model = Qwen3ASR(audio, text)
    state: dict[str, torch.Tensor] = {}
    for shard in files.shards:
        try:
            part = load_file(str(shard), device="cpu")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own types
            raise RunnerError(f"{shard} is not a readable safetensors file ({e})") from None
        for k, v in part.items():
            if k.startswith(_PREFIX):
                state[k[len(_PREFIX):]] = v
    # Tied as transformers ties (text_config.tie_word_embeddings): the head is the embedding,
    # held once, whatever a checkpoint also stores under lm_head.
    tie = text.tie_word_embeddings
    if tie:
        state.pop("lm_head.weight", None)
    expected = set(model.state_dict().keys())
    if tie:
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(state))
    if missing:
        raise RunnerError(f"{files.root}: weights missing for {len(missing)} tensors (e.g. {missing[:3]}); "
                          "the weights do not match config.json")
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise RunnerError(f"{files.root}: {len(unexpected)} unexpected tensors (e.g. {unexpected[:3]}); not a Qwen3-ASR checkpoint")
    model = model.to_empty(device=device)
    if tie:
        model.tie_weights()
    model.load_state_dict(state, strict=False, assign=False)
    model = model.to(dtype).eval()
    # Buffers are not in the checkpoint: computed here, in float32 (rotary frequencies in half
    # precision would drift with position).
    _init_buffers(model, audio, text, device)
    return model


def _init_buffers(model: Qwen3ASR, audio: AudioDims, text: TextDims, device: torch.device) -> None:
    from server.runners.qwen3asr.model import _sinusoids

    model.audio_tower.positional_embedding = _sinusoids(audio.max_source_positions, audio.d_model).to(device)
    hd = text.head_dim
    model.inv_freq = (1.0 / (text.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))).to(device)
