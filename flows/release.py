"""The release flow: preflight, then download → quantize → build → evaluate → benchmark → publish.

Orchestration only: each stage's work lives in tasks/<stage>.py. Before any stage runs, `preflight`
asks every cheap question that could fail the run later (source exists and is a Llama, tokens valid,
stores reachable, MMLU subjects known), so bad input costs seconds, not GPU hours.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from quant_release import mmlu as mmlu_data
from quant_release import textdata
from quant_release.config import STAGES, ReleaseConfig, Settings
from quant_release.engines import get_backend
from quant_release.environment import package_versions, resolved_device
from quant_release.progress import Progress
from quant_release.records import (
    Engines,
    MmluResult,
    ModelSource,
    QuantizedCheckpoint,
    Release,
    StageReport,
    ThroughputResult,
)
from quant_release.stage import StageRunner
from quant_release.state import StageStore, write_text_atomic
from quant_release.storage import ArtifactStore, open_store
from quant_release.summary import RunSummary, build_summary, summary_table
from quant_release.tracking import Tracker, check_tracking_uri, redact
from tasks.benchmark import benchmark_task
from tasks.build import build_task
from tasks.download import CheckedSource, check_source, download_task
from tasks.evaluate import evaluate_task
from tasks.publish import PublishInputs, check_publish, publish_task
from tasks.quantize import quantize_task

# What each stage reads from earlier stages (evaluate/benchmark only when enabled).
DEPENDENCIES: dict[str, tuple[str, ...]] = {
    "download": (),
    "quantize": ("download",),
    "build": ("download", "quantize"),
    "evaluate": ("build",),
    "benchmark": ("build",),
    "publish": ("download", "quantize", "build", "evaluate", "benchmark"),
}


def new_run_id() -> str:
    """Sortable and unique enough: UTC time plus 6 random hex digits, e.g. 20261126-231501-a3f9c2."""
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def enabled(config: ReleaseConfig, stage: str) -> bool:
    if stage == "evaluate":
        return config.mmlu.enabled
    if stage == "benchmark":
        return config.benchmark.enabled
    return True


def needed_stages(config: ReleaseConfig) -> set[str]:
    """The selected stages plus everything they read, minus stages the config switches off."""
    needed: set[str] = set()
    pending: list[str] = [s for s in config.stages if enabled(config, s)]
    while pending:
        stage = pending.pop()
        if stage in needed:
            continue
        needed.add(stage)
        pending.extend(d for d in DEPENDENCIES[stage] if enabled(config, d))
    return needed


@dataclass
class Preflight:
    checked: CheckedSource
    calib_dataset: str
    device: str
    store: ArtifactStore
    tracking_uri: str
    mmlu_dataset: mmlu_data.MmluDataset | None


def preflight(config: ReleaseConfig, settings: Settings, progress: Progress) -> Preflight:
    """Every check that is cheap and could otherwise fail the run late. Raises ConfigError."""
    needed = needed_stages(config)
    tracking_uri = settings.resolved_tracking_uri()
    check_tracking_uri(tracking_uri)
    store = open_store(settings.resolved_artifact_uri())
    store.check_access()
    checked = check_source(config.source, settings)
    device = resolved_device(config.engine.device)
    if needed & {"build", "evaluate", "benchmark"}:
        get_backend(config.engine.kind).check_available(device)
    dataset = None
    if "evaluate" in needed:
        dataset = mmlu_data.load_mmlu(config.mmlu.data)
        mmlu_data.resolve_subjects(dataset, config.mmlu.subjects)
    if "publish" in needed:
        check_publish(config.publish, settings)
    calib: str = config.quantization.calib_dataset
    if "quantize" in needed:
        calib = textdata.resolve_calibration_dataset(calib, settings.hf_endpoint)
    progress.note("preflight", f"source {checked.kind} {checked.source}; device {device}; calibration {calib}")
    return Preflight(
        checked=checked,
        calib_dataset=calib,
        device=device,
        store=store,
        tracking_uri=tracking_uri,
        mmlu_dataset=dataset,
    )


def _current_run_id() -> str:
    from prefect.runtime import flow_run

    name = flow_run.get_name()
    return name if name else new_run_id()


@flow(name="quant-release", flow_run_name=new_run_id, validate_parameters=True, log_prints=False)
def release(config: ReleaseConfig = ReleaseConfig()) -> dict[str, Any]:  # noqa: B008 - Prefect reads the default
    """Quantize a Hugging Face LLM to FP8, evaluate and benchmark it against BF16, and publish it."""
    settings = Settings()
    summary = run_release(config, settings, _current_run_id(), Progress(enabled=settings.progress))
    return summary.model_dump(mode="json")


def run_release(config: ReleaseConfig, settings: Settings, run_id: str, progress: Progress) -> RunSummary:
    """The flow's body. Writes STATE_DIR/runs/<run_id>/summary.json whether the run succeeds or not."""
    started = time.monotonic()
    versions = package_versions()
    summary_path = run_dir(settings, run_id) / "summary.json"
    pre = preflight(config, settings, progress)
    needed = needed_stages(config)
    tracker = Tracker(pre.tracking_uri, config.tracking.experiment, artifact_location=_local_artifacts(settings, pre))
    parent_id = tracker.start(
        run_name=config.tracking.run_name or run_id,
        params=config.model_dump(mode="json", exclude={"stages", "rerun"}),
        tags={
            "quant_release.run_id": run_id,
            "source": config.source.model,
            "device": pre.device,
            **{f"version.{k}": v for k, v in versions.items()},
        },
    )
    runner = StageRunner(
        store=StageStore(settings.state_dir),
        tracker=tracker,
        progress=progress,
        selected=set(config.stages),
        rerun=set(config.rerun),
    )
    records: dict[str, Any] = {}
    error: BaseException | None = None
    try:
        _run_stages(config, settings, pre, needed, runner, records, run_id, versions)
    except BaseException as exc:
        error = exc
        raise
    finally:
        for stage in STAGES:
            runner.reports.setdefault(stage, StageReport(status="skipped"))
        summary = build_summary(
            run_id=run_id,
            config=config,
            checked_revision=pre.checked.commit or pre.checked.identity,
            reports=runner.reports,
            records=records,
            tracking_uri=redact(pre.tracking_uri),
            mlflow_run_id=parent_id,
            versions=versions,
            device=pre.device,
            error=error,
            seconds=time.monotonic() - started,
        )
        try:
            _finish(summary, summary_path, tracker, pre.store, runner, error)
        except Exception as finish_error:
            if error is None:
                raise
            # A stage already failed: that is the error to report, not the follow-up failure to record it.
            progress.note("summary", f"could not record the summary everywhere: {finish_error}")
    return summary


