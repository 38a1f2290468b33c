"""The built-in engine's runtime: a static KV cache, batched prefill, and a decode step replayed as a CUDA graph.

Layer math lives in two functions, `attention_inputs` (residual add, RMSNorm, QKV projection, RoPE)
and `attention_output_and_mlp` (o_proj, residual add, RMSNorm, SiLU-gated MLP), on flattened tokens.
On a GPU each is compiled once with `torch.compile` (dynamic token count), so the compiler fuses RMSNorm
with the FP8 quantization of its output, SiLU·up with the quantization of `down`'s input, and the
per-channel weight scales of fused projections with RoPE; prefill and decode run the same compiled
code. Attention sits between the two: SDPA for prefill, `attention.DecodeAttention` (Triton) for decode.

A decode step for a batch bucket (1, 2, 4, ... slots) is captured once as a CUDA graph that reads the
slots' current tokens and positions from static buffers, writes the next tokens back and advances the
positions, so a run of N steps is N graph replays with no host round trip. On a CPU the same functions
run eagerly.

The KV cache is BF16, or FP8 E4M3 when the weights carry per-layer k/v scales (a checkpoint exported
with `kv_cache_quant_algo: FP8`): every write quantizes, every read dequantizes (see `attention.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F  # noqa: N812 - the conventional name

from quant_release.engines.attention import (
    SPLIT_TOKENS,
    DecodeAttention,
    KvScales,
    as_bytes,
    decode_attention_torch,
    dequantize_kv,
    prefill_attention,
    quantize_kv,
    triton_available,
    triton_fp8_supported,
)
from quant_release.engines.llama import (
    FP8_DTYPE,
    Fp8Weight,
    LlamaShape,
    LlamaWeights,
    Weight,
    apply_rope,
    quantize_per_token,
    quantize_static,
    rms_norm,
    rope_tables,
)

AttentionImpl = Literal["triton", "torch"]
# Tokens per call of a compiled program (prefill is cut into chunks of at most this many): large enough
# to keep GEMMs efficient, small enough that every activation's index fits 32-bit integers.
MAX_PROGRAM_TOKENS = 16384
# A linear layer as plain tensors, so one compiled program serves every layer:
#   (weight,)                                      BF16
#   (weight, weight_scale, input_scale, unit)      FP8; weight transposed for scaled_mm, BF16-widened if emulated;
#                                                  input_scale None for dynamic per-token activations
LinearArgs = tuple[Any, ...]


def linear_args(weight: Weight) -> LinearArgs:
    if not isinstance(weight, Fp8Weight):
        return (weight,)
    matrix = weight.weight_t if weight.weight.dtype == FP8_DTYPE else weight.weight
    return (matrix, weight.weight_scale, weight.input_scale, weight.unit_scale)


def apply_linear(
    x: torch.Tensor, args: LinearArgs, fast_accum: bool = False, channel_scale: bool = True
) -> torch.Tensor:
    """x [N, in] → [N, out] BF16. An FP8 `x` is taken as already quantized with the layer's input scale.

    `fast_accum`: Hopper's faster FP8 accumulation mode for scaled_mm (fewer accumulator bits).
    `channel_scale=False` leaves a static-input scaled_mm layer's per-channel weight scales to the
    caller (the decode attention kernel applies them to QKV).
    """
    if len(args) == 1:
        return F.linear(x, args[0])
    matrix: torch.Tensor = args[0]
    weight_scale: torch.Tensor = args[1]
    input_scale: torch.Tensor | None = args[2]
    unit: torch.Tensor = args[3]
    per_channel = weight_scale.dim() > 0
    if matrix.dtype == FP8_DTYPE:  # real FP8 GEMM; matrix is the [in, out] column-major view
        if input_scale is None:
            x_q, row_scale = quantize_per_token(x)
            col = weight_scale.expand(matrix.shape[1]).reshape(1, -1).contiguous()
            return torch._scaled_mm(
                x_q, matrix, scale_a=row_scale, scale_b=col, out_dtype=torch.bfloat16, use_fast_accum=fast_accum
            )
        x_q = x if x.dtype == FP8_DTYPE else quantize_static(x, input_scale)
        out = torch._scaled_mm(
            x_q,
            matrix,
            scale_a=input_scale,
            scale_b=unit if per_channel else weight_scale,
            out_dtype=torch.bfloat16,
            use_fast_accum=fast_accum,
        )
        return (out.float() * weight_scale).to(torch.bfloat16) if per_channel and channel_scale else out
    # Emulated: exact FP8 operands widened to BF16; scales applied once after the GEMM.
    if input_scale is None:
        x_q, row_scale = quantize_per_token(x)
        out = F.linear(x_q.to(torch.bfloat16), matrix)
        return (out.float() * row_scale * weight_scale).to(torch.bfloat16)
    x_q = x if x.dtype == FP8_DTYPE else quantize_static(x, input_scale)
    out = F.linear(x_q.to(torch.bfloat16), matrix)
    return out * (input_scale * weight_scale).to(torch.bfloat16)


@dataclass(frozen=True)
class Dims:
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    fast_accum: bool = False

    @classmethod
    def of(cls, shape: LlamaShape, fast_accum: bool = False) -> Dims:
        return cls(shape.heads, shape.kv_heads, shape.head_dim, shape.rms_eps, fast_accum)


def attention_inputs(
    dims: Dims,
    x: torch.Tensor,
    residual: torch.Tensor,
    norm: torch.Tensor,
    qkv: LinearArgs,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens [N, hidden] → q [N, H, D], k and v [N, KVH, D] (RoPE applied), and the new residual."""
    residual = x + residual
    out = apply_linear(rms_norm(residual, norm, dims.eps), qkv, dims.fast_accum)
    n = out.shape[0]
    q_size, kv_size = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
    q = out[:, :q_size].view(n, dims.heads, dims.head_dim)
    k = out[:, q_size : q_size + kv_size].view(n, dims.kv_heads, dims.head_dim)
    v = out[:, q_size + kv_size :].reshape(n, dims.kv_heads, dims.head_dim)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, residual


