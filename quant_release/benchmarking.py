"""The benchmark stage's workload and sweep, kept free of orchestration so a GPU script can run it as is.

Workloads are built like `trtllm-bench prepare_dataset`:
  * `token-norm-dist`: `requests` prompts whose lengths are drawn from N(input_mean, input_stdev) and
    output lengths from N(output_mean, output_stdev) (rounded, at least 1), seeded. trtllm-bench fills
    such prompts with random token ids; here they are cut from held-out English text, which costs the
    engine exactly the same and keeps prompts real.
  * `prompt-file:PATH`: one prompt per line (.txt) or per JSON line (.jsonl, field `prompt`, optional
    `output_tokens`); output lengths as above where a line gives none.
Every request generates exactly its output length (EOS ignored), so BF16 and FP8 do identical work.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from quant_release import textdata
from quant_release.engines.base import BenchmarkRequest, BenchmarkWorkload, LoadedEngine, StepCallback
from quant_release.errors import ConfigError
from quant_release.records import BenchmarkPoint, EngineHandle, ThroughputMeasurement, WorkloadInfo

PROMPT_FILE_PREFIX = "prompt-file:"
TEXT_SEED = 1


def _lengths(count: int, mean: float, stdev: float, rng: random.Random, limit: int) -> list[int]:
    return [max(1, min(limit, round(rng.gauss(mean, stdev)) if stdev > 0 else round(mean))) for _ in range(count)]


def token_norm_dist(
    encode: Callable[[str], list[int]],
    count: int,
    input_mean: float,
    input_stdev: float,
    output_mean: float,
    output_stdev: float,
    seed: int,
    max_input: int,
) -> list[BenchmarkRequest]:
    """`count` requests with normally distributed prompt and output lengths; prompts from held-out text."""
    rng = random.Random(seed)
    inputs = _lengths(count, input_mean, input_stdev, rng, max_input)
    outputs = _lengths(count, output_mean, output_stdev, rng, 1 << 20)
    stream = textdata.token_windows(textdata.python_docs("heldout"), encode, 1, sum(inputs), TEXT_SEED)[0]
    requests = []
    first = 0
    for length, output in zip(inputs, outputs, strict=True):
        requests.append(BenchmarkRequest(prompt=tuple(stream[first : first + length]), output_len=output))
        first += length
    return requests


def prompt_file(
    path: Path,
    encode: Callable[[str], list[int]],
    output_mean: float,
    output_stdev: float,
    seed: int,
    limit: int | None = None,
) -> list[BenchmarkRequest]:
    """Requests from a prompt file; ConfigError (one line) on anything unreadable or empty."""
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise ConfigError(f"benchmark prompt file {path}: {exc.strerror or exc}") from exc
    rng = random.Random(seed)
    requests = []
    for number, line in enumerate(lines, start=1):
        output = _lengths(1, output_mean, output_stdev, rng, 1 << 20)[0]
        text = line
        if path.suffix == ".jsonl":
            try:
                record: Any = json.loads(line)
                text = str(record["prompt"])
                output = int(record.get("output_tokens", output))
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"benchmark prompt file {path} line {number}: expected {{'prompt': ...}}") from exc
        ids = encode(text)
        if ids:
            requests.append(BenchmarkRequest(prompt=tuple(ids), output_len=max(1, output)))
    if not requests:
        raise ConfigError(f"benchmark prompt file {path} holds no prompts")
    return requests[:limit] if limit else requests


def fingerprint(requests: Sequence[BenchmarkRequest]) -> str:
    digest = hashlib.sha256()
    for request in requests:
        digest.update(len(request.prompt).to_bytes(4, "little") + request.output_len.to_bytes(4, "little"))
        for token in request.prompt:
            digest.update(int(token).to_bytes(4, "little"))
    return digest.hexdigest()


def describe(dataset: str, requests: Sequence[BenchmarkRequest], seed: int) -> WorkloadInfo:
    def mean_stdev(values: list[int]) -> tuple[float, float]:
        mean = sum(values) / len(values)
        return mean, (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5

    input_mean, input_stdev = mean_stdev([len(r.prompt) for r in requests])
    output_mean, output_stdev = mean_stdev([r.output_len for r in requests])
    return WorkloadInfo(
        dataset=dataset,
        requests=len(requests),
        input_mean=input_mean,
        input_stdev=input_stdev,
        output_mean=output_mean,
        output_stdev=output_stdev,
        seed=seed,
        fingerprint=fingerprint(requests),
    )


def run_sweep(
    engines: dict[str, EngineHandle],
    load: Callable[[EngineHandle], LoadedEngine],
    requests: Sequence[BenchmarkRequest],
    warmup: Sequence[BenchmarkRequest],
    concurrencies: Sequence[int],
    on_step: Callable[[str], StepCallback] | None = None,
    note: Callable[[str], None] | None = None,
) -> list[BenchmarkPoint]:
    """Every concurrency for BF16, then for FP8 (one variant loaded at a time); one point per concurrency."""
    measured: dict[str, dict[int, ThroughputMeasurement]] = {}
    for variant in ("bf16", "fp8"):
        engine = load(engines[variant])
        measured[variant] = {}
        for concurrency in concurrencies:
            workload = BenchmarkWorkload(requests=requests, concurrency=concurrency, warmup=warmup)
            step = on_step(f"{variant} requests, concurrency {concurrency}") if on_step else None
            result = engine.benchmark(workload, step)
            measured[variant][concurrency] = result
            if note:
                note(
                    f"{variant} concurrency {concurrency}: {result.output_throughput:.1f} output tok/s, "
                    f"TTFT p50 {result.ttft_ms.p50:.1f} ms, TPOT p50 {result.tpot_ms.p50:.2f} ms"
                )
    return [
        BenchmarkPoint(
            concurrency=c,
            bf16=measured["bf16"][c],
            fp8=measured["fp8"][c],
            fp8_speedup=measured["fp8"][c].output_throughput / measured["bf16"][c].output_throughput,
        )
        for c in concurrencies
    ]


def plot_sweep(points: Sequence[BenchmarkPoint], title: str, path: Path) -> Path:
    """Output tokens/s against per-request latency (TPOT p50), one line per variant, a point per concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for variant, color in (("bf16", "tab:blue"), ("fp8", "tab:green")):
        rows = [(p.concurrency, getattr(p, variant)) for p in points]
        x = [m.tpot_ms.p50 for _, m in rows]
        y = [m.output_throughput for _, m in rows]
        ax.plot(x, y, marker="o", color=color, label=variant.upper())
        for (concurrency, _), xi, yi in zip(rows, x, y, strict=True):
            ax.annotate(str(concurrency), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("time per output token, p50 (ms)")
    ax.set_ylabel("output tokens/s")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
