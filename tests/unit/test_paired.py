"""The paired BF16-vs-FP8 statistics and the accuracy gate, against independent computations."""

from __future__ import annotations

import random

import numpy as np
import pytest
from scipy import stats

from quant_release.paired import accuracy_gate, compare, mcnemar_exact, standard_error


def _pairs(n: int, both: int, bf16_only: int, fp8_only: int, seed: int = 0) -> tuple[list[bool], list[bool]]:
    rows = [(True, True)] * both + [(True, False)] * bf16_only + [(False, True)] * fp8_only
    rows += [(False, False)] * (n - len(rows))
    random.Random(seed).shuffle(rows)
    return [a for a, _ in rows], [b for _, b in rows]


@pytest.mark.parametrize(("b", "c"), [(0, 0), (3, 0), (10, 12), (40, 25), (200, 170), (1500, 1390)])
def test_mcnemar_equals_scipys_binomial_test(b: int, c: int) -> None:
    expected = 1.0 if b + c == 0 else stats.binomtest(min(b, c), b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_counts_accuracies_and_the_delta() -> None:
    bf16, fp8 = _pairs(1000, both=600, bf16_only=80, fp8_only=50)
    same = [a == b for a, b in zip(bf16, fp8, strict=True)]
    result = compare(bf16, fp8, same)
    assert (result.bf16_accuracy, result.fp8_accuracy) == (0.68, 0.65)
    assert result.delta == pytest.approx(-0.03)
    assert (result.bf16_only_correct, result.fp8_only_correct) == (80, 50)
    assert result.same_answer_rate == 0.87


def test_bootstrap_interval_matches_a_per_question_bootstrap() -> None:
    """The multinomial shortcut gives the interval a plain question-resampling bootstrap gives."""
    bf16, fp8 = _pairs(400, both=200, bf16_only=40, fp8_only=25)
    result = compare(bf16, fp8, [a == b for a, b in zip(bf16, fp8, strict=True)], seed=1)
    rng = np.random.default_rng(2)
    a, b = np.array(bf16, dtype=float), np.array(fp8, dtype=float)
    index = rng.integers(0, 400, size=(10_000, 400))
    deltas = b[index].mean(axis=1) - a[index].mean(axis=1)
    low, high = np.quantile(deltas, [0.025, 0.975])
    assert result.delta_low == pytest.approx(low, abs=0.006)
    assert result.delta_high == pytest.approx(high, abs=0.006)
    assert result.delta_low < result.delta < result.delta_high
    # Deterministic for a seed.
    again = compare(bf16, fp8, [a == b for a, b in zip(bf16, fp8, strict=True)], seed=1)
    assert (again.delta_low, again.delta_high) == (result.delta_low, result.delta_high)


def _gate(n: int, both: int, bf16_only: int, fp8_only: int, threshold: float) -> tuple[str, int | None]:
    bf16, fp8 = _pairs(n, both, bf16_only, fp8_only)
    gate = accuracy_gate(compare(bf16, fp8, [a == b for a, b in zip(bf16, fp8, strict=True)]), threshold)
    return gate.decision, gate.questions_to_decide


def test_gate_passes_when_the_whole_interval_is_below_the_threshold() -> None:
    assert _gate(14_000, 11_000, 300, 290, 0.01) == ("passed", None)


def test_gate_fails_when_the_whole_interval_is_above_the_threshold() -> None:
    assert _gate(14_000, 11_000, 800, 300, 0.01) == ("failed", None)


def test_gate_is_undecided_in_between_and_says_how_many_questions_would_decide() -> None:
    decision, needed = _gate(228, 40, 14, 8, 0.01)
    assert decision == "undecided"
    assert needed is not None and needed > 228


def test_an_override_is_recorded_only_for_a_failed_gate() -> None:
    bf16, fp8 = _pairs(14_000, 11_000, 800, 300)
    comparison = compare(bf16, fp8, [a == b for a, b in zip(bf16, fp8, strict=True)])
    assert accuracy_gate(comparison, 0.01, allow_drop=True).overridden
    assert not accuracy_gate(comparison, 0.01).overridden
    bf16, fp8 = _pairs(14_000, 11_000, 300, 290)
    comparison = compare(bf16, fp8, [a == b for a, b in zip(bf16, fp8, strict=True)])
    assert not accuracy_gate(comparison, 0.01, allow_drop=True).overridden


def test_mismatched_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="same, non-empty"):
        compare([True], [True, False], [True])
    with pytest.raises(ValueError, match="same, non-empty"):
        compare([], [], [])


def test_standard_error() -> None:
    assert standard_error(0.5, 100) == 0.05
    assert np.isnan(standard_error(0.5, 0))
