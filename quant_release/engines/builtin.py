"""The built-in engine: our Llama runtime (`runtime.py`) behind the engine interface.

On a CUDA GPU it runs compiled layer programs, a CUDA-graphed decode step, Triton decode attention
and, for FP8 checkpoints on Ada/Hopper, real FP8 GEMMs (`torch._scaled_mm`) with the activation
quantization fused into the op that produces each activation. On a CPU the same code runs eagerly and
FP8 is emulated (FP8-rounded weights and activations, BF16 math).

What the stages ask of it, and how it batches:
  * `score_choices` (MMLU log-likelihood): the contexts' shared prefix (the few-shot block) is run
    once and copied to every slot; the questions then run as right-padded batches, sorted by length.
  * `generate` (MMLU generation, any greedy generation): the same prefix sharing, then decode steps.
  * `benchmark`: continuous batching with `concurrency` slots; a finished request's slot takes the
    next request at once, as in-flight batching servers do.
"""

from __future__ import annotations

import gc
import platform
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from quant_release.engines.base import BenchmarkRequest, BenchmarkWorkload, StepCallback
from quant_release.engines.bench_report import RequestTiming, metrics_from_timings
from quant_release.engines.checkpoint import CheckpointError, read_config
from quant_release.engines.llama import GemmMode, LlamaWeights, load_weights, read_builtin_quant_spec, resolve_gemm
from quant_release.engines.runtime import MAX_PROGRAM_TOKENS, LlamaRuntime, RuntimeOptions
from quant_release.environment import resolved_device
from quant_release.errors import EngineUnavailableError
from quant_release.records import EngineHandle, ThroughputMeasurement, Variant

# Tokens per scoring batch on a CPU: past this, batching stops paying on two cores.
CPU_BATCH_TOKENS = 2048


def torch_device(requested: str) -> torch.device:
    """`auto`/`cuda`/`cpu` → a torch device; `cuda` without a GPU is the engine-unavailable error."""
    name = resolved_device(requested)
    if name == "cuda" and not torch.cuda.is_available():
        raise EngineUnavailableError("device=cuda was requested but PyTorch sees no CUDA GPU")
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"


def shared_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    """Tokens worth running once for all rows: their common prefix, leaving each row at least one token.

    A single row shares nothing: splitting it would only change the arithmetic, not save any.
    """
    if len(rows) < 2:
        return 0
    return min(common_prefix_len(rows), min(len(r) for r in rows) - 1)


def common_prefix_len(rows: Sequence[Sequence[int]]) -> int:
    first = rows[0]
    length = len(first)
    for row in rows[1:]:
        limit = min(length, len(row))
        i = 0
        while i < limit and row[i] == first[i]:
            i += 1
        length = i
    return length


@dataclass
class _Request:
    """A benchmark request while it runs in a slot: when it was admitted, got its first and last token."""

    request: BenchmarkRequest
    admitted: float
    first_token: float = 0.0
    remaining: int = 0
    finished: float = 0.0


