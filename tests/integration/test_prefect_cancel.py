"""A deployment run cancelled from the UI/API, and one whose process dies, on a real Prefect process worker.

The same set-up as test_prefect_worker.py (a real Prefect server, `quant-release deploy`, `prefect worker start`,
MLflow and S3 servers), in a work pool and under a deployment name of this module's own. Each run calibrates
quantize on 4,096 windows of a generated text: minutes of work, so the run is surely inside quantize when the
test acts on it, right after the run's log says `[quantize] started`.

- Cancelled through the REST API (a CANCELLING state, as the UI's Cancel button sets): the worker SIGTERMs the
  run's process group; the run ends CANCELLED, its MLflow parent and quantize runs KILLED (download's
  FINISHED), no stage work directory left, no process of the run left.
- The run's process SIGKILLed (as the OOM killer does): the worker reports it CRASHED and the flow's
  `on_crashed` hook, run by the worker, ends the MLflow runs the dead process left RUNNING as FAILED and removes
  the work directory it left, without waiting for the next run's sweep.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.integration.test_prefect_worker import Deployed, _api, _small_config, _wait, deployed

__all__ = ["deployed"]  # a fixture used here: this module gets its own pool, deployment and worker
pytestmark = pytest.mark.integration

TERMINAL_WITHIN_S = 90.0  # SIGTERM, the run's cleanup against the MLflow server, the worker's hooks


def _slow_config(deployed: Deployed, tmp_path: Path) -> dict[str, Any]:
    calib = tmp_path / "calib.txt"
    words = [f"word{i % 997} token{i % 101}" for i in range(40_000)]
    calib.write_text("\n\n".join(" ".join(words[i : i + 400]) for i in range(0, len(words), 400)) * 12)
    model = deployed.config["source"]["model"]
    return _small_config(Path(model), "--calib-samples", "4096", "--calib-dataset", f"file:{calib}")


def _messages(deployed: Deployed, flow_run_id: str) -> list[str]:
    page = _api(
        deployed.prefect,
        "POST",
        "/logs/filter",
        {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200},
    )
    return [log["message"] for log in page]


def _start_in_quantize(deployed: Deployed, config: dict[str, Any]) -> tuple[str, Any, list[psutil.Process]]:
    """Trigger a run and return (flow run id, MLflow parent run, the run's processes) once it is calibrating."""
    from mlflow.tracking import MlflowClient

    created = _api(
        deployed.prefect,
        "POST",
        f"/deployments/{deployed.deployment_id}/create_flow_run",
        {"parameters": {"config": config}},
    )
    flow_run_id = created["id"]
    deadline = time.monotonic() + 300
    while "[quantize] started" not in _messages(deployed, flow_run_id):
        state = _api(deployed.prefect, "GET", f"/flow_runs/{flow_run_id}")["state_type"]
        assert state in ("SCHEDULED", "PENDING", "RUNNING"), state
        assert time.monotonic() < deadline, "the run never reached quantize"
        time.sleep(1)
    client = MlflowClient(tracking_uri=deployed.mlflow.tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    (parent,) = client.search_runs(experiments, filter_string=f"tags.`prefect.flow_run.id` = '{flow_run_id}'")
    pid = int(parent.data.tags["quant_release.pid"])
    group = os.getpgid(pid)  # the worker starts each run in a process group of its own
    processes = [p for p in psutil.process_iter() if _pgid(p) == group]
    assert pid in [p.pid for p in processes]
    return flow_run_id, parent, processes


def _pgid(process: psutil.Process) -> int | None:
    try:
        return os.getpgid(process.pid)
    except ProcessLookupError:
        return None


def _stage_statuses(deployed: Deployed, parent_run_id: str) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=deployed.mlflow.tracking_uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    )
    return {"parent": parent.info.status, **{run.data.tags["stage"]: run.info.status for run in runs}}


def _partials(deployed: Deployed) -> list[Path]:
    stages = Path(deployed.env["QUANT_RELEASE_STATE_DIR"]) / "stages"
    return [p for p in stages.glob("*/.*") if p.name.startswith((".partial-", ".old-"))]


def _alive(processes: list[psutil.Process]) -> list[int]:
    return [p.pid for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def _wait_for_log(deployed: Deployed, flow_run_id: str, prefix: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        found = [m for m in _messages(deployed, flow_run_id) if m.startswith(prefix)]
        if found or time.monotonic() > deadline:
            assert found, f"no log line starting {prefix!r}: {_messages(deployed, flow_run_id)}"
            return found[0]
        time.sleep(1)


def test_a_run_cancelled_through_the_api_ends_killed_and_leaves_nothing(deployed: Deployed, tmp_path: Path) -> None:
    flow_run_id, parent, processes = _start_in_quantize(deployed, _slow_config(deployed, tmp_path))
    assert _partials(deployed), "quantize should be writing its work directory"
    sent = time.monotonic()
    _api(deployed.prefect, "POST", f"/flow_runs/{flow_run_id}/set_state",
         {"state": {"type": "CANCELLING", "message": "cancelled by the test"}})  # fmt: skip
    flow_run = _wait(deployed, flow_run_id, timeout=TERMINAL_WITHIN_S)
    assert flow_run["state_type"] == "CANCELLED", flow_run["state"]
    assert time.monotonic() - sent < TERMINAL_WITHIN_S

    statuses = _stage_statuses(deployed, parent.info.run_id)
    assert statuses == {"parent": "KILLED", "download": "FINISHED", "quantize": "KILLED"}, statuses
    assert _partials(deployed) == []
    assert _alive(processes) == []
    assert _wait_for_log(deployed, flow_run_id, "[cleanup] flow run cancelling:")
    assert deployed.worker.process.poll() is None


def test_a_run_whose_process_is_sigkilled_is_closed_by_the_on_crashed_hook(deployed: Deployed, tmp_path: Path) -> None:
    flow_run_id, parent, processes = _start_in_quantize(deployed, _slow_config(deployed, tmp_path))
    pid = int(parent.data.tags["quant_release.pid"])
    assert [p for p in _partials(deployed) if p.name.endswith(f"-{pid}@{parent.data.tags['quant_release.host']}")]
    os.killpg(os.getpgid(pid), signal.SIGKILL)  # no cleanup of its own can run
    flow_run = _wait(deployed, flow_run_id, timeout=TERMINAL_WITHIN_S)
    assert flow_run["state_type"] == "CRASHED", flow_run["state"]

    line = _wait_for_log(deployed, flow_run_id, "[cleanup] flow run crashed:")
    assert line.startswith("[cleanup] flow run crashed: 2 MLflow run(s) ended as FAILED, 1 stage work"), line
    statuses = _stage_statuses(deployed, parent.info.run_id)
    assert statuses == {"parent": "FAILED", "download": "FINISHED", "quantize": "FAILED"}, statuses
    assert _partials(deployed) == []
    assert _alive(processes) == []
