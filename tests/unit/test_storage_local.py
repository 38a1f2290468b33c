"""The artifact store contract on a local directory, URI parsing, and the hashing helpers.

The `contract_*` functions take any ArtifactStore and a `Reader` that looks at what landed with other
means than the store itself (the file system, the test's own S3 client); tests/integration/
test_storage_s3.py runs them against SeaweedFS too, so both stores are held to the same behaviour.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import pytest

from quant_release.errors import ConfigError
from quant_release.hashing import FileDigest, digest_dir, fingerprint, sha256_file
from quant_release.storage import (
    MANIFEST_NAME,
    ArtifactError,
    ArtifactStore,
    LocalStore,
    Manifest,
    S3Store,
    open_store,
)
from tests.support.process import free_port

# --------------------------------------------------------------------------------- shared contract


class Reader(Protocol):
    """Reads a store's objects behind its back, by key relative to the store's root."""

    def read(self, key: str) -> bytes | None: ...

    def keys(self, prefix: str) -> list[str]: ...


class LocalReader:
    def __init__(self, root: Path) -> None:
        self.root = root

    def read(self, key: str) -> bytes | None:
        path = self.root / key
        return path.read_bytes() if path.is_file() else None

    def keys(self, prefix: str) -> list[str]:
        if not self.root.exists():
            return []
        found = (p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
        return sorted(key for key in found if key.startswith(prefix))


def make_tree(root: Path) -> dict[str, bytes]:
    """A small checkpoint-like tree with nested dirs, an empty file and binary content."""
    files = {
        "config.json": b'{"architectures": ["LlamaForCausalLM"]}\n',
        "model.safetensors": os.urandom(300_000),
        "empty.txt": b"",
        "tokenizer/tokenizer.json": '{"vocab": "é ✓"}'.encode(),
        "tokenizer/sub dir/special chars+=.bin": bytes(range(256)) * 3,
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def read_manifest(reader: Reader, prefix: str) -> Manifest | None:
    data = reader.read(f"{prefix}/{MANIFEST_NAME}")
    return None if data is None else Manifest.model_validate_json(data)


def contract_round_trip(store: ArtifactStore, reader: Reader, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = make_tree(src)
    manifest = store.upload_dir(src, "ckpt")

    assert [f.path for f in manifest.files] == sorted(files)
    for entry in manifest.files:
        assert entry.size == len(files[entry.path])
        assert entry.sha256 == hashlib.sha256(files[entry.path]).hexdigest()
    assert read_manifest(reader, "ckpt") == manifest
    assert json.loads(reader.read(f"ckpt/{MANIFEST_NAME}") or b"")["version"] == 1
    assert reader.keys("ckpt/") == sorted([f"ckpt/{p}" for p in files] + [f"ckpt/{MANIFEST_NAME}"])
    for rel, data in files.items():
        assert reader.read(f"ckpt/{rel}") == data, rel  # byte-exact


def contract_single_files(store: ArtifactStore, reader: Reader, tmp_path: Path) -> None:
    local = tmp_path / "one.bin"
    local.write_bytes(b"payload")
    uri = store.upload_file(local, "a/b/one.bin")
    assert uri.startswith(store.uri)
    assert uri.endswith("/a/b/one.bin")
    assert reader.read("a/b/one.bin") == b"payload"

    child = store.child("a")
    assert child.uri == store.uri.rstrip("/") + "/a"
    assert child.upload_file(local, "c/two.bin").startswith(child.uri)
    assert reader.read("a/c/two.bin") == b"payload"
    # A sibling with a common string prefix is not part of the child.
    store.upload_file(local, "ab/other.bin")
    assert reader.keys("a/") == ["a/b/one.bin", "a/c/two.bin"]


def contract_partial_upload_has_no_manifest(
    store: ArtifactStore, reader: Reader, tmp_path: Path, fail_on_next_upload_of: Callable[[str], None]
) -> None:
    """Upload a tree completely, then again with a failure midway: the prefix must read as partial.

    `fail_on_next_upload_of(name)` arranges for the next upload of the file called `name` to fail.
    """
    src = tmp_path / "src"
    make_tree(src)
    store.upload_dir(src, "run")
    assert read_manifest(reader, "run") is not None
    (src / "tokenizer" / "tokenizer.json").write_bytes(b"new content")
    fail_on_next_upload_of("tokenizer.json")  # sorted last: the other files go up first
    with pytest.raises((ArtifactError, OSError)):
        store.upload_dir(src, "run")
    assert reader.read("run/config.json") is not None
    assert read_manifest(reader, "run") is None


# ------------------------------------------------------------------------------------ local store


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


def test_round_trip(store: LocalStore, tmp_path: Path) -> None:
    contract_round_trip(store, LocalReader(store.root), tmp_path)
    # The objects are plain files under the root, as uploaded, and no temporary file is left.
    assert (store.root / "ckpt" / "config.json").read_bytes().startswith(b'{"architectures"')
    assert not [p for p in store.root.rglob("*") if p.name.endswith(".partial")]


def test_single_files(store: LocalStore, tmp_path: Path) -> None:
    contract_single_files(store, LocalReader(store.root), tmp_path)


def test_manifest_is_written_last(store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_upload, real_put = store.upload_file, store._put_bytes

    def upload_file(local: Any, key: str) -> str:
        calls.append(key)
        # When each file goes up, no manifest may be visible yet.
        assert not (store.root / "run" / MANIFEST_NAME).exists()
        return real_upload(local, key)

    def put_bytes(key: str, data: bytes) -> None:
        calls.append(key)
        real_put(key, data)

    monkeypatch.setattr(store, "upload_file", upload_file)
    monkeypatch.setattr(store, "_put_bytes", put_bytes)
    files = make_tree(tmp_path / "src")
    store.upload_dir(tmp_path / "src", "run")
    assert calls[-1] == f"run/{MANIFEST_NAME}"
    assert sorted(calls[:-1]) == sorted(f"run/{p}" for p in files)


def test_failure_midway_leaves_no_manifest(store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_copy = shutil.copyfile

    def fail_on_next_upload_of(name: str) -> None:
        def copyfile(src: Any, dst: Any) -> Any:
            if Path(src).name == name:
                # Some bytes reach the temp file, then the disk "fails".
                Path(dst).write_bytes(Path(src).read_bytes()[:3])
                raise OSError(28, "No space left on device")
            return real_copy(src, dst)

        monkeypatch.setattr(shutil, "copyfile", copyfile)

    contract_partial_upload_has_no_manifest(store, LocalReader(store.root), tmp_path, fail_on_next_upload_of)
    # The failed object kept its old complete content: no half-written file under the real name.
    old = '{"vocab": "é ✓"}'.encode()
    assert (store.root / "run" / "tokenizer" / "tokenizer.json").read_bytes() == old
    assert not [p for p in store.root.rglob("*") if p.name.endswith(".partial")]


def test_upload_dir_refuses_a_file_named_like_the_manifest(store: LocalStore, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / MANIFEST_NAME).write_text("{}")
    with pytest.raises(ArtifactError, match="reserved"):
        store.upload_dir(tmp_path / "src", "run")


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "../up", "a//b", "./a", "a\\b"])
def test_bad_keys_are_rejected(store: LocalStore, tmp_path: Path, key: str) -> None:
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(ValueError, match="invalid artifact key"):
        store.upload_file(tmp_path / "f", key)


def test_check_access(tmp_path: Path) -> None:
    LocalStore(tmp_path / "new" / "dir").check_access()
    assert (tmp_path / "new" / "dir").is_dir()
    assert list((tmp_path / "new" / "dir").iterdir()) == []  # the probe file is gone
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ConfigError, match="is not writable"):
        LocalStore(tmp_path / "a-file" / "sub").check_access()


# ------------------------------------------------------------------------------------ open_store


def test_open_store_local_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for uri in (str(tmp_path / "x"), "x", f"file://{tmp_path}/x", f"file://localhost{tmp_path}/x"):
        store = open_store(uri)
        assert isinstance(store, LocalStore)
        assert store.uri == str(tmp_path / "x")
    assert open_store("file:///tmp/with%20space").uri == "/tmp/with space"


def test_open_store_s3_forms() -> None:
    store = open_store("s3://my-bucket/runs/2026/")
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.uri) == ("my-bucket", "runs/2026", "s3://my-bucket/runs/2026")
    child = store.child("model")
    assert isinstance(child, S3Store)
    assert child.uri == "s3://my-bucket/runs/2026/model"
    bare = open_store("s3://my-bucket")
    assert bare.uri == "s3://my-bucket"
    assert bare.child("k").uri == "s3://my-bucket/k"


@pytest.mark.parametrize(
    ("uri", "match"),
    [
        ("http://example.com/bucket", "unsupported artifact URI scheme 'http://'"),
        ("gs://bucket/prefix", "unsupported artifact URI scheme 'gs://'"),
        ("s3://", "has no bucket"),
        ("s3:///prefix", "has no bucket"),
        ("s3://Bad_Bucket/x", "invalid S3 bucket name"),
        ("s3://ab/x", "invalid S3 bucket name"),
        ("s3://bucket/a/../b", "invalid prefix"),
        ("s3://bucket/x?versionId=1", "query or fragment"),
        ("file://otherhost/x", "remote host"),
        ("", "empty"),
        ("   ", "empty"),
    ],
)
def test_open_store_rejects(uri: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        open_store(uri)
    assert "\n" not in str(info.value)


def test_credentials_in_the_uri_are_refused_and_not_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        open_store("s3://AKIAEXAMPLE:TopSecretValue@bucket/prefix")
    assert "TopSecretValue" not in str(info.value)
    assert "AKIAEXAMPLE" not in str(info.value)
    assert "credentials" in str(info.value)


def test_s3_unreachable_endpoint_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # Nothing listens on this port: check_access must fail fast and name the endpoint.
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    started = time.monotonic()
    with pytest.raises(ConfigError, match="cannot reach the S3 endpoint") as info:
        open_store("s3://some-bucket/x").check_access()
    assert time.monotonic() - started < 20
    assert endpoint in str(info.value)
    assert "very-secret-value" not in str(info.value)


def test_s3_missing_credentials_is_a_config_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", raising=False)
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigError, match="no usable AWS credentials for s3://some-bucket"):
        open_store("s3://some-bucket/x").check_access()


# --------------------------------------------------------------------------------------- hashing


def test_sha256_file_matches_hashlib(tmp_path: Path) -> None:
    # Known vectors, and sizes around the 8 MiB read chunk.
    (tmp_path / "empty").write_bytes(b"")
    empty = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert sha256_file(tmp_path / "empty") == empty
    (tmp_path / "abc").write_bytes(b"abc")
    abc = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert sha256_file(tmp_path / "abc") == abc
    for size in (8 * 1024 * 1024 - 1, 8 * 1024 * 1024, 8 * 1024 * 1024 + 17):
        data = os.urandom(size)
        path = tmp_path / f"f{size}"
        path.write_bytes(data)
        assert sha256_file(path) == hashlib.sha256(data).hexdigest()
        assert sha256_file(str(path)) == hashlib.sha256(data).hexdigest()


def test_digest_dir(tmp_path: Path) -> None:
    files = make_tree(tmp_path)
    (tmp_path / "empty-dir").mkdir()
    (tmp_path / "tokenizer" / "link.json").symlink_to("tokenizer.json")  # as in a Hugging Face cache
    files["tokenizer/link.json"] = files["tokenizer/tokenizer.json"]
    digests = digest_dir(tmp_path)
    assert all(isinstance(d, FileDigest) for d in digests)
    assert [d.path for d in digests] == sorted(files)
    for d in digests:
        assert d.size == len(files[d.path])
        assert d.sha256 == hashlib.sha256(files[d.path]).hexdigest()
    with pytest.raises(NotADirectoryError):
        digest_dir(tmp_path / "config.json")
    (tmp_path / "dangling").symlink_to("nowhere")
    with pytest.raises(FileNotFoundError, match="dangling symlink"):
        digest_dir(tmp_path)


def test_fingerprint() -> None:
    a = FileDigest(path="a.bin", size=1, sha256="1" * 64)
    b = FileDigest(path="b/c.bin", size=2, sha256="2" * 64)
    expected = hashlib.sha256(b"a.bin\0" + b"1" * 64 + b"\n" + b"b/c.bin\0" + b"2" * 64 + b"\n").hexdigest()
    assert fingerprint([a, b]) == expected
    assert fingerprint([b, a]) == expected  # order does not matter
    assert fingerprint([("b/c.bin", "2" * 64), ("a.bin", "1" * 64)]) == expected  # tuples work the same
    assert fingerprint([a, b.model_copy(update={"size": 99})]) == expected  # size is not content
    assert fingerprint([a, b.model_copy(update={"sha256": "3" * 64})]) != expected
    assert fingerprint([a, b.model_copy(update={"path": "b/d.bin"})]) != expected
    assert fingerprint([a]) != expected


def test_tensor_shapes_reads_every_shard_header(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    from quant_release.hashing import tensor_shapes

    save_file({"a.weight": torch.zeros(3, 4), "a.scale": torch.zeros(())}, str(tmp_path / "model-1.safetensors"))
    save_file({"b.weight": torch.zeros(5, dtype=torch.bfloat16)}, str(tmp_path / "model-2.safetensors"))
    (tmp_path / "notes.txt").write_text("not a shard")
    assert tensor_shapes(tmp_path) == {"a.weight": (3, 4), "a.scale": (), "b.weight": (5,)}
