"""quant_release.tracking without a server: redaction, flattening, URI checks, and a local sqlite store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from quant_release.errors import ConfigError, redact
from quant_release.tracking import Tracker, check_tracking_uri, flatten

SECRET = "pa55-w0rd-9f3e"


# --- redact ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri",
    [
        f"https://builder:{SECRET}@mlflow.example.com/api",
        f"postgresql://admin:{SECRET}@db.internal:5432/mlflow",
        f"http://{SECRET}@host:5000",
    ],
)
def test_redact_drops_userinfo(uri: str) -> None:
    out = redact(uri)
    assert SECRET not in out
    assert "***@" in out
    host = uri.rsplit("@", 1)[1]
    assert out.endswith(host)


@pytest.mark.parametrize("key", ["token", "access_token", "api_key", "apikey", "password", "client_secret"])
def test_redact_blanks_token_like_query_values(key: str) -> None:
    out = redact(f"https://host/path?page=2&{key}={SECRET}&x=y")
    assert SECRET not in out
    assert f"{key}=" in out
    assert "page=2" in out
    assert "x=y" in out
    assert out.startswith("https://host/path?")


@pytest.mark.parametrize(
    "text",
    ["plain text", "quant-release", "/local/path/with:colon@at", "sqlite:///tmp/mlflow.db", "", "org/name"],
)
def test_redact_leaves_plain_strings_untouched(text: str) -> None:
    assert redact(text) == text


def test_redact_keeps_urls_without_secrets() -> None:
    assert redact("http://127.0.0.1:5000/path") == "http://127.0.0.1:5000/path"
    assert redact("https://host/p?page=2") == "https://host/p?page=2"


# --- flatten --------------------------------------------------------------------------------------


def test_flatten_nesting() -> None:
    flat = flatten({"a": {"b": {"c": 1}, "d": [1, 2]}, "e": None, "f": True})
    assert flat == {"a.b.c": "1", "a.d": "[1, 2]", "e": "None", "f": "True"}


@pytest.mark.parametrize("key", ["hf_token", "password", "aws_secret_access_key", "api_key", "API-KEY", "credentials"])
def test_flatten_masks_secret_looking_keys(key: str) -> None:
    flat = flatten({"section": {key: SECRET}})
    assert flat == {f"section.{key}": "***"}


def test_flatten_redacts_urls_in_values() -> None:
    flat = flatten({"endpoint": f"https://u:{SECRET}@host/x?token={SECRET}"})
    assert SECRET not in flat["endpoint"]
    assert flat["endpoint"].startswith("https://***@host/x?token=")


def test_flatten_keeps_empty_secret_values_visibly_empty() -> None:
    assert flatten({"hf_token": None, "password": ""}) == {"hf_token": "None", "password": ""}


def test_flatten_caps_values_at_6000_chars() -> None:
    flat = flatten({"long": "x" * 7000, "short": "y" * 6000})
    assert len(flat["long"]) == 6000
    assert flat["short"] == "y" * 6000


# --- check_tracking_uri ---------------------------------------------------------------------------


@pytest.mark.parametrize("uri", ["gs://bucket/x", "ftp://host/x", "s3://bucket/mlruns"])
def test_check_tracking_uri_rejects_unknown_schemes(uri: str) -> None:
    with pytest.raises(ConfigError, match="unsupported scheme"):
        check_tracking_uri(uri)


@pytest.mark.parametrize("uri", ["./mlruns", "/srv/mlruns"])
def test_check_tracking_uri_accepts_a_plain_directory(uri: str) -> None:
    check_tracking_uri(uri)  # MLflow's file store; must not raise


def test_check_tracking_uri_redacts_its_message() -> None:
    with pytest.raises(ConfigError) as info:
        check_tracking_uri(f"gs://user:{SECRET}@bucket/x")
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    "uri", ["sqlite:////tmp/x/mlflow.db", "sqlite:///relative.db", "file:///tmp/mlruns", "postgresql+psycopg2://h/db"]
)
def test_check_tracking_uri_accepts_local_stores(uri: str) -> None:
    check_tracking_uri(uri)  # no network, no error


def test_check_tracking_uri_unreachable_server_names_it() -> None:
    from tests.support.process import free_port

    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError, match="not reachable") as info:
        check_tracking_uri(uri, timeout=2)
    assert uri in str(info.value)


# --- Tracker on a local sqlite store ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tracker(tmp_path_factory: pytest.TempPathFactory) -> Tracker:
    root = tmp_path_factory.mktemp("mlflow")
    return Tracker(f"sqlite:///{root / 'mlflow.db'}", "unit-tests", artifact_location=(root / "artifacts").as_uri())


@pytest.fixture(scope="module")
def parent_id(tracker: Tracker) -> str:
    return tracker.start(
        "release",
        {"source": {"model": "org/name"}, "publish": {"hf_token": SECRET}},
        {"quant_release.run_id": "20260101-000000-abcdef"},
    )


def test_parent_run_params_and_tags(tracker: Tracker, parent_id: str) -> None:
    run = tracker.client.get_run(parent_id)
    assert run.data.params["source.model"] == "org/name"
    assert run.data.params["publish.hf_token"] == "***"
    assert run.data.tags["quant_release.run_id"] == "20260101-000000-abcdef"
    assert run.info.status == "RUNNING"


def test_existing_experiment_is_reused(tracker: Tracker) -> None:
    again = Tracker(tracker.tracking_uri, "unit-tests")
    assert again.experiment_id == tracker.experiment_id


def test_nested_stage_run_has_parent_tag_and_finishes(tracker: Tracker, parent_id: str) -> None:
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    with tracker.stage("quantize", tags={"cache_key": "0123"}) as run_id:
        tracker.log_params(run_id, {"calib": {"samples": 64}})
        tracker.log_metrics(run_id, {"quantize/calib_tokens": 4096.0})
    run = tracker.client.get_run(run_id)
    assert run_id != parent_id
    assert run.data.tags[MLFLOW_PARENT_RUN_ID] == parent_id
    assert run.data.tags["stage"] == "quantize"
    assert run.data.tags["cache_key"] == "0123"
    assert run.data.params["calib.samples"] == "64"
    assert run.data.metrics["quantize/calib_tokens"] == 4096.0
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "quantize"


def test_raising_stage_body_marks_run_failed_with_error_tag(tracker: Tracker, parent_id: str) -> None:
    seen: dict[str, Any] = {}
    with pytest.raises(RuntimeError, match="calibration exploded"), tracker.stage("build") as run_id:
        seen["id"] = run_id
        raise RuntimeError("calibration exploded: NaN in layer 3")
    run = tracker.client.get_run(seen["id"])
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "calibration exploded: NaN in layer 3"


def test_error_tag_of_a_whole_url_is_redacted(tracker: Tracker, parent_id: str) -> None:
    seen: dict[str, Any] = {}
    with pytest.raises(RuntimeError), tracker.stage("build") as run_id:
        seen["id"] = run_id
        raise RuntimeError(f"https://u:{SECRET}@host/x")
    assert tracker.client.get_run(seen["id"]).data.tags["error"] == "https://***@host/x"


def test_error_tag_redacts_credentials_inside_a_message(tracker: Tracker, parent_id: str) -> None:
    seen: dict[str, Any] = {}
    with pytest.raises(RuntimeError), tracker.stage("build") as run_id:
        seen["id"] = run_id
        raise RuntimeError(f"cannot reach https://u:{SECRET}@host/x?token={SECRET}: connection refused")
    error = tracker.client.get_run(seen["id"]).data.tags["error"]
    assert "cannot reach" in error
    assert SECRET not in error


def test_metric_keys_with_odd_characters_are_sanitized(tracker: Tracker, parent_id: str) -> None:
    with tracker.stage("evaluate") as run_id:
        tracker.log_metrics(
            run_id,
            {"mmlu/bf16/category/social sciences (misc.)": 0.5, "mmlu/fp8": 0.25, "weird#key!": 1.0},
        )
    metrics = tracker.client.get_run(run_id).data.metrics
    assert metrics == {"mmlu/bf16/category/social sciences _misc._": 0.5, "mmlu/fp8": 0.25, "weird_key_": 1.0}


def test_set_tags_redacts_values(tracker: Tracker, parent_id: str) -> None:
    tracker.set_tags(parent_id, {"endpoint": f"https://u:{SECRET}@host"})
    assert tracker.client.get_run(parent_id).data.tags["endpoint"] == "https://***@host"


def test_many_params_are_logged_in_batches(tracker: Tracker, parent_id: str) -> None:
    with tracker.stage("benchmark") as run_id:
        tracker.log_params(run_id, {f"p{i:03d}": i for i in range(250)})
    params = tracker.client.get_run(run_id).data.params
    assert len(params) == 250
    assert params["p249"] == "249"


def test_log_text_and_artifact_land_in_the_run(tracker: Tracker, parent_id: str, tmp_path: Path) -> None:
    record = tmp_path / "record.json"
    record.write_text('{"ok": true}')
    tracker.log_text(parent_id, "hello", "summary.txt")
    tracker.log_artifact(parent_id, record)
    names = {a.path for a in tracker.client.list_artifacts(parent_id)}
    assert {"summary.txt", "record.json"} <= names


def test_finish_sets_parent_status(tmp_path: Path) -> None:
    tracker = Tracker(f"sqlite:///{tmp_path / 'm.db'}", "finish", artifact_location=(tmp_path / "a").as_uri())
    parent = tracker.start("run", {}, {})
    tracker.finish("FAILED")
    assert tracker.client.get_run(parent).info.status == "FAILED"
