"""The vLLM backend without vLLM: exact constructor kwargs and sampling params reaching a stand-in `vllm`
module, prompt-logprob arithmetic, the concurrency-limited timed loop on a scripted engine, and the
metric definitions."""

from __future__ import annotations

import itertools
import json
import math
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

import quant_release.engines.bench_report as bench_report
import quant_release.engines.vllm as vl
from quant_release.engines.base import BenchmarkRequest, BenchmarkWorkload
from quant_release.engines.bench_report import (
    RequestTiming,
    metrics_from_timings,
    parse_options,
    percentile,
    truncate_at_stop,
)
from quant_release.errors import ConfigError, EngineUnavailableError, QuantReleaseError
from quant_release.records import EngineHandle
from tests.support.tiny import train_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tok")
    train_tokenizer(directory)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return directory


# -- options, kwargs, sampling params --------------------------------------------------------------------


def test_options_parse_from_handle_strings_and_reject_bad_values() -> None:
    parsed = parse_options(vl.VllmOptions, {"enforce_eager": "true", "max_model_len": "4096"}, "vllm")
    assert parsed == vl.VllmOptions(enforce_eager=True, max_model_len=4096)
    with pytest.raises(ConfigError, match="vllm option gpu_memory_utilization"):
        parse_options(vl.VllmOptions, {"gpu_memory_utilization": "0"}, "vllm")
    with pytest.raises(ValueError, match="Extra inputs"):
        vl.VllmOptions.model_validate({"tp": 2})


def test_llm_kwargs_fp8_uses_modelopt_quantization() -> None:
    options = vl.VllmOptions(tensor_parallel_size=2, gpu_memory_utilization=0.8, max_model_len=8192, max_num_seqs=64)
    assert vl.llm_kwargs(Path("/ckpt/fp8"), "fp8", options) == {
        "model": "/ckpt/fp8",
        "tokenizer": "/ckpt/fp8",
        "dtype": "auto",
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.8,
        "enforce_eager": False,
        "seed": 0,
        "quantization": "modelopt",
        "max_model_len": 8192,
        "max_num_seqs": 64,
    }


def test_llm_kwargs_bf16_has_no_quantization() -> None:
    assert vl.llm_kwargs(Path("/ckpt/bf16"), "bf16", vl.VllmOptions(enforce_eager=True)) == {
        "model": "/ckpt/bf16",
        "tokenizer": "/ckpt/bf16",
        "dtype": "auto",
        "tensor_parallel_size": 1,
        "gpu_memory_utilization": 0.9,
        "enforce_eager": True,
        "seed": 0,
    }


def test_sampling_params() -> None:
    assert vl.generate_sampling_kwargs(16, [2, 7]) == {
        "temperature": 0.0,
        "max_tokens": 16,
        "stop_token_ids": [2, 7],
        "ignore_eos": True,
        "detokenize": False,
    }
    assert vl.prompt_logprobs_sampling_kwargs() == {
        "temperature": 0.0,
        "max_tokens": 1,
        "prompt_logprobs": 1,
        "detokenize": False,
    }
    assert vl.benchmark_sampling_kwargs(128) == {
        "temperature": 0.0,
        "max_tokens": 128,
        "ignore_eos": True,
        "detokenize": False,
    }
    assert vl.tokens_prompt((3, 4)) == {"prompt_token_ids": [3, 4]}


def test_truncate_at_stop() -> None:
    assert truncate_at_stop([5, 6, 2, 7], [2], 10) == [5, 6]
    assert truncate_at_stop([5, 6, 2, 7], [], 3) == [5, 6, 2]
    assert truncate_at_stop([2], [2], 3) == []
    assert truncate_at_stop([5, 6, 7], [9], 2) == [5, 6]


# -- prompt logprobs -------------------------------------------------------------------------------------


