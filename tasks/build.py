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

from prefect import task
from prefect.cache_policies import NO_CACHE

from quant_release import textdata
from quant_release.config import EngineConfig
from quant_release.engines import LoadedEngine, get_backend
from quant_release.progress import Progress
from quant_release.records import EngineHandle, Engines, ModelSource, QuantizedCheckpoint, Variant
from quant_release.stage import StageRunner

PROBE_SEQUENCES = 4
PROBE_LENGTH = 256
PROBE_SEED = 0


def cache_inputs(config: EngineConfig, device: str, download_key: str, quantize_key: str) -> dict[str, Any]:
    return {"download": download_key, "quantize": quantize_key, **config.model_dump(), "resolved_device": device}


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
    handles: dict[Variant, EngineHandle] = {
        "bf16": backend.prepare("bf16", source.model_dir, out_dir / "bf16", device, {}),
        "fp8": backend.prepare(
            "fp8", checkpoint.checkpoint_dir, out_dir / "fp8", device, {"fp8_gemm": config.fp8_gemm}
        ),
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


@task(name="build", cache_policy=NO_CACHE, persist_result=False)
def build_task(
    runner: StageRunner, config: EngineConfig, device: str, source: ModelSource, checkpoint: QuantizedCheckpoint
) -> Engines:
    inputs = cache_inputs(config, device, runner.keys["download"], runner.keys["quantize"])
    return runner.run(
        "build", inputs, Engines, lambda out: run_build(config, device, source, checkpoint, out, runner.progress)
    )
