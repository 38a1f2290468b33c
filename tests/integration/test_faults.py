"""Faults on real servers during the publish stage's uploads: each ends complete and verified, or as one
clear error with nothing that looks finished.

- SeaweedFS SIGKILLed in the middle of a release upload: the upload fails in one line within a bound,
  the prefix has no manifest (the manifest is written last, so the prefix reads as partial); after a
  restart on the same ports and data, the upload again completes and every object matches the manifest.
- The Hub test server answering 429 / 503 during the push, then recovering: the push completes (the
  retries of quant_release/netlimits.py) and the repo holds the whole release.
- The MLflow server SIGKILLed mid-run and started again on the same port and store after a while: the run
  rides out the outage (MLflow's retries span QUANT_RELEASE_NET_MLFLOW_OUTAGE) and all its records land.

Timeouts and the MLflow server not answering at start are in test_network_limits.py and
tests/unit/test_cli_bad_input.py (test_unreachable_mlflow_server); a Hub that never answers the push and
signals during publish are in test_interrupts.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from huggingface_hub import HfApi
from huggingface_hub.utils import _http as hf_http

from quant_release import netlimits
from quant_release.config import PublishConfig
from quant_release.errors import error_message
from quant_release.netlimits import NetLimits
from quant_release.records import Results
from quant_release.storage import MANIFEST_NAME, ArtifactError, Manifest, S3Store
from tests.integration.test_publish_stage import _publish, _settings, inputs
from tests.support.hub_fixtures import HubServer
from tests.support.late_run import LATE_RUN, SLOW_MMLU, SLOW_MMLU_QUESTIONS, copy_state, late_env
from tests.support.process import free_port
from tests.support.servers import S3Server, restart_seaweedfs, seaweedfs, start_local_mlflow
from tests.support.stage_fixtures import HubClient
from tests.unit.test_cli_bad_input import SCRIPT

__all__ = ["inputs"]  # a fixture used here
pytestmark = pytest.mark.integration

FAIL_BOUND_S = 60.0  # connect refused, 3 retries with backoff, on a loaded 2-core machine
SHORT_LIMITS = NetLimits(connect_timeout=2, read_timeout=10, retries=2, backoff=0.2)


@pytest.fixture
def own_s3(tmp_path: Path) -> Iterator[S3Server]:
    """A SeaweedFS of this test's own: killing the session's would break every other test."""
    with seaweedfs(tmp_path / "seaweedfs") as server:
        yield server


def _release_folder(root: Path, files: int = 48, size: int = 1 << 20) -> Path:
    """Enough separate uploads that a kill lands between the first object and the manifest."""
    folder = root / "release"
    folder.mkdir()
    for i in range(files):
        (folder / f"model-{i:05d}.safetensors").write_bytes(hashlib.sha256(str(i).encode()).digest() * (size // 32))
    (folder / "README.md").write_text("# release\n")
    return folder


def _keys(s3: S3Server, bucket: str, prefix: str) -> list[str]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", []) if "Key" in obj]


def test_seaweedfs_killed_mid_upload_fails_clearly_and_a_rerun_after_restart_completes(
    own_s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in own_s3.env().items():
        monkeypatch.setenv(name, value)
    # What `netlimits.install` sets for the S3 client, shorter, for this test only.
    monkeypatch.setattr(netlimits, "current", lambda: SHORT_LIMITS)
    bucket = f"faults-{uuid.uuid4().hex[:12]}"
    own_s3.client().create_bucket(Bucket=bucket)
    folder = _release_folder(tmp_path)
    prefix = "releases/k1"
    outcome: dict[str, Any] = {}

    def upload() -> None:
        started = time.monotonic()
        try:
            outcome["manifest"] = S3Store(bucket, prefix).upload_dir(folder)
        except BaseException as exc:
            outcome["error"] = exc
        outcome["seconds"] = time.monotonic() - started

    worker = threading.Thread(target=upload)
    worker.start()
    deadline = time.monotonic() + 120
    while not _keys(own_s3, bucket, prefix) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _keys(own_s3, bucket, prefix), "the upload never started"
    own_s3.server.process.kill()  # SIGKILL: no goodbye to the client, mid-transfer
    own_s3.server.process.wait(timeout=30)
    worker.join(timeout=FAIL_BOUND_S + 30)
    assert not worker.is_alive(), "the upload hangs after the server died"

    error = outcome.get("error")
    assert isinstance(error, ArtifactError), outcome
    message = error_message(error)
    assert "\n" not in message and own_s3.endpoint_url in message, message
    assert own_s3.secret_key not in message
    assert outcome["seconds"] < FAIL_BOUND_S

    restarted = restart_seaweedfs(own_s3)
    try:
        keys = _keys(own_s3, bucket, prefix)
        assert f"{prefix}/{MANIFEST_NAME}" not in keys  # partial, and it says so
        assert len(keys) < 49, "the kill came after the whole upload"

        manifest = S3Store(bucket, prefix).upload_dir(folder)  # the rerun
        client = own_s3.client()
        stored = Manifest.model_validate_json(
            client.get_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST_NAME}")["Body"].read()
        )
        assert stored == manifest
        assert {f.path for f in stored.files} == {p.name for p in folder.iterdir()}
        for entry in stored.files:
            body = client.get_object(Bucket=bucket, Key=f"{prefix}/{entry.path}")["Body"].read()
            assert (len(body), hashlib.sha256(body).hexdigest()) == (entry.size, entry.sha256), entry.path
    finally:
        restarted.stop()


# --- the Hub answering 429 / 503 during the push ---------------------------------------------------------


@pytest.fixture
def retrying_hub(hub_client: HubClient) -> Iterator[HubServer]:
    """huggingface_hub's shared client is ours (as the CLI installs it) for this test only."""
    hf_http.set_client_factory(
        lambda: netlimits.hub_client(NetLimits(connect_timeout=5, read_timeout=30, retries=3, backoff=0.05))
    )
    try:
        yield hub_client.server
    finally:
        _faults(hub_client.server, pattern="^$", status=500, count=0)
        hf_http.set_client_factory(hf_http.default_client_factory)


