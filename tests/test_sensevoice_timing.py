"""SenseVoice token/word timings from the greedy CTC alignment.

The pure functions are checked on hand-made frame rows whose answers are written out below;
the runner on a tiny random-weight SenseVoiceSmall in the real layout (meaningless words, but
real token ids, real frame counts and real batching).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from server.config import RunnerConfig
from server.runners.base import ItemOptions, Word
from server.runners.random_weights import write_sensevoice_dir
from server.runners.sensevoice import SenseVoiceRunner
from server.runners.sensevoice.runner import ctc_collapse
from server.runners.sensevoice.timing import PieceTable, agrees, frames_to_ms, group_words, item_words, token_runs
from tests.serverharness import CLIPS, read_clip
from tests.syncaudit import DeviceAudit

TAG = re.compile(r"<\|([^|]*)\|>")

# ---------------------------------------------------------------- runs


def test_runs_blanks_repeats_and_a_token_repeated_across_a_blank() -> None:
    #        frame: 0  1  2  3  4  5  6  7  8  9  10
    ids = np.array([0, 5, 5, 0, 5, 7, 7, 7, 0, 0, 3])
    tokens, first, last = token_runs(ids, blank=0)
    assert tokens.tolist() == [5, 5, 7, 3]  # 5 twice: a blank separates its two runs
    assert first.tolist() == [1, 4, 5, 10]
    assert last.tolist() == [2, 4, 7, 10]


def test_runs_edge_cases() -> None:
    assert [a.tolist() for a in token_runs(np.array([], dtype=np.int64), blank=0)] == [[], [], []]
    assert [a.tolist() for a in token_runs(np.array([0, 0, 0]), blank=0)] == [[], [], []]
    # a token from frame 0, two adjacent different tokens, a token up to the last frame
    assert [a.tolist() for a in token_runs(np.array([9, 9, 4, 6, 6]), blank=0)] == [[9, 4, 6], [0, 2, 3], [1, 2, 4]]
    # another blank id
    assert [a.tolist() for a in token_runs(np.array([2, 1, 1, 2, 2]), blank=2)] == [[1], [1], [2]]


def test_runs_give_ctc_collapse_tokens() -> None:
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids = rng.integers(0, 4, size=int(rng.integers(0, 40)))
        assert token_runs(ids, 0)[0].tolist() == ctc_collapse(ids).tolist()


def test_times_account_for_query_frames_and_clip_at_the_duration() -> None:
    # Output frames 0-3 are the query frames; frame 4 is audio frame 0 (0-60 ms).
    #        frame: 0  1   2   3   4  5   6   7  8   9
    ids = np.array([4, 12, 17, 26, 0, 30, 30, 0, 31, 31])
    tokens, first, last = token_runs(ids, blank=0)
    assert tokens.tolist() == [4, 12, 17, 26, 30, 31]
    start, end = frames_to_ms(first, last, frame_ms=60.0, duration_ms=10_000, query_frames=4)
    assert start.tolist() == [0, 0, 0, 0, 60, 240]
    assert end.tolist() == [0, 0, 0, 0, 180, 360]
    # The last LFR frame reaches past the audio: clipped to the item's duration.
    start, end = frames_to_ms(first, last, frame_ms=60.0, duration_ms=300, query_frames=4)
    assert start.tolist() == [0, 0, 0, 0, 60, 240]
    assert end.tolist() == [0, 0, 0, 0, 180, 300]
    # A start past the duration is clipped too.
    assert [a.tolist() for a in frames_to_ms(np.array([9]), np.array([9]), frame_ms=60.0, duration_ms=250, query_frames=4)] == [[250], [250]]


def test_a_run_across_the_query_boundary_starts_at_zero() -> None:
    # Frame 3 (text-normalisation query) and audio frame 0 emit the same id: one token.
    ids = np.array([4, 12, 17, 40, 40, 40, 0])
    tokens, first, last = token_runs(ids, blank=0)
    assert tokens.tolist() == [4, 12, 17, 40]
    start, end = frames_to_ms(first, last, frame_ms=60.0, duration_ms=1000, query_frames=4)
    assert (start[-1], end[-1]) == (0, 120)


# ---------------------------------------------------------------- words


class FakeSP:
    """The sentencepiece calls PieceTable makes, over a hand-written vocabulary."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def get_piece_size(self) -> int:
        return len(self.pieces)

    def id_to_piece(self, i: int) -> str:
        return self.pieces[i]

    def is_control(self, i: int) -> bool:
        return self.pieces[i] in ("<s>", "</s>")

    def is_unknown(self, i: int) -> bool:
        return self.pieces[i] == "<unk>"

    def is_byte(self, i: int) -> bool:
        return re.fullmatch(r"<0x[0-9A-F]{2}>", self.pieces[i]) is not None


