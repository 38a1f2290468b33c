"""The run summary: what `--summary-json` writes, what MLflow's parent run gets, the closing table.

Its metrics and the table's rows come from the metric vocabulary (quant_release/metrics.py).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from quant_release import metrics, quality_gate
from quant_release.config import ReleaseConfig
from quant_release.errors import error_message
from quant_release.progress import format_seconds
from quant_release.records import (
    Engines,
    MmluResult,
    ModelSource,
    QuantizedCheckpoint,
    Release,
    Results,
    StageReport,
    ThroughputResult,
)
from quant_release.stages import STAGES


class RunSummary(BaseModel):
    run_id: str
    status: str
    error: str | None = None
    seconds: float
    model: dict[str, str | None]
    stages: dict[str, StageReport]
    metrics: dict[str, float | None]
    artifacts: dict[str, str | None]
    mlflow: dict[str, str | None]
    hub: dict[str, str | None]
    device: str
    environment: dict[str, str]
    parent_metrics: dict[str, float] = Field(default_factory=dict, exclude=True)
    # The MMLU gate before publish (quant_release/quality_gate.py): decision, drop and its interval, threshold.
    quality_gate: dict[str, Any] | None = None


def build_summary(
    *,
    run_id: str,
    config: ReleaseConfig,
    checked_revision: str | None,
    reports: dict[str, StageReport],
    results: Results,
    tracking_uri: str,
    mlflow_run_id: str | None,
    versions: dict[str, str],
    device: str,
    error: BaseException | None,
    seconds: float,
) -> RunSummary:
    source = results.find(ModelSource)
    checkpoint = results.find(QuantizedCheckpoint)
    engines = results.find(Engines)
    result = results.find(MmluResult)
    release = results.find(Release)
    throughput = results.find(ThroughputResult)
    parent_metrics: dict[str, float] = {}
    for record in results:
        parent_metrics.update(record.metrics())
    for stage, report in reports.items():
        if report.status in ("completed", "cached"):
            parent_metrics[metrics.stage_seconds_key(stage)] = report.seconds
        parent_metrics.update(metrics.stage_memory_metrics(stage, report.peak_rss_bytes, report.peak_gpu_memory_bytes))
    return RunSummary(
        run_id=run_id,
        status="failed" if error else "completed",
        error=error_message(error) if error else None,
        seconds=seconds,
        model={
            "source": config.source.model,
            "revision": source.revision if source else checked_revision,
            "fingerprint": source.fingerprint if source else None,
        },
        stages={stage: reports[stage] for stage in STAGES},
        metrics=metrics.summary_metrics(results),
        artifacts={
            "checkpoint_dir": str(checkpoint.checkpoint_dir) if checkpoint else None,
            "model_card": str(release.model_card) if release else None,
            "artifact_uri": release.artifact_uri if release else None,
            "release_folder": str(release.folder) if release else None,
            "mmlu_predictions": str(result.predictions_file) if result else None,
            "throughput_plot": str(throughput.plot_file) if throughput and throughput.plot_file else None,
            "mmlu_chart": str(result.chart_file) if result and result.chart_file else None,
        },
        mlflow={"tracking_uri": tracking_uri, "run_id": mlflow_run_id},
        hub={
            "repo_id": release.hub_repo_id if release else None,
            "revision": release.hub_revision if release else None,
            "url": release.hub_url if release else None,
        },
        device=engines.device_name if engines else device,
        environment=versions,
        parent_metrics=parent_metrics,
        quality_gate=_gate_summary(result, config),
    )


def _gate_summary(result: MmluResult | None, config: ReleaseConfig) -> dict[str, Any] | None:
    """The gate as publish decides it; there even when publish failed on it or did not run."""
    gate = quality_gate.gate_for(result, config.publish)
    if gate is None or result is None:
        return None
    return {**gate.model_dump(), "questions": result.questions, "scoring": result.scoring}


def summary_table(summary: RunSummary) -> str:
    """The short table printed at the end of a run."""
    lines = [f"quant-release run {summary.run_id}: {summary.status} in {format_seconds(summary.seconds)}", ""]
    lines.append(f"{'stage':<10} {'status':<10} {'time':>8}")
    for stage, report in summary.stages.items():
        time_text = format_seconds(report.seconds) if report.status in ("completed", "failed") else "-"
        lines.append(f"{stage:<10} {report.status:<10} {time_text:>8}")
    lines += ["", f"{'':<22} {'BF16':>10} {'FP8':>10}"]
    for row in metrics.headline_rows(summary.metrics):
        lines.append(f"{row.label:<22} {row.bf16:>10} {row.fp8:>10}")
    lines += ["", f"device:   {summary.device}"]
    if summary.artifacts.get("model_card"):
        lines.append(f"card:     {summary.artifacts['model_card']}")
    if summary.artifacts.get("artifact_uri"):
        lines.append(f"stored:   {summary.artifacts['artifact_uri']}")
    if summary.hub.get("url"):
        lines.append(f"hub:      {summary.hub['url']} @ {summary.hub['revision']}")
    lines.append(f"mlflow:   {summary.mlflow['tracking_uri']} run {summary.mlflow['run_id']}")
    if summary.quality_gate:
        gate = summary.quality_gate
        override = " (overridden)" if gate.get("overridden") else ""
        lines.append(
            f"MMLU gate: {gate['decision']}{override}, drop {100 * gate['drop']:.2f} pp "
            f"[{100 * gate['drop_low']:.2f}, {100 * gate['drop_high']:.2f}] "
            f"vs max {100 * gate['max_accuracy_drop']:.2f} pp"
        )
    if summary.error:
        lines.append(f"error:    {summary.error}")
    return "\n".join(lines)
