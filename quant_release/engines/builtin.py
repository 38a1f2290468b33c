"""The built-in PyTorch engine: transformers' Llama modules, our FP8 layers, our generation loop.

It runs anywhere PyTorch runs. On CPU and pre-Ada GPUs the FP8 variant computes with emulated FP8
(FP8 weights and FP8-rounded activations, BF16 math); on Ada/Hopper it uses real FP8 GEMMs.
"""

from __future__ import annotations

import gc
import math
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from quant_release.engines.base import BenchmarkWorkload, StepCallback
from quant_release.engines.fp8 import CheckpointError, load_fp8_model, read_quant_config, resolve_gemm
from quant_release.environment import resolved_device
from quant_release.records import EngineHandle, ThroughputMeasurement, Variant


def resolve_device(requested: str) -> torch.device:
    return torch.device(resolved_device(requested))


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default method), without numpy."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q
    low, high = math.floor(pos), math.ceil(pos)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of unique tensors in the state dict (tied embeddings counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in model.state_dict().values():
        key = tensor.data_ptr()
        if key in seen:
            continue
        seen.add(key)
        total += tensor.numel() * tensor.element_size()
    return total


class BuiltinEngine:
    """One loaded variant. Not thread-safe; one request stream at a time."""

    def __init__(self, handle: EngineHandle, model: Any, tokenizer: Any, device: torch.device) -> None:
        self.handle = handle
        self.model = model
        self.tokenizer = tokenizer
        self.device = device

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, handle: EngineHandle) -> BuiltinEngine:
        from transformers import AutoTokenizer

        device = resolve_device(handle.device)
        model_dir = handle.model_dir
        if handle.variant == "fp8":
            gemm = resolve_gemm(handle.options.get("fp8_gemm", "auto"), device)
            model, _ = load_fp8_model(model_dir, device, gemm)
        else:
            model = load_bf16_model(model_dir, device)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        return cls(handle, model, tokenizer, device)

    def close(self) -> None:
        self.model = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def device_name(self) -> str:
        return describe_device(self.device)

    def weight_bytes(self) -> int:
        return _weight_bytes(self.model)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    # -- scoring -------------------------------------------------------------------------------
    @torch.inference_mode()
    def score_choices(
        self, contexts: Sequence[str], choices: Sequence[str], on_step: StepCallback | None = None
    ) -> list[list[float]]:
        """Sum of log-probs of each choice's tokens after each context.

        The contexts' longest common token prefix is run once and its KV cache reused (cropped back
        after each context), the same trick as vLLM's prefix caching: for k-shot MMLU the shared
        few-shot block is most of every prompt.
        """
        from transformers import DynamicCache

        if not contexts:
            return []
        context_ids = [self.encode(c) for c in contexts]
        choice_ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
        if any(len(ids) == 0 for ids in choice_ids):
            raise ValueError("every choice must encode to at least one token")
        prefix_len = _common_prefix_len(context_ids)
        # Leave at least one token per context so each context yields logits of its own.
        prefix_len = min(prefix_len, min(len(ids) for ids in context_ids) - 1)
        cache = DynamicCache()
        if prefix_len > 0:
            self.model(self._tensor([context_ids[0][:prefix_len]]), past_key_values=cache, use_cache=True)
        single_token = all(len(ids) == 1 for ids in choice_ids)
        scores: list[list[float]] = []
        for done, ids in enumerate(context_ids, start=1):
            suffix = ids[prefix_len:]
            if single_token:
                logits = self.model(self._tensor([suffix]), past_key_values=cache, use_cache=True).logits
                logprobs = torch.log_softmax(logits[0, -1].float(), dim=-1)
                scores.append([float(logprobs[c[0]]) for c in choice_ids])
                cache = _rewind(cache, prefix_len)
            else:
                row = []
                for cont in choice_ids:
                    tokens = suffix + cont
                    logits = self.model(self._tensor([tokens]), past_key_values=cache, use_cache=True).logits
                    logprobs = torch.log_softmax(logits[0, len(suffix) - 1 : -1].float(), dim=-1)
                    row.append(float(logprobs.gather(1, self._tensor([cont]).T).sum()))
                    cache = _rewind(cache, prefix_len)
                scores.append(row)
            if on_step:
                on_step(done, len(context_ids))
        return scores

    @torch.inference_mode()
    def greedy_next_tokens(self, token_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        out = []
        for ids in token_ids:
            logits = self.model(self._tensor([list(ids)]), use_cache=False).logits
            out.append(logits[0].argmax(dim=-1).tolist())
        return out

    # -- throughput ----------------------------------------------------------------------------
    @torch.inference_mode()
    def benchmark(self, workload: BenchmarkWorkload, on_step: StepCallback | None = None) -> ThroughputMeasurement:
        """Static batching: prefill a batch, decode `output_len` tokens greedily ignoring EOS, next batch.

        TTFT is the batch's prefill time (each request in it waits for all of it); TPOT is the mean
        decode step after the first token. Warm-up requests run first and are not timed.
        """
        prompts = [list(p) for p in workload.prompts]
        if workload.warmup_requests and prompts:
            # Warm up with the timed shape (batch size and full output length): a short warm-up left
            # allocator growth and kernel selection for longer KV lengths inside the first timed batch.
            warm = (prompts * workload.batch_size)[: min(workload.warmup_requests, workload.batch_size)]
            self._run_batch(warm, workload.output_len)
        ttfts: list[float] = []
        tpots: list[float] = []
        output_tokens = 0
        start = time.perf_counter()
        for first in range(0, len(prompts), workload.batch_size):
            batch = prompts[first : first + workload.batch_size]
            ttft, decode_seconds, produced = self._run_batch(batch, workload.output_len)
            ttfts += [ttft] * len(batch)
            steps = max(workload.output_len - 1, 1)
            tpots += [decode_seconds / steps] * len(batch)
            output_tokens += produced
            if on_step:
                on_step(min(first + len(batch), len(prompts)), len(prompts))
        seconds = time.perf_counter() - start
        return ThroughputMeasurement(
            requests=len(prompts),
            output_tokens=output_tokens,
            seconds=seconds,
            output_tok_s=output_tokens / seconds,
            requests_s=len(prompts) / seconds,
            ttft_ms_p50=_percentile(ttfts, 0.5) * 1e3,
            ttft_ms_p90=_percentile(ttfts, 0.9) * 1e3,
            tpot_ms_p50=_percentile(tpots, 0.5) * 1e3,
            tpot_ms_p90=_percentile(tpots, 0.9) * 1e3,
        )

    def _run_batch(self, batch: list[list[int]], output_len: int) -> tuple[float, float, int]:
        """Returns (prefill seconds, decode seconds, generated tokens)."""
        from transformers import DynamicCache

        if len({len(p) for p in batch}) != 1:
            raise ValueError("benchmark prompts in a batch must have equal length (no padding path)")
        cache = DynamicCache()
        _sync(self.device)
        t0 = time.perf_counter()
        logits = self.model(self._tensor(batch), past_key_values=cache, use_cache=True).logits
        next_tokens = logits[:, -1].argmax(dim=-1, keepdim=True)
        _sync(self.device)
        t1 = time.perf_counter()
        for _ in range(output_len - 1):
            logits = self.model(next_tokens, past_key_values=cache, use_cache=True).logits
            next_tokens = logits[:, -1].argmax(dim=-1, keepdim=True)
        _sync(self.device)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, len(batch) * output_len

    def _tensor(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long, device=self.device)


def _rewind(cache: Any, prefix_len: int) -> Any:
    """Back to just the shared prefix. `crop(0)` would not do: transformers reads 0 as "remove nothing"."""
    if prefix_len == 0:
        from transformers import DynamicCache

        return DynamicCache()
    cache.crop(prefix_len)
    return cache


def _common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    first = rows[0]
    length = len(first)
    for row in rows[1:]:
        limit = min(length, len(row))
        i = 0
        while i < limit and row[i] == first[i]:
            i += 1
        length = i
    return length


def load_bf16_model(model_dir: Path, device: torch.device) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    if getattr(config, "quantization_config", None):
        raise CheckpointError(f"{model_dir} is a quantized checkpoint; the bf16 variant needs the original")
    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)
    return model.to(device).eval()


class BuiltinBackend:
    kind = "builtin"

    def check_available(self, device: str) -> None:
        resolve_device(device)

    def prepare(
        self, variant: Variant, model_dir: Path, work_dir: Path, device: str, options: dict[str, str]
    ) -> EngineHandle:
        """The built-in engine compiles nothing: it resolves device and GEMM mode and checks the
        checkpoint's quantization config, so a bad checkpoint fails here and not mid-evaluation."""
        torch_device = resolve_device(device)
        resolved = dict(options)
        if variant == "fp8":
            read_quant_config(model_dir)
            resolved["fp8_gemm"] = resolve_gemm(options.get("fp8_gemm", "auto"), torch_device)
        return EngineHandle(
            kind=self.kind, variant=variant, model_dir=model_dir, device=torch_device.type, options=resolved
        )

    def load(self, handle: EngineHandle) -> BuiltinEngine:
        return BuiltinEngine.load(handle)
