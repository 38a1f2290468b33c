"""The quantize stage's time and peak memory per step on a real model shape, next to the memory plan's prediction.

    python benchmarks/quantize_memory.py --shape llama-3.1-8b --out benchmarks/results/quantize_memory-h200.json
    python benchmarks/quantize_memory.py --shape tiny --calib-size 16 --out /tmp/q.json    # CPU smoke run

A random BF16 checkpoint of the shape (normal, std 0.02, as transformers initializes a Llama) is written
to a work directory, then the stage's own steps run on it: `load_for_calibration` (placement from the
memory plan), modelopt's `mtq.quantize` with the scheme's config over `calib_size` x `calib_seq`
calibration tokens, `export_hf_checkpoint`, and the fidelity check's three models
(quant_release/fidelity.py). Calibration tokens are random ids: memory and time do not depend on the
text. Random weights say nothing about accuracy.

Each step reports wall time, peak host RSS, and peak GPU memory per GPU (PyTorch's caching allocator's
peak reserved bytes, quant_release/memory.py), next to what quant_release/plan.py predicted for it on
this machine. Cases: `single` (the model on one GPU when it fits) and, with `--offload-cap SIZE`, the
same with each GPU capped at SIZE, so that the plan splits the model and offloads the rest to host
memory (the path a model larger than the GPUs takes).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quant_release import fidelity, plan  # noqa: E402
from quant_release.config import QuantizationConfig  # noqa: E402
from quant_release.memory import PeakMemory  # noqa: E402
from tasks.quantize import load_for_calibration, modelopt_config  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 2, "num_attention_heads": 8,
             "num_key_value_heads": 2, "vocab_size": 49152},
    "llama-3.1-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256},
    "llama-3.1-70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                      "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256},
}  # fmt: skip


def init_random_(model: Any) -> None:
    """Norm weights 1, every other weight normal with std 0.02 (as transformers initializes a Llama)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)


def write_random_checkpoint(shape: dict[str, Any], out_dir: Path, device: str) -> None:
    """A Llama of `shape` with random BF16 weights, saved as transformers would (safetensors shards)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **shape,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(torch.bfloat16)
    init_random_(model)
    model.save_pretrained(str(out_dir), max_shard_size="5GB")  # RoPE's inv_freq is not saved: no need to init it
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measured(peak: PeakMemory, seconds: float) -> dict[str, Any]:
    return {
        "seconds": round(seconds, 2),
        "peak_rss_bytes": peak.rss_bytes,
        "peak_gpu_bytes": dict(peak.gpu_bytes),
    }


def predicted(step: plan.StepNeed | None) -> dict[str, Any]:
    if step is None:
        return {}
    return {"predicted_gpu_bytes": list(step.gpu_bytes), "predicted_host_bytes": step.host_bytes, "where": step.note}


def ratio(result: dict[str, Any]) -> None:
    """measured / predicted peak on the busiest GPU, where both exist."""
    gpu, want = result.get("peak_gpu_bytes") or {}, result.get("predicted_gpu_bytes") or []
    if gpu and want:
        result["measured_over_predicted"] = round(max(gpu.values()) / max(want), 3)


def planned_steps(
    shape: plan.ModelShape, config: QuantizationConfig, device: str, with_fidelity: bool
) -> dict[str, plan.StepNeed]:
    """The memory plan's quantize steps for this machine, by first word (calibrate, export, fidelity)."""
    memory_plan = plan.plan_release(
        shape,
        plan.Machine.detect(device),
        {"quantize"},
        calib_batch=config.batch_size,
        calib_seq=config.calib_seq,
        per_channel=config.algorithm == "fp8_pc_pt",
        fidelity_tokens=config.fidelity_tokens if with_fidelity else 0,
        engine="builtin",
        engine_tokens=0,
        fp8_kv_cache=False,
        max_gpu_bytes=plan.parse_bytes(config.max_gpu_memory) if config.max_gpu_memory else None,
    )
    return {step.step.split(" ")[0]: step for step in memory_plan.steps}


