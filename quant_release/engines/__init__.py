"""Engines behind one interface (`base.EngineBackend` / `base.LoadedEngine`), chosen by `engine.kind`.

Only the built-in PyTorch engine exists so far. TensorRT-LLM and vLLM plug in here as further
backends: a module each, registered in `_BACKENDS`, and a new literal in `EngineConfig.kind`.
"""

from __future__ import annotations

from collections.abc import Callable

from quant_release.engines.base import BenchmarkRequest, BenchmarkWorkload, EngineBackend, LoadedEngine, StepCallback


def _builtin() -> EngineBackend:
    from quant_release.engines.builtin import BuiltinBackend

    return BuiltinBackend()


# Imported lazily: an engine's package (torch, tensorrt_llm, vllm) loads only when it is chosen.
_BACKENDS: dict[str, Callable[[], EngineBackend]] = {"builtin": _builtin}


def get_backend(kind: str) -> EngineBackend:
    try:
        factory = _BACKENDS[kind]
    except KeyError:
        raise ValueError(f"unknown engine kind {kind!r}; known: {', '.join(sorted(_BACKENDS))}") from None
    return factory()


__all__ = ["BenchmarkRequest", "BenchmarkWorkload", "EngineBackend", "LoadedEngine", "StepCallback", "get_backend"]
