"""Where a run's artifacts live: a local directory or an S3 bucket, behind one small interface.

`open_store(uri)` validates the URI up front; `check_access()` proves the credentials and the bucket
work before any heavy stage starts, so a typo fails a run in seconds, not after an hour of GPU time.

A directory upload writes `manifest.json` (path, size, sha256 of every file) as its LAST object: a
prefix with a manifest is a complete upload, one without is partial, and whoever fetches it can check
every file against it. Error messages name the bucket and endpoint, never a credential.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel

from quant_release.atomic import PARTIAL_PREFIX, PARTIAL_SUFFIX, atomic_path
from quant_release.errors import ConfigError, QuantReleaseError, redact
from quant_release.hashing import FileDigest, iter_files, sha256_file

if TYPE_CHECKING:
    from boto3.s3.transfer import TransferConfig
    from mypy_boto3_s3 import S3Client

MANIFEST_NAME = "manifest.json"

# Multipart above 16 MiB in 16 MiB parts: a multi-GB safetensors file goes up in parallel parts that
# are retried one by one; s3transfer raises the part size itself where 10,000 parts would not suffice.
MULTIPART_THRESHOLD = 16 * 1024 * 1024
MULTIPART_CHUNKSIZE = 16 * 1024 * 1024
# Transfers are network-bound; a few threads fill the pipe without starving a 2-core host.
MAX_CONCURRENCY = 4

_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_ACCESS_DENIED_CODES = {
    "403",
    "AccessDenied",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "InvalidClientTokenId",
    "AllAccessDisabled",
}


class ArtifactError(QuantReleaseError):
    """A transfer to or from the artifact store failed."""


class Manifest(BaseModel):
    """The list of files of one directory upload, written after all of them."""

    version: int = 1
    files: list[FileDigest]


def check_key(key: str) -> str:
    """Return `key` if it is a relative POSIX key without empty, `.` or `..` parts, else raise ValueError.

    Keys become paths under a LocalStore's root: this is what keeps every write inside it.
    """
    parts = key.split("/")
    if not key or "\\" in key or "\0" in key or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid artifact key {key!r}: use a relative path like 'dir/file.bin'")
    return key


def _join(prefix: str, key: str) -> str:
    if not key:
        return prefix
    check_key(key)
    return f"{prefix}/{key}" if prefix else key


def _fsync(path: Path) -> None:
    # Data on disk before the rename makes it visible: a crash cannot leave a complete-looking empty file.
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


class ArtifactStore(ABC):
    """A root (a directory or an S3 prefix) holding objects under relative POSIX keys."""

    @property
    @abstractmethod
    def uri(self) -> str:
        """The root, in the form `open_store` accepts."""

    @abstractmethod
    def child(self, prefix: str) -> ArtifactStore:
        """A store rooted at `prefix` under this one (sharing its connection)."""

    @abstractmethod
    def upload_file(self, local: str | os.PathLike[str], key: str) -> str:
        """Copy one local file to `key`; returns the object's URI."""

    @abstractmethod
    def check_access(self) -> None:
        """A cheap call proving the store can be used; raises ConfigError saying what to fix."""

    @abstractmethod
    def _put_bytes(self, key: str, data: bytes) -> None: ...

    @abstractmethod
    def _delete(self, key: str) -> None:
        """Remove `key` if it exists."""

    def upload_dir(self, local_dir: str | os.PathLike[str], key_prefix: str = "") -> Manifest:
        """Upload every file under `local_dir` to `key_prefix/`, then `key_prefix/manifest.json` last."""
        root = Path(local_dir)
        files = iter_files(root)
        if any(p.relative_to(root).as_posix() == MANIFEST_NAME for p in files):
            raise ArtifactError(f"{root} contains {MANIFEST_NAME}, a name reserved for the upload manifest")
        manifest_key = _join(key_prefix, MANIFEST_NAME)
        # An older manifest here would vouch for files this upload is about to overwrite: drop it first,
        # so the prefix reads as partial until the new one lands.
        self._delete(manifest_key)
        entries: list[FileDigest] = []
        for path in files:
            rel = path.relative_to(root).as_posix()
            # Hash what is uploaded, right before the upload, so the manifest describes these bytes.
            entries.append(FileDigest(path=rel, size=path.stat().st_size, sha256=sha256_file(path)))
            self.upload_file(path, _join(key_prefix, rel))
        manifest = Manifest(files=entries)
        self._put_bytes(manifest_key, manifest.model_dump_json(indent=2).encode("utf-8"))
        return manifest


