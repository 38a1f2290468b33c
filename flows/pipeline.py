"""The release pipeline: preflight, then the stages of quant_release/stages.py, in table order.

Orchestration only: each stage's work lives in tasks/<stage>.py. Before any stage runs, `preflight`
asks every cheap question that could fail the run later (source exists and is a Llama, tokens valid,
stores reachable, MMLU subjects known), so bad input costs seconds, not GPU hours.

`run_release` is the body of the Prefect flow (flows/release.py) and runs the same two ways: inside that
flow (a deployment, or the CLI with PREFECT_API_URL set), where each stage is a Prefect task run; or
called directly by the CLI without a Prefect server, where each stage is its task's plain function and
prefect is never imported. `_call` is the one place that tells the two apart.
"""

from __future__ import annotations

import importlib
import secrets
import sys
import time
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

from quant_release import calibration, lineage, mmlu_report, netlimits, provenance
from quant_release import mmlu as mmlu_data
from quant_release.atomic import write_text_atomic
from quant_release.checks import check_fp8_gemm, check_options, check_quant_scheme, check_state_dir
from quant_release.config import ReleaseConfig, Settings
from quant_release.engines import check_available, resolve_engine
from quant_release.environment import package_versions, resolved_device
from quant_release.errors import ConfigError, error_message, redact
from quant_release.plan import Machine, Plan, format_bytes, plan_for_config
from quant_release.progress import Progress
from quant_release.records import CheckedSource, MmluResult, Record, Release, StageReport
from quant_release.signals import is_interrupt
from quant_release.stage import Preflight, RunContext, StageRunner, StageTask
from quant_release.stages import STAGE_TABLE, STAGES, StageName, enabled, needed_stages
from quant_release.state import StageStore
from quant_release.storage import ArtifactStore, open_store
from quant_release.summary import RunSummary, build_summary, summary_table
from quant_release.sweep import close_dead_runs, owner_tags, sweep_partials
from quant_release.tracking import Tracker, check_tracking_uri, supports_registry
from quant_release.upstream import check_upstream, probe_runner
from tasks.download import check_source
from tasks.publish import check_publish

R = TypeVar("R", bound=Record)

# tasks/<stage>.py defines <stage>_task(ctx: RunContext) -> the stage's record (quant_release/stages.py).
TASKS: dict[StageName, StageTask[Record]] = {
    spec.name: getattr(importlib.import_module(f"tasks.{spec.name}"), f"{spec.name}_task") for spec in STAGE_TABLE
}


def new_run_id() -> str:
    """Sortable and unique enough: UTC time plus 6 random hex digits, e.g. 20261126-231501-a3f9c2."""
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def preflight(config: ReleaseConfig, settings: Settings, progress: Progress) -> Preflight:
    """Every check that is cheap and could otherwise fail the run late. Raises ConfigError."""
    needed = needed_stages(config)
    check_state_dir(settings)
    tracking_uri = settings.resolved_tracking_uri()
    check_tracking_uri(tracking_uri, timeout=netlimits.current().connect_timeout)  # a health probe: quick
    store = open_store(settings.resolved_artifact_uri())
    store.check_access()
    checked = check_source(config.source, settings)
    for warning in check_options(config, checked):
        print(f"quant-release: warning: {warning}", file=sys.stderr)
    device = resolved_device(config.engine.device)
    engine = resolve_engine(config.engine.kind, device)
    engine_needed = any(spec.uses_engine for spec in STAGE_TABLE if spec.name in needed)
    if engine_needed:
        check_available(engine, device)
        check_fp8_gemm(config, device)
    check_quant_scheme(config, engine, engine_needed, "quantize" in needed)
    dataset = None
    if "evaluate" in needed:
        dataset = mmlu_data.load_mmlu(config.mmlu.data)
        mmlu_data.resolve_subjects(dataset, config.mmlu.subjects)
    if "publish" in needed:
        check_publish(config.publish, settings)
    calib = config.quantization.calib_dataset
    if "quantize" in needed:
        calib = calibration.resolve(calib, settings.hf_endpoint)
    # Last: every input check above fails in one line before the plan prints anything.
    memory_plan = check_memory_plan(config, checked, device, engine, needed, progress)
    progress.note(
        "preflight", f"source {checked.kind} {checked.source}; device {device}; engine {engine}; calibration {calib}"
    )
    return Preflight(
        checked=checked,
        calib_dataset=calib,
        device=device,
        engine=engine,
        store=store,
        tracking_uri=tracking_uri,
        mmlu_dataset=dataset,
        memory_plan=memory_plan,
    )


