"""The real `huggingface_hub` client against the Hub test server (a child process, real HTTP).

These tests pin down the protocol our publish/download stages rely on: if the server drifts from what the
client expects, they fail here rather than as a confusing pipeline failure.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import huggingface_hub
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationCopy,
    CommitOperationDelete,
    HfApi,
    ModelCard,
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import HfFileMetadata, http_get
from huggingface_hub.hf_api import RepoFile, RepoFolder
from huggingface_hub.utils.sha import git_hash

from tests.support.hub_fixtures import REPO_ROOT, HubServer
from tests.support.process import free_port, http_ok, running_server

pytestmark = pytest.mark.integration

BIG_SIZE = 10 * 1024 * 1024 + 4096  # just over the Hub's 10 MiB limit for plain git blobs
GOOD_CARD = """---
license: apache-2.0
library_name: transformers
tags:
- fp8
- quantized
base_model: HuggingFaceTB/SmolLM2-135M
model-index:
- name: smol-fp8
  results:
  - task: {type: text-generation}
    dataset: {type: cais/mmlu, name: MMLU}
    metrics:
    - {type: accuracy, value: 0.31}
---
# smol-fp8

FP8 weights.
"""


@pytest.fixture(scope="module", autouse=True)
def _lfs_upload_path() -> Iterator[None]:
    """With hf_xet installed the client uploads through Xet unless this is set; the server speaks LFS only.
    (The env var is read at import time, so the constant is what counts in this process.)"""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        patch.setattr(constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)
        yield


@pytest.fixture(scope="module")
def api(hub_server: HubServer) -> HfApi:
    return HfApi(endpoint=hub_server.endpoint, token=hub_server.token)


@dataclass(frozen=True)
class Published:
    """A repo uploaded once for the module: README with metadata, small text files, one large binary."""

    repo_id: str
    first_commit: str
    files: dict[str, bytes]


@pytest.fixture(scope="module")
def published(api: HfApi, hub_server: HubServer, tmp_path_factory: pytest.TempPathFactory) -> Published:
    folder = tmp_path_factory.mktemp("published")
    files = {
        "README.md": GOOD_CARD.encode(),
        "notes.txt": b"first version\n",
        "config.json": json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}).encode(),
        "nested/deeper/tokenizer.json": b'{"version": "1.0"}',
        "model.safetensors": random.Random(1234).randbytes(BIG_SIZE),
    }
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    repo_id = hub_server.new_repo_id("published")
    api.create_repo(repo_id)
    info = api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload FP8 model")
    return Published(repo_id=repo_id, first_commit=info.oid, files=files)


def _make_repo(
    api: HfApi, hub_server: HubServer, prefix: str, files: dict[str, bytes], *, private: bool = False
) -> str:
    """A fresh repo with `files` committed on top of the initial commit."""
    repo_id = hub_server.new_repo_id(prefix)
    api.create_repo(repo_id, private=private)
    operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=c) for p, c in files.items()]
    api.create_commit(repo_id, operations=operations, commit_message="seed")
    return repo_id


# --- auth and repos -----------------------------------------------------------------------------------------


def test_whoami_accepts_known_token_and_rejects_unknown(api: HfApi, hub_server: HubServer) -> None:
    me = api.whoami()
    assert me["name"] == hub_server.user
    assert [org["name"] for org in me["orgs"]] == [hub_server.org]

    with pytest.raises(HfHubHTTPError) as bad:
        api.whoami(token="hf_not_a_real_token")
    assert bad.value.response.status_code == 401

    anonymous = httpx.get(f"{hub_server.endpoint}/api/whoami-v2")
    assert anonymous.status_code == 401
    assert "error" in anonymous.json()


def test_create_repo_conflicts_unless_exist_ok(api: HfApi, hub_server: HubServer) -> None:
    repo_id = hub_server.new_repo_id("create")
    url = api.create_repo(repo_id)
    assert url.repo_id == repo_id
    assert url == f"{hub_server.endpoint}/{repo_id}"

    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(repo_id)
    assert conflict.value.response.status_code == 409
    assert api.create_repo(repo_id, exist_ok=True).repo_id == repo_id

    # The initial commit holds the default .gitattributes, as on the Hub.
    assert api.list_repo_files(repo_id) == [".gitattributes"]
    assert api.list_repo_commits(repo_id)[0].title == "initial commit"


def test_write_access_follows_token_namespaces(api: HfApi, hub_server: HubServer) -> None:
    org_repo = hub_server.new_repo_id("org", namespace=hub_server.org)
    assert api.create_repo(org_repo).repo_id == org_repo

    outsider = HfApi(endpoint=hub_server.endpoint, token=hub_server.other_token)
    with pytest.raises(HfHubHTTPError) as foreign:
        outsider.create_repo(hub_server.new_repo_id("foreign"))  # the tester's namespace
    assert foreign.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as no_write:
        outsider.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=org_repo)
    assert no_write.value.response.status_code == 403


def test_delete_repo(api: HfApi, hub_server: HubServer) -> None:
    repo_id = hub_server.new_repo_id("delete")
    api.create_repo(repo_id)
    api.delete_repo(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo(repo_id)
    api.delete_repo(repo_id, missing_ok=True)


# --- upload -------------------------------------------------------------------------------------------------


def test_upload_folder_stores_large_binary_as_lfs(api: HfApi, published: Published) -> None:
    entries = {e.path: e for e in api.list_repo_tree(published.repo_id, recursive=True)}
    files = {p: e for p, e in entries.items() if isinstance(e, RepoFile)}
    assert set(files) == {".gitattributes", *published.files}
    assert isinstance(entries["nested"], RepoFolder) and isinstance(entries["nested/deeper"], RepoFolder)

    big = files["model.safetensors"]
    assert big.size == BIG_SIZE
    assert big.lfs is not None
    assert big.lfs.sha256 == hashlib.sha256(published.files["model.safetensors"]).hexdigest()
    assert big.lfs.size == BIG_SIZE
    for name in ("README.md", "notes.txt", "config.json"):
        assert files[name].lfs is None
        assert files[name].size == len(published.files[name])
        assert files[name].blob_id == git_hash(published.files[name])

    assert sorted(api.list_repo_files(published.repo_id)) == sorted([".gitattributes", *published.files])


def test_model_info_at_the_uploaded_commit(api: HfApi, published: Published) -> None:
    info = api.model_info(published.repo_id, revision=published.first_commit, files_metadata=True)
    assert info.sha == published.first_commit
    assert info.id == published.repo_id
    assert info.private is False
    assert info.last_modified is not None
    siblings = {s.rfilename: s for s in info.siblings or []}
    assert set(siblings) == {".gitattributes", *published.files}
    assert siblings["model.safetensors"].size == BIG_SIZE
    assert siblings["model.safetensors"].lfs is not None
    assert siblings["notes.txt"].blob_id == git_hash(published.files["notes.txt"])
    assert info.card_data is not None
    assert info.card_data.license == "apache-2.0"
    assert info.card_data.tags == ["fp8", "quantized"]
    assert info.config == {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    assert api.model_info(published.repo_id).sha == api.list_repo_refs(published.repo_id).branches[0].target_commit


def test_download_is_byte_exact_with_hub_metadata(published: Published, hub_server: HubServer, tmp_path: Path) -> None:
    for name, content in published.files.items():
        path = hf_hub_download(
            published.repo_id,
            name,
            revision=published.first_commit,
            endpoint=hub_server.endpoint,
            cache_dir=tmp_path,
        )
        assert Path(path).read_bytes() == content, name

    def metadata(name: str) -> HfFileMetadata:
        url = hf_hub_url(published.repo_id, name, endpoint=hub_server.endpoint)
        return get_hf_file_metadata(url)

    big, small = metadata("model.safetensors"), metadata("notes.txt")
    assert big.etag == hashlib.sha256(published.files["model.safetensors"]).hexdigest()
    assert big.size == BIG_SIZE
    assert small.etag == git_hash(published.files["notes.txt"])
    assert small.commit_hash == big.commit_hash == published.first_commit

    # Raw headers, as the Hub sends them: ETag is the sha256 for LFS files and the git blob id otherwise.
    sha256 = hashlib.sha256(published.files["model.safetensors"]).hexdigest()
    lfs_head = httpx.head(hf_hub_url(published.repo_id, "model.safetensors", endpoint=hub_server.endpoint))
    assert lfs_head.headers["ETag"] == lfs_head.headers["X-Linked-Etag"] == f'"{sha256}"'
    assert lfs_head.headers["X-Linked-Size"] == lfs_head.headers["Content-Length"] == str(BIG_SIZE)
    assert lfs_head.headers["Accept-Ranges"] == "bytes"
    text_head = httpx.head(hf_hub_url(published.repo_id, "notes.txt", endpoint=hub_server.endpoint))
    assert text_head.headers["ETag"] == f'"{git_hash(published.files["notes.txt"])}"'
    assert "X-Linked-Etag" not in text_head.headers


def test_unchanged_files_are_not_uploaded_again(api: HfApi, published: Published, tmp_path: Path) -> None:
    """preupload returns each existing file's oid, so the client drops identical files from the commit."""
    (tmp_path / "notes.txt").write_bytes(published.files["notes.txt"])
    commits_before = api.list_repo_commits(published.repo_id)
    info = api.upload_folder(repo_id=published.repo_id, folder_path=tmp_path, commit_message="no-op")
    assert info.oid == published.first_commit
    assert api.list_repo_commits(published.repo_id) == commits_before


