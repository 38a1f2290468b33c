"""The real release flow, run as `quant-release` in a subprocess against real Prefect, MLflow and S3 servers.

A tiny random Llama keeps every stage to seconds on CPU. Three invocations share one state dir:
`run` (everything completed), `run` again (everything cached), then `evaluate` with another question count
(evaluate completed, its upstream read back, the later stages skipped).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from quant_release.config import STAGES
from tests.support.servers import MlflowServer, PrefectServer, S3Server, create_bucket, delete_bucket

pytestmark = pytest.mark.integration

CLI = str(Path(sys.executable).parent / "quant-release")
SMALL_RUN = [
    "--mmlu-subjects", "abstract_algebra", "--mmlu-questions", "1", "--mmlu-shots", "1",
    "--bench-requests", "2", "--bench-concurrency", "2", "--bench-input-len", "16", "--bench-output-len", "4",
    "--bench-warmup", "0",
    "--calib-samples", "4", "--calib-seq-len", "32",
]  # fmt: skip


@dataclass
class FlowSetup:
    model: Path
    state_dir: Path
    bucket: str
    env: dict[str, str]
    work: Path
    prefect: PrefectServer
    mlflow: MlflowServer
    s3: S3Server


@dataclass(frozen=True)
class Invocation:
    returncode: int
    stdout: str
    stderr: str
    summary: dict[str, Any]
    seconds: float


def _post_json(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def setup(
    tiny_llama: Path,
    s3_server: S3Server,
    mlflow_server: MlflowServer,
    prefect_server: PrefectServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[FlowSetup]:
    work = tmp_path_factory.mktemp("flow")
    model = work / "tiny-llama"
    shutil.copytree(tiny_llama, model)  # a local source is used in place: keep the shared one pristine
    bucket = create_bucket(s3_server, "flow")
    env = {
        # A bare environment plus the servers': nothing from the developer's shell leaks in.
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(work),
        "LANG": "C.UTF-8",
        **prefect_server.env(),
        **mlflow_server.env(),
        **s3_server.env(),
        "QUANT_RELEASE_ARTIFACT_URI": f"s3://{bucket}/quant-release",
        # Offline like this machine: calibration resolves to python-docs without probing the Hub.
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(work / "hf-home"),
        "OMP_NUM_THREADS": str(os.cpu_count() or 2),
        # Stages of the tiny model take seconds: sample often enough to see several points in one.
        "QUANT_RELEASE_SYSTEM_METRICS_INTERVAL": "1",
    }
    yield FlowSetup(
        model=model,
        state_dir=work / "state",
        bucket=bucket,
        env=env,
        work=work,
        prefect=prefect_server,
        mlflow=mlflow_server,
        s3=s3_server,
    )
    delete_bucket(s3_server, bucket)


def _invoke(setup: FlowSetup, command: str, *extra: str, name: str, env: dict[str, str] | None = None) -> Invocation:
    summary_path = setup.work / f"{name}-summary.json"
    argv = [
        CLI, command, "--model", str(setup.model), *SMALL_RUN, *extra,
        "--state-dir", str(setup.state_dir), "--summary-json", str(summary_path),
    ]  # fmt: skip
    start = time.monotonic()
    result = subprocess.run(
        argv, env={**setup.env, **(env or {})}, cwd=setup.work, capture_output=True, text=True, timeout=240, check=False
    )
    seconds = time.monotonic() - start
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-6000:]}"
    assert "Starting temporary server" not in result.stdout + result.stderr  # it used our Prefect server
    summary = json.loads(summary_path.read_text())
    return Invocation(result.returncode, result.stdout, result.stderr, summary, seconds)


@pytest.fixture(scope="module")
def first(setup: FlowSetup) -> Invocation:
    return _invoke(setup, "run", name="first")


@pytest.fixture(scope="module")
def second(setup: FlowSetup, first: Invocation) -> Invocation:
    # System metrics switched off: its stage runs must have none (the first run's have them).
    return _invoke(setup, "run", name="second", env={"QUANT_RELEASE_SYSTEM_METRICS": "false"})


@pytest.fixture(scope="module")
def evaluate_only(setup: FlowSetup, second: Invocation) -> Invocation:
    return _invoke(setup, "evaluate", "--mmlu-questions", "2", name="evaluate")


def _flow_run(setup: FlowSetup, run_id: str) -> dict[str, Any]:
    runs = _post_json(f"{setup.prefect.api_url}/flow_runs/filter", {"flow_runs": {"name": {"any_": [run_id]}}})
    assert len(runs) == 1, runs
    return dict(runs[0])


def _task_runs(setup: FlowSetup, flow_run_id: str) -> list[dict[str, Any]]:
    return list(
        _post_json(
            f"{setup.prefect.api_url}/task_runs/filter",
            {"flow_runs": {"id": {"any_": [flow_run_id]}}, "sort": "EXPECTED_START_TIME_ASC"},
        )
    )


def _stage_runs(setup: FlowSetup, parent_id: str) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=setup.mlflow.tracking_uri)
    parent = client.get_run(parent_id)
    return list(
        client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
            order_by=["start_time ASC"],
        )
    )


def _s3_keys(setup: FlowSetup, prefix: str) -> list[str]:
    listed = setup.s3.client().list_objects_v2(Bucket=setup.bucket, Prefix=prefix)
    return sorted(obj["Key"] for obj in listed.get("Contents", []))


def test_first_run_completes_every_stage(setup: FlowSetup, first: Invocation) -> None:
    summary = first.summary
    run_id = summary["run_id"]
    assert summary["status"] == "completed"
    assert summary["error"] is None
    assert {stage: report["status"] for stage, report in summary["stages"].items()} == dict.fromkeys(
        STAGES, "completed"
    )
    assert summary["model"]["source"] == str(setup.model)
    assert summary["metrics"]["mmlu_questions"] == 1.0
    assert summary["metrics"]["throughput_fp8_tok_s"] > 0
    assert summary["hub"]["repo_id"] is None  # no --push-to-hub
    # The table on stdout is the summary's.
    assert f"quant-release run {run_id}: completed" in first.stdout

    # Every stage's result is on disk under its cache key.
    for stage, report in summary["stages"].items():
        assert (setup.state_dir / "stages" / stage / report["cache_key"] / "record.json").is_file(), stage
    quantize_record = json.loads(
        (
            setup.state_dir / "stages" / "quantize" / summary["stages"]["quantize"]["cache_key"] / "record.json"
        ).read_text()
    )
    assert quantize_record["calibration"]["dataset"] == "python-docs"
    assert quantize_record["calibration"]["tokens"] == 4 * 32

    # Prefect: one flow run named after the run id, completed, with the six stage tasks.
    flow_run = _flow_run(setup, run_id)
    assert flow_run["state_type"] == "COMPLETED"
    task_runs = _task_runs(setup, flow_run["id"])
    assert len(task_runs) == 6, [t["name"] for t in task_runs]
    assert sorted(t["name"].rsplit("-", 1)[0] for t in task_runs) == sorted(STAGES)
    assert {t["state_type"] for t in task_runs} == {"COMPLETED"}

    # MLflow: the parent run and one finished child per stage.
    parent_id = summary["mlflow"]["run_id"]
    assert summary["mlflow"]["tracking_uri"] == setup.mlflow.tracking_uri
    children = _stage_runs(setup, parent_id)
    assert [c.info.run_name for c in children] == list(STAGES)
    assert {c.info.status for c in children} == {"FINISHED"}
    assert {c.data.tags["status"] for c in children} == {"completed"}
    assert [c.data.tags["cache_key"] for c in children] == [summary["stages"][s]["cache_key"] for s in STAGES]

    from mlflow.tracking import MlflowClient

    parent = MlflowClient(tracking_uri=setup.mlflow.tracking_uri).get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["quant_release.run_id"] == run_id
    assert parent.data.metrics["mmlu/fp8"] == summary["metrics"]["mmlu_fp8"]
    assert parent.data.params["mmlu.questions_per_subject"] == "1"

    # S3: the release folder with its manifest, and the run's summary.
    publish_key = summary["stages"]["publish"]["cache_key"]
    assert summary["artifacts"]["artifact_uri"] == f"s3://{setup.bucket}/quant-release/releases/{publish_key}"
    release_keys = _s3_keys(setup, f"quant-release/releases/{publish_key}/")
    assert f"quant-release/releases/{publish_key}/manifest.json" in release_keys
    assert f"quant-release/releases/{publish_key}/README.md" in release_keys
    assert f"quant-release/releases/{publish_key}/model.safetensors" in release_keys
    stored = setup.s3.client().get_object(Bucket=setup.bucket, Key=f"quant-release/runs/{run_id}/summary.json")
    assert json.loads(stored["Body"].read())["run_id"] == run_id
    assert _s3_keys(setup, f"quant-release/runs/{run_id}/") == [
        f"quant-release/runs/{run_id}/{name}.json" for name in ("benchmark", "evaluate", "summary")
    ]
    parent_artifacts = {a.path for a in MlflowClient(tracking_uri=setup.mlflow.tracking_uri).list_artifacts(parent_id)}
    assert parent_artifacts == {
        "summary.json", "summary.txt", "predictions.jsonl", "throughput_latency.png", "mmlu_categories.png", "mmlu",
    }  # fmt: skip


def test_second_run_reuses_every_stage(setup: FlowSetup, first: Invocation, second: Invocation) -> None:
    summary = second.summary
    assert summary["status"] == "completed"
    assert summary["run_id"] != first.summary["run_id"]
    assert {stage: report["status"] for stage, report in summary["stages"].items()} == dict.fromkeys(STAGES, "cached")
    for stage in STAGES:  # same inputs, same keys
        assert summary["stages"][stage]["cache_key"] == first.summary["stages"][stage]["cache_key"]
    assert summary["metrics"] == first.summary["metrics"]  # read back, not re-measured

    flow_run = _flow_run(setup, summary["run_id"])
    assert flow_run["state_type"] == "COMPLETED"
    assert len(_task_runs(setup, flow_run["id"])) == 6
    children = _stage_runs(setup, summary["mlflow"]["run_id"])
    assert len(children) == 6
    assert {c.data.tags["status"] for c in children} == {"cached"}


def test_single_stage_command_reruns_only_what_changed(
    setup: FlowSetup, first: Invocation, evaluate_only: Invocation
) -> None:
    summary = evaluate_only.summary
    statuses = {stage: report["status"] for stage, report in summary["stages"].items()}
    assert statuses == {
        "download": "cached",
        "quantize": "cached",
        "build": "cached",
        "evaluate": "completed",
        "benchmark": "skipped",
        "publish": "skipped",
    }
    assert summary["status"] == "completed"
    assert summary["metrics"]["mmlu_questions"] == 2.0
    for stage in ("download", "quantize", "build"):
        assert summary["stages"][stage]["cache_key"] == first.summary["stages"][stage]["cache_key"]
    assert summary["stages"]["evaluate"]["cache_key"] != first.summary["stages"]["evaluate"]["cache_key"]
    predictions = Path(summary["artifacts"]["mmlu_predictions"])
    assert len(predictions.read_text().splitlines()) == 2

    flow_run = _flow_run(setup, summary["run_id"])
    assert flow_run["state_type"] == "COMPLETED"
    task_runs = _task_runs(setup, flow_run["id"])
    assert sorted(t["name"].rsplit("-", 1)[0] for t in task_runs) == ["build", "download", "evaluate", "quantize"]
    children = _stage_runs(setup, summary["mlflow"]["run_id"])
    assert [(c.info.run_name, c.data.tags["status"]) for c in children] == [
        ("download", "cached"),
        ("quantize", "cached"),
        ("build", "cached"),
        ("evaluate", "completed"),
    ]


def test_bad_input_fails_in_preflight_before_any_run(setup: FlowSetup, first: Invocation) -> None:
    """Preflight runs once, inside the flow: the flow run fails at once, before MLflow or any stage sees it."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=setup.mlflow.tracking_uri)

    def mlflow_run_count() -> int:
        experiments = [e.experiment_id for e in client.search_experiments()]
        return len(client.search_runs(experiments, max_results=1000))

    def flow_runs() -> list[dict[str, Any]]:
        return list(_post_json(f"{setup.prefect.api_url}/flow_runs/filter", {"sort": "EXPECTED_START_TIME_DESC"}))

    before, mlflow_before = len(flow_runs()), mlflow_run_count()
    summary_path = setup.work / "bad-summary.json"
    argv = [
        CLI, "run", "--model", str(setup.model), *SMALL_RUN, "--mmlu-subjects", "abstract_algebr",
        "--state-dir", str(setup.state_dir), "--summary-json", str(summary_path),
    ]  # fmt: skip
    result = subprocess.run(
        argv, env=setup.env, cwd=setup.work, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        "quant-release: error: unknown MMLU subject 'abstract_algebr': did you mean abstract_algebra?"
    ]
    assert result.stdout == ""
    assert not summary_path.exists()
    runs = flow_runs()
    assert len(runs) == before + 1  # the flow run that preflight stopped
    assert runs[0]["state_type"] == "FAILED"
    assert _task_runs(setup, runs[0]["id"]) == []
    assert mlflow_run_count() == mlflow_before


