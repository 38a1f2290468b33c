"""Quantization schemes and KV-cache formats: what quantize asks modelopt for, and what the export then says.

One table, read by the config (choices and `--help`), the quantize stage (which modelopt config to use and
what the exported `hf_quant_config.json` must declare) and preflight (whether the chosen engine runs the
result). Names follow modelopt's `examples/llm_ptq/hf_ptq.py` (`--qformat`, `--kv_cache_qformat`).
No torch or modelopt here: preflight and `--help` import this.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scheme:
    name: str  # the config value (hf_ptq.py's name)
    modelopt_config: str  # attribute of modelopt.torch.quantization holding its quant config
    exported_algo: str  # what export_hf_checkpoint writes (quant_algo, or kv_cache_quant_algo)
    description: str


SCHEMES: dict[str, Scheme] = {
    scheme.name: scheme
    for scheme in (
        Scheme(
            "fp8",
            "FP8_DEFAULT_CFG",
            "FP8",
            "W8A8 per-tensor E4M3, static activation scales from calibration (modelopt FP8_DEFAULT_CFG)",
        ),
        Scheme(
            "fp8_pc_pt",
            "FP8_PER_CHANNEL_PER_TOKEN_CFG",
            "FP8_PER_CHANNEL_PER_TOKEN",
            "W8A8 E4M3 with one weight scale per output channel and dynamic per-token activation scales "
            "computed at run time (modelopt FP8_PER_CHANNEL_PER_TOKEN_CFG)",
        ),
    )
}

NO_KV_QUANT = "none"
KV_CACHE_FORMATS: dict[str, Scheme] = {
    "fp8": Scheme(
        "fp8",
        "FP8_KV_CFG",
        "FP8",
        "E4M3 keys (after RoPE) and values with per-layer static scales k_scale/v_scale (modelopt FP8_KV_CFG)",
    ),
}


def exported_algos(scheme: str, kv_cache_qformat: str) -> tuple[str, str | None]:
    """(quant_algo, kv_cache_quant_algo) that modelopt's export writes for this scheme and KV format."""
    kv = KV_CACHE_FORMATS[kv_cache_qformat].exported_algo if kv_cache_qformat != NO_KV_QUANT else None
    return SCHEMES[scheme].exported_algo, kv
