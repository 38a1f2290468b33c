"""The fidelity figures on a tiny random Llama and its real modelopt FP8 export, read from disk."""

from __future__ import annotations

import shutil
from pathlib import Path

from quant_release import fidelity
from tests.support.tiny import rewrite_safetensors


def _windows(model_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    encode = lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    return fidelity.heldout_windows(encode, 300, [], fidelity.heldout_text()[1])


def test_fp8_export_is_close_and_bf16_is_closer(tiny_llama: Path, tiny_fp8: Path) -> None:
    windows = _windows(tiny_llama)
    figures = fidelity.measure(tiny_llama, tiny_fp8, windows, "cpu")
    assert figures.tokens == 2 * fidelity.WINDOW_TOKENS  # 300 predictions round up to two windows
    # Self-consistency: fp32 -> BF16 moves less probability than BF16 -> FP8 does.
    assert 0 <= figures.bf16_vs_fp32.kl < figures.fp8_vs_bf16.kl
    assert figures.bf16_vs_fp32.top1 >= figures.fp8_vs_bf16.top1
    assert abs(figures.ppl_bf16 / figures.ppl_fp32 - 1) < 0.01


def test_lost_scales_show_up_as_a_large_kl(tiny_llama: Path, tiny_fp8: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_fp8, broken)

    def scale_up(tensors: dict[str, object]) -> dict[str, object]:
        return {n: t * 8 if n.endswith("weight_scale") else t for n, t in tensors.items()}  # type: ignore[operator]

    rewrite_safetensors(broken, scale_up)
    windows = _windows(tiny_llama)
    good = fidelity.measure(tiny_llama, tiny_fp8, windows, "cpu")
    bad = fidelity.measure(tiny_llama, broken, windows, "cpu")
    assert bad.fp8_vs_bf16.kl > 10 * good.fp8_vs_bf16.kl
    assert bad.ppl_fp8 > good.ppl_fp8
