"""Triton kernels of the built-in engine (imported only where Triton and a GPU exist; see `attention.py`)."""

from __future__ import annotations

from typing import Any

import triton
import triton.language as tl


@triton.jit
def load_rotated(
    qkv_ptr, col_scale_ptr, cos, sin, row, head, offs_d, rows_mask, head_dim: tl.constexpr, scaled: tl.constexpr
) -> Any:
    """Rows `head` of one token's QKV projection output, channel-scaled and rotated (RoPE), in BF16.

    Rounds where transformers rounds: the scaled projection to BF16, then x*cos, rot(x)*sin and
    their sum each to BF16.
    """
    half: tl.constexpr = head_dim // 2
    partner = (offs_d + half) % head_dim
    cols = head[:, None] * head_dim + offs_d[None, :]
    partner_cols = head[:, None] * head_dim + partner[None, :]
    x = tl.load(qkv_ptr + row + cols, mask=rows_mask[:, None], other=0.0).to(tl.float32)
    x_partner = tl.load(qkv_ptr + row + partner_cols, mask=rows_mask[:, None], other=0.0).to(tl.float32)
    if scaled:
        x = x * tl.load(col_scale_ptr + cols, mask=rows_mask[:, None], other=0.0)
        x_partner = x_partner * tl.load(col_scale_ptr + partner_cols, mask=rows_mask[:, None], other=0.0)
        x = x.to(tl.bfloat16).to(tl.float32)
        x_partner = x_partner.to(tl.bfloat16).to(tl.float32)
    rotated = tl.where(offs_d[None, :] < half, -x_partner, x_partner)
    first = (x * cos[None, :]).to(tl.bfloat16).to(tl.float32)
    second = (rotated * sin[None, :]).to(tl.bfloat16).to(tl.float32)
    return (first + second).to(tl.bfloat16)


