"""No secret the run is given is ever written anywhere: a whole release with canary secrets, then a
search of every byte it wrote.

The secrets are real and in use: the Hub token the Hub test server accepts (a random `hf_test_<hex>`),
the secret key of a SeaweedFS of this test's own (it accepts whatever it is configured with), and a
password in the MLflow tracking URI (sent as basic auth; the test server ignores it). The run goes through
a Prefect server of this test's own (PREFECT_API_URL set: a flow run, a task run per stage, logs and artifacts
on the server). After a full `quant-release run` on a tiny Llama with `--push-to-hub`, each value is searched
for, as bytes, in the state dir, the MLflow server's backend store and every artifact object it holds for this
experiment, every object in the run's bucket, the Hub server's repo storage, the Prefect server's database
(sqlite, with its WAL), its log and the client's PREFECT_HOME, stdout, stderr and the summary.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.hub_fixtures import HubServer
from tests.support.servers import (
    MlflowServer,
    PrefectServer,
    S3Server,
    prefect_at,
    seaweedfs,
)
from tests.support.tiny import make_tiny_llama

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CLI = str(Path(sys.executable).with_name("quant-release"))


@pytest.fixture
def canary_s3(tmp_path: Path) -> Iterator[S3Server]:
    with seaweedfs(tmp_path / "seaweedfs", secret_key=f"canary-aws-{uuid.uuid4().hex}") as server:
        yield server


@pytest.fixture
def canary_prefect(tmp_path: Path) -> Iterator[PrefectServer]:
    """A Prefect server whose database, log and homes are all in this test's tmp dir, to be searched."""
    with prefect_at(tmp_path / "prefect", timeout=120) as server:
        yield server


def _files_containing(root: Path, needles: dict[str, bytes]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            found += [f"{name} in {path}" for name, value in needles.items() if value in data]
    return found


def _objects_containing(s3: S3Server, bucket: str, prefix: str, needles: dict[str, bytes]) -> tuple[int, list[str]]:
    client = s3.client()
    found, count = [], 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            key = obj.get("Key", "")
            data = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            count += 1
            found += [f"{name} in s3://{bucket}/{key}" for name, value in needles.items() if value in data]
    return count, found


def test_no_secret_reaches_any_byte_the_run_wrote(
    tmp_path: Path,
    canary_s3: S3Server,
    mlflow_server: MlflowServer,
    hub_server: HubServer,
    canary_prefect: PrefectServer,
) -> None:
    model = make_tiny_llama(tmp_path / "tiny-llama")
    password = f"canary-mlflow-{uuid.uuid4().hex}"
    needles = {
        "HF_TOKEN": hub_server.token.encode(),
        "AWS_SECRET_ACCESS_KEY": canary_s3.secret_key.encode(),
        "MLflow password": password.encode(),
    }
    bucket = f"canary-{uuid.uuid4().hex[:12]}"
    canary_s3.client().create_bucket(Bucket=bucket)
    experiment = f"canary-{uuid.uuid4().hex[:8]}"
    repo_id = hub_server.new_repo_id("canary-fp8")
    tracking = mlflow_server.tracking_uri.replace("http://", f"http://quant-release:{password}@", 1)
    work = tmp_path / "work"
    work.mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("QUANT_RELEASE_", "PREFECT_", "AWS_", "HF_"))},
        **canary_s3.env(),
        "MLFLOW_TRACKING_URI": tracking,
        "QUANT_RELEASE_ARTIFACT_URI": f"s3://{bucket}/quant-release",
        "HF_ENDPOINT": hub_server.endpoint,
        "HF_TOKEN": hub_server.token,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(work / "hf-home"),
        **canary_prefect.env(),
    }
    summary = work / "summary.json"
    args = [
        CLI, "run", "--model", str(model),
        "--state-dir", str(work / "state"), "--summary-json", str(summary),
        "--calib-dataset", "python-docs", "--calib-samples", "8", "--calib-seq", "32",
        "--fidelity-tokens", "64", "--override-fidelity-gate", "--allow-accuracy-drop",
        "--mmlu-subjects", "nutrition", "--mmlu-questions", "2", "--mmlu-shots", "0", "--mmlu-max-seq-len", "500",
        "--bench-requests", "2", "--bench-concurrency", "2", "--bench-output-len", "4", "--bench-input-len", "16",
        "--push-to-hub", "--hub-repo-id", repo_id, "--experiment", experiment,
    ]  # fmt: skip
    run = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert run.returncode == 0, f"stdout:\n{run.stdout[-3000:]}\nstderr:\n{run.stderr[-4000:]}"

    leaks = [f"{name} in {stream}" for stream, text in (("stdout", run.stdout), ("stderr", run.stderr))
             for name, value in needles.items() if value.decode() in text]  # fmt: skip
    assert summary.is_file()
    leaks += _files_containing(work, needles)  # state dir (stages, runs, local stores), summary, HF_HOME
    # The MLflow server's backend store (its sqlite file, from the server's own command line).
    backend = next(a for a in mlflow_server.server.process.args if str(a).startswith("sqlite:///"))  # type: ignore[union-attr]
    leaks += _files_containing(Path(str(backend).removeprefix("sqlite:///")).parent, needles)
    count, found = _objects_containing(mlflow_server.s3, mlflow_server.artifact_bucket, "", needles)
    leaks += found
    assert count > 0
    count, found = _objects_containing(canary_s3, bucket, "", needles)
    leaks += found
    assert count > 0  # the release and the run records are there to search
    repos = hub_server.data_dir
    assert any(repos.rglob("*.safetensors")) or any(p.is_file() for p in repos.rglob("*"))
    leaks += _files_containing(repos, needles)
    # The Prefect server: its sqlite database (flow run, task runs, parameters, logs, artifacts), its log, and
    # the client's PREFECT_HOME. The run was a flow run there, with its logs shipped: the search has bytes to read.
    prefect_db = canary_prefect.home / "prefect.db"
    assert prefect_db.is_file()
    stored = b"".join(p.read_bytes() for p in canary_prefect.home.glob("prefect.db*"))
    assert b"[publish]" in stored and b"release-summary" in stored, "the run's logs and artifacts are not in the db"
    leaks += _files_containing(canary_prefect.home.parent, needles)  # server home, client home, server log
    assert leaks == []