class LocalStore(ArtifactStore):
    """A directory; every write goes to a temp file first and is renamed into place."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().resolve()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    @property
    def uri(self) -> str:
        return str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def child(self, prefix: str) -> LocalStore:
        return LocalStore(self._path(prefix))

    def upload_file(self, local: str | os.PathLike[str], key: str) -> str:
        final = self._path(key)
        with atomic_path(final) as tmp:
            shutil.copyfile(local, tmp)
            _fsync(tmp)
        return str(final)

    def check_access(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=self.root, prefix=PARTIAL_PREFIX, suffix=PARTIAL_SUFFIX)
            os.close(fd)
            Path(name).unlink()
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise ConfigError(f"artifact directory {self.root} is not writable: {reason}") from exc

    def _put_bytes(self, key: str, data: bytes) -> None:
        with atomic_path(self._path(key)) as tmp:
            tmp.write_bytes(data)
            _fsync(tmp)

    def _delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()


def _error_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError (or of one that boto3 wrapped), else None."""
    from botocore.exceptions import ClientError

    for candidate in (exc, exc.__cause__, exc.__context__):
        if isinstance(candidate, ClientError):
            error: dict[str, Any] = dict(candidate.response.get("Error", {}))
            code = error.get("Code")
            status = candidate.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return str(code or status or "")
    return None


