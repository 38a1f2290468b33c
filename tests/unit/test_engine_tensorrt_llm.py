"""The TensorRT-LLM backend without TensorRT-LLM: exact argv, dataset file, report parsing, and which
constructor kwargs and sampling params reach a stand-in `tensorrt_llm` module.

The report sample (tests/unit/data/engines/trtllm_bench_report_sample.json) was written by hand from
`ReportUtility.get_statistics_dict` in NVIDIA/TensorRT-LLM tensorrt_llm/bench/dataclasses/reporting.py
(sections and keys) and `PercentileStats` in tensorrt_llm/bench/dataclasses/statistics.py (percentile
keys); its numbers are made up and only internally consistent (4 requests, 400 ms: 10 req/s).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

import quant_release.engines.bench_report as bench_report
import quant_release.engines.tensorrt_llm as trt
from quant_release.engines.base import BenchmarkRequest, BenchmarkWorkload
from quant_release.engines.bench_report import (
    EngineCommandError,
    parse_options,
    run_tool,
    trtllm_dataset_lines,
    write_trtllm_dataset,
)
from quant_release.engines.checkpoint import CheckpointError
from quant_release.errors import ConfigError, EngineUnavailableError, QuantReleaseError
from quant_release.records import EngineHandle
from tests.support.tiny import VOCAB as TINY_VOCAB
from tests.support.tiny import train_tokenizer

SAMPLE_REPORT = Path(__file__).parent / "data" / "engines" / "trtllm_bench_report_sample.json"
HF_QUANT = {
    "producer": {"name": "modelopt", "version": "0.40.0"},
    "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": ["lm_head"]},
}


def _checkpoint(directory: Path, variant: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    if variant == "fp8":
        config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "FP8"}
        (directory / "hf_quant_config.json").write_text(json.dumps(HF_QUANT))
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tok")
    train_tokenizer(directory)
    return directory


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend TensorRT-LLM 1.0.0 is installed (only its version is asked for)."""
    monkeypatch.setattr(trt, "package_version", lambda module: "1.0.0")


# -- options and versions ------------------------------------------------------------------------------


def test_options_parse_from_handle_strings_and_reject_bad_values() -> None:
    parsed = parse_options(
        trt.TensorrtLlmOptions,
        {"backend": "tensorrt", "tensor_parallel_size": "2", "kv_cache_free_gpu_memory_fraction": "0.8", "x": "1"},
        "tensorrt_llm",
    )
    assert parsed == trt.TensorrtLlmOptions(
        backend="tensorrt", tensor_parallel_size=2, kv_cache_free_gpu_memory_fraction=0.8
    )
    with pytest.raises(ConfigError, match="tensorrt_llm option backend"):
        parse_options(trt.TensorrtLlmOptions, {"backend": "onnx"}, "tensorrt_llm")
    with pytest.raises(ConfigError, match="kv_cache_free_gpu_memory_fraction"):
        parse_options(trt.TensorrtLlmOptions, {"kv_cache_free_gpu_memory_fraction": "1.5"}, "tensorrt_llm")
    with pytest.raises(ValueError, match="Extra inputs"):
        trt.TensorrtLlmOptions.model_validate({"max_batch": 8})  # a typo in the config is caught


def test_options_round_trip_through_handle_strings() -> None:
    options = trt.TensorrtLlmOptions(max_batch_size=64, gather_all_token_logits=False)
    strings = bench_report.options_to_strings(options)
    assert "max_num_tokens" not in strings  # None is left out
    assert parse_options(trt.TensorrtLlmOptions, strings, "tensorrt_llm") == options


@pytest.mark.parametrize(
    ("version", "legacy"),
    [("0.21.0", True), ("1.0.0", True), ("1.2.0rc6", True), ("1.2.1", True), ("1.3.0rc1", False), ("2.0.0", False)],
)
def test_legacy_backend_only_up_to_1_2(version: str, legacy: bool) -> None:
    assert trt.legacy_backend_supported(version) is legacy


# -- availability ----------------------------------------------------------------------------------------


