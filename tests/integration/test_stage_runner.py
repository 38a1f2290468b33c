"""StageRunner with a real StageStore on disk and a Tracker on the real MLflow server.

A toy stage table, record and `produce` functions stand in for a stage, so what is tested is the runner
itself: completed → cached → rerun, atomic results, failures, refusing to run without upstream results,
and the keys it derives from the table (upstream keys, code versions).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from quant_release.errors import MissingUpstreamError
from quant_release.progress import Progress
from quant_release.records import Record
from quant_release.stage import StageRunner, StageWork
from quant_release.stages import Stage, code_version
from quant_release.state import StageStore, cache_key
from quant_release.tracking import Tracker
from tests.support.servers import MlflowServer
from tests.support.stage_fixtures import new_experiment_name, s3_keys

pytestmark = pytest.mark.integration

STAGE = "quantize"
INPUTS = {"calib_samples": 4, "calib_seq_len": 32, "nested": {"seed": 0}}


class ToyRecord(Record):
    output: Path
    value: int

    def metrics(self) -> dict[str, float]:
        return {"toy/value": float(self.value)}


class UpstreamRecord(Record):
    value: int


TOY_TABLE = (
    Stage(name="download", help="toy upstream", record=UpstreamRecord),
    Stage(name=STAGE, help="toy stage", record=ToyRecord, needs=("download",), sources=("tests.support.tiny",)),
)


class Produce:
    """A stage body that writes `value` into its work dir and counts its calls."""

    def __init__(self, value: int, fail: BaseException | None = None, check: Callable[[Path], None] | None = None):
        self.value = value
        self.fail = fail
        self.check = check
        self.calls = 0
        self.work_dirs: list[Path] = []

    def __call__(self, stage_work: StageWork) -> ToyRecord:
        work = stage_work.dir
        self.calls += 1
        self.work_dirs.append(work)
        (work / "weights.bin").write_bytes(bytes([self.value]) * 64)
        if self.check is not None:
            self.check(work)
        if self.fail is not None:
            raise self.fail
        return ToyRecord(output=work / "weights.bin", value=self.value)


def _runner(store: StageStore, tracker: Tracker, *, selected: set[str], rerun: set[str] | None = None) -> StageRunner:
    return StageRunner(
        store=store,
        tracker=tracker,
        progress=Progress(enabled=False),
        selected=selected,
        rerun=rerun or set(),
        table=TOY_TABLE,
    )


def _key(inputs: dict[str, Any] = INPUTS) -> str:
    """The key the runner derives: no upstream has run in these tests, the toy table's code version."""
    return cache_key(STAGE, _runner_for_keys().key_inputs(STAGE, inputs))


def _runner_for_keys() -> StageRunner:
    return StageRunner(
        store=None,  # type: ignore[arg-type]  # key_inputs touches neither store nor tracker
        tracker=None,  # type: ignore[arg-type]
        progress=Progress(enabled=False),
        selected=set(),
        rerun=set(),
        table=TOY_TABLE,
    )


@pytest.fixture
def tracker(mlflow_server: MlflowServer, mlflow_client: Any) -> Tracker:
    tracker = Tracker(mlflow_server.tracking_uri, new_experiment_name("runner"))
    tracker.start("runner-test", {}, {})
    return tracker


@pytest.fixture
def store(tmp_path: Path) -> StageStore:
    return StageStore(tmp_path / "state")


