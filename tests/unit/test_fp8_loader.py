"""The FP8 checkpoint loader: faithful to modelopt's quantized model, loud about broken checkpoints."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from quant_release.engines.fp8 import (
    FP8_DTYPE,
    CheckpointError,
    Fp8Linear,
    load_fp8_model,
    quantize_to_fp8,
    read_quant_config,
    resolve_gemm,
)
from tests.support.tiny import VOCAB, make_tiny_llama, rewrite_safetensors, set_quant_field

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny Llama, its modelopt-quantized in-memory model's logits, and the exported checkpoint."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("fp8")
    # gain=1: an unamplified network, so rounding differences do not grow chaotically through layers.
    bf16_dir = make_tiny_llama(root / "bf16", gain=1.0)
    model = AutoModelForCausalLM.from_pretrained(str(bf16_dir), dtype=torch.bfloat16).eval()
    generator = torch.Generator().manual_seed(3)
    calib = torch.randint(2, VOCAB, (4, 48), generator=generator)
    probe = torch.randint(2, VOCAB, (2, 40), generator=generator)

    def loop(m: Any) -> None:
        with torch.inference_mode():
            m(calib)

    mtq.quantize(model, mtq.FP8_DEFAULT_CFG, loop)
    with torch.inference_mode():
        reference = model(probe).logits.float()
        export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=str(root / "fp8"))
    return {"bf16_dir": bf16_dir, "fp8_dir": root / "fp8", "probe": probe, "reference": reference}


def _copy(checkpoint: Path, tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(checkpoint, target)
    return target


def _rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_loader_matches_modelopt_quantized_model_and_plain_transformers_does_not(quantized: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM

    model, replaced = load_fp8_model(quantized["fp8_dir"], CPU, "emulated")
    assert len(replaced) == 2 * 7  # q,k,v,o,gate,up,down per layer
    with torch.inference_mode():
        ours = model(quantized["probe"]).logits.float()
    ours_error = _rel_error(ours, quantized["reference"])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        naive = AutoModelForCausalLM.from_pretrained(str(quantized["fp8_dir"]), dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        naive_logits = naive(quantized["probe"]).logits.float()
    naive_error = _rel_error(naive_logits, quantized["reference"])

    # Same quantization, different kernels: only rounding separates us from modelopt's fake-quant model.
    assert ours_error < 0.05, ours_error
    # transformers drops the scales; we must be far closer than that.
    assert naive_error > 10 * ours_error, (naive_error, ours_error)


def test_scaled_mm_and_emulated_paths_agree(quantized: dict[str, Any]) -> None:
    emulated, _ = load_fp8_model(quantized["fp8_dir"], CPU, "emulated")
    real, _ = load_fp8_model(quantized["fp8_dir"], CPU, "scaled_mm")  # torch._scaled_mm also runs on CPU
    layer = real.model.layers[0].self_attn.q_proj
    assert isinstance(layer, Fp8Linear)
    assert layer.weight.dtype == FP8_DTYPE  # stays FP8 in memory for real FP8 GEMMs
    assert emulated.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16  # widened once, exactly
    assert torch.equal(emulated.model.layers[0].self_attn.q_proj.weight, layer.weight.to(torch.bfloat16))
    with torch.inference_mode():
        a = emulated(quantized["probe"]).logits.float()
        b = real(quantized["probe"]).logits.float()
    assert _rel_error(a, b) < 0.05


@pytest.mark.parametrize("gemm", ["emulated", "scaled_mm"])
def test_fp8_linear_computes_the_quantized_product(quantized: dict[str, Any], gemm: str) -> None:
    """One layer against the exact (fp32) evaluation of W8A8: q(x)·q(W)ᵀ with the stored scales."""
    model, _ = load_fp8_model(quantized["fp8_dir"], CPU, gemm)  # type: ignore[arg-type]
    layer = model.model.layers[1].mlp.up_proj
    x = torch.randn(3, 7, layer.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 2
    x_q = quantize_to_fp8(x, layer.input_scale).float() * layer.input_scale
    w = layer.weight.float() * layer.weight_scale
    exact = x_q @ w.T
    with torch.inference_mode():
        out = layer(x).float()
    assert _rel_error(out, exact) < 0.01


def test_tied_embeddings_share_storage(quantized: dict[str, Any]) -> None:
    model, _ = load_fp8_model(quantized["fp8_dir"], CPU, "emulated")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_quant_config_is_read(quantized: dict[str, Any]) -> None:
    config = read_quant_config(quantized["fp8_dir"])
    assert config.quant_algo == "FP8"
    assert "lm_head" in config.exclude_modules
    assert config.producer.startswith("modelopt")


def test_missing_scale_is_refused(quantized: dict[str, Any], tmp_path: Path) -> None:
    ckpt = _copy(quantized["fp8_dir"], tmp_path)
    rewrite_safetensors(ckpt, lambda t: {k: v for k, v in t.items() if k != "model.layers.1.mlp.down_proj.input_scale"})
    with pytest.raises(CheckpointError, match="down_proj has an FP8 weight but no input_scale"):
        load_fp8_model(ckpt, CPU, "emulated")


def test_per_channel_scale_is_refused(quantized: dict[str, Any], tmp_path: Path) -> None:
    ckpt = _copy(quantized["fp8_dir"], tmp_path)
    key = "model.layers.0.self_attn.q_proj.weight_scale"
    rewrite_safetensors(ckpt, lambda t: {**t, key: t[key].repeat(64)})
    with pytest.raises(CheckpointError, match="only per-tensor FP8"):
        load_fp8_model(ckpt, CPU, "emulated")


def test_zero_scale_is_refused(quantized: dict[str, Any], tmp_path: Path) -> None:
    ckpt = _copy(quantized["fp8_dir"], tmp_path)
    key = "model.layers.0.mlp.up_proj.weight_scale"
    rewrite_safetensors(ckpt, lambda t: {**t, key: torch.zeros_like(t[key])})
    with pytest.raises(CheckpointError, match="not a positive finite number"):
        load_fp8_model(ckpt, CPU, "emulated")


def test_unquantized_layer_that_is_not_excluded_is_refused(quantized: dict[str, Any], tmp_path: Path) -> None:
    ckpt = _copy(quantized["fp8_dir"], tmp_path)
    prefix = "model.layers.0.self_attn.o_proj"

    def dequantize(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {k: v for k, v in t.items() if not k.startswith(prefix + ".") or k == prefix + ".weight"}
        out[prefix + ".weight"] = t[prefix + ".weight"].to(torch.bfloat16)
        return out

    rewrite_safetensors(ckpt, dequantize)
    with pytest.raises(CheckpointError, match="o_proj is not excluded from quantization"):
        load_fp8_model(ckpt, CPU, "emulated")


def test_kv_cache_quantization_is_refused(quantized: dict[str, Any], tmp_path: Path) -> None:
    ckpt = _copy(quantized["fp8_dir"], tmp_path)
    set_quant_field(ckpt, "kv_cache_quant_algo", "FP8")
    with pytest.raises(CheckpointError, match="KV-cache quantization"):
        load_fp8_model(ckpt, CPU, "emulated")


def test_other_algorithms_are_refused(quantized: dict[str, Any], tmp_path: Path) -> None:
    ckpt = _copy(quantized["fp8_dir"], tmp_path)
    set_quant_field(ckpt, "quant_algo", "NVFP4")
    with pytest.raises(CheckpointError, match="FP8 only"):
        read_quant_config(ckpt)


def test_gemm_resolution_on_cpu() -> None:
    assert resolve_gemm("auto", CPU) == "emulated"
    assert resolve_gemm("emulated", CPU) == "emulated"
    with pytest.raises(CheckpointError, match="compute capability"):
        resolve_gemm("scaled_mm", CPU)


def test_activation_quantization_saturates_and_rounds() -> None:
    scale = torch.tensor(0.5)
    x = torch.tensor([0.0, 0.26, 1000.0, -1000.0])
    q = quantize_to_fp8(x, scale).float() * scale
    assert q[0] == 0.0
    assert q[1] == pytest.approx(0.25, abs=0.02)  # 0.52 on the E4M3 grid is 0.5
    assert q[2] == 448 * 0.5 and q[3] == -448 * 0.5  # saturated, not inf