def test_snapshot_pinned_to_first_commit_after_second_commit(api: HfApi, hub_server: HubServer, tmp_path: Path) -> None:
    first_files = {"notes.txt": b"v1\n", "weights.bin": b"\x00\x01binary v1", "old.txt": b"goes away\n"}
    repo_id = _make_repo(api, hub_server, "snapshot", first_files)
    first = api.model_info(repo_id).sha
    second = api.create_commit(
        repo_id,
        operations=[
            CommitOperationAdd(path_in_repo="notes.txt", path_or_fileobj=b"v2\n"),
            CommitOperationAdd(path_in_repo="weights.bin", path_or_fileobj=b"\x00\x02binary v2"),
            CommitOperationDelete(path_in_repo="old.txt"),
        ],
        commit_message="second",
    )
    assert second.oid != first

    pinned = Path(snapshot_download(repo_id, revision=first, endpoint=hub_server.endpoint, cache_dir=tmp_path))
    assert {p.name for p in pinned.iterdir()} == {".gitattributes", *first_files}
    for name, content in first_files.items():
        assert (pinned / name).read_bytes() == content

    latest = Path(snapshot_download(repo_id, endpoint=hub_server.endpoint, cache_dir=tmp_path))
    assert latest.name == second.oid
    assert (latest / "notes.txt").read_bytes() == b"v2\n"
    assert (latest / "weights.bin").read_bytes() == b"\x00\x02binary v2"
    assert not (latest / "old.txt").exists()

    tree = {e.path: e for e in api.list_repo_tree(repo_id, revision=first) if isinstance(e, RepoFile)}
    assert tree["weights.bin"].lfs is not None  # *.bin is LFS-tracked by the default .gitattributes
    assert tree["notes.txt"].lfs is None


