"""benchmark: offline throughput of BF16 and FP8 on the same engine, device and requests.

The workload is built once (see `quant_release.benchmarking`: trtllm-bench-style normally distributed
lengths, or a prompt file) and sent to both variants at each concurrency of the sweep; every request
generates exactly its output length, EOS ignored, so the two variants do identical work and the ratio
of their output tokens/s is the FP8 speedup. A throughput-vs-latency plot goes beside the record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quant_release import benchmarking
from quant_release.config import BenchmarkConfig
from quant_release.engines import BenchmarkRequest
from quant_release.engines.pool import EnginePool
from quant_release.progress import Progress
from quant_release.records import Engines, ThroughputResult
from quant_release.stage import RunContext, stage_task


def cache_inputs(config: BenchmarkConfig) -> dict[str, Any]:
    return config.model_dump(exclude={"enabled"})


def requests_for(
    config: BenchmarkConfig, encode: Any, max_input: int
) -> tuple[list[BenchmarkRequest], list[BenchmarkRequest]]:
    """(timed requests, warm-up requests) for the configured dataset."""
    if config.dataset.startswith(benchmarking.PROMPT_FILE_PREFIX):
        path = Path(config.dataset.removeprefix(benchmarking.PROMPT_FILE_PREFIX)).expanduser()
        requests = benchmarking.prompt_file(
            path, encode, config.output_mean, config.output_stdev, config.seed, limit=config.num_requests
        )
    else:
        requests = benchmarking.token_norm_dist(
            encode,
            config.num_requests,
            config.input_mean,
            config.input_stdev,
            config.output_mean,
            config.output_stdev,
            config.seed,
            max_input,
        )
    return requests, requests[: config.warmup_requests]


def run_benchmark(
    config: BenchmarkConfig, engines: Engines, pool: EnginePool, out_dir: Path, progress: Progress
) -> ThroughputResult:
    bf16 = pool.get(engines.bf16)
    requests, warmup = requests_for(config, bf16.encode, max_input=1 << 20)
    info = benchmarking.describe(config.dataset, requests, config.seed)
    progress.note(
        "benchmark",
        f"{info.requests} requests, input {info.input_mean:.0f}±{info.input_stdev:.0f}, "
        f"output {info.output_mean:.0f}±{info.output_stdev:.0f} tokens, concurrency {config.concurrency}",
    )
    points = benchmarking.run_sweep(
        {"bf16": engines.bf16, "fp8": engines.fp8},
        pool.get,
        requests,
        warmup,
        config.concurrency,
        on_step=lambda what: progress.bound_step("benchmark", what),
        note=lambda message: progress.note("benchmark", message),
    )
    plot = benchmarking.plot_sweep(
        points, f"{engines.kind} engine on {engines.device_name}", out_dir / "throughput_latency.png"
    )
    return ThroughputResult(
        engine=engines.kind, device_name=engines.device_name, workload=info, sweep=points, plot_file=plot
    )


@stage_task("benchmark")
def benchmark_task(ctx: RunContext) -> ThroughputResult:
    config, engines = ctx.config.benchmark, ctx.results.get(Engines)
    return ctx.runner.run(
        "benchmark",
        cache_inputs(config),
        lambda work: run_benchmark(config, engines, ctx.runner.engines, work.dir, ctx.progress),
    )
