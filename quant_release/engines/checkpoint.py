"""Reading a checkpoint's configuration and its modelopt quantization section, without torch.

Every engine needs this before it loads weights (and the build stage before it builds an engine); the
built-in engine adds what it cannot compute (`llama.read_builtin_quant_spec`), TensorRT-LLM and vLLM
take whatever modelopt exported.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quant_release.errors import QuantReleaseError

# What the built-in engine computes faithfully (modelopt's exported names). Here, not in llama.py, so that
# the engine registry and preflight can read them without importing torch.
BUILTIN_QUANT_ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN")
BUILTIN_KV_CACHE_QUANT_ALGOS = ("FP8",)


class CheckpointError(QuantReleaseError):
    """The checkpoint is not one the engine can load faithfully."""


@dataclass(frozen=True)
class QuantSpec:
    """The quantization section of a modelopt checkpoint (`hf_quant_config.json`)."""

    quant_algo: str
    kv_cache_quant_algo: str | None
    exclude_modules: tuple[str, ...]
    producer: str


def read_quant_spec(checkpoint_dir: Path) -> QuantSpec:
    """The quantization section of `hf_quant_config.json` (or of config.json's quantization_config)."""
    hf_quant = checkpoint_dir / "hf_quant_config.json"
    producer = "unknown"
    if hf_quant.is_file():
        raw = json.loads(hf_quant.read_text())
        section = raw.get("quantization", {})
        info = raw.get("producer", {})
        producer = f"{info.get('name', 'unknown')} {info.get('version', '')}".strip()
    else:
        config = read_config(checkpoint_dir)
        section = config.get("quantization_config") or {}
        if section.get("quant_method") != "modelopt":
            raise CheckpointError(f"{checkpoint_dir} is not a modelopt checkpoint (no hf_quant_config.json)")
        section = {**section, "exclude_modules": section.get("ignore", section.get("exclude_modules", []))}
    algo = section.get("quant_algo")
    if not isinstance(algo, str) or not algo:
        raise CheckpointError(f"{checkpoint_dir}: the quantization config names no quant_algo")
    return QuantSpec(
        quant_algo=algo,
        kv_cache_quant_algo=section.get("kv_cache_quant_algo"),
        exclude_modules=tuple(section.get("exclude_modules") or ()),
        producer=producer,
    )


def read_config(checkpoint_dir: Path) -> dict[str, Any]:
    path = checkpoint_dir / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is missing or not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return data


def shard_files(checkpoint_dir: Path) -> list[Path]:
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [checkpoint_dir / name for name in names]
    shards = sorted(checkpoint_dir.glob("*.safetensors"))
    if not shards:
        raise CheckpointError(f"{checkpoint_dir} holds no .safetensors files")
    return shards