def test_missing_package_is_exit_4_with_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = bench_report.importlib.util.find_spec
    monkeypatch.setattr(
        bench_report.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorrt_llm" else real_find_spec(name, *a),
    )
    with pytest.raises(EngineUnavailableError) as info:
        trt.TensorrtLlmBackend().check_available("cuda")
    message = str(info.value)
    assert info.value.exit_code == 4
    assert "\n" not in message
    assert "pip install tensorrt-llm" in message and "nvidia.github.io/TensorRT-LLM" in message
    with pytest.raises(EngineUnavailableError):
        trt.TensorrtLlmBackend().prepare("bf16", Path("/nonexistent"), Path("/tmp"), "cuda", {})


def test_installed_package_still_needs_a_gpu(installed: None) -> None:
    with pytest.raises(EngineUnavailableError, match="NVIDIA GPUs only"):
        trt.TensorrtLlmBackend().check_available("cpu")


# -- prepare ---------------------------------------------------------------------------------------------


def test_prepare_pytorch_backend_validates_and_points_at_the_checkpoint(installed: None, tmp_path: Path) -> None:
    fp8 = _checkpoint(tmp_path / "fp8", "fp8")
    handle = trt.TensorrtLlmBackend().prepare("fp8", fp8, tmp_path / "work", "cuda", {"tensor_parallel_size": "2"})
    assert handle.kind == "tensorrt_llm" and handle.model_dir == fp8 and handle.device == "cuda"
    assert handle.options == {
        "backend": "pytorch",
        "tensor_parallel_size": "2",
        "kv_cache_free_gpu_memory_fraction": "0.9",
        "max_input_len": "4096",
        "max_seq_len": "8192",
        "gather_all_token_logits": "True",
        "work_dir": str(tmp_path / "work"),
    }


def test_prepare_rejects_the_wrong_checkpoint_for_a_variant(installed: None, tmp_path: Path) -> None:
    fp8 = _checkpoint(tmp_path / "fp8", "fp8")
    with pytest.raises(ConfigError, match="needs the original"):
        trt.TensorrtLlmBackend().prepare("bf16", fp8, tmp_path, "cuda", {})
    bf16 = _checkpoint(tmp_path / "bf16", "bf16")
    with pytest.raises(CheckpointError, match="not a modelopt checkpoint"):
        trt.TensorrtLlmBackend().prepare("fp8", bf16, tmp_path, "cuda", {})


def test_legacy_backend_on_a_newer_release_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(trt, "package_version", lambda module: "1.3.0rc2")
    bf16 = _checkpoint(tmp_path / "bf16", "bf16")
    with pytest.raises(EngineUnavailableError, match=r"needs TensorRT-LLM <= 1\.2, but 1\.3\.0rc2 is installed"):
        trt.TensorrtLlmBackend().prepare("bf16", bf16, tmp_path / "work", "cuda", {"backend": "tensorrt"})


def test_prepare_legacy_converts_then_builds_and_stores_the_engine_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(trt, "package_version", lambda module: "1.2.0")
    monkeypatch.setattr(trt, "require_executable", lambda name, hint: f"/usr/bin/{name}")
    calls: list[tuple[list[str], Path]] = []
    monkeypatch.setattr(trt, "run_tool", lambda argv, log, cwd=None, env=None: calls.append((list(argv), log)))
    fp8 = _checkpoint(tmp_path / "fp8", "fp8")
    work = tmp_path / "work"
    handle = trt.TensorrtLlmBackend().prepare(
        "fp8", fp8, work, "cuda", {"backend": "tensorrt", "max_batch_size": "16", "tensor_parallel_size": "2"}
    )
    assert calls == [
        (
            [
                sys.executable,
                *("-m", "quant_release.engines.tensorrt_llm", "--model_dir", str(fp8)),
                *("--output_dir", str(work / "trtllm_checkpoint"), "--variant", "fp8", "--tp_size", "2"),
            ],
            work / "convert_checkpoint.log",
        ),
        (
            [
                "trtllm-build",
                *("--checkpoint_dir", str(work / "trtllm_checkpoint"), "--output_dir", str(work / "engine")),
                *("--max_input_len", "4096", "--max_seq_len", "8192", "--max_batch_size", "16"),
                *("--gemm_plugin", "auto", "--workers", "2", "--gather_all_token_logits"),
            ],
            work / "trtllm-build.log",
        ),
    ]
    assert handle.options["engine_dir"] == str(work / "engine")
    assert handle.options["backend"] == "tensorrt"