@triton.jit
def round_to_e4m3(x) -> Any:
    """fp32 x (|x| <= 448) rounded to the nearest E4M3 value, ties to even, in fp32 arithmetic.

    Only for Triton's CPU interpreter: its fp32 → fp8 cast rounds ties away from zero and drops the
    carry when rounding up crosses a power of two (31.9 becomes 16, not 32); a value already on the
    E4M3 grid it converts exactly. A GPU's conversion instruction rounds correctly by itself.
    """
    magnitude = tl.abs(x)
    exponent = ((magnitude.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    # log2 of E4M3's spacing at this magnitude: 3 mantissa bits, fixed below 2**-6 (subnormals).
    spacing = tl.maximum(exponent, -6) - 3
    # 1.5 * 2**(spacing + 23) lies in the binade whose fp32 spacing is 2**spacing: adding it and taking
    # it away again leaves the value rounded (to nearest even) to a multiple of 2**spacing.
    magic = ((spacing + 23 + 127) << 23).to(tl.float32, bitcast=True) * 1.5
    rounded = (magnitude + magic) - magic
    # Multiplying by the sign keeps -0.0 (negation is 0 - x in Triton, which gives +0.0).
    return rounded * tl.where(x.to(tl.int32, bitcast=True) < 0, -1.0, 1.0)


@triton.jit
def quantize_kv(x, scale, fp8_max: tl.constexpr, emulate_rounding: tl.constexpr) -> Any:
    """fp32 keys or values → E4M3 codes of x / scale, saturated to ±fp8_max (`attention.quantize_kv`)."""
    x = tl.clamp(x / scale, -fp8_max, fp8_max)
    if emulate_rounding:
        x = round_to_e4m3(x)
    return x.to(tl.float8e4nv)


@triton.jit
def attend_block(
    q,
    k_ptr,
    v_ptr,
    cache_base,
    n0,
    last,
    offs_n,
    offs_d,
    scale,
    m_i,
    l_i,
    acc,
    head_dim: tl.constexpr,
    interpreted: tl.constexpr,
    fp8_cache: tl.constexpr,
) -> Any:
    """Online-softmax update of one block of cached keys [n0, n0 + block) (keys at or past `last` masked).

    `interpreted`: Triton's CPU interpreter multiplies BF16 tiles wrongly (numpy has no BF16), so
    there the products run in fp32; on a GPU they are BF16 tensor-core products with fp32 accumulation.
    An FP8 cache's E4M3 codes widen to FP16 exactly and in one instruction on sm_89+ (to BF16 they go
    through FP32: measured 1.37x slower attention on an H200 at batch 64), so its products run in
    FP16 (q and the probabilities fit FP16's range); `scale` then includes k_scale, and the caller
    multiplies the output by v_scale.
    """
    cols = n0 + offs_n
    n_mask = cols < last
    k = tl.load(k_ptr + cache_base + cols[:, None] * head_dim + offs_d[None, :], mask=n_mask[:, None], other=0.0)
    if interpreted:
        scores = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
    elif fp8_cache:
        scores = tl.dot(q.to(tl.float16), tl.trans(k.to(tl.float16))) * scale
    else:
        scores = tl.dot(q, tl.trans(k.to(tl.bfloat16))) * scale
    scores = tl.where(n_mask[None, :], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    # A block with no valid key (static bounds only) leaves everything as it was.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(scores - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    v = tl.load(v_ptr + cache_base + cols[:, None] * head_dim + offs_d[None, :], mask=n_mask[:, None], other=0.0)
    if interpreted:
        update = tl.dot(p.to(tl.bfloat16).to(tl.float32), v.to(tl.float32), input_precision="ieee")
    elif fp8_cache:
        update = tl.dot(p.to(tl.float16), v.to(tl.float16))
    else:
        update = tl.dot(p.to(tl.bfloat16), v.to(tl.bfloat16))
    return m_new, l_i * alpha + tl.sum(p, 1), acc * alpha[:, None] + update


@triton.jit
def attend_kernel(
    qkv_ptr,
    col_scale_ptr,
    cos_ptr,
    sin_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    out_ptr,
    out_scale_ptr,
    k_scale_ptr,
    v_scale_ptr,
    acc_ptr,
    stats_ptr,
    scale,
    stride_qkv,
    stride_cache_slot,
    stride_cache_head,
    num_splits,
    split_tokens,
    kv_heads: tl.constexpr,
    group: tl.constexpr,
    block_group: tl.constexpr,
    head_dim: tl.constexpr,
    block_keys: tl.constexpr,
    max_blocks: tl.constexpr,
    scaled: tl.constexpr,
    single: tl.constexpr,
    quantize: tl.constexpr,
    fp8_cache: tl.constexpr,
    dynamic_bounds: tl.constexpr,
    emulate_fp8_rounding: tl.constexpr,
    fp8_max: tl.constexpr,
) -> None:
    slot = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    heads: tl.constexpr = kv_heads * group
    pos = tl.load(pos_ptr + slot)  # the new token's position; keys 0..pos-1 are in the cache
    offs_g = tl.arange(0, block_group)
    offs_d = tl.arange(0, head_dim)
    offs_n = tl.arange(0, block_keys)
    g_mask = offs_g < group
    row = slot * stride_qkv
    cos = tl.load(cos_ptr + pos * head_dim + offs_d).to(tl.float32)
    sin = tl.load(sin_ptr + pos * head_dim + offs_d).to(tl.float32)
    q = load_rotated(qkv_ptr, col_scale_ptr, cos, sin, row, kv_head * group + offs_g, offs_d, g_mask, head_dim, scaled)
    cache_base = slot * stride_cache_slot + kv_head * stride_cache_head
    m_i = tl.full([block_group], float("-inf"), tl.float32)
    l_i = tl.zeros([block_group], tl.float32)
    acc = tl.zeros([block_group, head_dim], tl.float32)
    first = split * split_tokens
    last = tl.minimum(first + split_tokens, pos)
    # With an FP8 cache, scores and values are accumulated in units of the stored codes: q·k_code
    # times scale·k_scale, and acc = Σ p·v_code, multiplied by v_scale before it is stored.
    qk_scale = scale
    if fp8_cache:
        qk_scale = scale * tl.load(k_scale_ptr)
    if dynamic_bounds:
        for n0 in range(first, last, block_keys):
            m_i, l_i, acc = attend_block(
                q,
                k_ptr,
                v_ptr,
                cache_base,
                n0,
                last,
                offs_n,
                offs_d,
                qk_scale,
                m_i,
                l_i,
                acc,
                head_dim,
                False,
                fp8_cache,
            )
    else:  # Triton's CPU interpreter needs loop bounds known before the kernel reads memory
        for block in range(max_blocks):
            m_i, l_i, acc = attend_block(
                q,
                k_ptr,
                v_ptr,
                cache_base,
                first + block * block_keys,
                last,
                offs_n,
                offs_d,
                qk_scale,
                m_i,
                l_i,
                acc,
                head_dim,
                True,
                fp8_cache,
            )
    # The split that holds position `pos` adds the new token and stores its K and V into the cache.
    if (pos >= first) & (pos < first + split_tokens):
        kv_heads_mask = offs_g < 1
        k_new = load_rotated(
            qkv_ptr, col_scale_ptr, cos, sin, row, heads + kv_head + offs_g, offs_d, kv_heads_mask, head_dim, scaled
        )
        v_cols = (heads + kv_heads + kv_head) * head_dim + offs_d
        v_new = tl.load(qkv_ptr + row + v_cols).to(tl.float32)
        if scaled:
            v_new = (v_new * tl.load(col_scale_ptr + v_cols)).to(tl.bfloat16).to(tl.float32)
        k_row = tl.sum(tl.where(kv_heads_mask[:, None], k_new.to(tl.float32), 0.0), 0)  # row 0 of k_new
        if fp8_cache:  # the new token is attended as stored, like every cached one
            k_stored = quantize_kv(k_row, tl.load(k_scale_ptr), fp8_max, emulate_fp8_rounding)
            v_stored = quantize_kv(v_new, tl.load(v_scale_ptr), fp8_max, emulate_fp8_rounding)
        else:
            k_stored = k_row.to(tl.bfloat16)
            v_stored = v_new.to(tl.bfloat16)
        s_new = tl.sum(q.to(tl.float32) * k_stored.to(tl.float32)[None, :], 1) * qk_scale
        m_new = tl.maximum(m_i, s_new)
        alpha = tl.exp(m_i - m_new)
        p_new = tl.exp(s_new - m_new)
        l_i = l_i * alpha + p_new
        acc = acc * alpha[:, None] + p_new[:, None] * v_stored.to(tl.float32)[None, :]
        m_i = m_new
        tl.store(k_ptr + cache_base + pos * head_dim + offs_d, k_stored)
        tl.store(v_ptr + cache_base + pos * head_dim + offs_d, v_stored)
    if fp8_cache:
        acc = acc * tl.load(v_scale_ptr)
    out_rows = slot * heads + kv_head * group + offs_g
    if single:
        out = (acc / l_i[:, None]).to(tl.bfloat16)  # BF16 first: the unfused path quantizes BF16
        if quantize:
            quant = tl.clamp(out.to(tl.float32) / tl.load(out_scale_ptr), -fp8_max, fp8_max)
            tl.store(
                out_ptr + out_rows[:, None] * head_dim + offs_d[None, :],
                quant.to(out_ptr.dtype.element_ty),
                mask=g_mask[:, None],
            )
        else:
            tl.store(out_ptr + out_rows[:, None] * head_dim + offs_d[None, :], out, mask=g_mask[:, None])
    else:
        partial = out_rows * num_splits + split
        tl.store(acc_ptr + partial[:, None] * head_dim + offs_d[None, :], acc, mask=g_mask[:, None])
        tl.store(stats_ptr + partial * 2, m_i, mask=g_mask)
        tl.store(stats_ptr + partial * 2 + 1, l_i, mask=g_mask)


@triton.jit
def combine_kernel(
    acc_ptr,
    stats_ptr,
    out_ptr,
    out_scale_ptr,
    num_splits,
    head_dim: tl.constexpr,
    block_splits: tl.constexpr,
    quantize: tl.constexpr,
    fp8_max: tl.constexpr,
) -> None:
    row = tl.program_id(0)  # slot * heads + head
    offs_s = tl.arange(0, block_splits)
    offs_d = tl.arange(0, head_dim)
    s_mask = offs_s < num_splits
    m = tl.load(stats_ptr + (row * num_splits + offs_s) * 2, mask=s_mask, other=float("-inf"))
    l = tl.load(stats_ptr + (row * num_splits + offs_s) * 2 + 1, mask=s_mask, other=0.0)  # noqa: E741
    m_max = tl.max(m, 0)
    weight = tl.where(s_mask & (l > 0), tl.exp(m - m_max), 0.0)
    denom = tl.sum(l * weight, 0)
    acc = tl.load(
        acc_ptr + (row * num_splits + offs_s)[:, None] * head_dim + offs_d[None, :], mask=s_mask[:, None], other=0.0
    )
    out = (tl.sum(acc * weight[:, None], 0) / denom).to(tl.bfloat16)
    if quantize:
        quant = tl.clamp(out.to(tl.float32) / tl.load(out_scale_ptr), -fp8_max, fp8_max)
        tl.store(out_ptr + row * head_dim + offs_d, quant.to(out_ptr.dtype.element_ty))
    else:
        tl.store(out_ptr + row * head_dim + offs_d, out)
