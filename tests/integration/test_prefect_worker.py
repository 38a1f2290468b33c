"""The release flow as a team runs it: deployed with `quant-release deploy`, executed by a real process worker.

A Prefect server, an MLflow server and S3 (SeaweedFS) run on loopback; `prefect worker start` runs flow runs as
child processes with the worker's environment, as on a GPU host. Two runs of the tiny Llama with the smallest
options: one triggered with `prefect deployment run --param`, one through the REST API (what the UI's custom-run
form posts) with a run name of its own. Both must complete; the second reuses every stage. Checked: the runs'
logs hold the stage progress lines, the artifacts and links exist (and the linked S3 prefix holds the release),
and the MLflow parent run and the Prefect flow run point at each other.

This file has its own work pool and deployment names, so the worker never picks up runs that other tests create.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.integration.test_flow_prefect import SMALL_RUN
from tests.support.process import ServerProcess, running_server
from tests.support.servers import MlflowServer, PrefectServer, S3Server, create_bucket, delete_bucket, find_executable

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@dataclass
class Deployed:
    prefect: PrefectServer
    mlflow: MlflowServer
    s3: S3Server
    bucket: str
    deployment: str  # quant-release/NAME
    deployment_id: str
    config: dict[str, Any]
    worker: ServerProcess
    env: dict[str, str]


def _api(prefect: PrefectServer, method: str, path: str, body: Any = None) -> Any:
    response = httpx.request(method, f"{prefect.api_url}{path}", json=body, timeout=30)
    response.raise_for_status()
    return response.json() if response.content else None


def _small_config(model: Path, *extra: str) -> dict[str, Any]:
    """The flow's `config` for the smallest run (plus `extra` flags), made by the CLI's own parser from the flags
    the other tests use."""
    from flows.cli import build_parser, config_from_args

    config = config_from_args(build_parser().parse_args(["run", "--model", str(model), *SMALL_RUN, *extra]))
    return config.model_dump(mode="json", exclude_defaults=True)


def _worker_registered(prefect: PrefectServer, pool: str) -> bool:
    try:
        return bool(_api(prefect, "POST", f"/work_pools/{pool}/workers/filter", {}))
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def deployed(
    tiny_llama: Path,
    s3_server: S3Server,
    mlflow_server: MlflowServer,
    prefect_server: PrefectServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Deployed]:
    work = tmp_path_factory.mktemp("worker")
    model = work / "tiny-llama"
    shutil.copytree(tiny_llama, model)
    bucket = create_bucket(s3_server, "worker")
    suffix = uuid.uuid4().hex[:8]
    pool, name = f"qr-worker-{suffix}", f"worker-{suffix}"
    # infra/prefect.yaml's on-demand deployment, in a pool and under a name of this test's own.
    data = yaml.safe_load((ROOT / "infra/prefect.yaml").read_text())
    (on_demand,) = [d for d in data["deployments"] if d["name"] == "on-demand"]
    data["deployments"] = [{**on_demand, "name": name, "work_pool": {"name": pool}}]
    prefect_file = work / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(data))

    env = {
        **prefect_server.env(),
        **mlflow_server.env(),
        **s3_server.env(),
        "PREFECT_CLI_PROMPT": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # pick scheduled runs up quickly
        "QUANT_RELEASE_ARTIFACT_URI": f"s3://{bucket}/quant-release",
        "QUANT_RELEASE_STATE_DIR": str(work / "state"),
        "HF_HUB_OFFLINE": "1",  # offline like this machine: calibration resolves to python-docs
        "HF_HOME": str(work / "hf-home"),
        "OMP_NUM_THREADS": str(os.cpu_count() or 2),
    }
    full_env = {**os.environ, **env}
    created = subprocess.run(
        [find_executable("prefect"), "work-pool", "create", pool, "--type", "process"],
        env=full_env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert created.returncode == 0, created.stdout + created.stderr
    deploy = subprocess.run(
        [find_executable("quant-release"), "deploy", "--", "--prefect-file", str(prefect_file), "--all"],
        env=full_env, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert deploy.returncode == 0, deploy.stdout + deploy.stderr
    deployment = _api(prefect_server, "GET", f"/deployments/name/quant-release/{name}")
    with running_server(
        "prefect-worker",
        [find_executable("prefect"), "worker", "start", "--pool", pool, "--type", "process"],
        ready=lambda: _worker_registered(prefect_server, pool),
        log_dir=work,
        env=env,
        cwd=ROOT,
        timeout=120,
    ) as worker:
        yield Deployed(
            prefect=prefect_server,
            mlflow=mlflow_server,
            s3=s3_server,
            bucket=bucket,
            deployment=f"quant-release/{name}",
            deployment_id=deployment["id"],
            config=_small_config(model),
            worker=worker,
            env=full_env,
        )
    delete_bucket(s3_server, bucket)


def _wait(deployed: Deployed, flow_run_id: str, timeout: float = 540) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run: dict[str, Any] = _api(deployed.prefect, "GET", f"/flow_runs/{flow_run_id}")
        if run["state_type"] in TERMINAL:
            return run
        time.sleep(2)
    raise AssertionError(f"flow run {flow_run_id} did not finish in {timeout:.0f} s: {run['state_type']}")


def _logs(deployed: Deployed, flow_run_id: str, timeout: float = 60) -> list[str]:
    """The run's log messages, oldest first, once its last line (the publish stage's) has arrived.

    Prefect ships logs in batches from a background thread and flushes the last batch when the flow-run process
    exits, after the run is already COMPLETED; so the newest lines reach the server a few seconds late, in the UI
    as here. Waiting for them (not reading once) keeps the test true on a slow CI machine.
    """
    deadline = time.monotonic() + timeout
    while True:
        messages: list[str] = []
        while True:  # page through: the server caps one answer at 200 lines
            page = _api(
                deployed.prefect,
                "POST",
                "/logs/filter",
                {
                    "logs": {"flow_run_id": {"any_": [flow_run_id]}},
                    "sort": "TIMESTAMP_ASC",
                    "limit": 200,
                    "offset": len(messages),
                },
            )
            messages += [log["message"] for log in page]
            if len(page) < 200:
                break
        if any(m.startswith("[publish] ") for m in messages) or time.monotonic() > deadline:
            return messages
        time.sleep(1)


def _artifacts(deployed: Deployed, flow_run_id: str) -> dict[str, dict[str, Any]]:
    found = _api(deployed.prefect, "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    return {artifact["key"]: artifact for artifact in found}


def _mlflow_parent(deployed: Deployed, flow_run_id: str) -> Any:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=deployed.mlflow.tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    (parent,) = client.search_runs(experiments, filter_string=f"tags.`prefect.flow_run.id` = '{flow_run_id}'")
    return parent


def _check_run(deployed: Deployed, flow_run: dict[str, Any], worker_log_name: str) -> Any:
    """What every deployment run must show; returns the MLflow parent run."""
    assert flow_run["state_type"] == "COMPLETED", (flow_run["state"], worker_log_name)
    messages = _logs(deployed, flow_run["id"])
    assert any(m.startswith("[preflight] source local") for m in messages), messages
    assert any(m.startswith("[publish] ") for m in messages), messages

    artifacts = _artifacts(deployed, flow_run["id"])
    assert {"release-summary", "throughput", "mlflow-run", "release-artifacts"} <= set(artifacts)
    summary_md = artifacts["release-summary"]["data"]
    assert "completed" in summary_md

    parent = _mlflow_parent(deployed, flow_run["id"])
    tags = parent.data.tags
    assert parent.info.status == "FINISHED"
    assert tags["prefect.flow_run.name"] == flow_run["name"]
    assert tags["prefect.deployment.name"] == deployed.deployment
    assert f"/runs/{parent.info.run_id}" in artifacts["mlflow-run"]["data"]  # and Prefect links back to MLflow
    assert parent.data.metrics["mmlu/questions"] == 1.0

    # The link to the stored release leads to the release: its manifest is in the bucket.
    link = artifacts["release-artifacts"]["data"]
    found = re.search(rf"s3://{re.escape(deployed.bucket)}/(quant-release/releases/[0-9a-f]+)", link)
    assert found, link
    deployed.s3.client().head_object(Bucket=deployed.bucket, Key=f"{found.group(1)}/manifest.json")
    return parent


@pytest.fixture(scope="module")
def cli_run(deployed: Deployed) -> dict[str, Any]:
    """Triggered like an operator would from a shell: `prefect deployment run NAME --param config=JSON`."""
    result = subprocess.run(
        [find_executable("prefect"), "deployment", "run", deployed.deployment,
         "--param", f"config={json.dumps(deployed.config)}"],
        env=deployed.env, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    runs = _api(
        deployed.prefect, "POST", "/flow_runs/filter", {"deployments": {"id": {"any_": [deployed.deployment_id]}}}
    )
    assert len(runs) == 1, runs
    return _wait(deployed, runs[0]["id"])


@pytest.fixture(scope="module")
def rest_run(deployed: Deployed, cli_run: dict[str, Any]) -> dict[str, Any]:
    """Triggered through the REST API, as the UI's custom-run form does, with a run name typed by a user."""
    created = _api(
        deployed.prefect,
        "POST",
        f"/deployments/{deployed.deployment_id}/create_flow_run",
        {"parameters": {"config": deployed.config}, "name": "rerun from the UI form"},
    )
    return _wait(deployed, created["id"])


