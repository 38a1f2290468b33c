"""The server fixtures themselves: MLflow stores runs and puts artifacts in SeaweedFS; Prefect records flow runs."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.support.servers import MlflowServer, PrefectServer

pytestmark = pytest.mark.integration


def _post_json(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def test_mlflow_run_with_metric_and_artifact_lands_in_s3(
    mlflow_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    for name, value in mlflow_server.env().items():
        monkeypatch.setenv(name, value)
    # The client must reach S3 only through the server's artifact proxy: give it no S3 settings at all.
    for name in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    client = MlflowClient(tracking_uri=mlflow_server.tracking_uri)
    experiment_id = client.create_experiment(f"smoke-{uuid.uuid4().hex[:8]}")
    run = client.create_run(experiment_id, run_name="smoke")
    run_id = run.info.run_id
    client.log_metric(run_id, "mmlu/fp8", 0.4321, step=0)
    client.log_param(run_id, "quant_algo", "FP8")
    report = tmp_path / "report.txt"
    report.write_text("fp8 speedup 1.44x\n")
    client.log_artifact(run_id, str(report), artifact_path="reports")
    client.set_terminated(run_id)

    fetched = client.get_run(run_id)
    assert fetched.data.metrics == {"mmlu/fp8": 0.4321}
    assert fetched.data.params == {"quant_algo": "FP8"}
    assert fetched.info.status == "FINISHED"
    assert fetched.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied, not direct S3
    assert [a.path for a in client.list_artifacts(run_id, "reports")] == ["reports/report.txt"]
    downloaded = mlflow.artifacts.download_artifacts(
        run_id=run_id,
        artifact_path="reports/report.txt",
        dst_path=str(tmp_path / "dl"),
        tracking_uri=mlflow_server.tracking_uri,
    )
    assert Path(downloaded).read_text() == "fp8 speedup 1.44x\n"

    # And the bytes are in the SeaweedFS bucket behind the server.
    s3 = mlflow_server.s3.client()
    listed = s3.list_objects_v2(Bucket=mlflow_server.artifact_bucket, Prefix=f"{mlflow_server.artifact_prefix}/")
    keys = [obj["Key"] for obj in listed.get("Contents", [])]
    expected = f"{mlflow_server.artifact_prefix}/{experiment_id}/{run_id}/artifacts/reports/report.txt"
    assert expected in keys, keys
    body = s3.get_object(Bucket=mlflow_server.artifact_bucket, Key=expected)["Body"].read()
    assert body == b"fp8 speedup 1.44x\n"


def test_mlflow_server_health(mlflow_server: MlflowServer) -> None:
    with urllib.request.urlopen(f"{mlflow_server.tracking_uri}/health", timeout=10) as response:
        assert response.status == 200
        assert response.read().strip() == b"OK"


def test_prefect_health(prefect_server: PrefectServer) -> None:
    assert _get_json(f"{prefect_server.api_url}/health") is True


def test_prefect_flow_run_from_a_subprocess_is_recorded(prefect_server: PrefectServer, tmp_path: Path) -> None:
    flow_name = f"smoke-{uuid.uuid4().hex[:8]}"
    script = tmp_path / "flow.py"
    script.write_text(
        textwrap.dedent(f"""
        from prefect import flow, task

        @task
        def double(x: int) -> int:
            return 2 * x

        @flow(name={flow_name!r}, log_prints=True)
        def smoke(x: int = 21) -> int:
            return double(x)

        if __name__ == "__main__":
            print("RESULT", smoke(x=21))
    """)
    )
    env = {
        # A bare environment plus the server's: no PREFECT_* from the developer's shell leaks in.
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        **prefect_server.env(),
    }
    result = subprocess.run(
        [sys.executable, str(script)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "RESULT 42" in result.stdout
    # It used our server, not a temporary one of its own.
    assert "Starting temporary server" not in result.stdout + result.stderr

    runs = _post_json(
        f"{prefect_server.api_url}/flow_runs/filter",
        {"flows": {"name": {"any_": [flow_name]}}, "limit": 10},
    )
    assert len(runs) == 1, runs
    assert runs[0]["state_type"] == "COMPLETED"
    assert runs[0]["parameters"] == {"x": 21}
    flows = _post_json(f"{prefect_server.api_url}/flows/filter", {"flows": {"name": {"any_": [flow_name]}}})
    assert [f["name"] for f in flows] == [flow_name]
