"""Versions of everything that shapes a result, and the device a run computes on."""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import platform
import re
from pathlib import Path

from quant_release.errors import EngineUnavailableError

PACKAGES = (
    "quant-release",
    "torch",
    "transformers",
    "nvidia-modelopt",
    "safetensors",
    "huggingface_hub",
    "prefect",
    "mlflow",
    "accelerate",
    "gguf",
)


@functools.cache
def package_version(name: str) -> str:
    """The installed version of distribution `name`, or "not installed"."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def package_versions() -> dict[str, str]:
    return {"python": platform.python_version(), **{name: package_version(name) for name in PACKAGES}}


def resolved_device(requested: str) -> str:
    """`auto` → `cuda` when PyTorch sees a GPU, else `cpu`; `cuda` without a GPU is an EngineUnavailableError.

    The one place that decides the device: preflight resolves it once per run (it is part of cache
    keys), and engines resolve the device recorded in their handles through it too.
    """
    if requested == "cpu":
        return "cpu"
    if not torch_built_for_gpu():
        # Without importing torch (seconds, for a run that may be all cached): a CPU build sees no GPU.
        if requested == "cuda":
            raise EngineUnavailableError("device=cuda was requested but the installed PyTorch is a CPU-only build")
        return "cpu"
    import torch

    available = torch.cuda.is_available()
    if requested == "cuda" and not available:
        raise EngineUnavailableError("device=cuda was requested but PyTorch sees no CUDA GPU")
    return "cuda" if available else "cpu"


def torch_built_for_gpu() -> bool:
    """Whether the installed torch is a CUDA (or ROCm) build, read from torch/version.py without importing
    torch. True when in doubt: the caller then imports torch and asks it."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return True
    try:
        text = (Path(next(iter(spec.submodule_search_locations))) / "version.py").read_text()
    except OSError:
        return True
    builds = re.findall(r"^(?:cuda|hip)\s*(?::[^=]*)?=\s*(.+?)\s*$", text, flags=re.MULTILINE)
    return not builds or any(value != "None" for value in builds)
