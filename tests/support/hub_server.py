"""A Hugging Face Hub test server that speaks the protocol the real `huggingface_hub` client uses.

No packaged Hub server accepts uploads, so the publish/download tests run the real client against this one:
repos with git-like commits, branches and tags, the preupload -> LFS batch -> PUT -> verify -> NDJSON commit
upload path, `resolve` downloads with Range support, tree/paths-info listings and card-metadata validation.

Only the LFS "basic" transfer is spoken: clients must run with HF_HUB_DISABLE_XET=1. Requests for Hub
features this server lacks (pull requests, Xet, multipart LFS, settings, ...) get an explicit 4xx/5xx JSON
error, never a silent success.

Layout: pure helpers (git hashing, globbing, card metadata), `BlobStore` + `HubStore` (storage, one lock),
`TokenRegistry` (auth), `HubApp` (the ASGI/HTTP layer), `main` (CLI).

    python -m tests.support.hub_server --port 8123 --data-dir /tmp/hub --token hf_abc=alice:acme-org
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import logging
import mimetypes
import re
import secrets
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qs, quote, unquote

import uvicorn
import yaml
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

logger = logging.getLogger("hub_server")

# ----------------------------------------------------------------------------------------------------
# Constants

REPO_TYPES: Final = ("model", "dataset", "space")
URL_PREFIXES: Final = {"model": "", "dataset": "datasets/", "space": "spaces/"}
PLURAL_TO_TYPE: Final = {"models": "model", "datasets": "dataset", "spaces": "space"}
DEFAULT_BRANCH: Final = "main"
# The Hub refuses plain git blobs from 10 MiB on; preupload sends such files down the LFS path.
LFS_SIZE_THRESHOLD: Final = 10 * 1024 * 1024
LFS_UPLOAD_URL_TTL_S: Final = 3600
TREE_PAGE_SIZE: Final = 1000
TREE_PAGE_SIZE_EXPANDED: Final = 50
COMMITS_PAGE_SIZE: Final = 50
README: Final = "README.md"
CHUNK: Final = 1024 * 1024

SHA256_RE: Final = re.compile(r"^[0-9a-f]{64}$")
COMMIT_ID_RE: Final = re.compile(r"^[0-9a-f]{40}$")
# The client accepts 5..40 hex digits for `parent_commit`; revisions accept short ids from 7 on, like the Hub.
SHORT_COMMIT_RE: Final = re.compile(r"^[0-9a-f]{5,40}$")
REPO_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,94}[A-Za-z0-9_]$|^[A-Za-z0-9]$")
NAMESPACE_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,41}$")
REF_NAME_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
# Names that are routes of the Hub itself, so a namespace may not use them.
RESERVED_NAMESPACES: Final = frozenset({"api", "datasets", "spaces", "models", "_lfs-storage", "buckets"})

# fmt: off
_DEFAULT_LFS_PATTERNS: Final = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gguf", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
    "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle",
    "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite",
    "*.tgz", "*.wasm", "*.xz", "*.zip", "*.zst", "*tfevents*",
)
# The `expand` values of model_info this server can answer (others get a 400, as unknown ones do on the Hub).
EXPANDABLE_PROPERTIES: Final = frozenset({
    "author", "cardData", "config", "createdAt", "disabled", "downloads", "gated", "lastModified",
    "library_name", "likes", "model-index", "pipeline_tag", "private", "sha", "siblings", "spaces", "tags",
    "usedStorage",
})
# fmt: on
# What a new repo holds on the Hub: an "initial commit" by "system" adding this file.
DEFAULT_GITATTRIBUTES: Final = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in _DEFAULT_LFS_PATTERNS)
MISSING_CARD_METADATA_WARNING: Final = (
    "Empty or missing yaml metadata in repo card (https://huggingface.co/docs/hub/model-cards#model-card-metadata)"
)


# ----------------------------------------------------------------------------------------------------
# Errors


class HubError(Exception):
    """An HTTP error answered the way the Hub does: JSON body plus X-Error-Code / X-Error-Message headers.

    The client maps `X-Error-Code` (RepoNotFound, RevisionNotFound, EntryNotFound) onto its exception types.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


def repo_not_found(repo_id: str, *, authenticated: bool = True) -> HubError:
    # Like the Hub: 401 when anonymous (it may be private), else 404; the code says "not found" either way.
    return HubError(
        404 if authenticated else 401,
        f"Repository not found: {repo_id}",
        code="RepoNotFound",
    )


def revision_not_found(revision: str) -> HubError:
    return HubError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")


def entry_not_found(message: str, commit_id: str | None = None) -> HubError:
    headers = {"X-Repo-Commit": commit_id} if commit_id else None
    return HubError(404, message, code="EntryNotFound", headers=headers)


def not_supported(what: str) -> HubError:
    return HubError(501, f"{what} is not supported by the quant-release test Hub server")


# ----------------------------------------------------------------------------------------------------
# Git-compatible hashing: ids look like the Hub's (the client compares blob oids with `sha.git_hash`).


def git_blob_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def git_commit_oid(tree: str, parents: Sequence[str], author: str, epoch: int, title: str, description: str) -> str:
    signature = f"{author} <{author}@users.noreply.huggingface.co> {epoch} +0000"
    lines = [
        f"tree {tree}",
        *(f"parent {p}" for p in parents),
        f"author {signature}",
        f"committer {signature}",
    ]
    message = title if not description else f"{title}\n\n{description}"
    body = ("\n".join(lines) + "\n\n" + message + "\n").encode()
    return hashlib.sha1(b"commit %d\0" % len(body) + body).hexdigest()


def parent_dirs(path: str) -> Iterator[str]:
    """'a/b/c.txt' -> 'a/b', 'a' (not the root)."""
    parts = path.split("/")[:-1]
    for i in range(len(parts), 0, -1):
        yield "/".join(parts[:i])


def now_iso() -> tuple[str, int]:
    """The Hub's timestamp format (ISO, milliseconds, Z) and the epoch second it stands for."""
    moment = dt.datetime.now(dt.timezone.utc)
    iso = moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    return iso, int(moment.timestamp())


# ----------------------------------------------------------------------------------------------------
# Glob patterns of .gitattributes / .gitignore (enough of git's rules for LFS tracking and `shouldIgnore`).


def _glob_to_regex(pattern: str) -> re.Pattern[str]:
    out: list[str] = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
            continue
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                out.append(re.escape(char))
            else:
                body = pattern[i + 1 : end].replace("\\", "\\\\")
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
                i = end
        else:
            out.append(re.escape(char))
        i += 1
    return re.compile("".join(out) + r"\Z")


def glob_matches(pattern: str, path: str) -> bool:
    """git semantics: a pattern without '/' matches the basename at any depth, otherwise the whole path."""
    pattern = pattern.strip()
    if pattern.startswith("/"):
        return bool(_glob_to_regex(pattern[1:]).match(path))
    if "/" not in pattern.rstrip("/"):
        return bool(_glob_to_regex(pattern).match(path.rsplit("/", 1)[-1]))
    return bool(_glob_to_regex(pattern).match(path))


def lfs_tracked(gitattributes: str, path: str) -> bool:
    tracked = False
    for line in gitattributes.splitlines():
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if glob_matches(fields[0], path):
            for attr in fields[1:]:
                if attr == "filter=lfs":
                    tracked = True
                elif attr in ("-filter", "!filter") or (attr.startswith("filter=") and attr != "filter=lfs"):
                    tracked = False
    return tracked


def gitignored(gitignore: str, path: str) -> bool:
    ignored = False
    for raw in gitignore.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line[1:] if negate else line
        if pattern.endswith("/"):
            # A directory pattern ignores everything below a matching directory.
            dir_pattern = pattern.rstrip("/")
            hit = any(glob_matches(dir_pattern, d) for d in parent_dirs(path))
        else:
            hit = glob_matches(pattern, path) or any(glob_matches(pattern, d) for d in parent_dirs(path))
        if hit:
            ignored = not negate
    return ignored