def _faults(server: HubServer, **body: Any) -> dict[str, Any]:
    with httpx.Client(timeout=10) as client:
        response = (
            client.post(f"{server.endpoint}/api/_test/faults", json=body)
            if body
            else client.get(f"{server.endpoint}/api/_test/faults")
        )
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


@pytest.mark.parametrize(
    ("route", "status"),
    [
        (r"/commit/main", 429),  # the commit itself (a POST): retried on 429 only
        (r"/tree/main", 503),  # listing the files the commit replaces (a GET): retried on 5xx
        (r"/preupload/main", 429),
    ],
)
def test_a_push_completes_when_the_hub_fails_then_recovers(
    retrying_hub: HubServer, inputs: Results, s3_env: dict[str, str], s3_bucket: str, tmp_path: Path,
    route: str, status: int,
) -> None:  # fmt: skip
    hub = retrying_hub
    repo_id = hub.new_repo_id("faulty-push", namespace=hub.org)
    _faults(hub, pattern=rf"^/api/models/{repo_id}{route}$", status=status, count=2)
    config = PublishConfig(push_to_hub=True, hub_repo_id=repo_id)
    release = _publish(config, _settings(hub, tmp_path, hub.token), inputs, f"s3://{s3_bucket}/qr", "k1", tmp_path)
    assert _faults(hub)["seen"] == 3  # two faults, then the answer
    assert release.hub_revision
    files = set(HfApi(endpoint=hub.endpoint, token=hub.token).list_repo_files(repo_id))
    assert {f.path for f in release.files} <= files


# --- the MLflow server down for a while, in the middle of a run ---------------------------------------------