def _run_stages(
    config: ReleaseConfig,
    settings: Settings,
    pre: Preflight,
    needed: set[str],
    runner: StageRunner,
    records: dict[str, Any],
    run_id: str,
    versions: dict[str, str],
) -> None:
    def skip(stage: str) -> None:
        runner.skip(stage, "switched off" if not enabled(config, stage) else "not selected")

    source: ModelSource = download_task(runner, pre.checked, settings)
    records["download"] = source
    if "quantize" not in needed:
        for stage in STAGES[1:]:
            skip(stage)
        return
    checkpoint: QuantizedCheckpoint = quantize_task(runner, config.quantization, pre.calib_dataset, source, pre.device)
    records["quantize"] = checkpoint
    engines: Engines | None = None
    if "build" in needed:
        engines = build_task(runner, config.engine, pre.device, source, checkpoint)
        records["build"] = engines
    else:
        skip("build")
    mmlu_result: MmluResult | None = None
    if "evaluate" in needed and engines is not None:
        assert pre.mmlu_dataset is not None
        mmlu_result = evaluate_task(runner, config.mmlu, engines, pre.mmlu_dataset)
        records["evaluate"] = mmlu_result
    else:
        skip("evaluate")
    throughput: ThroughputResult | None = None
    if "benchmark" in needed and engines is not None:
        throughput = benchmark_task(runner, config.benchmark, engines)
        records["benchmark"] = throughput
    else:
        skip("benchmark")
    runner.engines.close()
    if "publish" in needed:
        inputs = PublishInputs(
            source=source, checkpoint=checkpoint, engines=engines, mmlu=mmlu_result, throughput=throughput
        )
        release_record: Release = publish_task(runner, config.publish, settings, inputs, run_id, versions, pre.store)
        records["publish"] = release_record
    else:
        skip("publish")


def run_dir(settings: Settings, run_id: str) -> Path:
    return settings.state_dir.resolve() / "runs" / run_id


def _local_artifacts(settings: Settings, pre: Preflight) -> str | None:
    """With the embedded sqlite store, MLflow would put artifacts in ./mlruns: keep them in the state dir."""
    if pre.tracking_uri.startswith("sqlite:") or pre.tracking_uri.startswith("file:"):
        return (settings.state_dir.resolve() / "mlflow-artifacts").as_uri()
    return None


def _finish(
    summary: RunSummary,
    summary_path: Path,
    tracker: Tracker,
    store: ArtifactStore,
    runner: StageRunner,
    error: BaseException | None,
) -> None:
    """Record the summary everywhere; a failure here must not hide the stage error that got us here."""
    runner.engines.close()
    text = summary.model_dump_json(indent=2)
    write_text_atomic(summary_path, text)
    try:
        parent = tracker.parent_run_id
        if parent:
            tracker.log_metrics(parent, summary.parent_metrics)
            tracker.log_text(parent, text, "summary.json")
            tracker.log_text(parent, summary_table(summary), "summary.txt")
        store.upload_file(summary_path, f"runs/{summary.run_id}/summary.json")
        for stage in ("evaluate", "benchmark"):
            report = summary.stages[stage]
            if report.status in ("completed", "cached") and report.cache_key:
                record_file = runner.store.result_dir(stage, report.cache_key) / "record.json"
                store.upload_file(record_file, f"runs/{summary.run_id}/{stage}.json")
        for name in ("mmlu_predictions", "throughput_plot"):
            path = summary.artifacts.get(name)
            if path and parent:
                tracker.log_artifact(parent, Path(path))
        _prefect_artifact(summary)
    finally:
        tracker.finish("FAILED" if error else "FINISHED")


def _prefect_artifact(summary: RunSummary) -> None:
    """The summary table on the flow run's page in the Prefect UI."""
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:
        return  # run_release called as a plain function: there is no flow run page
    create_markdown_artifact(
        markdown=f"```\n{summary_table(summary)}\n```",
        key="release-summary",
        description=f"quant-release run {summary.run_id}",
    )
