"""The vLLM backend: `vllm.LLM` for generation, scoring and the throughput measurement.

FP8 variants load the modelopt unified checkpoint with `quantization="modelopt"` (vLLM reads its
hf_quant_config.json); BF16 variants load the original checkpoint. Nothing is built: the handle is the
checkpoint directory.

Scoring is exact: `prompt_logprobs` returns, for every prompt position after the first, the log-prob of
the actual prompt token plus the top-k (vllm-project/vllm vllm/v1/engine/logprobs.py,
`LogprobsProcessor._update_prompt_logprobs`: the prompt token is injected when it is not in the top-k;
position 0 is None). So a choice's log-prob is read off the prompt logprobs of context + choice, and
with k = 1 the entry of rank 1 is the argmax at each position (teacher-forced greedy tokens).

Throughput is measured in-process on the workload's exact requests, not with `vllm bench throughput`:
that command (vllm/benchmarks/throughput.py) takes no token-id dataset with fixed output lengths (its
"random" dataset draws its own tokens), submits every request at once (no concurrency limit), samples at
temperature 1 and reports only elapsed time and request/token rates in --output-json ("elapsed_time",
"num_requests", "total_num_tokens", "requests_per_second", "tokens_per_second"): no TTFT, TPOT or
latency percentiles. Instead `LLMEngine.add_request` / `step()` (the loop `LLM.generate` itself runs)
keeps exactly `concurrency` requests in flight and timestamps each request's first and last token as a
client sees them, which is how trtllm-bench and `vllm bench serve` measure.
"""

from __future__ import annotations

import gc
import importlib
import itertools
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from quant_release.engines.base import BenchmarkRequest, BenchmarkWorkload, StepCallback
from quant_release.engines.bench_report import (
    BatchedLlmEngine,
    RequestTiming,
    cuda_device_name,
    files_bytes,
    metrics_from_timings,
    options_to_strings,
    package_version,
    parse_options,
    require_cuda,
    validate_checkpoint,
)
from quant_release.engines.options import VllmOptions
from quant_release.errors import EngineUnavailableError, QuantReleaseError
from quant_release.records import EngineHandle, ThroughputMeasurement, Variant

KIND = "vllm"
INSTALL_HINT = (
    "install it with `pip install vllm` on a Linux host with an NVIDIA GPU and CUDA "
    "(https://docs.vllm.ai/en/latest/getting_started/installation/gpu.html)"
)
# Prompts per LLM.generate call: progress granularity, and bounds the prompt logprobs held at once.
CHUNK = 256


# -- pure builders ---------------------------------------------------------------------------------------


