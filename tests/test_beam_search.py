"""Beam search and temperature fallback of the Whisper runner.

The references here are written plainly, the way openai-whisper's BeamSearchDecoder reads
(a dict of candidate sequences per step, sorted in Python), and share no code with
server/runners/whisper/decoding.py, which runs every item's beams as tensor rows."""

from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import pytest
import torch

from server.runners.base import ItemOptions
from server.runners.whisper.decoding import BeamSearch
from tests.serverharness import CLIPS, read_clip

EOT = 0


# ------------------------------------------------------------------ the plain reference


def reference_beam_search(logprobs_of, beam_size: int, patience: float, max_steps: int, eot: int,
                          length_penalty: float | None) -> tuple[list[int], float]:
    """openai-whisper's beam search for one item, plainly: `logprobs_of(prefix)` gives the
    log-probabilities of the next token after the tuple `prefix`. Returns the best
    hypothesis's tokens (end-of-text excluded) and its summed log-probability."""
    capacity = round(beam_size * patience)
    beams = {(): 0.0}  # the beam_size identical starting rows count once
    ended: dict[tuple, float] = {}
    for _ in range(max_steps):
        candidates: dict[tuple, float] = {}
        for prefix, score in beams.items():
            lp = logprobs_of(prefix)
            for token in np.argsort(-lp, kind="stable")[: beam_size + 1]:
                if np.isfinite(lp[token]):
                    candidates[prefix + (int(token),)] = score + float(lp[token])
        new_beams: dict[tuple, float] = {}
        newly_ended: dict[tuple, float] = {}
        for seq in sorted(candidates, key=candidates.get, reverse=True):
            if seq[-1] == eot:
                newly_ended[seq] = candidates[seq]
            else:
                new_beams[seq] = candidates[seq]
                if len(new_beams) == beam_size:
                    break
        for seq in sorted(newly_ended, key=newly_ended.get, reverse=True):
            if len(ended) >= capacity:
                break
            ended[seq] = newly_ended[seq]
        beams = new_beams
        if len(ended) >= capacity:
            break
    if len(ended) < beam_size:
        for seq in sorted(beams, key=beams.get, reverse=True):
            ended[seq + (eot,)] = beams[seq]
            if len(ended) >= beam_size:
                break

    def ranked(seq: tuple) -> float:
        n = len(seq) - 1  # end-of-text is not counted in the length
        penalty = n if length_penalty is None else ((5 + n) / 6) ** length_penalty
        return ended[seq] / penalty

    best = max(ended, key=ranked)
    return list(best[:-1]), ended[best]


def masked_toy_logprobs(item: int, prefix: tuple, vocab: int) -> np.ndarray:
    """What the search sees: end-of-text forbidden first, then renormalised."""
    lp = toy_logprobs(item, prefix, vocab).astype(np.float32)
    if not prefix:
        lp[EOT] = -np.inf
        lp = lp - np.logaddexp.reduce(lp[np.isfinite(lp)])
    return lp


def toy_logprobs(item: int, prefix: tuple, vocab: int) -> np.ndarray:
    """A fixed, prefix-dependent next-token distribution (a stand-in language model): end-of-text
    grows likelier with length, so hypotheses end at different steps."""
    seed = zlib.crc32(np.array((item, *prefix), dtype=np.int64).tobytes())
    logits = np.random.default_rng(seed).standard_normal(vocab) * 2.0
    logits[EOT] += -3.0 + 0.8 * len(prefix)
    return logits - np.logaddexp.reduce(logits)


