"""Running one stage the same way every time: reuse a finished result or produce it, track it, time it.

`StageRunner.run` is what makes a run resumable. The stage's inputs (its config section, upstream
cache keys, tool versions) hash to a key; a finished result under that key is loaded instead of
redone (`cached`), unless the user asked to `--rerun` the stage. Either way the stage gets a nested
MLflow run with its params, the record's metrics and the record itself as an artifact.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from quant_release.engines.pool import EnginePool
from quant_release.errors import MissingUpstreamError, error_message
from quant_release.progress import Progress
from quant_release.records import Record, StageReport
from quant_release.state import StageStore, cache_key
from quant_release.tracking import Tracker

R = TypeVar("R", bound=Record)


@dataclass
class StageRunner:
    store: StageStore
    tracker: Tracker
    progress: Progress
    selected: set[str]
    rerun: set[str]
    engines: EnginePool = field(default_factory=EnginePool)
    reports: dict[str, StageReport] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)

    def run(
        self,
        stage: str,
        inputs: Mapping[str, Any],
        record_type: type[R],
        produce: Callable[[Path], R],
    ) -> R:
        """Return the stage's record: loaded when finished before, else produced into a fresh dir.

        A stage that was not selected is only loaded; if it never finished with these inputs the run
        stops with a message saying which command produces it.
        """
        key = cache_key(stage, inputs)
        self.keys[stage] = key
        selected = stage in self.selected
        start = time.monotonic()
        cached = None if (selected and stage in self.rerun) else self.store.load(stage, key, record_type)
        if cached is None and not selected:
            error = MissingUpstreamError(
                f"stage {stage} has no finished result for these settings; run `quant-release {stage}` "
                "(or `quant-release run`) with the same options first"
            )
            self.reports[stage] = StageReport(status="failed", cache_key=key, error=str(error))
            raise error
        with self.tracker.stage(stage, tags={"cache_key": key}) as run_id:
            self.tracker.log_params(run_id, inputs)
            if cached is not None:
                record = cached
                status = "cached"
                self.progress.note(stage, f"cached (key {key}), reusing {self.store.result_dir(stage, key)}")
            else:
                self.progress.stage_started(stage)
                try:
                    with self.store.writing(stage, key) as work_dir:
                        record = self.store.commit(stage, key, work_dir, produce(work_dir))
                except BaseException as exc:
                    seconds = time.monotonic() - start
                    self.reports[stage] = StageReport(
                        status="failed", seconds=seconds, cache_key=key, error=error_message(exc), mlflow_run_id=run_id
                    )
                    self.tracker.log_text(run_id, traceback.format_exc(), "error.txt")
                    self.progress.stage_finished(stage, "failed", seconds, error_message(exc))
                    raise
                status = "completed"
            seconds = time.monotonic() - start
            self.tracker.set_tags(run_id, {"status": status})
            self.tracker.log_metrics(run_id, {**record.metrics(), f"stage/{stage}/seconds": seconds})
            self.tracker.log_artifact(run_id, self.store.result_dir(stage, key) / "record.json")
        self.reports[stage] = StageReport(status=status, seconds=seconds, cache_key=key, mlflow_run_id=run_id)
        if status == "completed":
            self.progress.stage_finished(stage, status, seconds)
        return record

    def skip(self, stage: str, reason: str) -> None:
        self.reports[stage] = StageReport(status="skipped", error=None)
        self.progress.note(stage, f"skipped ({reason})")
