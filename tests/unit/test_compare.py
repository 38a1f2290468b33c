"""`quant-release compare`: two runs written by the Tracker into a real (sqlite) MLflow store, read back by the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from quant_release.tracking import Tracker

CLI = str(Path(sys.executable).parent / "quant-release")


def test_compare_prints_differing_params_and_metric_deltas(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    tracker = Tracker(f"sqlite:///{state / 'mlflow.db'}", "quant-release", (tmp_path / "artifacts").as_uri())
    a = tracker.start("A-run", {"mmlu": {"questions_per_subject": 4}, "engine": {"device": "cpu"}}, {})
    tracker.log_metrics(a, {"mmlu/fp8": 0.25, "throughput/fp8_tok_s": 80.0})
    tracker.finish("FINISHED")
    b = tracker.start("B-run", {"mmlu": {"questions_per_subject": 8}, "engine": {"device": "cpu"}},
                      {"quant_release.run_id": "20261127-001851-3e2331"})  # fmt: skip
    tracker.log_metrics(b, {"mmlu/fp8": 0.5, "throughput/fp8_tok_s": 100.0})
    tracker.finish("FINISHED")

    env = {**os.environ, "QUANT_RELEASE_STATE_DIR": str(state)}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(
        [CLI, "compare", a, "20261127-001851-3e2331"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"A: A-run ({a}, FINISHED)"
    assert lines[1] == f"B: B-run ({b}, FINISHED)"
    assert any(line.split() == ["mmlu.questions_per_subject", "4", "|", "8"] for line in lines), lines
    assert not any(line.startswith("engine.device") for line in lines)  # equal params are left out
    assert ["mmlu/fp8", "0.25", "0.5", "+0.25", "2.000x"] in [line.split() for line in lines]
    assert ["throughput/fp8_tok_s", "80", "100", "+20", "1.250x"] in [line.split() for line in lines]

    missing = subprocess.run(
        [CLI, "compare", a, "no-such-run"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert missing.returncode == 2
    assert (
        missing.stderr.strip()
        == "quant-release: error: no MLflow run with run id or quant-release run id 'no-such-run'"
    )