def test_failing_stage_is_recorded_everywhere(setup: FlowSetup, first: Invocation, evaluate_only: Invocation) -> None:
    """A stage that raises: exit 1 with one line, and the failure in the summary, Prefect and MLflow."""
    checkpoint = Path(first.summary["artifacts"]["checkpoint_dir"])
    weights = checkpoint / "model.safetensors"
    original = weights.read_bytes()
    # Same size, garbage content, in a result written before integrity stamps existed (stamp removed):
    # only its sizes are checked on reuse, so quantize is reused and loading the weights in build fails.
    # (With its stamp the same corruption re-runs quantize: tests/integration/test_cache_trust.py.)
    stamp = (
        setup.state_dir / "stages" / "quantize" / first.summary["stages"]["quantize"]["cache_key"] / "integrity.json"
    )
    stamp_text = stamp.read_text()
    stamp.unlink()
    weights.write_bytes(b"\xff" * len(original))
    try:
        summary_path = setup.work / "failed-summary.json"
        argv = [
            CLI, "build", "--rerun", "build", "--model", str(setup.model), *SMALL_RUN,
            "--state-dir", str(setup.state_dir), "--summary-json", str(summary_path),
        ]  # fmt: skip
        result = subprocess.run(
            argv, env=setup.env, cwd=setup.work, capture_output=True, text=True, timeout=180, check=False
        )
    finally:
        weights.write_bytes(original)
        stamp.write_text(stamp_text)
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("quant-release: error: ")
    summary = json.loads(summary_path.read_text())
    assert summary["status"] == "failed"
    assert summary["error"]
    statuses = {stage: report["status"] for stage, report in summary["stages"].items()}
    assert statuses == {
        "download": "cached",
        "quantize": "cached",
        "build": "failed",
        "evaluate": "skipped",
        "benchmark": "skipped",
        "publish": "skipped",
    }
    assert "safetensor" in summary["error"].lower()
    assert summary["stages"]["build"]["error"].endswith(summary["error"])
    assert last.endswith(summary["error"])

    flow_run = _flow_run(setup, summary["run_id"])
    assert flow_run["state_type"] == "FAILED"
    children = _stage_runs(setup, summary["mlflow"]["run_id"])
    assert [(c.info.run_name, c.info.status) for c in children] == [
        ("download", "FINISHED"),
        ("quantize", "FINISHED"),
        ("build", "FAILED"),
    ]
    assert children[-1].data.tags["error"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=setup.mlflow.tracking_uri)
    assert client.get_run(summary["mlflow"]["run_id"]).info.status == "FAILED"
    assert [a.path for a in client.list_artifacts(children[-1].info.run_id)] == ["error.txt"]
    # The failed rerun left the earlier build result in place.
    build_key = first.summary["stages"]["build"]["cache_key"]
    assert (setup.state_dir / "stages" / "build" / build_key / "record.json").is_file()


