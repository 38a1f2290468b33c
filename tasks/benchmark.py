"""benchmark: offline throughput of BF16 and FP8 on the same engine, device and workload.

Every request has exactly `input_len` prompt tokens (cut from held-out English text) and generates
exactly `output_len` tokens, EOS ignored, like trtllm-bench's fixed-length datasets, so the two
variants do identical work and the ratio of their output tokens/s is the FP8 speedup.
"""

from __future__ import annotations

from typing import Any

from quant_release import textdata
from quant_release.config import BenchmarkConfig
from quant_release.engines import BenchmarkWorkload, LoadedEngine
from quant_release.engines.pool import EnginePool
from quant_release.progress import Progress
from quant_release.records import Engines, ThroughputMeasurement, ThroughputResult
from quant_release.stage import RunContext, stage_task

PROMPT_SEED = 1


def cache_inputs(config: BenchmarkConfig) -> dict[str, Any]:
    return config.model_dump(exclude={"enabled"})


def workload(config: BenchmarkConfig, engine: LoadedEngine) -> BenchmarkWorkload:
    count = config.num_requests + config.warmup_requests
    prompts = textdata.token_windows(
        textdata.python_docs("heldout"), engine.encode, count, config.input_len, PROMPT_SEED
    )
    # Warm-up requests come first in the list and are run untimed by the engine.
    return BenchmarkWorkload(
        prompts=prompts[config.warmup_requests :],
        output_len=config.output_len,
        batch_size=config.batch_size,
        warmup_requests=config.warmup_requests,
    )


def run_benchmark(config: BenchmarkConfig, engines: Engines, pool: EnginePool, progress: Progress) -> ThroughputResult:
    measured: dict[str, ThroughputMeasurement] = {}
    for variant, handle in (("bf16", engines.bf16), ("fp8", engines.fp8)):
        engine = pool.get(handle)
        work = workload(config, engine)
        on_step = progress.bound_step("benchmark", f"{variant} requests")
        measured[variant] = engine.benchmark(work, on_step)
        progress.note("benchmark", f"{variant}: {measured[variant].output_tok_s:.1f} output tok/s")
    return ThroughputResult(
        engine=engines.kind,
        device_name=engines.device_name,
        batch_size=config.batch_size,
        input_len=config.input_len,
        output_len=config.output_len,
        bf16=measured["bf16"],
        fp8=measured["fp8"],
        fp8_speedup=measured["fp8"].output_tok_s / measured["bf16"].output_tok_s,
    )


@stage_task("benchmark")
def benchmark_task(ctx: RunContext) -> ThroughputResult:
    config, engines = ctx.config.benchmark, ctx.results.get(Engines)
    return ctx.runner.run(
        "benchmark",
        cache_inputs(config),
        lambda _work: run_benchmark(config, engines, ctx.runner.engines, ctx.progress),
    )
