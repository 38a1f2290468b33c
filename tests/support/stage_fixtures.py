"""Fixtures shared by the stage integration tests: tiny checkpoints, a Hub client, MLflow helpers.

- `tiny_llama` (session): a random BF16 Llama + BPE tokenizer on disk (tests/support/tiny.py).
- `tiny_fp8` (session): its modelopt FP8 export, tokenizer copied.
- `hub_client` (per test): the real `huggingface_hub` client against the Hub test server, uploading through
  LFS and caching in a fresh per-test HF cache. Unlike `hub_env` it does NOT point huggingface_hub's
  import-time endpoint at the server: code under test must pass `endpoint=` itself (as our stages do through
  `Settings.hf_endpoint`), otherwise it would try https://huggingface.co and fail.
- `mlflow_client`: an `MlflowClient` on the test server, reaching S3 only through the server's artifact proxy.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from huggingface_hub import HfApi
from huggingface_hub import constants as hf_constants

from tests.support.hub_fixtures import HubServer
from tests.support.servers import MlflowServer

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama checkpoint directory. Treat it as read-only: copy it before changing anything."""
    from tests.support.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model")


@pytest.fixture(scope="session")
def tiny_fp8(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama's modelopt FP8 unified HF checkpoint (read-only, shared by the session)."""
    from tests.support.tiny import make_fp8_checkpoint

    return make_fp8_checkpoint(tiny_llama, tmp_path_factory.mktemp("tiny-fp8") / "checkpoint")


@dataclass(frozen=True)
class HubClient:
    server: HubServer
    api: HfApi
    cache_dir: Path

    def weight_files_in_cache(self) -> list[Path]:
        """Weight files (blobs are named by hash, so look at the snapshot names) under the HF cache."""
        if not self.cache_dir.exists():
            return []
        return sorted(p for p in self.cache_dir.rglob("*") if p.name.endswith(WEIGHT_SUFFIXES))

    def server_log(self) -> str:
        return self.server.log_path.read_text(errors="replace")

    def weight_requests(self, repo_id: str) -> list[str]:
        """Access-log lines of the Hub server that downloaded (GET) a weight file of `repo_id`."""
        return [
            line
            for line in self.server_log().splitlines()
            if f"/{repo_id}/resolve/" in line and '"GET ' in line and any(s in line for s in WEIGHT_SUFFIXES)
        ]


@pytest.fixture
def hub_client(hub_server: HubServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubClient]:
    cache = tmp_path / "hf-cache"
    for name in ("HF_ENDPOINT", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    # The test server speaks LFS only (a user of such a server sets HF_HUB_DISABLE_XET=1).
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    yield HubClient(server=hub_server, api=HfApi(endpoint=hub_server.endpoint, token=hub_server.token), cache_dir=cache)
    shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture
def mlflow_client(mlflow_server: MlflowServer, monkeypatch: pytest.MonkeyPatch) -> Any:
    """An MlflowClient for the test server. No S3 settings in this process: artifacts go through the proxy."""
    from mlflow.tracking import MlflowClient

    for name, value in mlflow_server.env().items():
        monkeypatch.setenv(name, value)
    for name in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    return MlflowClient(tracking_uri=mlflow_server.tracking_uri)


def new_experiment_name(stem: str) -> str:
    return f"{stem}-{uuid.uuid4().hex[:10]}"


def s3_keys(mlflow_server: MlflowServer, prefix: str) -> list[str]:
    """Keys under `prefix` in the MLflow server's artifact bucket (read with the test's own S3 client)."""
    client = mlflow_server.s3.client()
    keys: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=mlflow_server.artifact_bucket, Prefix=prefix):
        keys.extend(obj["Key"] for obj in page.get("Contents", []) if "Key" in obj)
    return sorted(keys)
