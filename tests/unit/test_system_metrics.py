"""System metrics sampling: samples with steps, a last sample at stop, no thread left, errors that stop it
quietly; and in a stage's MLflow run (a real sqlite store), also when the stage raises or is interrupted."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

import pytest

from quant_release.system_metrics import THREAD_NAME, SystemMetricsSampler
from quant_release.tracking import Tracker

HOST_KEYS = {
    "system/cpu_utilization_percentage",
    "system/system_memory_usage_megabytes",
    "system/system_memory_usage_percentage",
}


def _nvml_sees_a_gpu() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return False
    try:
        return bool(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()


def _sampler_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == THREAD_NAME]


class Samples:
    """The `log` of a sampler: keeps what it is given."""

    def __init__(self) -> None:
        self.logged: list[tuple[dict[str, float], int]] = []

    def __call__(self, values: Mapping[str, float], step: int) -> None:
        self.logged.append((dict(values), step))


def test_samples_every_interval_and_once_more_at_stop() -> None:
    samples = Samples()
    with SystemMetricsSampler(samples, interval=0.2) as sampler:
        assert len(_sampler_threads()) == 1
        time.sleep(0.7)
    assert _sampler_threads() == []
    assert sampler.error is None
    # Three or so on the interval (a loaded machine may wake late), and the one taken at stop.
    assert 2 <= len(samples.logged) <= 5, samples.logged
    assert sampler.samples == len(samples.logged)
    assert [step for _, step in samples.logged] == list(range(len(samples.logged)))
    for values, _ in samples.logged:
        assert set(values) >= HOST_KEYS
        assert 0.0 <= values["system/cpu_utilization_percentage"] <= 100.0
        assert 0.0 < values["system/system_memory_usage_percentage"] < 100.0
        assert values["system/system_memory_usage_megabytes"] > 1.0
        gpu_keys = {key for key in values if key.startswith("system/gpu_")}
        assert bool(gpu_keys) == _nvml_sees_a_gpu()  # absent on a machine without a GPU, never made up


def test_a_stage_shorter_than_the_interval_still_gets_one_sample() -> None:
    samples = Samples()
    started = time.monotonic()
    with SystemMetricsSampler(samples, interval=60.0):
        time.sleep(0.05)
    assert time.monotonic() - started < 10  # stopping does not wait for the interval
    assert [step for _, step in samples.logged] == [0]
    assert _sampler_threads() == []


def test_a_logging_error_stops_sampling_once_and_is_kept_for_the_caller() -> None:
    calls: list[int] = []

    def refusing(values: Mapping[str, float], step: int) -> None:
        calls.append(step)
        raise ConnectionError("mlflow went away")

    with SystemMetricsSampler(refusing, interval=0.05) as sampler:
        time.sleep(0.4)  # several intervals: a sampler that kept going would call again
    assert calls == [0]
    assert sampler.samples == 0
    assert sampler.error == "ConnectionError: mlflow went away"
    assert _sampler_threads() == []


def test_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        SystemMetricsSampler(Samples(), interval=0)


# --- in a stage's MLflow run --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tracker(tmp_path_factory: pytest.TempPathFactory) -> Tracker:
    root = tmp_path_factory.mktemp("mlflow")
    tracker = Tracker(
        f"sqlite:///{root / 'mlflow.db'}",
        "system-metrics",
        artifact_location=(root / "artifacts").as_uri(),
        system_metrics_interval=0.1,
    )
    tracker.start("release", {}, {})
    return tracker


def _history(tracker: Tracker, run_id: str, key: str) -> list[Any]:
    return list(tracker.client.get_metric_history(run_id, key))


def test_stage_run_gets_system_metrics_with_steps(tracker: Tracker) -> None:
    with tracker.stage("quantize") as run_id:
        time.sleep(0.35)
    assert _sampler_threads() == []
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert set(run.data.metrics) >= HOST_KEYS
    history = _history(tracker, run_id, "system/cpu_utilization_percentage")
    assert len(history) >= 2
    assert sorted(point.step for point in history) == list(range(len(history)))


@pytest.mark.parametrize(
    ("raised", "status"), [(RuntimeError("calibration diverged"), "FAILED"), (KeyboardInterrupt(), "KILLED")]
)
def test_sampling_ends_with_a_stage_that_raises(tracker: Tracker, raised: BaseException, status: str) -> None:
    seen: dict[str, str] = {}
    with pytest.raises(type(raised)), tracker.stage("build") as run_id:
        seen["id"] = run_id
        assert len(_sampler_threads()) == 1
        time.sleep(0.15)
        raise raised
    assert _sampler_threads() == []
    assert tracker.client.get_run(seen["id"]).info.status == status
    assert len(_history(tracker, seen["id"], "system/cpu_utilization_percentage")) >= 1


def test_a_sampling_error_is_one_warning_and_the_stage_goes_on(tracker: Tracker) -> None:
    """The stage's run is deleted for a moment, so MLflow refuses the sampler's metrics for real."""
    warnings: list[str] = []
    with tracker.stage("evaluate", warn=warnings.append) as run_id:
        tracker.client.delete_run(run_id)
        time.sleep(0.4)  # several intervals
        tracker.client.restore_run(run_id)
    assert _sampler_threads() == []
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("system metrics stopped after 0 samples: ")
    run = tracker.client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert not any(key.startswith("system/") for key in run.data.metrics)


def test_no_sampling_when_switched_off(tracker: Tracker) -> None:
    off = Tracker(tracker.tracking_uri, "system-metrics")  # no interval: what QUANT_RELEASE_SYSTEM_METRICS=false gives
    with off.stage("download") as run_id:
        assert _sampler_threads() == []
        time.sleep(0.15)
    assert off.client.get_run(run_id).data.metrics == {}