def llm_kwargs(model_dir: Path, variant: Variant, options: VllmOptions) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM(...)`."""
    kwargs: dict[str, Any] = {
        "model": str(model_dir),
        "tokenizer": str(model_dir),
        "dtype": "auto",
        "tensor_parallel_size": options.tensor_parallel_size,
        "gpu_memory_utilization": options.gpu_memory_utilization,
        "enforce_eager": options.enforce_eager,
        "seed": 0,
    }
    if variant == "fp8":
        kwargs["quantization"] = "modelopt"
    if options.max_model_len is not None:
        kwargs["max_model_len"] = options.max_model_len
    if options.max_num_seqs is not None:
        kwargs["max_num_seqs"] = options.max_num_seqs
    return kwargs


def generate_sampling_kwargs(max_new_tokens: int, stop_token_ids: Sequence[int]) -> dict[str, Any]:
    """Greedy (temperature 0). ignore_eos=True: only the caller's stop tokens end a generation, as with
    the built-in engine and TensorRT-LLM (end_id=-1); a caller that wants EOS passes it as a stop token."""
    return {
        "temperature": 0.0,
        "max_tokens": max_new_tokens,
        "stop_token_ids": list(stop_token_ids),
        "ignore_eos": True,
        "detokenize": False,
    }


def prompt_logprobs_sampling_kwargs() -> dict[str, Any]:
    """One greedy step plus the prompt logprobs with the top-1 (k = 0 turns them off in some versions:
    `prompt_logprobs=([] if num_prompt_logprobs else None)` in vllm/v1/engine/logprobs.py)."""
    return {"temperature": 0.0, "max_tokens": 1, "prompt_logprobs": 1, "detokenize": False}


def benchmark_sampling_kwargs(output_len: int) -> dict[str, Any]:
    """Exactly `output_len` tokens (EOS ignored, as vllm bench and trtllm-bench do), greedy, and no
    detokenization in the timed loop (trtllm-bench does none either)."""
    return {"temperature": 0.0, "max_tokens": output_len, "ignore_eos": True, "detokenize": False}


def tokens_prompt(token_ids: Sequence[int]) -> dict[str, list[int]]:
    """vllm.inputs.TokensPrompt is a TypedDict: a plain dict is the same thing."""
    return {"prompt_token_ids": [int(t) for t in token_ids]}


def continuation_logprob(
    prompt_logprobs: Sequence[Mapping[int, Any] | None], context_len: int, continuation: Sequence[int]
) -> float:
    """Sum of the logprobs of `continuation`, the last tokens of a prompt of context_len + len(continuation)
    tokens, from that prompt's `prompt_logprobs` (entry j is for prompt token j)."""
    total = 0.0
    for offset, token in enumerate(continuation):
        entry = prompt_logprobs[context_len + offset]
        if entry is None or token not in entry:
            raise QuantReleaseError(f"vLLM returned no prompt logprob for token {token} at {context_len + offset}")
        total += float(entry[token].logprob)
    return total


def top1_tokens(prompt_logprobs: Sequence[Mapping[int, Any] | None]) -> list[int]:
    """The rank-1 token of every prompt position after the first: the argmax prediction for positions
    0 .. n-2. Ties (two rank-1 entries) resolve to the lowest id, as torch.argmax does."""
    out = []
    for position, entry in enumerate(prompt_logprobs[1:], start=1):
        best = sorted(token for token, logprob in (entry or {}).items() if logprob.rank == 1)
        if not best:
            raise QuantReleaseError(f"vLLM returned no rank-1 prompt logprob at position {position}")
        out.append(int(best[0]))
    return out


# -- the timed loop --------------------------------------------------------------------------------------

_run_ids = itertools.count()


def run_requests(
    engine: Any,
    requests: Sequence[BenchmarkRequest],
    make_sampling: Callable[[BenchmarkRequest], Any],
    concurrency: int,
    clock: Callable[[], float] = time.perf_counter,
    on_step: StepCallback | None = None,
) -> list[RequestTiming]:
    """Keep `concurrency` requests in flight on a vLLM `LLMEngine` until all finish; timestamp each
    request's submission, first output token and completion on `clock`."""
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    run = next(_run_ids)
    pending = deque(enumerate(requests))
    starts: dict[str, float] = {}
    firsts: dict[str, float] = {}
    index_of: dict[str, int] = {}
    timings: list[RequestTiming | None] = [None] * len(requests)
    in_flight = 0
    done = 0
    while pending or in_flight:
        while pending and in_flight < concurrency:
            index, request = pending.popleft()
            request_id = f"qr-bench-{run}-{index}"
            index_of[request_id] = index
            starts[request_id] = clock()
            engine.add_request(request_id, tokens_prompt(request.prompt), make_sampling(request))
            in_flight += 1
        outputs = engine.step()
        now = clock()
        for output in outputs:
            request_id = output.request_id
            produced = len(output.outputs[0].token_ids)
            if produced and request_id not in firsts:
                firsts[request_id] = now
            if output.finished:
                index = index_of[request_id]
                timings[index] = RequestTiming(
                    start_s=starts[request_id],
                    first_token_s=firsts.get(request_id, now),
                    end_s=now,
                    input_tokens=len(requests[index].prompt),
                    output_tokens=produced,
                )
                in_flight -= 1
                done += 1
                if on_step:
                    on_step(done, len(requests))
    return [t for t in timings if t is not None]


def device_memory_used_bytes() -> int:
    """Bytes in use on GPU 0, device-wide (vLLM's engine runs in its own process, so torch's allocator
    statistics in this one would show nothing). vLLM allocates weights and its whole KV cache up front,
    so this, read at the end of a run, is the engine's footprint."""
    import torch

    free, total = torch.cuda.mem_get_info(0)
    return int(total - free)


# -- the loaded engine -----------------------------------------------------------------------------------


def _vllm() -> Any:
    return importlib.import_module("vllm")


class VllmEngine(BatchedLlmEngine):
    """One loaded variant behind vLLM's offline LLM."""

    chunk = CHUNK

    def __init__(self, handle: EngineHandle, llm: Any, tokenizer: Any, options: VllmOptions) -> None:
        self.handle = handle
        self.llm = llm
        self.tokenizer = tokenizer
        self.options = options

    @classmethod
    def load(cls, handle: EngineHandle) -> VllmEngine:
        from transformers import AutoTokenizer

        options = parse_options(VllmOptions, handle.options, KIND)
        llm = _vllm().LLM(**llm_kwargs(handle.model_dir, handle.variant, options))
        # Our own tokenizer, the same one the built-in engine uses, so every engine scores the same ids.
        tokenizer = AutoTokenizer.from_pretrained(str(handle.model_dir))
        return cls(handle, llm, tokenizer, options)

    def close(self) -> None:
        # vLLM frees the GPU when its engine (and engine process) is garbage-collected.
        self.llm = None
        gc.collect()

    @property
    def device_name(self) -> str:
        return cuda_device_name()

    def weight_bytes(self) -> int:
        return files_bytes(self.handle.model_dir, "*.safetensors")

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids)))

    def _sampling(self, kwargs: dict[str, Any]) -> Any:
        return _vllm().SamplingParams(**kwargs)

    def _run(self, prompts: Sequence[Sequence[int]], sampling: Any) -> list[Any]:
        if self.llm is None:
            raise QuantReleaseError("the vLLM engine was closed")
        return list(self.llm.generate([tokens_prompt(p) for p in prompts], sampling, use_tqdm=False))

    def _generate_sampling(self, max_new_tokens: int, stop_token_ids: Sequence[int]) -> Any:
        return self._sampling(generate_sampling_kwargs(max_new_tokens, stop_token_ids))

    def score_choices(
        self, contexts: Sequence[str], choices: Sequence[str], on_step: StepCallback | None = None
    ) -> list[list[float]]:
        """One request per (context, choice): the prompt logprobs of context + choice hold the choice's
        exact log-prob. (A request that asks for prompt logprobs is not served from vLLM's prefix cache,
        so each pair is a full prefill.)"""
        context_ids = [self.encode(c) for c in contexts]
        choice_ids = [list(self.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in choices]
        if any(not ids for ids in choice_ids):
            raise ValueError("every choice must encode to at least one token")
        sampling = self._sampling(prompt_logprobs_sampling_kwargs())
        per_chunk = max(1, CHUNK // len(choice_ids))
        scores: list[list[float]] = []
        for first in range(0, len(context_ids), per_chunk):
            chunk = context_ids[first : first + per_chunk]
            results = self._run([ctx + cont for ctx in chunk for cont in choice_ids], sampling)
            for row_index, ctx in enumerate(chunk):
                row = results[row_index * len(choice_ids) : (row_index + 1) * len(choice_ids)]
                scores.append(
                    [
                        continuation_logprob(r.prompt_logprobs, len(ctx), cont)
                        for r, cont in zip(row, choice_ids, strict=True)
                    ]
                )
            if on_step:
                on_step(len(scores), len(context_ids))
        return scores

    def greedy_next_tokens(self, token_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        """Rank-1 prompt logprobs give the argmax after each of the first n-1 tokens; the one greedy
        token generated gives the argmax after the last."""
        sampling = self._sampling(prompt_logprobs_sampling_kwargs())
        out: list[list[int]] = []
        for first in range(0, len(token_ids), CHUNK):
            for result in self._run(token_ids[first : first + CHUNK], sampling):
                out.append([*top1_tokens(result.prompt_logprobs), int(result.outputs[0].token_ids[0])])
        return out

    def benchmark(self, workload: BenchmarkWorkload, on_step: StepCallback | None = None) -> ThroughputMeasurement:
        if self.llm is None:
            raise QuantReleaseError("the vLLM engine was closed")
        engine = self.llm.llm_engine

        def make_sampling(request: BenchmarkRequest) -> Any:
            return self._sampling(benchmark_sampling_kwargs(request.output_len))

        if workload.warmup:
            run_requests(engine, workload.warmup, make_sampling, workload.concurrency)
        timings = run_requests(engine, workload.requests, make_sampling, workload.concurrency, on_step=on_step)
        return metrics_from_timings(timings, workload.concurrency, device_memory_used_bytes())


# -- the backend -----------------------------------------------------------------------------------------


def installed_version() -> str:
    version = package_version("vllm")
    if version is None:
        raise EngineUnavailableError(f"engine vllm: the vllm package is not installed; {INSTALL_HINT}")
    return version


class VllmBackend:
    kind = KIND

    def check_available(self, device: str) -> None:
        installed_version()
        require_cuda("vLLM", device)

    def prepare(
        self, variant: Variant, model_dir: Path, work_dir: Path, device: str, options: dict[str, str]
    ) -> EngineHandle:
        """vLLM compiles nothing ahead of time: validate the checkpoint, resolve the options."""
        parsed = parse_options(VllmOptions, options, KIND)
        installed_version()
        validate_checkpoint(variant, model_dir)
        return EngineHandle(
            kind=KIND, variant=variant, model_dir=model_dir, device="cuda", options=options_to_strings(parsed)
        )

    def load(self, handle: EngineHandle) -> VllmEngine:
        installed_version()
        return VllmEngine.load(handle)
