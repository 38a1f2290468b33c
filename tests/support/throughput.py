"""Throughput records with known numbers, for tests of what reads them (summary, card, publish)."""

from __future__ import annotations

from pathlib import Path

from quant_release.records import (
    BenchmarkPoint,
    LatencyStats,
    ThroughputMeasurement,
    ThroughputResult,
    WorkloadInfo,
)


def measurement(tok_s: float, concurrency: int = 8, latency_scale: float = 1.0) -> ThroughputMeasurement:
    """16 requests of 64 output and 128 input tokens at `tok_s` output tokens/s."""
    seconds = 1024 / tok_s

    def stats(base: float) -> LatencyStats:
        return LatencyStats(
            mean=base * latency_scale,
            p50=base * latency_scale,
            p90=1.5 * base * latency_scale,
            p99=2 * base * latency_scale,
        )

    return ThroughputMeasurement(
        concurrency=concurrency,
        requests=16,
        input_tokens=2048,
        output_tokens=1024,
        duration_s=seconds,
        request_throughput=16 / seconds,
        output_throughput=tok_s,
        total_token_throughput=3072 / seconds,
        per_user_output_throughput=tok_s / concurrency,
        ttft_ms=stats(12.345),
        tpot_ms=stats(4.449),
        e2e_latency_ms=stats(300.5),
        peak_gpu_memory_bytes=None,
    )


def throughput(
    bf16_tok_s: float, fp8_tok_s: float, device_name: str = "CPU (2 threads)", plot_file: Path | None = None
) -> ThroughputResult:
    """A two-point sweep (concurrency 1 and 8); the headline point is concurrency 8 at the given rates."""
    points = [
        BenchmarkPoint(
            concurrency=c,
            bf16=measurement(bf16_tok_s / (8 // c), c),
            fp8=measurement(fp8_tok_s / (8 // c), c, latency_scale=0.7),
            fp8_speedup=fp8_tok_s / bf16_tok_s,
        )
        for c in (1, 8)
    ]
    return ThroughputResult(
        engine="builtin",
        device_name=device_name,
        workload=WorkloadInfo(
            dataset="token-norm-dist",
            requests=16,
            input_mean=128,
            input_stdev=0,
            output_mean=64,
            output_stdev=0,
            seed=0,
            fingerprint="ab" * 32,
        ),
        sweep=points,
        plot_file=plot_file,
    )