def qkv_projection(
    dims: Dims, x: torch.Tensor, residual: torch.Tensor, norm: torch.Tensor, qkv: LinearArgs, channel_scale: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens [N, hidden] → the raw QKV projection [N, (H + 2*KVH) * D] and the new residual (decode path)."""
    residual = x + residual
    return apply_linear(rms_norm(residual, norm, dims.eps), qkv, dims.fast_accum, channel_scale), residual


def attention_output_and_mlp(
    dims: Dims,
    attended: torch.Tensor,
    residual: torch.Tensor,
    o: LinearArgs,
    norm: torch.Tensor,
    gate_up: LinearArgs,
    down: LinearArgs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output [N, H*D] (BF16, or FP8 already quantized for o_proj) → MLP output and residual."""
    residual = apply_linear(attended, o, dims.fast_accum) + residual
    gate, up = apply_linear(rms_norm(residual, norm, dims.eps), gate_up, dims.fast_accum).chunk(2, dim=-1)
    return apply_linear(F.silu(gate) * up, down, dims.fast_accum), residual


def final_logits(
    dims: Dims, x: torch.Tensor, residual: torch.Tensor, norm: torch.Tensor, lm_head: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Last residual add, final RMSNorm and lm_head: BF16 logits [N, vocab] and their argmax."""
    logits = F.linear(rms_norm(x + residual, norm, dims.eps), lm_head)
    return logits, logits.argmax(dim=-1)


def layer_programs(dims: Dims, compile_: bool, autotune: bool = False) -> tuple[Callable[..., Any], ...]:
    """The three per-token programs with the model's dimensions bound as constants, compiled on request.

    Bound through a closure, not passed as arguments: the compiler then treats head counts and the
    norm's epsilon as constants, and only the token count as dynamic.
    """

    def inputs(*args: Any) -> Any:
        return attention_inputs(dims, *args)

    def output_and_mlp(*args: Any) -> Any:
        return attention_output_and_mlp(dims, *args)

    def final(*args: Any) -> Any:
        return final_logits(dims, *args)

    def projection(*args: Any) -> Any:
        return qkv_projection(dims, *args)

    programs = (inputs, output_and_mlp, final, projection)
    # Which positional arguments carry the token dimension (dim 0), per program.
    token_args = ((0, 1, 4, 5), (0, 1), (0, 1), (0, 1))
    if not compile_:
        return programs
    # emulate_precision_casts: round fused intermediates to their declared dtype, as eager does; without
    # it RMSNorm's BF16 output stays fp32 inside the fused kernel and FP8 quantization sees other values.
    options: dict[str, Any] = {"emulate_precision_casts": True}
    if autotune:  # benchmark Triton GEMM templates against cuBLAS per shape (static shapes, slow to compile)
        options["max_autotune"] = True
        return tuple(torch.compile(program, dynamic=False, fullgraph=True, options=options) for program in programs)
    return tuple(
        _bounded_tokens(torch.compile(program, fullgraph=True, options=options), args)
        for program, args in zip(programs, token_args, strict=True)
    )


def _bounded_tokens(compiled: Callable[..., Any], token_args: tuple[int, ...]) -> Callable[..., Any]:
    """Compile for any token count from 2 to `dims.max_tokens` (one program), and 1 separately.

    The bound matters: with an unbounded symbolic size the compiler must index in 64-bit integers,
    which made the pointwise kernels of a 4096-token prefill 3-7x slower than memory bandwidth.
    """

    def run(*args: Any) -> Any:
        if args[0].shape[0] >= 2:
            for index in token_args:
                torch._dynamo.mark_dynamic(args[index], 0, min=2, max=MAX_PROGRAM_TOKENS)
        return compiled(*args)

    return run


@dataclass
class RuntimeOptions:
    compile: bool
    cuda_graphs: bool
    attention: AttentionImpl
    fp8_fast_accum: bool = False
    # Decode steps compiled per batch size with GEMM autotuning (longer warm-up, possibly faster steps).
    decode_autotune: bool = False

    @classmethod
    def for_device(cls, device: torch.device, fp8_kv_cache: bool = False, **overrides: Any) -> RuntimeOptions:
        """The fast path where it exists: compiled + graphs + Triton attention on CUDA, eager on CPU."""
        cuda = device.type == "cuda"
        triton = cuda and triton_available(device)
        options = cls(compile=cuda, cuda_graphs=cuda, attention="triton" if triton else "torch")
        if fp8_kv_cache and triton and not triton_fp8_supported(device):
            # No E4M3 in Triton before Ada/Hopper: PyTorch attention, whose host sync rules out graphs.
            options.attention, options.cuda_graphs = "torch", False
        for key, value in overrides.items():
            if value is not None:
                setattr(options, key, value)
        return options


def kv_cache_scales(weights: LlamaWeights) -> list[KvScales | None]:
    """Each layer's (k_scale, v_scale) for an FP8 KV cache, or None for all layers (BF16 cache)."""
    scales = [(layer.k_scale, layer.v_scale) for layer in weights.layers]
    if all(k is None and v is None for k, v in scales):
        return [None] * len(scales)
    # One cache tensor holds every layer: it is FP8 for all of them or for none.
    complete: list[KvScales | None] = []
    for index, (k, v) in enumerate(scales):
        if k is None or v is None:
            raise ValueError(f"layer {index} has no k_scale or v_scale; an FP8 KV cache needs both in every layer")
        complete.append((k, v))
    return complete


class LlamaRuntime:
    """One loaded model with its KV cache. Not thread-safe: one caller at a time."""

    def __init__(self, weights: LlamaWeights, device: torch.device, options: RuntimeOptions) -> None:
        if options.cuda_graphs and device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        if options.attention == "triton" and not triton_available(device):
            raise ValueError("Triton attention needs a CUDA device with Triton installed")
        self.weights = weights
        self.shape = weights.shape
        self.device = device
        self.options = options
        self.dims = Dims.of(weights.shape, options.fp8_fast_accum)
        self._layers = [
            (
                layer.input_norm,
                linear_args(layer.qkv),
                linear_args(layer.o),
                layer.post_norm,
                linear_args(layer.gate_up),
                linear_args(layer.down),
            )
            for layer in weights.layers
        ]
        # The attention output goes to o_proj already quantized when o_proj takes a static FP8 input.
        self._o_input_scales = [
            layer.o.input_scale if isinstance(layer.o, Fp8Weight) and weights.gemm == "scaled_mm" else None
            for layer in weights.layers
        ]
        self._attention_inputs, self._attention_output_and_mlp, self._final, self._qkv_projection = layer_programs(
            self.dims, options.compile
        )
        self._decode_programs = (
            layer_programs(self.dims, True, autotune=True)
            if options.decode_autotune and options.compile
            else (self._attention_inputs, self._attention_output_and_mlp, self._final, self._qkv_projection)
        )
        # Decode with Triton attention: the kernel applies a fused scaled_mm QKV's channel scales itself.
        self._qkv_channel_scales = [
            layer.qkv.weight_scale
            if isinstance(layer.qkv, Fp8Weight)
            and layer.qkv.per_channel
            and layer.qkv.input_scale is not None
            and weights.gemm == "scaled_mm"
            else None
            for layer in weights.layers
        ]
        self._kv_scales = kv_cache_scales(weights)
        self.kv_dtype = FP8_DTYPE if any(s is not None for s in self._kv_scales) else torch.bfloat16
        if self.kv_dtype == FP8_DTYPE and options.attention == "triton" and not triton_fp8_supported(device):
            raise ValueError(
                "an FP8 KV cache with Triton attention needs compute capability 8.9+; use attention='torch'"
            )
        self.slots = 0
        self.max_len = 0
        self.k_cache = torch.empty(0, device=device)
        self.v_cache = torch.empty(0, device=device)
        self.cos = torch.empty(0, device=device)
        self.sin = torch.empty(0, device=device)
        # Decode state, one entry per slot: the token to feed, its position, whether the slot advances.
        self.tokens = torch.zeros(0, dtype=torch.long, device=device)
        self.positions = torch.zeros(0, dtype=torch.long, device=device)
        self.active = torch.zeros(0, dtype=torch.long, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._decode_attention: dict[int, DecodeAttention] = {}

    # -- memory -------------------------------------------------------------------------------------------
    def reserve(self, slots: int, max_len: int) -> None:
        """Make room for `slots` sequences of up to `max_len` tokens (keeps the cache if it is big enough)."""
        if max_len > self.shape.max_positions:
            raise ValueError(f"{max_len} tokens exceed the model's {self.shape.max_positions} positions")
        max_len = min(self.shape.max_positions, SPLIT_TOKENS * math.ceil(max_len / SPLIT_TOKENS))
        if slots <= self.slots and max_len <= self.max_len:
            return
        slots, max_len = max(slots, self.slots), max(max_len, self.max_len)
        self.release()
        s = self.shape
        size = (s.layers, slots, s.kv_heads, max_len, s.head_dim)
        # Plain tensors even when called under inference mode: callers update the decode state in place.
        with torch.inference_mode(False):
            if self.kv_dtype == FP8_DTYPE:  # zero bytes are E4M3 +0.0; allocated as uint8 (see `as_bytes`)
                self.k_cache = torch.zeros(size, dtype=torch.uint8, device=self.device).view(FP8_DTYPE)
                self.v_cache = torch.zeros(size, dtype=torch.uint8, device=self.device).view(FP8_DTYPE)
            else:
                self.k_cache = torch.zeros(size, dtype=torch.bfloat16, device=self.device)
                self.v_cache = torch.zeros(size, dtype=torch.bfloat16, device=self.device)
            self.cos, self.sin = rope_tables(s, max_len, self.device)
            self.tokens = torch.zeros(slots, dtype=torch.long, device=self.device)
            self.positions = torch.zeros(slots, dtype=torch.long, device=self.device)
            self.active = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.slots, self.max_len = slots, max_len

    def release(self) -> None:
        """Drop the cache and the captured graphs (they point into the cache)."""
        self._graphs.clear()
        self._decode_attention.clear()
        self.k_cache = self.v_cache = torch.empty(0, device=self.device)
        self.slots = self.max_len = 0
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def cache_bytes(self) -> int:
        return 2 * self.k_cache.numel() * self.k_cache.element_size()

    # -- prefill ------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(
        self, rows: Sequence[Sequence[int]], slots: Sequence[int], start: int = 0, gather: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run `rows` (token ids at positions start..) into `slots` of the cache.

        Returns BF16 logits at `gather` [B, K] (positions relative to `start`), default each row's last
        token: [B, K, vocab]. Afterwards each slot holds start + len(row) tokens; with the default
        `gather` its decode state continues after them with the argmax of the last token. Rows are
        right-padded into batches of at most MAX_PROGRAM_TOKENS tokens; a longer row is run in chunks.
        """
        if not rows or len(rows) != len(slots):
            raise ValueError("prefill needs one slot per row")
        longest = max(len(r) for r in rows)
        if start + longest > self.max_len or max(slots) >= self.slots or min(len(r) for r in rows) == 0:
            raise ValueError(f"prefill of {len(rows)}x{start + longest} tokens does not fit the reserved cache")
        budget = MAX_PROGRAM_TOKENS
        if longest > budget:  # one long prompt: earlier chunks only fill the cache
            if len(rows) > 1 or gather is not None:
                return torch.cat([self.prefill([r], [s], start, gather) for r, s in zip(rows, slots, strict=True)])
            for first in range(0, longest - budget, budget):
                self._prefill_batch([rows[0][first : first + budget]], slots, start + first, None)
            tail = (longest - 1) // budget * budget
            return self._prefill_batch([rows[0][tail:]], slots, start + tail, None)
        per_batch = max(1, budget // longest)
        outputs = []
        for first in range(0, len(rows), per_batch):
            part = slice(first, first + per_batch)
            outputs.append(
                self._prefill_batch(rows[part], slots[part], start, None if gather is None else gather[part])
            )
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _prefill_batch(
        self, rows: Sequence[Sequence[int]], slots: Sequence[int], start: int, gather: torch.Tensor | None
    ) -> torch.Tensor:
        batch, longest = len(rows), max(len(r) for r in rows)
        lengths = torch.tensor([len(r) for r in rows], device=self.device)
        tokens = torch.zeros(batch, longest, dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        tokens = tokens.to(self.device)
        slot_ids = torch.tensor(list(slots), dtype=torch.long, device=self.device)
        # Consecutive slots (the usual case) take a plain strided copy instead of a gather/scatter.
        consecutive = list(slots) == list(range(slots[0], slots[0] + batch))
        slot_index: slice | torch.Tensor = slice(slots[0], slots[0] + batch) if consecutive else slot_ids
        d = self.dims
        x = F.embedding(tokens, self.weights.embed).view(batch * longest, -1)
        residual = torch.zeros_like(x)
        cos = self.cos[start : start + longest].repeat(batch, 1)
        sin = self.sin[start : start + longest].repeat(batch, 1)
        for index, (in_norm, qkv, o, post_norm, gate_up, down) in enumerate(self._layers):
            q, k, v, residual = self._attention_inputs(x, residual, in_norm, qkv, cos, sin)
            q = q.view(batch, longest, d.heads, d.head_dim).transpose(1, 2)
            k = k.view(batch, longest, d.kv_heads, d.head_dim).transpose(1, 2)
            v = v.view(batch, longest, d.kv_heads, d.head_dim).transpose(1, 2)
            k_cache, v_cache = self.k_cache[index], self.v_cache[index]
            scales = self._kv_scales[index]
            k_stored, v_stored = (k, v) if scales is None else (quantize_kv(k, scales[0]), quantize_kv(v, scales[1]))
            as_bytes(k_cache)[slot_index, :, start : start + longest] = as_bytes(k_stored)
            as_bytes(v_cache)[slot_index, :, start : start + longest] = as_bytes(v_stored)
            if start:
                k_stored = as_bytes(k_cache)[slot_index, :, : start + longest].view(k_cache.dtype)
                v_stored = as_bytes(v_cache)[slot_index, :, : start + longest].view(v_cache.dtype)
            # Attention reads what the cache holds: with FP8, this chunk's own keys and values too.
            if scales is not None:
                k, v = dequantize_kv(k_stored, scales[0]), dequantize_kv(v_stored, scales[1])
            elif start:
                k, v = k_stored, v_stored
            attended = prefill_attention(q, k, v, start).transpose(1, 2).reshape(batch * longest, -1)
            x, residual = self._attention_output_and_mlp(attended, residual, o, post_norm, gate_up, down)
        last = gather is None
        if gather is None:
            gather = (lengths - 1)[:, None]
        picks = (torch.arange(batch, device=self.device)[:, None] * longest + gather.to(self.device)).flatten()
        logits: torch.Tensor
        logits, next_tokens = self._final(x[picks], residual[picks], self.weights.norm, self.weights.lm_head)
        if last:  # ready to decode: the next token to feed is the argmax after each row's last token
            self.tokens[slot_ids] = next_tokens
        self.positions[slot_ids] = start + lengths
        return logits.view(batch, gather.shape[1], -1)

    def copy_prefix(self, source: int, targets: Sequence[int], length: int) -> None:
        """Share the first `length` cached tokens of slot `source` with `targets` (one device copy)."""
        if not targets:
            return
        ids = torch.tensor(list(targets), dtype=torch.long, device=self.device)
        for cache in (self.k_cache, self.v_cache):
            raw = as_bytes(cache)  # an FP8 cache's codes are copied as they are: same scales in every slot
            raw[:, ids, :, :length] = raw[:, source : source + 1, :, :length]

    # -- decode -------------------------------------------------------------------------------------------
    def _decode_body(self, batch: int) -> torch.Tensor:
        """One step for slots [0, batch): reads tokens/positions, returns logits, advances the state."""
        positions = self.positions[:batch]
        x = F.embedding(self.tokens[:batch], self.weights.embed)
        residual = torch.zeros_like(x)
        triton = self.options.attention == "triton"
        attention_inputs, output_and_mlp, final, projection = self._decode_programs
        if not triton:
            cos, sin = self.cos[positions], self.sin[positions]
        for index, (in_norm, qkv, o, post_norm, gate_up, down) in enumerate(self._layers):
            k_cache, v_cache = self.k_cache[index], self.v_cache[index]
            if triton:
                col_scale = self._qkv_channel_scales[index]
                projected, residual = projection(x, residual, in_norm, qkv, col_scale is None)
                attended = self._decode_attention[batch](
                    projected,
                    col_scale,
                    self.cos,
                    self.sin,
                    k_cache,
                    v_cache,
                    positions,
                    self._o_input_scales[index],
                    self._kv_scales[index],
                )
            else:
                q, k, v, residual = attention_inputs(x, residual, in_norm, qkv, cos, sin)
                scales = self._kv_scales[index]
                attended = decode_attention_torch(q, k, v, k_cache, v_cache, positions, scales).reshape(batch, -1)
            x, residual = output_and_mlp(attended, residual, o, post_norm, gate_up, down)
        logits: torch.Tensor
        logits, next_tokens = final(x, residual, self.weights.norm, self.weights.lm_head)
        self.tokens[:batch].copy_(next_tokens)
        self.positions[:batch].add_(self.active[:batch])
        return logits

    @staticmethod
    def bucket(batch: int) -> int:
        """The decode batch size (one CUDA graph each) that serves `batch` slots: the next power of two."""
        return 1 << max(0, batch - 1).bit_length()

    @torch.inference_mode()
    def decode(self, batch: int, steps: int = 1) -> torch.Tensor:
        """`steps` greedy steps for slots [0, batch); returns the last step's BF16 logits [batch, vocab].

        Slots with `active` 0 are computed but do not advance (their position and cache are reused).
        """
        if batch > self.slots:
            raise ValueError(f"decode of {batch} slots, but only {self.slots} are reserved")
        if self.options.attention == "triton" and batch not in self._decode_attention:
            s = self.shape
            self._decode_attention[batch] = DecodeAttention(
                batch, s.heads, s.kv_heads, s.head_dim, self.max_len, self.device
            )
        if not self.options.cuda_graphs:
            logits = self._decode_body(batch)
            for _ in range(steps - 1):
                logits = self._decode_body(batch)
            return logits
        graph, logits = self._graphs.get(batch) or self._capture(batch)
        for _ in range(steps):
            graph.replay()
        return logits

    def _capture(self, batch: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm up outside the graph (compilation, Triton autotuning, cuBLAS handles) on a copy of the
        # state, so capturing changes nothing a caller can see.
        saved = (self.tokens.clone(), self.positions.clone(), self.active.clone())
        self.active.zero_()
        stream = torch.cuda.Stream(self.device)  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._decode_body(batch)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            logits = self._decode_body(batch)
        for buffer, value in zip((self.tokens, self.positions, self.active), saved, strict=True):
            buffer.copy_(value)
        self._graphs[batch] = (graph, logits)
        return graph, logits
