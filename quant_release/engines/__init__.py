"""The engine registry: each engine declares its name, its options and where its code is.

An engine is two things. A light *spec*, registered here: its name (the value of `engine.kind`), its
options model (a pydantic section of `ReleaseConfig.engine`, named after the engine, so the CLI flags,
YAML files and the Prefect form get its options), the backend class to load lazily, and the modules
and packages that shape its results (part of the build, evaluate and benchmark cache keys). And a
backend module implementing `base.EngineBackend`, imported only when the engine is used, so that
`--help` and preflight never load torch, tensorrt_llm or vllm.

Adding an engine: a module with its backend, an options model and one `register(EngineSpec(...))`
below, and its options section in `config.EngineConfig` (see docs/architecture.md).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from quant_release.engines.base import BenchmarkWorkload, EngineBackend, LoadedEngine, StepCallback
from quant_release.errors import EngineUnavailableError


class EngineOptions(BaseModel):
    """Base of every engine's options: a section of the config, typos rejected."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def as_handle_options(self) -> dict[str, str]:
        """The options as `EngineBackend.prepare` takes them (strings, recorded in the engine handle)."""
        return {name: str(value) for name, value in self.model_dump(mode="json").items()}


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


def get_backend(kind: str) -> EngineBackend:
    module_name, _, class_name = engine_spec(kind).backend.partition(":")
    backend: EngineBackend = getattr(importlib.import_module(module_name), class_name)()
    return backend


# --- the engines --------------------------------------------------------------------------------------


class BuiltinOptions(EngineOptions):
    """Options of the built-in PyTorch engine."""

    fp8_gemm: Literal["auto", "scaled_mm", "emulated"] = Field(
        "auto",
        description=(
            "how FP8 layers compute: scaled_mm (real FP8 tensor-core GEMM, sm_89+), emulated (FP8 "
            "weights and FP8-rounded activations, BF16 math; any device); auto: scaled_mm where supported"
        ),
        json_schema_extra={"cli": "--fp8-gemm"},
    )


register(
    EngineSpec(
        name="builtin",
        description="builtin: PyTorch engine (CPU, and real FP8 GEMMs on Hopper/Ada GPUs)",
        options=BuiltinOptions,
        backend="quant_release.engines.builtin:BuiltinBackend",
        sources=("quant_release.engines.builtin", "quant_release.engines.fp8"),
        packages=("torch", "transformers", "safetensors"),
        requires=("torch", "transformers", "safetensors", "accelerate"),
    )
)


__all__ = [
    "ENGINES",
    "BenchmarkWorkload",
    "BuiltinOptions",
    "EngineBackend",
    "EngineOptions",
    "EngineSpec",
    "LoadedEngine",
    "StepCallback",
    "check_available",
    "engine_spec",
    "get_backend",
    "register",
]