def test_copy_and_folder_deletion(api: HfApi, hub_server: HubServer, tmp_path: Path) -> None:
    files = {"ckpt/a.txt": b"a\n", "ckpt/b.pt": b"\x80\x02pickle", "keep.txt": b"keep\n"}
    repo_id = _make_repo(api, hub_server, "copy", files)
    api.create_commit(
        repo_id,
        operations=[
            CommitOperationCopy(src_path_in_repo="ckpt/b.pt", path_in_repo="final/b.pt"),  # LFS: server-side
            CommitOperationCopy(src_path_in_repo="ckpt/a.txt", path_in_repo="final/a.txt"),  # regular: re-sent
            CommitOperationDelete(path_in_repo="ckpt/"),
        ],
        commit_message="promote checkpoint",
    )
    assert sorted(api.list_repo_files(repo_id)) == [".gitattributes", "final/a.txt", "final/b.pt", "keep.txt"]
    path = hf_hub_download(repo_id, "final/b.pt", endpoint=hub_server.endpoint, cache_dir=tmp_path)
    assert Path(path).read_bytes() == files["ckpt/b.pt"]
    with pytest.raises(EntryNotFoundError):
        api.delete_file("ckpt/a.txt", repo_id=repo_id)
    with pytest.raises(EntryNotFoundError):
        api.delete_folder("ckpt", repo_id=repo_id)


