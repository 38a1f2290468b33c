"""The fidelity gate of the quantize stage: FP8 perplexity against BF16's, with the numbers in its error."""

from __future__ import annotations

import pytest

from quant_release.config import QuantizationConfig
from quant_release.records import FidelityReport, QuantizedCheckpoint
from tasks.quantize import FidelityGateError, check_fidelity_gate


def _checkpoint(ppl_fp8: float) -> QuantizedCheckpoint:
    report = FidelityReport(
        text="mmlu questions",
        tokens=1024,
        fingerprint="0" * 64,
        reference="fp32",
        fp8_gemm="emulated",
        ppl_fp32=43.32,
        ppl_bf16=43.38,
        ppl_fp8=ppl_fp8,
        kl_fp32_bf16=0.0011,
        kl_fp32_fp8=0.039,
        kl_bf16_fp8=0.040,
        top1_bf16_vs_fp32=0.967,
        top1_fp8_vs_fp32=0.887,
        top1_fp8_vs_bf16=0.892,
    )
    # Only the fields the gate reads; the rest of the record is the export's business.
    return QuantizedCheckpoint.model_construct(fidelity=report, gate=None)


def test_within_the_limit_passes() -> None:
    checked = check_fidelity_gate(_checkpoint(44.07), QuantizationConfig())  # +1.59%, the default run's
    assert checked.gate is not None
    assert checked.gate.passed and not checked.gate.overridden
    assert checked.gate.ppl_increase == pytest.approx(44.07 / 43.38 - 1)


def test_beyond_the_limit_fails_with_the_numbers_in_one_line() -> None:
    with pytest.raises(FidelityGateError) as raised:
        check_fidelity_gate(_checkpoint(44.432), QuantizationConfig())
    message = str(raised.value)
    assert "\n" not in message
    assert "FP8 perplexity 44.432 is +2.43% from BF16's 43.380 (limit +2.00%" in message
    assert "--override-fidelity-gate" in message


def test_a_looser_limit_or_the_override_accepts_it_and_says_which() -> None:
    looser = check_fidelity_gate(_checkpoint(44.432), QuantizationConfig(max_ppl_increase=0.05))
    assert looser.gate is not None and looser.gate.passed and not looser.gate.overridden
    overridden = check_fidelity_gate(_checkpoint(44.432), QuantizationConfig(override_fidelity_gate=True))
    assert overridden.gate is not None
    assert not overridden.gate.passed and overridden.gate.overridden


def test_no_measurement_means_no_gate() -> None:
    unmeasured = QuantizedCheckpoint.model_construct(fidelity=None, gate=None)
    assert check_fidelity_gate(unmeasured, QuantizationConfig()).gate is None