def test_deleted_outputs_are_not_trusted_as_cached(setup: FlowSetup, first: Invocation) -> None:
    """A finished quantize result whose weights were deleted is not reused: `build` alone stops with exit 3."""
    checkpoint = Path(first.summary["artifacts"]["checkpoint_dir"])
    weights = checkpoint / "model.safetensors"
    hidden = checkpoint / "model.safetensors.hidden"
    weights.rename(hidden)
    try:
        argv = [CLI, "build", "--model", str(setup.model), *SMALL_RUN, "--state-dir", str(setup.state_dir)]
        result = subprocess.run(
            argv, env=setup.env, cwd=setup.work, capture_output=True, text=True, timeout=180, check=False
        )
    finally:
        hidden.rename(weights)
    assert result.returncode == 3, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("quant-release: error: stage quantize has no finished result")


def test_unreachable_hub_is_a_one_line_error(setup: FlowSetup) -> None:
    """Regression: httpx.ConnectError escaped check_source; the CLI printed a traceback and exited 1."""
    from tests.support.process import free_port

    env = {**setup.env, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_x"}
    argv = [CLI, "run", "--model", "qr-tester/tiny-llama", *SMALL_RUN, "--state-dir", str(setup.work / "unreachable")]
    result = subprocess.run(argv, env=env, cwd=setup.work, capture_output=True, text=True, timeout=120, check=False)
    assert "Traceback" not in result.stderr
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("quant-release: error: cannot reach")


def test_single_stage_without_upstream_results_exits_3(setup: FlowSetup) -> None:
    fresh_state = setup.work / "fresh-state"
    summary_path = setup.work / "missing-summary.json"
    argv = [
        CLI, "evaluate", "--model", str(setup.model), *SMALL_RUN,
        "--state-dir", str(fresh_state), "--summary-json", str(summary_path),
    ]  # fmt: skip
    result = subprocess.run(
        argv, env=setup.env, cwd=setup.work, capture_output=True, text=True, timeout=120, check=False
    )
    assert "Traceback" not in result.stderr
    assert result.returncode == 3, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    # Every missing stage is named, and it is decided in preflight: no summary, no MLflow run, no stage dir.
    assert last.startswith("quant-release: error: stages download, quantize, build have no finished result")
    assert "run `quant-release run --stages download quantize build`" in last
    assert not summary_path.exists()
    assert not fresh_state.exists() or list(fresh_state.rglob("summary.json")) == []
    assert not (fresh_state / "stages").exists()


def _logs(setup: FlowSetup, flow_run_id: str) -> list[dict[str, Any]]:
    return list(
        _post_json(
            f"{setup.prefect.api_url}/logs/filter",
            {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200},
        )
    )


def _artifacts(setup: FlowSetup, flow_run_id: str) -> dict[str, dict[str, Any]]:
    found = _post_json(
        f"{setup.prefect.api_url}/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
    )
    return {artifact["key"]: artifact for artifact in found}


def test_prefect_shows_progress_artifacts_and_links(setup: FlowSetup, first: Invocation) -> None:
    """Inside a flow run the progress lines reach the run's Logs (the CLI's terminal keeps Prefect quiet),
    stage lines on their task runs; the throughput table and the links are artifacts; MLflow and Prefect
    point at each other."""
    summary = first.summary
    flow_run = _flow_run(setup, summary["run_id"])
    logs = _logs(setup, flow_run["id"])
    messages = [log["message"] for log in logs]
    assert "[quantize] started" in messages
    assert any(m.startswith("[benchmark] completed in ") for m in messages), messages
    assert any(m.startswith("[preflight] source local") for m in messages), messages
    # A stage's lines belong to its task run, so the task's own Logs tab shows them too.
    task_names = {t["id"]: t["name"].rsplit("-", 1)[0] for t in _task_runs(setup, flow_run["id"])}
    quantize_lines = [log for log in logs if log["message"] == "[quantize] started"]
    assert [task_names.get(log["task_run_id"]) for log in quantize_lines] == ["quantize"]
    # Not printed twice on the terminal: the Prefect logger sends to the API only.
    assert first.stderr.count("[quantize] started") == 1

    artifacts = _artifacts(setup, flow_run["id"])
    assert {"release-summary", "throughput", "mlflow-run", "release-artifacts"} <= set(artifacts)
    assert "hub-commit" not in artifacts  # nothing was pushed
    table = artifacts["throughput"]
    assert table["type"] == "table"
    rows = json.loads(table["data"])
    assert [row["concurrency"] for row in rows] == [2]
    assert rows[0]["fp8_output_tok_s"] == pytest.approx(summary["metrics"]["throughput_fp8_tok_s"], rel=1e-3)
    assert artifacts["release-artifacts"]["type"] == "markdown"  # Prefect stores links as markdown
    assert summary["artifacts"]["artifact_uri"] in artifacts["release-artifacts"]["data"]
    parent_id = summary["mlflow"]["run_id"]
    assert f"{setup.mlflow.tracking_uri}/#/experiments/" in artifacts["mlflow-run"]["data"]
    assert f"/runs/{parent_id}" in artifacts["mlflow-run"]["data"]

    from mlflow.tracking import MlflowClient

    parent = MlflowClient(tracking_uri=setup.mlflow.tracking_uri).get_run(parent_id)
    tags = parent.data.tags
    assert tags["prefect.flow_run.id"] == flow_run["id"]
    assert tags["prefect.flow_run.name"] == summary["run_id"]
    assert tags["mlflow.source.name"] == "flows/release.py:release"
    assert len(tags["mlflow.source.git.commit"]) == 40
    assert tags["mlflow.user"]
    assert parent.info.run_name == f"tiny-llama fp8 {summary['run_id']}"


SYSTEM_METRICS = (
    "system/cpu_utilization_percentage",
    "system/system_memory_usage_megabytes",
    "system/system_memory_usage_percentage",
)


def test_every_stage_run_has_system_metrics_unless_switched_off(
    setup: FlowSetup, first: Invocation, second: Invocation
) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=setup.mlflow.tracking_uri)
    children = _stage_runs(setup, first.summary["mlflow"]["run_id"])
    assert [c.info.run_name for c in children] == list(STAGES)
    for child in children:
        stage = child.info.run_name
        for key in SYSTEM_METRICS:
            history = client.get_metric_history(child.info.run_id, key)
            assert len(history) >= 1, (stage, key)
            assert sorted(point.step for point in history) == list(range(len(history))), (stage, key)
        assert 0 <= child.data.metrics["system/cpu_utilization_percentage"] <= 100, stage
        assert 0 < child.data.metrics["system/system_memory_usage_percentage"] < 100, stage
        # No GPU on the machines this suite runs on: no GPU figures, none made up.
        assert not any(key.startswith("system/gpu_") for key in child.data.metrics), stage
    # quantize takes longer than the 1 s interval here: samples on the interval, not only the one at its end.
    quantize = children[STAGES.index("quantize")]
    assert len(client.get_metric_history(quantize.info.run_id, SYSTEM_METRICS[0])) >= 2
    # The parent run is the release's, not a stage's: no system metrics there.
    parent = client.get_run(first.summary["mlflow"]["run_id"])
    assert not any(key.startswith("system/") for key in parent.data.metrics)

    off = _stage_runs(setup, second.summary["mlflow"]["run_id"])
    assert len(off) == 6
    for child in off:
        assert not any(key.startswith("system/") for key in child.data.metrics), child.info.run_name


