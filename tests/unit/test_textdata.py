"""Calibration and probe text: the held-out split, token windows, fingerprints."""

from __future__ import annotations

import pytest

from quant_release import textdata


def _encode(text: str) -> list[int]:
    """A deterministic stand-in tokenizer: one id per whitespace-separated word."""
    return [sum(word.encode()) % 50_000 for word in text.split()]


# --- python_docs ----------------------------------------------------------------------------------


def test_python_docs_splits_are_non_empty_disjoint_by_topic_and_cover_all_topics() -> None:
    from pydoc_data.topics import topics

    calibration = textdata.python_docs("calibration")
    heldout = textdata.python_docs("heldout")
    assert calibration
    assert heldout
    assert set(calibration) | set(heldout) == set(topics.values())  # no text is left out
    # About one topic in five is held out: neither split is a token gesture.
    assert 0.1 < len(heldout) / len(topics) < 0.35
    assert sum(len(t) for t in heldout) > 10_000
    assert not set(calibration) & set(heldout)


def test_python_docs_splits_share_no_text() -> None:
    calibration = set(textdata.python_docs("calibration"))
    heldout = textdata.python_docs("heldout")
    assert not [text[:40] for text in heldout if text in calibration]


def test_python_docs_is_stable() -> None:
    assert textdata.python_docs("heldout") == textdata.python_docs("heldout")
    assert textdata.python_docs("calibration") == textdata.python_docs("calibration")


def test_python_docs_split_does_not_depend_on_dict_order(monkeypatch: pytest.MonkeyPatch) -> None:
    import pydoc_data.topics

    expected = (textdata.python_docs("calibration"), textdata.python_docs("heldout"))
    reversed_topics = dict(reversed(list(pydoc_data.topics.topics.items())))
    monkeypatch.setattr(pydoc_data.topics, "topics", reversed_topics)
    assert (textdata.python_docs("calibration"), textdata.python_docs("heldout")) == expected


# --- token_windows --------------------------------------------------------------------------------


DOCS = [f"document {i} " + " ".join(f"w{i}_{j}" for j in range(40)) for i in range(30)]


@pytest.mark.parametrize(("count", "length"), [(1, 1), (3, 17), (10, 64), (25, 40)])
def test_token_windows_exact_count_and_length(count: int, length: int) -> None:
    windows = textdata.token_windows(DOCS, _encode, count, length, seed=0)
    assert len(windows) == count
    assert all(len(w) == length for w in windows)


def _unique_encode(text: str) -> list[int]:
    """Every word of DOCS gets its own id, so repeated or overlapping cuts are visible."""
    pairs = [word[1:].split("_") for word in text.split() if word.startswith("w")]
    return [int(doc) * 1000 + int(index) for doc, index in pairs]


def test_token_windows_are_consecutive_non_overlapping_cuts() -> None:
    small = textdata.token_windows(DOCS, _unique_encode, 4, 10, seed=3)
    large = textdata.token_windows(DOCS, _unique_encode, 2, 20, seed=3)
    flat = [t for w in small for t in w]
    assert flat == [t for w in large for t in w]
    assert len(set(flat)) == len(flat)


def test_token_windows_deterministic_per_seed() -> None:
    first = textdata.token_windows(DOCS, _encode, 5, 32, seed=11)
    again = textdata.token_windows(DOCS, _encode, 5, 32, seed=11)
    assert first == again


def test_token_windows_differ_across_seeds() -> None:
    results = {str(textdata.token_windows(DOCS, _encode, 5, 32, seed=s)) for s in range(5)}
    assert len(results) == 5


def test_token_windows_separator_goes_between_documents() -> None:
    docs = ["a b c", "d e f"]
    windows = textdata.token_windows(docs, lambda t: [ord(c) for c in t.split()[0]] * 3, 1, 8, seed=0, separator=[0])
    assert windows[0].count(0) == 2  # after each of the two documents
    assert len(windows[0]) == 8


def test_token_windows_reuse_text_when_short() -> None:
    docs = ["one two three"]
    windows = textdata.token_windows(docs, lambda _: [1, 2, 3], count=4, length=5, seed=0)
    assert windows == [[1, 2, 3, 1, 2], [3, 1, 2, 3, 1], [2, 3, 1, 2, 3], [1, 2, 3, 1, 2]]


def test_token_windows_count_zero_and_empty_text() -> None:
    assert textdata.token_windows(DOCS, _encode, 0, 10, seed=0) == []
    with pytest.raises(ValueError, match="no text"):
        textdata.token_windows([""], lambda _: [], 2, 10, seed=0)


def test_token_windows_on_python_docs_with_a_real_encoder() -> None:
    windows = textdata.token_windows(textdata.python_docs("heldout"), lambda t: list(t.encode()), 8, 256, seed=0)
    assert len(windows) == 8
    assert all(len(w) == 256 for w in windows)
    assert len({tuple(w) for w in windows}) == 8  # plenty of text: no window repeats


# --- fingerprint_tokens ---------------------------------------------------------------------------


def test_fingerprint_tokens_changes_with_any_token() -> None:
    windows = [[1, 2, 3, 4], [5, 6, 7, 8]]
    base = textdata.fingerprint_tokens(windows)
    assert base == textdata.fingerprint_tokens([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert len(base) == 64
    for w in range(2):
        for i in range(4):
            changed = [list(row) for row in windows]
            changed[w][i] += 1
            assert textdata.fingerprint_tokens(changed) != base, (w, i)


def test_fingerprint_tokens_sees_window_boundaries_and_order() -> None:
    base = textdata.fingerprint_tokens([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert textdata.fingerprint_tokens([[1, 2, 3], [4, 5, 6, 7, 8]]) != base
    assert textdata.fingerprint_tokens([[5, 6, 7, 8], [1, 2, 3, 4]]) != base
    assert textdata.fingerprint_tokens([[1, 2, 3, 4]]) != base