PIECES = [
    "<unk>", "<s>", "</s>", "<|en|>", "<|NEUTRAL|>", "<|Speech|>", "<|withitn|>",  # 0-6
    "▁hel", "lo", "▁world", ",", ".", "你", "好", "。",  # 7-14
    "“", "”", "▁", "<0xE4>", "<0xBD>", "<0xA0>", "▁(", "it", ")",  # 15-23
]
TABLE = PieceTable.from_sentencepiece(FakeSP(PIECES), TAG)


def words_of(tokens: list[int]) -> list[tuple[str, int, int]]:
    """Token i spans [100 i, 100 i + 50] ms."""
    return [(w.word, w.start_ms, w.end_ms) for w in group_words(tokens, [100 * i for i in range(len(tokens))],
                                                                 [100 * i + 50 for i in range(len(tokens))], TABLE)]


def test_english_words_subwords_and_punctuation() -> None:
    # <|en|> <|NEUTRAL|> <|Speech|> <|withitn|> ▁hel lo , ▁world .
    assert words_of([3, 4, 5, 6, 7, 8, 10, 9, 11]) == [("hello,", 400, 650), ("world.", 700, 850)]
    # ▁( it ) : an opening bracket joins the word after it, a closing one the word before it
    assert words_of([9, 21, 22, 23]) == [("world", 0, 50), ("(it)", 100, 350)]


def test_cjk_tokens_are_words_and_punctuation_joins() -> None:
    # “ 你 好 ” 。 : each character its own word, quotes and the full stop attached
    assert words_of([15, 12, 13, 16, 14]) == [("“你", 0, 150), ("好”。", 200, 450)]
    # a Latin piece after a CJK word starts a new word, even without a space
    assert words_of([12, 8]) == [("你", 0, 50), ("lo", 100, 150)]


def test_lone_space_piece_byte_pieces_and_control_pieces() -> None:
    # hel ▁ lo : the lone "▁" separates; <s> is dropped; bytes E4 BD A0 spell 你 as one token
    assert words_of([7, 17, 8, 1]) == [("hel", 0, 50), ("lo", 200, 250)]
    assert words_of([18, 19, 20, 13]) == [("你", 0, 250), ("好", 300, 350)]


def test_item_words_from_a_frame_row() -> None:
    # query frames: <|en|> <|NEUTRAL|> <|Speech|> <|withitn|>, then audio frames 0..8:
    #                 q  q  q  q | 0  1  2  3  4  5   6  7  8
    frames = np.array([3, 4, 5, 6, 0, 7, 7, 8, 0, 0, 10, 9, 9])
    tokens, words = item_words(frames, TABLE, blank=0, frame_ms=60.0, duration_ms=500, query_frames=4)
    assert tokens.tolist() == [3, 4, 5, 6, 7, 8, 10, 9]
    # ▁hel: audio frames 1-2 (60-180), lo: 3 (180-240), ",": 6 (360-420), ▁world: 7-8 (420-540 -> 500)
    assert words == [Word("hello,", 60, 420), Word("world", 420, 500)]
    assert agrees(words, "hello, world") and not agrees(words, "hello world")
    assert item_words(np.array([3, 4, 5, 6, 0, 0]), TABLE, blank=0, frame_ms=60.0, duration_ms=500, query_frames=4)[1] == []


# ---------------------------------------------------------------- the runner


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sensevoice_dir(tmp_path_factory.mktemp("sv") / "SenseVoiceSmall", scale="tiny", seed=0)


