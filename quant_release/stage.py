"""Running one stage the same way every time: reuse a finished result or produce it, track it, time it.

`StageRunner.run` is what makes a run resumable. The stage's inputs hash to a key: what the task states
(its config section, what it read), plus what the runner adds from the stage table itself (the cache
keys of the stages it `needs`, and the version of the code and packages that shape its result). A
finished result under that key is loaded instead of redone (`cached`), unless the user asked to `--rerun`
the stage. Either way the stage gets a nested MLflow run with its params, the record's metrics and the
record itself as an artifact.

`RunContext` is what every stage task receives: the run's config and settings, what preflight found out,
the records of earlier stages (by type) and the runner. `stage_task` makes a stage function a Prefect task
without importing Prefect until a flow run calls it.
"""

from __future__ import annotations

import contextlib
import functools
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

from quant_release import metrics
from quant_release.config import ReleaseConfig, Settings
from quant_release.engines.pool import EnginePool
from quant_release.errors import MissingUpstreamError, error_message
from quant_release.memory import PeakMemory, peaks_so_far
from quant_release.mmlu import MmluDataset
from quant_release.plan import Plan
from quant_release.progress import Progress
from quant_release.records import CheckedSource, Record, Results, StageReport, StageResources
from quant_release.stages import STAGE_TABLE, Stage, code_version
from quant_release.state import StageStore, cache_key
from quant_release.storage import ArtifactStore
from quant_release.tracking import Tracker

R = TypeVar("R", bound=Record)
R_co = TypeVar("R_co", bound=Record, covariant=True)


@dataclass(frozen=True)
class StageWork:
    """Where a stage writes its outputs (moved into place when it returns) and its cache key."""

    dir: Path
    key: str


def with_resources(record: R, seconds: float) -> R:
    """The record with what producing it cost (the run's PeakMemory began with this stage)."""
    rss, gpu = peaks_so_far()
    device = None
    if gpu:
        import torch

        device = torch.cuda.get_device_name(0)
    resources = StageResources(seconds=round(seconds, 3), peak_rss_bytes=rss, peak_gpu_memory_bytes=gpu, device=device)
    return record.model_copy(update={"resources": resources})


