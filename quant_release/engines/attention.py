"""Attention over the static KV cache: prefill (many query tokens) and decode (one query token per slot).

Decode is where a static cache costs: its buffers are sized for the longest sequence, but a slot holds
fewer tokens. `DecodeAttention` (Triton) reads only each slot's valid keys (split-KV, "flash decoding"), takes
all query heads of a GQA group in one program so K and V are read once, and does the small ops
around attention in the same kernel: the per-channel scales of a fused FP8 QKV projection, RoPE, the
cache write of the new token, and, for an FP8 model, the quantization of its output for `o_proj`.
`decode_attention_torch` is the reference and the CPU path.

Cache layout, per layer: [slots, kv_heads, max_len, head_dim], BF16, or FP8 E4M3 for a checkpoint
exported with `kv_cache_quant_algo: FP8`. An FP8 cache follows modelopt's KV quantizers, which sit on
the keys after RoPE and on the values as attention reads them: the cache holds E4M3(x / scale)
(saturated at ±448) with the export's per-layer `k_scale` / `v_scale` (calibrated amax / 448), and
attention reads x = cache * scale, in BF16 as modelopt's fake-quantized model computes it.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)
# Cache lengths are reserved in multiples of this; keys are read in blocks of BLOCK_KEYS.
SPLIT_TOKENS = 128
BLOCK_KEYS = 32
# A layer's (k_scale, v_scale), fp32 scalars, when its KV cache is FP8.
KvScales = tuple[torch.Tensor, torch.Tensor]


def quantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Keys or values → the FP8 cache's E4M3 codes: x / scale, saturated to ±448, rounded to nearest even."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """FP8 cache codes → BF16 keys or values (modelopt's fake quantization returns the input dtype)."""
    return (x.float() * scale).to(torch.bfloat16)


def as_bytes(cache: torch.Tensor) -> torch.Tensor:
    """An FP8 tensor as its raw bytes, for indexed reads and writes; other tensors unchanged.

    Advanced indexing (index, index_put) is not implemented for float8 on every device and torch
    version; on uint8 it is, and moving the bytes moves the same E4M3 values.
    """
    return cache.view(torch.uint8) if cache.dtype == FP8_DTYPE else cache


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """q [B, H, T, D] at positions start..start+T-1; k, v [B, KVH, start+T, D] (keys from position 0).

    Causal, aligned to the bottom right: query i sees keys 0..start+i. Right-padded rows need no
    extra mask: a valid query never reaches a padded key, which sits after it.
    """
    if start == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    t, s = q.shape[2], k.shape[2]
    allowed = torch.arange(s, device=q.device)[None, :] <= torch.arange(start, start + t, device=q.device)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)


def write_decode_kv(
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    kv_scales: KvScales | None = None,
) -> None:
    """k_new, v_new [B, KVH, D] into the first B slots at each slot's position (quantized for an FP8 cache)."""
    batch, kv_heads, _ = k_new.shape
    slots = torch.arange(batch, device=k_new.device)[:, None]
    heads = torch.arange(kv_heads, device=k_new.device)[None, :]
    pos = positions[:batch, None]
    if kv_scales is not None:
        k_new, v_new = quantize_kv(k_new, kv_scales[0]), quantize_kv(v_new, kv_scales[1])
    as_bytes(k_cache)[slots, heads, pos] = as_bytes(k_new)
    as_bytes(v_cache)[slots, heads, pos] = as_bytes(v_new)


