"""The engine registry: each engine declares its name, its options and where its code is.

An engine is two things. A light *spec*, registered here: its name (the value of `engine.kind`), its
options model (a pydantic section of `ReleaseConfig.engine`, named after the engine, so the CLI flags,
YAML files and the Prefect form get its options), the backend class to load lazily, and the modules
and packages that shape its results (part of the build, evaluate and benchmark cache keys). And a
backend module implementing `base.EngineBackend`, imported only when the engine is used, so that
`--help` and preflight never load torch, tensorrt_llm or vllm.

Adding an engine: a module with its backend, an options model in `options.py`, one
`register(EngineSpec(...))` below, and its options section in `config.EngineConfig` (see
docs/architecture.md).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass

from quant_release.engines.base import BenchmarkRequest, BenchmarkWorkload, EngineBackend, LoadedEngine, StepCallback
from quant_release.engines.checkpoint import BUILTIN_KV_CACHE_QUANT_ALGOS, BUILTIN_QUANT_ALGOS
from quant_release.engines.options import BuiltinOptions, EngineOptions, TensorrtLlmOptions, VllmOptions
from quant_release.errors import EngineUnavailableError


@dataclass(frozen=True)
class EngineSpec:
    name: str
    description: str
    options: type[EngineOptions]
    backend: str  # "module:Class", imported on first use
    sources: tuple[str, ...]  # our modules whose code shapes the engine's results (hashing.code_fingerprint)
    packages: tuple[str, ...]  # distributions whose versions shape them
    requires: tuple[str, ...] = ()  # modules that must be installed (checked in preflight, not imported)
    devices: tuple[str, ...] = ("cpu", "cuda")  # devices it runs on
    # Checkpoint formats it runs, as modelopt's export names them (quant_algo, kv_cache_quant_algo):
    # preflight refuses a scheme outside them before anything is calibrated.
    quant_algos: tuple[str, ...] = ("FP8",)
    kv_cache_quant_algos: tuple[str, ...] = ()


ENGINES: dict[str, EngineSpec] = {}


def register(spec: EngineSpec) -> EngineSpec:
    if spec.name in ENGINES:
        raise ValueError(f"engine {spec.name!r} is registered twice")
    ENGINES[spec.name] = spec
    return spec


def engine_spec(kind: str) -> EngineSpec:
    try:
        return ENGINES[kind]
    except KeyError:
        raise ValueError(f"unknown engine kind {kind!r}; known: {', '.join(sorted(ENGINES))}") from None


def check_available(kind: str, device: str) -> None:
    """Preflight's check that the engine can run here: its modules are installed and it supports `device`.

    Cheap on purpose (nothing is imported: a fully cached run never loads an engine); the backend's own,
    deeper `check_available` runs when the build stage prepares the engine.
    """
    spec = engine_spec(kind)
    if device not in spec.devices:
        raise EngineUnavailableError(f"engine {kind} does not run on {device}; it runs on {', '.join(spec.devices)}")
    missing = [module for module in spec.requires if importlib.util.find_spec(module) is None]
    if missing:
        raise EngineUnavailableError(f"engine {kind} needs {', '.join(missing)}, which is not installed here")


def unsupported_format(kind: str, quant_algo: str, kv_cache_quant_algo: str | None) -> str | None:
    """Why engine `kind` cannot run a checkpoint exported with these algorithms, or None when it can."""
    spec = engine_spec(kind)
    if quant_algo not in spec.quant_algos:
        return f"engine {kind} runs quant_algo {', '.join(spec.quant_algos)}, not {quant_algo}"
    if kv_cache_quant_algo is not None and kv_cache_quant_algo not in spec.kv_cache_quant_algos:
        runs = ", ".join(spec.kv_cache_quant_algos) or "none"
        return f"engine {kind} runs KV-cache quantization {runs}, not {kv_cache_quant_algo}"
    return None


# `--engine auto`: the first of these that is installed and runs on the device (builtin always does).
AUTO = "auto"
AUTO_ORDER = ("tensorrt_llm", "vllm", "builtin")


def resolve_engine(kind: str, device: str) -> str:
    """`auto` → the first engine of AUTO_ORDER whose modules are installed and that runs on `device`;
    any other kind is returned as it is (preflight's `check_available` then judges it)."""
    if kind != AUTO:
        return kind
    for name in AUTO_ORDER:
        spec = engine_spec(name)
        if device in spec.devices and all(importlib.util.find_spec(m) is not None for m in spec.requires):
            return name
    return "builtin"


def get_backend(kind: str) -> EngineBackend:
    module_name, _, class_name = engine_spec(kind).backend.partition(":")
    backend: EngineBackend = getattr(importlib.import_module(module_name), class_name)()
    return backend


# --- the engines --------------------------------------------------------------------------------------

register(
    EngineSpec(
        name="builtin",
        description="builtin: our PyTorch engine (CPU; compiled, CUDA-graph decode and FP8 GEMMs on Hopper/Ada)",
        options=BuiltinOptions,
        backend="quant_release.engines.builtin:BuiltinBackend",
        sources=(
            "quant_release.engines.builtin",
            "quant_release.engines.llama",
            "quant_release.engines.runtime",
            "quant_release.engines.attention",
            "quant_release.engines.triton_kernels",
            "quant_release.engines.checkpoint",
            "quant_release.engines.bench_report",
        ),
        packages=("torch", "transformers", "safetensors", "triton"),
        requires=("torch", "transformers", "safetensors"),
        quant_algos=BUILTIN_QUANT_ALGOS,
        kv_cache_quant_algos=BUILTIN_KV_CACHE_QUANT_ALGOS,
    )
)
register(
    EngineSpec(
        name="tensorrt_llm",
        description="tensorrt_llm: NVIDIA TensorRT-LLM (PyTorch backend, or trtllm-build engines up to 1.2); GPU only",
        options=TensorrtLlmOptions,
        backend="quant_release.engines.tensorrt_llm:TensorrtLlmBackend",
        sources=("quant_release.engines.tensorrt_llm", "quant_release.engines.bench_report"),
        packages=("tensorrt_llm", "torch", "transformers"),
        requires=("tensorrt_llm",),
        devices=("cuda",),
        # TensorRT-LLM's QuantAlgo has both FP8 formats and an FP8 KV cache.
        quant_algos=("FP8", "FP8_PER_CHANNEL_PER_TOKEN"),
        kv_cache_quant_algos=("FP8",),
    )
)
register(
    EngineSpec(
        name="vllm",
        description="vllm: vLLM offline engine (modelopt FP8 checkpoints); GPU only",
        options=VllmOptions,
        backend="quant_release.engines.vllm:VllmBackend",
        sources=("quant_release.engines.vllm", "quant_release.engines.bench_report"),
        packages=("vllm", "torch", "transformers"),
        requires=("vllm",),
        devices=("cuda",),
        # vLLM's `modelopt` method: FP8, and FP8_PER_CHANNEL_PER_TOKEN in releases whose algorithm list has
        # it (older ones refuse it when the checkpoint is loaded); an FP8 KV cache from k_scale/v_scale.
        quant_algos=("FP8", "FP8_PER_CHANNEL_PER_TOKEN"),
        kv_cache_quant_algos=("FP8",),
    )
)


__all__ = [
    "AUTO",
    "ENGINES",
    "BenchmarkRequest",
    "BenchmarkWorkload",
    "BuiltinOptions",
    "EngineBackend",
    "EngineOptions",
    "EngineSpec",
    "LoadedEngine",
    "StepCallback",
    "TensorrtLlmOptions",
    "VllmOptions",
    "check_available",
    "engine_spec",
    "get_backend",
    "register",
    "resolve_engine",
    "unsupported_format",
]
