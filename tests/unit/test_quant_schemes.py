"""Quantization schemes end to end: config → modelopt config → the quantize stage's export → the built-in engine;
and preflight refusing a scheme the chosen engine cannot run, before anything is calibrated."""

from __future__ import annotations

import copy
import dataclasses
import typing
from pathlib import Path

import pytest
import torch

from quant_release import schemes
from quant_release.checks import check_quant_scheme
from quant_release.config import QuantizationConfig, ReleaseConfig, Settings, SourceConfig
from quant_release.engines import ENGINES
from quant_release.errors import ConfigError, QuantReleaseError
from quant_release.progress import Progress
from quant_release.records import ModelSource
from tasks.quantize import check_export, modelopt_config, run_quantize


def test_config_choices_are_the_scheme_table() -> None:
    fields = QuantizationConfig.model_fields
    assert set(typing.get_args(fields["algorithm"].annotation)) == set(schemes.SCHEMES)
    assert set(typing.get_args(fields["kv_cache_qformat"].annotation)) == {
        schemes.NO_KV_QUANT,
        *schemes.KV_CACHE_FORMATS,
    }
    assert QuantizationConfig().algorithm == "fp8" and QuantizationConfig().kv_cache_qformat == "none"


def test_kv_cache_quantizers_are_appended_without_touching_modelopts_dicts() -> None:
    import modelopt.torch.quantization as mtq

    before = copy.deepcopy(mtq.FP8_PER_CHANNEL_PER_TOKEN_CFG)
    cfg = modelopt_config(QuantizationConfig(algorithm="fp8_pc_pt", kv_cache_qformat="fp8"))
    base = list(mtq.FP8_PER_CHANNEL_PER_TOKEN_CFG["quant_cfg"])
    # Appended after the scheme's entries: later entries win over its leading "*": disabled.
    assert cfg["quant_cfg"][: len(base)] == base
    assert cfg["quant_cfg"][len(base) :] == list(mtq.FP8_KV_CFG["quant_cfg"])
    assert before == mtq.FP8_PER_CHANNEL_PER_TOKEN_CFG
    assert modelopt_config(QuantizationConfig())["quant_cfg"] == list(mtq.FP8_DEFAULT_CFG["quant_cfg"])


