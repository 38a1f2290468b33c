"""quantize: FP8 post-training quantization with nvidia-modelopt, exported as a unified HF checkpoint.

The scheme (quant_release/schemes.py) picks modelopt's config: `fp8` is W8A8 per-tensor E4M3 with static
scales (`mtq.FP8_DEFAULT_CFG`: weight scales from the weights, activation scales from max-calibration on
real text); `fp8_pc_pt` has per-output-channel weight scales and dynamic per-token activations
(`FP8_PER_CHANNEL_PER_TOKEN_CFG`); `kv_cache_qformat fp8` adds `FP8_KV_CFG`'s K/V quantizers, calibrated
with the rest. `export_hf_checkpoint` writes the format that TensorRT-LLM, vLLM and SGLang load
(`hf_quant_config.json`, `quantization_config` in config.json); the stage checks it declares what was asked.
The export writes no tokenizer, so the tokenizer files are copied from the source.

Then the exported files are read back and scored against the original on held-out text
(quant_release/fidelity.py), and a fidelity gate checks the result. This stage owns that measurement,
not build: it is a property of the checkpoint whatever engine serves it, and a bad checkpoint should
stop the run here, before build, MMLU and the benchmark spend anything on it. The gate's threshold and
override are not in the cache key: changing them re-checks the stored figures, never re-calibrates.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import shutil
from pathlib import Path
from typing import Any

from quant_release import calibration, fidelity, plan, schemes, textdata
from quant_release.config import QuantizationConfig
from quant_release.errors import ConfigError, QuantReleaseError
from quant_release.hashing import digest_dir, fingerprint, tensor_shapes
from quant_release.progress import Progress
from quant_release.records import (
    CalibrationInfo,
    FidelityGate,
    FidelityReport,
    ModelSource,
    QuantizedCheckpoint,
)
from quant_release.stage import RunContext, stage_task

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)
# Checked on the stored record every run (StageRunner's `accept`), so not part of the key.
GATE_FIELDS = {"max_ppl_increase", "override_fidelity_gate"}
# Where calibration runs, not what it computes: placing layers on other GPUs or the host changes no scale.
PLACEMENT_FIELDS = {"max_gpu_memory"}
CPU_AUTO_BATCH = 8  # batch_size 0 on a CPU: no memory probe there, and larger batches do not run faster


class FidelityGateError(QuantReleaseError):
    """The exported checkpoint is further from BF16 than the fidelity gate allows."""


def cache_inputs(config: QuantizationConfig, calib_dataset: str, source: ModelSource, device: str) -> dict[str, Any]:
    return {
        "source_fingerprint": source.fingerprint,
        **config.model_dump(exclude={"calib_dataset", *GATE_FIELDS, *PLACEMENT_FIELDS}),
        "calib_dataset": calib_dataset,
        # A file's or a Hub dataset's contents, not just its name: an edited file must recalibrate.
        "calib_identity": calibration.source(calib_dataset).identity(),
        "device": device,
    }


def modelopt_config(config: QuantizationConfig) -> dict[str, Any]:
    """modelopt's quant config for the scheme, with the KV-cache format's quantizers appended.

    Appended, as hf_ptq.py does: `quant_cfg` is an ordered list of entries and later entries win, so the
    scheme's leading `"*": disabled` entry does not switch the `[kv]_bmm_quantizer`s back off.
    A deep copy: modelopt's module-level dicts must not change under other callers.
    """
    import modelopt.torch.quantization as mtq

    cfg: dict[str, Any] = copy.deepcopy(getattr(mtq, schemes.SCHEMES[config.algorithm].modelopt_config))
    if config.kv_cache_qformat != schemes.NO_KV_QUANT:
        kv = getattr(mtq, schemes.KV_CACHE_FORMATS[config.kv_cache_qformat].modelopt_config)
        cfg["quant_cfg"] = list(cfg["quant_cfg"]) + copy.deepcopy(list(kv["quant_cfg"]))
    return cfg


def check_export(config: QuantizationConfig, quant: dict[str, Any]) -> None:
    """The export declares the scheme and KV format that were asked for (a modelopt upgrade that exports
    something else must not be published under the old name)."""
    expected = schemes.exported_algos(config.algorithm, config.kv_cache_qformat)
    got = (quant.get("quant_algo"), quant.get("kv_cache_quant_algo"))
    if got != expected:
        raise QuantReleaseError(
            f"modelopt exported quant_algo {got[0]!r}, kv_cache_quant_algo {got[1]!r} for scheme "
            f"{config.algorithm} with kv_cache_qformat {config.kv_cache_qformat}; expected {expected[0]!r}, "
            f"{expected[1]!r}"
        )


def calibration_windows(
    calib_dataset: str, encode: Any, config: QuantizationConfig, separator: list[int]
) -> list[list[int]]:
    """`calib_size` windows of `calib_seq` tokens from a calibration source (quant_release/calibration/).

    ConfigError, before any model is loaded, when the text is empty or shorter than the windows need:
    calibrating on repeated text would quietly calibrate on less than was asked for.
    """
    documents = calibration.source(calib_dataset).documents(config.calib_size)
    needed = config.calib_size * config.calib_seq
    available = 0
    for document in documents:
        available += len(encode(document)) + len(separator)
        if available >= needed:
            break
    if available < needed:
        raise ConfigError(
            f"calibration dataset {calib_dataset} holds {available:,} tokens; calib_size x calib_seq = "
            f"{config.calib_size} x {config.calib_seq} needs {needed:,}: give more text or lower "
            "--calib-size/--calib-seq"
        )
    return textdata.token_windows(
        documents, encode, config.calib_size, config.calib_seq, config.seed, separator=separator
    )


def calibration_batch_size(config: QuantizationConfig, model: Any, device: str) -> int:
    """`batch_size`, or for 0 the largest that fits GPU memory (modelopt's probe, as hf_ptq.py does)."""
    if config.batch_size > 0:
        return min(config.batch_size, config.calib_size)
    if device != "cuda":
        return min(CPU_AUTO_BATCH, config.calib_size)
    from modelopt.torch.utils.dataset_utils import get_max_batch_size

    return max(1, min(int(get_max_batch_size(model, max_sample_length=config.calib_seq)), config.calib_size))


def load_for_calibration(config: QuantizationConfig, model_dir: Path, device: str) -> tuple[Any, Any, str]:
    """The BF16 model, placed as the memory plan says (quant_release/plan.py); its input device; where it is.

    On one GPU when it fits (plain `.to`: no hooks in the forward). Else accelerate's device map: layers
    balanced over the visible GPUs, each capped so the calibration batch's activations still fit, and what
    does not fit offloaded to host memory (accelerate moves those weights in for each forward). Export then
    writes each tensor from where it lives: nothing is gathered onto one GPU.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model: Any
    if device != "cuda":
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)
        return model.eval(), torch.device("cpu"), "the CPU"
    shape = plan.ModelShape.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    machine = plan.Machine.detect(device)
    cap = plan.parse_bytes(config.max_gpu_memory) if config.max_gpu_memory else None
    workspace = plan.calibration_activation_bytes(shape, max(1, config.batch_size), config.calib_seq)
    placed = plan.place_model(shape, workspace, machine, cap)
    if not placed.device_map:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.bfloat16)
        return model.to("cuda").eval(), torch.device("cuda"), "one GPU"
    budget = plan.gpu_budget(machine, workspace, cap)
    max_memory: dict[int | str, int] = dict.fromkeys(range(machine.gpus), budget)
    max_memory["cpu"] = machine.usable_host
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.bfloat16, device_map="auto", max_memory=max_memory
    )
    model.eval()
    devices = sorted({str(d) for d in model.hf_device_map.values()})
    where = f"{machine.gpus} GPUs ({', '.join(devices)})" if placed.gpu_bytes else ", ".join(devices)
    return model, torch.device("cuda:0"), where


def run_quantize(
    config: QuantizationConfig, calib_dataset: str, source: ModelSource, device: str, out_dir: Path, progress: Progress
) -> QuantizedCheckpoint:
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoTokenizer

    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(source.model_dir))
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    windows = calibration_windows(
        calib_dataset, lambda text: tokenizer(text, add_special_tokens=False)["input_ids"], config, eos
    )
    calibration = CalibrationInfo(
        dataset=calib_dataset,
        samples=len(windows),
        seq_len=config.calib_seq,
        tokens=sum(len(w) for w in windows),
        fingerprint=textdata.fingerprint_tokens(windows),
    )
    progress.note("quantize", f"calibration: {calibration.samples} x {calibration.seq_len} tokens of {calib_dataset}")

    model, torch_device, where = load_for_calibration(config, source.model_dir, device)
    progress.note("quantize", f"BF16 model on {where}")
    batch_size = calibration_batch_size(config, model, device)
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]

    def forward_loop(calibrated: torch.nn.Module) -> None:
        with torch.inference_mode():
            for done, batch in enumerate(batches, start=1):
                calibrated(torch.tensor(batch, device=torch_device))
                progress.step("quantize", "calibration batches", done, len(batches))

    mtq.quantize(model, modelopt_config(config), forward_loop)
    if device == "cuda":
        torch.cuda.empty_cache()  # the calibration batches' blocks: export needs the room, not the cache
    checkpoint_dir = out_dir / "checkpoint"
    progress.note("quantize", "exporting unified HF checkpoint")
    with torch.inference_mode():
        export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=str(checkpoint_dir))
    for name in TOKENIZER_FILES:
        if (source.model_dir / name).is_file():
            shutil.copy2(source.model_dir / name, checkpoint_dir / name)

    # From here on only the files count: the in-memory model must not leak into the fidelity figures.
    del model
    quant = json.loads((checkpoint_dir / "hf_quant_config.json").read_text())["quantization"]
    check_export(config, quant)
    files = digest_dir(checkpoint_dir)
    report = measure_fidelity(config, source.model_dir, checkpoint_dir, device, eos, tokenizer, progress)
    return QuantizedCheckpoint(
        checkpoint_dir=checkpoint_dir,
        quant_algo=quant["quant_algo"],
        kv_cache_quant_algo=quant.get("kv_cache_quant_algo"),
        exclude_modules=list(quant.get("exclude_modules") or []),
        quantized_layers=sum(1 for name in tensor_shapes(checkpoint_dir) if name.endswith(".weight_scale")),
        calibration=calibration,
        modelopt_version=importlib.metadata.version("nvidia-modelopt"),
        files=files,
        fingerprint=fingerprint(files),
        fidelity=report,
    )


def measure_fidelity(
    config: QuantizationConfig,
    source_dir: Path,
    checkpoint_dir: Path,
    device: str,
    separator: list[int],
    tokenizer: Any,
    progress: Progress,
) -> FidelityReport | None:
    """fp32 vs BF16 vs the exported FP8 files on held-out text; None when --fidelity-tokens is 0."""
    if config.fidelity_tokens == 0:
        return None
    text, documents = fidelity.heldout_text()
    windows = fidelity.heldout_windows(
        lambda document: tokenizer(document, add_special_tokens=False)["input_ids"],
        config.fidelity_tokens,
        separator,
        documents,
    )
    figures = fidelity.measure(
        source_dir, checkpoint_dir, windows, device, lambda line: progress.note("quantize", line)
    )
    report = FidelityReport(
        text=text,
        tokens=figures.tokens,
        fingerprint=figures.fingerprint,
        reference="fp32 (transformers, the source checkpoint)",
        fp8_gemm="emulated",
        ppl_fp32=figures.ppl_fp32,
        ppl_bf16=figures.ppl_bf16,
        ppl_fp8=figures.ppl_fp8,
        kl_fp32_bf16=figures.bf16_vs_fp32.kl,
        kl_fp32_fp8=figures.fp8_vs_fp32.kl,
        kl_bf16_fp8=figures.fp8_vs_bf16.kl,
        top1_bf16_vs_fp32=figures.bf16_vs_fp32.top1,
        top1_fp8_vs_fp32=figures.fp8_vs_fp32.top1,
        top1_fp8_vs_bf16=figures.fp8_vs_bf16.top1,
    )
    progress.note(
        "quantize",
        f"fidelity on {report.tokens} held-out tokens: ppl fp32 {report.ppl_fp32:.2f} -> BF16 {report.ppl_bf16:.2f}"
        f" -> FP8 {report.ppl_fp8:.2f}; KL(BF16||FP8) {report.kl_bf16_fp8:.4f}; top-1 FP8 vs BF16"
        f" {report.top1_fp8_vs_bf16:.1%} (BF16 vs fp32 {report.top1_bf16_vs_fp32:.1%})",
    )
    return report


def check_fidelity_gate(record: QuantizedCheckpoint, config: QuantizationConfig) -> QuantizedCheckpoint:
    """The record with the gate's verdict; FidelityGateError, with the numbers, when it fails unaccepted."""
    report = record.fidelity
    if report is None:
        return record.model_copy(update={"gate": None})
    increase = report.ppl_increase
    passed = increase <= config.max_ppl_increase
    if not passed and not config.override_fidelity_gate:
        raise FidelityGateError(
            f"fidelity gate failed: FP8 perplexity {report.ppl_fp8:.3f} is {increase:+.2%} from BF16's "
            f"{report.ppl_bf16:.3f} (limit +{config.max_ppl_increase:.2%}; KL(BF16||FP8) {report.kl_bf16_fp8:.4f}, "
            f"top-1 vs BF16 {report.top1_fp8_vs_bf16:.1%}, {report.tokens} held-out tokens); the checkpoint is kept: "
            "--override-fidelity-gate accepts it, --max-ppl-increase changes the limit"
        )
    gate = FidelityGate(
        max_ppl_increase=config.max_ppl_increase,
        ppl_increase=increase,
        passed=passed,
        overridden=not passed,
    )
    return record.model_copy(update={"gate": gate})


@stage_task("quantize")
def quantize_task(ctx: RunContext) -> QuantizedCheckpoint:
    config = ctx.config.quantization
    source = ctx.results.get(ModelSource)
    calib_dataset, device = ctx.preflight.calib_dataset, ctx.preflight.device
    return ctx.runner.run(
        "quantize",
        cache_inputs(config, calib_dataset, source, device),
        lambda work: run_quantize(config, calib_dataset, source, device, work.dir, ctx.progress),
        accept=lambda record: check_fidelity_gate(record, config),
    )
