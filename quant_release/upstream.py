"""Deciding before anything is recorded whether a run's unselected stages have finished results.

`quant-release evaluate` reads download, quantize and build back from the state dir. Whether they are
there depends on cache keys that chain (quantize's key holds the download record's fingerprint), so
the check walks the stage table the way the run would, calling each task with a runner that only
loads (`ProbeRunner`): no MLflow run, no summary, no stage directory. Every missing stage is named,
together with the stages that cannot be looked up because they need a missing one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from quant_release.errors import MissingUpstreamError
from quant_release.progress import Progress
from quant_release.records import Record
from quant_release.stage import RunContext, StageRunner, StageTask, StageWork
from quant_release.stages import STAGE_TABLE, StageName, needed_stages
from quant_release.state import StageStore, cache_key
from quant_release.tracking import Tracker

R = TypeVar("R", bound=Record)


class _NotFinishedError(Exception):
    """Raised by ProbeRunner.run where the real run would produce (or fail)."""


@dataclass
class ProbeRunner(StageRunner):
    """A StageRunner that loads finished results and never produces, tracks or writes anything."""

    loaded: list[str] = field(default_factory=list)

    def run(
        self,
        stage: str,
        inputs: Mapping[str, Any],
        produce: Callable[[StageWork], R],
        accept: Callable[[R], R] | None = None,
    ) -> R:
        del produce, accept  # never called: the probe only looks (a stored result's gate is judged by the run)
        spec = self._spec(stage)
        key = cache_key(stage, self.key_inputs(stage, inputs))
        self.keys[stage] = key
        if stage in self.selected and stage in self.rerun:
            raise _NotFinishedError(stage)
        record = self.store.load(stage, key, spec.record)
        if record is None:
            raise _NotFinishedError(stage)
        self.loaded.append(stage)
        return cast(R, record)


def missing_upstream(ctx: RunContext, tasks: Mapping[StageName, StageTask[Record]]) -> list[str]:
    """The unselected stages this run needs whose results are not on disk (in table order)."""
    assert isinstance(ctx.runner, ProbeRunner)
    needed = needed_stages(ctx.config)
    missing: list[str] = []
    unknown: set[str] = set()  # needs a stage that will be (re)produced: its key cannot be known yet
    for spec in STAGE_TABLE:
        if spec.name not in needed:
            continue
        selected = spec.name in ctx.runner.selected
        needs = [need for need in spec.needs if need in needed]
        if any(need in unknown for need in needs):
            unknown.add(spec.name)  # reads a record the run has yet to produce: decided when it runs
            continue
        if any(need in missing for need in needs):
            if selected:
                unknown.add(spec.name)
            else:
                missing.append(spec.name)
            continue
        try:
            ctx.results.add(tasks[spec.name].fn(ctx))
        except _NotFinishedError:
            if selected:
                unknown.add(spec.name)
            else:
                missing.append(spec.name)
    return missing


def probe_runner(store: StageStore, selected: set[str], rerun: set[str], engine: str | None) -> ProbeRunner:
    # The probe never tracks: no Tracker is made (that would open the MLflow store).
    return ProbeRunner(
        store=store,
        tracker=cast(Tracker, None),
        progress=Progress(enabled=False),
        selected=selected,
        rerun=rerun,
        engine=engine,
    )


def check_upstream(ctx: RunContext, tasks: Mapping[StageName, StageTask[Record]]) -> None:
    """Raise MissingUpstreamError (exit 3) naming every unselected stage without a finished result."""
    missing = missing_upstream(ctx, tasks)
    if not missing:
        return
    several = len(missing) > 1
    command = f"quant-release run --stages {' '.join(missing)}" if several else f"quant-release {missing[0]}"
    raise MissingUpstreamError(
        f"stage{'s' if several else ''} {', '.join(missing)} ha{'ve' if several else 's'} no finished result "
        f"for these settings; run `{command}` (or `quant-release run`) with the same options first"
    )
