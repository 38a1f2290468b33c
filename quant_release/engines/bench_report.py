"""What the TensorRT-LLM and vLLM backends share: the benchmark workload, the neutral metric record both
parse into, percentiles, the trtllm-bench dataset file, option parsing and running a CLI tool.

Nothing here imports torch, tensorrt_llm or vllm: the option models and the report parsers must load on
machines without them (the config layer and the tests do).

Metric definitions follow trtllm-bench (NVIDIA/TensorRT-LLM, tensorrt_llm/bench/dataclasses/statistics.py,
`RequestRecord`), which `vllm bench serve` shares for TTFT and TPOT:
  - TTFT = first token time - request start; E2E latency = last token time - request start;
  - TPOT = (last token time - first token time) / (output tokens - 1), 0 for a one-token output;
  - per-user output throughput = mean over requests of output tokens / E2E latency
    ("Per User Output Throughput [w/ ctx] (tps/user)" in trtllm-bench's report);
  - output / total / request throughput = totals / (last request end - first request start).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from quant_release.engines.base import BenchmarkRequest
from quant_release.errors import ConfigError, EngineUnavailableError, QuantReleaseError
from quant_release.records import LatencyStats, ThroughputMeasurement, Variant


class EngineCommandError(QuantReleaseError):
    """An engine's CLI tool (trtllm-build, trtllm-bench, ...) exited non-zero or wrote no report."""


# -- percentiles ---------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 1] (numpy's default method, which `vllm bench` uses).

    trtllm-bench's own report uses the lower nearest rank (sorted[int(n * q)]) instead; the two differ
    only between samples, which matters for p99 of few requests.
    """
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def latency_stats(values_ms: Sequence[float]) -> LatencyStats:
    mean = sum(values_ms) / len(values_ms) if values_ms else math.nan
    return LatencyStats(
        mean=mean,
        p50=percentile(values_ms, 0.5),
        p90=percentile(values_ms, 0.9),
        p99=percentile(values_ms, 0.99),
    )


# -- metrics from per-request timestamps (engines measured in-process) ----------------------------------


@dataclass(frozen=True)
class RequestTiming:
    """Client-side timestamps of one request, in seconds on one monotonic clock."""

    start_s: float
    first_token_s: float
    end_s: float
    input_tokens: int
    output_tokens: int


def metrics_from_timings(
    timings: Sequence[RequestTiming], concurrency: int, peak_gpu_memory_bytes: int | None
) -> ThroughputMeasurement:
    """The trtllm-bench definitions (module docstring) applied to our own per-request timestamps."""
    if not timings:
        raise ValueError("no requests were measured")
    duration = max(t.end_s for t in timings) - min(t.start_s for t in timings)
    if duration <= 0:
        raise ValueError("benchmark duration must be positive")
    input_tokens = sum(t.input_tokens for t in timings)
    output_tokens = sum(t.output_tokens for t in timings)
    ttft = [(t.first_token_s - t.start_s) * 1e3 for t in timings]
    e2e = [(t.end_s - t.start_s) * 1e3 for t in timings]
    tpot = [(t.end_s - t.first_token_s) * 1e3 / (t.output_tokens - 1) if t.output_tokens > 1 else 0.0 for t in timings]
    per_user = [t.output_tokens / (t.end_s - t.start_s) for t in timings if t.end_s > t.start_s]
    return ThroughputMeasurement(
        concurrency=concurrency,
        requests=len(timings),
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        duration_s=duration,
        request_throughput=len(timings) / duration,
        output_throughput=output_tokens / duration,
        total_token_throughput=(input_tokens + output_tokens) / duration,
        per_user_output_throughput=sum(per_user) / len(per_user) if per_user else math.nan,
        ttft_ms=latency_stats(ttft),
        tpot_ms=latency_stats(tpot),
        e2e_latency_ms=latency_stats(e2e),
        peak_gpu_memory_bytes=peak_gpu_memory_bytes,
    )


# -- the trtllm-bench dataset file ----------------------------------------------------------------------


def trtllm_dataset_lines(requests: Sequence[BenchmarkRequest]) -> list[str]:
    """One JSON object per request, as `prepare_dataset` writes them.

    Format from NVIDIA/TensorRT-LLM tensorrt_llm/bench/dataset/utils.py (`generate_text_dataset`:
    {"task_id": i, "input_ids": [...], "output_tokens": n}, json.dumps with separators=(",", ":"),
    one per line) and what trtllm-bench reads back in tensorrt_llm/bench/utils/data.py
    (`create_dataset_from_stream`: `task_id`, `output_tokens`, `input_ids` (or a `prompt` to tokenize)).
    """
    return [
        json.dumps(
            {"task_id": i, "input_ids": list(r.prompt), "output_tokens": r.output_len},
            separators=(",", ":"),
            ensure_ascii=False,
        )
        for i, r in enumerate(requests)
    ]


def write_trtllm_dataset(requests: Sequence[BenchmarkRequest], path: Path) -> Path:
    if not requests:
        raise ValueError("a benchmark needs at least one request")
    if any(r.output_len < 1 or not r.prompt for r in requests):
        raise ValueError("every benchmark request needs a prompt and output_len >= 1")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in trtllm_dataset_lines(requests)))
    return path


# -- options ---------------------------------------------------------------------------------------------

OptionsT = TypeVar("OptionsT", bound=BaseModel)


def parse_options(model: type[OptionsT], options: Mapping[str, str], engine: str) -> OptionsT:
    """An engine's option model from the handle's string options ("2" -> 2, "0.85" -> 0.85).

    Keys this model does not know are ignored: a handle also carries what `prepare` resolved (e.g. the
    engine directory), and option models reject typos themselves through `extra="forbid"` when built
    from the config.
    """
    known = {k: v for k, v in options.items() if k in model.model_fields}
    try:
        return model.model_validate(known)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{engine} option {where}: {first['msg']}") from None


def options_to_strings(options: BaseModel) -> dict[str, str]:
    """The inverse of `parse_options`, for `EngineHandle.options` (None left out)."""
    return {k: str(v) for k, v in options.model_dump().items() if v is not None}


# -- running a CLI tool ----------------------------------------------------------------------------------


def require_executable(name: str, install_hint: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise EngineUnavailableError(f"`{name}` is not on PATH; {install_hint}")
    return path


def last_lines(text: str, count: int = 5) -> str:
    """A tool's last non-empty output lines joined into one line: our errors are one line by design."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-count:])