def test_a_run_rides_out_an_mlflow_server_restart(
    tmp_path: Path, tiny_llama: Path, late_state: Path, hub_server: HubServer
) -> None:
    """The tracking server is SIGKILLed while evaluate scores, stays down until evaluate has scored every
    question (so the stage's next MLflow call meets a dead server), and is started again on the same port and
    store: the run retries across the outage (quant_release/netlimits.py, QUANT_RELEASE_NET_MLFLOW_OUTAGE) and
    completes, and every record of it is in MLflow."""
    from mlflow.tracking import MlflowClient

    base, port = tmp_path / "mlflow", free_port()
    tracking_uri = f"http://127.0.0.1:{port}"
    env = late_env(tmp_path, copy_state(late_state, tmp_path), hub_server, MLFLOW_TRACKING_URI=tracking_uri)
    summary_path = tmp_path / "summary.json"
    stages = ["download", "quantize", "build", "evaluate"]
    argv = [str(SCRIPT), "run", "--model", str(tiny_llama), *LATE_RUN, *SLOW_MMLU, "--stages", *stages,
            "--summary-json", str(summary_path)]  # fmt: skip
    scored = f"[evaluate] fp8 questions {SLOW_MMLU_QUESTIONS}/{SLOW_MMLU_QUESTIONS}"
    servers = [start_local_mlflow("mlflow", base, port)]
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        lines: list[str] = []
        down = 0.0
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("[evaluate] fp8 questions 100/"):
                os.killpg(servers[0].pid, signal.SIGKILL)
                servers[0].process.wait(timeout=30)
                down = time.monotonic()
            if line.startswith(scored):
                break  # scored: the stage now records its result in MLflow, which is down
        assert down and lines[-1].startswith(scored), "".join(lines)
        time.sleep(3)  # down a while longer: the run is waiting on MLflow now
        servers.append(start_local_mlflow("mlflow-restarted", base, port))
        outage = time.monotonic() - down
        _, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, "".join(lines) + stderr
        # The default policy of 3 retries (0 + 2 + 4 s of waits) would not have spanned it.
        assert outage > 8, outage

        client = MlflowClient(tracking_uri=tracking_uri)
        summary = json.loads(summary_path.read_text())
        parent = client.get_run(summary["mlflow"]["run_id"])
        assert parent.info.status == "FINISHED"
        stage_runs = client.search_runs(
            [parent.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'"
        )
        assert {run.data.tags["stage"]: run.info.status for run in stage_runs} == dict.fromkeys(stages, "FINISHED")
        assert parent.data.metrics["mmlu/questions"] == summary["metrics"]["mmlu_questions"] == SLOW_MMLU_QUESTIONS
        assert "mmlu/fp8" in parent.data.metrics
        assert "summary.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    finally:
        if proc.poll() is None:
            proc.kill()
        for server in servers:
            server.stop()


def test_an_mlflow_outage_longer_than_the_retries_fails_in_one_line_and_a_rerun_resumes(
    tmp_path: Path, tiny_llama: Path, late_state: Path, hub_server: HubServer
) -> None:
    """The tracking server dies while evaluate scores and stays down past QUANT_RELEASE_NET_MLFLOW_OUTAGE (6 s
    here: 3 retries, 12 s of waits): the run fails in one line naming the server, within one window (the cleanup's
    calls try once each, not a window each), with evaluate's finished result kept; after the server is back the
    rerun reuses it and completes, and the dead run's MLflow runs are closed."""
    from mlflow.tracking import MlflowClient

    base, port = tmp_path / "mlflow", free_port()
    tracking_uri = f"http://127.0.0.1:{port}"
    env = late_env(tmp_path, copy_state(late_state, tmp_path), hub_server, MLFLOW_TRACKING_URI=tracking_uri,
                   QUANT_RELEASE_NET_MLFLOW_OUTAGE="6")  # fmt: skip
    summary_path = tmp_path / "summary.json"
    stages = ["download", "quantize", "build", "evaluate"]
    argv = [str(SCRIPT), "run", "--model", str(tiny_llama), *LATE_RUN, *SLOW_MMLU, "--stages", *stages,
            "--summary-json", str(summary_path)]  # fmt: skip
    server = start_local_mlflow("mlflow", base, port)
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("[evaluate] fp8 questions 100/"):
                os.killpg(server.pid, signal.SIGKILL)
                server.process.wait(timeout=30)
                break
        scored = time.monotonic()
        _, stderr = proc.communicate(timeout=300)
        seconds = time.monotonic() - scored
    finally:
        if proc.poll() is None:
            proc.kill()
        server.stop()
    assert proc.returncode == 1, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("quant-release: error:")]
    assert errors == [
        f"quant-release: error: MLflow server {tracking_uri} did not answer ([Errno 111] Connection refused) through "
        "3 retries (QUANT_RELEASE_NET_MLFLOW_OUTAGE); finished stages are kept, rerun to resume"
    ], stderr
    assert "Traceback" not in stderr
    # The rest of evaluate's scoring, one window of 12 s, then single attempts: not a window per cleanup call.
    assert seconds < 60, seconds
    summary = json.loads(summary_path.read_text())
    assert summary["stages"]["evaluate"]["status"] == "failed"

    server = start_local_mlflow("mlflow-restarted", base, port)
    try:
        again = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "[evaluate] cached" in again.stderr  # its result was committed before MLflow was needed
        assert "as KILLED: its process is gone" in again.stderr
        client = MlflowClient(tracking_uri=tracking_uri)
        parent = client.get_run(json.loads(summary_path.read_text())["mlflow"]["run_id"])
        assert parent.info.status == "FINISHED"
        assert parent.data.metrics["mmlu/questions"] == SLOW_MMLU_QUESTIONS
        left = client.search_runs([parent.info.experiment_id], filter_string="attributes.status = 'RUNNING'")
        assert left == []
    finally:
        server.stop()
