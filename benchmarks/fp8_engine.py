"""Built-in engine, BF16 vs FP8, on a random Llama of a real shape: correctness of the FP8 GEMM path, then throughput.

    python benchmarks/fp8_engine.py --shape llama-3.2-1b --out benchmarks/results/fp8_engine-h100.json

The model goes through the same steps as a release: save_pretrained (BF16) → modelopt FP8_DEFAULT_CFG →
export_hf_checkpoint → our FP8 loader. Random weights are fine for speed and for checking that the FP8 GEMM
computes W8A8 correctly; they say nothing about accuracy (that is what the pipeline's MMLU stage measures).

Checks, per FP8 mode (scaled_mm where the GPU has FP8 units, emulated everywhere):
  * one layer's output against the exact fp32 evaluation of q(x)·q(W)ᵀ·s_x·s_w (relative error),
  * full-model logits of scaled_mm against emulated (same quantization, different kernels).
Throughput: the engine's own `benchmark` (static batches, EOS ignored), eager PyTorch, same workload for both.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quant_release.engines.base import BenchmarkWorkload  # noqa: E402
from quant_release.engines.builtin import BuiltinBackend, BuiltinEngine  # noqa: E402
from quant_release.engines.fp8 import Fp8Linear, quantize_to_fp8, scaled_mm_supported  # noqa: E402
from tests.support.tiny import train_tokenizer  # noqa: E402

SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"hidden": 128, "inter": 384, "layers": 2, "heads": 4, "kv": 2, "vocab": 4096},
    "llama-3.2-1b": {"hidden": 2048, "inter": 8192, "layers": 16, "heads": 32, "kv": 8, "vocab": 128256},
    "llama-3.1-8b": {"hidden": 4096, "inter": 14336, "layers": 32, "heads": 32, "kv": 8, "vocab": 128256},
}
# (batch, input tokens, output tokens): latency-bound, mid, throughput-bound.
WORKLOADS = [(1, 128, 128), (8, 512, 128), (32, 512, 128)]


def build_checkpoints(shape: dict[str, int], work: Path, device: torch.device) -> tuple[Path, Path, float]:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import LlamaConfig, LlamaForCausalLM

    start = time.perf_counter()
    config = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["inter"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv"],
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
    )
    config.architectures = ["LlamaForCausalLM"]  # export_hf_checkpoint reads it
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    bf16_dir, fp8_dir = work / "bf16", work / "fp8"
    model.save_pretrained(str(bf16_dir))
    train_tokenizer(bf16_dir)  # tiny BPE: prompts are token ids here, the engine only needs a tokenizer to load
    generator = torch.Generator().manual_seed(1)
    calib = [torch.randint(2, shape["vocab"], (4, 256), generator=generator).to(device) for _ in range(4)]

    def loop(m: Any) -> None:
        with torch.inference_mode():
            for batch in calib:
                m(batch)

    mtq.quantize(model, mtq.FP8_DEFAULT_CFG, loop)
    with torch.inference_mode():
        export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=str(fp8_dir))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(bf16_dir / name, fp8_dir / name)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return bf16_dir, fp8_dir, time.perf_counter() - start


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def layer_check(engine: BuiltinEngine) -> dict[str, float]:
    """Each FP8 layer kind once: output vs the exact fp32 W8A8 product, on fresh random inputs."""
    out: dict[str, float] = {}
    layers = engine.model.model.layers
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj"):
        layer = layers[len(layers) // 2].get_submodule(name)
        assert isinstance(layer, Fp8Linear)
        x = torch.randn(3, 37, layer.in_features, device=engine.device).to(torch.bfloat16) * 2
        exact = (quantize_to_fp8(x, layer.input_scale).float() * layer.input_scale) @ (
            layer.weight.float() * layer.weight_scale
        ).T
        with torch.inference_mode():
            got = layer(x)
        assert torch.isfinite(got).all()
        out[name] = rel_error(got.float(), exact)
    return out


def load(handle_dir: Path, variant: str, gemm: str, device: str) -> tuple[BuiltinEngine, float]:
    backend = BuiltinBackend()
    options = {"fp8_gemm": gemm} if variant == "fp8" else {}
    handle = backend.prepare(variant, handle_dir, handle_dir, device, options)  # type: ignore[arg-type]
    start = time.perf_counter()
    engine = backend.load(handle)
    return engine, time.perf_counter() - start


def run_shape(name: str, device: torch.device, work: Path, requests_per_batch: int) -> dict[str, Any]:
    shape = SHAPES[name]
    bf16_dir, fp8_dir, build_seconds = build_checkpoints(shape, work, device)
    result: dict[str, Any] = {"shape": name, **shape, "build_seconds": build_seconds, "variants": {}}
    modes = ["scaled_mm", "emulated"] if scaled_mm_supported(device) else ["emulated"]
    generator = torch.Generator().manual_seed(2)
    probe = torch.randint(2, shape["vocab"], (1, 64), generator=generator).to(device)
    logits: dict[str, torch.Tensor] = {}
    variants = [("bf16", "bf16", bf16_dir)] + [(f"fp8-{m}", m, fp8_dir) for m in modes]
    for label, gemm, directory in variants:
        engine, load_seconds = load(directory, "fp8" if label.startswith("fp8") else "bf16", gemm, device.type)
        entry: dict[str, Any] = {"load_seconds": load_seconds, "weight_bytes": engine.weight_bytes()}
        if label.startswith("fp8"):
            entry["layer_rel_error_vs_exact"] = layer_check(engine)
        with torch.inference_mode():
            logits[label] = engine.model(probe).logits.float()
        entry["throughput"] = []
        # Emulated FP8 is a fidelity path, not a fast path: time it only where it is the only FP8 path.
        if label != "fp8-emulated" or len(modes) == 1:
            for batch, input_len, output_len in WORKLOADS:
                count = batch * requests_per_batch
                prompts = torch.randint(2, shape["vocab"], (count + batch, input_len), generator=generator).tolist()
                workload = BenchmarkWorkload(
                    prompts=prompts[batch:], output_len=output_len, batch_size=batch, warmup_requests=batch
                )
                # Twice: the spread between identical runs is the noise floor for the BF16/FP8 comparison.
                runs = [engine.benchmark(workload) for _ in range(2)]
                measured = max(runs, key=lambda m: m.output_tok_s)
                entry["throughput"].append(
                    {
                        "batch": batch,
                        "input_len": input_len,
                        "output_len": output_len,
                        **measured.model_dump(),
                        "repeat_tok_s": [m.output_tok_s for m in runs],
                        # Consistency: wall time vs what the per-batch TTFT/TPOT medians add up to.
                        "expected_seconds_from_medians": requests_per_batch
                        * (measured.ttft_ms_p50 + (output_len - 1) * measured.tpot_ms_p50)
                        / 1e3,
                    }
                )
                print(
                    f"{name:14s} {label:14s} batch {batch:3d}: {measured.output_tok_s:9.1f} tok/s  "
                    f"TTFT {measured.ttft_ms_p50:8.1f} ms  TPOT {measured.tpot_ms_p50:7.2f} ms",
                    flush=True,
                )
        result["variants"][label] = entry
        engine.close()
        del engine
        gc.collect()
    if "fp8-scaled_mm" in logits:
        result["logits_rel_error_scaled_mm_vs_emulated"] = rel_error(logits["fp8-scaled_mm"], logits["fp8-emulated"])
    fp8_label = f"fp8-{modes[0]}"
    result["fp8_logits_rel_error_vs_bf16"] = rel_error(logits[fp8_label], logits["bf16"])
    result["speedup"] = [
        {"batch": b["batch"], "fp8_over_bf16": f["output_tok_s"] / b["output_tok_s"]}
        for b, f in zip(
            result["variants"]["bf16"]["throughput"], result["variants"][fp8_label]["throughput"], strict=True
        )
    ]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES), help="repeatable; default llama-3.2-1b")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--requests-per-batch", type=int, default=3, help="timed batches per workload")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}"
    report: dict[str, Any] = {
        "benchmark": "fp8_engine",
        "device": device_name,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "engine": "builtin (eager PyTorch, static batching)",
        "workloads": WORKLOADS,
        "results": [],
    }
    for name in args.shape or ["llama-3.2-1b"]:
        with tempfile.TemporaryDirectory() as tmp:
            report["results"].append(run_shape(name, device, Path(tmp), args.requests_per_batch))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))  # after each shape, so a timeout keeps what finished
    print(json.dumps({r["shape"]: r["speedup"] for r in report["results"]}, indent=1))


if __name__ == "__main__":
    main()