def test_trtllm_build_argv_with_every_limit_and_without_logits() -> None:
    options = trt.TensorrtLlmOptions(
        backend="tensorrt", max_batch_size=8, max_num_tokens=4096, max_input_len=1024, max_seq_len=2048,
        gather_all_token_logits=False,
    )  # fmt: skip
    assert trt.trtllm_build_argv(Path("/c"), Path("/e"), options) == [
        *("trtllm-build", "--checkpoint_dir", "/c", "--output_dir", "/e", "--max_input_len", "1024"),
        *("--max_seq_len", "2048", "--max_batch_size", "8", "--max_num_tokens", "4096"),
        *("--gemm_plugin", "auto", "--workers", "1"),
    ]


def test_quant_config_comes_from_hf_quant_config(tmp_path: Path) -> None:
    fp8 = _checkpoint(tmp_path / "fp8", "fp8")
    assert trt.quant_config_kwargs(fp8, "fp8") == {"quant_algo": "FP8", "exclude_modules": ["lm_head"]}
    data = json.loads((fp8 / "hf_quant_config.json").read_text())
    data["quantization"]["kv_cache_quant_algo"] = "FP8"
    (fp8 / "hf_quant_config.json").write_text(json.dumps(data))
    assert trt.quant_config_kwargs(fp8, "fp8")["kv_cache_quant_algo"] == "FP8"
    assert trt.quant_config_kwargs(fp8, "bf16") == {}