def test_an_export_that_declares_another_scheme_is_refused() -> None:
    config = QuantizationConfig(algorithm="fp8_pc_pt", kv_cache_qformat="fp8")
    check_export(config, {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN", "kv_cache_quant_algo": "FP8"})
    with pytest.raises(QuantReleaseError, match="kv_cache_quant_algo None"):
        check_export(config, {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN", "kv_cache_quant_algo": None})
    with pytest.raises(QuantReleaseError, match="quant_algo 'FP8'"):
        check_export(config, {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8"})


# --- the quantize stage's export, loaded by the built-in engine ----------------------------------------


def _source(model_dir: Path) -> ModelSource:
    return ModelSource(
        kind="local",
        source=str(model_dir),
        revision=None,
        model_dir=model_dir,
        name="tiny",
        architecture="LlamaForCausalLM",
        num_parameters=0,
        files=[],
        fingerprint="tiny",
    )


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)[20:60]))
    return f"file:{path}"


@pytest.mark.parametrize(
    ("algorithm", "kv", "quant_algo"),
    [("fp8_pc_pt", "fp8", "FP8_PER_CHANNEL_PER_TOKEN"), ("fp8", "fp8", "FP8")],
)
def test_quantize_stage_export_runs_in_the_engine_with_an_fp8_cache(
    tiny_llama: Path, calib_file: str, tmp_path: Path, algorithm: str, kv: str, quant_algo: str
) -> None:
    from safetensors import safe_open

    from quant_release.engines.builtin import BuiltinBackend
    from quant_release.engines.llama import FP8_DTYPE, Fp8Weight

    config = QuantizationConfig(
        algorithm=algorithm,  # type: ignore[arg-type]
        kv_cache_qformat=kv,  # type: ignore[arg-type]
        calib_size=4,
        calib_seq=64,
        batch_size=2,
        fidelity_tokens=128,
    )
    record = run_quantize(config, calib_file, _source(tiny_llama), "cpu", tmp_path, Progress(enabled=False))
    assert (record.quant_algo, record.kv_cache_quant_algo) == (quant_algo, "FP8")
    assert record.fidelity is not None and record.fidelity.kl_bf16_fp8 > 0

    backend = BuiltinBackend()
    handle = backend.prepare("fp8", record.checkpoint_dir, tmp_path / "engine", "cpu", {"compile": "false"})
    engine = backend.load(handle)
    try:
        runtime = engine.runtime
        assert runtime.kv_dtype == FP8_DTYPE
        with safe_open(str(record.checkpoint_dir / "model.safetensors"), framework="pt") as f:
            stored = f.get_tensor("model.layers.1.self_attn.v_proj.v_scale")
            o_scale = f.get_tensor("model.layers.1.self_attn.o_proj.weight_scale")
        assert runtime.weights.layers[1].v_scale == stored
        o = runtime.weights.layers[1].o
        assert isinstance(o, Fp8Weight)
        if algorithm == "fp8_pc_pt":  # one scale per output channel, activations scaled per token at run time
            assert o_scale.shape == (o.weight.shape[0],) and o.input_scale is None
            assert torch.equal(o.weight_scale, o_scale.float())
        else:
            assert o_scale.dim() == 0 and o.input_scale is not None
        prompt = engine.encode("def main():\n    return")
        out = engine.generate([prompt], max_new_tokens=8)
        assert len(out[0]) == 8  # no stop tokens given: every step runs
        # The cache holds E4M3 codes for the prompt and the generated tokens.
        assert bool(runtime.k_cache[0, 0, :, : len(prompt)].view(torch.uint8).any())
    finally:
        engine.close()


# --- preflight ------------------------------------------------------------------------------------------


def _restrict(monkeypatch: pytest.MonkeyPatch, kind: str, **fields: tuple[str, ...]) -> None:
    monkeypatch.setitem(ENGINES, kind, dataclasses.replace(ENGINES[kind], **fields))


def test_every_registered_engine_runs_every_scheme_the_stage_exports() -> None:
    for scheme in schemes.SCHEMES:
        for kv in (schemes.NO_KV_QUANT, *schemes.KV_CACHE_FORMATS):
            config = ReleaseConfig.model_validate({"quantization": {"algorithm": scheme, "kv_cache_qformat": kv}})
            for kind in ENGINES:
                check_quant_scheme(config, kind, engine_needed=True, quantize_needed=True)


def test_a_scheme_the_engine_cannot_run_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    _restrict(monkeypatch, "vllm", quant_algos=("FP8",), kv_cache_quant_algos=())
    pc_pt = ReleaseConfig.model_validate({"quantization": {"algorithm": "fp8_pc_pt"}})
    with pytest.raises(ConfigError) as caught:
        check_quant_scheme(pc_pt, "vllm", engine_needed=True, quantize_needed=True)
    message = str(caught.value)
    assert "\n" not in message and "--quant-algo fp8_pc_pt" in message
    assert "engine vllm runs quant_algo FP8, not FP8_PER_CHANNEL_PER_TOKEN" in message
    kv = ReleaseConfig.model_validate({"quantization": {"kv_cache_qformat": "fp8"}})
    with pytest.raises(ConfigError, match="engine vllm runs KV-cache quantization none, not FP8"):
        check_quant_scheme(kv, "vllm", engine_needed=True, quantize_needed=False)
    # Only the stages that run decide: quantize alone needs the built-in loader, not vllm.
    check_quant_scheme(pc_pt, "vllm", engine_needed=False, quantize_needed=True)
    _restrict(monkeypatch, "builtin", quant_algos=("FP8",))
    with pytest.raises(ConfigError, match=r"engine builtin .* \(quantize measures fidelity with it"):
        check_quant_scheme(pc_pt, "vllm", engine_needed=False, quantize_needed=True)
    no_fidelity = ReleaseConfig.model_validate({"quantization": {"algorithm": "fp8_pc_pt", "fidelity_tokens": 0}})
    check_quant_scheme(no_fidelity, "vllm", engine_needed=False, quantize_needed=True)


def test_preflight_refuses_the_scheme_before_any_stage_runs(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.pipeline as pipeline

    _restrict(monkeypatch, "builtin", quant_algos=("FP8",))
    config = ReleaseConfig.model_validate(
        {"source": SourceConfig(model=str(tiny_llama)), "quantization": {"algorithm": "fp8_pc_pt"}}
    )
    with pytest.raises(ConfigError, match="exports quant_algo FP8_PER_CHANNEL_PER_TOKEN: engine builtin runs"):
        pipeline.preflight(config, Settings(state_dir=tmp_path / "state"), Progress(enabled=False))
    assert not (tmp_path / "state" / "stages").exists()
