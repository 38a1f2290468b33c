"""Signals sent the way a terminal, CI or Kubernetes sends them, to the real CLI during a slow quantize.

SIGTERM / SIGINT: one error line, exit 143 / 130, the MLflow runs ended as KILLED, the summary written,
no stage work directory left and no child process left. SIGKILL: the next run on the same host sweeps
the dead run's work directory and ends its MLflow runs as KILLED.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

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