def _progress_artifacts(setup: FlowSetup, flow_run_id: str) -> list[dict[str, Any]]:
    return list(
        _post_json(
            f"{setup.prefect.api_url}/artifacts/filter",
            {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}, "type": {"any_": ["progress"]}}},
        )
    )


def test_long_stages_leave_a_progress_artifact_at_100(setup: FlowSetup, first: Invocation, second: Invocation) -> None:
    """The stages with steps (calibration batches, MMLU questions, benchmark requests) each have one progress
    artifact on their task run, at 100 when the stage completed; reused stages have none."""
    flow_run = _flow_run(setup, first.summary["run_id"])
    artifacts = _progress_artifacts(setup, flow_run["id"])
    by_key = {artifact["key"]: artifact for artifact in artifacts}
    assert len(by_key) == len(artifacts)  # one per stage: updated in place, not made again
    assert set(by_key) == {"quantize-progress", "evaluate-progress", "benchmark-progress"}
    task_names = {t["id"]: t["name"].rsplit("-", 1)[0] for t in _task_runs(setup, flow_run["id"])}
    for key, artifact in by_key.items():
        stage = key.removesuffix("-progress")
        assert artifact["type"] == "progress"
        assert float(artifact["data"]) == 100.0, artifact
        assert artifact["description"].startswith("completed in "), artifact
        assert task_names[artifact["task_run_id"]] == stage

    cached_run = _flow_run(setup, second.summary["run_id"])
    assert _progress_artifacts(setup, cached_run["id"]) == []