@pytest.fixture(scope="module")
def runner(model_dir: Path) -> SenseVoiceRunner:
    r = SenseVoiceRunner(RunnerConfig(name="sensevoice", model=str(model_dir), device="cpu", warmup=False))
    r.load()
    return r


@pytest.fixture(scope="module")
def audios() -> list[np.ndarray]:
    clips = [read_clip(c) for c in CLIPS[:3]]
    return [clips[0], clips[1][: 16000 * 3 + 77], clips[2][:8000], clips[1]]


def test_runner_frame_rate_is_60_ms(runner: SenseVoiceRunner) -> None:
    # frontend_conf of SenseVoiceSmall: frame_shift 10 ms, lfr_n 6; the encoder keeps the LFR rate.
    assert runner._frame_ms == 60.0


def _check_words(words: list[Word] | None, text: str, num_samples: int) -> None:
    assert words is not None
    duration_ms = num_samples * 1000 // 16000
    assert "".join(w.word for w in words) == "".join(text.split())
    previous_end = 0
    for w in words:
        assert w.word and w.word == w.word.strip()
        assert 0 <= previous_end <= w.start_ms <= w.end_ms <= duration_ms
        previous_end = w.end_ms


def test_batched_words_are_monotonic_agree_with_the_text_and_equal_one_at_a_time(
    runner: SenseVoiceRunner, audios: list[np.ndarray]
) -> None:
    opts = [ItemOptions("en"), ItemOptions("auto"), ItemOptions("zh"), ItemOptions("en", itn=False)]
    batched = runner.transcribe(audios, opts)
    for r, a in zip(batched, audios):
        _check_words(r.words, r.text, len(a))
    assert sum(len(r.words) for r in batched) > 10, "random weights still emit words on speech"
    assert max(r.words[-1].end_ms for r in batched if r.words) > 3000  # times reach into long items
    alone = [runner.transcribe([a], [o])[0] for a, o in zip(audios, opts)]
    assert [r.words for r in batched] == [r.words for r in alone]
    assert [r.text for r in batched] == [r.text for r in alone]


def test_words_false_gives_none_and_the_same_text(runner: SenseVoiceRunner, audios: list[np.ndarray]) -> None:
    with_words = runner.transcribe(audios[:2], [ItemOptions("en")] * 2)
    without = runner.transcribe(audios[:2], [ItemOptions("en", words=False)] * 2)
    assert all(r.words is None for r in without)
    assert [(r.text, r.fields["tokens"]) for r in without] == [(r.text, r.fields["tokens"]) for r in with_words]


def test_empty_and_tiny_items(runner: SenseVoiceRunner, audios: list[np.ndarray]) -> None:
    empty, tiny = np.zeros(0, np.float32), np.zeros(100, np.float32)
    out = runner.transcribe([empty, tiny, audios[2]], [ItemOptions(), ItemOptions(words=False), ItemOptions()])
    assert out[0].words == [] and out[1].words is None
    _check_words(out[2].words, out[2].text, len(audios[2]))


def test_words_add_no_device_copy_or_sync(model_dir: Path, audios: list[np.ndarray]) -> None:
    """On `meta` (tests/syncaudit.py): with timings asked for, still exactly one device->host
    copy per batch, no read-back, and collecting the result does no device work."""
    r = SenseVoiceRunner(RunnerConfig(name="sensevoice", model=str(model_dir), device="meta", warmup=False))
    r.load()
    with DeviceAudit() as audit:
        launched = r.launch([audios[0][:40000], audios[1][:24000]], [ItemOptions("en", words=True), ItemOptions("auto", words=True)])
        n_launch = len(audit.events)
        results = launched.result()
    assert not audit.of("sync") and not audit.of("mixed"), audit.of("sync") + audit.of("mixed")
    assert len(audit.of("d2h")) == 1 and audit.index("d2h") > audit.index("compute", last=True)
    assert len(audit.events) == n_launch
    # meta reads back zeros, finite flags included, so the items come back as ItemErrors: the
    # host-side timing code itself is numpy over the copied rows (the CPU tests above run it).
    assert len(results) == 2