def test_dataset_repos_use_their_url_prefix(api: HfApi, hub_server: HubServer, tmp_path: Path) -> None:
    repo_id = hub_server.new_repo_id("data")
    url = api.create_repo(repo_id, repo_type="dataset")
    assert url == f"{hub_server.endpoint}/datasets/{repo_id}"
    table = b"PAR1" + bytes(range(256)) * 4
    api.upload_file(path_or_fileobj=table, path_in_repo="test.parquet", repo_id=repo_id, repo_type="dataset")
    (entry,) = api.get_paths_info(repo_id, ["test.parquet"], repo_type="dataset")
    assert isinstance(entry, RepoFile) and entry.lfs is not None
    path = hf_hub_download(
        repo_id, "test.parquet", repo_type="dataset", endpoint=hub_server.endpoint, cache_dir=tmp_path
    )
    assert Path(path).read_bytes() == table
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(repo_id)  # same id, other repo type


def test_gitattributes_and_gitignore_decide_upload_modes(api: HfApi, hub_server: HubServer, tmp_path: Path) -> None:
    """preupload answers per file: LFS for paths the repo's .gitattributes tracks, even small text ones, and
    `shouldIgnore` for paths the .gitignore being committed excludes (the client then skips them)."""
    (tmp_path / "tokenizer.model").write_text("small text, but *.model is LFS-tracked\n")
    (tmp_path / "plain.txt").write_text("plain\n")
    (tmp_path / ".gitignore").write_text("*.log\nscratch/\n")
    (tmp_path / "debug.log").write_text("noise\n")
    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch" / "tmp.txt").write_text("noise\n")
    repo_id = hub_server.new_repo_id("rules")
    api.create_repo(repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=tmp_path)
    files = {e.path: e for e in api.list_repo_tree(repo_id, recursive=True) if isinstance(e, RepoFile)}
    assert set(files) == {".gitattributes", ".gitignore", "tokenizer.model", "plain.txt"}
    assert files["tokenizer.model"].lfs is not None
    assert files["plain.txt"].lfs is None


def test_refs_commits_branches_and_tags(api: HfApi, hub_server: HubServer) -> None:
    repo_id = _make_repo(api, hub_server, "refs", {"a.txt": b"a\n"})
    commits = api.list_repo_commits(repo_id)
    assert [c.title for c in commits] == ["seed", "initial commit"]
    assert commits[0].authors == [hub_server.user]
    seed = commits[0].commit_id

    api.create_branch(repo_id, branch="dev", revision=seed)
    with pytest.raises(HfHubHTTPError) as exists:
        api.create_branch(repo_id, branch="dev")
    assert exists.value.response.status_code == 409
    api.create_branch(repo_id, branch="dev", exist_ok=True)

    on_dev = api.upload_file(path_or_fileobj=b"dev only\n", path_in_repo="dev.txt", repo_id=repo_id, revision="dev")
    refs = api.list_repo_refs(repo_id)
    branches = {b.name: b.target_commit for b in refs.branches}
    assert branches == {"main": seed, "dev": on_dev.oid}
    assert refs.converts == [] and refs.tags == []
    assert [c.commit_id for c in api.list_repo_commits(repo_id, revision="dev")][:2] == [on_dev.oid, seed]
    assert "dev.txt" in api.list_repo_files(repo_id, revision="dev")
    assert "dev.txt" not in api.list_repo_files(repo_id)

    api.create_tag(repo_id, tag="v1.0", revision="dev")
    assert api.model_info(repo_id, revision="v1.0").sha == on_dev.oid
    assert [t.target_commit for t in api.list_repo_refs(repo_id).tags] == [on_dev.oid]

    api.delete_branch(repo_id, branch="dev")
    assert [b.name for b in api.list_repo_refs(repo_id).branches] == ["main"]
    assert api.model_info(repo_id, revision=on_dev.oid).sha == on_dev.oid  # commits outlive their branch


