"""The MMLU accuracy gate before publish: decided on the paired interval of FP8's drop, never on a point.

`gate_for` turns the evaluate stage's paired comparison and the publish options into a decision
(quant_release/paired.py: passed / failed / undecided). `enforce` blocks publish on a failed gate unless
`--allow-accuracy-drop` overrides it; the override is recorded (summary, MLflow, card). An undecided gate
lets publish go on and is reported as undecided, never as passed.
"""

from __future__ import annotations

from quant_release.config import PublishConfig
from quant_release.errors import QuantReleaseError
from quant_release.paired import AccuracyGate, accuracy_gate
from quant_release.records import MmluResult


class AccuracyGateError(QuantReleaseError):
    """FP8 lost more MMLU accuracy than allowed, with confidence: the release is not published."""

    exit_code = 1


def gate_for(result: MmluResult | None, config: PublishConfig) -> AccuracyGate | None:
    """The gate's decision, or None when MMLU did not run (or its record predates paired statistics)."""
    if result is None or result.paired is None:
        return None
    return accuracy_gate(result.paired, config.max_accuracy_drop / 100, allow_drop=config.allow_accuracy_drop)


def describe(gate: AccuracyGate, result: MmluResult) -> str:
    """One line with the figures: drop, its interval, the threshold, the questions, and what decides it."""
    pair = result.paired
    confidence = f"{pair.confidence:.0%}" if pair else "95%"
    line = (
        f"MMLU accuracy gate {gate.decision}: FP8 drops {100 * gate.drop:.2f} pp "
        f"({confidence} interval {100 * gate.drop_low:.2f} to {100 * gate.drop_high:.2f} pp) "
        f"against a maximum of {100 * gate.max_accuracy_drop:.2f} pp on {result.questions} questions "
        f"({result.scoring} scoring)"
    )
    if gate.decision == "undecided":
        needed = gate.questions_to_decide
        line += f"; about {needed:,} questions would decide it" if needed else "; no number of questions decides it"
    if gate.overridden:
        line += "; overridden by --allow-accuracy-drop"
    return line


def enforce(gate: AccuracyGate | None, result: MmluResult | None) -> None:
    """Raise AccuracyGateError on a failed gate that was not overridden."""
    if gate is None or result is None or gate.decision != "failed" or gate.overridden:
        return
    raise AccuracyGateError(f"publish blocked: {describe(gate, result)}; pass --allow-accuracy-drop to publish anyway")
