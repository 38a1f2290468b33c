"""quantize: FP8 post-training quantization with nvidia-modelopt, exported as a unified HF checkpoint.

W8A8, per-tensor E4M3 with static scales (`mtq.FP8_DEFAULT_CFG`): weight scales from the weights,
activation scales from max-calibration on real text. `export_hf_checkpoint` writes the format that
TensorRT-LLM, vLLM and SGLang load (`hf_quant_config.json`, `quantization_config` in config.json).
The export writes no tokenizer, so the tokenizer files are copied from the source.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from pathlib import Path
from typing import Any

from quant_release import calibration, textdata
from quant_release.config import QuantizationConfig
from quant_release.hashing import digest_dir, fingerprint, tensor_shapes
from quant_release.progress import Progress
from quant_release.records import CalibrationInfo, ModelSource, QuantizedCheckpoint
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
QUANT_CONFIGS = {"fp8": "FP8_DEFAULT_CFG"}


def cache_inputs(config: QuantizationConfig, calib_dataset: str, source: ModelSource, device: str) -> dict[str, Any]:
    return {
        "source_fingerprint": source.fingerprint,
        **config.model_dump(exclude={"calib_dataset"}),
        "calib_dataset": calib_dataset,
        "device": device,
    }


def calibration_windows(
    calib_dataset: str, encode: Any, config: QuantizationConfig, separator: list[int]
) -> list[list[int]]:
    """Token windows of `calib_seq_len` from a registered calibration source (quant_release/calibration/)."""
    documents = calibration.source(calib_dataset).documents(config.calib_samples)
    return textdata.token_windows(
        documents, encode, config.calib_samples, config.calib_seq_len, config.seed, separator=separator
    )


def run_quantize(
    config: QuantizationConfig, calib_dataset: str, source: ModelSource, device: str, out_dir: Path, progress: Progress
) -> QuantizedCheckpoint:
    import modelopt.torch.quantization as mtq
    import torch
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(str(source.model_dir))
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    windows = calibration_windows(
        calib_dataset, lambda text: tokenizer(text, add_special_tokens=False)["input_ids"], config, eos
    )
    calibration = CalibrationInfo(
        dataset=calib_dataset,
        samples=len(windows),
        seq_len=config.calib_seq_len,
        tokens=sum(len(w) for w in windows),
        fingerprint=textdata.fingerprint_tokens(windows),
    )
    progress.note("quantize", f"calibration: {calibration.samples} x {calibration.seq_len} tokens of {calib_dataset}")

    torch_device = torch.device("cuda" if device == "cuda" else "cpu")
    model: Any = AutoModelForCausalLM.from_pretrained(str(source.model_dir), dtype=torch.bfloat16)
    model = model.to(torch_device).eval()
    batches = [windows[i : i + config.calib_batch_size] for i in range(0, len(windows), config.calib_batch_size)]

    def forward_loop(calibrated: torch.nn.Module) -> None:
        with torch.inference_mode():
            for done, batch in enumerate(batches, start=1):
                calibrated(torch.tensor(batch, device=torch_device))
                progress.step("quantize", "calibration batches", done, len(batches))

    mtq.quantize(model, getattr(mtq, QUANT_CONFIGS[config.algorithm]), forward_loop)
    checkpoint_dir = out_dir / "checkpoint"
    progress.note("quantize", "exporting unified HF checkpoint")
    with torch.inference_mode():
        export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=str(checkpoint_dir))
    for name in TOKENIZER_FILES:
        if (source.model_dir / name).is_file():
            shutil.copy2(source.model_dir / name, checkpoint_dir / name)

    quant = json.loads((checkpoint_dir / "hf_quant_config.json").read_text())["quantization"]
    files = digest_dir(checkpoint_dir)
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
    )


@stage_task("quantize")
def quantize_task(ctx: RunContext) -> QuantizedCheckpoint:
    config = ctx.config.quantization
    source = ctx.results.get(ModelSource)
    calib_dataset, device = ctx.preflight.calib_dataset, ctx.preflight.device
    return ctx.runner.run(
        "quantize",
        cache_inputs(config, calib_dataset, source, device),
        lambda work: run_quantize(config, calib_dataset, source, device, work.dir, ctx.progress),
    )