def test_commits_are_paginated_with_link_header(api: HfApi, hub_server: HubServer) -> None:
    repo_id = _make_repo(api, hub_server, "pages", {"a.txt": b"a\n"})
    api.upload_file(path_or_fileobj=b"b\n", path_in_repo="b.txt", repo_id=repo_id)
    headers = {"authorization": f"Bearer {hub_server.token}"}
    first_page = httpx.get(f"{hub_server.endpoint}/api/models/{repo_id}/commits/main?limit=2", headers=headers)
    assert len(first_page.json()) == 2
    next_url = first_page.links["next"]["url"]
    assert [c["title"] for c in httpx.get(next_url, headers=headers).json()] == ["initial commit"]
    assert len(api.list_repo_commits(repo_id)) == 3


def test_paths_info_and_tree_listing(api: HfApi, published: Published) -> None:
    infos = api.get_paths_info(
        published.repo_id, ["README.md", "model.safetensors", "nested", "missing.txt"], expand=True
    )
    by_path = {i.path: i for i in infos}
    assert set(by_path) == {"README.md", "model.safetensors", "nested"}
    readme, big, folder = by_path["README.md"], by_path["model.safetensors"], by_path["nested"]
    assert isinstance(readme, RepoFile) and readme.size == len(published.files["README.md"])
    assert isinstance(big, RepoFile) and big.lfs is not None and big.lfs.size == BIG_SIZE
    assert isinstance(folder, RepoFolder) and len(folder.tree_id) == 40
    assert readme.last_commit is not None and readme.last_commit.oid == published.first_commit

    top = {e.path for e in api.list_repo_tree(published.repo_id, path_in_repo="nested")}
    assert top == {"nested/deeper"}
    deep = list(api.list_repo_tree(published.repo_id, path_in_repo="nested/deeper"))
    assert [(e.path, e.size) for e in deep if isinstance(e, RepoFile)] == [
        ("nested/deeper/tokenizer.json", len(published.files["nested/deeper/tokenizer.json"]))
    ]
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(published.repo_id, path_in_repo="no-such-folder"))


# --- downloads with Range -------------------------------------------------------------------------------------


def test_range_requests_resume_downloads(published: Published, hub_server: HubServer, tmp_path: Path) -> None:
    content = published.files["model.safetensors"]
    url = hf_hub_url(published.repo_id, "model.safetensors", endpoint=hub_server.endpoint)

    partial = httpx.get(url, headers={"Range": "bytes=1000-1999"})
    assert partial.status_code == 206
    assert partial.headers["Content-Range"] == f"bytes 1000-1999/{BIG_SIZE}"
    assert partial.content == content[1000:2000]
    assert partial.headers["X-Repo-Commit"] == published.first_commit

    suffix = httpx.get(url, headers={"Range": "bytes=-16"})
    assert suffix.status_code == 206 and suffix.content == content[-16:]
    assert httpx.get(url, headers={"Range": f"bytes={BIG_SIZE}-"}).status_code == 416

    # The client's own resume path: it asks for the rest with `Range: bytes=N-` and appends it.
    resumed = tmp_path / "resumed.bin"
    already = 3 * 1024 * 1024 + 7
    resumed.write_bytes(content[:already])
    with resumed.open("ab") as fh:
        http_get(url, fh, resume_size=already, expected_size=BIG_SIZE)
    assert hashlib.sha256(resumed.read_bytes()).digest() == hashlib.sha256(content).digest()


# --- errors -------------------------------------------------------------------------------------------------