def decode_attention_torch(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    kv_scales: KvScales | None = None,
) -> torch.Tensor:
    """One query token per slot at `positions` [B]; attends keys 0..position. Returns [B, H, D].

    Writes k_new/v_new into the cache first, so with an FP8 cache the new token, too, is attended
    as it was quantized (as modelopt's model attends all keys through its KV quantizers).
    """
    write_decode_kv(k_new, v_new, k_cache, v_cache, positions, kv_scales)
    batch = q.shape[0]
    pos = positions[:batch]
    # Read only up to the longest slot (a host sync: this is the CPU path). When all slots are at the
    # same position no mask is needed, and the kernel then does exactly what transformers' decode does.
    longest = int(pos.max()) + 1
    keys, values = k_cache[:batch, :, :longest], v_cache[:batch, :, :longest]
    if kv_scales is not None:
        keys, values = dequantize_kv(keys, kv_scales[0]), dequantize_kv(values, kv_scales[1])
    mask = None
    if bool((pos != pos[0]).any()):
        mask = (torch.arange(longest, device=q.device)[None, :] <= pos[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q[:, :, None, :], keys, values, attn_mask=mask, enable_gqa=True)
    return out[:, :, 0, :]


def triton_available(device: torch.device) -> bool:
    """Triton kernels run on CUDA devices, and on the CPU under Triton's interpreter (tests)."""
    if device.type != "cuda" and not _interpreted():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_fp8_supported(device: torch.device) -> bool:
    """Triton loads and stores E4M3 (`fp8e4nv`, an FP8 KV cache) on compute capability 8.9+ and in its interpreter."""
    if device.type != "cuda":
        return _interpreted()
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _interpreted() -> bool:
    """Triton's CPU interpreter (tests) cannot loop to a bound loaded from memory; the GPU path does."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels() -> Any:
    """Imported on first use: this module must import without Triton (CPU hosts have none)."""
    from quant_release.engines import triton_kernels

    return triton_kernels


def split_plan(batch: int, kv_heads: int, max_len: int, processors: int) -> tuple[int, int]:
    """(splits, tokens per split) for a decode batch: enough programs to fill the GPU, one pass if possible.

    At large batches every (slot, KV head) program already has a multiprocessor's worth of company, and
    one pass per program needs no second kernel to combine partial results; at batch 1 the keys of each
    head are spread over up to 64 programs.
    """
    programs = batch * kv_heads
    splits = 1 if programs >= processors else min(64, -(-2 * processors // programs))
    tokens = max(BLOCK_KEYS, BLOCK_KEYS * -(-max_len // (splits * BLOCK_KEYS)))
    return -(-max_len // tokens), tokens


class DecodeAttention:
    """Decode attention for one batch size, with its scratch preallocated (CUDA-graph safe).

    Takes the QKV projection's raw output (and, for a fused FP8 projection, its per-channel scales):
    scaling, RoPE and the cache write of the new token happen inside the kernel. With an FP8 cache the
    kernel quantizes the new K/V as `quantize_kv` does and reads E4M3 keys and values, folding the
    scales into the scores (k_scale) and the output (v_scale) instead of dequantizing every element.
    """

    def __init__(self, batch: int, heads: int, kv_heads: int, head_dim: int, max_len: int, device: torch.device):
        processors = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.num_splits, self.split_tokens = split_plan(batch, kv_heads, max_len, processors)
        rows = batch * heads * self.num_splits
        self.acc = torch.empty(rows, head_dim, dtype=torch.float32, device=device)
        self.stats = torch.empty(rows, 2, dtype=torch.float32, device=device)
        self.block_splits = max(2, 1 << (self.num_splits - 1).bit_length())
        self.dummy = torch.ones(1, dtype=torch.float32, device=device)

    def __call__(
        self,
        qkv: torch.Tensor,
        col_scale: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        positions: torch.Tensor,
        out_scale: torch.Tensor | None = None,
        kv_scales: KvScales | None = None,
    ) -> torch.Tensor:
        """qkv [B, (H + 2*KVH) * D]; cos/sin tables [max_len, D]. Returns [B, H*D], FP8 with `out_scale`.

        `kv_scales`: the layer's (k_scale, v_scale) when `k_cache` / `v_cache` are FP8.
        """
        if (kv_scales is not None) != (k_cache.dtype == FP8_DTYPE) or k_cache.dtype != v_cache.dtype:
            raise ValueError(f"a {k_cache.dtype} KV cache with kv_scales {'given' if kv_scales else 'missing'}")
        kernels = _kernels()
        batch = qkv.shape[0]
        group = self.heads // self.kv_heads
        out = torch.empty(
            batch,
            self.heads * self.head_dim,
            dtype=FP8_DTYPE if out_scale is not None else torch.bfloat16,
            device=qkv.device,
        )
        single = self.num_splits == 1
        out_scale_arg = out_scale if out_scale is not None else self.dummy
        kernels.attend_kernel[(batch, self.kv_heads, self.num_splits)](
            qkv,
            col_scale if col_scale is not None else self.dummy,
            cos,
            sin,
            k_cache,
            v_cache,
            positions,
            out,
            out_scale_arg,
            kv_scales[0] if kv_scales is not None else self.dummy,
            kv_scales[1] if kv_scales is not None else self.dummy,
            self.acc,
            self.stats,
            1.0 / math.sqrt(self.head_dim),
            qkv.stride(0),
            k_cache.stride(0),
            k_cache.stride(1),
            self.num_splits,
            self.split_tokens,
            kv_heads=self.kv_heads,
            group=group,
            block_group=max(16, 1 << (group - 1).bit_length()),
            head_dim=self.head_dim,
            block_keys=BLOCK_KEYS,
            max_blocks=self.split_tokens // BLOCK_KEYS,
            scaled=col_scale is not None,
            single=single,
            quantize=out_scale is not None,
            fp8_cache=kv_scales is not None,
            dynamic_bounds=not _interpreted(),
            emulate_fp8_rounding=_interpreted(),
            fp8_max=FP8_MAX,
        )
        if not single:
            kernels.combine_kernel[(batch * self.heads,)](
                self.acc,
                self.stats,
                out,
                out_scale_arg,
                self.num_splits,
                head_dim=self.head_dim,
                block_splits=self.block_splits,
                quantize=out_scale is not None,
                fp8_max=FP8_MAX,
            )
        return out
