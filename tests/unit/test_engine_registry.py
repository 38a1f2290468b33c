"""The engine registry: each engine's name and options model, and what the config and the CLI make of them."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from flows.cli import build_parser, config_from_args
from quant_release import engines
from quant_release.config import EngineConfig, ReleaseConfig, build_config
from quant_release.engines import (
    ENGINES,
    BuiltinOptions,
    EngineOptions,
    EngineSpec,
    VllmOptions,
    engine_spec,
    get_backend,
)
from quant_release.errors import ConfigError


def test_builtin_is_registered_with_its_options() -> None:
    spec = engine_spec("builtin")
    assert spec.options is BuiltinOptions
    assert "fp8_gemm" in BuiltinOptions.model_fields
    assert "fp8_gemm" not in EngineConfig.model_fields  # not a generic engine option any more
    assert type(get_backend("builtin")).__name__ == "BuiltinBackend"
    with pytest.raises(ValueError, match="unknown engine kind 'nope'; known: builtin"):
        engine_spec("nope")


def test_every_registered_engine_has_its_options_section() -> None:
    for name, spec in ENGINES.items():
        field = EngineConfig.model_fields[name]
        assert field.annotation is spec.options
    config = EngineConfig()
    assert config.options() == BuiltinOptions()


def test_fp8_gemm_flag_sets_the_builtin_engines_option() -> None:
    args = build_parser().parse_args(["run", "--fp8-gemm", "emulated", "--engine", "builtin"])
    config = config_from_args(args)
    assert config.engine.builtin.fp8_gemm == "emulated"
    assert config.engine.options() == BuiltinOptions(fp8_gemm="emulated")


def test_engine_options_flags_land_in_their_engines_section() -> None:
    args = build_parser().parse_args(
        ["run", "--engine", "vllm", "--vllm-tp", "2", "--vllm-enforce-eager", "--trtllm-backend", "tensorrt"]
    )
    config = config_from_args(args)
    assert config.engine.kind == "vllm"
    assert config.engine.options() == VllmOptions(tensor_parallel_size=2, enforce_eager=True)
    assert config.engine.tensorrt_llm.backend == "tensorrt"


def test_engine_choices_come_from_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    schema = ReleaseConfig.model_json_schema()
    assert schema["$defs"]["EngineConfig"]["properties"]["kind"]["enum"] == ["auto", *ENGINES]
    assert {"builtin", "tensorrt_llm", "vllm"} <= set(ENGINES)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--engine", "sglang"])
    assert "invalid choice: 'sglang'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"engine\.kind \(--engine\): .*unknown engine 'sglang'"):
        build_config({"engine": {"kind": "sglang"}})
    with pytest.raises(ConfigError, match=r"engine\.builtin\.fp8_gemm"):
        build_config({"engine": {"builtin": {"fp8_gemm": "fast"}}})


def test_handle_options_are_strings() -> None:
    assert BuiltinOptions(fp8_gemm="scaled_mm", compile=False).as_handle_options() == {
        "fp8_gemm": "scaled_mm",
        "max_batch_size": "256",
        "compile": "false",
    }
    # None is left out: the backend then uses the engine's own default.
    assert VllmOptions().as_handle_options() == {
        "tensor_parallel_size": "1",
        "gpu_memory_utilization": "0.9",
        "enforce_eager": "false",
    }


def test_an_engine_registered_twice_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engines, "ENGINES", dict(ENGINES))

    class ToyOptions(EngineOptions):
        pass

    spec = EngineSpec("toy", "toy: for this test", ToyOptions, "builtins:object", (), ())
    engines.register(spec)
    assert engines.engine_spec("toy") is spec
    with pytest.raises(ValueError, match="registered twice"):
        engines.register(spec)


def test_help_and_config_load_no_heavy_package() -> None:
    """`--help`, the flags and the options models must not import torch & co (they take seconds)."""
    code = (
        "import sys, json\n"
        "import flows.cli\n"
        "parser = flows.cli.build_parser()\n"
        "flows.cli.config_from_args(parser.parse_args(['run', '--fp8-gemm', 'emulated']))\n"
        "heavy = ('torch', 'transformers', 'modelopt', 'prefect', 'mlflow', 'deepspeed', 'datasets', 'boto3')\n"
        "print(json.dumps(sorted(m for m in heavy if m in sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(result.stdout) == []


def test_preflight_check_needs_the_engines_modules_and_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from quant_release.errors import EngineUnavailableError

    engines.check_available("builtin", "cpu")
    monkeypatch.setattr(engines, "ENGINES", dict(ENGINES))
    engines.register(
        EngineSpec(
            "gpu-only", "gpu-only: test", EngineOptions, "builtins:object", (), (), ("no_such_mod_qr",), ("cuda",)
        )
    )
    with pytest.raises(EngineUnavailableError, match="does not run on cpu; it runs on cuda") as info:
        engines.check_available("gpu-only", "cpu")
    assert info.value.exit_code == 4
    with pytest.raises(EngineUnavailableError, match="needs no_such_mod_qr, which is not installed"):
        engines.check_available("gpu-only", "cuda")


def test_gpu_engines_are_refused_at_preflight_without_their_package_or_gpu() -> None:
    # Neither tensorrt_llm nor vllm has a wheel for this project's CI machines: the check must say so in
    # one line, before any stage runs, without importing anything heavy.
    from quant_release.errors import EngineUnavailableError

    for kind, package in (("tensorrt_llm", "tensorrt_llm"), ("vllm", "vllm")):
        with pytest.raises(EngineUnavailableError, match=f"engine {kind} does not run on cpu"):
            engines.check_available(kind, "cpu")
        if importlib.util.find_spec(package) is None:
            with pytest.raises(EngineUnavailableError, match=f"engine {kind} needs {package}, which is not installed"):
                engines.check_available(kind, "cuda")


def test_auto_picks_the_first_installed_engine_that_runs_on_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    assert engines.resolve_engine("vllm", "cpu") == "vllm"  # a forced engine is left to check_available
    # Here neither tensorrt_llm nor vllm is installed (and neither runs on a CPU): auto is the built-in engine.
    assert engines.resolve_engine("auto", "cpu") == "builtin"
    # An engine that is installed (its module is json) and runs on the device wins over those after it.
    monkeypatch.setattr(engines, "ENGINES", dict(ENGINES))
    engines.register(EngineSpec("toy", "toy: test", EngineOptions, "builtins:object", (), (), ("json",), ("cpu",)))
    monkeypatch.setattr(engines, "AUTO_ORDER", ("tensorrt_llm", "toy", "builtin"))
    assert engines.resolve_engine("auto", "cpu") == "toy"
    assert engines.resolve_engine("auto", "cuda") == "builtin"  # toy does not run on cuda


def test_auto_is_a_choice_resolved_before_use() -> None:
    config = build_config({"engine": {"kind": "auto"}})
    assert config.engine.kind == "auto"
    with pytest.raises(RuntimeError, match="not been resolved"):
        config.engine.options()
    args = build_parser().parse_args(["run", "--engine", "auto"])
    assert config_from_args(args).engine.kind == "auto"