@dataclass
class Logprob:
    """Same fields as vllm's Logprob (logprob, rank, decoded_token)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def test_continuation_logprob_sums_the_prompt_tokens_entries() -> None:
    # Prompt 1 2 3 4: context 1 2, continuation 3 4. Entries as vLLM builds them: None first, then top-1
    # plus the prompt token when it is not the top-1.
    prompt_logprobs = [
        None,
        {2: Logprob(-0.5, 1)},
        {9: Logprob(-0.1, 1), 3: Logprob(-2.0, 4)},
        {4: Logprob(-0.25, 1)},
    ]
    assert vl.continuation_logprob(prompt_logprobs, 2, [3, 4]) == -2.25
    with pytest.raises(QuantReleaseError, match="no prompt logprob for token 5 at 3"):
        vl.continuation_logprob(prompt_logprobs, 2, [3, 5])


def test_top1_tokens_is_the_rank_1_entry_at_each_position() -> None:
    prompt_logprobs = [
        None,
        {2: Logprob(-0.5, 1)},  # the prompt token was the argmax
        {9: Logprob(-0.1, 1), 3: Logprob(-2.0, 4)},  # it was not
        {6: Logprob(-0.7, 1), 5: Logprob(-0.7, 1)},  # a tie resolves to the lowest id, like torch.argmax
    ]
    assert vl.top1_tokens(prompt_logprobs) == [2, 9, 5]
    with pytest.raises(QuantReleaseError, match="no rank-1 prompt logprob at position 1"):
        vl.top1_tokens([None, {3: Logprob(-2.0, 2)}])


# -- metrics ---------------------------------------------------------------------------------------------


def test_percentile_interpolates_like_numpy() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0.5) == 2.5
    assert percentile(values, 0.9) == pytest.approx(3.7)
    assert percentile(values, 0.0) == 1.0 and percentile(values, 1.0) == 4.0
    assert math.isnan(percentile([], 0.5))


def test_metrics_from_timings_follow_trtllm_bench_definitions() -> None:
    timings = [
        # start, first token, end, input tokens, output tokens
        RequestTiming(0.0, 0.1, 0.5, 10, 5),  # ttft 100 ms, tpot 100 ms, e2e 500 ms, 10 tok/s per user
        RequestTiming(0.2, 0.4, 1.0, 6, 3),  # ttft 200 ms, tpot 300 ms, e2e 800 ms, 3.75 tok/s
        RequestTiming(0.5, 0.9, 0.9, 4, 1),  # one token: tpot 0, e2e 400 ms, 2.5 tok/s
    ]
    metrics = metrics_from_timings(timings, concurrency=2, peak_gpu_memory_bytes=123)
    assert metrics.requests == 3 and metrics.concurrency == 2 and metrics.peak_gpu_memory_bytes == 123
    assert (metrics.input_tokens, metrics.output_tokens) == (20, 9)
    assert metrics.duration_s == 1.0
    assert metrics.request_throughput == 3.0
    assert metrics.output_throughput == 9.0
    assert metrics.total_token_throughput == 29.0
    assert metrics.per_user_output_throughput == pytest.approx((10 + 3.75 + 2.5) / 3)
    assert metrics.ttft_ms.mean == pytest.approx(700 / 3)
    assert metrics.ttft_ms.p50 == pytest.approx(200.0)
    assert metrics.tpot_ms.p50 == pytest.approx(100.0)
    assert metrics.tpot_ms.p90 == pytest.approx(260.0)
    assert metrics.e2e_latency_ms.p99 == pytest.approx(794.0)  # 500 + 0.98 * (800 - 500)
    with pytest.raises(ValueError, match="no requests"):
        metrics_from_timings([], 1, None)


# -- the timed loop --------------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class StepOutput:
    request_id: str
    outputs: list[Any]
    finished: bool


class ScriptedEngine:
    """Each step costs 1 s on the clock; every running request gets one token per step; a request's
    first step is its prefill (first token). Stands in for vLLM's LLMEngine add_request/step."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.running: dict[str, list[int]] = {}
        self.wanted: dict[str, int] = {}
        self.max_running = 0
        self.added: list[tuple[str, dict[str, list[int]], Any]] = []

    def add_request(self, request_id: str, prompt: dict[str, list[int]], params: Any) -> None:
        self.added.append((request_id, prompt, params))
        self.running[request_id] = []
        self.wanted[request_id] = params
        self.max_running = max(self.max_running, len(self.running))

    def step(self) -> list[StepOutput]:
        self.clock.now += 1.0
        outputs = []
        for request_id, tokens in list(self.running.items()):
            tokens.append(7)
            finished = len(tokens) == self.wanted[request_id]
            outputs.append(StepOutput(request_id, [types.SimpleNamespace(token_ids=list(tokens))], finished))
            if finished:
                del self.running[request_id]
        return outputs


def test_run_requests_keeps_the_concurrency_and_timestamps_each_request() -> None:
    clock = Clock()
    engine = ScriptedEngine(clock)
    requests = [BenchmarkRequest((1, 2), 3), BenchmarkRequest((3,), 1), BenchmarkRequest((4, 5, 6), 2)]
    steps: list[tuple[int, int]] = []
    timings = vl.run_requests(
        engine, requests, lambda r: r.output_len, 2, clock=clock, on_step=lambda d, t: steps.append((d, t))
    )
    assert engine.max_running == 2
    assert [prompt for _, prompt, _ in engine.added] == [
        {"prompt_token_ids": [1, 2]},
        {"prompt_token_ids": [3]},
        {"prompt_token_ids": [4, 5, 6]},
    ]
    # t=0: requests 0 and 1 start. Step to t=1: both get a first token, 1 finishes; 2 starts at t=1.
    # t=2: 0 has 2 tokens, 2 has its first. t=3: both finish.
    assert timings == [
        RequestTiming(start_s=0.0, first_token_s=1.0, end_s=3.0, input_tokens=2, output_tokens=3),
        RequestTiming(start_s=0.0, first_token_s=1.0, end_s=1.0, input_tokens=1, output_tokens=1),
        RequestTiming(start_s=1.0, first_token_s=2.0, end_s=3.0, input_tokens=3, output_tokens=2),
    ]
    assert steps == [(1, 3), (2, 3), (3, 3)]
    with pytest.raises(ValueError, match="concurrency"):
        vl.run_requests(engine, requests, lambda r: r.output_len, 0)