def looks_binary(sample: bytes) -> bool:
    """The Hub's heuristic on the first 512 bytes: NUL bytes or invalid UTF-8 mean binary."""
    if b"\0" in sample:
        return True
    for cut in range(4):  # the sample may end inside a multi-byte character
        try:
            sample[: len(sample) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return False
    return True


# ----------------------------------------------------------------------------------------------------
# Repo card metadata (README.md YAML front matter), validated like the Hub's /api/validate-yaml.

_FRONT_MATTER_RE: Final = re.compile(r"^\s*---[\r\n]+([\S\s]*?)[\r\n]+---(?:\r\n|\n|$)")


class CardMetadataError(ValueError):
    pass


def parse_card_metadata(content: str) -> dict[str, Any] | None:
    """The YAML front matter as a dict; None when there is none. Raises CardMetadataError on bad YAML."""
    match = _FRONT_MATTER_RE.match(content)
    if match is None:
        return None
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        raise CardMetadataError(f"Invalid YAML in README.md metadata: {exc}") from exc
    if data is None:
        return None
    if not isinstance(data, dict):
        raise CardMetadataError("README.md metadata must be a YAML mapping (key: value)")
    return {str(k): v for k, v in data.items()}


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def _model_index_errors(value: Any) -> list[str]:
    if not isinstance(value, list):
        return ['"model-index" must be an array']
    errors: list[str] = []
    for i, model in enumerate(value):
        where = f'"model-index[{i}]"'
        if not isinstance(model, dict):
            errors.append(f"{where} must be an object with 'name' and 'results'")
            continue
        if not isinstance(model.get("name"), str):
            errors.append(f"{where}.name must be a string")
        results = model.get("results")
        if not isinstance(results, list):
            errors.append(f"{where}.results must be an array")
            continue
        for j, result in enumerate(results):
            rwhere = f"{where}.results[{j}]"
            if not isinstance(result, dict):
                errors.append(f"{rwhere} must be an object")
                continue
            task = result.get("task")
            if not (isinstance(task, dict) and isinstance(task.get("type"), str)):
                errors.append(f"{rwhere}.task.type must be a string")
            dataset = result.get("dataset")
            if not (
                isinstance(dataset, dict)
                and isinstance(dataset.get("type"), str)
                and isinstance(dataset.get("name"), str)
            ):
                errors.append(f"{rwhere}.dataset must be an object with string 'type' and 'name'")
            metrics = result.get("metrics")
            if not isinstance(metrics, list) or not all(
                isinstance(m, dict) and isinstance(m.get("type"), str) and m.get("value") is not None for m in metrics
            ):
                errors.append(f"{rwhere}.metrics must be an array of objects with 'type' and 'value'")
    return errors


def card_metadata_errors(metadata: Mapping[str, Any], repo_type: str) -> list[str]:
    """Type errors on the keys the Hub knows; unknown keys are free-form, as on the Hub."""
    errors: list[str] = []
    for key in ("library_name", "pipeline_tag", "license_name", "license_link", "new_version", "pretty_name"):
        if key in metadata and not isinstance(metadata[key], str):
            errors.append(f'"{key}" must be a string')
    if "license" in metadata:
        license_value = metadata["license"]
        if repo_type == "model" and not isinstance(license_value, str):
            errors.append('"license" must be a string')
        elif not (isinstance(license_value, str) or _is_str_list(license_value)):
            errors.append('"license" must be a string or an array of strings')
    if "tags" in metadata and not _is_str_list(metadata["tags"]):
        errors.append('"tags" must be an array of strings')
    for key in ("language", "datasets", "metrics", "base_model"):
        if key in metadata and not (isinstance(metadata[key], str) or _is_str_list(metadata[key])):
            errors.append(f'"{key}" must be a string or an array of strings')
    if "inference" in metadata and not isinstance(metadata["inference"], (bool, dict)):
        errors.append('"inference" must be a boolean or an object')
    if "model-index" in metadata:
        errors.extend(_model_index_errors(metadata["model-index"]))
    return errors


def validate_card(content: str, repo_type: str) -> tuple[list[str], list[str]]:
    """(errors, warnings) for a README.md, as the Hub reports them."""
    try:
        metadata = parse_card_metadata(content)
    except CardMetadataError as exc:
        return [str(exc)], []
    if not metadata:
        return [], [MISSING_CARD_METADATA_WARNING]
    return card_metadata_errors(metadata, repo_type), []


def jsonable(value: Any) -> Any:
    """YAML gives dates and other non-JSON values; the Hub serves them as strings."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


# ----------------------------------------------------------------------------------------------------
# Data model


@dataclass(frozen=True)
class FileEntry:
    """One file of a commit. `oid` is the git blob id: of the content, or of the LFS pointer for LFS files."""

    size: int
    sha256: str
    oid: str
    lfs: bool

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))

    @property
    def etag(self) -> str:
        """The Hub's content id: sha256 for LFS files, git blob sha1 otherwise. Served as the resolve ETag
        and as the preupload `oid` (the client compares it with `CommitOperationAdd._local_oid`)."""
        return self.sha256 if self.lfs else self.oid

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "sha256": self.sha256, "oid": self.oid, "lfs": self.lfs}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FileEntry:
        return cls(size=int(data["size"]), sha256=str(data["sha256"]), oid=str(data["oid"]), lfs=bool(data["lfs"]))

    @classmethod
    def regular(cls, content: bytes) -> FileEntry:
        return cls(
            size=len(content),
            sha256=hashlib.sha256(content).hexdigest(),
            oid=git_blob_oid(content),
            lfs=False,
        )

    @classmethod
    def large(cls, sha256: str, size: int) -> FileEntry:
        return cls(size=size, sha256=sha256, oid=git_blob_oid(lfs_pointer(sha256, size)), lfs=True)


def directory_oids(files: Mapping[str, FileEntry]) -> dict[str, str]:
    """Git tree ids of every directory ('' is the root), so folder oids in listings are real tree hashes."""
    files_in: dict[str, list[tuple[str, FileEntry]]] = {"": []}
    subdirs_in: dict[str, set[str]] = {"": set()}
    for path, entry in files.items():
        parent, _, name = path.rpartition("/")
        files_in.setdefault(parent, []).append((name, entry))
        while parent:
            above, _, dir_name = parent.rpartition("/")
            subdirs_in.setdefault(above, set()).add(dir_name)
            parent = above
    oids: dict[str, str] = {}

    def tree_oid(directory: str) -> str:
        # (sort key, entry) pairs; git sorts a subtree as if its name ended with '/'
        entries = [
            (name.encode(), b"100644 " + name.encode() + b"\0" + bytes.fromhex(entry.oid))
            for name, entry in files_in.get(directory, [])
        ]
        for name in subdirs_in.get(directory, ()):
            sub_oid = tree_oid(f"{directory}/{name}" if directory else name)
            entries.append((name.encode() + b"/", b"40000 " + name.encode() + b"\0" + bytes.fromhex(sub_oid)))
        body = b"".join(encoded for _, encoded in sorted(entries))
        oids[directory] = hashlib.sha1(b"tree %d\0" % len(body) + body).hexdigest()
        return oids[directory]

    tree_oid("")
    return oids


@dataclass(frozen=True)
class Commit:
    id: str
    parents: tuple[str, ...]
    title: str
    message: str
    author: str
    date: str
    files: Mapping[str, FileEntry]
    dirs: Mapping[str, str]  # directory path -> tree oid, '' is the root tree

    def to_json(self) -> dict[str, Any]:
        return {
            "parents": list(self.parents),
            "title": self.title,
            "message": self.message,
            "author": self.author,
            "date": self.date,
            "files": {path: entry.to_json() for path, entry in sorted(self.files.items())},
            "dirs": dict(sorted(self.dirs.items())),
        }

    @classmethod
    def from_json(cls, commit_id: str, data: Mapping[str, Any]) -> Commit:
        return cls(
            id=commit_id,
            parents=tuple(data["parents"]),
            title=str(data["title"]),
            message=str(data["message"]),
            author=str(data["author"]),
            date=str(data["date"]),
            files={path: FileEntry.from_json(entry) for path, entry in data["files"].items()},
            dirs=dict(data["dirs"]),
        )


@dataclass(frozen=True)
class RepoKey:
    repo_type: str
    namespace: str
    name: str

    @property
    def repo_id(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def url_path(self) -> str:
        return f"{URL_PREFIXES[self.repo_type]}{self.repo_id}"


@dataclass
class Repo:
    key: RepoKey
    private: bool
    created_at: str
    object_id: str
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs_objects: dict[str, int] = field(default_factory=dict)  # sha256 -> size, uploaded to this repo

    def snapshot(self) -> Repo:
        """A copy readers can use without the store lock (commits themselves are immutable)."""
        return dataclasses.replace(
            self,
            branches=dict(self.branches),
            tags=dict(self.tags),
            commits=dict(self.commits),
            lfs_objects=dict(self.lfs_objects),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "type": self.key.repo_type,
            "namespace": self.key.namespace,
            "name": self.key.name,
            "private": self.private,
            "createdAt": self.created_at,
            "objectId": self.object_id,
            "branches": self.branches,
            "tags": self.tags,
            "lfsObjects": self.lfs_objects,
            "commits": {cid: commit.to_json() for cid, commit in self.commits.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Repo:
        return cls(
            key=RepoKey(str(data["type"]), str(data["namespace"]), str(data["name"])),
            private=bool(data["private"]),
            created_at=str(data["createdAt"]),
            object_id=str(data["objectId"]),
            branches=dict(data["branches"]),
            tags=dict(data["tags"]),
            commits={cid: Commit.from_json(cid, c) for cid, c in data["commits"].items()},
            lfs_objects={str(k): int(v) for k, v in data["lfsObjects"].items()},
        )


def resolve_revision(repo: Repo, revision: str) -> Commit:
    """Branch, tag, full ref name, or (short) commit id -> commit, in the Hub's order of precedence."""
    if revision in repo.branches:
        return repo.commits[repo.branches[revision]]
    if revision in repo.tags:
        return repo.commits[repo.tags[revision]]
    for prefix, refs in (("refs/heads/", repo.branches), ("refs/tags/", repo.tags)):
        if revision.startswith(prefix) and revision[len(prefix) :] in refs:
            return repo.commits[refs[revision[len(prefix) :]]]
    if revision in repo.commits:
        return repo.commits[revision]
    if len(revision) >= 7 and SHORT_COMMIT_RE.match(revision):
        matches = [c for cid, c in repo.commits.items() if cid.startswith(revision)]
        if len(matches) == 1:
            return matches[0]
    raise revision_not_found(revision)


def history(repo: Repo, head: Commit) -> Iterator[Commit]:
    """First-parent history from `head`, newest first."""
    commit: Commit | None = head
    while commit is not None:
        yield commit
        commit = repo.commits.get(commit.parents[0]) if commit.parents else None


def last_commit_touching(repo: Repo, head: Commit, path: str, is_dir: bool) -> Commit:
    def version(commit: Commit) -> object:
        return commit.dirs.get(path) if is_dir else commit.files.get(path)

    current = version(head)
    last = head
    for commit in history(repo, head):
        if version(commit) != current:
            break
        last = commit
    return last


# Commit operations, parsed from the NDJSON payload by the HTTP layer.


@dataclass(frozen=True)
class AddFile:
    path: str
    entry: FileEntry  # content already in the blob store


@dataclass(frozen=True)
class AddLfsFile:
    path: str
    sha256: str
    size: int | None


@dataclass(frozen=True)
class DeleteFile:
    path: str


@dataclass(frozen=True)
class DeleteFolder:
    path: str


Operation = AddFile | AddLfsFile | DeleteFile | DeleteFolder


# ----------------------------------------------------------------------------------------------------
# Storage


class BlobStore:
    """Content-addressed file contents (sha256), shared by all repos. Writes are atomic renames: no lock."""

    def __init__(self, root: Path, tmp: Path) -> None:
        self._root = root
        self._tmp = tmp
        root.mkdir(parents=True, exist_ok=True)
        tmp.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        return self._root / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def temp_path(self) -> Path:
        return self._tmp / f"{uuid.uuid4().hex}.part"

    def put_bytes(self, data: bytes) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        if not self.exists(sha256):
            tmp = self.temp_path()
            tmp.write_bytes(data)
            self.adopt(tmp, sha256)
        return sha256

    def adopt(self, tmp: Path, sha256: str) -> None:
        """Move a fully written, already verified temp file into place."""
        target = self.path(sha256)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.replace(target)

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()


class HubStore:
    """Repos, commits, refs and per-repo LFS objects, persisted as one JSON file per repo.

    All state changes go through methods holding `_lock`: the client uploads and commits from a thread pool,
    and a commit must see the branch head it checks `parentCommit` against.
    """

    def __init__(self, data_dir: Path) -> None:
        self.blobs = BlobStore(data_dir / "blobs", data_dir / "tmp")
        self._repos_dir = data_dir / "repos"
        self._repos_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._repos: dict[RepoKey, Repo] = {}
        for path in sorted(self._repos_dir.glob("*/*/*.json")):
            repo = Repo.from_json(json.loads(path.read_text()))
            self._repos[repo.key] = repo

    # -- reading

    def get(self, key: RepoKey) -> Repo | None:
        with self._lock:
            repo = self._repos.get(key)
            return repo.snapshot() if repo else None

    def count(self) -> int:
        with self._lock:
            return len(self._repos)

    def read_small_text(self, entry: FileEntry, limit: int = 1_000_000) -> str | None:
        if entry.lfs or entry.size > limit:
            return None
        try:
            return self.blobs.read(entry.sha256).decode("utf-8")
        except (OSError, UnicodeDecodeError):
            return None

    # -- repos

    def create_repo(self, key: RepoKey, *, private: bool) -> Repo:
        with self._lock:
            if key in self._repos:
                raise HubError(409, f"You already created this {key.repo_type} repo")
            content = DEFAULT_GITATTRIBUTES.encode()
            self.blobs.put_bytes(content)
            date, epoch = now_iso()
            repo = Repo(key=key, private=private, created_at=date, object_id=secrets.token_hex(12))
            files = {".gitattributes": FileEntry.regular(content)}
            self._add_commit(repo, DEFAULT_BRANCH, None, files, "initial commit", "", "system", date, epoch)
            self._repos[key] = repo
            self._persist(repo)
            return repo.snapshot()

    def delete_repo(self, key: RepoKey) -> None:
        with self._lock:
            if self._repos.pop(key, None) is None:
                raise repo_not_found(key.repo_id)
            self._file(key).unlink(missing_ok=True)

    # -- commits

    def commit(
        self,
        key: RepoKey,
        *,
        branch: str,
        operations: Sequence[Operation],
        title: str,
        description: str,
        author: str,
        parent_commit: str | None,
    ) -> Commit:
        if branch.startswith("refs/heads/"):
            branch = branch[len("refs/heads/") :]
        with self._lock:
            repo = self._require(key)
            if branch not in repo.branches:
                if branch in repo.tags or resolve_or_none(repo, branch) is not None:
                    raise HubError(400, f"Cannot commit to '{branch}': only branches can receive commits")
                raise revision_not_found(branch)
            head = repo.commits[repo.branches[branch]]
            if parent_commit is not None and not head.id.startswith(parent_commit.lower()):
                # Optimistic concurrency, as on the Hub: the branch moved since the client read it.
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            files = self._apply(repo, dict(head.files), operations)
            date, epoch = now_iso()
            commit = self._add_commit(repo, branch, head, files, title, description, author, date, epoch)
            self._persist(repo)
            return commit

    @staticmethod
    def _apply(repo: Repo, files: dict[str, FileEntry], operations: Sequence[Operation]) -> dict[str, FileEntry]:
        for op in operations:
            if isinstance(op, AddFile):
                files[op.path] = op.entry
            elif isinstance(op, AddLfsFile):
                stored_size = repo.lfs_objects.get(op.sha256)
                if stored_size is None:
                    raise HubError(
                        422,
                        "Your push was rejected because an LFS pointer pointed to a file that does not exist "
                        f"(path '{op.path}', oid {op.sha256}): upload it through the LFS batch API first",
                    )
                if op.size is not None and op.size != stored_size:
                    raise HubError(
                        422,
                        f"LFS object {op.sha256} has size {stored_size}, not {op.size} ({op.path})",
                    )
                files[op.path] = FileEntry.large(op.sha256, stored_size)
            elif isinstance(op, DeleteFile):
                if op.path not in files:
                    raise entry_not_found(f"A file with this name doesn't exist: {op.path}")
                del files[op.path]
            else:
                prefix = op.path.rstrip("/") + "/"
                doomed = [path for path in files if path.startswith(prefix)]
                if not doomed:
                    raise entry_not_found(f"A folder with this name doesn't exist: {op.path}")
                for path in doomed:
                    del files[path]
        for path in files:
            for directory in parent_dirs(path):
                if directory in files:
                    raise HubError(400, f"'{directory}' cannot be both a file and a folder (adding '{path}')")
        return files

    def _add_commit(
        self,
        repo: Repo,
        branch: str,
        parent: Commit | None,
        files: dict[str, FileEntry],
        title: str,
        description: str,
        author: str,
        date: str,
        epoch: int,
    ) -> Commit:
        dirs = directory_oids(files)
        parents = (parent.id,) if parent else ()
        commit_id = git_commit_oid(dirs[""], parents, author, epoch, title, description)
        commit = Commit(commit_id, parents, title, description, author, date, files, dirs)
        repo.commits[commit_id] = commit
        repo.branches[branch] = commit_id
        return commit

    # -- refs

    def create_branch(self, key: RepoKey, branch: str, starting_point: str | None) -> None:
        with self._lock:
            repo = self._require(key)
            if branch in repo.branches:
                raise HubError(409, f"Branch '{branch}' already exists")
            start = resolve_revision(repo, starting_point or DEFAULT_BRANCH)
            repo.branches[branch] = start.id
            self._persist(repo)

    def delete_branch(self, key: RepoKey, branch: str) -> None:
        with self._lock:
            repo = self._require(key)
            if branch == DEFAULT_BRANCH:
                raise HubError(403, f"Cannot delete the default branch '{DEFAULT_BRANCH}'")
            if repo.branches.pop(branch, None) is None:
                raise revision_not_found(branch)
            self._persist(repo)

    def create_tag(self, key: RepoKey, tag: str, revision: str) -> None:
        with self._lock:
            repo = self._require(key)
            if tag in repo.tags:
                raise HubError(409, f"Tag '{tag}' already exists")
            repo.tags[tag] = resolve_revision(repo, revision).id
            self._persist(repo)

    def delete_tag(self, key: RepoKey, tag: str) -> None:
        with self._lock:
            repo = self._require(key)
            if repo.tags.pop(tag, None) is None:
                raise revision_not_found(tag)
            self._persist(repo)

    # -- LFS

    def add_lfs_object(self, key: RepoKey, sha256: str, size: int) -> None:
        with self._lock:
            repo = self._require(key)
            repo.lfs_objects[sha256] = size
            self._persist(repo)

    # -- internals

    def _require(self, key: RepoKey) -> Repo:
        repo = self._repos.get(key)
        if repo is None:
            raise repo_not_found(key.repo_id)
        return repo

    def _file(self, key: RepoKey) -> Path:
        return self._repos_dir / key.repo_type / key.namespace / f"{key.name}.json"

    def _persist(self, repo: Repo) -> None:
        path = self._file(repo.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(repo.to_json()))
        tmp.replace(path)  # after a crash the index is the old or the new one, never half of one


def resolve_or_none(repo: Repo, revision: str) -> Commit | None:
    try:
        return resolve_revision(repo, revision)
    except HubError:
        return None


# ----------------------------------------------------------------------------------------------------
# Auth


@dataclass(frozen=True)
class Identity:
    user: str
    orgs: tuple[str, ...]

    def can_write(self, namespace: str) -> bool:
        return namespace == self.user or namespace in self.orgs


class TokenRegistry:
    """Bearer tokens given at start-up: `TOKEN=USER[:ORG1,ORG2]`."""

    def __init__(self, specs: Iterable[str]) -> None:
        self._tokens: dict[str, Identity] = {}
        for spec in specs:
            token, sep, rest = spec.partition("=")
            user, _, orgs = rest.partition(":")
            if not sep or not token or not user:
                raise ValueError(f"bad --token {spec!r}: expected TOKEN=USER[:ORG1,ORG2]")
            self._tokens[token] = Identity(user, tuple(o for o in orgs.split(",") if o))

    def identify(self, authorization: str | None) -> Identity | None:
        """None when anonymous; a 401 for a header that names no known token, as the Hub does."""
        if authorization is None:
            return None
        scheme, _, token = authorization.partition(" ")
        identity = self._tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if identity is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return identity


# ----------------------------------------------------------------------------------------------------
# HTTP layer

Handler = Callable[[Request, dict[str, str]], Awaitable[Response]]

_TYPE_API = r"/api/(?P<rtype>models|datasets|spaces)/(?P<ns>[^/]+)/(?P<name>[^/]+)"
_TYPE_GIT = r"/(?:(?P<rtype>datasets|spaces)/)?(?P<ns>[^/]+)/(?P<name>[^/]+?)"


def _flag(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes", "on")


def _header_safe(message: str) -> str:
    return message.replace("\r", " ").replace("\n", " ")[:1000].encode("latin-1", "replace").decode("latin-1")


class HubApp:
    """ASGI app. Routing is done on the raw (still percent-encoded) path, because the client sends revisions
    and folder paths with '/' encoded as %2F, which must stay one path segment."""

    def __init__(self, store: HubStore, tokens: TokenRegistry) -> None:
        self.store = store
        self.tokens = tokens
        self._secret = secrets.token_bytes(32)  # signs the LFS upload URLs handed out by the batch API
        self._routes: list[tuple[frozenset[str], re.Pattern[str], Handler]] = []
        # Fault injection for reliability tests: the next `count` requests whose path matches `pattern`
        # get `status` instead of an answer (set with POST /api/_test/faults; GET reads what was seen). With
        # `hang_s`, the server first holds the request that long without a byte of answer (a Hub that
        # accepts and never answers, for a client whose read timeout is shorter); the request is never acted on.
        self._faults: dict[str, Any] = {"pattern": None, "status": 0, "count": 0, "seen": 0, "hang_s": 0.0}
        route = self._add_route
        route("GET", r"/api/health", self.health)
        route({"GET", "POST"}, r"/api/_test/faults", self.test_faults)
        route("GET", r"/api/whoami-v2", self.whoami)
        route("POST", r"/api/repos/create", self.create_repo)
        route("DELETE", r"/api/repos/delete", self.delete_repo)
        route("POST", r"/api/validate-yaml", self.validate_yaml)
        route("GET", _TYPE_API, self.repo_info)
        route("GET", _TYPE_API + r"/revision/(?P<rev>[^/]+)", self.repo_info)
        route("GET", _TYPE_API + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.+))?", self.tree)
        route("POST", _TYPE_API + r"/paths-info/(?P<rev>[^/]+)", self.paths_info)
        route("GET", _TYPE_API + r"/refs", self.refs)
        route("GET", _TYPE_API + r"/commits/(?P<rev>[^/]+)", self.commits)
        route("POST", _TYPE_API + r"/branch/(?P<branch>[^/]+)", self.create_branch)
        route("DELETE", _TYPE_API + r"/branch/(?P<branch>[^/]+)", self.delete_branch)
        route("POST", _TYPE_API + r"/tag/(?P<rev>[^/]+)", self.create_tag)
        route("DELETE", _TYPE_API + r"/tag/(?P<tag>[^/]+)", self.delete_tag)
        route("POST", _TYPE_API + r"/preupload/(?P<rev>[^/]+)", self.preupload)
        route("POST", _TYPE_API + r"/commit/(?P<rev>[^/]+)", self.commit)
        route("POST", _TYPE_GIT + r"\.git/info/lfs/objects/batch", self.lfs_batch)
        route("POST", _TYPE_GIT + r"\.git/info/lfs/objects/verify", self.lfs_verify)
        route(
            "PUT",
            r"/_lfs-storage/(?P<rtype>model|dataset|space)/(?P<ns>[^/]+)/(?P<name>[^/]+)/(?P<oid>\w+)",
            self.lfs_upload,
        )
        route({"GET", "HEAD"}, _TYPE_GIT + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self.resolve)

    def _add_route(self, methods: str | set[str], pattern: str, handler: Handler) -> None:
        names = frozenset({methods} if isinstance(methods, str) else methods)
        self._routes.append((names, re.compile(pattern + r"\Z"), handler))

    # -- ASGI plumbing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # lifespan and websockets: nothing to set up
        request = Request(scope, receive)
        try:
            response = await self._dispatch(request)
        except HubError as exc:
            response = self._error_response(request, exc)
        except Exception as exc:  # a server bug: say so loudly instead of hanging up on the client
            logger.exception("internal error on %s %s", request.method, request.url.path)
            response = self._error_response(request, HubError(500, f"Internal test-server error: {exc!r}"))
        await response(scope, receive, send)

    async def test_faults(self, request: Request, params: dict[str, str]) -> Response:
        del params
        if request.method == "POST":
            body = await request.json()
            self._faults = {
                "pattern": str(body["pattern"]),
                "status": int(body.get("status", 500)),
                "count": int(body.get("count", 1)),
                "seen": 0,
                "hang_s": float(body.get("hang_s", 0.0)),
            }
        return JSONResponse(self._faults)

    def _injected_fault(self, path: str) -> Response | None:
        faults = self._faults
        if faults["pattern"] is None or path.startswith("/api/_test/") or not re.search(faults["pattern"], path):
            return None
        faults["seen"] += 1
        if faults["count"] <= 0:
            return None
        faults["count"] -= 1
        headers = {"Retry-After": "0"} if faults["status"] == 429 else {}
        return JSONResponse({"error": "injected fault"}, status_code=faults["status"], headers=headers)

    async def _dispatch(self, request: Request) -> Response:
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        path = raw_path.decode("latin-1").split("?", 1)[0]
        fault = self._injected_fault(path)
        if fault is not None:
            if self._faults["hang_s"] > 0:
                await asyncio.sleep(self._faults["hang_s"])
            return fault
        allowed: set[str] = set()
        for methods, pattern, handler in self._routes:
            match = pattern.match(path)
            if match is None:
                continue
            if request.method not in methods:
                allowed |= methods
                continue
            params = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
            return await handler(request, params)
        if allowed:
            raise HubError(405, f"Method {request.method} not allowed on {path} (allowed: {sorted(allowed)})")
        if path.startswith("/api/"):
            raise not_supported(f"{request.method} {path}")
        raise HubError(404, f"Not found: {path}")

    @staticmethod
    def _error_response(request: Request, exc: HubError) -> Response:
        headers = {"X-Error-Message": _header_safe(exc.message), **exc.headers}
        if exc.code:
            headers["X-Error-Code"] = exc.code
        accept = request.headers.get("accept", "")
        if "text/plain" in accept and "json" not in accept:  # ModelCard.validate asks for text
            return PlainTextResponse(exc.message, status_code=exc.status, headers=headers)
        return JSONResponse({"error": exc.message, **exc.extra}, status_code=exc.status, headers=headers)

    # -- shared helpers

    def _identity(self, request: Request) -> Identity | None:
        return self.tokens.identify(request.headers.get("authorization"))

    @staticmethod
    def _key(params: Mapping[str, str]) -> RepoKey:
        raw_type = params.get("rtype")
        repo_type = PLURAL_TO_TYPE.get(raw_type, raw_type) if raw_type else "model"
        return RepoKey(repo_type, params["ns"], params["name"])

    def _readable(self, request: Request, key: RepoKey) -> tuple[Repo, Identity | None]:
        identity = self._identity(request)
        repo = self.store.get(key)
        if repo is None or (repo.private and (identity is None or not identity.can_write(key.namespace))):
            raise repo_not_found(key.repo_id, authenticated=identity is not None)
        return repo, identity

    def _writable(self, request: Request, key: RepoKey) -> tuple[Repo, Identity]:
        repo, identity = self._readable(request, key)
        if identity is None:
            raise HubError(401, f"You must be authenticated to write to {key.repo_id}")
        if not identity.can_write(key.namespace):
            raise HubError(403, f"You don't have the rights to write to {key.repo_type} repo {key.repo_id}")
        return repo, identity

    @staticmethod
    async def _json_body(request: Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError) as exc:
            raise HubError(400, f"Request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise HubError(400, "Request body must be a JSON object")
        return body

    @staticmethod
    def _base_url(request: Request) -> str:
        return str(request.base_url).rstrip("/")

    @staticmethod
    def _paginated(request: Request, items: Sequence[Any], *, param: str, default_limit: int) -> Response:
        """One page plus a GitHub-style `Link: <...>; rel="next"` header, which the client follows."""
        try:
            limit = int(request.query_params.get("limit", default_limit))
            start = int(request.query_params.get(param, 0)) * (limit if param == "p" else 1)
        except ValueError as exc:
            raise HubError(400, f"Bad pagination parameter: {exc}") from exc
        if limit <= 0 or start < 0:
            raise HubError(400, "Pagination parameters must be positive")
        page = list(items[start : start + limit])
        headers: dict[str, str] = {}
        if start + limit < len(items):
            following = start // limit + 1 if param == "p" else start + limit
            url = request.url.include_query_params(**{param: str(following), "limit": str(limit)})
            headers["Link"] = f'<{url}>; rel="next"'
        return JSONResponse(page, headers=headers)

    def _card_metadata(self, commit: Commit) -> dict[str, Any] | None:
        entry = commit.files.get(README)
        text = self.store.read_small_text(entry) if entry else None
        if text is None:
            return None
        try:
            return parse_card_metadata(text)
        except CardMetadataError:
            return None

    def _model_config(self, commit: Commit) -> dict[str, Any] | None:
        entry = commit.files.get("config.json")
        text = self.store.read_small_text(entry) if entry else None
        if text is None:
            return None
        try:
            config = json.loads(text)
        except ValueError:
            return None
        if not isinstance(config, dict):
            return None
        return {k: config[k] for k in ("architectures", "model_type", "quantization_config") if k in config}

    @staticmethod
    def _tree_item(repo: Repo, commit: Commit, path: str, *, expand: bool) -> dict[str, Any]:
        entry = commit.files.get(path)
        item: dict[str, Any]
        if entry is None:
            item = {"type": "directory", "oid": commit.dirs[path], "size": 0, "path": path}
        else:
            item = {"type": "file", "oid": entry.oid, "size": entry.size, "path": path}
            if entry.lfs:
                item["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
        if expand:
            last = last_commit_touching(repo, commit, path, is_dir=entry is None)
            item["lastCommit"] = {"id": last.id, "title": last.title, "date": last.date}
        return item

    # -- endpoints: service

    async def health(self, request: Request, params: dict[str, str]) -> Response:
        return JSONResponse({"status": "ok", "repos": self.store.count()})

    async def whoami(self, request: Request, params: dict[str, str]) -> Response:
        identity = self._identity(request)
        if identity is None:
            raise HubError(401, "Invalid username or password.")
        return JSONResponse(
            {
                "type": "user",
                "id": hashlib.sha1(identity.user.encode()).hexdigest()[:24],
                "name": identity.user,
                "fullname": identity.user,
                "email": f"{identity.user}@example.invalid",
                "emailVerified": True,
                "isPro": False,
                "canPay": False,
                "orgs": [{"type": "org", "name": org, "fullname": org, "roleInOrg": "write"} for org in identity.orgs],
                "auth": {
                    "type": "access_token",
                    "accessToken": {"displayName": "test-token", "role": "write"},
                },
            }
        )

    async def validate_yaml(self, request: Request, params: dict[str, str]) -> Response:
        body = await self._json_body(request)
        content, repo_type = body.get("content"), body.get("repoType", "model")
        if not isinstance(content, str) or repo_type not in REPO_TYPES:
            raise HubError(400, "Expected {content: string, repoType: model|dataset|space}")
        errors, warnings = validate_card(content, repo_type)
        payload = {"errors": [{"message": e} for e in errors], "warnings": [{"message": w} for w in warnings]}
        if errors:
            message = "Invalid metadata in README.md.\n" + "\n".join(f"- {e}" for e in errors)
            raise HubError(400, message, extra=payload)
        return JSONResponse(payload)

    # -- endpoints: repos

    async def create_repo(self, request: Request, params: dict[str, str]) -> Response:
        identity = self._identity(request)
        if identity is None:
            raise HubError(401, "You must be authenticated to create a repo")
        body = await self._json_body(request)
        unsupported = set(body) - {"name", "organization", "type", "visibility", "private", "sdk"}
        if unsupported:
            raise not_supported(f"create_repo option(s) {sorted(unsupported)}")
        name, repo_type = body.get("name"), body.get("type") or "model"
        namespace = body.get("organization") or identity.user
        if repo_type not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        if not isinstance(name, str) or not REPO_NAME_RE.match(name) or "--" in name or ".." in name:
            raise HubError(400, f"Invalid repo name {name!r}: use letters, digits, '-', '_', '.' (max 96)")
        if name.endswith(".git"):
            raise HubError(400, "Repo name cannot end with .git")
        if not isinstance(namespace, str) or not NAMESPACE_RE.match(namespace) or namespace in RESERVED_NAMESPACES:
            raise HubError(400, f"Invalid namespace {namespace!r}")
        if not identity.can_write(namespace):
            raise HubError(403, f'You don\'t have the rights to create a {repo_type} under the namespace "{namespace}"')
        if repo_type == "space" and not body.get("sdk"):
            raise HubError(400, "A space needs an sdk")
        visibility = body.get("visibility")
        if visibility not in (None, "public", "private"):
            raise not_supported(f"visibility {visibility!r}")
        private = visibility == "private" or (visibility is None and bool(body.get("private", False)))
        key = RepoKey(repo_type, namespace, name)
        url = f"{self._base_url(request)}/{key.url_path}"
        try:
            await run_in_threadpool(self.store.create_repo, key, private=private)
        except HubError as exc:
            if exc.status == 409:
                exc.extra["url"] = url
            raise
        return JSONResponse({"url": url, "name": key.repo_id, "id": key.repo_id})

    async def delete_repo(self, request: Request, params: dict[str, str]) -> Response:
        body = await self._json_body(request)
        name = body.get("name")
        identity = self._identity(request)
        if identity is None:
            raise HubError(401, "You must be authenticated to delete a repo")
        repo_type = body.get("type") or "model"
        if not isinstance(name, str) or repo_type not in REPO_TYPES:
            raise HubError(400, "Expected {name, organization?, type?}")
        key = RepoKey(repo_type, body.get("organization") or identity.user, name)
        self._writable(request, key)
        await run_in_threadpool(self.store.delete_repo, key)
        return JSONResponse({})

    async def repo_info(self, request: Request, params: dict[str, str]) -> Response:
        key = self._key(params)
        repo, _ = self._readable(request, key)
        commit = resolve_revision(repo, params.get("rev", DEFAULT_BRANCH))
        query = request.query_params
        if _flag(query.get("securityStatus")):
            raise not_supported("securityStatus")
        expand = query.getlist("expand") + query.getlist("expand[]")
        unknown = set(expand) - EXPANDABLE_PROPERTIES
        if unknown:
            raise HubError(
                400,
                f"Unsupported expand value(s) {sorted(unknown)}; supported: {sorted(EXPANDABLE_PROPERTIES)}",
            )
        blobs = _flag(query.get("blobs"))
        card = await run_in_threadpool(self._card_metadata, commit)
        siblings: list[dict[str, Any]] = []
        for path, entry in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": path}
            if blobs:
                sibling.update(size=entry.size, blobId=entry.oid)
                if entry.lfs:
                    sibling["lfs"] = {
                        "size": entry.size,
                        "sha256": entry.sha256,
                        "pointerSize": entry.pointer_size,
                    }
            siblings.append(sibling)
        info: dict[str, Any] = {
            "_id": repo.object_id,
            "id": key.repo_id,
            "author": key.namespace,
            "sha": commit.id,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": list(card["tags"]) if card and _is_str_list(card.get("tags")) else [],
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum({e.sha256: e.size for e in commit.files.values()}.values()),
        }
        if key.repo_type == "model":
            info["modelId"] = key.repo_id
            config = await run_in_threadpool(self._model_config, commit)
            if config is not None:
                info["config"] = config
        if card:
            info["cardData"] = jsonable(card)
            for field_name in ("library_name", "pipeline_tag", "model-index"):
                if field_name in card:
                    info[field_name] = jsonable(card[field_name])
        if expand:
            info = {k: v for k, v in info.items() if k in ("_id", "id") or k in expand}
        return JSONResponse(info)

    async def tree(self, request: Request, params: dict[str, str]) -> Response:
        key = self._key(params)
        repo, _ = self._readable(request, key)
        commit = resolve_revision(repo, params["rev"])
        base = params.get("path", "").strip("/")
        if base and base not in commit.dirs:
            raise entry_not_found(f"Folder '{base}' not found at revision {params['rev']}", commit.id)
        recursive = _flag(request.query_params.get("recursive"))
        expand = _flag(request.query_params.get("expand"))
        prefix = f"{base}/" if base else ""
        paths = [p for p in [*commit.dirs, *commit.files] if p and p.startswith(prefix)]
        if not recursive:
            paths = [p for p in paths if "/" not in p[len(prefix) :]]
        paths.sort(key=lambda p: (p not in commit.dirs, p))  # folders first, like the Hub
        items = [self._tree_item(repo, commit, p, expand=expand) for p in paths]
        return self._paginated(
            request,
            items,
            param="cursor",
            default_limit=TREE_PAGE_SIZE_EXPANDED if expand else TREE_PAGE_SIZE,
        )

    async def paths_info(self, request: Request, params: dict[str, str]) -> Response:
        key = self._key(params)
        repo, _ = self._readable(request, key)
        commit = resolve_revision(repo, params["rev"])
        if request.headers.get("content-type", "").startswith("application/json"):
            body = await self._json_body(request)
            paths, expand = body.get("paths", []), bool(body.get("expand", False))
        else:  # the client posts a urlencoded form (no multipart parser needed for that)
            form = parse_qs((await request.body()).decode("utf-8"), keep_blank_values=True)
            paths, expand = form.get("paths", []), _flag((form.get("expand") or [""])[-1])
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise HubError(400, "'paths' must be a list of strings")
        items = []
        for raw in paths:
            path = raw.strip("/")
            if path in commit.files or (path and path in commit.dirs):
                items.append(self._tree_item(repo, commit, path, expand=expand))
        return JSONResponse(items)

    async def refs(self, request: Request, params: dict[str, str]) -> Response:
        repo, _ = self._readable(request, self._key(params))

        def refs_of(kind: str, refs: Mapping[str, str]) -> list[dict[str, str]]:
            return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": c} for n, c in sorted(refs.items())]

        body: dict[str, Any] = {
            "branches": refs_of("heads", repo.branches),
            "tags": refs_of("tags", repo.tags),
            "converts": [],
        }
        if _flag(request.query_params.get("include_prs")):
            body["pullRequests"] = []  # this server has no pull requests
        return JSONResponse(body)

    async def commits(self, request: Request, params: dict[str, str]) -> Response:
        repo, _ = self._readable(request, self._key(params))
        head = resolve_revision(repo, params["rev"])
        if request.query_params.getlist("expand[]"):
            raise not_supported("expand[]=formatted on commits")
        items = [
            {
                "id": c.id,
                "title": c.title,
                "message": c.message,
                "authors": [{"user": c.author, "avatar": None}],
                "date": c.date,
                "parents": list(c.parents),
            }
            for c in history(repo, head)
        ]
        return self._paginated(request, items, param="p", default_limit=COMMITS_PAGE_SIZE)

    async def create_branch(self, request: Request, params: dict[str, str]) -> Response:
        key = self._key(params)
        self._writable(request, key)
        body = await self._json_body(request) if await request.body() else {}
        unsupported = set(body) - {"startingPoint"}
        if unsupported:
            raise not_supported(f"branch option(s) {sorted(unsupported)}")
        branch = params["branch"]
        self._check_ref_name(branch)
        start = body.get("startingPoint")
        if start is not None and not isinstance(start, str):
            raise HubError(400, "startingPoint must be a string")
        await run_in_threadpool(self.store.create_branch, key, branch, start)
        return JSONResponse({})

    async def delete_branch(self, request: Request, params: dict[str, str]) -> Response:
        key = self._key(params)
        self._writable(request, key)
        await run_in_threadpool(self.store.delete_branch, key, params["branch"])
        return JSONResponse({})

    async def create_tag(self, request: Request, params: dict[str, str]) -> Response:
        key = self._key(params)
        self._writable(request, key)
        body = await self._json_body(request)
        tag = body.get("tag")
        if not isinstance(tag, str):
            raise HubError(400, "Expected {tag: string, message?: string}")
        self._check_ref_name(tag)
        await run_in_threadpool(self.store.create_tag, key, tag, params["rev"])
        return JSONResponse({})

    async def delete_tag(self, request: Request, params: dict[str, str]) -> Response:
        key = self._key(params)
        self._writable(request, key)
        await run_in_threadpool(self.store.delete_tag, key, params["tag"])
        return JSONResponse({})

    @staticmethod
    def _check_ref_name(name: str) -> None:
        if not REF_NAME_RE.match(name) or ".." in name or name.endswith((".", "/", ".lock")) or "//" in name:
            raise HubError(400, f"Invalid ref name {name!r}")
        if COMMIT_ID_RE.match(name) or name.startswith("refs/"):
            raise HubError(400, f"Ref name {name!r} would be ambiguous with a commit id or a full ref")

    # -- endpoints: upload

    async def preupload(self, request: Request, params: dict[str, str]) -> Response:
        key = self._key(params)
        repo, _ = self._writable(request, key)
        commit = resolve_revision(repo, params["rev"])
        body = await self._json_body(request)
        files = body.get("files")
        if not isinstance(files, list):
            raise HubError(400, "Expected {files: [{path, sample, size}], gitIgnore?}")
        gitattributes = await run_in_threadpool(self._text_at, commit, ".gitattributes")
        gitignore = body.get("gitIgnore")
        if gitignore is None:
            gitignore = await run_in_threadpool(self._text_at, commit, ".gitignore")
        if not isinstance(gitignore, str):
            raise HubError(400, "gitIgnore must be a string")
        answers = []
        for item in files:
            if (
                not isinstance(item, dict)
                or not isinstance(item.get("path"), str)
                or not isinstance(item.get("size"), int)
            ):
                raise HubError(400, f"Bad preupload entry {item!r}")
            path = validate_repo_path(item["path"])
            try:
                sample = base64.b64decode(item.get("sample", ""), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise HubError(400, f"Bad base64 sample for {path}") from exc
            size: int = item["size"]
            lfs = lfs_tracked(gitattributes, path) or size >= LFS_SIZE_THRESHOLD or looks_binary(sample)
            answer: dict[str, Any] = {
                "path": item["path"],
                "uploadMode": "lfs" if lfs else "regular",
                "shouldIgnore": gitignored(gitignore, path),
            }
            existing = commit.files.get(path)
            if existing is not None:
                answer["oid"] = existing.etag
            answers.append(answer)
        return JSONResponse({"files": answers, "commitOid": commit.id})

    def _text_at(self, commit: Commit, path: str) -> str:
        entry = commit.files.get(path)
        return (self.store.read_small_text(entry) if entry else None) or ""

    async def lfs_batch(self, request: Request, params: dict[str, str]) -> Response:
        key = self._key(params)
        repo, _ = self._writable(request, key)
        body = await self._json_body(request)
        if body.get("operation") != "upload":
            raise not_supported(f"LFS batch operation {body.get('operation')!r} (only 'upload')")
        if "basic" not in body.get("transfers", ["basic"]):
            raise not_supported(f"LFS transfers {body.get('transfers')!r} (only 'basic')")
        if body.get("hash_algo", "sha256") != "sha256":
            raise not_supported(f"LFS hash_algo {body.get('hash_algo')!r}")
        objects = body.get("objects")
        if not isinstance(objects, list):
            raise HubError(400, "Expected objects: [{oid, size}]")
        base = self._base_url(request)
        answers = [self._batch_answer(repo, obj, base) for obj in objects]
        return JSONResponse(
            {"transfer": "basic", "objects": answers, "hash_algo": "sha256"},
            media_type="application/vnd.git-lfs+json",
        )

    def _batch_answer(self, repo: Repo, obj: Any, base: str) -> dict[str, Any]:
        """One object of the batch answer: an error, no actions (already stored), or upload + verify."""
        oid, size = (obj.get("oid"), obj.get("size")) if isinstance(obj, dict) else (None, None)
        if not isinstance(oid, str) or not SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
            error = {"code": 422, "message": "oid must be a sha256 hex digest and size a non-negative int"}
            return {"oid": str(oid), "size": size if isinstance(size, int) else -1, "error": error}
        stored = repo.lfs_objects.get(oid)
        if stored is not None and stored != size:
            return {
                "oid": oid,
                "size": size,
                "error": {"code": 422, "message": f"Object is stored with size {stored}"},
            }
        if stored is not None:
            return {"oid": oid, "size": size, "authenticated": True}
        upload = {
            "href": self._signed_upload_url(base, repo.key, oid, size),
            "expires_in": LFS_UPLOAD_URL_TTL_S,
        }
        verify = {"href": f"{base}/{repo.key.url_path}.git/info/lfs/objects/verify"}
        return {
            "oid": oid,
            "size": size,
            "authenticated": True,
            "actions": {"upload": upload, "verify": verify},
        }

    def _upload_signature(self, key: RepoKey, oid: str, size: int, expires: int) -> str:
        message = f"{key.repo_type}/{key.repo_id}/{oid}/{size}/{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()

    def _signed_upload_url(self, base: str, key: RepoKey, oid: str, size: int) -> str:
        # The client PUTs without its token (as to S3), so the URL carries its own authorization.
        expires = int(time.time()) + LFS_UPLOAD_URL_TTL_S
        sig = self._upload_signature(key, oid, size, expires)
        path = f"{key.repo_type}/{quote(key.namespace)}/{quote(key.name)}/{oid}"
        return f"{base}/_lfs-storage/{path}?size={size}&expires={expires}&sig={sig}"

    async def lfs_upload(self, request: Request, params: dict[str, str]) -> Response:
        key, oid = self._key(params), params["oid"]
        query = request.query_params
        try:
            size, expires = int(query["size"]), int(query["expires"])
        except (KeyError, ValueError) as exc:
            raise HubError(403, "Malformed upload URL") from exc
        if not hmac.compare_digest(query.get("sig", ""), self._upload_signature(key, oid, size, expires)):
            raise HubError(403, "Upload URL signature does not match")
        if expires < time.time():
            raise HubError(403, "Upload URL expired")
        if self.store.get(key) is None:
            raise repo_not_found(key.repo_id)
        tmp = self.store.blobs.temp_path()
        digest, received = hashlib.sha256(), 0
        try:
            with tmp.open("wb") as out:
                async for chunk in request.stream():
                    digest.update(chunk)
                    received += len(chunk)
                    out.write(chunk)
            if received != size:
                raise HubError(400, f"Uploaded {received} bytes, the batch request announced {size}")
            if digest.hexdigest() != oid:
                raise HubError(400, f"Uploaded content has sha256 {digest.hexdigest()}, expected {oid}")
            await run_in_threadpool(self.store.blobs.adopt, tmp, oid)
        finally:
            tmp.unlink(missing_ok=True)
        await run_in_threadpool(self.store.add_lfs_object, key, oid, size)
        return Response(status_code=200)

    async def lfs_verify(self, request: Request, params: dict[str, str]) -> Response:
        key = self._key(params)
        repo, _ = self._writable(request, key)
        body = await self._json_body(request)
        oid, size = body.get("oid"), body.get("size")
        stored = repo.lfs_objects.get(oid) if isinstance(oid, str) else None
        if stored is None:
            raise HubError(404, f"LFS object {oid} was not uploaded to {key.repo_id}")
        if stored != size:
            raise HubError(422, f"LFS object {oid} has size {stored}, not {size}")
        return JSONResponse({"success": True})

    async def commit(self, request: Request, params: dict[str, str]) -> Response:
        key = self._key(params)
        _, identity = self._writable(request, key)
        if _flag(request.query_params.get("create_pr")):
            raise not_supported("create_pr (pull requests)")
        if _flag(request.query_params.get("hot_reload")):
            raise not_supported("hot_reload")
        if not request.headers.get("content-type", "").startswith("application/x-ndjson"):
            raise not_supported("A commit payload other than application/x-ndjson")
        lines = [line for line in (await request.body()).splitlines() if line.strip()]
        try:
            items = [json.loads(line) for line in lines]
        except ValueError as exc:
            raise HubError(400, f"Commit payload is not valid NDJSON: {exc}") from exc
        if not items or not isinstance(items[0], dict) or items[0].get("key") != "header":
            raise HubError(400, "The first NDJSON line of a commit must be the header")
        header = items[0].get("value") or {}
        title, description = header.get("summary"), header.get("description", "")
        parent = header.get("parentCommit")
        if not isinstance(title, str) or not title.strip() or not isinstance(description, str):
            raise HubError(400, "The commit header needs a non-empty 'summary' (and a string 'description')")
        if parent is not None and (not isinstance(parent, str) or not SHORT_COMMIT_RE.match(parent.lower())):
            raise HubError(400, f"Invalid parentCommit {parent!r}")
        operations = await run_in_threadpool(self._parse_operations, items[1:], key.repo_type)
        commit = await run_in_threadpool(
            lambda: self.store.commit(
                key,
                branch=params["rev"],
                operations=operations,
                title=title.strip(),
                description=description,
                author=identity.user,
                parent_commit=parent,
            )
        )
        return JSONResponse(
            {
                "success": True,
                "commitOid": commit.id,
                "commitUrl": f"{self._base_url(request)}/{key.url_path}/commit/{commit.id}",
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    def _parse_operations(self, items: Sequence[Any], repo_type: str) -> list[Operation]:
        operations: list[Operation] = []
        for item in items:
            if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
                raise HubError(400, f"Bad commit line {item!r}")
            kind, value = item.get("key"), item["value"]
            path = validate_repo_path(value.get("path"))
            if kind == "file":
                operations.append(AddFile(path, self._regular_file(path, value, repo_type)))
            elif kind == "lfsFile":
                oid, size = value.get("oid"), value.get("size")
                if value.get("algo", "sha256") != "sha256" or not isinstance(oid, str) or not SHA256_RE.match(oid):
                    raise HubError(400, f"lfsFile {path} needs algo 'sha256' and a sha256 oid")
                if size is not None and not isinstance(size, int):
                    raise HubError(400, f"lfsFile {path} has a non-integer size")
                operations.append(AddLfsFile(path, oid, size))
            elif kind == "deletedFile":
                operations.append(DeleteFile(path))
            elif kind == "deletedFolder":
                operations.append(DeleteFolder(path))
            else:
                raise not_supported(f"Commit operation {kind!r}")
        return operations

    def _regular_file(self, path: str, value: Mapping[str, Any], repo_type: str) -> FileEntry:
        content, encoding = value.get("content"), value.get("encoding", "utf-8")
        if not isinstance(content, str):
            raise HubError(400, f"file {path} has no string 'content'")
        if encoding == "base64":
            try:
                data = base64.b64decode(content, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise HubError(400, f"file {path}: content is not valid base64") from exc
        elif encoding in ("utf-8", "utf8"):
            data = content.encode()
        else:
            raise not_supported(f"file encoding {encoding!r}")
        # The Hub rejects what preupload would have routed to LFS: large or binary content as a git blob.
        if len(data) >= LFS_SIZE_THRESHOLD or looks_binary(data[:512]):
            what = "files larger than 10 MiB" if len(data) >= LFS_SIZE_THRESHOLD else "binary files"
            raise HubError(
                400,
                f"Your push was rejected because it contains {what} ({path}). "
                "Upload them through LFS (preupload + the LFS batch API).",
            )
        if path == README:
            errors, _ = validate_card(data.decode("utf-8", "replace"), repo_type)
            if errors:
                raise HubError(400, "Invalid metadata in README.md.\n" + "\n".join(f"- {e}" for e in errors))
        self.store.blobs.put_bytes(data)
        return FileEntry.regular(data)

    # -- endpoints: download

    async def resolve(self, request: Request, params: dict[str, str]) -> Response:
        key = self._key(params)
        repo, _ = self._readable(request, key)
        commit = resolve_revision(repo, params["rev"])
        path = params["path"]
        entry = commit.files.get(path)
        if entry is None:
            raise entry_not_found(f"Entry not found: {path}", commit.id)
        headers = {
            "X-Repo-Commit": commit.id,
            "ETag": f'"{entry.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": mimetypes.guess_type(path)[0] or "application/octet-stream",
            "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}",
        }
        if entry.lfs:
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        start, end, status = 0, entry.size - 1, 200
        range_header = request.headers.get("range")
        if range_header is not None:
            start, end = parse_range(range_header, entry.size)
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
        length = max(end - start + 1, 0)
        headers["Content-Length"] = str(length)
        if request.method == "HEAD":
            return Response(status_code=status, headers=headers)
        blob = self.store.blobs.path(entry.sha256)
        return StreamingResponse(read_file_range(blob, start, length), status_code=status, headers=headers)


def validate_repo_path(path: Any) -> str:
    """The paths a commit may touch: relative, no '..' / '.' / empty segments, nothing under .git/."""
    if not isinstance(path, str) or not path.strip("/"):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    parts = path.strip("/").split("/")
    if any(part in ("", ".", "..") for part in parts) or ".git" in parts or "\\" in path or "\0" in path:
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return "/".join(parts)


def parse_range(header: str, size: int) -> tuple[int, int]:
    """One 'bytes=' range -> inclusive (start, end); 416 for what cannot be served."""
    match = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", header)
    unsatisfiable = {"Content-Range": f"bytes */{size}"}
    if match is None or (not match.group(1) and not match.group(2)):
        raise HubError(416, f"Unsupported Range header {header!r} (one 'bytes=' range only)", headers=unsatisfiable)
    first, last = match.groups()
    if not first:  # suffix range: the last N bytes
        start, end = max(size - int(last), 0), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    if start >= size or start > end:
        raise HubError(416, f"Range {header!r} not satisfiable for {size} bytes", headers=unsatisfiable)
    return start, end


def read_file_range(path: Path, start: int, length: int) -> Iterator[bytes]:
    with path.open("rb") as fh:
        fh.seek(start)
        remaining = length
        while remaining > 0:
            chunk = fh.read(min(CHUNK, remaining))
            if not chunk:
                raise OSError(f"blob {path} is shorter than its index says")
            remaining -= len(chunk)
            yield chunk


# ----------------------------------------------------------------------------------------------------
# CLI


def build_app(data_dir: Path, token_specs: Iterable[str]) -> HubApp:
    return HubApp(HubStore(data_dir), TokenRegistry(token_specs))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument(
        "--token",
        action="append",
        required=True,
        metavar="TOKEN=USER[:ORG1,ORG2]",
        help="repeat for more users",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(args.data_dir, args.token)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="off")


if __name__ == "__main__":
    main()
