"""The TensorRT-LLM backend: the LLM API for generation and scoring, `trtllm-bench throughput` for speed.

Two ways to run a variant (option `backend`):
  - `pytorch` (TensorRT-LLM 1.x default): `tensorrt_llm.LLM` loads the checkpoint directly; for FP8 it
    reads the modelopt unified checkpoint's hf_quant_config.json itself. Nothing is built.
  - `tensorrt` (legacy, TensorRT-LLM <= 1.2 only): the checkpoint is converted to a TensorRT-LLM
    checkpoint, compiled by `trtllm-build` into `<work_dir>/engine`, and that engine is loaded with the
    TensorRT-engine LLM class. `modelopt.torch.export.export_tensorrt_llm_checkpoint` would need the
    quantized model in memory; instead the conversion calls TensorRT-LLM's own
    `LLaMAForCausalLM.from_hugging_face` with the checkpoint's FP8 quant config, which is what the
    LLM API's TensorRT flow does for a pre-quantized modelopt checkpoint (NVIDIA/TensorRT-LLM
    tensorrt_llm/llmapi/llm_utils.py, `ModelLoader._update_from_hf_quant_config` and
    `_load_model_from_hf`) and what examples/models/core/llama/convert_checkpoint.py does per rank.

Every call into TensorRT-LLM is built by a small pure function below (argv, kwargs, dataset lines,
report parsing) so that tests check them exactly without the package, which no machine of this project
can install (see docs/engines.md).

Sources read (NVIDIA/TensorRT-LLM): tensorrt_llm/commands/bench.py and
tensorrt_llm/bench/benchmark/throughput.py (trtllm-bench options), tensorrt_llm/bench/dataclasses/
reporting.py and statistics.py (--report_json), tensorrt_llm/bench/dataset/utils.py and
bench/utils/data.py (dataset lines), tensorrt_llm/commands/build.py (trtllm-build options),
tensorrt_llm/sampling_params.py and tensorrt_llm/executor/result.py (SamplingParams, logits/logprobs).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from quant_release.engines.base import BenchmarkWorkload, StepCallback
from quant_release.engines.bench_report import (
    BatchedLlmEngine,
    cuda_device_name,
    files_bytes,
    options_to_strings,
    package_version,
    parse_options,
    read_json_report,
    release_tuple,
    require_cuda,
    require_executable,
    run_tool,
    validate_checkpoint,
    write_trtllm_dataset,
)
from quant_release.engines.options import TensorrtLlmOptions
from quant_release.errors import EngineUnavailableError, QuantReleaseError
from quant_release.records import EngineHandle, LatencyStats, ThroughputMeasurement, Variant

KIND = "tensorrt_llm"
INSTALL_HINT = (
    "install it with `pip install tensorrt-llm` on a Linux host with an NVIDIA GPU and CUDA "
    "(https://nvidia.github.io/TensorRT-LLM/installation/linux.html)"
)
# trtllm-build and the TensorRT engine flow were removed after 1.2 (1.3's trtllm-bench lists only
# pytorch and _autodeploy backends).
LEGACY_LAST_RELEASE = (1, 2)
# How many prompts go to one LLM.generate call: bounds the logits held at once when scoring.
CHUNK = 64


# -- versions and pure builders ------------------------------------------------------------------------


def legacy_backend_supported(version: str) -> bool:
    return release_tuple(version) <= LEGACY_LAST_RELEASE


def quant_config_kwargs(model_dir: Path, variant: Variant) -> dict[str, Any]:
    """TensorRT-LLM `QuantConfig` fields for a checkpoint: read from hf_quant_config.json's
    "quantization" section as `ModelLoader._update_from_hf_quant_config` does; empty for BF16."""
    if variant != "fp8":
        return {}
    section = json.loads((model_dir / "hf_quant_config.json").read_text())["quantization"]
    kwargs: dict[str, Any] = {"quant_algo": section["quant_algo"]}
    if section.get("kv_cache_quant_algo"):
        kwargs["kv_cache_quant_algo"] = section["kv_cache_quant_algo"]
    if section.get("exclude_modules"):
        kwargs["exclude_modules"] = list(section["exclude_modules"])
    return kwargs


def convert_checkpoint_argv(
    model_dir: Path, output_dir: Path, variant: Variant, tensor_parallel_size: int, python: str = sys.executable
) -> list[str]:
    """The conversion runs in its own process (it holds the whole model in host memory)."""
    return [
        python,
        "-m",
        "quant_release.engines.tensorrt_llm",
        "--model_dir",
        str(model_dir),
        "--output_dir",
        str(output_dir),
        "--variant",
        variant,
        "--tp_size",
        str(tensor_parallel_size),
    ]


def trtllm_build_argv(checkpoint_dir: Path, engine_dir: Path, options: TensorrtLlmOptions) -> list[str]:
    """`trtllm-build` (tensorrt_llm/commands/build.py: --checkpoint_dir, --output_dir, --max_batch_size,
    --max_input_len, --max_seq_len, --max_num_tokens, --gather_all_token_logits, --workers, and the
    plugin options, of which --gemm_plugin auto picks the GEMM plugin from the checkpoint dtype)."""
    argv = [
        "trtllm-build",
        "--checkpoint_dir",
        str(checkpoint_dir),
        "--output_dir",
        str(engine_dir),
        "--max_input_len",
        str(options.max_input_len),
        "--max_seq_len",
        str(options.max_seq_len),
    ]
    if options.max_batch_size is not None:
        argv += ["--max_batch_size", str(options.max_batch_size)]
    if options.max_num_tokens is not None:
        argv += ["--max_num_tokens", str(options.max_num_tokens)]
    argv += ["--gemm_plugin", "auto", "--workers", str(options.tensor_parallel_size)]
    if options.gather_all_token_logits:
        argv.append("--gather_all_token_logits")
    return argv


def llm_kwargs(model: Path, tokenizer: Path, options: TensorrtLlmOptions) -> dict[str, Any]:
    """Keyword arguments of `LLM(...)` (kv_cache_config is added as a KvCacheConfig object)."""
    kwargs: dict[str, Any] = {
        "model": str(model),
        "tokenizer": str(tokenizer),
        "tensor_parallel_size": options.tensor_parallel_size,
        # Generation logits of the first generated position give exact single-token choice scores.
        "gather_generation_logits": True,
    }
    if options.max_batch_size is not None:
        kwargs["max_batch_size"] = options.max_batch_size
    if options.max_num_tokens is not None:
        kwargs["max_num_tokens"] = options.max_num_tokens
    return kwargs


def kv_cache_config_kwargs(options: TensorrtLlmOptions) -> dict[str, Any]:
    return {"free_gpu_memory_fraction": options.kv_cache_free_gpu_memory_fraction}


# SamplingParams (tensorrt_llm/sampling_params.py): top_k=1 is greedy decoding (`_greedy_decoding`);
# end_id=-1 disables EOS, as trtllm-bench does, so only the caller's stop tokens end a generation;
# detokenize=False because callers want token ids.
def generate_sampling_kwargs(max_new_tokens: int, stop_token_ids: Sequence[int]) -> dict[str, Any]:
    return {
        "max_tokens": max_new_tokens,
        "top_k": 1,
        "end_id": -1,
        "pad_id": -1,
        "stop_token_ids": list(stop_token_ids) or None,
        "detokenize": False,
    }


def score_sampling_kwargs(logits: Literal["context", "generation"]) -> dict[str, Any]:
    """One greedy step that returns raw logits: the first generated position's (the distribution after
    the prompt) or every prompt position's. Log-softmax over the full vocabulary is then exact, which
    `prompt_logprobs` is not here: it returns only the top-k per position, without the prompt token
    (tensorrt_llm/executor/result.py, `compute_logprobs`)."""
    return {
        "max_tokens": 1,
        "top_k": 1,
        "end_id": -1,
        "pad_id": -1,
        "detokenize": False,
        "return_context_logits": logits == "context",
        "return_generation_logits": logits == "generation",
    }


def bench_model_name(model_dir: Path) -> str:
    """trtllm-bench's required --model is a Hub *name* and must not be an existing path (its
    BenchmarkEnvironment rejects one); the checkpoint itself goes to --model_path."""
    return f"quant-release/{model_dir.name}"


def trtllm_bench_argv(
    *,
    model_dir: Path,
    workspace: Path,
    dataset: Path,
    report_json: Path,
    options: TensorrtLlmOptions,
    engine_dir: Path | None,
    concurrency: int,
    num_requests: int,
    warmup: int,
) -> list[str]:
    """`trtllm-bench ... throughput` with the flags of tensorrt_llm/bench/benchmark/throughput.py
    (TensorRT-LLM 1.0-1.2; 1.3 dropped `--backend tensorrt`).

    --streaming: trtllm-bench measures TTFT and TPOT only for streamed requests.
    --eos_id -1: EOS disabled, every request produces exactly its output_tokens.
    """
    argv = [
        "trtllm-bench",
        "--model",
        bench_model_name(model_dir),
        "--model_path",
        str(model_dir),
        "--workspace",
        str(workspace),
        "throughput",
        "--dataset",
        str(dataset),
        "--backend",
        options.backend,
    ]
    if options.backend == "tensorrt":
        if engine_dir is None:
            raise ValueError("the tensorrt backend needs the engine directory")
        argv += ["--engine_dir", str(engine_dir)]
    else:
        # The legacy engine has its parallelism compiled in; trtllm-bench reads it from the engine.
        argv += ["--tp", str(options.tensor_parallel_size)]
    argv += [
        "--concurrency",
        str(concurrency),
        "--num_requests",
        str(num_requests),
        "--warmup",
        str(warmup),
        "--eos_id",
        "-1",
        "--kv_cache_free_gpu_mem_fraction",
        str(options.kv_cache_free_gpu_memory_fraction),
    ]
    if options.max_batch_size is not None:
        argv += ["--max_batch_size", str(options.max_batch_size)]
    if options.max_num_tokens is not None:
        argv += ["--max_num_tokens", str(options.max_num_tokens)]
    argv += ["--streaming", "--report_json", str(report_json)]
    return argv


def _section(report: dict[str, Any], key: str) -> dict[str, Any]:
    value = report.get(key)
    if not isinstance(value, dict):
        raise QuantReleaseError(f"trtllm-bench report has no {key!r} section (was it run with --streaming?)")
    return value


def _number(section: dict[str, Any], key: str, where: str) -> float:
    value = section.get(key)
    if not isinstance(value, int | float):
        raise QuantReleaseError(f"trtllm-bench report: {where}.{key} is missing or not a number")
    return float(value)


def _percentiles(section: dict[str, Any], key: str, where: str) -> LatencyStats:
    stats = _section(section, key)
    path = f"{where}.{key}"
    return LatencyStats(
        mean=_number(stats, "average", path),
        p50=_number(stats, "p50", path),
        p90=_number(stats, "p90", path),
        p99=_number(stats, "p99", path),
    )


def parse_trtllm_bench_report(report: dict[str, Any], concurrency: int) -> ThroughputMeasurement:
    """`--report_json` as written by `ReportUtility.get_statistics_dict` (tensorrt_llm/bench/dataclasses/
    reporting.py): "request_info" {num_requests, avg_input_length, avg_output_length}, "performance"
    {total_latency_ms, request_throughput_req_s, system_output_throughput_tok_s,
    system_total_throughput_tok_s, output_throughput_per_user_tok_s, request_latency_percentiles_ms},
    and with --streaming "streaming_metrics" {ttft_percentiles, tpot_percentiles}. Percentile objects are
    `PercentileStats` (p50, p90, p95, p99, minimum, maximum, average) converted to ms.
    trtllm-bench reports no GPU memory, so peak_gpu_memory_bytes is None.
    """
    info = _section(report, "request_info")
    perf = _section(report, "performance")
    streaming = _section(report, "streaming_metrics")
    requests = int(_number(info, "num_requests", "request_info"))
    return ThroughputMeasurement(
        concurrency=concurrency,
        requests=requests,
        input_tokens=round(_number(info, "avg_input_length", "request_info") * requests),
        output_tokens=round(_number(info, "avg_output_length", "request_info") * requests),
        duration_s=_number(perf, "total_latency_ms", "performance") / 1e3,
        request_throughput=_number(perf, "request_throughput_req_s", "performance"),
        output_throughput=_number(perf, "system_output_throughput_tok_s", "performance"),
        total_token_throughput=_number(perf, "system_total_throughput_tok_s", "performance"),
        per_user_output_throughput=_number(perf, "output_throughput_per_user_tok_s", "performance"),
        ttft_ms=_percentiles(streaming, "ttft_percentiles", "streaming_metrics"),
        tpot_ms=_percentiles(streaming, "tpot_percentiles", "streaming_metrics"),
        e2e_latency_ms=_percentiles(perf, "request_latency_percentiles_ms", "performance"),
        peak_gpu_memory_bytes=None,
    )


# -- logits -> scores (torch tensors as the LLM API returns them) ----------------------------------------


def _rows(logits: Any) -> Any:
    """[positions, vocab] float32 from a [.., positions, vocab] tensor (beam/batch dims of size 1)."""
    return logits.reshape(-1, logits.shape[-1]).float()


def single_token_scores(generation_logits: Any, choice_tokens: Sequence[int]) -> list[float]:
    import torch

    logprobs = torch.log_softmax(_rows(generation_logits)[0], dim=-1)
    return [float(logprobs[token]) for token in choice_tokens]


def continuation_score(context_logits: Any, context_len: int, continuation: Sequence[int]) -> float:
    """Sum of log P(continuation[i] | prompt[: context_len + i]) from the logits of prompt + continuation
    (row j predicts token j + 1)."""
    import torch

    rows = _rows(context_logits)[context_len - 1 : context_len - 1 + len(continuation)]
    logprobs = torch.log_softmax(rows, dim=-1)
    index = torch.tensor(list(continuation), dtype=torch.long).unsqueeze(1)
    return float(logprobs.gather(1, index).sum())


def argmax_tokens(context_logits: Any) -> list[int]:
    return [int(t) for t in _rows(context_logits).argmax(dim=-1).tolist()]


# -- the loaded engine -----------------------------------------------------------------------------------


def _tensorrt_llm() -> Any:
    return importlib.import_module("tensorrt_llm")


class TensorrtLlmEngine(BatchedLlmEngine):
    """One loaded variant behind the LLM API."""

    chunk = CHUNK

    def __init__(self, handle: EngineHandle, llm: Any, tokenizer: Any, options: TensorrtLlmOptions) -> None:
        self.handle = handle
        self.llm = llm
        self.tokenizer = tokenizer
        self.options = options

    @classmethod
    def load(cls, handle: EngineHandle) -> TensorrtLlmEngine:
        from transformers import AutoTokenizer

        options = parse_options(TensorrtLlmOptions, handle.options, KIND)
        tokenizer = AutoTokenizer.from_pretrained(str(handle.model_dir))
        engine = cls(handle, None, tokenizer, options)
        engine.llm = engine._construct_llm()
        return engine

    def _construct_llm(self) -> Any:
        if self.options.backend == "tensorrt":
            # The TensorRT-engine LLM class, as trtllm-bench imports it in 1.x.
            llm_class = importlib.import_module("tensorrt_llm._tensorrt_engine").LLM
            kwargs = llm_kwargs(Path(self.handle.options["engine_dir"]), self.handle.model_dir, self.options)
        else:
            llm_class = _tensorrt_llm().LLM
            kwargs = llm_kwargs(self.handle.model_dir, self.handle.model_dir, self.options)
        kv_cache_config = importlib.import_module("tensorrt_llm.llmapi").KvCacheConfig(
            **kv_cache_config_kwargs(self.options)
        )
        return llm_class(**kwargs, kv_cache_config=kv_cache_config)

    def close(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None
        gc.collect()

    @property
    def device_name(self) -> str:
        return cuda_device_name()

    def weight_bytes(self) -> int:
        if self.options.backend == "tensorrt":
            # Engine files hold the weights (plus a little TensorRT metadata).
            return files_bytes(Path(self.handle.options["engine_dir"]), "*.engine")
        return files_bytes(self.handle.model_dir, "*.safetensors")

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids)))

    def _sampling(self, kwargs: dict[str, Any]) -> Any:
        return _tensorrt_llm().SamplingParams(**kwargs)

    def _run(self, prompts: Sequence[Sequence[int]], sampling: Any) -> list[Any]:
        if self.llm is None:  # shut down for a trtllm-bench run, or closed
            self.llm = self._construct_llm()
        return list(self.llm.generate([list(p) for p in prompts], sampling_params=sampling, use_tqdm=False))

    def _generate_sampling(self, max_new_tokens: int, stop_token_ids: Sequence[int]) -> Any:
        return self._sampling(generate_sampling_kwargs(max_new_tokens, stop_token_ids))

    def score_choices(
        self, contexts: Sequence[str], choices: Sequence[str], on_step: StepCallback | None = None
    ) -> list[list[float]]:
        """Exact log-probabilities from raw logits: single-token choices (MMLU's letters) from the
        first generated position's logits, one request per context; longer choices from the prompt
        logits of context + choice, one request per pair."""
        context_ids = [self.encode(c) for c in contexts]
        choice_ids = [list(self.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in choices]
        if any(not ids for ids in choice_ids):
            raise ValueError("every choice must encode to at least one token")
        scores: list[list[float]] = []
        if all(len(ids) == 1 for ids in choice_ids):
            sampling = self._sampling(score_sampling_kwargs("generation"))
            tokens = [ids[0] for ids in choice_ids]
            for first in range(0, len(context_ids), CHUNK):
                for result in self._run(context_ids[first : first + CHUNK], sampling):
                    logits = result.outputs[0].generation_logits
                    if logits is None:
                        raise QuantReleaseError(_NO_LOGITS)
                    scores.append(single_token_scores(logits, tokens))
                if on_step:
                    on_step(len(scores), len(context_ids))
            return scores
        sampling = self._sampling(score_sampling_kwargs("context"))
        per_chunk = max(1, CHUNK // len(choice_ids))
        for first in range(0, len(context_ids), per_chunk):
            chunk = context_ids[first : first + per_chunk]
            prompts = [ctx + cont for ctx in chunk for cont in choice_ids]
            results = self._run(prompts, sampling)
            for row_index, ctx in enumerate(chunk):
                row = []
                for choice_index, cont in enumerate(choice_ids):
                    logits = results[row_index * len(choice_ids) + choice_index].context_logits
                    if logits is None:
                        raise QuantReleaseError(_NO_LOGITS)
                    row.append(continuation_score(logits, len(ctx), cont))
                scores.append(row)
            if on_step:
                on_step(len(scores), len(context_ids))
        return scores

    def greedy_next_tokens(self, token_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        """Argmax of the prompt logits at every position: teacher-forced greedy tokens, exact."""
        sampling = self._sampling(score_sampling_kwargs("context"))
        out: list[list[int]] = []
        # Prompt logits are positions x vocab floats per sequence: a few sequences per call.
        for first in range(0, len(token_ids), 8):
            for result in self._run(token_ids[first : first + 8], sampling):
                if result.context_logits is None:
                    raise QuantReleaseError(_NO_LOGITS)
                out.append(argmax_tokens(result.context_logits))
        return out

    def benchmark(self, workload: BenchmarkWorkload, on_step: StepCallback | None = None) -> ThroughputMeasurement:
        """`trtllm-bench throughput` on the workload's exact requests, in its own process. The loaded LLM
        holds most of the GPU memory (KV cache), so it is shut down first; later calls construct it again."""
        work_dir = Path(self.handle.options.get("work_dir", str(self.handle.model_dir.parent)))
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = work_dir / "trtllm-bench" / f"{self.handle.variant}-c{workload.concurrency}-{stamp}"
        dataset = write_trtllm_dataset(workload.requests, run_dir / "dataset.jsonl")
        report = run_dir / "report.json"
        engine_dir = Path(self.handle.options["engine_dir"]) if self.options.backend == "tensorrt" else None
        argv = trtllm_bench_argv(
            model_dir=self.handle.model_dir,
            workspace=run_dir / "workspace",
            dataset=dataset,
            report_json=report,
            options=self.options,
            engine_dir=engine_dir,
            concurrency=workload.concurrency,
            num_requests=len(workload.requests),
            # trtllm-bench draws its warm-up requests from the dataset itself (generate_warmup_dataset).
            warmup=len(workload.warmup),
        )
        require_executable("trtllm-bench", INSTALL_HINT)
        if on_step:
            on_step(0, len(workload.requests))
        self.close()  # the next generate/score call constructs the LLM again
        run_tool(argv, run_dir / "trtllm-bench.log", cwd=run_dir)
        if on_step:
            on_step(len(workload.requests), len(workload.requests))
        return parse_trtllm_bench_report(read_json_report(report, "trtllm-bench"), workload.concurrency)


_NO_LOGITS = (
    "TensorRT-LLM returned no logits for a scoring request; a legacy engine must be built with "
    "gather_all_token_logits=true"
)


# -- the backend -----------------------------------------------------------------------------------------


def installed_version() -> str:
    version = package_version("tensorrt_llm")
    if version is None:
        raise EngineUnavailableError(f"engine tensorrt_llm: the tensorrt_llm package is not installed; {INSTALL_HINT}")
    return version


class TensorrtLlmBackend:
    kind = KIND

    def check_available(self, device: str) -> None:
        installed_version()
        require_cuda("TensorRT-LLM", device)

    def prepare(
        self, variant: Variant, model_dir: Path, work_dir: Path, device: str, options: dict[str, str]
    ) -> EngineHandle:
        parsed = parse_options(TensorrtLlmOptions, options, KIND)
        version = installed_version()
        validate_checkpoint(variant, model_dir)
        resolved = options_to_strings(parsed) | {"work_dir": str(work_dir)}
        if parsed.backend == "tensorrt":
            if not legacy_backend_supported(version):
                raise EngineUnavailableError(
                    f"engine tensorrt_llm: backend=tensorrt (trtllm-build) needs TensorRT-LLM <= 1.2, "
                    f"but {version} is installed; use backend=pytorch"
                )
            checkpoint_dir = work_dir / "trtllm_checkpoint"
            engine_dir = work_dir / "engine"
            run_tool(
                convert_checkpoint_argv(model_dir, checkpoint_dir, variant, parsed.tensor_parallel_size),
                work_dir / "convert_checkpoint.log",
            )
            require_executable("trtllm-build", INSTALL_HINT)
            run_tool(trtllm_build_argv(checkpoint_dir, engine_dir, parsed), work_dir / "trtllm-build.log")
            resolved["engine_dir"] = str(engine_dir)
        return EngineHandle(kind=KIND, variant=variant, model_dir=model_dir, device="cuda", options=resolved)

    def load(self, handle: EngineHandle) -> TensorrtLlmEngine:
        options = parse_options(TensorrtLlmOptions, handle.options, KIND)
        if options.backend == "tensorrt" and not legacy_backend_supported(installed_version()):
            raise EngineUnavailableError("engine tensorrt_llm: a legacy TensorRT engine needs TensorRT-LLM <= 1.2")
        return TensorrtLlmEngine.load(handle)


# -- checkpoint conversion (legacy backend), run as `python -m quant_release.engines.tensorrt_llm` --------


def convert_to_trtllm_checkpoint(model_dir: Path, output_dir: Path, variant: Variant, tp_size: int) -> None:
    """HF checkpoint (BF16, or modelopt FP8 with its scales) -> TensorRT-LLM checkpoint, one rank at a
    time, as convert_checkpoint.py's `convert_and_save_rank` does."""
    mapping_cls = importlib.import_module("tensorrt_llm.mapping").Mapping
    models = importlib.import_module("tensorrt_llm.models")
    quant_config_cls = importlib.import_module("tensorrt_llm.models.modeling_utils").QuantConfig
    quant_algo = importlib.import_module("tensorrt_llm.quantization").QuantAlgo
    fields = quant_config_kwargs(model_dir, variant)
    for key in ("quant_algo", "kv_cache_quant_algo"):
        if key in fields:
            fields[key] = quant_algo(fields[key])
    quant_config = quant_config_cls(**fields)
    output_dir.mkdir(parents=True, exist_ok=True)
    for rank in range(tp_size):
        mapping = mapping_cls(world_size=tp_size, rank=rank, tp_size=tp_size, pp_size=1)
        model = models.LLaMAForCausalLM.from_hugging_face(
            str(model_dir), "auto", mapping=mapping, quant_config=quant_config, load_model_on_cpu=True
        )
        model.save_checkpoint(str(output_dir), save_config=rank == 0)
        del model
        gc.collect()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert a HF checkpoint to a TensorRT-LLM checkpoint.")
    parser.add_argument("--model_dir", type=Path, required=True)
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--variant", choices=["bf16", "fp8"], required=True)
    parser.add_argument("--tp_size", type=int, default=1)
    args = parser.parse_args(argv)
    convert_to_trtllm_checkpoint(args.model_dir, args.output_dir, args.variant, args.tp_size)


if __name__ == "__main__":
    main()
