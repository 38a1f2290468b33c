"""run_release's error handling: which error the user sees when more than one thing fails."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import flows.release as release_module
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