def test_reused_stages_show_as_cached_in_prefect(setup: FlowSetup, second: Invocation) -> None:
    flow_run = _flow_run(setup, second.summary["run_id"])
    task_runs = _task_runs(setup, flow_run["id"])
    assert [(t["state_type"], t["state_name"]) for t in task_runs] == [("COMPLETED", "Cached")] * 6


def test_parent_run_lists_its_inputs_and_the_release_is_a_model_version(setup: FlowSetup, first: Invocation) -> None:
    """log_input for the model, the calibration and the MMLU data (digests = the records' fingerprints), and the
    published release registered in MLflow with its S3 prefix as the source."""
    from mlflow.tracking import MlflowClient

    summary = first.summary
    client = MlflowClient(tracking_uri=setup.mlflow.tracking_uri)
    parent = client.get_run(summary["mlflow"]["run_id"])
    record_dir = setup.state_dir / "stages" / "quantize" / summary["stages"]["quantize"]["cache_key"]
    calibration = json.loads((record_dir / "record.json").read_text())["calibration"]
    inputs = {i.dataset.name: i for i in parent.inputs.dataset_inputs}
    assert set(inputs) == {"tiny-llama", "calibration:python-docs", "mmlu"}
    assert inputs["tiny-llama"].dataset.digest == summary["model"]["fingerprint"][:36]
    assert inputs["tiny-llama"].dataset.source_type == "local"
    assert str(setup.model) in inputs["tiny-llama"].dataset.source
    assert inputs["calibration:python-docs"].dataset.digest == calibration["fingerprint"][:36]
    contexts = {name: {t.key: t.value for t in i.tags}["mlflow.data.context"] for name, i in inputs.items()}
    assert contexts == {"tiny-llama": "model", "calibration:python-docs": "calibration", "mmlu": "evaluation"}

    name, version = parent.data.tags["quant_release.model_version"].rsplit("/", 1)
    assert name == "tiny-llama-FP8"
    model_version = client.get_model_version(name, version)
    assert model_version.source == summary["artifacts"]["artifact_uri"]
    assert model_version.source.startswith(f"s3://{setup.bucket}/quant-release/releases/")
    assert model_version.run_id == parent.info.run_id
    assert model_version.tags["quant_release.run_id"] == summary["run_id"]
