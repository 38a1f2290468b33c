"""Signals sent the way a terminal, CI or Kubernetes sends them, to the real CLI during quantize, evaluate and
publish, and a Hub that accepts the push and never answers.

SIGTERM / SIGINT: one error line, exit 143 / 130, the MLflow runs ended as KILLED, the summary written,
no stage work directory left and no child process left. SIGKILL: the next run on the same host sweeps
the dead run's work directory and ends its MLflow runs as KILLED; after a SIGKILL mid-push, the next run
pushes the whole release. Covered: SIGTERM and SIGINT during quantize, SIGKILL during quantize, SIGTERM and
SIGKILL during evaluate and during publish (a Hub push in flight).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from subprocess import Popen
from typing import Any

import httpx
import psutil
import pytest
from huggingface_hub import HfApi

from tests.support.hub_fixtures import HubServer
from tests.support.late_run import LATE_RUN, SLOW_MMLU, SMALL_MMLU, cli, copy_state, late_env
from tests.support.tiny import make_tiny_llama
from tests.unit.test_cli_bad_input import PREFIX, SCRIPT, SCRUBBED

# Calibration on the tiny model with this many windows takes minutes: long enough to be interrupted. The
# offline python-docs text is too short for it (preflight refuses), so the text is a generated file.
SLOW_QUANTIZE = ["--stages", "download", "quantize", "--calib-samples", "4096"]
HANG_BOUND_S = 90.0  # generous: the cleanup talks to a local sqlite MLflow store on a loaded machine


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def _start(tmp_path: Path, model: Path) -> tuple[subprocess.Popen[str], Path]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED and not k.startswith("QUANT_RELEASE_")}
    env.update({"QUANT_RELEASE_STATE_DIR": str(tmp_path / "state"), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    summary = tmp_path / "summary.json"
    calib = tmp_path / "calib.txt"
    words = [f"word{i % 997} token{i % 101}" for i in range(40_000)]
    calib.write_text("\n\n".join(" ".join(words[i : i + 400]) for i in range(0, len(words), 400)) * 12)
    argv = [
        str(SCRIPT), "run", "--model", str(model), *SLOW_QUANTIZE, "--calib-dataset", f"file:{calib}",
        "--summary-json", str(summary),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    deadline = time.monotonic() + 240
    for line in proc.stderr:  # wait until quantize is calibrating: a slow stage, mid-work
        if "calibration batches" in line or time.monotonic() > deadline:
            break
    time.sleep(1)
    return proc, summary


def _mlflow_statuses(state: Path) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{state / 'mlflow.db'}")
    runs = client.search_runs(experiment_ids=[e.experiment_id for e in client.search_experiments()])
    return {run.info.run_name or run.info.run_id: run.info.status for run in runs}


def _partials(state: Path) -> list[Path]:
    return [p for p in (state / "stages").glob("*/.*") if p.name.startswith((".partial-", ".old-"))]


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_end_the_run_cleanly(tmp_path: Path, tiny_model: Path, sig: int, code: int) -> None:
    proc, summary_path = _start(tmp_path, tiny_model)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert _partials(tmp_path / "state"), "quantize should be writing its work directory"
    sent = time.monotonic()
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=HANG_BOUND_S)
    assert time.monotonic() - sent < HANG_BOUND_S
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith(PREFIX)]
    assert errors == [f"{PREFIX} interrupted by {signal.Signals(sig).name}; MLflow runs ended as KILLED, finished "
                      "stages are kept"], stderr  # fmt: skip
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "failed"
    assert summary["stages"]["download"]["status"] in ("completed", "cached")
    assert summary["stages"]["quantize"]["status"] == "failed"
    statuses = _mlflow_statuses(tmp_path / "state")
    assert statuses["quantize"] == "KILLED", statuses
    # The parent run is named "<model> <scheme> <run id>" (quant_release/provenance.py).
    (parent,) = [name for name in statuses if name.endswith(summary["run_id"])]
    assert statuses[parent] == "KILLED", statuses
    assert _partials(tmp_path / "state") == []
    assert "quant-release run" in stdout  # the closing table
    assert [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE] == []


def test_after_sigkill_the_next_run_sweeps_and_closes_what_the_dead_run_left(tmp_path: Path, tiny_model: Path) -> None:
    proc, _ = _start(tmp_path, tiny_model)
    state = tmp_path / "state"
    proc.kill()
    proc.communicate(timeout=60)
    left = _partials(state)
    assert left, "a SIGKILLed stage leaves its work directory"
    assert "RUNNING" in _mlflow_statuses(state).values()
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED and not k.startswith("QUANT_RELEASE_")}
    env.update({"QUANT_RELEASE_STATE_DIR": str(state), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    again = subprocess.run(
        [str(SCRIPT), "download", "--model", str(tiny_model)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG_BOUND_S,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert _partials(state) == []
    statuses = _mlflow_statuses(state)
    assert "RUNNING" not in statuses.values(), statuses
    assert statuses["quantize"] == "KILLED"
    assert "as KILLED: its process is gone" in again.stderr


# --- later stages: SIGTERM and SIGKILL during evaluate and during publish, and a Hub that never answers the push
#
# One module fixture finishes download..benchmark on the tiny Llama; each test works on a copy of that state dir,
# so only the stage under test runs. Evaluate is made long enough to be caught mid-scoring (478 questions, about
# 12 s here); publish is caught while the Hub test server holds the push's commit request unanswered.


def _run_until(argv: list[str], tmp_path: Path, env: dict[str, str], ready: Callable[[str], bool]) -> Popen[str]:
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    deadline = time.monotonic() + 180
    seen: list[str] = []
    for line in proc.stderr:
        seen.append(line)
        if ready(line):
            return proc
        assert time.monotonic() < deadline, "".join(seen)
    proc.wait(timeout=30)
    raise AssertionError(f"exited {proc.returncode} before the point of interruption:\n{''.join(seen)}")


def _hub_faults(hub: HubServer, **body: Any) -> dict[str, Any]:
    with httpx.Client(timeout=10) as client:
        if body:
            response = client.post(f"{hub.endpoint}/api/_test/faults", json=body)
        else:
            response = client.get(f"{hub.endpoint}/api/_test/faults")
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


@pytest.fixture
def hung_commit(hub_server: HubServer) -> Iterator[str]:
    """A repo id whose next commit request the Hub test server accepts and holds, unanswered, for 10 s."""
    repo_id = hub_server.new_repo_id("hung-push")
    _hub_faults(hub_server, pattern=rf"^/api/models/{repo_id}/commit/main$", status=503, count=1, hang_s=10)
    try:
        yield repo_id
    finally:
        _hub_faults(hub_server, pattern="^$", status=500, count=0)


def _wait_hanging(hub: HubServer) -> None:
    deadline = time.monotonic() + 120
    while _hub_faults(hub)["seen"] == 0:
        assert time.monotonic() < deadline, "the push never reached its commit"
        time.sleep(0.2)


def _parent_status(state: Path, run_id: str) -> str:
    statuses = _mlflow_statuses(state)
    (parent,) = [name for name in statuses if name.endswith(run_id)]
    return statuses[parent]


def _stage_status(state: Path, stage: str) -> list[str]:
    """The MLflow statuses of `stage`'s runs, oldest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{state / 'mlflow.db'}")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], filter_string=f"tags.stage = '{stage}'",
        order_by=["attributes.start_time ASC"],
    )  # fmt: skip
    return [run.info.status for run in runs]


