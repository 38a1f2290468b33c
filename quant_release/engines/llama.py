"""A Llama-family decoder in plain PyTorch: weights, RoPE, and the per-layer math of prefill and decode.

No transformers modules run here: the built-in engine needs control over every tensor (a static KV
cache, fused QKV and gate/up projections, FP8 activation quantization next to the op that produces
the activation) so that `torch.compile` can fuse the small ops and a decode step can be replayed as a
CUDA graph (see `runtime.py`). The math follows transformers' `LlamaForCausalLM` operation for
operation (RMSNorm in fp32, RoPE in the activation dtype, SiLU-gated MLP) so the two agree to BF16
rounding; `tests/unit/test_llama_engine.py` checks that against transformers on real weights.

FP8 layers hold the checkpoint's E4M3 weights and scales as exported by modelopt: a per-tensor
`weight_scale` (or one per output channel), and a static per-tensor `input_scale` (or none: dynamic
per-token activations). Where q/k/v or gate/up are fused into one GEMM, their separate weight scales
become one per-output-channel vector applied after the GEMM, which is exact; their input scales are
one value already (modelopt calibrates layers that share an input together), else the largest is used.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from quant_release.engines.checkpoint import (
    BUILTIN_KV_CACHE_QUANT_ALGOS,
    BUILTIN_QUANT_ALGOS,
    CheckpointError,
    QuantSpec,
    read_config,
    read_quant_spec,
    shard_files,
)
from quant_release.plan import ModelShape, PlanError

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448.0
# Dynamic per-token scales never go below this: an all-zero row must not divide by zero.
MIN_DYNAMIC_SCALE = 1e-12
GemmMode = Literal["scaled_mm", "emulated"]
SUPPORTED_QUANT_ALGOS = BUILTIN_QUANT_ALGOS


# -- shape --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LlamaShape:
    """What the decoder's math needs from config.json."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_positions: int
    tied_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def group(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.heads // self.kv_heads

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str = "config.json") -> LlamaShape:
        architectures = config.get("architectures") or []
        if config.get("model_type") not in (None, "llama") or (
            architectures and "LlamaForCausalLM" not in architectures
        ):
            raise CheckpointError(f"{where}: not a Llama checkpoint ({architectures or config.get('model_type')})")
        if config.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{where}: hidden_act {config['hidden_act']!r} is not supported (silu only)")
        # transformers 5 writes `rope_parameters`; older versions `rope_theta` plus `rope_scaling`.
        rope = dict(config.get("rope_parameters") or {})
        theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
        scaling = dict(config.get("rope_scaling") or rope)
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise CheckpointError(f"{where}: rope type {rope_type!r} is not supported (default, llama3)")
        try:
            sizes = ModelShape.from_hf_config(config)  # the shapes, read as the memory plan reads them
        except PlanError as exc:
            raise CheckpointError(f"{where}: {exc}") from None
        eos = config.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
        return cls(
            hidden=sizes.hidden,
            intermediate=sizes.intermediate,
            layers=sizes.layers,
            heads=sizes.heads,
            kv_heads=sizes.kv_heads,
            head_dim=sizes.head_dim,
            vocab=sizes.vocab,
            rms_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling if rope_type == "llama3" else None,
            max_positions=int(config.get("max_position_embeddings", 2048)),
            tied_embeddings=sizes.tied_embeddings,
            attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            bos_token_id=config.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def rope_inverse_frequencies(shape: LlamaShape) -> torch.Tensor:
    """Per-pair inverse frequencies, as transformers computes them (default and `llama3` scaling)."""
    dim = shape.head_dim
    inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = shape.rope_scaling
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_tables(shape: LlamaShape, positions: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin for positions [0, positions), [positions, head_dim], in BF16 like transformers."""
    inv_freq = rope_inverse_frequencies(shape)
    freqs = torch.arange(positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(torch.bfloat16).to(device), emb.sin().to(torch.bfloat16).to(device)


# -- weights --------------------------------------------------------------------------------------------
@dataclass
class Fp8Weight:
    """An FP8 E4M3 weight [out, in] with its scales.

    `weight_scale`: a scalar (per-tensor) or [out] (per output channel: fused projections, or a
    per-channel scheme). `input_scale`: a scalar for static activation quantization, None for dynamic
    per-token scales. In `emulated` mode `weight` holds the same E4M3 values widened to BF16 (exact).
    """

    weight: torch.Tensor
    weight_scale: torch.Tensor
    input_scale: torch.Tensor | None
    # scaled_mm wants B column-major: the transposed view of the row-major weight.
    weight_t: torch.Tensor = field(init=False)
    # For a per-channel weight scale with a static input scale, the GEMM runs with scale_b = 1 and the
    # channel scales multiply the output (an elementwise op the compiler fuses into its consumer).
    unit_scale: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.weight_t = self.weight.t()
        self.unit_scale = torch.ones((), dtype=torch.float32, device=self.weight.device)

    @property
    def per_channel(self) -> bool:
        return self.weight_scale.numel() > 1


Weight = torch.Tensor | Fp8Weight


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Weight
    o: Weight
    post_norm: torch.Tensor
    gate_up: Weight
    down: Weight
    # FP8 KV cache (kv_cache_quant_algo FP8): keys and values after RoPE are stored as E4M3 of x / scale.
    k_scale: torch.Tensor | None = None
    v_scale: torch.Tensor | None = None


@dataclass
class LlamaWeights:
    shape: LlamaShape
    embed: torch.Tensor
    layers: list[LayerWeights]
    norm: torch.Tensor
    lm_head: torch.Tensor
    gemm: GemmMode | None  # None: a BF16 model
    quant_algo: str | None = None
    kv_cache_quant_algo: str | None = None

    def tensors(self) -> Iterator[torch.Tensor]:
        yield self.embed
        yield self.norm
        if self.lm_head.data_ptr() != self.embed.data_ptr():
            yield self.lm_head
        for layer in self.layers:
            yield layer.input_norm
            yield layer.post_norm
            for scale in (layer.k_scale, layer.v_scale):
                if scale is not None:
                    yield scale
            for weight in (layer.qkv, layer.o, layer.gate_up, layer.down):
                if isinstance(weight, Fp8Weight):
                    yield weight.weight
                    yield weight.weight_scale
                    if weight.input_scale is not None:
                        yield weight.input_scale
                else:
                    yield weight

    def nbytes(self) -> int:
        """Bytes of the weights as held on the device (tied embeddings counted once)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


def read_builtin_quant_spec(checkpoint_dir: Path) -> QuantSpec:
    """The checkpoint's quantization, refused unless the built-in engine computes it faithfully."""
    spec = read_quant_spec(checkpoint_dir)
    if spec.quant_algo not in SUPPORTED_QUANT_ALGOS:
        raise CheckpointError(
            f"{checkpoint_dir}: quant_algo is {spec.quant_algo!r}; the built-in engine runs "
            f"{', '.join(SUPPORTED_QUANT_ALGOS)}"
        )
    if spec.kv_cache_quant_algo is not None and spec.kv_cache_quant_algo not in BUILTIN_KV_CACHE_QUANT_ALGOS:
        raise CheckpointError(
            f"{checkpoint_dir}: KV-cache quantization {spec.kv_cache_quant_algo!r} is not supported by the "
            "built-in engine (FP8 or none); serve it with TensorRT-LLM or vLLM"
        )
    return spec


class TensorSource:
    """Tensors of a (possibly sharded) safetensors checkpoint, read one at a time onto a device."""

    def __init__(self, checkpoint_dir: Path) -> None:
        from safetensors import safe_open

        self.checkpoint_dir = checkpoint_dir
        self._handles: dict[str, Any] = {}
        self._where: dict[str, str] = {}
        for shard in shard_files(checkpoint_dir):
            handle: Any = safe_open(str(shard), framework="pt")
            self._handles[str(shard)] = handle
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
                self._where[key] = str(shard)
        self.unused = set(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def dtype(self, name: str) -> str:
        return str(self._handles[self._where[name]].get_slice(name).get_dtype())

    def get(self, name: str, device: torch.device) -> torch.Tensor:
        if name not in self._where:
            raise CheckpointError(f"{self.checkpoint_dir}: tensor {name} is missing from the checkpoint")
        self.unused.discard(name)
        tensor: torch.Tensor = self._handles[self._where[name]].get_tensor(name)
        return tensor.to(device)


class InMemoryTensors(TensorSource):
    """The same interface over tensors already in memory (benchmarks build real shapes without a disk)."""

    _DTYPES: ClassVar[dict[torch.dtype, str]] = {
        torch.float8_e4m3fn: "F8_E4M3",
        torch.bfloat16: "BF16",
        torch.float16: "F16",
        torch.float32: "F32",
    }

    def __init__(self, tensors: dict[str, torch.Tensor], where: str = "in-memory checkpoint") -> None:
        self.checkpoint_dir = Path(where)
        self._tensors = tensors
        self.unused = set(tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def dtype(self, name: str) -> str:
        return self._DTYPES.get(self._tensors[name].dtype, str(self._tensors[name].dtype))

    def get(self, name: str, device: torch.device) -> torch.Tensor:
        if name not in self._tensors:
            raise CheckpointError(f"{self.checkpoint_dir}: tensor {name} is missing from the checkpoint")
        self.unused.discard(name)
        return self._tensors[name].to(device)


def _excluded(name: str, patterns: tuple[str, ...]) -> bool:
    return any(name == p or fnmatch(name, p) or name.startswith(p + ".") for p in patterns)


def _check_scale(name: str, scale: torch.Tensor, out_features: int | None) -> torch.Tensor:
    if not torch.isfinite(scale).all() or bool((scale <= 0).any()):
        raise CheckpointError(f"{name} holds {scale.flatten()[:4].tolist()}..., not positive finite numbers")
    if scale.numel() == 1:
        return scale.reshape(()).float()
    if out_features is not None and scale.numel() == out_features:
        return scale.reshape(out_features).float()
    raise CheckpointError(f"{name} has shape {tuple(scale.shape)}; expected a scalar or one per output channel")


def _load_linear(
    source: TensorSource, names: list[str], device: torch.device, spec: QuantSpec | None, gemm: GemmMode | None
) -> Weight:
    """One projection; several `names` are fused along the output dimension (q,k,v or gate,up)."""
    dtypes = {source.dtype(f"{n}.weight") for n in names}
    quantized = spec is not None and dtypes == {"F8_E4M3"}
    if spec is not None and not quantized and not all(_excluded(n, spec.exclude_modules) for n in names):
        stored = ", ".join(sorted(dtypes))
        raise CheckpointError(f"layer {names[0]} is not excluded from quantization but is stored as {stored}")
    if not quantized:
        return torch.cat([source.get(f"{n}.weight", device).to(torch.bfloat16) for n in names])
    assert spec is not None and gemm is not None
    parts = [source.get(f"{n}.weight", device) for n in names]
    weight_scales = []
    input_scales = []
    for name, part in zip(names, parts, strict=True):
        if f"{name}.weight_scale" not in source:
            raise CheckpointError(f"layer {name} has an FP8 weight but no weight_scale: checkpoint incomplete")
        scale = _check_scale(f"{name}.weight_scale", source.get(f"{name}.weight_scale", device), part.shape[0])
        weight_scales.append(scale.expand(part.shape[0]) if scale.dim() == 0 else scale)
        if spec.quant_algo == "FP8":
            if f"{name}.input_scale" not in source:
                raise CheckpointError(f"layer {name} has an FP8 weight but no input_scale: checkpoint incomplete")
            input_scales.append(_check_scale(f"{name}.input_scale", source.get(f"{name}.input_scale", device), None))
    channel = torch.cat(weight_scales)
    # Fused projections always carry a per-channel vector, single ones a scalar when they can: every layer
    # then has the same tensor signature, so one compiled program serves them all.
    per_channel = len(names) > 1 or not bool((channel == channel[0]).all())
    weight_scale = channel.contiguous() if per_channel else channel[0].clone()
    input_scale = torch.stack(input_scales).max() if input_scales else None
    weight = torch.cat(parts)
    if gemm == "emulated":
        weight = weight.to(torch.bfloat16)  # exact: every E4M3 value is a BF16 value
    return Fp8Weight(weight=weight, weight_scale=weight_scale, input_scale=input_scale)


def load_weights(checkpoint_dir: Path, device: torch.device, gemm: GemmMode | None) -> LlamaWeights:
    """Load a BF16 checkpoint (`gemm=None`) or a modelopt FP8 checkpoint with its scales."""
    config = read_config(checkpoint_dir)
    spec: QuantSpec | None = None
    if gemm is not None:
        spec = read_builtin_quant_spec(checkpoint_dir)
    elif config.get("quantization_config"):
        raise CheckpointError(f"{checkpoint_dir} is a quantized checkpoint; the bf16 variant needs the original")
    return build_weights(config, TensorSource(checkpoint_dir), device, gemm, spec)


def build_weights(
    config: dict[str, Any], source: TensorSource, device: torch.device, gemm: GemmMode | None, spec: QuantSpec | None
) -> LlamaWeights:
    """The model's weights from checkpoint tensors (names as transformers and modelopt write them)."""
    where = str(source.checkpoint_dir)
    shape = LlamaShape.from_config(config, f"{where}/config.json")
    if shape.attention_bias or shape.mlp_bias:
        raise CheckpointError(f"{where}: projections with bias are not supported by the built-in engine")
    embed = source.get("model.embed_tokens.weight", device).to(torch.bfloat16)
    layers = []
    for index in range(shape.layers):
        prefix = f"model.layers.{index}"
        attn, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"

        def linear(names: list[str]) -> Weight:
            return _load_linear(source, names, device, spec, gemm)

        def kv_scale(name: str) -> torch.Tensor | None:
            if spec is None or spec.kv_cache_quant_algo != "FP8":
                return None
            if name not in source:
                raise CheckpointError(f"{where}: KV-cache quantization is FP8 but {name} is missing")
            return _check_scale(name, source.get(name, device), None)

        layers.append(
            LayerWeights(
                input_norm=source.get(f"{prefix}.input_layernorm.weight", device).to(torch.bfloat16),
                qkv=linear([f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"]),
                o=linear([f"{attn}.o_proj"]),
                post_norm=source.get(f"{prefix}.post_attention_layernorm.weight", device).to(torch.bfloat16),
                gate_up=linear([f"{mlp}.gate_proj", f"{mlp}.up_proj"]),
                down=linear([f"{mlp}.down_proj"]),
                k_scale=kv_scale(f"{attn}.k_proj.k_scale"),
                v_scale=kv_scale(f"{attn}.v_proj.v_scale"),
            )
        )
    norm = source.get("model.norm.weight", device).to(torch.bfloat16)
    if "lm_head.weight" in source:
        lm_head = source.get("lm_head.weight", device).to(torch.bfloat16)
    elif shape.tied_embeddings:
        lm_head = embed
    else:
        raise CheckpointError(f"{where}: no lm_head.weight and the embeddings are not tied")
    # A rotary table saved by old exports is derived data; anything else left over means a model we misread.
    leftovers = sorted(n for n in source.unused if not n.endswith("rotary_emb.inv_freq"))
    if leftovers:
        raise CheckpointError(f"{where}: unexpected tensors, e.g. {leftovers[:3]}")
    if spec is not None and not any(isinstance(layer.qkv, Fp8Weight) for layer in layers):
        raise CheckpointError(f"{where}: no FP8 layers found in the checkpoint")
    return LlamaWeights(
        shape=shape,
        embed=embed,
        layers=layers,
        norm=norm,
        lm_head=lm_head,
        gemm=gemm,
        quant_algo=spec.quant_algo if spec else None,
        kv_cache_quant_algo=spec.kv_cache_quant_algo if spec else None,
    )


def scaled_mm_supported(device: torch.device) -> bool:
    """Real FP8 GEMMs need CUDA compute capability 8.9 (Ada) or 9.0+ (Hopper)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def resolve_gemm(requested: str, device: torch.device) -> GemmMode:
    """`auto` → real FP8 GEMMs where the GPU has them, else emulation; `scaled_mm` elsewhere is an error."""
    if requested == "emulated":
        return "emulated"
    supported = scaled_mm_supported(device)
    if requested == "scaled_mm" and not supported:
        raise CheckpointError(f"fp8_gemm=scaled_mm needs a CUDA GPU with compute capability >= 8.9; device is {device}")
    return "scaled_mm" if supported else "emulated"


# -- math -----------------------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalize in fp32, cast back, then scale."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def quantize_static(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-tensor E4M3: x / scale, saturated to ±448, rounded to the FP8 grid."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-row E4M3 with its [rows, 1] fp32 scales."""
    x32 = x.float()
    scale = (x32.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp(min=MIN_DYNAMIC_SCALE)
    return (x32 / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE), scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., head_dim] rotated by cos/sin broadcast to it (transformers' rotate_half convention)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
