"""run_release: which error the user sees when more than one thing fails; preflight once; direct mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import flows.pipeline as release_module
from quant_release.config import ReleaseConfig, Settings, SourceConfig
from quant_release.progress import Progress
from tests.support.tiny import make_tiny_llama


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


def _run(tiny_model: Path, tmp_path: Path) -> Any:
    config = ReleaseConfig(source=SourceConfig(model=str(tiny_model)), stages=["download"])
    settings = Settings(state_dir=tmp_path / "state")
    return release_module.run_release(config, settings, "run-1", Progress(enabled=False))


def test_stage_error_survives_a_failing_summary_upload(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_stages(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("quantize blew up")

    def failing_finish(*args: Any, **kwargs: Any) -> None:
        raise OSError("S3 is down")

    monkeypatch.setattr(release_module, "_run_stages", failing_stages)
    monkeypatch.setattr(release_module, "_finish", failing_finish)
    with pytest.raises(RuntimeError, match="quantize blew up"):
        _run(tiny_model, tmp_path)


def test_summary_failure_alone_is_raised(tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_finish(*args: Any, **kwargs: Any) -> None:
        raise OSError("S3 is down")

    monkeypatch.setattr(release_module, "_run_stages", lambda *args, **kwargs: None)
    monkeypatch.setattr(release_module, "_finish", failing_finish)
    with pytest.raises(OSError, match="S3 is down"):
        _run(tiny_model, tmp_path)


def test_summary_is_written_when_a_stage_fails(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_stages(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("quantize blew up")

    monkeypatch.setattr(release_module, "_run_stages", failing_stages)
    with pytest.raises(RuntimeError):
        _run(tiny_model, tmp_path)
    summary = (tmp_path / "state" / "runs" / "run-1" / "summary.json").read_text()
    assert '"status": "failed"' in summary
    assert "RuntimeError: quantize blew up" in summary


def test_cli_without_a_prefect_server_runs_directly_with_one_preflight(tiny_model: Path, tmp_path: Path) -> None:
    """No PREFECT_API_URL: the pipeline runs as plain functions, prefect is never imported, preflight runs once."""
    script = f"""
import json, sys
import flows.pipeline as pipeline
from flows import cli

calls = []
real_preflight = pipeline.preflight
pipeline.preflight = lambda *args, **kwargs: calls.append(1) or real_preflight(*args, **kwargs)
code = cli.main(["download", "--model", {str(tiny_model)!r}, "--state-dir", {str(tmp_path / "state")!r}, "-q"])
print(json.dumps({{"code": code, "preflights": len(calls), "prefect": "prefect" in sys.modules}}))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "QUANT_RELEASE_"))}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    *table, last = result.stdout.strip().splitlines()
    assert json.loads(last) == {"code": 0, "preflights": 1, "prefect": False}, result.stderr[-3000:]
    assert any(line.startswith("download   completed") for line in table)
    (summary_file,) = (tmp_path / "state" / "runs").glob("*/summary.json")
    assert json.loads(summary_file.read_text())["status"] == "completed"


def test_preflight_error_leaves_no_run_behind(tiny_model: Path, tmp_path: Path) -> None:
    """A ConfigError in preflight: raised before the MLflow store, the stage store or the summary exist."""
    from quant_release.errors import ConfigError

    config = ReleaseConfig(source=SourceConfig(model=str(tiny_model)), stages=["evaluate"])
    config.mmlu.subjects = ["no_such_subject"]
    settings = Settings(state_dir=tmp_path / "state")
    with pytest.raises(ConfigError, match="no_such_subject"):
        release_module.run_release(config, settings, "run-1", Progress(enabled=False))
    assert not (tmp_path / "state" / "mlflow.db").exists()
    assert not (tmp_path / "state" / "runs").exists()
    assert not (tmp_path / "state" / "stages").exists()


def test_the_mlflow_link_stored_in_prefect_carries_no_credentials() -> None:
    """Found by the canary test: the link artifact held the tracking URI's password, in Prefect's database."""
    from quant_release.prefect_ui import mlflow_run_url

    url = mlflow_run_url("http://quant-release:s3cret@127.0.0.1:5000/", "1", "abc")
    assert url == "http://127.0.0.1:5000/#/experiments/1/runs/abc"
    assert mlflow_run_url("sqlite:///tmp/mlflow.db", "1", "abc") is None