def check_memory_plan(
    config: ReleaseConfig,
    checked: CheckedSource,
    device: str,
    engine: str,
    needed: AbstractSet[str],
    progress: Progress,
) -> Plan | None:
    """The memory plan for the stages that run (quant_release/plan.py); ConfigError when it cannot fit, before
    anything is downloaded. None when the source's header states no shape."""
    if checked.shape is None or not needed & {"download", "quantize", "build", "evaluate", "benchmark"}:
        return None
    memory_plan = plan_for_config(checked.shape, config, Machine.detect(device), needed, engine)
    if memory_plan.problems:
        raise ConfigError(
            f"{checked.name} does not fit this machine: {memory_plan.problems[0]} "
            "(`quant-release plan` shows every stage's need)"
        )
    peaks = []
    for step in memory_plan.stage_peaks().values():
        if step.stage == "download":
            peaks.append(f"download {format_bytes(step.disk_bytes)} on disk")
        elif step.gpus:
            peaks.append(f"{step.stage} {format_bytes(max(step.gpu_bytes))} x {step.gpus} GPU")
        else:
            peaks.append(f"{step.stage} host {format_bytes(step.host_bytes)}")
    progress.note("preflight", f"memory plan ({checked.shape.params / 1e9:.2f}B parameters): {'; '.join(peaks)}")
    return memory_plan


def run_release(config: ReleaseConfig, settings: Settings, run_id: str, progress: Progress) -> RunSummary:
    """The run. Preflight first: a ConfigError leaves nothing behind (no MLflow run, no summary).
    After it, STATE_DIR/runs/<run_id>/summary.json is written whether the run succeeds or not."""
    started = time.monotonic()
    versions = package_versions()
    summary_path = run_dir(settings, run_id) / "summary.json"
    pre = preflight(config, settings, progress)
    if config.engine.kind != pre.engine:
        # `--engine auto`: the run records, keys and runs the engine it resolved to.
        config = config.model_copy(deep=True)
        config.engine.kind = pre.engine
    if needed_stages(config) - set(config.stages):
        # Decided before the MLflow run and the summary exist: a missing upstream leaves nothing behind.
        probe = probe_runner(StageStore(settings.state_dir), set(config.stages), set(config.rerun), config.engine.kind)
        check_upstream(
            RunContext(config=config, settings=settings, run_id=run_id, versions=versions, preflight=pre, runner=probe),
            TASKS,
        )
    sweep_partials(settings.state_dir)  # work dirs of runs killed before they could clean up
    tracker = Tracker(
        pre.tracking_uri,
        config.tracking.experiment,
        artifact_location=_local_artifacts(settings, pre),
        system_metrics_interval=settings.system_metrics_interval if settings.system_metrics else None,
    )
    parent_id = tracker.start(
        run_name=provenance.run_name(config, run_id),
        params=config.model_dump(mode="json", exclude={"stages", "rerun"}),
        tags={
            "quant_release.run_id": run_id,
            "source": config.source.model,
            "device": pre.device,
            **owner_tags(),  # lets a later run prove this one dead after a SIGKILL (quant_release/sweep.py)
            **{f"version.{k}": v for k, v in versions.items()},
            **provenance.default_tags("flows/release.py:release" if in_flow_run() else None),
            **_prefect_tags(),
        },
    )
    try:
        for dead in close_dead_runs(tracker):
            progress.note("preflight", f"closed MLflow run {dead} as KILLED: its process is gone")
    except Exception as exc:  # housekeeping must not stop a run
        progress.note("preflight", f"could not check for dead MLflow runs: {error_message(exc)}")
    runner = StageRunner(
        store=StageStore(settings.state_dir),
        tracker=tracker,
        progress=progress,
        selected=set(config.stages),
        rerun=set(config.rerun),
        engine=config.engine.kind,
    )
    ctx = RunContext(config=config, settings=settings, run_id=run_id, versions=versions, preflight=pre, runner=runner)
    error: BaseException | None = None
    try:
        _run_stages(ctx)
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
            results=ctx.results,
            tracking_uri=redact(pre.tracking_uri),
            mlflow_run_id=parent_id,
            versions=versions,
            device=pre.device,
            error=error,
            seconds=time.monotonic() - started,
        )
        try:
            _finish(
                summary,
                summary_path,
                tracker,
                pre.store,
                runner,
                error,
                ctx.results.find(MmluResult),
                lambda parent: _record_lineage(tracker, parent, ctx),
            )
        except Exception as finish_error:
            if error is None:
                raise
            # A stage already failed: that is the error to report, not the follow-up failure to record it.
            progress.note("summary", f"could not record the summary everywhere: {finish_error}")
    return summary


