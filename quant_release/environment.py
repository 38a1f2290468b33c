"""Versions of everything that shapes a result, recorded with every run for reproducibility."""

from __future__ import annotations

import importlib.metadata
import platform

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


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def resolved_device(requested: str) -> str:
    """`auto` → `cuda` when PyTorch sees a GPU, else `cpu` (checked once per run, part of cache keys)."""
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