@pytest.mark.parametrize("stage", ["evaluate", "publish"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_sigterm_and_sigkill_during_evaluate_and_publish(
    tmp_path: Path, tiny_llama: Path, late_state: Path, hub_server: HubServer, hung_commit: str, stage: str, sig: int
) -> None:
    state = copy_state(late_state, tmp_path)
    before = len(_stage_status(state, stage))  # the fixture's own runs come first
    env = late_env(tmp_path, state, hub_server, QUANT_RELEASE_NET_READ_TIMEOUT="60")
    summary_path = tmp_path / "summary.json"
    common = ["run", "--model", str(tiny_llama), *LATE_RUN, "--summary-json", str(summary_path)]
    if stage == "evaluate":  # caught scoring: a fifth of the BF16 questions done
        argv = [*common, *SLOW_MMLU, "--stages", "download", "quantize", "build", "evaluate"]
        proc = _run_until([str(SCRIPT), *argv], tmp_path, env, lambda line: "bf16 questions 100/" in line)
    else:  # caught pushing: the Hub holds the commit request
        argv = [*common, *SMALL_MMLU, "--push-to-hub", "--hub-repo-id", hung_commit]
        proc = _run_until([str(SCRIPT), *argv], tmp_path, env, lambda line: line.startswith("[publish] pushing to"))
        _wait_hanging(hub_server)
    children = psutil.Process(proc.pid).children(recursive=True)
    assert _partials(state), f"{stage} should be writing its work directory"
    sent = time.monotonic()
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=HANG_BOUND_S)
    assert time.monotonic() - sent < HANG_BOUND_S
    assert [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE] == []

    if sig == signal.SIGTERM:
        assert proc.returncode == 143, stderr
        errors = [line for line in stderr.splitlines() if line.startswith(PREFIX)]
        assert errors == [f"{PREFIX} interrupted by SIGTERM; MLflow runs ended as KILLED, finished stages are kept"], (
            stderr
        )
        summary = json.loads(summary_path.read_text())
        assert summary["stages"][stage]["status"] == "failed"
        assert _stage_status(state, stage)[-1] == "KILLED"
        assert _parent_status(state, summary["run_id"]) == "KILLED"
        assert _partials(state) == []
        return

    assert proc.returncode == -signal.SIGKILL
    assert _partials(state), "a SIGKILLed stage leaves its work directory"
    assert _stage_status(state, stage)[-1] == "RUNNING"
    if stage == "evaluate":  # resume is the next run: it sweeps and closes (a full evaluate again is the same code)
        again = cli(tmp_path, env, "download", "--model", str(tiny_llama), *LATE_RUN)
        assert again.returncode == 0, again.stderr
        assert "as KILLED: its process is gone" in again.stderr
    else:  # resume against a Hub that answers again: the release is pushed whole
        again = cli(tmp_path, env, *argv)
        assert again.returncode == 0, again.stderr[-3000:]
        summary = json.loads(summary_path.read_text())
        assert summary["stages"]["publish"]["status"] == "completed"
        assert {s["status"] for n, s in summary["stages"].items() if n != "publish"} == {"cached"}
        files = set(HfApi(endpoint=hub_server.endpoint, token=hub_server.token).list_repo_files(hung_commit))
        assert {"README.md", "model.safetensors", "config.json"} <= files, files
    assert _partials(state) == []
    statuses = _stage_status(state, stage)[before:]
    assert statuses == (["KILLED"] if stage == "evaluate" else ["KILLED", "FINISHED"]), statuses


def test_a_hub_that_never_answers_the_push_fails_publish_within_the_limit(
    tmp_path: Path, tiny_llama: Path, late_state: Path, hub_server: HubServer, hung_commit: str
) -> None:
    """The commit request is accepted and never answered: the run fails in one line after the read timeout (a
    POST is not sent twice), exit 1, the MLflow runs closed, nothing half-written; the rerun pushes the release."""
    state = copy_state(late_state, tmp_path)
    env = late_env(tmp_path, state, hub_server, QUANT_RELEASE_NET_READ_TIMEOUT="3")
    summary_path = tmp_path / "summary.json"
    argv = ["run", "--model", str(tiny_llama), *LATE_RUN, *SMALL_MMLU, "--summary-json", str(summary_path),
            "--push-to-hub", "--hub-repo-id", hung_commit]  # fmt: skip
    started = time.monotonic()
    failed = cli(tmp_path, env, *argv)
    seconds = time.monotonic() - started
    assert failed.returncode == 1, failed.stderr[-3000:]
    assert seconds < 60, seconds  # start-up, cached stages, publish's copies, then 3 s of silence; not the 10 s hang
    errors = [line for line in failed.stderr.splitlines() if line.startswith(PREFIX)]
    assert len(errors) == 1 and "timed out" in errors[0].lower(), failed.stderr[-3000:]
    assert "Traceback" not in failed.stderr
    assert _hub_faults(hub_server)["seen"] == 1  # asked once: a read timeout is never retried
    summary = json.loads(summary_path.read_text())
    assert summary["stages"]["publish"]["status"] == "failed"
    assert _stage_status(state, "publish") == ["FAILED"]
    assert _parent_status(state, summary["run_id"]) == "FAILED"
    assert _partials(state) == []
    assert not list((state / "stages" / "publish").glob("*/record.json"))  # no finished publish result
    hub = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    assert "model.safetensors" not in hub.list_repo_files(hung_commit)  # the commit never landed

    again = cli(tmp_path, env, *argv)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["stages"]["publish"]["status"] == "completed" and summary["hub"]["revision"]
    files = set(HfApi(endpoint=hub_server.endpoint, token=hub_server.token).list_repo_files(hung_commit))
    assert {"README.md", "model.safetensors", "config.json"} <= files, files