def _stage_runs(client: Any, tracker: Tracker) -> list[Any]:
    return client.search_runs(
        [tracker.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{tracker.parent_run_id}'",
        order_by=["start_time ASC"],
    )


def _leftovers(store: StageStore) -> list[str]:
    parent = store.root / "stages" / STAGE
    if not parent.exists():
        return []
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_completed_then_cached_then_rerun(
    store: StageStore, tracker: Tracker, mlflow_client: Any, mlflow_server: MlflowServer
) -> None:
    key = _key()
    result_dir = store.result_dir(STAGE, key)

    # 1. First run: produced, committed, tracked.
    first = Produce(7)
    runner = _runner(store, tracker, selected={STAGE})
    record = runner.run(STAGE, INPUTS, first)
    assert first.calls == 1
    assert record.value == 7
    assert record.output == result_dir / "weights.bin"  # relocated out of the work dir
    assert record.output.read_bytes() == bytes([7]) * 64
    assert not first.work_dirs[0].exists()
    assert ToyRecord.model_validate_json((result_dir / "record.json").read_text()) == record
    assert _leftovers(store) == []
    report = runner.reports[STAGE]
    assert report.status == "completed"
    assert report.cache_key == key == runner.keys[STAGE]
    assert report.seconds > 0

    run = mlflow_client.get_run(report.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == STAGE
    assert run.data.tags["mlflow.parentRunId"] == tracker.parent_run_id
    assert run.data.tags["status"] == "completed"
    assert run.data.tags["cache_key"] == key
    assert run.data.params["nested.seed"] == "0"
    assert run.data.params["calib_samples"] == "4"
    # The stage's run keeps its own timing and memory; the record's metrics and `stage/<stage>/...` (what
    # releases are compared by) are on the parent only: one point per release in an experiment chart.
    assert set(run.data.metrics) == {"seconds", "peak_rss_bytes"}
    assert run.data.metrics["seconds"] == pytest.approx(report.seconds)
    parent_metrics = mlflow_client.get_run(tracker.parent_run_id).data.metrics
    assert parent_metrics["toy/value"] == 7.0
    assert parent_metrics[f"stage/{STAGE}/seconds"] == pytest.approx(report.seconds)
    assert parent_metrics[f"stage/{STAGE}/peak_rss_bytes"] == float(report.peak_rss_bytes or 0)
    prefix = f"{mlflow_server.artifact_prefix}/{tracker.experiment_id}/{report.mlflow_run_id}/artifacts/"
    assert s3_keys(mlflow_server, prefix) == [prefix + "record.json"]

    # 2. Same inputs, a new runner (a new process would look the same): cached, produce never called.
    never = Produce(99, fail=AssertionError("produce must not run for a cached stage"))
    runner = _runner(store, tracker, selected={STAGE})
    cached = runner.run(STAGE, INPUTS, never)
    assert never.calls == 0
    assert cached == record
    assert runner.reports[STAGE].status == "cached"
    cached_run = mlflow_client.get_run(runner.reports[STAGE].mlflow_run_id)
    assert cached_run.data.tags["status"] == "cached"
    assert "toy/value" not in cached_run.data.metrics
    assert set(cached_run.data.metrics) == {"seconds", "peak_rss_bytes"}

    # Other inputs give another key: produced again, the first result untouched.
    other = Produce(8)
    other_inputs = {**INPUTS, "calib_samples": 8}
    _runner(store, tracker, selected={STAGE}).run(STAGE, other_inputs, other)
    assert other.calls == 1
    assert store.result_dir(STAGE, _key(other_inputs)) != result_dir
    assert (result_dir / "weights.bin").read_bytes() == bytes([7]) * 64

    # 3. --rerun: produced again; while it runs the old result is still in place, after it the new one is.
    def old_result_still_there(work: Path) -> None:
        assert json.loads((result_dir / "record.json").read_text())["value"] == 7
        assert (result_dir / "weights.bin").read_bytes() == bytes([7]) * 64
        assert work != result_dir

    again = Produce(9, check=old_result_still_there)
    runner = _runner(store, tracker, selected={STAGE}, rerun={STAGE})
    rerun_record = runner.run(STAGE, INPUTS, again)
    assert again.calls == 1
    assert runner.reports[STAGE].status == "completed"
    assert rerun_record.value == 9
    assert rerun_record.output == result_dir / "weights.bin"
    assert (result_dir / "weights.bin").read_bytes() == bytes([9]) * 64
    assert json.loads((result_dir / "record.json").read_text())["value"] == 9
    assert _leftovers(store) == []  # no .partial-* work dir, no .old-* trash

    runs = _stage_runs(mlflow_client, tracker)
    assert [r.data.tags["status"] for r in runs] == ["completed", "cached", "completed", "completed"]


def test_failed_rerun_keeps_the_previous_result(store: StageStore, tracker: Tracker) -> None:
    key = _key()
    _runner(store, tracker, selected={STAGE}).run(STAGE, INPUTS, Produce(7))
    runner = _runner(store, tracker, selected={STAGE}, rerun={STAGE})
    with pytest.raises(RuntimeError, match="out of memory"):
        runner.run(STAGE, INPUTS, Produce(9, fail=RuntimeError("CUDA out of memory")))
    assert runner.reports[STAGE].status == "failed"
    assert _leftovers(store) == []
    kept = store.load(STAGE, key, ToyRecord)
    assert kept is not None and kept.value == 7
    assert kept.output.read_bytes() == bytes([7]) * 64


def test_failing_produce_leaves_nothing_and_is_reported(
    store: StageStore, tracker: Tracker, mlflow_client: Any, tmp_path: Path
) -> None:
    error = RuntimeError("calibration diverged: amax is NaN\nsecond line of detail")
    produce = Produce(5, fail=error)
    runner = _runner(store, tracker, selected={STAGE})
    with pytest.raises(RuntimeError) as caught:
        runner.run(STAGE, INPUTS, produce)
    assert caught.value is error  # the stage's own exception propagates, unwrapped
    assert produce.calls == 1
    assert not produce.work_dirs[0].exists()
    key = _key()
    assert not store.result_dir(STAGE, key).exists()
    assert store.load(STAGE, key, ToyRecord) is None
    assert _leftovers(store) == []

    report = runner.reports[STAGE]
    assert report.status == "failed"
    assert report.error == "RuntimeError: calibration diverged: amax is NaN"  # one line
    assert report.cache_key == key
    run = mlflow_client.get_run(report.mlflow_run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith("calibration diverged: amax is NaN")
    assert "status" not in run.data.tags
    traceback_file = Path(mlflow_client.download_artifacts(report.mlflow_run_id, "error.txt", str(tmp_path)))
    text = traceback_file.read_text()
    assert text.startswith("Traceback (most recent call last):")
    assert "RuntimeError: calibration diverged: amax is NaN" in text
    assert [a.path for a in mlflow_client.list_artifacts(report.mlflow_run_id)] == ["error.txt"]

    # The next run does not mistake the failure for a result: it produces.
    retry = Produce(5)
    runner = _runner(store, tracker, selected={STAGE})
    assert runner.run(STAGE, INPUTS, retry).value == 5
    assert retry.calls == 1
    assert runner.reports[STAGE].status == "completed"


def test_unselected_stage_without_result_stops_before_tracking(
    store: StageStore, tracker: Tracker, mlflow_client: Any
) -> None:
    runs_before = len(mlflow_client.search_runs([tracker.experiment_id]))
    produce = Produce(1)
    runner = _runner(store, tracker, selected={"evaluate"})
    with pytest.raises(MissingUpstreamError) as caught:
        runner.run(STAGE, INPUTS, produce)
    assert "quant-release quantize" in str(caught.value)
    assert caught.value.exit_code == 3
    assert produce.calls == 0
    report = runner.reports[STAGE]  # reported for the summary, with no MLflow run behind it
    assert report.status == "failed"
    assert report.mlflow_run_id is None
    assert report.error == str(caught.value)
    assert len(mlflow_client.search_runs([tracker.experiment_id])) == runs_before
    assert not (store.root / "stages" / STAGE).exists()

    # Once a selected run produced it, the unselected stage is read back as cached.
    _runner(store, tracker, selected={STAGE}).run(STAGE, INPUTS, Produce(3))
    runner = _runner(store, tracker, selected={"evaluate"})
    assert runner.run(STAGE, INPUTS, produce).value == 3
    assert produce.calls == 0
    assert runner.reports[STAGE].status == "cached"


def test_unreadable_record_is_not_trusted(store: StageStore, tracker: Tracker) -> None:
    key = _key()
    _runner(store, tracker, selected={STAGE}).run(STAGE, INPUTS, Produce(7))
    (store.result_dir(STAGE, key) / "record.json").write_text('{"output": "x", "value": "not a number"}')
    produce = Produce(11)
    runner = _runner(store, tracker, selected={STAGE})
    assert runner.run(STAGE, INPUTS, produce).value == 11
    assert produce.calls == 1
    assert runner.reports[STAGE].status == "completed"
    assert _leftovers(store) == []


def test_key_adds_the_upstream_keys_and_the_code_version(
    store: StageStore, tracker: Tracker, mlflow_client: Any
) -> None:
    """Tasks state only their own inputs; the runner adds what the stage table says shapes the result."""
    runner = _runner(store, tracker, selected={"download", STAGE})
    runner.run("download", {"source": "a"}, lambda _work: UpstreamRecord(value=1))
    runner.run(STAGE, INPUTS, Produce(1))
    report = runner.reports[STAGE]
    code = code_version(TOY_TABLE[1], None)
    assert report.cache_key == cache_key(
        STAGE, {**INPUTS, "upstream": {"download": runner.keys["download"]}, "code": code}
    )
    assert set(code["packages"]) == set()  # the toy stage names no packages
    params = mlflow_client.get_run(report.mlflow_run_id).data.params
    assert params["upstream.download"] == runner.keys["download"]
    assert params["code.source"] == code["source"]
    assert params["calib_samples"] == "4"

    # Another upstream result: the stage's key changes with it, so it is produced again.
    again = _runner(store, tracker, selected={"download", STAGE})
    again.run("download", {"source": "b"}, lambda _work: UpstreamRecord(value=2))
    produce = Produce(2)
    again.run(STAGE, INPUTS, produce)
    assert produce.calls == 1
    assert again.reports[STAGE].cache_key != report.cache_key


def test_a_rejecting_gate_fails_the_stage_but_keeps_its_result(
    store: StageStore, tracker: Tracker, mlflow_client: Any
) -> None:
    """`accept` is checked on fresh and cached records alike; its rejection costs no redo on the next try."""
    produce = Produce(7)

    def reject(record: ToyRecord) -> ToyRecord:
        raise RuntimeError(f"gate: value {record.value} is too high")

    runner = _runner(store, tracker, selected={STAGE})
    with pytest.raises(RuntimeError, match="gate: value 7"):
        runner.run(STAGE, INPUTS, produce, accept=reject)
    report = runner.reports[STAGE]
    assert report.status == "failed" and report.error == "RuntimeError: gate: value 7 is too high"
    assert report.peak_rss_bytes is not None and report.peak_rss_bytes > 10_000_000  # a Python process with torch
    failed_run = mlflow_client.get_run(report.mlflow_run_id)
    # The rejected numbers are in MLflow, on the parent run like any release's numbers.
    assert mlflow_client.get_run(tracker.parent_run_id).data.metrics["toy/value"] == 7.0
    assert "toy/value" not in failed_run.data.metrics
    assert failed_run.data.metrics["peak_rss_bytes"] == float(report.peak_rss_bytes)

    # Accepted the second time (e.g. an override): the stored result is reused, not produced again.
    runner = _runner(store, tracker, selected={STAGE})
    record = runner.run(STAGE, INPUTS, produce, accept=lambda r: r.model_copy(update={"value": r.value + 100}))
    assert produce.calls == 1
    assert runner.reports[STAGE].status == "cached"
    assert record.value == 107  # the annotated record is what later stages get


def test_peak_rss_is_the_stage_own_peak(store: StageStore, tracker: Tracker) -> None:
    def big(stage_work: StageWork) -> ToyRecord:
        block = bytearray(300 * 2**20)  # 300 MiB, touched
        for i in range(0, len(block), 4096):
            block[i] = 1
        del block
        return Produce(1)(stage_work)

    runner = _runner(store, tracker, selected={STAGE})
    runner.run(STAGE, INPUTS, big)
    first = runner.reports[STAGE].peak_rss_bytes
    runner = _runner(store, tracker, selected={STAGE})
    runner.run(STAGE, INPUTS, Produce(1))  # cached: reading a record back needs no 300 MiB
    second = runner.reports[STAGE].peak_rss_bytes
    assert first is not None and second is not None
    assert first - second > 250 * 2**20, (first, second)


def test_a_record_keeps_what_producing_it_cost_when_it_is_reused(store: StageStore, tracker: Tracker) -> None:
    def big(stage_work: StageWork) -> ToyRecord:
        block = bytearray(300 * 2**20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        del block
        return Produce(1)(stage_work)

    produced = _runner(store, tracker, selected={STAGE}).run(STAGE, INPUTS, big)
    assert produced.resources is not None
    assert produced.resources.peak_rss_bytes is not None and produced.resources.peak_rss_bytes > 300 * 2**20
    assert produced.resources.peak_gpu_memory_bytes == {}  # no CUDA in this process
    reused = _runner(store, tracker, selected={STAGE}).run(STAGE, INPUTS, Produce(1))
    assert reused.resources == produced.resources  # the card shows what producing it took, not reading it


def test_each_metric_key_is_on_one_run_per_release_and_compare_reads_it(
    store: StageStore, mlflow_client: Any, mlflow_server: MlflowServer
) -> None:
    """Two releases in one experiment: no metric key is on both a parent and a stage run (an MLflow experiment
    chart would otherwise get two points per release), and `quant-release compare` finds the numbers."""
    from flows.compare import compare

    experiment = new_experiment_name("one-point")
    parents = []
    for value in (7, 9):
        tracker = Tracker(mlflow_server.tracking_uri, experiment)
        parents.append(tracker.start(f"release-{value}", {"toy": {"value": value}}, {}))
        runner = _runner(store, tracker, selected={"download", STAGE}, rerun={STAGE})
        runner.run("download", {"source": "a"}, lambda _work: UpstreamRecord(value=1))
        runner.run(STAGE, INPUTS, Produce(value))
        # What the pipeline's summary does at the end: the same values again, which must not add history.
        tracker.log_metrics(tracker.parent_run_id or "", {"toy/value": float(value)})
        tracker.finish("FINISHED")

    runs = mlflow_client.search_runs([Tracker(mlflow_server.tracking_uri, experiment).experiment_id])
    assert len(runs) == 6  # two parents, two stage runs each
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    parent_keys = {key for r in runs if r.info.run_id in parents for key in r.data.metrics}
    child_keys = {key for r in children for key in r.data.metrics}
    assert {"toy/value", f"stage/{STAGE}/seconds", "stage/download/seconds"} <= parent_keys
    assert parent_keys.isdisjoint(child_keys), parent_keys & child_keys
    assert child_keys == {"seconds", "peak_rss_bytes"}
    assert len(mlflow_client.get_metric_history(parents[0], "toy/value")) == 1

    table = compare(mlflow_server.tracking_uri, parents[0], parents[1]).splitlines()
    assert ["toy/value", "7", "9", "+2", "1.286x"] in [line.split() for line in table]
    assert any(line.split()[:1] == [f"stage/{STAGE}/seconds"] for line in table)