def test_run_triggered_with_prefect_deployment_run_completes(deployed: Deployed, cli_run: dict[str, Any]) -> None:
    parent = _check_run(deployed, cli_run, "cli")
    messages = _logs(deployed, cli_run["id"])
    assert "[quantize] started" in messages
    assert any(m.startswith("[benchmark] completed in ") for m in messages), messages
    assert "[evaluate] started" in messages
    assert cli_run["parameters"] == {"config": deployed.config}
    assert parent.data.params["mmlu.questions_per_subject"] == "1"
    assert parent.data.tags["mlflow.source.name"] == "flows/release.py:release"


def test_run_triggered_through_the_rest_api_keeps_its_name_and_reuses_stages(
    deployed: Deployed, cli_run: dict[str, Any], rest_run: dict[str, Any]
) -> None:
    assert rest_run["name"] == "rerun from the UI form"
    parent = _check_run(deployed, rest_run, "rest")
    messages = _logs(deployed, rest_run["id"])
    assert any(m.startswith("[quantize] cached") for m in messages), messages
    task_runs = _api(deployed.prefect, "POST", "/task_runs/filter", {"flow_runs": {"id": {"any_": [rest_run["id"]]}}})
    assert {(t["state_type"], t["state_name"]) for t in task_runs} == {("COMPLETED", "Cached")}
    assert len(task_runs) == 6
    # The run id (state and artifact paths) is a fresh one; MLflow keeps both it and the UI's name.
    assert parent.data.tags["quant_release.run_id"] != rest_run["name"]
    assert parent.info.run_id != _mlflow_parent(deployed, cli_run["id"]).info.run_id


def test_unknown_parameter_never_reaches_the_worker(deployed: Deployed, rest_run: dict[str, Any]) -> None:
    """The server refuses it at creation (the schema `quant-release deploy` closed): only the two runs above exist."""
    response = httpx.post(
        f"{deployed.prefect.api_url}/deployments/{deployed.deployment_id}/create_flow_run",
        json={"parameters": {"config": deployed.config, "mmlu_questions": 1}},
        timeout=30,
    )
    assert response.status_code == 409, response.text
    runs = _api(
        deployed.prefect, "POST", "/flow_runs/filter", {"deployments": {"id": {"any_": [deployed.deployment_id]}}}
    )
    assert sorted(r["state_type"] for r in runs) == ["COMPLETED", "COMPLETED"]
    assert deployed.worker.process.poll() is None  # the worker is still up after both runs
