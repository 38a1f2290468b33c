"""The memory plan: what each stage needs per GPU, on the host and on disk, from the model's config alone.

Run by `quant-release plan` and by preflight at the start of every run, before any download: a model
that cannot fit this machine is refused in one line instead of running out of memory an hour in.

The figures are estimates from the model's shapes (config.json or the GGUF header), not measurements.
Each step's peak is its resident tensors plus a working set, with the constants below; the GPU
benchmark (benchmarks/quantize_memory.py) puts the measured peaks next to these predictions.

Calibration places the BF16 model as accelerate's `device_map="balanced"` would: on one GPU when it
fits, else split evenly over the visible GPUs, and what still does not fit is offloaded to host memory
(slow, but it runs). Export then writes each tensor from the device it lives on (no gathering onto one
GPU). The fidelity check loads an fp32 reference of the whole model on one device; for a model where
that cannot fit, `--fidelity-tokens 0` skips it (the plan says so). The built-in engine serves one
variant at a time on one GPU; TensorRT-LLM and vLLM split the weights over their tensor-parallel GPUs.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from quant_release.config import ReleaseConfig

GIB = 2**30
# Of each GPU's memory, what a stage may plan to use: the CUDA context, cuBLAS workspaces and allocator
# fragmentation take the rest (about 1-3 GiB on an H200).
GPU_USABLE_FRACTION = 0.92
HOST_USABLE_FRACTION = 0.85
# Host memory of the process itself: Python with torch (and its CUDA libraries), transformers and modelopt
# imported, tokenizer and data (1.7 GiB measured on an H200 host).
HOST_BASE_BYTES = 7 * GIB // 4
# Calibration's working set per token: the live activations of one decoder layer in BF16 (residual,
# norm output, q/k/v, attention output, gate/up/activation) plus modelopt's max-calibration temporaries.
ACTIVATION_HIDDEN_FACTOR = 8
ACTIVATION_INTERMEDIATE_FACTOR = 4
# Export's host memory: the safetensors shards being written (transformers' 5 GB shards, about two at a time:
# 10.2 GiB measured for an 8B export, 11.1 GiB for a 36 GiB one).
EXPORT_HOST_BYTES = 10 * 10**9
# Logits for every position, as measured with transformers 5 (BF16 logits and their float copy's share).
LOGIT_BYTES_PER_VALUE = 4


class PlanError(ValueError):
    """A config.json or GGUF header that lacks the shapes a plan needs."""


@dataclass(frozen=True)
class ModelShape:
    """A Llama-family decoder's shapes: all the plan needs."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any]) -> ModelShape:
        try:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            return cls(
                hidden=hidden,
                intermediate=int(config["intermediate_size"]),
                layers=int(config["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                vocab=int(config["vocab_size"]),
                tied_embeddings=bool(config.get("tie_word_embeddings", False)),
            )
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            raise PlanError(f"config.json lacks a usable {exc}") from None

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], vocab: int, has_output: bool) -> ModelShape:
        try:
            hidden, heads = int(meta["llama.embedding_length"]), int(meta["llama.attention.head_count"])
            return cls(
                hidden=hidden,
                intermediate=int(meta["llama.feed_forward_length"]),
                layers=int(meta["llama.block_count"]),
                heads=heads,
                kv_heads=int(meta.get("llama.attention.head_count_kv") or heads),
                head_dim=int(meta.get("llama.attention.key_length") or hidden // heads),
                vocab=vocab,
                tied_embeddings=not has_output,
            )
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            raise PlanError(f"GGUF header lacks {exc}") from None

    @property
    def decoder_linear_params(self) -> int:
        """The Linear weights FP8 quantizes: q, k, v, o, gate, up, down of every layer."""
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = self.hidden * (q_out + 2 * kv_out) + q_out * self.hidden + 3 * self.hidden * self.intermediate
        return self.layers * per_layer

    @property
    def other_params(self) -> int:
        """Embeddings, lm_head (unless tied), norms: kept in BF16 by every scheme."""
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return embeddings + (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.decoder_linear_params + self.other_params

    @property
    def bf16_bytes(self) -> int:
        return 2 * self.params

    def fp8_bytes(self, per_channel: bool) -> int:
        """The FP8 checkpoint: 1 byte per quantized weight, BF16 elsewhere, fp32 scales."""
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        outputs_per_layer = q_out + 2 * kv_out + self.hidden + 2 * self.intermediate + self.hidden
        scales = self.layers * (outputs_per_layer if per_channel else 7 * 2) * 4
        return self.decoder_linear_params + 2 * self.other_params + scales

    def kv_cache_bytes(self, tokens: int, bytes_per_value: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * tokens * bytes_per_value


@dataclass(frozen=True)
class Machine:
    """What the plan is checked against: the visible GPUs (all alike) and host memory."""

    gpus: int
    gpu_bytes: int  # each
    host_bytes: int
    name: str = ""

    @classmethod
    def detect(cls, device: str) -> Machine:
        host = _host_memory()
        if device != "cuda":
            return cls(gpus=0, gpu_bytes=0, host_bytes=host, name="cpu")
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            return cls(gpus=0, gpu_bytes=0, host_bytes=host, name="cpu")
        sizes = [torch.cuda.get_device_properties(i).total_memory for i in range(count)]
        return cls(gpus=count, gpu_bytes=min(sizes), host_bytes=host, name=torch.cuda.get_device_name(0))

    @property
    def usable_gpu(self) -> int:
        return int(self.gpu_bytes * GPU_USABLE_FRACTION)

    @property
    def usable_host(self) -> int:
        return int(self.host_bytes * HOST_USABLE_FRACTION)


def _host_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class StepNeed:
    """One step's peak: bytes on each GPU it uses (empty on a CPU), on the host, on disk."""

    stage: str
    step: str
    gpu_bytes: tuple[int, ...]
    host_bytes: int
    disk_bytes: int = 0
    note: str = ""

    @property
    def gpus(self) -> int:
        return len(self.gpu_bytes)


@dataclass
class Plan:
    shape: ModelShape
    machine: Machine
    steps: list[StepNeed] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def stage_peaks(self) -> dict[str, StepNeed]:
        """Each stage's largest step (by its busiest GPU, then host)."""
        peaks: dict[str, StepNeed] = {}
        for step in self.steps:
            best = peaks.get(step.stage)
            if best is None or (max(step.gpu_bytes, default=0), step.host_bytes) > (
                max(best.gpu_bytes, default=0),
                best.host_bytes,
            ):
                peaks[step.stage] = step
        return peaks


@dataclass(frozen=True)
class Placement:
    """Where calibration puts the BF16 model: weights resident per GPU, and what is offloaded to the host."""

    resident: tuple[int, ...]  # weight bytes kept on each GPU
    offload_bytes: int
    workspace: int  # activations of one calibration batch
    streamed: int  # an offloaded layer, moved in for its forward

    @property
    def gpu_bytes(self) -> tuple[int, ...]:
        return tuple(r + self.workspace + self.streamed for r in self.resident)

    @property
    def device_map(self) -> bool:
        return len(self.resident) > 1 or self.offload_bytes > 0


def calibration_activation_bytes(shape: ModelShape, batch: int, seq: int) -> int:
    tokens = batch * seq
    layer = tokens * 2 * (ACTIVATION_HIDDEN_FACTOR * shape.hidden + ACTIVATION_INTERMEDIATE_FACTOR * shape.intermediate)
    return layer + tokens * shape.vocab * LOGIT_BYTES_PER_VALUE


def largest_module_bytes(shape: ModelShape) -> int:
    """The largest block accelerate places whole: a decoder layer, or the embeddings / lm_head."""
    layer = 2 * (shape.decoder_linear_params // shape.layers + 2 * shape.hidden)
    return max(layer, 2 * shape.vocab * shape.hidden)


def gpu_budget(machine: Machine, workspace: int, max_gpu_bytes: int | None = None) -> int:
    """Weight bytes calibration may put on each GPU (accelerate's `max_memory`): what is usable, less the
    calibration batch's activations."""
    usable = min(machine.usable_gpu, max_gpu_bytes) if max_gpu_bytes else machine.usable_gpu
    return max(1, usable - workspace)


def place_model(shape: ModelShape, workspace: int, machine: Machine, max_gpu_bytes: int | None = None) -> Placement:
    """One GPU when it fits, else balanced over all GPUs, the rest offloaded to the host.

    When offloading, accelerate keeps room on each GPU for the largest block it streams in, so a GPU
    holds its budget less that block, and the block is back during its forward.
    """
    model = shape.bf16_bytes
    if machine.gpus == 0:
        return Placement(resident=(), offload_bytes=0, workspace=workspace, streamed=0)
    budget = gpu_budget(machine, workspace, max_gpu_bytes)
    if model <= budget:
        return Placement(resident=(model,), offload_bytes=0, workspace=workspace, streamed=0)
    share = math.ceil(model / machine.gpus)
    if share <= budget:
        return Placement(resident=(share,) * machine.gpus, offload_bytes=0, workspace=workspace, streamed=0)
    block = largest_module_bytes(shape)
    resident = max(0, budget - block)
    return Placement(
        resident=(resident,) * machine.gpus,
        offload_bytes=model - resident * machine.gpus,
        workspace=workspace,
        streamed=block,
    )


def plan_release(
    shape: ModelShape,
    machine: Machine,
    stages: AbstractSet[str],
    *,
    calib_batch: int,
    calib_seq: int,
    per_channel: bool,
    fidelity_tokens: int,
    engine: str,
    engine_tokens: int,
    fp8_kv_cache: bool,
    max_gpu_bytes: int | None = None,
) -> Plan:
    """Each step's peak for the stages that run, and what does not fit this machine."""
    plan = Plan(shape=shape, machine=machine)
    bf16, fp8 = shape.bf16_bytes, shape.fp8_bytes(per_channel)
    on_gpu = machine.gpus > 0
    if "download" in stages:
        plan.steps.append(StepNeed("download", "weights", (), HOST_BASE_BYTES, disk_bytes=bf16))
    if "quantize" in stages:
        batch = max(1, calib_batch)
        workspace = calibration_activation_bytes(shape, batch, calib_seq)
        placed = place_model(shape, workspace, machine, max_gpu_bytes)
        where = "one GPU" if len(placed.resident) == 1 else f"{len(placed.resident)} GPUs, balanced"
        if not on_gpu:
            where = "host"
        elif placed.offload_bytes:
            where += f", {placed.offload_bytes / GIB:.1f} GiB offloaded to host memory"
        # Host: the process itself; on a CPU the whole model; when offloading, the offloaded weights and the
        # checkpoint files accelerate maps to read them (mapped pages count in the resident set).
        if not on_gpu:
            host = HOST_BASE_BYTES + bf16 + workspace
        elif placed.offload_bytes:
            host = HOST_BASE_BYTES + placed.offload_bytes + bf16
        else:
            host = HOST_BASE_BYTES
        plan.steps.append(StepNeed("quantize", f"calibrate {batch}x{calib_seq}", placed.gpu_bytes, host, note=where))
        # Export converts layer by layer in place (FP8 weights replace BF16): the model plus the largest layer's
        # FP8 copy and its fp32 temporaries; on the host, the shards being written.
        layer_linears = shape.decoder_linear_params // shape.layers
        export_gpu = tuple(r + placed.streamed + 3 * layer_linears for r in placed.resident)
        export_host = host - (workspace if not on_gpu else 0) + min(fp8, EXPORT_HOST_BYTES)
        plan.steps.append(StepNeed("quantize", "export", export_gpu, export_host, disk_bytes=fp8))
        if fidelity_tokens > 0:
            # fp32 weights of the whole model on one device, built on the host first; the BF16 source files
            # are mapped to load the engine's copy.
            reference = 4 * shape.params
            window_logits = (256 + 1) * shape.vocab * LOGIT_BYTES_PER_VALUE
            kept = 3 * max(1, fidelity_tokens // 256) * 256 * shape.vocab * 4  # log-probs of 3 models, on the host
            fidelity_gpu: tuple[int, ...] = (reference + window_logits,) if on_gpu else ()
            fidelity_host = HOST_BASE_BYTES + reference + bf16 + kept
            plan.steps.append(StepNeed("quantize", "fidelity (fp32 reference)", fidelity_gpu, fidelity_host))
            if max(fidelity_gpu, default=0) > machine.usable_gpu:
                plan.problems.append(
                    f"the fidelity check's fp32 reference needs {max(fidelity_gpu) / GIB:.0f} GiB on one GPU "
                    f"(usable: {machine.usable_gpu / GIB:.0f} GiB): set --fidelity-tokens 0 to skip it"
                )
        for step in plan.steps:
            if on_gpu and step.stage == "quantize" and step.host_bytes > machine.usable_host:
                plan.problems.append(
                    f"quantize ({step.step}) needs {step.host_bytes / GIB:.0f} GiB of host memory "
                    f"(usable: {machine.usable_host / GIB:.0f} GiB)"
                )
    if {"build", "evaluate", "benchmark"} & stages:
        kv = shape.kv_cache_bytes(engine_tokens, 1 if fp8_kv_cache else 2)
        for variant, weights in (("BF16", bf16), ("FP8", fp8)):
            gpu: tuple[int, ...]
            if engine == "builtin":
                gpu = (weights + kv,) if on_gpu else ()
                host = HOST_BASE_BYTES + (0 if on_gpu else weights + kv)
                note = "one GPU" if on_gpu else "host"
            else:
                tp = max(1, machine.gpus)
                gpu = (math.ceil(weights / tp) + math.ceil(kv / tp),) * tp if on_gpu else ()
                host, note = HOST_BASE_BYTES, f"tensor parallel {tp}"
            plan.steps.append(StepNeed("engine", f"{variant} weights + KV cache", gpu, host, note=note))
            if max(gpu, default=0) > machine.usable_gpu:
                plan.problems.append(
                    f"the {engine} engine needs {max(gpu) / GIB:.0f} GiB per GPU for {variant} "
                    f"(usable: {machine.usable_gpu / GIB:.0f} GiB)"
                    + (": use --engine tensorrt_llm or vllm (tensor parallel)" if engine == "builtin" else "")
                )
    for step in plan.steps:
        if not on_gpu and step.host_bytes > machine.usable_host:
            plan.problems.append(
                f"{step.stage} ({step.step}) needs {step.host_bytes / GIB:.0f} GiB of host memory "
                f"(usable: {machine.usable_host / GIB:.0f} GiB)"
            )
    return plan


def format_bytes(value: int) -> str:
    return f"{value / GIB:,.1f} GiB"


def render(plan: Plan) -> str:
    """The plan as a table: one row per step."""
    shape, machine = plan.shape, plan.machine
    gpu_name = f" ({machine.name})" if machine.name else ""
    lines = [
        f"model: {shape.params / 1e9:.2f}B parameters ({shape.layers} layers, hidden {shape.hidden}, "
        f"vocab {shape.vocab}); BF16 {format_bytes(shape.bf16_bytes)}, FP8 {format_bytes(shape.fp8_bytes(False))}",
        f"machine: {machine.gpus} x {format_bytes(machine.gpu_bytes)} GPU{gpu_name}"
        f", host {format_bytes(machine.host_bytes)}"
        if machine.gpus
        else f"machine: no GPU, host {format_bytes(machine.host_bytes)}",
        "",
        f"{'stage':<10} {'step':<28} {'GPUs':>4} {'per GPU':>11} {'host':>11} {'disk':>11}  where",
    ]
    for step in plan.steps:
        per_gpu = format_bytes(max(step.gpu_bytes)) if step.gpu_bytes else "-"
        disk = format_bytes(step.disk_bytes) if step.disk_bytes else "-"
        lines.append(
            f"{step.stage:<10} {step.step:<28} {step.gpus:>4} {per_gpu:>11} "
            f"{format_bytes(step.host_bytes):>11} {disk:>11}  {step.note}"
        )
    lines.append("")
    lines += [f"does not fit: {problem}" for problem in plan.problems] or ["fits this machine"]
    return "\n".join(lines)


def plan_for_config(
    shape: ModelShape, config: ReleaseConfig, machine: Machine, stages: AbstractSet[str], engine: str | None = None
) -> Plan:
    """`plan_release` with the run's options: calibration batch and length, scheme, fidelity tokens, and the
    benchmark's largest KV cache (concurrency x (input + output) tokens)."""
    q, bench = config.quantization, config.benchmark
    return plan_release(
        shape,
        machine,
        stages,
        calib_batch=q.batch_size or 1,  # 0 probes what is free at run time; plan the smallest
        calib_seq=q.calib_seq,
        per_channel=q.algorithm == "fp8_pc_pt",
        fidelity_tokens=q.fidelity_tokens,
        engine=engine or config.engine.kind,
        engine_tokens=max(bench.concurrency)
        * (bench.input_mean + 3 * bench.input_stdev + bench.output_mean + 3 * bench.output_stdev),
        fp8_kv_cache=q.kv_cache_qformat == "fp8",
        max_gpu_bytes=parse_bytes(q.max_gpu_memory) if q.max_gpu_memory else None,
    )


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'80GiB', '141GB', '512MiB', '1e9' -> bytes. ValueError otherwise."""
    number = text.strip().lower()
    unit = number.lstrip("0123456789.e+")
    value = float(number[: len(number) - len(unit)] or "nan")
    if unit.strip() not in _UNITS or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{text!r} is not a size such as 80GiB or 141GB")
    return int(value * _UNITS[unit.strip()])