def calibrate_and_export(
    name: str,
    model: Any,
    windows: torch.Tensor,
    input_device: Any,
    config: QuantizationConfig,
    steps: dict[str, plan.StepNeed],
    export_dir: Path,
    device: str,
    out: dict[str, Any],
) -> str | None:
    """The stage's calibration and export, each step measured into `out["steps"]`; the export's error, if any."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint

    batch = config.batch_size

    def forward_loop(calibrated: torch.nn.Module) -> None:
        with torch.inference_mode():
            for first in range(0, config.calib_size, batch):
                calibrated(windows[first : first + batch].to(input_device))

    with PeakMemory() as peak:
        started = time.perf_counter()
        mtq.quantize(model, modelopt_config(config), forward_loop)
        sync(device)
    out["steps"]["calibrate"] = {**measured(peak, time.perf_counter() - started), **predicted(steps.get("calibrate"))}
    print(f"[{name}] calibrate: {out['steps']['calibrate']}", flush=True)

    shutil.rmtree(export_dir, ignore_errors=True)
    if device == "cuda":
        torch.cuda.empty_cache()  # as the stage does between calibration and export
    with PeakMemory() as peak:
        started = time.perf_counter()
        try:
            with torch.inference_mode():
                export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=str(export_dir))
            error = None
        except Exception as exc:  # recorded, not hidden: a path that does not export is a finding
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    out["steps"]["export"] = {**measured(peak, time.perf_counter() - started), **predicted(steps.get("export"))}
    if error:
        out["steps"]["export"]["error"] = error
    else:
        files = [p for p in export_dir.iterdir() if p.suffix == ".safetensors"]
        out["steps"]["export"]["disk_bytes"] = sum(p.stat().st_size for p in files)
        out["steps"]["export"]["predicted_disk_bytes"] = steps["export"].disk_bytes
    print(f"[{name}] export: {out['steps']['export']}", flush=True)
    return error


def run_case(
    name: str,
    model_dir: Path,
    work: Path,
    config: QuantizationConfig,
    device: str,
    with_fidelity: bool,
) -> dict[str, Any]:

    shape = plan.ModelShape.from_hf_config(json.loads((model_dir / "config.json").read_text()))
    steps = planned_steps(shape, config, device, with_fidelity)
    out: dict[str, Any] = {"case": name, "max_gpu_memory": config.max_gpu_memory, "steps": {}}
    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(0, shape.vocab, (config.calib_size, config.calib_seq), generator=generator)

    with PeakMemory() as peak:
        started = time.perf_counter()
        model, input_device, where = load_for_calibration(config, model_dir, device)
    out["placement"] = where
    out["steps"]["load"] = measured(peak, time.perf_counter() - started)
    print(f"[{name}] load: {out['steps']['load']} on {where}", flush=True)

    export_dir = work / f"export-{name}"
    error = calibrate_and_export(name, model, windows, input_device, config, steps, export_dir, device, out)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()

    if with_fidelity and not error:
        fidelity_windows = torch.randint(0, shape.vocab, (4, fidelity.WINDOW_TOKENS + 1), generator=generator)
        with PeakMemory() as peak:
            started = time.perf_counter()
            fidelity.measure(model_dir, export_dir, fidelity_windows.tolist(), device)
        out["steps"]["fidelity"] = {
            **measured(peak, time.perf_counter() - started),
            **predicted(steps.get("fidelity")),
        }
        print(f"[{name}] fidelity: {out['steps']['fidelity']}", flush=True)
    for step in out["steps"].values():
        ratio(step)
    shutil.rmtree(export_dir, ignore_errors=True)
    return out


def run_in_memory_case(
    shape_config: dict[str, Any], work: Path, config: QuantizationConfig, device: str
) -> dict[str, Any]:
    """Calibrate and export a model built straight in GPU memory (no checkpoint on disk), for shapes whose BF16
    checkpoint the machine's disk cannot hold. No fidelity step (it reads the BF16 files)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf_config = LlamaConfig(
        **shape_config,
        max_position_embeddings=131072,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
        dtype="bfloat16",
    )
    shape = plan.ModelShape.from_hf_config(hf_config.to_dict())
    steps = planned_steps(shape, config, device, with_fidelity=False)
    out: dict[str, Any] = {"case": "in-memory", "params": shape.params, "steps": {}}
    with PeakMemory() as peak:
        started = time.perf_counter()
        default_dtype = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)  # built in BF16: an fp32 build would need twice the memory
        try:
            with torch.device("meta"):
                model: Any = LlamaForCausalLM(hf_config)
        finally:
            torch.set_default_dtype(default_dtype)
        model = model.to_empty(device=device)
        init_random_(model)
        model.model.rotary_emb = LlamaRotaryEmbedding(config=hf_config, device=device)
        model.eval()
        sync(device)
    out["placement"] = f"{device}, built in memory"
    out["steps"]["build"] = measured(peak, time.perf_counter() - started)
    print(f"[in-memory] build: {out['steps']['build']}", flush=True)
    if device == "cuda":
        torch.cuda.empty_cache()
    generator = torch.Generator().manual_seed(0)
    windows = torch.randint(0, shape.vocab, (config.calib_size, config.calib_seq), generator=generator)
    export_dir = work / "export-in-memory"
    error = calibrate_and_export("in-memory", model, windows, device, config, steps, export_dir, device, out)
    if error:
        raise RuntimeError(f"export failed: {error}")
    for step in out["steps"].values():
        ratio(step)
    shutil.rmtree(export_dir, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    parser.add_argument("--calib-size", type=int, default=512)
    parser.add_argument("--calib-seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="calibration batch size")
    parser.add_argument("--algorithm", default="fp8", choices=["fp8", "fp8_pc_pt"])
    parser.add_argument("--offload-cap", help="also run with each GPU capped at this size (e.g. 12GiB)")
    parser.add_argument("--offload-calib-size", type=int, default=64, help="calibration samples when offloading")
    parser.add_argument("--work", type=Path, default=Path("/tmp/quantize-memory"))
    parser.add_argument("--layers", type=int, help="override the shape's layer count (e.g. one GPU's share)")
    parser.add_argument(
        "--in-memory", action="store_true", help="build the model in GPU memory, no BF16 checkpoint on disk"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    args.work.mkdir(parents=True, exist_ok=True)
    shape_config = {**SHAPES[args.shape], **({"num_hidden_layers": args.layers} if args.layers else {})}
    import modelopt

    config = QuantizationConfig(
        algorithm=args.algorithm, calib_size=args.calib_size, calib_seq=args.calib_seq, batch_size=args.batch
    )
    machine = plan.Machine.detect(device)
    result: dict[str, Any] = {
        "benchmark": "quantize_memory",
        "device": torch.cuda.get_device_name(0) if device == "cuda" else f"CPU {platform.machine()}",
        "gpus": machine.gpus,
        "gpu_total_bytes": machine.gpu_bytes,
        "host_total_bytes": machine.host_bytes,
        "torch": torch.__version__,
        "modelopt": modelopt.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "shape": {"name": args.shape, **shape_config},
        "calibration": {"size": args.calib_size, "seq": args.calib_seq, "batch": args.batch},
        "algorithm": args.algorithm,
        "cases": [],
    }
    if args.in_memory:
        result["cases"].append(run_in_memory_case(shape_config, args.work, config, device))
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return
    model_dir = args.work / "bf16"
    shutil.rmtree(model_dir, ignore_errors=True)
    started = time.perf_counter()
    write_random_checkpoint(shape_config, model_dir, device)
    result["checkpoint_write_seconds"] = round(time.perf_counter() - started, 1)
    result["cases"].append(run_case("single", model_dir, args.work, config, device, with_fidelity=True))
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.offload_cap and device == "cuda":
        capped = config.model_copy(update={"max_gpu_memory": args.offload_cap, "calib_size": args.offload_calib_size})
        try:
            result["cases"].append(run_case("offload", model_dir, args.work, capped, device, with_fidelity=False))
        except Exception as exc:
            result["cases"].append({"case": "offload", "error": f"{type(exc).__name__}: {exc}"[:500]})
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(model_dir, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