def run_tool(
    argv: Sequence[str], log_path: Path, cwd: Path | None = None, env: Mapping[str, str] | None = None
) -> None:
    """Run a tool to completion with its output captured into `log_path`; non-zero exit raises with its
    last lines. No shell: argv is passed as a list."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, **env} if env is not None else None
    proc = subprocess.run(
        list(argv),
        cwd=str(cwd) if cwd else None,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        check=False,
    )
    log_path.write_text(proc.stdout or "")
    if proc.returncode != 0:
        tail = last_lines(proc.stdout or "") or "no output"
        raise EngineCommandError(f"{Path(argv[0]).name} exited {proc.returncode}: {tail} (full log: {log_path})")


def read_json_report(path: Path, tool: str) -> dict[str, Any]:
    if not path.is_file():
        raise EngineCommandError(f"{tool} finished but wrote no report at {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise EngineCommandError(f"{tool} report {path} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise EngineCommandError(f"{tool} report {path} is not a JSON object")
    return data


# -- package, device and checkpoint checks ---------------------------------------------------------------


def package_version(module: str) -> str | None:
    """The installed version of the distribution providing `module`, or None when it cannot be imported.

    find_spec first: importing tensorrt_llm or vllm just to ask loads CUDA libraries for seconds.
    """
    try:
        if importlib.util.find_spec(module) is None:
            return None
    except (ImportError, ValueError):
        return None
    for dist in (module, module.replace("_", "-")):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def release_tuple(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "1.2.0rc6" or "0.11.0+cu128"."""
    parts = version.split(".")
    try:
        major = int(parts[0])
        minor = int("".join(c for c in parts[1] if c.isdigit()) or 0) if len(parts) > 1 else 0
    except ValueError:
        raise ValueError(f"cannot read a version number from {version!r}") from None
    return major, minor


def require_cuda(engine: str, device: str) -> None:
    """These engines run on NVIDIA GPUs only."""
    if device == "cpu":
        raise EngineUnavailableError(f"{engine} runs on NVIDIA GPUs only, but device=cpu was requested")
    import torch  # installed with the project; both engines depend on it too

    if not torch.cuda.is_available():
        raise EngineUnavailableError(f"{engine} needs a CUDA GPU and PyTorch sees none on this machine")


def cuda_device_name() -> str:
    import torch

    return str(torch.cuda.get_device_name(0))


def validate_checkpoint(variant: Variant, model_dir: Path) -> None:
    """Fail in the build stage, not mid-evaluation: FP8 needs a modelopt FP8 checkpoint (with its
    hf_quant_config.json), BF16 needs the unquantized original."""
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{model_dir} is not a Hugging Face checkpoint (no config.json)")
    if variant == "fp8":
        from quant_release.engines.checkpoint import read_quant_spec

        read_quant_spec(model_dir)
    elif json.loads(config_path.read_text()).get("quantization_config"):
        raise ConfigError(f"{model_dir} is a quantized checkpoint; the bf16 variant needs the original")


def files_bytes(directory: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in directory.glob(pattern) if p.is_file())


class BatchedLlmEngine:
    """`generate` for engines driven through an offline LLM object that takes a list of token prompts and
    sampling parameters (TensorRT-LLM's and vLLM's `LLM.generate`). Subclasses say how to build the
    sampling parameters and run a chunk of prompts; `chunk` bounds how many go in one call."""

    chunk = 64

    def _generate_sampling(self, max_new_tokens: int, stop_token_ids: Sequence[int]) -> Any:
        raise NotImplementedError

    def _run(self, prompts: Sequence[Sequence[int]], sampling: Any) -> list[Any]:
        raise NotImplementedError

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        stop_token_ids: Sequence[int] = (),
        on_step: Callable[[int, int], None] | None = None,
    ) -> list[list[int]]:
        sampling = self._generate_sampling(max_new_tokens, stop_token_ids)
        out: list[list[int]] = []
        for first in range(0, len(prompts), self.chunk):
            for result in self._run(prompts[first : first + self.chunk], sampling):
                out.append(truncate_at_stop(result.outputs[0].token_ids, stop_token_ids, max_new_tokens))
            if on_step:
                on_step(len(out), len(prompts))
        return out


def truncate_at_stop(tokens: Sequence[int], stop_token_ids: Sequence[int], max_new_tokens: int) -> list[int]:
    """New tokens up to (not including) the first stop token, at most `max_new_tokens`.

    Applied to every engine's output so that the contract does not depend on whether an engine keeps
    the stop token in its output (vLLM keeps a stop_token_ids hit in token_ids; TensorRT-LLM drops it).
    """
    stops = set(stop_token_ids)
    out: list[int] = []
    for token in tokens[:max_new_tokens]:
        if token in stops:
            break
        out.append(int(token))
    return out
