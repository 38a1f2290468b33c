"""Issue 10's late or noisy failures, each through the real console script: one line, the README's exit
code, at preflight (nothing in `stages/`, no MLflow store, no half-written file, within seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.unit.test_cli_bad_input import FAST_SECONDS, PREFIX, Env, assert_bad_input, cli, llama_dir

__all__ = ["cli", "llama_dir"]  # fixtures shared with test_cli_bad_input


def _nothing_recorded(state_dir: Path) -> None:
    assert not (state_dir / "mlflow.db").exists()
    assert not state_dir.exists() or list(state_dir.rglob("summary.json")) == []


def test_scaled_mm_without_fp8_gemms_is_exit_4_at_preflight(cli: Env, llama_dir: Path) -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this machine has FP8 GEMMs")
    result = cli.run("run", "--model", str(llama_dir), "--fp8-gemm", "scaled_mm")
    assert_bad_input(result, "--fp8-gemm scaled_mm", "emulated", code=4)
    _nothing_recorded(cli.state_dir)


def test_cnn_dailymail_with_the_hub_unreachable_is_exit_2_quietly(cli: Env, llama_dir: Path) -> None:
    result = cli.run("run", "--model", str(llama_dir), "--calib-dataset", "cnn_dailymail")
    assert_bad_input(result, "--calib-dataset cnn_dailymail", cli.hub_endpoint, "python-docs")
    assert result.seconds < 15, result.seconds  # no retry loop against a closed port
    _nothing_recorded(cli.state_dir)


@pytest.mark.parametrize(("content", "needle"), [("not json {", "not valid JSON"), ("[]", "JSON object")])
def test_local_config_json_that_is_not_a_json_object(cli: Env, llama_dir: Path, content: str, needle: str) -> None:
    (llama_dir / "config.json").write_text(content)
    assert_bad_input(cli.run("run", "--model", str(llama_dir)), str(llama_dir), "config.json", needle)


def test_malformed_environment_variable_is_named(cli: Env) -> None:
    result = cli.run("run", env={"QUANT_RELEASE_PROGRESS": "maybe"})
    assert_bad_input(result, "QUANT_RELEASE_PROGRESS", "'maybe'")


@pytest.mark.parametrize("flag", ["--state-dir", "--summary-json"])
def test_empty_path_flags_are_refused(cli: Env, flag: str) -> None:
    result = cli.run("run", flag, "")
    assert result.code == 2
    assert result.stderr_lines == [
        f"quant-release run: error: argument {flag}: must not be empty (see quant-release run --help)"
    ]
    assert not (cli.root / "stages").exists()
    assert not (cli.root / "mlflow.db").exists()


def test_misspelled_stage_is_one_line_with_the_valid_names(cli: Env) -> None:
    result = cli.run("run", "--stages", "quantise")
    assert result.code == 2
    assert len(result.stderr_lines) == 1, result.stderr
    line = result.stderr_lines[0]
    assert "'quantise'" in line
    for name in ("download", "quantize", "build", "evaluate", "benchmark", "publish"):
        assert name in line
    assert result.seconds < FAST_SECONDS


def test_unwritable_summary_json_is_refused_before_the_run(cli: Env, llama_dir: Path) -> None:
    blocker = cli.root / "a-file"
    blocker.write_text("")
    # A regular file where a directory is needed: unwritable even for root (this suite may run as root).
    target = blocker / "summary.json"
    result = cli.run("run", "--model", str(llama_dir), "--summary-json", str(target))
    assert_bad_input(result, "--summary-json", str(blocker))
    assert not cli.state_dir.exists()


def test_summary_json_that_is_a_directory(cli: Env, llama_dir: Path) -> None:
    result = cli.run("run", "--model", str(llama_dir), "--summary-json", str(cli.root))
    assert_bad_input(result, "--summary-json", "is a directory")


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_unwritable_state_dir_with_artifacts_elsewhere(cli: Env, llama_dir: Path, where: str) -> None:
    blocker = cli.root / "a-file"
    blocker.write_text("")
    state = blocker / "state" if where == "under-a-file" else Path("/proc/quant-release-state")
    artifacts = cli.root / "artifacts"
    result = cli.run(
        "run", "--model", str(llama_dir), "--state-dir", str(state), env={"QUANT_RELEASE_ARTIFACT_URI": str(artifacts)}
    )
    assert_bad_input(result, "state dir", str(state))
    assert not artifacts.exists()


def test_evaluate_with_mmlu_switched_off_runs_nothing(cli: Env, llama_dir: Path) -> None:
    assert_bad_input(cli.run("evaluate", "--model", str(llama_dir), "--no-mmlu"), "nothing to run", "--mmlu")


def test_rerun_of_a_stage_not_selected(cli: Env, llama_dir: Path) -> None:
    result = cli.run("run", "--model", str(llama_dir), "--stages", "download", "--rerun", "benchmark")
    assert_bad_input(result, "--rerun benchmark", "not selected")


def test_revision_with_a_local_directory(cli: Env, llama_dir: Path) -> None:
    result = cli.run("run", "--model", str(llama_dir), "--revision", "v1.0")
    assert_bad_input(result, "--revision v1.0", "local directory")


def test_revision_in_a_config_file_with_a_local_directory_names_it_too(cli: Env, llama_dir: Path) -> None:
    config = cli.root / "release.yaml"
    config.write_text(f"source:\n  model: {llama_dir}\n  revision: main\n")
    assert_bad_input(cli.run("run", "--config", str(config)), "--revision main")


def test_bench_input_len_beyond_the_models_context(cli: Env, llama_dir: Path) -> None:
    config = json.loads((llama_dir / "config.json").read_text())
    (llama_dir / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 256}))
    result = cli.run("run", "--model", str(llama_dir), "--bench-input-len", "300")
    assert_bad_input(result, "--bench-input-len 300", "context of 256")


def test_hub_repo_id_without_push_to_hub_warns_in_one_line(cli: Env, llama_dir: Path) -> None:
    # The warning comes from preflight; the run then stops at the missing upstream (exit 3, nothing recorded).
    result = cli.run("publish", "--model", str(llama_dir), "--hub-repo-id", "org/name", "--mmlu-questions", "1")
    warnings = [line for line in result.stderr_lines if line.startswith("quant-release: warning:")]
    assert len(warnings) == 1, result.stderr
    assert "--hub-repo-id org/name without --push-to-hub" in warnings[0]
    assert result.code == 3, result.stderr
    errors = [line for line in result.stderr_lines if line.startswith(PREFIX)]
    assert errors and "download, quantize, build, evaluate, benchmark" in errors[0], result.stderr
    _nothing_recorded(cli.state_dir)


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (("--mmlu-shots", "11"), ("mmlu.num_fewshot", "(--mmlu-shots)")),
        (("--bench-concurrency", "0"), ("benchmark.concurrency", "(--bench-concurrency)")),
        (("--calib-size", "0"), ("quantization.calib_size", "(--calib-size)")),
    ],
)
def test_validation_errors_name_the_flag(cli: Env, args: tuple[str, ...], needles: tuple[str, ...]) -> None:
    assert_bad_input(cli.run("run", *args), *needles)
