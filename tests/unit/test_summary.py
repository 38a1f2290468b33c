"""The run summary (--summary-json, MLflow's parent run) and the closing table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from quant_release.config import ReleaseConfig
from quant_release.errors import ConfigError, MissingUpstreamError
from quant_release.records import Record, Release, Results, StageReport
from quant_release.stages import STAGES
from quant_release.summary import RunSummary, build_summary, summary_table
from tests.unit.test_modelcard import _checkpoint, _engines, _mmlu, _source, _throughput

RUN_ID = "20261126-231501-a3f9c2"
TRACKING_URI = "http://127.0.0.1:5000"
MLFLOW_RUN_ID = "0123456789abcdef0123456789abcdef"


def _release() -> Release:
    return Release(
        folder=Path("/state/stages/publish/k/release"),
        model_card=Path("/state/stages/publish/k/release/README.md"),
        files=[],
        artifact_uri="s3://bucket/releases/k",
        hub_repo_id="my-org/SmolLM2-135M-Instruct-FP8",
        hub_revision="fedcba9876543210fedcba9876543210fedcba98",
        hub_url="http://hub.example/my-org/SmolLM2-135M-Instruct-FP8",
    )


def _records() -> dict[str, Any]:
    """By stage name, for the tests to read; the summary gets them as `Results`."""
    return {
        "download": _source("hub"),
        "quantize": _checkpoint(),
        "build": _engines("scaled_mm"),
        "evaluate": _mmlu(),
        "benchmark": _throughput(),
        "publish": _release(),
    }


def _reports(status: str = "completed") -> dict[str, StageReport]:
    return {
        stage: StageReport(status=status, seconds=10.0 * (i + 1), cache_key=f"key{i}", mlflow_run_id=f"run{i}")
        for i, stage in enumerate(STAGES)
    }


def _summary(
    records: dict[str, Any] | None = None,
    reports: dict[str, StageReport] | None = None,
    error: BaseException | None = None,
) -> RunSummary:
    return build_summary(
        run_id=RUN_ID,
        config=ReleaseConfig.model_validate({"source": {"model": "HuggingFaceTB/SmolLM2-135M-Instruct"}}),
        checked_revision="checked-commit",
        reports=_reports() if reports is None else reports,
        results=Results(list[Record]((_records() if records is None else records).values())),
        tracking_uri=TRACKING_URI,
        mlflow_run_id=MLFLOW_RUN_ID,
        versions={"python": "3.11.7", "torch": "2.13.0"},
        device="cuda",
        error=error,
        seconds=3723.0,
    )


def test_summary_has_every_required_key() -> None:
    records = _records()
    data = json.loads(_summary().model_dump_json())
    assert data["run_id"] == RUN_ID
    assert data["status"] == "completed"
    assert data["error"] is None
    assert data["model"]["source"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert data["model"]["revision"] == records["download"].revision
    assert data["model"]["fingerprint"] == records["download"].fingerprint
    assert list(data["stages"]) == list(STAGES)
    for i, stage in enumerate(STAGES):
        assert data["stages"][stage]["status"] == "completed"
        assert data["stages"][stage]["seconds"] == 10.0 * (i + 1)
    metrics = data["metrics"]
    assert metrics["mmlu_bf16"] == records["evaluate"].bf16.accuracy
    assert metrics["mmlu_fp8"] == records["evaluate"].fp8.accuracy
    assert metrics["throughput_bf16_tok_s"] == records["benchmark"].bf16.output_throughput
    assert metrics["throughput_fp8_tok_s"] == records["benchmark"].fp8.output_throughput
    assert metrics["fp8_speedup"] == records["benchmark"].fp8_speedup
    assert metrics["fp8_top1_agreement"] == records["build"].top1_agreement
    assert data["artifacts"]["checkpoint_dir"] == str(records["quantize"].checkpoint_dir)
    assert data["artifacts"]["model_card"] == str(records["publish"].model_card)
    assert data["artifacts"]["artifact_uri"] == "s3://bucket/releases/k"
    assert data["artifacts"]["mmlu_predictions"] == str(records["evaluate"].predictions_file)
    assert data["mlflow"] == {"tracking_uri": TRACKING_URI, "run_id": MLFLOW_RUN_ID}
    assert data["hub"] == {
        "repo_id": "my-org/SmolLM2-135M-Instruct-FP8",
        "revision": "fedcba9876543210fedcba9876543210fedcba98",
        "url": "http://hub.example/my-org/SmolLM2-135M-Instruct-FP8",
    }
    assert data["device"] == "NVIDIA H100 80GB HBM3"  # the engine's device name wins over "cuda"
    assert data["environment"]["torch"] == "2.13.0"
    assert "parent_metrics" not in data  # for MLflow only, not in the JSON


def test_summary_round_trips_through_json() -> None:
    summary = _summary()
    again = RunSummary.model_validate_json(summary.model_dump_json())
    assert again.model_dump() == summary.model_dump()


def test_parent_metrics_use_the_stable_keys() -> None:
    metrics = _summary().parent_metrics
    records = _records()
    assert metrics["mmlu/bf16"] == records["evaluate"].bf16.accuracy
    assert metrics["mmlu/fp8"] == records["evaluate"].fp8.accuracy
    assert metrics["mmlu/fp8/category/stem"] == records["evaluate"].fp8.per_category["stem"]
    assert metrics["throughput/fp8_tok_s"] == records["benchmark"].fp8.output_throughput
    assert metrics["fp8_speedup"] == records["benchmark"].fp8_speedup
    assert metrics["stage/quantize/seconds"] == 20.0


def test_cached_stage_seconds_are_logged_and_skipped_ones_are_not() -> None:
    reports = _reports()
    reports["quantize"] = StageReport(status="cached", seconds=0.5)
    reports["benchmark"] = StageReport(status="skipped")
    metrics = _summary(reports=reports).parent_metrics
    assert metrics["stage/quantize/seconds"] == 0.5
    assert "stage/benchmark/seconds" not in metrics


def test_partial_run_has_nulls_not_missing_keys() -> None:
    records = {k: v for k, v in _records().items() if k in ("download", "quantize")}
    reports = _reports()
    for stage in ("build", "evaluate", "benchmark", "publish"):
        reports[stage] = StageReport(status="skipped")
    data = json.loads(_summary(records=records, reports=reports).model_dump_json())
    assert data["status"] == "completed"
    assert data["metrics"]["mmlu_fp8"] is None
    assert data["metrics"]["fp8_speedup"] is None
    assert data["artifacts"]["model_card"] is None
    assert data["hub"] == {"repo_id": None, "revision": None, "url": None}
    assert data["device"] == "cuda"
    assert data["stages"]["evaluate"]["status"] == "skipped"


def test_no_download_record_falls_back_to_the_checked_revision() -> None:
    data = _summary(records={}, reports=_reports("skipped"), error=ConfigError("x"))
    assert data.model["revision"] == "checked-commit"
    assert data.model["fingerprint"] is None


@pytest.mark.parametrize(
    "error",
    [
        ConfigError("--push-to-hub needs a Hub token in HF_TOKEN"),
        MissingUpstreamError("stage download has no finished result for these settings;\nsecond line kept"),
    ],
)
def test_quant_release_error_message_is_verbatim(error: BaseException) -> None:
    reports = _reports()
    reports["publish"] = StageReport(status="failed", seconds=1.0, error="x")
    summary = _summary(reports=reports, error=error)
    assert summary.status == "failed"
    assert summary.error == str(error)
    assert summary.stages["publish"].status == "failed"


def test_other_errors_are_type_and_first_line() -> None:
    summary = _summary(error=RuntimeError("CUDA out of memory\nTried to allocate 2 GiB"))
    assert summary.status == "failed"
    assert summary.error == "RuntimeError: CUDA out of memory"
    assert _summary(error=KeyboardInterrupt()).error == "KeyboardInterrupt"


# --- summary_table --------------------------------------------------------------------------------


def test_table_shows_each_stage_status_and_the_metrics() -> None:
    reports = _reports()
    reports["download"] = StageReport(status="cached", seconds=0.2)
    reports["publish"] = StageReport(status="skipped")
    table = summary_table(_summary(reports=reports))
    lines = table.splitlines()
    assert lines[0] == f"quant-release run {RUN_ID}: completed in 1:02:03"
    rows = {line.split()[0]: line.split()[1:] for line in lines if line.split() and line.split()[0] in STAGES}
    assert rows == {
        "download": ["cached", "-"],
        "quantize": ["completed", "0:00:20"],
        "build": ["completed", "0:00:30"],
        "evaluate": ["completed", "0:00:40"],
        "benchmark": ["completed", "0:00:50"],
        "publish": ["skipped", "-"],
    }
    records = _records()
    mmlu_line = next(line for line in lines if line.startswith("MMLU accuracy"))
    assert mmlu_line.split()[-2:] == [
        f"{100 * records['evaluate'].bf16.accuracy:.2f}%",
        f"{100 * records['evaluate'].fp8.accuracy:.2f}%",
    ]
    tok_line = next(line for line in lines if line.startswith("Output tokens/s"))
    assert tok_line.split()[-2:] == ["1234.6", "2071.0"]
    speedup_line = next(line for line in lines if line.startswith("FP8 speedup"))
    assert speedup_line.split()[-1] == f"{records['benchmark'].fp8_speedup:.2f}x"
    agreement_line = next(line for line in lines if line.startswith("Next-token agreement"))
    assert agreement_line.split()[-1] == f"{100 * records['build'].top1_agreement:.2f}%"
    assert "device:   NVIDIA H100 80GB HBM3" in lines
    assert f"card:     {records['publish'].model_card}" in lines
    assert "stored:   s3://bucket/releases/k" in lines
    assert f"hub:      {records['publish'].hub_url} @ {records['publish'].hub_revision}" in lines
    assert f"mlflow:   {TRACKING_URI} run {MLFLOW_RUN_ID}" in lines
    assert not any(line.startswith("error:") for line in lines)


def test_table_of_a_failed_run_shows_dashes_and_the_error() -> None:
    reports = _reports("skipped")
    reports["download"] = StageReport(status="completed", seconds=5.0)
    reports["quantize"] = StageReport(status="failed", seconds=65.0, error="RuntimeError: boom")
    records = {"download": _source("gguf")}
    table = summary_table(_summary(records=records, reports=reports, error=RuntimeError("boom")))
    lines = table.splitlines()
    assert lines[0].endswith(": failed in 1:02:03")
    assert any(line.split() == ["quantize", "failed", "0:01:05"] for line in lines)
    assert next(line for line in lines if line.startswith("MMLU accuracy")).split()[-2:] == ["-", "-"]
    assert next(line for line in lines if line.startswith("Output tokens/s")).split()[-2:] == ["-", "-"]
    assert next(line for line in lines if line.startswith("FP8 speedup")).split()[-1] == "-"
    assert lines[-1] == "error:    RuntimeError: boom"
    assert not any(line.startswith(("card:", "hub:", "stored:")) for line in lines)
