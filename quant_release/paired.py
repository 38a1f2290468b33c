"""BF16 vs FP8 on the same questions, as a paired comparison, and the accuracy gate that decides on it.

Two accuracies measured on the same questions are not independent: what matters is how often the two
variants disagree, and in which direction. With n questions and the four counts of (BF16 right?, FP8
right?), this module gives
  * the accuracy delta (FP8 - BF16) with a paired bootstrap 95% interval (questions resampled with
    replacement; the four counts make that a multinomial draw, so 10,000 resamples cost milliseconds),
  * the same-answer rate (both variants chose the same letter),
  * McNemar's exact test on the discordant questions (two-sided binomial test, p = 1/2),
  * the gate: the drop (BF16 - FP8) must stay below `max_accuracy_drop`. It *passed* when the whole
    interval of the drop lies below the threshold, *failed* when the whole interval lies above it, and is
    *undecided* otherwise, with an estimate of how many questions would decide it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, Field

GateDecision = Literal["passed", "failed", "undecided"]
BOOTSTRAP_RESAMPLES = 10_000
CONFIDENCE = 0.95


class PairedComparison(BaseModel):
    questions: int
    bf16_accuracy: float
    fp8_accuracy: float
    delta: float = Field(description="FP8 - BF16 accuracy")
    delta_low: float = Field(description="lower end of the paired bootstrap interval of the delta")
    delta_high: float
    confidence: float
    same_answer_rate: float = Field(description="fraction of questions where both chose the same answer")
    bf16_only_correct: int = Field(description="questions BF16 got right and FP8 wrong")
    fp8_only_correct: int
    mcnemar_p_value: float = Field(description="exact two-sided McNemar test on the discordant questions")
    bootstrap_resamples: int
    seed: int


class AccuracyGate(BaseModel):
    max_accuracy_drop: float = Field(description="largest acceptable BF16 - FP8 accuracy drop (a fraction)")
    drop: float
    drop_low: float
    drop_high: float
    decision: GateDecision
    questions_to_decide: int | None = Field(
        None, description="about how many questions would make an undecided gate decide (same rates)"
    )
    overridden: bool = Field(False, description="a failed gate was allowed to publish (--allow-accuracy-drop)")


def mcnemar_exact(bf16_only: int, fp8_only: int) -> float:
    """Two-sided exact McNemar p-value: P(a split at least this uneven | no difference), capped at 1."""
    discordant = bf16_only + fp8_only
    if discordant == 0:
        return 1.0
    low = min(bf16_only, fp8_only)
    tail = sum(math.comb(discordant, k) for k in range(low + 1))
    # Exact integer arithmetic first; one division at the end keeps thousands of terms precise.
    return float(min(1.0, 2 * tail / 2**discordant))


def compare(
    bf16_correct: Sequence[bool], fp8_correct: Sequence[bool], same_answer: Sequence[bool], seed: int = 0
) -> PairedComparison:
    """The paired comparison of two variants' per-question correctness (same questions, same order)."""
    import numpy as np  # here, not at the top: records.py imports this module, and the CLI imports records

    n = len(bf16_correct)
    if n == 0 or len(fp8_correct) != n or len(same_answer) != n:
        raise ValueError("paired comparison needs the same, non-empty list of questions for both variants")
    both = sum(1 for a, b in zip(bf16_correct, fp8_correct, strict=True) if a and b)
    bf16_only = sum(1 for a, b in zip(bf16_correct, fp8_correct, strict=True) if a and not b)
    fp8_only = sum(1 for a, b in zip(bf16_correct, fp8_correct, strict=True) if b and not a)
    neither = n - both - bf16_only - fp8_only
    counts = np.array([both, bf16_only, fp8_only, neither], dtype=np.float64)
    draws = np.random.default_rng(seed).multinomial(n, counts / n, size=BOOTSTRAP_RESAMPLES)
    deltas = (draws[:, 2] - draws[:, 1]) / n
    tail = (1 - CONFIDENCE) / 2
    low, high = np.quantile(deltas, [tail, 1 - tail])
    return PairedComparison(
        questions=n,
        bf16_accuracy=(both + bf16_only) / n,
        fp8_accuracy=(both + fp8_only) / n,
        delta=(fp8_only - bf16_only) / n,
        delta_low=float(low),
        delta_high=float(high),
        confidence=CONFIDENCE,
        same_answer_rate=sum(same_answer) / n,
        bf16_only_correct=bf16_only,
        fp8_only_correct=fp8_only,
        mcnemar_p_value=mcnemar_exact(bf16_only, fp8_only),
        bootstrap_resamples=BOOTSTRAP_RESAMPLES,
        seed=seed,
    )


def accuracy_gate(comparison: PairedComparison, max_accuracy_drop: float, allow_drop: bool = False) -> AccuracyGate:
    """Decide on the interval of the drop, never on the point estimate alone."""
    drop, drop_low, drop_high = -comparison.delta, -comparison.delta_high, -comparison.delta_low
    decision: GateDecision
    if drop_high < max_accuracy_drop:
        decision = "passed"
    elif drop_low > max_accuracy_drop:
        decision = "failed"
    else:
        decision = "undecided"
    needed = None
    if decision == "undecided":
        # The interval's half-width shrinks like 1/sqrt(n): enough questions to fit it between the point
        # estimate and the threshold. None when the estimate sits on the threshold (no n decides it).
        half_width = (drop_high - drop_low) / 2
        margin = abs(max_accuracy_drop - drop)
        if margin > 0 and half_width > 0:
            needed = math.ceil(comparison.questions * (half_width / margin) ** 2)
    return AccuracyGate(
        max_accuracy_drop=max_accuracy_drop,
        drop=drop,
        drop_low=drop_low,
        drop_high=drop_high,
        decision=decision,
        questions_to_decide=needed,
        overridden=allow_drop and decision == "failed",
    )


def standard_error(accuracy: float, questions: int) -> float:
    """Binomial standard error of an accuracy over `questions` independent questions."""
    return math.sqrt(accuracy * (1 - accuracy) / questions) if questions else math.nan