class BuiltinEngine:
    """One loaded variant. Not thread-safe; one caller at a time."""

    def __init__(
        self, handle: EngineHandle, weights: LlamaWeights, tokenizer: Any, device: torch.device, runtime: LlamaRuntime
    ) -> None:
        self.handle = handle
        self.weights: LlamaWeights | None = weights
        self.tokenizer = tokenizer
        self.device = device
        self.runtime = runtime
        self.batch_tokens = MAX_PROGRAM_TOKENS if device.type == "cuda" else CPU_BATCH_TOKENS
        self.max_slots = int(handle.options.get("max_batch_size", "256"))

    # -- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, handle: EngineHandle) -> BuiltinEngine:
        from transformers import AutoTokenizer

        device = torch_device(handle.device)
        gemm: GemmMode | None = None
        if handle.variant == "fp8":
            gemm = resolve_gemm(handle.options.get("fp8_gemm", "auto"), device)
        weights = load_weights(handle.model_dir, device, gemm)
        options = RuntimeOptions.for_device(device, fp8_kv_cache=weights.kv_cache_quant_algo == "FP8")
        if handle.options.get("compile") == "false":
            options.compile = options.cuda_graphs = False
        runtime = LlamaRuntime(weights, device, options)
        tokenizer = AutoTokenizer.from_pretrained(str(handle.model_dir))
        return cls(handle, weights, tokenizer, device, runtime)

    def close(self) -> None:
        self.runtime.release()
        self.weights = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @property
    def device_name(self) -> str:
        return describe_device(self.device)

    def weight_bytes(self) -> int:
        assert self.weights is not None, "engine is closed"
        return self.weights.nbytes()

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text)["input_ids"])

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))

    # -- batching helpers ----------------------------------------------------------------------
    def _batches(self, order: list[int], lengths: Sequence[int]) -> list[list[int]]:
        """Consecutive runs of `order` (sorted by length) whose padded size fits the token budget."""
        batches: list[list[int]] = []
        current: list[int] = []
        for index in order:
            longest = max([lengths[i] for i in current] + [lengths[index]])
            if current and (longest * (len(current) + 1) > self.batch_tokens or len(current) >= self.max_slots):
                batches.append(current)
                current = []
            current.append(index)
        if current:
            batches.append(current)
        return batches

    def _share_prefix(self, row: Sequence[int], prefix: int, slots: int, longest_total: int) -> None:
        """Reserve the cache and run the first `prefix` tokens of `row` once, into every slot."""
        self.runtime.reserve(slots, longest_total)
        if prefix > 0:
            self.runtime.prefill([list(row[:prefix])], [0])
            self.runtime.copy_prefix(0, list(range(1, slots)), prefix)

    # -- scoring -------------------------------------------------------------------------------
    @torch.inference_mode()
    def score_choices(
        self, contexts: Sequence[str], choices: Sequence[str], on_step: StepCallback | None = None
    ) -> list[list[float]]:
        """Sum of log-probs of each choice's tokens after each context (one row per context)."""
        if not contexts:
            return []
        context_ids = [self.encode(c) for c in contexts]
        choice_ids = [list(self.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in choices]
        if any(len(ids) == 0 for ids in choice_ids):
            raise ValueError("every choice must encode to at least one token")
        single_token = all(len(ids) == 1 for ids in choice_ids)
        # One row per context (single-token choices: the last position's distribution scores all of
        # them), else one row per (context, choice) with the choice's tokens appended.
        pairs = (
            [(c, None) for c in range(len(context_ids))]
            if single_token
            else [(c, k) for c in range(len(context_ids)) for k in range(len(choice_ids))]
        )
        full = [context_ids[c] + (choice_ids[k] if k is not None else []) for c, k in pairs]
        # Shared by every row, and never reaching into a choice: the gather positions below count on it.
        prefix = min(shared_prefix_len(full), min(len(ids) for ids in context_ids) - 1) if len(full) > 1 else 0
        suffixes = [row[prefix:] for row in full]
        lengths = [len(s) for s in suffixes]
        batches = self._batches(sorted(range(len(pairs)), key=lambda i: lengths[i]), lengths)
        self._share_prefix(full[0], prefix, max(len(b) for b in batches), prefix + max(lengths))
        scores = [[0.0] * len(choice_ids) for _ in context_ids]
        done_contexts: set[int] = set()
        for batch in batches:
            rows = [suffixes[i] for i in batch]
            if single_token:
                logits = self.runtime.prefill(rows, list(range(len(batch))), prefix)[:, 0]
                logprobs = torch.log_softmax(logits.float(), dim=-1)
                for row, index in enumerate(batch):
                    scores[pairs[index][0]] = [float(logprobs[row, ids[0]]) for ids in choice_ids]
            else:
                # Logits at the positions that predict each choice token: the row's last len(choice) inputs.
                width = max(len(ids) for ids in choice_ids)
                gather = torch.zeros(len(batch), width, dtype=torch.long)
                for row, index in enumerate(batch):
                    n = len(choice_ids[pairs[index][1] or 0])
                    first = len(suffixes[index]) - n - 1
                    gather[row] = torch.arange(first, first + width).clamp(max=len(suffixes[index]) - 1)
                logits = self.runtime.prefill(rows, list(range(len(batch))), prefix, gather)
                logprobs = torch.log_softmax(logits.float(), dim=-1)
                for row, index in enumerate(batch):
                    context, choice = pairs[index]
                    assert choice is not None
                    ids = choice_ids[choice]
                    scores[context][choice] = float(sum(logprobs[row, j, t] for j, t in enumerate(ids)))
            done_contexts.update(pairs[i][0] for i in batch)
            if on_step:
                on_step(len(done_contexts), len(context_ids))
        return scores

    @torch.inference_mode()
    def greedy_next_tokens(self, token_ids: Sequence[Sequence[int]]) -> list[list[int]]:
        """Argmax next token at every position of each sequence (teacher forcing)."""
        rows = [list(r) for r in token_ids]
        lengths = [len(r) for r in rows]
        out: list[list[int]] = [[] for _ in rows]
        for batch in self._batches(list(range(len(rows))), lengths):
            width = max(lengths[i] for i in batch)
            self.runtime.reserve(len(batch), width)
            gather = torch.arange(width).repeat(len(batch), 1)
            logits = self.runtime.prefill([rows[i] for i in batch], list(range(len(batch))), 0, gather)
            predicted = logits.argmax(dim=-1).tolist()
            for row, index in enumerate(batch):
                out[index] = predicted[row][: lengths[index]]
        return out

    # -- generation ----------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_new_tokens: int,
        stop_token_ids: Sequence[int] = (),
        on_step: StepCallback | None = None,
    ) -> list[list[int]]:
        """Greedy continuations (new tokens only, a stop token excluded), `max_new_tokens` at most."""
        if not prompts:
            return []
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        rows = [list(p) for p in prompts]
        stops = set(stop_token_ids)
        lengths = [len(r) for r in rows]
        prefix = shared_prefix_len(rows)
        suffix_lengths = [n - prefix for n in lengths]
        order = sorted(range(len(rows)), key=lambda i: suffix_lengths[i])
        batches = self._batches(order, [n + max_new_tokens for n in suffix_lengths])
        graphs = self.device.type == "cuda"  # decode in power-of-two batches: one CUDA graph each
        most = max(len(b) for b in batches)
        self._share_prefix(
            rows[0], prefix, self.runtime.bucket(most) if graphs else most, max(lengths) + max_new_tokens
        )
        out: list[list[int]] = [[] for _ in rows]
        done = 0
        for batch in batches:
            count = len(batch)
            self.runtime.active.zero_()
            self.runtime.prefill([rows[i][prefix:] for i in batch], list(range(count)), prefix)
            self.runtime.active[:count] = 1
            generated = [self.runtime.tokens[:count].tolist()]
            finished = [generated[0][r] in stops for r in range(count)]
            for _ in range(max_new_tokens - 1):
                if all(finished):
                    break
                self.runtime.decode(self.runtime.bucket(count) if graphs else count)
                step = self.runtime.tokens[:count].tolist()
                generated.append(step)
                finished = [f or step[r] in stops for r, f in enumerate(finished)]
            for r, index in enumerate(batch):
                tokens = [g[r] for g in generated]
                cut = next((j for j, t in enumerate(tokens) if t in stops), len(tokens))
                out[index] = tokens[:cut]
            done += count
            if on_step:
                on_step(done, len(rows))
        self.runtime.active.zero_()
        return out

    # -- throughput ----------------------------------------------------------------------------
    @torch.inference_mode()
    def benchmark(self, workload: BenchmarkWorkload, on_step: StepCallback | None = None) -> ThroughputMeasurement:
        """Continuous batching of the workload's requests over `concurrency` slots, EOS ignored.

        A request's clock starts when a slot admits it; the metrics are trtllm-bench's definitions
        (`bench_report.metrics_from_timings`). Warm-up requests run the same way, untimed.
        """
        requests = list(workload.requests)
        if not requests:
            raise ValueError("a benchmark needs at least one request")
        concurrency = min(workload.concurrency, self.max_slots, len(requests))
        longest = max(len(r.prompt) + r.output_len for r in [*requests, *workload.warmup])
        slots = self.runtime.bucket(concurrency) if self.device.type == "cuda" else concurrency
        self.runtime.reserve(max(slots, concurrency), longest)
        if workload.warmup:
            self._run_requests(list(workload.warmup), concurrency, None)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        finished = self._run_requests(requests, concurrency, on_step)
        timings = [
            RequestTiming(r.admitted, r.first_token, r.finished, len(r.request.prompt), r.request.output_len)
            for r in finished
        ]
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        return metrics_from_timings(timings, concurrency, peak)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _run_requests(
        self, requests: list[BenchmarkRequest], concurrency: int, on_step: StepCallback | None
    ) -> list[_Request]:
        """Keep `concurrency` slots busy until every request produced its `output_len` tokens.

        The host waits only when a request finishes: between two such events the decode graph is
        replayed back to back, as many steps as the nearest finish needs.
        """
        runtime = self.runtime
        queue = deque(requests)
        running: dict[int, _Request] = {}
        finished: list[_Request] = []
        runtime.active.zero_()
        batch = runtime.bucket(concurrency) if self.device.type == "cuda" else concurrency

        def admit() -> None:
            free = [slot for slot in range(concurrency) if slot not in running]
            taken = [(slot, queue.popleft()) for slot in free[: len(queue)]]
            if not taken:
                return
            now = time.perf_counter()
            runtime.prefill([list(r.prompt) for _, r in taken], [slot for slot, _ in taken])
            self._sync()
            first = time.perf_counter()
            for slot, request in taken:
                running[slot] = _Request(request, admitted=now, first_token=first, remaining=request.output_len - 1)
                runtime.active[slot] = 1

        def retire(now: float) -> None:
            for slot in [s for s, r in running.items() if r.remaining == 0]:
                request = running.pop(slot)
                request.finished = now
                finished.append(request)
                runtime.active[slot] = 0
            if on_step and finished:
                on_step(len(finished), len(requests))

        admit()
        retire(time.perf_counter())  # requests of one output token are done at their first token
        while running:
            steps = min(r.remaining for r in running.values())
            runtime.decode(batch, steps)
            self._sync()
            now = time.perf_counter()
            for request in running.values():
                request.remaining -= steps
            retire(now)
            admit()
            retire(time.perf_counter())
        runtime.active.zero_()
        return finished


class BuiltinBackend:
    kind = "builtin"

    def check_available(self, device: str) -> None:
        torch_device(device)

    def prepare(
        self, variant: Variant, model_dir: Path, work_dir: Path, device: str, options: dict[str, str]
    ) -> EngineHandle:
        """The built-in engine compiles nothing ahead: it resolves the device and GEMM mode and checks
        the checkpoint's config, so a bad checkpoint fails here and not mid-evaluation."""
        resolved_device_ = torch_device(device)
        resolved = dict(options)
        read_config(model_dir)
        if variant == "fp8":
            read_builtin_quant_spec(model_dir)
            resolved["fp8_gemm"] = resolve_gemm(options.get("fp8_gemm", "auto"), resolved_device_)
        elif "fp8_gemm" in resolved:
            del resolved["fp8_gemm"]
        return EngineHandle(
            kind=self.kind, variant=variant, model_dir=model_dir, device=resolved_device_.type, options=resolved
        )

    def load(self, handle: EngineHandle) -> BuiltinEngine:
        return BuiltinEngine.load(handle)


__all__ = ["BuiltinBackend", "BuiltinEngine", "CheckpointError", "describe_device", "torch_device"]
