"""Tiny random Llamas with a real (small) BPE tokenizer, for fast unit tests of loaders and engines.

Random weights say nothing about quantization fidelity (flat logits); tests that need fidelity use
SmolLM2. These exist to exercise shapes, file formats and code paths in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

VOCAB = 384


def train_tokenizer(out_dir: Path) -> Any:
    """A byte-level BPE tokenizer trained on a slice of CPython's docs, saved as a fast tokenizer."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    texts = [topics[k] for k in sorted(topics)[:20]]
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(out_dir))
    return fast


def make_tiny_llama(
    out_dir: Path, *, layers: int = 2, hidden: int = 64, tied: bool = True, seed: int = 0, gain: float = 8.0
) -> Path:
    """Save a random BF16 LlamaForCausalLM (plus tokenizer) the way a Hub checkpoint looks.

    `gain` scales the matrices: 8 spreads the logits so argmax tests mean something, but makes the
    network chaotic (tiny rounding differences grow layer by layer); use 1 to compare numerics.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tied,
        bos_token_id=0,
        eos_token_id=1,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.mul_(gain)
    model.save_pretrained(str(out_dir))
    train_tokenizer(out_dir)
    return out_dir


def fp8_config(kv_cache: bool = False) -> dict[str, Any]:
    """modelopt's FP8_DEFAULT_CFG, with `kv_cache` its FP8 KV-cache quantizers (FP8_KV_CFG) added."""
    import copy

    import modelopt.torch.quantization as mtq

    config: dict[str, Any] = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    if kv_cache:
        config["quant_cfg"] = list(config["quant_cfg"]) + list(mtq.FP8_KV_CFG["quant_cfg"])
    return config


def make_fp8_checkpoint(bf16_dir: Path, out_dir: Path, calib_batches: int = 2, kv_cache: bool = False) -> Path:
    """modelopt FP8_DEFAULT_CFG (+ FP8 KV cache) + export_hf_checkpoint on the tiny model, tokenizer copied."""
    import shutil

    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(bf16_dir), dtype=torch.bfloat16).eval()
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(2, VOCAB, (2, 32), generator=generator) for _ in range(calib_batches)]

    def loop(m: Any) -> None:
        with torch.inference_mode():
            for batch in batches:
                m(batch)

    mtq.quantize(model, fp8_config(kv_cache), loop)
    with torch.inference_mode():
        export_hf_checkpoint(model, dtype=torch.bfloat16, export_dir=str(out_dir))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (bf16_dir / name).exists():
            shutil.copy2(bf16_dir / name, out_dir / name)
    return out_dir


def rewrite_safetensors(checkpoint_dir: Path, edit: Any) -> None:
    """Apply `edit(tensors) -> tensors` to the checkpoint's single shard, in place."""
    from safetensors.torch import load_file, save_file

    shard = checkpoint_dir / "model.safetensors"
    tensors = load_file(str(shard))
    save_file(edit(tensors), str(shard), metadata={"format": "pt"})


def set_quant_field(checkpoint_dir: Path, key: str, value: Any) -> None:
    path = checkpoint_dir / "hf_quant_config.json"
    data = json.loads(path.read_text())
    data["quantization"][key] = value
    path.write_text(json.dumps(data))