def _run_stages(ctx: RunContext) -> None:
    """Each stage of the table in order: run when needed (a stage's upstream results are in ctx.results
    by then), else reported as skipped. Loaded engines are freed once no later stage runs one."""
    needed = needed_stages(ctx.config)
    for position, spec in enumerate(STAGE_TABLE):
        if spec.name not in needed:
            reason = "not selected" if enabled(ctx.config, spec.name) else "switched off"
            ctx.runner.skip(spec.name, reason)
            continue
        ctx.results.add(_call(TASKS[spec.name], ctx))
        if not any(later.uses_engine and later.name in needed for later in STAGE_TABLE[position + 1 :]):
            ctx.runner.engines.close()


def _call(task: StageTask[R], ctx: RunContext) -> R:
    """In a Prefect flow run a stage is a task run; called directly (no Prefect server), its plain function."""
    return task(ctx) if in_flow_run() else task.fn(ctx)


def in_flow_run() -> bool:
    if "prefect" not in sys.modules:
        return False  # nothing imported prefect, so no flow is running (and it stays unimported)
    from prefect.context import FlowRunContext

    return FlowRunContext.get() is not None


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
    mmlu_result: MmluResult | None = None,
    record_lineage: Callable[[str], None] | None = None,
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
        for spec in STAGE_TABLE:
            report = summary.stages[spec.name]
            if spec.stored_with_run and report.status in ("completed", "cached") and report.cache_key:
                record_file = runner.store.result_dir(spec.name, report.cache_key) / "record.json"
                store.upload_file(record_file, f"runs/{summary.run_id}/{spec.name}.json")
        for name in ("mmlu_predictions", "throughput_plot", "mmlu_chart"):
            path = summary.artifacts.get(name)
            if path and parent:
                tracker.log_artifact(parent, Path(path))
        if parent and mmlu_result is not None:
            _log_mmlu(tracker, parent, mmlu_result, summary)
        if parent and record_lineage is not None:
            record_lineage(parent)
        _prefect_artifact(summary)
        if mmlu_result is not None:
            _prefect_mmlu_table(mmlu_result)
        _prefect_links(summary, tracker, runner)
    finally:
        tracker.finish("KILLED" if is_interrupt(error) else "FAILED" if error else "FINISHED")


