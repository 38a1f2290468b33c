"""build: prepare the chosen engine for the BF16 original and the FP8 checkpoint, and prove both run.

For the built-in engine nothing is compiled; the stage loads each variant once (the FP8 one through
our scale-aware loader), records its device, GEMM mode, weight bytes and load time, and runs a
fidelity probe: teacher-forced next-token argmax on held-out text, FP8 against BF16. A checkpoint
whose scales were lost scores near chance here instead of passing silently.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from quant_release import textdata
from quant_release.config import EngineConfig
from quant_release.engines import EngineOptions, LoadedEngine, get_backend
from quant_release.progress import Progress
from quant_release.records import EngineHandle, Engines, ModelSource, QuantizedCheckpoint, Variant
from quant_release.stage import RunContext, stage_task

PROBE_SEQUENCES = 4
PROBE_LENGTH = 256
PROBE_SEED = 0


def cache_inputs(config: EngineConfig, device: str) -> dict[str, Any]:
    # Only the chosen engine's options: another engine's settings do not change this result.
    return {
        "kind": config.kind,
        "device": config.device,
        "options": config.options().model_dump(mode="json"),
        "resolved_device": device,
    }


def handle_options(config: EngineConfig) -> dict[str, str]:
    options = config.options()
    assert isinstance(options, EngineOptions)
    return options.as_handle_options()


def probe_windows(engine: LoadedEngine) -> list[list[int]]:
    return textdata.token_windows(
        textdata.python_docs("heldout"), engine.encode, PROBE_SEQUENCES, PROBE_LENGTH, PROBE_SEED
    )


def top1_agreement(reference: list[list[int]], candidate: list[list[int]]) -> tuple[float, int]:
    pairs = [(a, b) for ref, cand in zip(reference, candidate, strict=True) for a, b in zip(ref, cand, strict=True)]
    return sum(a == b for a, b in pairs) / len(pairs), len(pairs)


def run_build(
    config: EngineConfig,
    device: str,
    source: ModelSource,
    checkpoint: QuantizedCheckpoint,
    out_dir: Path,
    progress: Progress,
) -> Engines:
    backend = get_backend(config.kind)
    backend.check_available(device)
    options = handle_options(config)
    handles: dict[Variant, EngineHandle] = {
        "bf16": backend.prepare("bf16", source.model_dir, out_dir / "bf16", device, options),
        "fp8": backend.prepare("fp8", checkpoint.checkpoint_dir, out_dir / "fp8", device, options),
    }
    predictions: dict[Variant, list[list[int]]] = {}
    device_name = ""
    windows: list[list[int]] = []
    # One variant in memory at a time: on a GPU sized for one copy of the model, both do not fit.
    for variant in ("bf16", "fp8"):
        progress.note("build", f"loading {variant} on {handles[variant].device}")
        start = time.perf_counter()
        engine = backend.load(handles[variant])
        load_seconds = time.perf_counter() - start
        try:
            windows = windows or probe_windows(engine)
            predictions[variant] = engine.greedy_next_tokens(windows)
            handles[variant] = handles[variant].model_copy(
                update={"weight_bytes": engine.weight_bytes(), "load_seconds": load_seconds}
            )
            device_name = engine.device_name
        finally:
            engine.close()
    agreement, tokens = top1_agreement(predictions["bf16"], predictions["fp8"])
    progress.note("build", f"FP8 vs BF16 top-1 agreement {agreement:.3f} over {tokens} held-out tokens")
    return Engines(
        kind=config.kind,
        device=handles["bf16"].device,
        device_name=device_name,
        bf16=handles["bf16"],
        fp8=handles["fp8"],
        top1_agreement=agreement,
        probe_tokens=tokens,
    )


@stage_task("build")
def build_task(ctx: RunContext) -> Engines:
    config, device = ctx.config.engine, ctx.preflight.device
    source, checkpoint = ctx.results.get(ModelSource), ctx.results.get(QuantizedCheckpoint)
    return ctx.runner.run(
        "build",
        cache_inputs(config, device),
        lambda work: run_build(config, device, source, checkpoint, work.dir, ctx.progress),
    )