def _install(monkeypatch: pytest.MonkeyPatch, name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    for key, value in attrs.items():
        setattr(module, key, value)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_checkpoint_conversion_calls_from_hugging_face_per_rank(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    calls: list[tuple[str, Any]] = []

    class FakeModel:
        def __init__(self, rank: int) -> None:
            self.rank = rank

        @classmethod
        def from_hugging_face(cls, model_dir: str, dtype: str, **kwargs: Any) -> FakeModel:
            calls.append(("from_hugging_face", (model_dir, dtype, kwargs)))
            return cls(kwargs["mapping"]["rank"])

        def save_checkpoint(self, output_dir: str, save_config: bool) -> None:
            calls.append(("save_checkpoint", (self.rank, output_dir, save_config)))

    class QuantAlgo(str):
        pass

    _install(monkeypatch, "tensorrt_llm")
    _install(monkeypatch, "tensorrt_llm.mapping", Mapping=lambda **kw: dict(kw))
    _install(monkeypatch, "tensorrt_llm.models", LLaMAForCausalLM=FakeModel)
    _install(monkeypatch, "tensorrt_llm.models.modeling_utils", QuantConfig=lambda **kw: ("QuantConfig", kw))
    _install(monkeypatch, "tensorrt_llm.quantization", QuantAlgo=QuantAlgo)
    fp8 = _checkpoint(tmp_path / "fp8", "fp8")
    trt.main(["--model_dir", str(fp8), "--output_dir", str(tmp_path / "out"), "--variant", "fp8", "--tp_size", "2"])
    quant = ("QuantConfig", {"quant_algo": "FP8", "exclude_modules": ["lm_head"]})
    assert calls == [
        (
            "from_hugging_face",
            (
                str(fp8),
                "auto",
                {
                    "mapping": {"world_size": 2, "rank": 0, "tp_size": 2, "pp_size": 1},
                    "quant_config": quant,
                    "load_model_on_cpu": True,
                },
            ),
        ),
        ("save_checkpoint", (0, str(tmp_path / "out"), True)),
        (
            "from_hugging_face",
            (
                str(fp8),
                "auto",
                {
                    "mapping": {"world_size": 2, "rank": 1, "tp_size": 2, "pp_size": 1},
                    "quant_config": quant,
                    "load_model_on_cpu": True,
                },
            ),
        ),
        ("save_checkpoint", (1, str(tmp_path / "out"), False)),
    ]
    assert isinstance(calls[0][1][2]["quant_config"][1]["quant_algo"], QuantAlgo)  # the enum, not a string


def test_a_failing_tool_raises_one_line_with_its_last_lines(tmp_path: Path) -> None:
    script = "import sys\nfor i in range(9): print(f'line {i}')\nprint('Error: no GPU', file=sys.stderr)\nsys.exit(3)"
    with pytest.raises(EngineCommandError) as info:
        run_tool([sys.executable, "-c", script], tmp_path / "tool.log")
    message = str(info.value)
    assert "\n" not in message
    assert "exited 3: line 5 | line 6 | line 7 | line 8 | Error: no GPU" in message
    assert "line 4" not in message
    assert (tmp_path / "tool.log").read_text().startswith("line 0\n")
    run_tool([sys.executable, "-c", "print('ok')"], tmp_path / "ok.log")  # success raises nothing
    assert (tmp_path / "ok.log").read_text() == "ok\n"


# -- trtllm-bench ----------------------------------------------------------------------------------------

WORKLOAD = BenchmarkWorkload(
    requests=[BenchmarkRequest((1, 2, 3), 4), BenchmarkRequest((5, 6), 2), BenchmarkRequest((7,), 1)],
    concurrency=2,
    warmup=[BenchmarkRequest((1, 2), 2)],
)


def test_dataset_file_byte_for_byte(tmp_path: Path) -> None:
    path = write_trtllm_dataset(WORKLOAD.requests, tmp_path / "sub" / "dataset.jsonl")
    assert path.read_bytes() == (
        b'{"task_id":0,"input_ids":[1,2,3],"output_tokens":4}\n'
        b'{"task_id":1,"input_ids":[5,6],"output_tokens":2}\n'
        b'{"task_id":2,"input_ids":[7],"output_tokens":1}\n'
    )
    assert trtllm_dataset_lines([]) == []
    with pytest.raises(ValueError, match="at least one request"):
        write_trtllm_dataset([], tmp_path / "empty.jsonl")
    with pytest.raises(ValueError, match="output_len >= 1"):
        write_trtllm_dataset([BenchmarkRequest((1,), 0)], tmp_path / "zero.jsonl")


def test_trtllm_bench_argv_pytorch_backend() -> None:
    options = trt.TensorrtLlmOptions(tensor_parallel_size=2, max_batch_size=32, kv_cache_free_gpu_memory_fraction=0.85)
    argv = trt.trtllm_bench_argv(
        model_dir=Path("/ckpt/fp8"),
        workspace=Path("/w/ws"),
        dataset=Path("/w/d.jsonl"),
        report_json=Path("/w/r.json"),
        options=options,
        engine_dir=None,
        concurrency=8,
        num_requests=100,
        warmup=3,
    )
    assert argv == [
        *("trtllm-bench", "--model", "quant-release/fp8", "--model_path", "/ckpt/fp8", "--workspace", "/w/ws"),
        *("throughput", "--dataset", "/w/d.jsonl", "--backend", "pytorch", "--tp", "2", "--concurrency", "8"),
        *("--num_requests", "100", "--warmup", "3", "--eos_id", "-1", "--kv_cache_free_gpu_mem_fraction", "0.85"),
        *("--max_batch_size", "32", "--streaming", "--report_json", "/w/r.json"),
    ]


def test_trtllm_bench_argv_legacy_engine() -> None:
    options = trt.TensorrtLlmOptions(backend="tensorrt", tensor_parallel_size=2)
    common: dict[str, Any] = {
        "model_dir": Path("/ckpt/bf16"),
        "workspace": Path("/w"),
        "dataset": Path("/d"),
        "report_json": Path("/r"),
        "options": options,
        "concurrency": 1,
        "num_requests": 5,
        "warmup": 0,
    }
    assert trt.trtllm_bench_argv(**common, engine_dir=Path("/e")) == [
        *("trtllm-bench", "--model", "quant-release/bf16", "--model_path", "/ckpt/bf16", "--workspace", "/w"),
        *("throughput", "--dataset", "/d", "--backend", "tensorrt", "--engine_dir", "/e", "--concurrency", "1"),
        *("--num_requests", "5", "--warmup", "0", "--eos_id", "-1", "--kv_cache_free_gpu_mem_fraction", "0.9"),
        *("--streaming", "--report_json", "/r"),
    ]
    with pytest.raises(ValueError, match="engine directory"):
        trt.trtllm_bench_argv(**common, engine_dir=None)


def test_parse_the_report_json() -> None:
    metrics = trt.parse_trtllm_bench_report(json.loads(SAMPLE_REPORT.read_text()), concurrency=2)
    assert metrics.model_dump() == {
        "concurrency": 2,
        "requests": 4,
        "input_tokens": 24,
        "output_tokens": 32,
        "duration_s": 0.4,
        "request_throughput": 10.0,
        "output_throughput": 80.0,
        "total_token_throughput": 140.0,
        "per_user_output_throughput": 33.5,
        "ttft_ms": {"mean": 60.0, "p50": 55.0, "p90": 80.0, "p99": 90.0},
        "tpot_ms": {"mean": 27.0, "p50": 26.0, "p90": 29.0, "p99": 30.0},
        "e2e_latency_ms": {"mean": 250.0, "p50": 240.0, "p90": 300.0, "p99": 320.0},
        "peak_gpu_memory_bytes": None,
    }


def test_a_report_without_streaming_metrics_or_p90_is_refused() -> None:
    report = json.loads(SAMPLE_REPORT.read_text())
    del report["streaming_metrics"]
    with pytest.raises(QuantReleaseError, match="no 'streaming_metrics' section"):
        trt.parse_trtllm_bench_report(report, concurrency=2)
    report = json.loads(SAMPLE_REPORT.read_text())
    del report["performance"]["request_latency_percentiles_ms"]["p90"]
    with pytest.raises(QuantReleaseError, match=r"performance\.request_latency_percentiles_ms\.p90 is missing"):
        trt.parse_trtllm_bench_report(report, concurrency=2)


# -- the LLM API, through a stand-in tensorrt_llm module ---------------------------------------------------


class FakeOutput:
    def __init__(self, token_ids: list[int], generation_logits: Any = None) -> None:
        self.token_ids = token_ids
        self.generation_logits = generation_logits


class FakeResult:
    def __init__(self, token_ids: list[int], context_logits: Any = None, generation_logits: Any = None) -> None:
        self.outputs = [FakeOutput(token_ids, generation_logits)]
        self.context_logits = context_logits


VOCAB = TINY_VOCAB  # the tiny tokenizer's ids index the stand-in logits


def _logits_for(prompt: list[int]) -> torch.Tensor:
    """Deterministic stand-in logits, [len(prompt), VOCAB]: test input for the scoring arithmetic."""
    generator = torch.Generator().manual_seed(sum(p * (i + 1) for i, p in enumerate(prompt)))
    return torch.randn(len(prompt), VOCAB, generator=generator)


class FakeLLM:
    instances: ClassVar[list[FakeLLM]] = []

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.calls: list[tuple[list[list[int]], dict[str, Any]]] = []
        self.shut_down = False
        self.generated: list[int] = [9, 8, 2, 7]  # what "generation" returns
        FakeLLM.instances.append(self)

    def generate(self, prompts: list[list[int]], sampling_params: Any, use_tqdm: bool) -> list[FakeResult]:
        assert use_tqdm is False
        self.calls.append((prompts, sampling_params.kwargs))
        results = []
        for prompt in prompts:
            logits = _logits_for(prompt)
            results.append(
                FakeResult(
                    self.generated[: sampling_params.kwargs["max_tokens"]],
                    context_logits=logits if sampling_params.kwargs.get("return_context_logits") else None,
                    generation_logits=logits[-1:] if sampling_params.kwargs.get("return_generation_logits") else None,
                )
            )
        return results

    def shutdown(self) -> None:
        self.shut_down = True


class FakeSamplingParams:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


class FakeKvCacheConfig:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FakeKvCacheConfig) and other.kwargs == self.kwargs

    __hash__ = None  # type: ignore[assignment]  # compared by value, never hashed


class FakeTrtEngineLLM(FakeLLM):
    pass


@pytest.fixture
def fake_trtllm(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeLLM.instances = []
    _install(monkeypatch, "tensorrt_llm", LLM=FakeLLM, SamplingParams=FakeSamplingParams)
    _install(monkeypatch, "tensorrt_llm.llmapi", KvCacheConfig=FakeKvCacheConfig)
    _install(monkeypatch, "tensorrt_llm._tensorrt_engine", LLM=FakeTrtEngineLLM)
    monkeypatch.setattr(trt, "package_version", lambda module: "1.2.0")


def _handle(model_dir: Path, variant: str = "fp8", **options: str) -> EngineHandle:
    return EngineHandle(kind="tensorrt_llm", variant=variant, model_dir=model_dir, device="cuda", options=options)  # type: ignore[arg-type]


def test_load_pytorch_backend_constructs_llm_with_these_kwargs(fake_trtllm: None, tokenizer_dir: Path) -> None:
    engine = trt.TensorrtLlmBackend().load(
        _handle(tokenizer_dir, max_batch_size="64", max_num_tokens="8192", kv_cache_free_gpu_memory_fraction="0.8")
    )
    (llm,) = FakeLLM.instances
    assert type(llm) is FakeLLM
    assert llm.kwargs == {
        "model": str(tokenizer_dir),
        "tokenizer": str(tokenizer_dir),
        "tensor_parallel_size": 1,
        "gather_generation_logits": True,
        "max_batch_size": 64,
        "max_num_tokens": 8192,
        "kv_cache_config": FakeKvCacheConfig(free_gpu_memory_fraction=0.8),
    }
    engine.close()
    assert llm.shut_down and engine.llm is None


def test_load_legacy_engine_uses_the_tensorrt_engine_llm(fake_trtllm: None, tokenizer_dir: Path) -> None:
    trt.TensorrtLlmBackend().load(_handle(tokenizer_dir, backend="tensorrt", engine_dir="/work/engine"))
    (llm,) = FakeLLM.instances
    assert type(llm) is FakeTrtEngineLLM
    assert llm.kwargs["model"] == "/work/engine" and llm.kwargs["tokenizer"] == str(tokenizer_dir)


def test_generate_is_greedy_without_eos_and_stops_before_a_stop_token(fake_trtllm: None, tokenizer_dir: Path) -> None:
    engine = trt.TensorrtLlmBackend().load(_handle(tokenizer_dir))
    steps: list[tuple[int, int]] = []
    out = engine.generate(
        [[1, 2], [3]], max_new_tokens=4, stop_token_ids=[2], on_step=lambda d, t: steps.append((d, t))
    )
    assert out == [[9, 8], [9, 8]]  # the fake generates 9 8 2 7: cut before the stop token 2
    (llm,) = FakeLLM.instances
    assert llm.calls[0] == (
        [[1, 2], [3]],
        {"max_tokens": 4, "top_k": 1, "end_id": -1, "pad_id": -1, "stop_token_ids": [2], "detokenize": False},
    )
    assert steps == [(2, 2)]
    assert engine.generate([[1]], max_new_tokens=3) == [[9, 8, 2]]
    assert llm.calls[1][1]["stop_token_ids"] is None


def test_single_token_choices_are_scored_from_the_first_generation_logits(
    fake_trtllm: None, tokenizer_dir: Path
) -> None:
    engine = trt.TensorrtLlmBackend().load(_handle(tokenizer_dir))
    choices = [" the", " of"]
    choice_tokens = [engine.tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
    assert all(len(t) == 1 for t in choice_tokens)
    contexts = ["def f(x):", "The result is"]
    scores = engine.score_choices(contexts, choices)
    (llm,) = FakeLLM.instances
    prompts, sampling = llm.calls[0]
    assert prompts == [engine.encode(c) for c in contexts]
    assert sampling == {
        "max_tokens": 1,
        "top_k": 1,
        "end_id": -1,
        "pad_id": -1,
        "detokenize": False,
        "return_context_logits": False,
        "return_generation_logits": True,
    }
    for context, row in zip(contexts, scores, strict=True):
        expected = torch.log_softmax(_logits_for(engine.encode(context))[-1], dim=-1)
        assert row == pytest.approx([float(expected[t[0]]) for t in choice_tokens], abs=1e-6)


def test_multi_token_choices_are_scored_from_the_prompt_logits(fake_trtllm: None, tokenizer_dir: Path) -> None:
    engine = trt.TensorrtLlmBackend().load(_handle(tokenizer_dir))
    choices = [" the answer", " of"]
    context = "def f(x):"
    (row,) = engine.score_choices([context], choices)
    (llm,) = FakeLLM.instances
    prompts, sampling = llm.calls[0]
    ctx = engine.encode(context)
    conts = [engine.tokenizer(c, add_special_tokens=False)["input_ids"] for c in choices]
    assert prompts == [ctx + conts[0], ctx + conts[1]]
    assert sampling["return_context_logits"] is True and sampling["return_generation_logits"] is False
    for score, cont in zip(row, conts, strict=True):
        logprobs = torch.log_softmax(_logits_for(ctx + cont), dim=-1)
        expected = sum(float(logprobs[len(ctx) - 1 + i, tok]) for i, tok in enumerate(cont))
        assert score == pytest.approx(expected, abs=1e-5)


def test_greedy_next_tokens_is_the_argmax_of_every_prompt_position(fake_trtllm: None, tokenizer_dir: Path) -> None:
    engine = trt.TensorrtLlmBackend().load(_handle(tokenizer_dir))
    sequences = [[1, 2, 3, 4], [5, 6]]
    assert engine.greedy_next_tokens(sequences) == [_logits_for(s).argmax(dim=-1).tolist() for s in sequences]


def test_scoring_without_logits_says_how_to_build_the_engine(fake_trtllm: None, tokenizer_dir: Path) -> None:
    engine = trt.TensorrtLlmBackend().load(_handle(tokenizer_dir))
    engine.llm.generate = lambda prompts, sampling_params, use_tqdm: [FakeResult([1]) for _ in prompts]
    with pytest.raises(QuantReleaseError, match="gather_all_token_logits"):
        engine.greedy_next_tokens([[1, 2]])


def test_benchmark_frees_the_gpu_runs_trtllm_bench_and_parses_its_report(
    fake_trtllm: None, tokenizer_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    engine = trt.TensorrtLlmBackend().load(_handle(tokenizer_dir, work_dir=str(tmp_path)))
    (llm,) = FakeLLM.instances
    monkeypatch.setattr(trt, "require_executable", lambda name, hint: f"/usr/bin/{name}")
    seen: dict[str, Any] = {}

    def fake_run_tool(argv: list[str], log: Path, cwd: Path | None = None, env: Any = None) -> None:
        seen["llm_shut_down"] = llm.shut_down
        seen["argv"] = argv
        seen["dataset"] = Path(argv[argv.index("--dataset") + 1]).read_text()
        Path(argv[argv.index("--report_json") + 1]).write_text(SAMPLE_REPORT.read_text())

    monkeypatch.setattr(trt, "run_tool", fake_run_tool)
    metrics = engine.benchmark(WORKLOAD)
    assert seen["llm_shut_down"] is True
    assert seen["dataset"] == "".join(line + "\n" for line in trtllm_dataset_lines(WORKLOAD.requests))
    argv = seen["argv"]
    assert argv[argv.index("--concurrency") + 1] == "2"
    assert argv[argv.index("--num_requests") + 1] == "3"
    assert argv[argv.index("--warmup") + 1] == "1"
    assert Path(argv[argv.index("--dataset") + 1]).is_relative_to(tmp_path / "trtllm-bench")
    assert metrics.requests == 4 and metrics.concurrency == 2  # from the report
    engine.generate([[1]], max_new_tokens=1)  # the LLM is constructed again on demand
    assert len(FakeLLM.instances) == 2