def _record_lineage(tracker: Tracker, parent: str, ctx: RunContext) -> None:
    """The run's input datasets on the parent run and, once published, the release as an MLflow model version."""
    pre, progress = ctx.preflight, ctx.progress
    tracker.log_inputs(parent, lineage.input_datasets(ctx.results, pre.mmlu_dataset, ctx.settings.hf_endpoint))
    release = ctx.results.find(Release)
    if release is None or not release.artifact_uri:
        return
    if not supports_registry(pre.tracking_uri):
        progress.note("publish", f"no MLflow model version: {redact(pre.tracking_uri)} has no model registry")
        return
    name = lineage.registered_model_name(release, ctx.config.source.model)
    try:
        version = tracker.register_model_version(
            name,
            release.artifact_uri,
            parent,
            lineage.model_version_tags(release, ctx.run_id),
            description=f"FP8 release of {ctx.config.source.model} by quant-release run {ctx.run_id}",
        )
    except Exception as exc:  # the release is published and stored; a registry refusal must not fail it
        progress.note("publish", f"could not register MLflow model version {name}: {error_message(exc)}")
        return
    tracker.set_tags(parent, {"quant_release.model_version": f"{name}/{version}"})
    progress.note("publish", f"MLflow model version {name} {version} -> {release.artifact_uri}")


def _log_mmlu(tracker: Tracker, parent: str, result: MmluResult, summary: RunSummary) -> None:
    """The per-subject table and the gate's decision on the parent run (metrics come from the vocabulary)."""
    tracker.log_table(parent, mmlu_report.subject_table(result), "mmlu/subjects.json")
    tags = {"mmlu.scoring": result.scoring, "mmlu.chat_template": str(result.chat_template).lower()}
    if summary.quality_gate:
        tags["mmlu.gate"] = summary.quality_gate["decision"]
        tags["mmlu.gate.overridden"] = str(summary.quality_gate["overridden"]).lower()
    tracker.set_tags(parent, tags)


def _prefect_mmlu_table(result: MmluResult) -> None:
    """MMLU per category, BF16 vs FP8 with standard errors, on the flow run's page."""
    if not in_flow_run():
        return
    from prefect.artifacts import create_table_artifact

    create_table_artifact(
        table=mmlu_report.category_rows(result),
        key="mmlu-categories",
        description=f"MMLU {result.num_fewshot}-shot, {result.scoring} scoring, {result.questions} questions",
    )


def _prefect_artifact(summary: RunSummary) -> None:
    """The summary table on the flow run's page in the Prefect UI."""
    if not in_flow_run():
        return  # run directly: there is no flow run page
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        markdown=f"```\n{summary_table(summary)}\n```",
        key="release-summary",
        description=f"quant-release run {summary.run_id}",
    )


def _prefect_tags() -> dict[str, str]:
    """The flow run's id and URL on the MLflow run, so each leads to the other (links: `_prefect_links`)."""
    if not in_flow_run():
        return {}
    from quant_release.prefect_ui import flow_run_tags

    return flow_run_tags()


def _prefect_links(summary: RunSummary, tracker: Tracker, runner: StageRunner) -> None:
    """The throughput table and links to the MLflow run, the stored release and the Hub commit, in Prefect."""
    if not in_flow_run():
        return
    from quant_release import prefect_ui
    from quant_release.records import ThroughputResult

    parent = tracker.parent_run_id
    targets = prefect_ui.links(
        mlflow_url=prefect_ui.mlflow_run_url(tracker.tracking_uri, tracker.experiment_id, parent) if parent else None,
        artifact_uri=summary.artifacts.get("artifact_uri"),
        hub_url=summary.hub.get("url"),
        hub_revision=summary.hub.get("revision"),
    )
    throughput = None
    report = summary.stages.get("benchmark")
    if report and report.status in ("completed", "cached") and report.cache_key:
        throughput = runner.store.load("benchmark", report.cache_key, ThroughputResult)
    prefect_ui.publish_artifacts(throughput, targets, summary.run_id)