@dataclass
class StageRunner:
    store: StageStore
    tracker: Tracker
    progress: Progress
    selected: set[str]
    rerun: set[str]
    engine: str | None = None  # engine.kind: its code and packages are part of engine stages' keys
    table: tuple[Stage, ...] = STAGE_TABLE
    engines: EnginePool = field(default_factory=EnginePool)
    reports: dict[str, StageReport] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)

    def key_inputs(self, stage: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
        """The task's own inputs plus what the stage table adds: upstream keys and the code's version."""
        spec = self._spec(stage)
        # A need that did not run (switched off) has no key and adds nothing.
        upstream = {need: self.keys[need] for need in spec.needs if need in self.keys}
        return {**inputs, "upstream": upstream, "code": code_version(spec, self.engine)}

    def run(
        self,
        stage: str,
        inputs: Mapping[str, Any],
        produce: Callable[[StageWork], R],
        accept: Callable[[R], R] | None = None,
    ) -> R:
        """`_run` (below), with the stage's peak host and GPU memory added to its report and MLflow run."""
        peak = PeakMemory()
        try:
            with peak:
                return self._run(stage, inputs, produce, accept)
        finally:
            self._record_memory(stage, peak)

    def _record_memory(self, stage: str, peak: PeakMemory) -> None:
        report = self.reports.get(stage)
        if report is None:
            return
        self.reports[stage] = report.model_copy(
            update={"peak_rss_bytes": peak.rss_bytes, "peak_gpu_memory_bytes": peak.gpu_bytes}
        )
        if report.mlflow_run_id:  # the stage's run has ended; MLflow still takes metrics for it
            self.tracker.log_metrics(
                report.mlflow_run_id, metrics.stage_run_metrics(None, peak.rss_bytes, peak.gpu_bytes)
            )
        self._log_parent(metrics.stage_memory_metrics(stage, peak.rss_bytes, peak.gpu_bytes))
        if report.status == "completed" and peak.rss_bytes is not None:
            gpus = "".join(f", {device} {value / 2**30:.2f} GiB" for device, value in peak.gpu_bytes.items())
            scope = "" if peak.rss_scope == "stage" else " (process lifetime)"
            self.progress.note(stage, f"peak memory: host RSS {peak.rss_bytes / 2**30:.2f} GiB{scope}{gpus}")

    def _run(
        self,
        stage: str,
        inputs: Mapping[str, Any],
        produce: Callable[[StageWork], R],
        accept: Callable[[R], R] | None,
    ) -> R:
        """Return the stage's record: loaded when finished before, else produced into a fresh dir.

        A stage that was not selected is only loaded; if it never finished with these inputs the run
        stops with a message saying which command produces it.

        `accept` is a gate on the record (fresh or cached) whose criteria are not in the key: it returns
        the record (annotated with its verdict) or raises, which fails the stage while its result stays
        stored, so changing the criteria or overriding them re-checks the measurement instead of redoing it.
        """
        spec = self._spec(stage)
        full_inputs = self.key_inputs(stage, inputs)
        key = cache_key(stage, full_inputs)
        self.keys[stage] = key
        selected = stage in self.selected
        start = time.monotonic()
        cached, distrust = (
            (None, None) if (selected and stage in self.rerun) else self.store.load_checked(stage, key, spec.record)
        )
        if distrust is not None:  # a result exists but changed since it was written: say which file
            self.progress.note(stage, f"finished result not reused: {distrust}")
        if cached is None and not selected:
            error = MissingUpstreamError(
                f"stage {stage} has no finished result for these settings; run `quant-release {stage}` "
                "(or `quant-release run`) with the same options first"
            )
            self.reports[stage] = StageReport(status="failed", cache_key=key, error=str(error))
            raise error
        warn = functools.partial(self.progress.note, stage)
        try:
            with self.tracker.stage(stage, tags={"cache_key": key}, warn=warn) as run_id:
                self.tracker.log_params(run_id, full_inputs)
                if cached is not None:
                    record = cast(R, cached)  # loaded as the table's record type, which `produce` returns
                    status = "cached"
                    self.progress.note(stage, f"cached (key {key}), reusing {self.store.result_dir(stage, key)}")
                else:
                    self.progress.stage_started(stage)
                    try:
                        with self.store.writing(stage, key) as work_dir:
                            produced = with_resources(produce(StageWork(work_dir, key)), time.monotonic() - start)
                            record = self.store.commit(stage, key, work_dir, produced)
                    except BaseException as exc:
                        self._stage_failed(stage, start, key, exc, run_id)
                        with contextlib.suppress(Exception):  # MLflow failing too must not hide `exc`
                            self.tracker.log_text(run_id, traceback.format_exc(), "error.txt")
                        raise
                    status = "completed"
                self.tracker.log_artifact(run_id, self.store.result_dir(stage, key) / "record.json")
                if accept is not None:
                    try:
                        record = accept(record)
                    except BaseException as exc:
                        # The measured numbers belong in MLflow most of all when the gate rejects them: on the
                        # parent run, where they would have gone had the gate passed (the record never reaches
                        # the run's results, so the summary cannot log them).
                        self._log_parent(record.metrics())
                        self._stage_failed(stage, start, key, exc, run_id)
                        raise
                seconds = time.monotonic() - start
                self.tracker.set_tags(run_id, {"status": status})
                # Comparison metrics on the parent only (as soon as the stage ends, so a long run shows them
                # early); the stage's run keeps its own timing. The summary logs the same values again at the end,
                # which the tracker skips as already logged.
                self.tracker.log_metrics(run_id, metrics.stage_run_metrics(seconds))
                self._log_parent({**record.metrics(), metrics.stage_seconds_key(stage): seconds})
        except BaseException as exc:
            # Failed after the stage's own work, e.g. recording it in MLflow: the report says failed, not skipped.
            if stage not in self.reports:
                self.reports[stage] = StageReport(
                    status="failed", seconds=time.monotonic() - start, cache_key=key, error=error_message(exc)
                )
            raise
        self.reports[stage] = StageReport(status=status, seconds=seconds, cache_key=key, mlflow_run_id=run_id)
        if status == "completed":
            self.progress.stage_finished(stage, status, seconds)
        return record

    def _stage_failed(self, stage: str, start: float, key: str, exc: BaseException, run_id: str) -> None:
        """Report a stage that raised in its own work or its gate (the caller re-raises)."""
        seconds = time.monotonic() - start
        self.reports[stage] = StageReport(
            status="failed", seconds=seconds, cache_key=key, error=error_message(exc), mlflow_run_id=run_id
        )
        self.progress.stage_finished(stage, "failed", seconds, error_message(exc))

    def _log_parent(self, values: Mapping[str, float]) -> None:
        """Comparison metrics go on the release's parent run (a runner without one logs none)."""
        parent = self.tracker.parent_run_id
        if parent and values:
            self.tracker.log_metrics(parent, values)

    def skip(self, stage: str, reason: str) -> None:
        self.reports[stage] = StageReport(status="skipped", error=None)
        self.progress.note(stage, f"skipped ({reason})")

    def _spec(self, stage: str) -> Stage:
        for spec in self.table:
            if spec.name == stage:
                return spec
        raise ValueError(f"stage {stage!r} is not in the runner's stage table")


@dataclass(frozen=True)
class Preflight:
    """What the checks before the run found out, for the stages to use (nothing is asked twice)."""

    checked: CheckedSource
    calib_dataset: str  # `auto` resolved to a source name
    device: str  # `auto` resolved to cpu or cuda
    engine: str  # `auto` resolved to an installed engine that runs on that device
    store: ArtifactStore
    tracking_uri: str
    mmlu_dataset: MmluDataset | None  # loaded when evaluate runs
    memory_plan: Plan | None = None  # quant_release/plan.py; None when the source states no shape


@dataclass
class RunContext:
    """What every stage task receives (`tasks/<stage>.py`: `<stage>_task(ctx)`)."""

    config: ReleaseConfig
    settings: Settings
    run_id: str
    versions: dict[str, str]
    preflight: Preflight
    runner: StageRunner
    results: Results = field(default_factory=Results)

    @property
    def progress(self) -> Progress:
        return self.runner.progress


class StageTask(Generic[R_co]):
    """A stage's task: its plain function (`fn`) and, when called inside a Prefect flow run, a Prefect task.

    The Prefect task is made on first use, so a run without Prefect (the CLI with no PREFECT_API_URL)
    never imports prefect, which takes seconds. Inside a flow run, calling it is calling the Prefect task:
    a task run named after the stage, keyed by the function (`<stage>_task-...`) as Prefect does.
    """

    def __init__(self, fn: Callable[[RunContext], R_co], name: str) -> None:
        self.fn = fn
        self.name = name
        self._prefect_task: Any = None

    def __call__(self, ctx: RunContext) -> R_co:
        from prefect.client.schemas.objects import State

        if self._prefect_task is None:
            from prefect import task
            from prefect.cache_policies import NO_CACHE

            # Our own cache (StageRunner) decides what is reused; Prefect neither caches nor persists.
            # Prefect keys a task by its function's qualified name and source: each stage's task wears its
            # own function's (`quantize_task`), not the shared `_as_task`, so the UI tells them apart.
            def body(ctx: RunContext) -> Any:
                return self._as_task(ctx)

            functools.update_wrapper(body, self.fn)
            self._prefect_task = task(name=self.name, cache_policy=NO_CACHE, persist_result=False)(body)
        result = self._prefect_task(ctx)
        # A task that returned a State (a reused stage, below) hands that State back to its caller.
        record: R_co = result.result() if isinstance(result, State) else result
        return record

    def _as_task(self, ctx: RunContext) -> Any:
        """The body of the Prefect task: a stage reused from its cache ends as Cached in the UI, not Completed."""
        record = self.fn(ctx)
        report = ctx.runner.reports.get(self.name)
        if report is not None and report.status == "cached":
            from quant_release.prefect_ui import cached

            return cached(record, f"reused the finished result {report.cache_key}")
        return record


def stage_task(name: str) -> Callable[[Callable[[RunContext], R]], StageTask[R]]:
    """`@stage_task("quantize")` on `quantize_task(ctx) -> QuantizedCheckpoint` in tasks/quantize.py."""

    def decorate(fn: Callable[[RunContext], R]) -> StageTask[R]:
        return StageTask(fn, name)

    return decorate
