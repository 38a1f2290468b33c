"""Bad input through the real console script: one line on stderr, exit 2, before any heavy work.

Every case runs `.venv/bin/quant-release` in a subprocess with a fresh state dir, the Hub endpoint on a
closed loopback port (nothing reaches the internet) and no MLFLOW_TRACKING_URI. A case passes when the
command exits non-zero (2 for bad input) with exactly one stderr line `quant-release: error: ...` naming
the problem, without a traceback, within seconds, and without creating any stage result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.process import free_port

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / ".venv" / "bin" / "quant-release"
if not SCRIPT.exists():  # another venv layout: the script beside this interpreter
    SCRIPT = Path(sys.executable).parent / "quant-release"

FAST_SECONDS = 30.0  # bad input must fail in preflight: no model load, no Prefect run
PREFIX = "quant-release: error:"
STAGE_COMMANDS = ("download", "quantize", "build", "evaluate", "benchmark", "publish")
# Set by a developer's shell or CI, but they would change what these cases test.
SCRUBBED = (
    "MLFLOW_TRACKING_URI",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "PREFECT_API_URL",
    "AWS_ENDPOINT_URL",
)


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    seconds: float
    state_dir: Path

    @property
    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


@dataclass
class Env:
    root: Path
    state_dir: Path
    hub_endpoint: str

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 120) -> Result:
        full_env = {k: v for k, v in os.environ.items() if k not in SCRUBBED and not k.startswith("QUANT_RELEASE_")}
        full_env.update(
            {
                "QUANT_RELEASE_STATE_DIR": str(self.state_dir),
                "HF_HUB_OFFLINE": "0",
                "HF_ENDPOINT": self.hub_endpoint,
                "HF_HOME": str(self.root / "hf-home"),
                "PREFECT_HOME": str(self.root / "prefect-home"),
            }
        )
        full_env.update(env or {})
        start = time.monotonic()
        proc = subprocess.run(
            [str(SCRIPT), *args],
            cwd=self.root,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start, self.state_dir)


@pytest.fixture
def cli(tmp_path: Path) -> Env:
    return Env(root=tmp_path, state_dir=tmp_path / "state", hub_endpoint=f"http://127.0.0.1:{free_port()}")


@pytest.fixture
def llama_dir(tmp_path: Path) -> Path:
    """Passes the source checks (a Llama config.json and a .safetensors file) without any real weights."""
    directory = tmp_path / "llama"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    (directory / "model.safetensors").write_bytes(b"")
    return directory


def _half_written(state_dir: Path) -> list[Path]:
    if not state_dir.exists():
        return []
    return [
        p
        for p in state_dir.rglob("*")
        if p.name.startswith((".partial-", ".old-", ".qr-")) or p.name.endswith((".tmp", ".partial"))
    ]


def assert_bad_input(result: Result, *needles: str, code: int = 2) -> None:
    """The contract for input the run cannot use."""
    where = f"exit {result.code}\nstderr:\n{result.stderr}\nstdout:\n{result.stdout}"
    assert "Traceback" not in result.stderr, where
    assert result.code == code, where
    assert len(result.stderr_lines) == 1, where
    line = result.stderr_lines[0]
    assert line.startswith(PREFIX), where
    for needle in needles:
        assert needle in line, (needle, line)
    assert result.seconds < FAST_SECONDS, (result.seconds, where)
    assert not (result.state_dir / "stages").exists(), where
    assert _half_written(result.state_dir) == []
    assert result.stdout == "", where


# --- config files and flags -----------------------------------------------------------------------


def test_malformed_yaml_config(cli: Env) -> None:
    config = cli.root / "release.yaml"
    config.write_text("source:\n  model: org/name\nmmlu:\n  num_fewshot: 3\n    subjects: [x\n")
    result = cli.run("run", "--config", str(config))
    assert_bad_input(result, str(config), "not valid YAML", "line 5")


def test_unknown_key_in_config_file(cli: Env) -> None:
    config = cli.root / "release.yaml"
    config.write_text("source:\n  modle: org/name\n")
    assert_bad_input(cli.run("run", "--config", str(config)), "source.modle", str(config))


def test_config_file_that_is_a_list(cli: Env) -> None:
    config = cli.root / "release.yaml"
    config.write_text("- source\n- mmlu\n")
    assert_bad_input(cli.run("run", "--config", str(config)), str(config), "mapping")


def test_missing_config_file(cli: Env) -> None:
    missing = cli.root / "nope.yaml"
    assert_bad_input(cli.run("quantize", "--config", str(missing)), str(missing))


def test_invalid_flag_value_is_argparse_exit_2(cli: Env) -> None:
    result = cli.run("run", "--mmlu-shots", "many")
    assert result.code == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr_lines == [
        "quant-release run: error: argument --mmlu-shots: invalid int value: 'many' (see quant-release run --help)"
    ]
    assert result.seconds < FAST_SECONDS
    assert not result.state_dir.exists()


def test_out_of_range_flag_value(cli: Env) -> None:
    assert_bad_input(cli.run("run", "--mmlu-shots", "11"), "mmlu.num_fewshot")


def test_invalid_hub_repo_id_flag(cli: Env) -> None:
    assert_bad_input(cli.run("run", "--hub-repo-id", "not a repo"), "publish.hub_repo_id", "ORG/NAME")


# --- the source model -----------------------------------------------------------------------------


def test_model_that_is_neither_path_nor_repo_id(cli: Env) -> None:
    assert_bad_input(cli.run("run", "--model", "not a model!"), "'not a model!'", "Hub repo id")


def test_hub_repo_when_the_hub_is_unreachable(cli: Env) -> None:
    assert_bad_input(cli.run("run", "--model", "some-org/some-model"), "some-org/some-model", cli.hub_endpoint)


def test_hub_repo_when_hub_offline_mode_is_on(cli: Env) -> None:
    result = cli.run("run", "--model", "some-org/some-model", env={"HF_HUB_OFFLINE": "1"})
    assert_bad_input(result, "some-org/some-model", "offline")


def test_local_dir_without_config_json(cli: Env) -> None:
    empty = cli.root / "empty-model"
    empty.mkdir()
    assert_bad_input(cli.run("run", "--model", str(empty)), str(empty), "config.json")


def test_local_dir_that_does_not_exist(cli: Env) -> None:
    missing = cli.root / "missing-model"
    assert_bad_input(cli.run("run", "--model", str(missing)), str(missing), "does not exist")


def test_local_dir_with_a_non_llama_architecture(cli: Env) -> None:
    gpt2 = cli.root / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    (gpt2 / "model.safetensors").write_bytes(b"")
    assert_bad_input(cli.run("run", "--model", str(gpt2)), "GPT2LMHeadModel", "not supported")


def test_local_dir_without_weights(cli: Env, llama_dir: Path) -> None:
    (llama_dir / "model.safetensors").unlink()
    assert_bad_input(cli.run("run", "--model", str(llama_dir)), str(llama_dir), ".safetensors")


def test_gguf_file_that_is_not_gguf(cli: Env) -> None:
    fake = cli.root / "model.gguf"
    fake.write_bytes(b"this is not a GGUF file at all\n" * 10)
    assert_bad_input(cli.run("run", "--model", str(fake)), str(fake), "GGUF")


def test_pypi_source_of_a_package_that_is_not_installed(cli: Env) -> None:
    result = cli.run("run", "--model", "pypi:no-such-dist-qr/model.gguf")
    assert_bad_input(result, "no-such-dist-qr", "not installed")


# --- publishing -----------------------------------------------------------------------------------


def test_push_to_hub_without_repo_id(cli: Env, llama_dir: Path) -> None:
    assert_bad_input(cli.run("run", "--model", str(llama_dir), "--push-to-hub"), "--hub-repo-id")


def test_push_to_hub_without_token(cli: Env, llama_dir: Path) -> None:
    result = cli.run("run", "--model", str(llama_dir), "--push-to-hub", "--hub-repo-id", "a/b")
    assert_bad_input(result, "HF_TOKEN")


def test_push_to_hub_when_the_hub_is_unreachable(cli: Env, llama_dir: Path) -> None:
    result = cli.run(
        "run", "--model", str(llama_dir), "--push-to-hub", "--hub-repo-id", "a/b", env={"HF_TOKEN": "hf_test"}
    )
    assert_bad_input(result, cli.hub_endpoint)


# --- MMLU -----------------------------------------------------------------------------------------


def test_unknown_mmlu_subject(cli: Env, llama_dir: Path) -> None:
    result = cli.run("run", "--model", str(llama_dir), "--mmlu-subjects", "anatomy", "college_phisics")
    assert_bad_input(result, "'college_phisics'", "college_physics")


def test_mmlu_data_that_does_not_exist(cli: Env, llama_dir: Path) -> None:
    result = cli.run("run", "--model", str(llama_dir), "--mmlu-data", "/nonexistent")
    assert_bad_input(result, "/nonexistent")


# --- stores and tracking --------------------------------------------------------------------------


def test_unsupported_artifact_uri_scheme(cli: Env) -> None:
    result = cli.run("run", env={"QUANT_RELEASE_ARTIFACT_URI": "gs://x"})
    assert_bad_input(result, "gs://")


def test_unreachable_mlflow_server(cli: Env) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    result = cli.run("run", env={"MLFLOW_TRACKING_URI": uri})
    assert_bad_input(result, uri, "not reachable")


def test_mlflow_uri_credentials_are_not_printed(cli: Env) -> None:
    uri = f"http://user:s3cr3t-pw@127.0.0.1:{free_port()}"
    result = cli.run("run", env={"MLFLOW_TRACKING_URI": uri})
    assert_bad_input(result, "not reachable")
    assert "s3cr3t-pw" not in result.stderr


# --- the engine -----------------------------------------------------------------------------------


def test_cuda_on_a_machine_without_one_is_exit_4(cli: Env) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    assert_bad_input(cli.run("run", "--device", "cuda"), "device=cuda", code=4)


# --- help -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", *STAGE_COMMANDS])
def test_help_lists_config_and_summary_json(cli: Env, command: str) -> None:
    result = cli.run(command, "--help")
    assert result.code == 0, result.stderr
    assert result.stderr == ""
    assert "--config" in result.stdout
    assert "--summary-json" in result.stdout
    assert f"usage: quant-release {command}" in result.stdout
    assert "MLFLOW_TRACKING_URI" in result.stdout  # the environment section
    assert not result.state_dir.exists()


# --- a single stage without its upstream ----------------------------------------------------------


@dataclass
class Background:
    thread: threading.Thread
    outcome: dict[str, Any]


@pytest.fixture(scope="module", autouse=True)
def _evaluate_in_background(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Background | None]:
    """Start `quant-release evaluate` (it brings up Prefect: the slow case) while the fast cases run."""
    if not any("without_upstream" in item.name for item in request.session.items):
        yield None
        return
    root = tmp_path_factory.mktemp("evaluate-empty")
    env = Env(root=root, state_dir=root / "state", hub_endpoint=f"http://127.0.0.1:{free_port()}")
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = env.run("evaluate", timeout=180)
        except BaseException as exc:  # re-raised in the test that reads it
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="quant-release-evaluate", daemon=True)
    thread.start()
    yield Background(thread, outcome)
    thread.join()


@pytest.fixture
def evaluate_without_upstream(_evaluate_in_background: Background | None) -> Result:
    """`quant-release evaluate` on an empty state dir with the default source, run once for several tests."""
    assert _evaluate_in_background is not None
    _evaluate_in_background.thread.join(timeout=200)
    if "error" in _evaluate_in_background.outcome:
        raise _evaluate_in_background.outcome["error"]
    return _evaluate_in_background.outcome["result"]


def test_single_stage_without_upstream_exits_3_naming_every_missing_stage(evaluate_without_upstream: Result) -> None:
    result = evaluate_without_upstream
    where = f"exit {result.code}\nstderr:\n{result.stderr}"
    assert result.code == 3, where
    errors = [line for line in result.stderr_lines if line.startswith(PREFIX)]
    assert len(errors) == 1, where
    assert errors[0] == result.stderr_lines[-1]
    assert "stages download, quantize, build have no finished result" in errors[0]
    assert "quant-release run --stages download quantize build" in errors[0]
    assert result.seconds < 90, result.seconds


def test_single_stage_without_upstream_records_nothing(evaluate_without_upstream: Result) -> None:
    """Decided in preflight: no stage dir, no MLflow store or run, no summary (locally or in the store)."""
    state = evaluate_without_upstream.state_dir
    stages = state / "stages"
    assert not stages.exists() or not any(p.is_file() for p in stages.rglob("*"))
    assert _half_written(state) == []
    assert not (state / "mlflow.db").exists()
    assert list(state.rglob("summary.json")) == []
    assert evaluate_without_upstream.stdout == ""


def test_single_stage_without_upstream_prints_no_traceback(evaluate_without_upstream: Result) -> None:
    result = evaluate_without_upstream
    assert "Traceback" not in result.stderr
    noise = [line for line in result.stderr_lines if not line.startswith(("[", PREFIX))]
    assert noise == [], noise