class S3Store(ArtifactStore):
    """A prefix in an S3 bucket. Endpoint, region and credentials come from boto3's own lookup
    (AWS_ENDPOINT_URL[_S3], AWS_DEFAULT_REGION, AWS_ACCESS_KEY_ID/..., AWS_PROFILE, ~/.aws)."""

    def __init__(self, bucket: str, prefix: str = "", *, client: S3Client | None = None) -> None:
        if not _BUCKET_NAME.match(bucket):
            raise ConfigError(f"invalid S3 bucket name {bucket!r} (3-63 lowercase letters, digits, '.', '-')")
        if prefix:
            check_key(prefix)
        self.bucket = bucket
        self.prefix = prefix
        self._client = client

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r})"

    @property
    def client(self) -> S3Client:
        # Created on first use and handed to children: one connection pool per store tree.
        if self._client is None:
            import boto3

            from quant_release.netlimits import s3_config

            # Time limits and retries from the settings (quant_release/netlimits.py).
            self._client = boto3.session.Session().client("s3", config=s3_config(MAX_CONCURRENCY * 2))
        return self._client

    @property
    def endpoint(self) -> str:
        return str(self.client.meta.endpoint_url)

    def _transfer_config(self) -> TransferConfig:
        from boto3.s3.transfer import TransferConfig

        return TransferConfig(
            multipart_threshold=MULTIPART_THRESHOLD,
            multipart_chunksize=MULTIPART_CHUNKSIZE,
            max_concurrency=MAX_CONCURRENCY,
        )

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _key(self, key: str) -> str:
        return _join(self.prefix, check_key(key))

    def child(self, prefix: str) -> S3Store:
        return S3Store(self.bucket, self._key(prefix), client=self.client)

    def _fail(self, exc: Exception, doing: str) -> QuantReleaseError:
        """Turn a boto3 error into one line that says what to fix, without any credential in it."""
        from botocore.exceptions import (
            ConnectionError as BotoConnectionError,
        )
        from botocore.exceptions import (
            HTTPClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        target = f"s3://{self.bucket}"
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return ConfigError(
                f"no usable AWS credentials for {target} "
                "(set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
            )
        if isinstance(exc, (BotoConnectionError, HTTPClientError)):
            # Mid-transfer this may be a passing outage, so not a ConfigError; check_access makes it one.
            return ArtifactError(
                f"cannot reach the S3 endpoint {self.endpoint} for {target} (check AWS_ENDPOINT_URL): {exc}"
            )
        code = _error_code(exc)
        if code in _ACCESS_DENIED_CODES:
            return ConfigError(
                f"S3 access denied for {target} at {self.endpoint} ({code}; check AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN or AWS_PROFILE, and the bucket policy)"
            )
        if code == "NoSuchBucket":
            return ConfigError(f"S3 bucket {self.bucket!r} does not exist at {self.endpoint}")
        return ArtifactError(f"S3 {doing} failed: {exc}")

    def upload_file(self, local: str | os.PathLike[str], key: str) -> str:
        full = self._key(key)
        try:
            self.client.upload_file(os.fspath(local), self.bucket, full, Config=self._transfer_config())
        except (OSError, ValueError):
            raise
        except Exception as exc:
            raise self._fail(exc, f"upload of {local} to s3://{self.bucket}/{full}") from exc
        return f"s3://{self.bucket}/{full}"

    def check_access(self) -> None:
        # One LIST of at most one key: needs valid credentials, an existing bucket and read access,
        # and costs one request.
        base = f"{self.prefix}/" if self.prefix else ""
        try:
            self.client.list_objects_v2(Bucket=self.bucket, Prefix=base, MaxKeys=1)
        except Exception as exc:
            failure = self._fail(exc, f"access check of {self.uri}")
            # Whatever stops this one request stops the run: report it as a setup problem.
            raise (failure if isinstance(failure, ConfigError) else ConfigError(str(failure))) from exc

    def _put_bytes(self, key: str, data: bytes) -> None:
        full = self._key(key)
        try:
            self.client.put_object(Bucket=self.bucket, Key=full, Body=data)
        except Exception as exc:
            raise self._fail(exc, f"upload of s3://{self.bucket}/{full}") from exc

    def _delete(self, key: str) -> None:
        full = self._key(key)
        try:
            # S3 DELETE of a missing key succeeds: no existence check needed.
            self.client.delete_object(Bucket=self.bucket, Key=full)
        except Exception as exc:
            raise self._fail(exc, f"delete of s3://{self.bucket}/{full}") from exc


def open_store(uri: str) -> ArtifactStore:
    """`s3://BUCKET[/PREFIX]` -> S3Store; a path or `file://` URI -> LocalStore; else ConfigError."""
    if not uri or not uri.strip():
        raise ConfigError("artifact URI is empty: use s3://BUCKET/PREFIX or a directory")
    parts = urlsplit(uri)
    scheme = parts.scheme.lower()
    # A one-letter scheme is a Windows drive (C:\...), i.e. a path.
    if not scheme or len(scheme) == 1:
        return LocalStore(uri)
    if "@" in parts.netloc:
        raise ConfigError(f"artifact URI {redact(uri)} carries credentials: put them in the AWS_* environment instead")
    if parts.query or parts.fragment:
        raise ConfigError(f"artifact URI {uri} must not have a query or fragment")
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ConfigError(f"file URI {uri} names a remote host; use file:///absolute/path")
        return LocalStore(unquote(parts.path))
    if scheme == "s3":
        if not parts.netloc:
            raise ConfigError(f"S3 URI {uri} has no bucket: use s3://BUCKET/PREFIX")
        prefix = parts.path.strip("/")
        if prefix:
            try:
                check_key(prefix)
            except ValueError as exc:
                raise ConfigError(f"S3 URI {uri} has an invalid prefix: {exc}") from exc
        return S3Store(parts.netloc, prefix)
    raise ConfigError(
        f"unsupported artifact URI scheme '{scheme}://' in {uri}: use s3://BUCKET/PREFIX or a local directory"
    )
