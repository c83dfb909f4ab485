import pytest

from server.wer import edit_distance, normalize_text, word_error_rate


def test_normalize():
    assert normalize_text("And Mr. John's ill-disposed, cold—hearted 'man'!") == "and mister john's ill disposed cold hearted man"


def test_edit_distance():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance([], ["a"]) == 1
    assert edit_distance(["a", "b"], ["a", "b"]) == 0


def test_wer_counts_over_all_reference_words():
    assert word_error_rate(["a b c d", "e f"], ["a x c d", "e f g"]) == pytest.approx(2 / 6)
    assert word_error_rate(["Hello, world."], ["hello world"]) == 0.0
    assert word_error_rate([""], [""]) == 0.0
    assert word_error_rate([""], ["noise"]) == float("inf")
    with pytest.raises(ValueError):
        word_error_rate(["a"], [])