def test_request_ids_are_unique_across_runs() -> None:
    engine = ScriptedEngine(Clock())
    requests = [BenchmarkRequest((1,), 1)]
    vl.run_requests(engine, requests, lambda r: r.output_len, 1)
    vl.run_requests(engine, requests, lambda r: r.output_len, 1)
    ids = [request_id for request_id, _, _ in engine.added]
    assert len(set(ids)) == 2


# -- availability ----------------------------------------------------------------------------------------


def test_missing_package_is_exit_4_with_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = bench_report.importlib.util.find_spec
    monkeypatch.setattr(
        bench_report.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "vllm" else real_find_spec(name, *a),
    )
    with pytest.raises(EngineUnavailableError) as info:
        vl.VllmBackend().check_available("cuda")
    assert info.value.exit_code == 4
    assert "\n" not in str(info.value)
    assert "pip install vllm" in str(info.value) and "docs.vllm.ai" in str(info.value)
    with pytest.raises(EngineUnavailableError):
        vl.VllmBackend().load(_handle(Path("/nonexistent")))


def test_installed_package_still_needs_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vl, "package_version", lambda module: "0.11.0")
    with pytest.raises(EngineUnavailableError, match="NVIDIA GPUs only"):
        vl.VllmBackend().check_available("cpu")


def test_prepare_validates_the_checkpoint_and_resolves_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(vl, "package_version", lambda module: "0.11.0")
    bf16 = tmp_path / "bf16"
    bf16.mkdir()
    (bf16 / "config.json").write_text(json.dumps({"model_type": "llama"}))
    handle = vl.VllmBackend().prepare("bf16", bf16, tmp_path / "work", "cuda", {"max_num_seqs": "32"})
    assert handle.kind == "vllm" and handle.model_dir == bf16 and handle.device == "cuda"
    assert handle.options == {
        "tensor_parallel_size": "1",
        "gpu_memory_utilization": "0.9",
        "enforce_eager": "False",
        "max_num_seqs": "32",
    }
    with pytest.raises(QuantReleaseError, match="not a modelopt checkpoint"):
        vl.VllmBackend().prepare("fp8", bf16, tmp_path / "work", "cuda", {})
    with pytest.raises(ConfigError, match=r"no config\.json"):
        vl.VllmBackend().prepare("bf16", tmp_path, tmp_path / "work", "cuda", {})


# -- the LLM class, through a stand-in vllm module ---------------------------------------------------------


class FakeSamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


def _fake_prompt_logprobs(prompt: list[int]) -> list[dict[int, Logprob] | None]:
    """Rank-1 guess is always token+1; each prompt token's own logprob is -token/10."""
    out: list[dict[int, Logprob] | None] = [None]
    for previous, token in itertools.pairwise(prompt):
        entry = {previous + 1: Logprob(-0.01, 1)}
        if token != previous + 1:
            entry[token] = Logprob(-token / 10, 2)
        out.append(entry)
    return out


class FakeLLM:
    instances: ClassVar[list[FakeLLM]] = []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.calls: list[tuple[list[dict[str, list[int]]], dict[str, Any]]] = []
        self.llm_engine = ScriptedEngine(Clock())
        FakeLLM.instances.append(self)

    def generate(self, prompts: list[dict[str, list[int]]], sampling: FakeSamplingParams, use_tqdm: bool) -> list[Any]:
        assert use_tqdm is False
        self.calls.append((prompts, sampling.kwargs))
        results = []
        for prompt in prompts:
            ids = prompt["prompt_token_ids"]
            generated = [ids[-1] + 1, 2, 5][: sampling.kwargs["max_tokens"]]
            logprobs = _fake_prompt_logprobs(ids) if sampling.kwargs.get("prompt_logprobs") else None
            results.append(
                types.SimpleNamespace(
                    outputs=[types.SimpleNamespace(token_ids=generated)], prompt_logprobs=logprobs, finished=True
                )
            )
        return results


