"""The artifact store against a real S3 server (SeaweedFS on 127.0.0.1, which checks signatures)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import EndpointConnectionError

from quant_release.errors import ConfigError
from quant_release.storage import (
    MANIFEST_NAME,
    MULTIPART_CHUNKSIZE,
    S3Store,
    open_store,
)
from tests.support.servers import S3Server
from tests.unit.test_storage_local import (
    contract_partial_upload_has_no_manifest,
    contract_round_trip,
    contract_single_files,
    make_tree,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def store(s3_env: dict[str, str], s3_bucket: str) -> Iterator[S3Store]:
    # Built from the environment only, as the pipeline builds it: proves boto3 picks up AWS_ENDPOINT_URL.
    store = open_store(f"s3://{s3_bucket}/runs/r1")
    assert isinstance(store, S3Store)
    assert store.endpoint == s3_env["AWS_ENDPOINT_URL"]
    yield store


class S3Reader:
    """The bucket as the test's own client sees it, under the store's prefix."""

    def __init__(self, server: S3Server, bucket: str, prefix: str) -> None:
        self.client = server.client()
        self.bucket = bucket
        self.prefix = prefix

    def read(self, key: str) -> bytes | None:
        try:
            body: bytes = self.client.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{key}")["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None
        return body

    def keys(self, prefix: str) -> list[str]:
        listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.prefix}/{prefix}")
        return sorted(o["Key"].removeprefix(f"{self.prefix}/") for o in listed.get("Contents", []))


@pytest.fixture
def reader(s3_server: S3Server, s3_bucket: str) -> S3Reader:
    return S3Reader(s3_server, s3_bucket, "runs/r1")


class S3Calls:
    """Records (operation, key) of every S3 request a client sends, via botocore's event hooks."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail_key_suffix: str | None = None

    def __call__(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        key = str(params.get("Key", ""))
        self.calls.append((model.name, key))
        if (
            self.fail_key_suffix
            and key.endswith(self.fail_key_suffix)
            and model.name
            in (
                "PutObject",
                "CreateMultipartUpload",
                "UploadPart",
            )
        ):
            # What botocore raises when the endpoint drops: the store must treat it as a failed upload.
            raise EndpointConnectionError(endpoint_url=f"injected failure sending {key}")

    def writes(self) -> list[tuple[str, str]]:
        return [c for c in self.calls if c[0] in ("PutObject", "CompleteMultipartUpload")]


@pytest.fixture
def s3_calls(store: S3Store) -> S3Calls:
    recorder = S3Calls()
    store.client.meta.events.register("provide-client-params.s3.*", recorder)
    return recorder


def test_check_access_passes(store: S3Store) -> None:
    store.check_access()


def test_round_trip(store: S3Store, reader: S3Reader, s3_server: S3Server, s3_bucket: str, tmp_path: Path) -> None:
    contract_round_trip(store, reader, tmp_path)
    # The objects really are in the bucket under the store's prefix, with the uploaded bytes.
    client = s3_server.client()
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert f"runs/r1/ckpt/{MANIFEST_NAME}" in keys
    assert all(k.startswith("runs/r1/ckpt/") for k in keys)
    body = client.get_object(Bucket=s3_bucket, Key="runs/r1/ckpt/config.json")["Body"].read()
    assert body == (tmp_path / "src" / "config.json").read_bytes()


def test_single_files(store: S3Store, reader: S3Reader, tmp_path: Path) -> None:
    contract_single_files(store, reader, tmp_path)


def test_large_file_goes_up_in_parts(
    store: S3Store, s3_server: S3Server, s3_bucket: str, s3_calls: S3Calls, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    big = os.urandom(21 * 1024 * 1024 + 12345)
    (src / "model.safetensors").write_bytes(big)
    (src / "config.json").write_text("{}")
    manifest = store.upload_dir(src, "ckpt")

    head = s3_server.client().head_object(Bucket=s3_bucket, Key="runs/r1/ckpt/model.safetensors")
    assert head["ContentLength"] == len(big)
    expected_parts = -(-len(big) // MULTIPART_CHUNKSIZE)
    assert expected_parts == 2
    # A multipart object's ETag is md5-of-part-md5s plus "-<parts>"; a single PUT's is a plain md5.
    assert head["ETag"].strip('"').endswith(f"-{expected_parts}"), head["ETag"]
    small = s3_server.client().head_object(Bucket=s3_bucket, Key="runs/r1/ckpt/config.json")
    assert "-" not in small["ETag"]
    ops = [op for op, key in s3_calls.calls if key.endswith("model.safetensors")]
    assert ops.count("UploadPart") == expected_parts
    assert "CreateMultipartUpload" in ops
    assert "CompleteMultipartUpload" in ops

    assert manifest.files[1].sha256 == hashlib.sha256(big).hexdigest()
    body = s3_server.client().get_object(Bucket=s3_bucket, Key="runs/r1/ckpt/model.safetensors")["Body"].read()
    assert body == big


def test_manifest_is_the_last_object_written(store: S3Store, s3_calls: S3Calls, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = make_tree(src)
    (src / "big.bin").write_bytes(os.urandom(17 * 1024 * 1024))  # multipart, completes last of its parts
    store.upload_dir(src, "ckpt")
    writes = s3_calls.writes()
    assert writes[-1] == ("PutObject", f"runs/r1/ckpt/{MANIFEST_NAME}")
    written = sorted(key for _, key in writes[:-1])
    assert written == sorted(f"runs/r1/ckpt/{p}" for p in [*files, "big.bin"])
    # An earlier manifest is deleted before the first file goes up.
    first_delete = s3_calls.calls.index(("DeleteObject", f"runs/r1/ckpt/{MANIFEST_NAME}"))
    first_put = s3_calls.calls.index(writes[0])
    assert first_delete < first_put


def test_failure_midway_leaves_no_manifest(store: S3Store, reader: S3Reader, s3_calls: S3Calls, tmp_path: Path) -> None:
    def fail_on_next_upload_of(name: str) -> None:
        s3_calls.fail_key_suffix = name

    contract_partial_upload_has_no_manifest(store, reader, tmp_path, fail_on_next_upload_of)
    manifest = f"runs/r1/run/{MANIFEST_NAME}"
    # The failing upload began by deleting the old manifest and never wrote a new one.
    last_delete = max(i for i, call in enumerate(s3_calls.calls) if call == ("DeleteObject", manifest))
    after = s3_calls.calls[last_delete:]
    assert ("PutObject", manifest) not in after
    writes = [call for call in after if call[0] == "PutObject"]
    assert writes[-1] == ("PutObject", "runs/r1/run/tokenizer/tokenizer.json")  # the injected failure
    assert len(writes) == 5


def test_wrong_secret_key_is_access_denied(
    s3_env: dict[str, str], s3_bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret-0123456789")
    store = open_store(f"s3://{s3_bucket}/runs")
    with pytest.raises(ConfigError, match=rf"S3 access denied for s3://{s3_bucket}\b") as info:
        store.check_access()
    message = str(info.value)
    assert "SignatureDoesNotMatch" in message
    assert "AWS_SECRET_ACCESS_KEY" in message
    assert "not-the-secret" not in message and s3_env["AWS_SECRET_ACCESS_KEY"] not in message
    assert "\n" not in message
    # The same refusal during a transfer is also reported as a setup problem, not a traceback.
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="S3 access denied"):
        store.upload_file(tmp_path / "f", "f")


def test_unknown_access_key_is_access_denied(
    s3_env: dict[str, str], s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDNOSUCHUSER")
    with pytest.raises(ConfigError, match=r"S3 access denied .*InvalidAccessKeyId"):
        open_store(f"s3://{s3_bucket}").check_access()


def test_missing_bucket_is_a_config_error(s3_env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match=r"S3 bucket 'no-such-bucket-qr' does not exist at http://127\.0\.0\.1:"):
        open_store("s3://no-such-bucket-qr/prefix").check_access()


def test_missing_local_file_is_not_an_artifact_error(store: S3Store, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):  # a local problem stays what it is
        store.upload_file(tmp_path / "does-not-exist", "x")