def test_unknown_repo_revision_and_file_raise_client_errors(
    api: HfApi, published: Published, hub_server: HubServer, tmp_path: Path
) -> None:
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(hub_server.new_repo_id("missing"))
    with pytest.raises(RevisionNotFoundError):
        api.model_info(published.repo_id, revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(published.repo_id, revision="refs/pr/1")  # sent as refs%2Fpr%2F1
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(
            published.repo_id, "README.md", revision="refs/pr/1", endpoint=hub_server.endpoint, cache_dir=tmp_path
        )
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(published.repo_id, "nope.txt", endpoint=hub_server.endpoint, cache_dir=tmp_path)
    assert api.repo_exists(published.repo_id)
    assert not api.revision_exists(published.repo_id, "no-such-branch")
    assert api.file_exists(published.repo_id, "notes.txt")
    assert not api.file_exists(published.repo_id, "nope.txt")


def test_private_repo_is_invisible_without_access(api: HfApi, hub_server: HubServer, tmp_path: Path) -> None:
    repo_id = _make_repo(api, hub_server, "private", {"secret.txt": b"s3cret\n"}, private=True)
    assert api.model_info(repo_id).private is True

    anonymous = HfApi(endpoint=hub_server.endpoint, token=False)
    with pytest.raises(RepositoryNotFoundError):
        anonymous.model_info(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub_server.endpoint, token=hub_server.other_token).model_info(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, "secret.txt", endpoint=hub_server.endpoint, token=False, cache_dir=tmp_path)
    raw = httpx.get(hf_hub_url(repo_id, "secret.txt", endpoint=hub_server.endpoint))
    assert raw.status_code == 401 and raw.headers["X-Error-Code"] == "RepoNotFound"

    path = hf_hub_download(
        repo_id, "secret.txt", endpoint=hub_server.endpoint, token=hub_server.token, cache_dir=tmp_path
    )
    assert Path(path).read_bytes() == b"s3cret\n"


def test_stale_parent_commit_is_rejected(api: HfApi, hub_server: HubServer) -> None:
    repo_id = _make_repo(api, hub_server, "parent", {"a.txt": b"a\n"})
    base = api.model_info(repo_id).sha
    assert base is not None
    add = [CommitOperationAdd(path_in_repo="b.txt", path_or_fileobj=b"b\n")]
    moved = api.create_commit(repo_id, operations=add, commit_message="b", parent_commit=base)
    stale = [CommitOperationAdd(path_in_repo="c.txt", path_or_fileobj=b"c\n")]
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_commit(repo_id, operations=stale, commit_message="c", parent_commit=base)
    assert conflict.value.response.status_code == 412
    assert "A commit has happened since. Please refresh and try again." in str(conflict.value)
    assert api.model_info(repo_id).sha == moved.oid


def test_commit_of_lfs_pointer_without_upload_is_rejected(api: HfApi, hub_server: HubServer) -> None:
    repo_id = _make_repo(api, hub_server, "pointer", {"a.txt": b"a\n"})
    header = {"key": "header", "value": {"summary": "sneaky", "description": ""}}
    pointer = {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": "ab" * 32, "size": 3}}
    response = httpx.post(
        f"{hub_server.endpoint}/api/models/{repo_id}/commit/main",
        content="\n".join(json.dumps(line) for line in (header, pointer)),
        headers={"authorization": f"Bearer {hub_server.token}", "content-type": "application/x-ndjson"},
    )
    assert response.status_code == 422
    assert "does not exist" in response.json()["error"]
    assert "w.bin" not in api.list_repo_files(repo_id)


def test_lfs_upload_checks_content_and_deduplicates(api: HfApi, published: Published, hub_server: HubServer) -> None:
    headers = {"authorization": f"Bearer {hub_server.token}"}
    batch_url = f"{hub_server.endpoint}/{published.repo_id}.git/info/lfs/objects/batch"
    stored = hashlib.sha256(published.files["model.safetensors"]).hexdigest()
    new_content = b"fresh bytes"
    new_oid = hashlib.sha256(new_content).hexdigest()
    batch = httpx.post(
        batch_url,
        headers=headers,
        json={
            "operation": "upload",
            "transfers": ["basic"],
            "objects": [{"oid": stored, "size": BIG_SIZE}, {"oid": new_oid, "size": len(new_content)}],
        },
    ).json()
    already, fresh = batch["objects"]
    assert batch["transfer"] == "basic"
    assert "actions" not in already  # stored already: nothing to upload
    upload_href = fresh["actions"]["upload"]["href"]
    assert httpx.put(upload_href, content=b"other bytes").status_code == 400  # wrong size/sha256
    assert httpx.put(upload_href + "0", content=new_content).status_code == 403  # tampered signature
    assert httpx.put(upload_href, content=new_content).status_code == 200
    verify = httpx.post(fresh["actions"]["verify"]["href"], headers=headers, json={"oid": new_oid, "size": 11})
    assert verify.status_code == 200


def test_concurrent_commits_all_land(api: HfApi, hub_server: HubServer) -> None:
    repo_id = _make_repo(api, hub_server, "concurrent", {"a.txt": b"a\n"})
    errors: list[BaseException] = []

    def commit(i: int) -> None:
        try:
            api.upload_file(path_or_fileobj=f"{i}\n".encode(), path_in_repo=f"f{i}.txt", repo_id=repo_id)
        except BaseException as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert {f"f{i}.txt" for i in range(6)} <= set(api.list_repo_files(repo_id))
    assert len(api.list_repo_commits(repo_id)) == 2 + 6


# --- repo cards ---------------------------------------------------------------------------------------------


def test_model_card_validate_uses_server_rules(hub_card_validation: HubServer) -> None:
    ModelCard(GOOD_CARD).validate(repo_type="model")
    with pytest.raises(ValueError, match="license"):
        ModelCard("---\nlicense: 123\n---\n# card\n").validate(repo_type="model")
    with pytest.raises(ValueError, match="library_name"):
        ModelCard("---\nlibrary_name: [a, b]\n---\n# card\n").validate(repo_type="model")


def test_validate_yaml_endpoint_reports_bad_yaml_and_types(hub_server: HubServer) -> None:
    url = f"{hub_server.endpoint}/api/validate-yaml"

    def errors(content: str) -> list[str]:
        response = httpx.post(url, json={"content": content, "repoType": "model"})
        assert response.status_code == (400 if response.json()["errors"] else 200)
        return [e["message"] for e in response.json()["errors"]]

    assert errors(GOOD_CARD) == []
    assert errors("---\nfoo: [unclosed\n---\n") != []
    assert errors("---\ntags: fp8\n---\n") == ['"tags" must be an array of strings']
    assert any("model-index" in e for e in errors("---\nmodel-index: {name: x}\n---\n"))
    assert any("results" in e for e in errors("---\nmodel-index:\n- name: x\n  results: 3\n---\n"))
    no_metadata = httpx.post(url, json={"content": "# just text\n", "repoType": "model"}).json()
    assert no_metadata["errors"] == [] and no_metadata["warnings"]


def test_upload_with_invalid_card_fails_before_uploading(api: HfApi, hub_server: HubServer, tmp_path: Path) -> None:
    repo_id = hub_server.new_repo_id("badcard")
    api.create_repo(repo_id)
    (tmp_path / "README.md").write_text("---\nlicense: [mit, apache-2.0]\n---\n# card\n")
    with pytest.raises(ValueError, match=r"Invalid metadata in README\.md"):
        api.upload_folder(repo_id=repo_id, folder_path=tmp_path)
    assert api.list_repo_files(repo_id) == [".gitattributes"]


# --- fixtures for the rest of the suite ---------------------------------------------------------------------


def test_hub_env_points_clients_at_the_server(hub_env: HubServer, published: Published) -> None:
    # In process: the module-level helpers follow the patched endpoint and HF_TOKEN.
    assert huggingface_hub.model_info(published.repo_id).sha == published.first_commit
    # In a subprocess: only the environment counts.
    code = (
        "import huggingface_hub as h, sys;"
        "print(h.whoami()['name']);"
        f"print(open(h.hf_hub_download({published.repo_id!r}, 'notes.txt')).read(), end='')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.splitlines() == [hub_env.user, "first version"]


def test_state_survives_a_restart(published: Published, hub_server: HubServer, tmp_path: Path) -> None:
    """Everything lives in the data dir: a new server process on a copy of it serves the same repos."""
    data_copy = tmp_path / "data"
    shutil.copytree(hub_server.data_dir, data_copy)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "tests.support.hub_server", "--port", str(port), "--data-dir", str(data_copy)]
    argv += ["--token", f"{hub_server.token}={hub_server.user}:{hub_server.org}", "--log-level", "warning"]

    def ready() -> bool:
        return http_ok(f"{endpoint}/api/health")

    with running_server("hub-server-restarted", argv, ready=ready, log_dir=tmp_path, cwd=REPO_ROOT):
        restarted = HfApi(endpoint=endpoint, token=hub_server.token)
        assert restarted.model_info(published.repo_id).sha == published.first_commit
        path = hf_hub_download(published.repo_id, "model.safetensors", endpoint=endpoint, cache_dir=tmp_path)
        assert Path(path).read_bytes() == published.files["model.safetensors"]