def run_batched(items: int, beam_size: int, patience: float, max_steps: int, vocab: int,
                length_penalty: float | None) -> list[tuple[list[int], float]]:
    """Drive the batched BeamSearch with the toy model; the prefixes of the rows are tracked
    here from the tokens and source rows the search returns (that is what the runner's cache
    reordering relies on)."""
    search = BeamSearch(items, beam_size, max_steps, EOT, torch.device("cpu"), patience=patience)
    prefixes = [()] * (items * beam_size)
    no_mask = torch.zeros(vocab, dtype=torch.bool)
    begin = no_mask.clone()
    begin[EOT] = True  # as Whisper's runner does: no empty text
    for step in range(max_steps):
        logits = torch.tensor(np.stack([toy_logprobs(r // beam_size, prefixes[r], vocab) for r in range(len(prefixes))]),
                              dtype=torch.float32)
        tokens, src = search.step(logits, begin if step == 0 else no_mask)
        prefixes = [prefixes[s] + (t,) for s, t in zip(src.tolist(), tokens.tolist())]
        if bool(search.all_done()):
            break
    return [(c.tokens, c.sum_logprob) for c, _ in search.results(length_penalty)]


@pytest.mark.parametrize("beam_size,patience,max_steps,length_penalty", [
    (5, 1.0, 12, None), (5, 1.0, 4, None), (3, 2.0, 10, None), (4, 1.0, 10, 1.0), (5, 0.5, 8, 0.6), (1, 1.0, 10, None),
])
def test_batched_beam_search_equals_the_plain_reference(beam_size, patience, max_steps, length_penalty):
    """Several items at once, against the plain search one item at a time: the same tokens
    and scores, including the searches cut by the length limit (max_steps 4: the live beams
    fill the hypotheses) and patience both ways."""
    vocab, items = 11, 6
    got = run_batched(items, beam_size, patience, max_steps, vocab, length_penalty)
    for i, (tokens, score) in enumerate(got):
        want_tokens, want_score = reference_beam_search(
            lambda p, i=i: masked_toy_logprobs(i, p, vocab), beam_size, patience, max_steps, EOT, length_penalty)
        assert tokens == want_tokens, i
        assert score == pytest.approx(want_score, abs=1e-4), i


def test_the_reference_is_not_trivially_greedy():
    """The toy model must make beam search matter, or the comparison above proves little."""
    vocab = 11
    differs = 0
    for i in range(6):
        beam, _ = reference_beam_search(lambda p, i=i: masked_toy_logprobs(i, p, vocab), 5, 1.0, 12, EOT, None)
        greedy, _ = reference_beam_search(lambda p, i=i: masked_toy_logprobs(i, p, vocab), 1, 1.0, 12, EOT, None)
        differs += beam != greedy
    assert differs >= 2


# ------------------------------------------------------------------ the real model


@pytest.fixture(scope="module")
def short_clips():
    names = ["sense_and_sensibility_01_austen_64kb-0880.wav", "jfk.wav"]
    return [read_clip(c) for c in CLIPS if c.name in names]


def test_runner_beam_search_equals_the_plain_reference_on_real_speech(whisper_runner, short_clips):
    """Whisper-base on real speech: the runner's batched beam search (5 beams, two items in one
    batch) picks the tokens the plain search picks when every hypothesis is re-decoded from
    scratch through the model (no cache, no batching)."""
    r = whisper_runner
    assert r.config.whisper.beam_size == 5 and r.config.whisper.length_penalty is None
    model, tk = r.model, r.tokenizer
    got = r.transcribe(short_clips, [ItemOptions("en")] * 2)
    with torch.inference_mode():
        mel = r.logmel(r.logmel.pad_batch(short_clips))
        cross_all = model.cross_kv(model.encode(mel))
    prompt = [tk.sot, tk.languages["en"], tk.transcribe, tk.no_timestamps]
    for i, result in enumerate(got):
        cross = ([k[i : i + 1] for k in cross_all[0]], [v[i : i + 1] for v in cross_all[1]])

        def logprobs_of(prefix: tuple, cross=cross) -> np.ndarray:
            seq = torch.tensor([prompt + list(prefix)])
            with torch.inference_mode():
                cache = model.new_cache(1, seq.shape[1], r.dtype, r.device)
                logits = model.decode(seq, 0, cache, cross)[0, -1]
            mask = r._suppress_begin if not prefix else r._suppress
            return logits.masked_fill(mask, float("-inf")).log_softmax(-1).numpy()

        want, _ = reference_beam_search(logprobs_of, 5, 1.0, r.config.whisper.max_new_tokens, tk.eot, None)
        assert result.fields["temperature"] == 0.0
        assert result.fields["tokens"] == want, (tk.decode(result.fields["tokens"]), tk.decode(want))


def test_partials_decode_greedily_and_finals_by_beam(whisper_runner, short_clips):
    """A partial is the greedy decode (the plain argmax chain, written here); a final may differ."""
    r = whisper_runner
    model, tk = r.model, r.tokenizer
    partial = r.transcribe(short_clips[:1], [ItemOptions("en", partial=True)])[0]
    with torch.inference_mode():
        cross = model.cross_kv(model.encode(r.logmel(r.logmel.pad_batch(short_clips[:1]))))
        seq = [tk.sot, tk.languages["en"], tk.transcribe, tk.no_timestamps]
        out: list[int] = []
        for _ in range(r.config.whisper.max_new_tokens):
            t = torch.tensor([seq + out])
            logits = model.decode(t, 0, model.new_cache(1, t.shape[1], r.dtype, r.device), cross)[0, -1]
            nxt = int(logits.masked_fill(r._suppress if out else r._suppress_begin, float("-inf")).argmax())
            if nxt == tk.eot:
                break
            out.append(nxt)
    assert partial.fields["tokens"] == out


# ------------------------------------------------------------------ temperature fallback


def _with(runner, **whisper):
    return dataclasses.replace(runner.config, whisper=dataclasses.replace(runner.config.whisper, **whisper))


def test_fallback_runs_each_temperature_for_failing_finals_only(whisper_runner, short_clips, monkeypatch):
    """With a threshold no text can meet, a final is decoded at every temperature (beam search
    first, then best_of samples), a partial only once, and silence (likely no speech) is never
    decoded again; the final keeps the best attempt."""
    r = whisper_runner
    calls = []
    search = r._search

    def spy(state, items, k, kind, temperature):
        calls.append((tuple(items), k, kind, temperature))
        return search(state, items, k, kind, temperature)

    monkeypatch.setattr(r, "_search", spy)
    base = r.config
    r.config = _with(r, logprob_threshold=0.0, temperatures=(0.0, 0.5, 1.0))
    hum = (0.2 * np.sin(2 * np.pi * 50 * np.arange(16000 * 3) / 16000)).astype(np.float32)
    try:
        out = r.transcribe([short_clips[0], short_clips[0], hum],
                           [ItemOptions("en"), ItemOptions("en", partial=True), ItemOptions("en")])
    finally:
        r.config = base
    assert calls == [((1,), 1, "greedy", 0.0), ((0, 2), 5, "beam", 0.0), ((0,), 5, "sample", 0.5), ((0,), 5, "sample", 1.0)]
    assert out[0].text and out[1].text and out[2].text == ""
    # Every attempt failed the (impossible) threshold: the most likely attempt is kept, which
    # on clean speech is the beam search's.
    assert out[0].fields["temperature"] == 0.0


def test_fallback_sampling_is_reproducible(whisper_runner, short_clips):
    """At a temperature above 0 the candidates are sampled: the same seed gives the same text."""
    r = whisper_runner
    base = r.config
    # The only temperature is above 0: the first attempt is already sampled.
    r.config = _with(r, temperatures=(0.3,))
    try:
        r.sampler().manual_seed(7)
        a = r.transcribe(short_clips, [ItemOptions("en")] * 2)
        r.sampler().manual_seed(7)
        b = r.transcribe(short_clips, [ItemOptions("en")] * 2)
    finally:
        r.config = base
        r.sampler().manual_seed(base.whisper.sampling_seed)
    assert [x.fields["tokens"] for x in a] == [x.fields["tokens"] for x in b]
    assert all(x.fields["temperature"] == 0.3 and x.text for x in a)
