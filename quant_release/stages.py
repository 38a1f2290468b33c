"""The pipeline's stages, each defined once: everything else about them is derived from this table.

From `STAGE_TABLE` come the `StageName` options of the config, the CLI's subcommands and their help,
which stages a run needs (`needed_stages`), the order the flow runs them in, which upstream results a
stage reads and whose cache keys go into its own, and the code and package versions in its key.

A stage `name` is implemented by `tasks/<name>.py`, which defines `<name>_task(ctx: RunContext) ->
<record>`: a thin Prefect task around plain functions. Light on purpose (no torch, no prefect): the CLI
imports it for `--help`.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from quant_release.engines import engine_spec
from quant_release.environment import package_version
from quant_release.hashing import code_fingerprint
from quant_release.records import (
    Engines,
    MmluResult,
    ModelSource,
    QuantizedCheckpoint,
    Record,
    Release,
    ThroughputResult,
)

if TYPE_CHECKING:
    from quant_release.config import ReleaseConfig

# Spelled out for type checkers (config fields, task signatures); checked against the table below.
StageName = Literal["download", "quantize", "build", "evaluate", "benchmark", "publish"]


@dataclass(frozen=True)
class Stage:
    name: StageName
    help: str
    record: type[Record]  # what the stage returns; later stages ask for it by this type
    needs: tuple[StageName, ...] = ()  # stages whose records it reads; their cache keys go into its key
    switch: str | None = None  # the boolean option that turns it on and off ("mmlu.enabled"); None: always on
    sources: tuple[str, ...] = ()  # our code that shapes its result (see hashing.code_fingerprint)
    packages: tuple[str, ...] = ()  # distributions whose versions shape its result
    uses_engine: bool = False  # runs the configured engine: the engine's code and packages join the key
    stored_with_run: bool = False  # its record also goes to the artifact store under runs/<run_id>/


STAGE_TABLE: tuple[Stage, ...] = (
    Stage(
        name="download",
        help="get the source model as a local BF16 checkpoint (Hub repo, local dir, GGUF)",
        record=ModelSource,
        sources=("tasks.download",),
        packages=("transformers", "gguf", "huggingface_hub"),
    ),
    Stage(
        name="quantize",
        help="FP8-quantize with modelopt and export a unified HF checkpoint",
        record=QuantizedCheckpoint,
        needs=("download",),
        # The fidelity check scores the export with the built-in engine's loader and math: their code too.
        sources=(
            "tasks.quantize",
            "quant_release.textdata",
            "quant_release.calibration",
            "quant_release.fidelity",
            "quant_release.mmlu",
            "quant_release.engines.checkpoint",
            "quant_release.engines.llama",
            "quant_release.engines.runtime",
            "quant_release.engines.attention",
        ),
        packages=("torch", "transformers", "nvidia-modelopt"),
    ),
    Stage(
        name="build",
        help="prepare the engine for BF16 and FP8 and check that both run",
        record=Engines,
        needs=("download", "quantize"),
        sources=("tasks.build", "quant_release.textdata"),
        packages=("torch", "transformers"),
        uses_engine=True,
    ),
    Stage(
        name="evaluate",
        help="MMLU k-shot, BF16 vs FP8",
        record=MmluResult,
        needs=("build",),
        switch="mmlu.enabled",
        sources=("tasks.evaluate", "quant_release.mmlu", "quant_release.paired", "quant_release.mmlu_report"),
        packages=("torch", "transformers"),
        uses_engine=True,
        stored_with_run=True,
    ),
    Stage(
        name="benchmark",
        help="throughput, BF16 vs FP8",
        record=ThroughputResult,
        needs=("build",),
        switch="benchmark.enabled",
        sources=("tasks.benchmark", "quant_release.textdata"),
        packages=("torch", "transformers"),
        uses_engine=True,
        stored_with_run=True,
    ),
    Stage(
        name="publish",
        help="render the model card, store the release folder, optionally push to a Hub",
        record=Release,
        needs=("download", "quantize", "build", "evaluate", "benchmark"),
        sources=(
            "tasks.publish",
            "quant_release.modelcard",
            "quant_release.metrics",
            "quant_release.quality_gate",
            "quant_release.paired",
            "quant_release:templates/model_card.md.j2",
        ),
        packages=("huggingface_hub", "jinja2", "pyyaml"),
    ),
)

STAGES: tuple[StageName, ...] = tuple(stage.name for stage in STAGE_TABLE)
_BY_NAME: dict[str, Stage] = {stage.name: stage for stage in STAGE_TABLE}


def _check_table(table: Iterable[Stage]) -> None:
    seen: list[str] = []
    records: set[type[Record]] = set()
    for stage in table:
        for need in stage.needs:
            if need not in seen:
                raise RuntimeError(f"stage {stage.name} needs {need}, which does not run before it")
        if stage.record in records:
            raise RuntimeError(f"stage {stage.name} returns {stage.record.__name__}, as another stage does")
        seen.append(stage.name)
        records.add(stage.record)


if typing.get_args(StageName) != STAGES:
    raise RuntimeError(f"StageName {typing.get_args(StageName)} does not list the table's stages {STAGES}")
_check_table(STAGE_TABLE)


def stage(name: str) -> Stage:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}") from None


def enabled(config: ReleaseConfig, name: str) -> bool:
    """Whether the config switches the stage on (stages without a switch always are)."""
    switch = stage(name).switch
    if switch is None:
        return True
    value: Any = config
    for part in switch.split("."):
        value = getattr(value, part)
    return bool(value)


def needed_stages(config: ReleaseConfig) -> set[StageName]:
    """The selected stages plus everything they read, minus stages the config switches off."""
    needed: set[StageName] = set()
    pending: list[StageName] = [s for s in config.stages if enabled(config, s)]
    while pending:
        name = pending.pop()
        if name in needed:
            continue
        needed.add(name)
        pending.extend(need for need in stage(name).needs if enabled(config, need))
    return needed


def code_version(spec: Stage, engine: str | None) -> dict[str, Any]:
    """What in the code shapes the stage's result: a hash of our sources and the packages' versions.

    Part of every cache key, so a fix to the MMLU scorer or a torch upgrade runs the stage again,
    while an edited comment or docstring does not.
    """
    sources = list(spec.sources)
    packages = list(spec.packages)
    if spec.uses_engine and engine is not None:
        chosen = engine_spec(engine)
        sources += chosen.sources
        packages += chosen.packages
    return {
        "source": code_fingerprint(sources),
        "packages": {name: package_version(name) for name in sorted(set(packages))},
    }
