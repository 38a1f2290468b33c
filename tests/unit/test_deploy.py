"""`quant-release deploy` without a server (with one: tests/integration/test_prefect_deployments.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from flows.deploy import closed_schema, deployment_names

ROOT = Path(__file__).resolve().parents[2]
CLI = str(Path(sys.executable).parent / "quant-release")


def test_names_come_from_the_file_under_the_flow_name() -> None:
    assert deployment_names(ROOT / "infra/prefect.yaml") == ["quant-release/nightly", "quant-release/on-demand"]


def test_closing_a_schema_changes_only_its_top_level() -> None:
    schema = {"type": "object", "properties": {"config": {"$ref": "#/definitions/ReleaseConfig"}}, "definitions": {}}
    assert closed_schema(schema) == {**schema, "additionalProperties": False}
    assert "additionalProperties" not in schema  # the deployment's own copy is not edited in place


def test_an_unreadable_prefect_file_is_a_one_line_error_before_prefect_runs(tmp_path: Path) -> None:
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"}  # never reached
    result = subprocess.run(
        [CLI, "deploy", "--", "--prefect-file", str(tmp_path / "missing.yaml"), "--all"],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"quant-release: error: {tmp_path / 'missing.yaml'}: cannot read it: "
        f"[Errno 2] No such file or directory: '{tmp_path / 'missing.yaml'}'"
    ]