@pytest.fixture
def fake_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeLLM.instances = []
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM  # type: ignore[attr-defined]
    module.SamplingParams = FakeSamplingParams  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(vl, "package_version", lambda module: "0.11.0")


def _handle(model_dir: Path, variant: str = "fp8", **options: str) -> EngineHandle:
    return EngineHandle(kind="vllm", variant=variant, model_dir=model_dir, device="cuda", options=options)  # type: ignore[arg-type]


def test_load_constructs_llm_with_these_kwargs(fake_vllm: None, tokenizer_dir: Path) -> None:
    engine = vl.VllmBackend().load(_handle(tokenizer_dir, tensor_parallel_size="2", max_model_len="2048"))
    (llm,) = FakeLLM.instances
    assert llm.kwargs == {
        "model": str(tokenizer_dir),
        "tokenizer": str(tokenizer_dir),
        "dtype": "auto",
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.9,
        "enforce_eager": False,
        "seed": 0,
        "quantization": "modelopt",
        "max_model_len": 2048,
    }
    assert engine.decode(engine.encode("def f(x):")) == "def f(x):"
    engine.close()
    with pytest.raises(QuantReleaseError, match="closed"):
        engine.generate([[1]], 1)


def test_generate_passes_greedy_params_and_cuts_at_the_stop_token(fake_vllm: None, tokenizer_dir: Path) -> None:
    engine = vl.VllmBackend().load(_handle(tokenizer_dir))
    steps: list[tuple[int, int]] = []
    out = engine.generate(
        [[1, 2], [7]], max_new_tokens=3, stop_token_ids=[2], on_step=lambda d, t: steps.append((d, t))
    )
    assert out == [[3], [8]]  # the fake generates last+1, 2, 5: vLLM keeps the stop token, we cut it
    (llm,) = FakeLLM.instances
    prompts, sampling = llm.calls[0]
    assert prompts == [{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [7]}]
    assert sampling == vl.generate_sampling_kwargs(3, [2])
    assert steps == [(2, 2)]


def test_score_choices_reads_each_choice_off_the_prompt_logprobs(fake_vllm: None, tokenizer_dir: Path) -> None:
    engine = vl.VllmBackend().load(_handle(tokenizer_dir))
    contexts, choices = ["def f(x):", "The result is"], [" the answer", " of"]
    scores = engine.score_choices(contexts, choices)
    (llm,) = FakeLLM.instances
    prompts, sampling = llm.calls[0]
    assert sampling == vl.prompt_logprobs_sampling_kwargs()
    conts = [engine.tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
    assert prompts == [{"prompt_token_ids": engine.encode(ctx) + cont} for ctx in contexts for cont in conts]
    for context, row in zip(contexts, scores, strict=True):
        ctx = engine.encode(context)
        expected = []
        for cont in conts:
            full = ctx + cont
            expected.append(
                sum(-0.01 if full[i] == full[i - 1] + 1 else -full[i] / 10 for i in range(len(ctx), len(full)))
            )
        assert row == pytest.approx(expected)


def test_greedy_next_tokens_joins_rank_1_prompt_tokens_and_the_generated_one(
    fake_vllm: None, tokenizer_dir: Path
) -> None:
    engine = vl.VllmBackend().load(_handle(tokenizer_dir))
    # The fake's argmax after token t is always t + 1: for 4 9 2 that is 5 10 3.
    assert engine.greedy_next_tokens([[4, 9, 2], [6]]) == [[5, 10, 3], [7]]
    (llm,) = FakeLLM.instances
    assert llm.calls[0][1] == vl.prompt_logprobs_sampling_kwargs()


def test_benchmark_warms_up_then_times_the_exact_requests(
    fake_vllm: None, tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = vl.VllmBackend().load(_handle(tokenizer_dir))
    (llm,) = FakeLLM.instances
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (30, 100))
    # The scripted engine reads the sampling params as the wanted output length.
    monkeypatch.setattr(vl, "benchmark_sampling_kwargs", lambda output_len: {"max_tokens": output_len})
    monkeypatch.setattr(vl.VllmEngine, "_sampling", lambda self, kwargs: kwargs["max_tokens"])
    workload = BenchmarkWorkload(
        requests=[BenchmarkRequest((1, 2), 2), BenchmarkRequest((3,), 2)],
        concurrency=2,
        warmup=[BenchmarkRequest((9,), 1)],
    )
    metrics = engine.benchmark(workload)
    added = [prompt["prompt_token_ids"] for _, prompt, _ in llm.llm_engine.added]
    assert added == [[9], [1, 2], [3]]  # warm-up first, untimed
    assert metrics.requests == 2 and metrics.output_tokens == 4 and metrics.input_tokens == 3
    assert metrics.peak_gpu_memory_bytes == 70
