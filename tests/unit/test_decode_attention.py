"""The Triton decode-attention kernel, run by Triton's CPU interpreter, against the PyTorch reference.

The interpreter executes the kernel's program logic (indexing, split plan, online softmax, RoPE, the
fused cache write and FP8 output) on numpy; on a GPU the same kernel is checked against the same
reference by benchmarks/engine_speed.py. Two interpreter limits shape the tolerances: it multiplies
BF16 tiles in fp32 (numpy has no BF16) and rounds fp32 to BF16 by truncation, not to nearest. Its
fp32 → FP8 cast is wrong too (ties away from zero, a lost carry at powers of two); the kernel rounds
to the E4M3 grid itself there, so FP8 cache writes must match PyTorch's bit for bit.
"""

from __future__ import annotations

import os

import pytest
import torch

from quant_release.engines.attention import (
    DecodeAttention,
    KvScales,
    decode_attention_torch,
    dequantize_kv,
    quantize_kv,
    split_plan,
)
from quant_release.engines.llama import FP8_DTYPE, apply_rope, quantize_static

# Before Triton is first imported: its kernels are built for the interpreter only if this is set then.
# Nothing else in the suite launches Triton kernels on the CPU, so setting it for the process is harmless.
os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

CPU = torch.device("cpu")
HEADS, KV_HEADS, HEAD_DIM, MAX_LEN = 8, 2, 32, 256


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _case(positions: list[int], scaled: bool, fp8_cache: bool = False) -> dict[str, torch.Tensor | None]:
    generator = torch.Generator().manual_seed(len(positions) + 10 * scaled)
    batch, width = len(positions), (HEADS + 2 * KV_HEADS) * HEAD_DIM
    angles = torch.randn(MAX_LEN, HEAD_DIM // 2, generator=generator)
    case = {
        "qkv": torch.randn(batch, width, generator=generator).to(torch.bfloat16),
        "col_scale": torch.rand(width, generator=generator) + 0.5 if scaled else None,
        "cos": torch.cat([angles.cos()] * 2, -1).to(torch.bfloat16),
        "sin": torch.cat([angles.sin()] * 2, -1).to(torch.bfloat16),
        "k_cache": torch.randn(batch, KV_HEADS, MAX_LEN, HEAD_DIM, generator=generator).to(torch.bfloat16),
        "v_cache": torch.randn(batch, KV_HEADS, MAX_LEN, HEAD_DIM, generator=generator).to(torch.bfloat16),
        "positions": torch.tensor(positions),
        "k_scale": None,
        "v_scale": None,
    }
    if fp8_cache:  # scales as calibration would give them (amax / 448), different for K and V
        case["k_scale"], case["v_scale"] = torch.tensor(5.0 / 448), torch.tensor(3.5 / 448)
        case["k_cache"] = quantize_kv(case["k_cache"], case["k_scale"])  # type: ignore[arg-type]
        case["v_cache"] = quantize_kv(case["v_cache"], case["v_scale"])  # type: ignore[arg-type]
    return case


def _scales(case: dict[str, torch.Tensor | None]) -> KvScales | None:
    k_scale, v_scale = case["k_scale"], case["v_scale"]
    return None if k_scale is None or v_scale is None else (k_scale, v_scale)


def _reference(case: dict[str, torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    qkv, col = case["qkv"], case["col_scale"]
    assert qkv is not None and case["positions"] is not None
    x = (qkv.float() * col).to(torch.bfloat16) if col is not None else qkv
    batch = qkv.shape[0]
    q = x[:, : HEADS * HEAD_DIM].view(batch, HEADS, HEAD_DIM)
    k = x[:, HEADS * HEAD_DIM : (HEADS + KV_HEADS) * HEAD_DIM].view(batch, KV_HEADS, HEAD_DIM)
    v = x[:, (HEADS + KV_HEADS) * HEAD_DIM :].reshape(batch, KV_HEADS, HEAD_DIM)
    positions = case["positions"]
    assert case["cos"] is not None and case["sin"] is not None
    cos, sin = case["cos"][positions][:, None], case["sin"][positions][:, None]
    k_cache, v_cache = case["k_cache"].clone(), case["v_cache"].clone()  # type: ignore[union-attr]
    out = decode_attention_torch(
        apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, k_cache, v_cache, positions, _scales(case)
    )
    return out, k_cache, v_cache


def _run(
    case: dict[str, torch.Tensor | None], plan_batch: int, out_scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    batch = case["qkv"].shape[0]  # type: ignore[union-attr]
    attention = DecodeAttention(plan_batch, HEADS, KV_HEADS, HEAD_DIM, MAX_LEN, CPU)
    attention.acc = torch.empty(batch * HEADS * attention.num_splits, HEAD_DIM)
    attention.stats = torch.empty(batch * HEADS * attention.num_splits, 2)
    k_cache, v_cache = case["k_cache"].clone(), case["v_cache"].clone()  # type: ignore[union-attr]
    out = attention(
        case["qkv"],  # type: ignore[arg-type]
        case["col_scale"],
        case["cos"],  # type: ignore[arg-type]
        case["sin"],  # type: ignore[arg-type]
        k_cache,
        v_cache,
        case["positions"],  # type: ignore[arg-type]
        out_scale,
        _scales(case),
    )
    return out, k_cache, v_cache, attention.num_splits


@pytest.mark.parametrize("scaled", [False, True], ids=["bf16-qkv", "fp8-channel-scales"])
@pytest.mark.parametrize("plan_batch", [1, 64], ids=["split", "one-pass"])
def test_kernel_matches_reference(scaled: bool, plan_batch: int) -> None:
    case = _case([0, 1, 31, 32, 100, 255], scaled)
    expected, k_ref, v_ref = _reference(case)
    out, k_cache, v_cache, splits = _run(case, plan_batch)
    assert (splits > 1) == (plan_batch == 1)
    assert _rel_error(out.view_as(expected), expected) < 2e-2
    # The new token's K (rotated) and V land in each slot's cache at its position, nowhere else.
    positions = case["positions"]
    assert positions is not None
    for slot, pos in enumerate(positions.tolist()):
        assert _rel_error(k_cache[slot, :, pos], k_ref[slot, :, pos]) < 2e-2
        assert _rel_error(v_cache[slot, :, pos], v_ref[slot, :, pos]) < 2e-2
        untouched = torch.ones(MAX_LEN, dtype=torch.bool)
        untouched[pos] = False
        assert torch.equal(k_cache[slot, :, untouched], case["k_cache"][slot, :, untouched])  # type: ignore[index]


@pytest.mark.parametrize("scaled", [False, True], ids=["bf16-qkv", "fp8-channel-scales"])
@pytest.mark.parametrize("plan_batch", [1, 64], ids=["split", "one-pass"])
def test_kernel_with_fp8_cache_matches_reference(scaled: bool, plan_batch: int) -> None:
    """An FP8 KV cache: the kernel stores the new K/V as E4M3 codes and attends codes times scales."""
    case = _case([0, 1, 31, 32, 100, 255], scaled, fp8_cache=True)
    expected, k_ref, v_ref = _reference(case)
    out, k_cache, v_cache, _ = _run(case, plan_batch)
    assert k_cache.dtype == v_cache.dtype == FP8_DTYPE
    # Same tolerance as the BF16 cache: the kernel folds the scales into scores and output instead of
    # rounding each dequantized element to BF16, a difference far below the FP8 step.
    assert _rel_error(out.view_as(expected), expected) < 2e-2
    k_scale, v_scale = case["k_scale"], case["v_scale"]
    assert k_scale is not None and v_scale is not None and case["positions"] is not None
    for slot, pos in enumerate(case["positions"].tolist()):
        k_got, k_want = dequantize_kv(k_cache[slot, :, pos], k_scale), dequantize_kv(k_ref[slot, :, pos], k_scale)
        # K went through RoPE's BF16 roundings, which the interpreter truncates: a code may differ by one step.
        assert _rel_error(k_got, k_want) < 5e-2
        if not scaled:  # V comes straight from the projection output: the same codes, bit for bit
            assert torch.equal(v_cache[slot, :, pos].view(torch.uint8), v_ref[slot, :, pos].view(torch.uint8))
        untouched = torch.ones(MAX_LEN, dtype=torch.bool)
        untouched[pos] = False
        before = case["k_cache"][slot, :, untouched].view(torch.uint8)  # type: ignore[index]
        assert torch.equal(k_cache[slot, :, untouched].view(torch.uint8), before)


def test_fp8_cache_write_rounds_to_nearest_even_and_saturates() -> None:
    """The cases the interpreter's own fp32 → FP8 cast gets wrong, written through the kernel."""
    case = _case([5, 40], scaled=False, fp8_cache=True)
    case["v_scale"] = torch.tensor(1.0)
    # 31.75 rounds up across a power of two (to 32); 6.25 and -6.25 are ties (to 6.0 and -6.0, even);
    # 1000 saturates at 448; 2**-10 is an E4M3 subnormal; -0.0 keeps its sign.
    tricky = torch.tensor([31.75, 6.25, -6.25, 1000.0, -1000.0, 2.0**-10, -0.0, 0.3])
    qkv = case["qkv"]
    assert qkv is not None
    v_columns = slice((HEADS + KV_HEADS) * HEAD_DIM, None)
    qkv[:, v_columns] = tricky.repeat(KV_HEADS * HEAD_DIM // len(tricky)).to(torch.bfloat16)
    _, _, v_cache, _ = _run(case, 1)
    expected = quantize_kv(qkv[:, v_columns].view(2, KV_HEADS, HEAD_DIM), torch.tensor(1.0))
    for slot, pos in enumerate([5, 40]):
        assert torch.equal(v_cache[slot, :, pos].view(torch.uint8), expected[slot].view(torch.uint8))
    assert expected[0, 0, :4].float().tolist() == [32.0, 6.0, -6.0, 448.0]


def test_fp8_output_is_the_quantized_attention() -> None:
    case = _case([3, 77, 200], scaled=False)
    expected, _, _ = _reference(case)
    scale = torch.tensor(0.01)
    out, _, _, _ = _run(case, 1, scale)
    assert out.dtype == torch.float8_e4m3fn
    assert _rel_error(out.float(), quantize_static(expected.reshape(3, -1), scale).float()) < 5e-2


@pytest.mark.parametrize(
    ("batch", "kv_heads", "max_len", "processors", "expected"),
    [(64, 8, 768, 132, (1, 768)), (1, 8, 768, 132, (24, 32)), (8, 8, 768, 132, (5, 160))],
)
def test_split_plan_fills_the_gpu_and_covers_the_cache(
    batch: int, kv_heads: int, max_len: int, processors: int, expected: tuple[int, int]
) -> None:
    splits, tokens = split_plan(batch, kv_heads, max_len, processors)
    assert (splits, tokens) == expected
    assert splits * tokens >= max_len and tokens % 32 == 0


@pytest.mark.parametrize(
    ("fp8", "kv_cache"), [(False, False), (True, False), (True, True)], ids=["bf16", "fp8", "fp8-kv"]
)
def test_runtime_decode_with_the_kernel_matches_pytorch(
    tmp_path_factory: pytest.TempPathFactory, fp8: bool, kv_cache: bool
) -> None:
    """The whole decode step with the kernel wired in: raw QKV in, channel scales, per-layer o_proj input
    scales, and per-layer KV-cache scales for a checkpoint exported with an FP8 KV cache."""
    from quant_release.engines.llama import load_weights
    from quant_release.engines.runtime import LlamaRuntime, RuntimeOptions
    from tests.support.tiny import make_fp8_checkpoint, make_tiny_llama

    root = tmp_path_factory.mktemp("kernel-runtime")
    model_dir = make_tiny_llama(root / "bf16", gain=1.0)
    if fp8:
        model_dir = make_fp8_checkpoint(model_dir, root / "fp8", kv_cache=kv_cache)
    weights = load_weights(model_dir, CPU, "scaled_mm" if fp8 else None)  # torch._scaled_mm runs on the CPU too
    rows = [list(range(5, 40)), list(range(9, 17)), list(range(3, 25))]
    logits = {}
    for attention in ("triton", "torch"):
        runtime = LlamaRuntime(weights, CPU, RuntimeOptions(compile=False, cuda_graphs=False, attention=attention))
        runtime.reserve(3, 64)
        assert runtime.kv_dtype == (FP8_DTYPE if kv_cache else torch.bfloat16)
        runtime.prefill(rows, [0, 1, 2])
        runtime.active[:3] = 1
        runtime.decode(3)
        logits[attention] = runtime.decode(3).float()
    # FP8 rounds each activation to 3 mantissa bits; the interpreter's truncating BF16 rounding flips some.
    assert _rel_error(logits["triton"], logits["torch"]) < (0.2 if fp8 else 2e-2)
