"""The MMLU gate before publish: decided on the paired interval, blocking only a confident failure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from quant_release import modelcard, quality_gate
from quant_release.config import PublishConfig, ReleaseConfig
from quant_release.paired import compare
from quant_release.records import MmluResult, Results, StageReport
from quant_release.stages import STAGES
from quant_release.summary import build_summary, summary_table
from tests.unit.test_modelcard import _checkpoint, _inputs, _mmlu, _source


def _result(both: int, bf16_only: int, fp8_only: int, neither: int) -> MmluResult:
    bf16 = [True] * (both + bf16_only) + [False] * (fp8_only + neither)
    fp8 = [True] * both + [False] * bf16_only + [True] * fp8_only + [False] * neither
    same = [a == b for a, b in zip(bf16, fp8, strict=True)]
    return _mmlu().model_copy(update={"paired": compare(bf16, fp8, same), "questions": len(bf16)})


FAILING = (400, 60, 0, 540)  # FP8 loses 6 points on 1,000 questions: the whole interval is above 1 point
PASSING = (500, 0, 0, 500)  # identical answers: a drop of exactly 0, interval 0 to 0
UNDECIDED = (70, 6, 4, 148)  # 228 questions, -0.9 points, an interval of several points around it


def test_decisions_follow_the_interval() -> None:
    config = PublishConfig()
    assert quality_gate.gate_for(_result(*FAILING), config).decision == "failed"  # type: ignore[union-attr]
    assert quality_gate.gate_for(_result(*PASSING), config).decision == "passed"  # type: ignore[union-attr]
    gate = quality_gate.gate_for(_result(*UNDECIDED), config)
    assert gate is not None and gate.decision == "undecided" and gate.questions_to_decide
    assert gate.max_accuracy_drop == pytest.approx(0.01)  # --max-accuracy-drop is in points
    loose = quality_gate.gate_for(_result(*FAILING), PublishConfig(max_accuracy_drop=20))
    assert loose is not None and loose.decision == "passed"


def test_no_mmlu_or_no_paired_statistics_means_no_gate() -> None:
    assert quality_gate.gate_for(None, PublishConfig()) is None
    assert quality_gate.gate_for(_mmlu().model_copy(update={"paired": None}), PublishConfig()) is None


def test_a_failed_gate_blocks_with_its_figures_in_one_line() -> None:
    result = _result(*FAILING)
    gate = quality_gate.gate_for(result, PublishConfig())
    with pytest.raises(quality_gate.AccuracyGateError) as info:
        quality_gate.enforce(gate, result)
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code == 1
    assert message.startswith("publish blocked: MMLU accuracy gate failed: FP8 drops 6.00 pp")
    assert "against a maximum of 1.00 pp on 1000 questions" in message
    assert "--allow-accuracy-drop" in message


def test_an_override_or_an_undecided_gate_lets_publish_go_on() -> None:
    result = _result(*FAILING)
    gate = quality_gate.gate_for(result, PublishConfig(allow_accuracy_drop=True))
    assert gate is not None and gate.overridden
    quality_gate.enforce(gate, result)
    undecided = _result(*UNDECIDED)
    quality_gate.enforce(quality_gate.gate_for(undecided, PublishConfig()), undecided)


def _card(result: MmluResult, **config: Any) -> str:
    gate = quality_gate.gate_for(result, PublishConfig(**config))
    return modelcard.render(_inputs(mmlu=result, gate=gate))


def test_the_card_states_the_paired_figures_and_the_gate() -> None:
    result = _result(*UNDECIDED)
    pair = result.paired
    assert pair is not None
    card = _card(result)
    assert "| Accuracy gate | **undecided**" in card
    assert "passed" not in card.split("### BF16 vs FP8")[1]
    assert f"{100 * pair.delta_low:+.2f} pp to {100 * pair.delta_high:+.2f} pp" in card
    assert f"| Only BF16 right / only FP8 right | {pair.bf16_only_correct} / {pair.fp8_only_correct} |" in card
    assert f"p = {pair.mcnemar_p_value:.3g}" in card
    assert "questions would decide it" in card
    overridden = _card(_result(*FAILING), allow_accuracy_drop=True)
    assert "**failed** (overridden: published with --allow-accuracy-drop)" in overridden


def test_the_card_gives_each_variant_its_own_standard_error() -> None:
    result = _mmlu()
    card = modelcard.render(_inputs(mmlu=result))
    assert result.bf16.stderr is not None and result.fp8.stderr is not None
    assert f"±{100 * result.bf16.stderr:.1f} pp for BF16 and ±{100 * result.fp8.stderr:.1f} pp for FP8" in card


def test_the_summary_reports_the_gate_even_without_a_release() -> None:
    result = _result(*FAILING)
    summary = build_summary(
        run_id="r",
        config=ReleaseConfig(),
        checked_revision=None,
        reports={stage: StageReport(status="completed") for stage in STAGES},
        results=Results([_source("hub"), _checkpoint(), result]),
        tracking_uri="sqlite:///x.db",
        mlflow_run_id=None,
        versions={},
        device="cpu",
        error=None,
        seconds=1.0,
    )
    gate = summary.quality_gate
    assert gate is not None and gate["decision"] == "failed" and gate["questions"] == 1000
    assert summary.model_dump()["quality_gate"]["max_accuracy_drop"] == pytest.approx(0.01)
    assert "MMLU gate: failed, drop 6.00 pp" in summary_table(summary)
    assert summary.metrics["mmlu_delta_low"] == result.paired.delta_low  # type: ignore[union-attr]


def test_a_failed_gate_fails_the_publish_stage_before_anything_is_stored(tmp_path: Path) -> None:
    """Through the real stage runner, a local MLflow store and a local artifact store."""
    from quant_release.config import Settings
    from quant_release.progress import Progress
    from quant_release.records import CheckedSource
    from quant_release.stage import Preflight, RunContext, StageRunner
    from quant_release.state import StageStore
    from quant_release.storage import open_store
    from quant_release.tracking import Tracker
    from tasks.publish import publish_task

    store = open_store(str(tmp_path / "artifacts"))
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}", "gate", (tmp_path / "mlflow-artifacts").as_uri())
    tracker.start("gate", params={}, tags={})
    runner = StageRunner(
        store=StageStore(tmp_path / "state"),
        tracker=tracker,
        progress=Progress(enabled=False),
        selected={"publish"},
        rerun=set(),
    )
    checked = CheckedSource(
        kind="hub",
        source="o/m",
        path=None,
        repo_id="o/m",
        commit="c",
        identity="c",
        license=None,
        base_model=None,
        name="m",
    )
    preflight = Preflight(
        checked=checked,
        calib_dataset="python-docs",
        device="cpu",
        engine="builtin",
        store=store,
        tracking_uri="",
        mmlu_dataset=None,
    )
    ctx = RunContext(
        config=ReleaseConfig(),
        settings=Settings(state_dir=tmp_path / "state"),
        run_id="r",
        versions={},
        preflight=preflight,
        runner=runner,
        results=Results([_source("hub"), _checkpoint(), _result(*FAILING)]),
    )
    with pytest.raises(quality_gate.AccuracyGateError, match="publish blocked: MMLU accuracy gate failed"):
        publish_task.fn(ctx)
    report = runner.reports["publish"]
    assert report.status == "failed" and report.error and "FP8 drops 6.00 pp" in report.error
    assert not (tmp_path / "artifacts" / "releases").exists()
    run = tracker.client.get_run(report.mlflow_run_id)
    assert run.info.status == "FAILED" and "publish blocked" in run.data.tags["error"]
