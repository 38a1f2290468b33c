"""Session fixtures that run REAL servers on 127.0.0.1: SeaweedFS (S3), an MLflow tracking server, Prefect.

Each starts once per test session as a child process (tests/support/process.py), on free ports, with
its data and log under the session's tmp dir, and is stopped by PID at the end. Nothing listens beyond
loopback, nothing phones home, and nothing touches ~/.prefect, ~/.aws or ~/.mlflow.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.support.process import ServerProcess, free_port, http_ok, running_server, start_server

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

# Loopback servers that never reach out: the variables the fixtures' children and clients get.
NO_PHONE_HOME = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


def find_executable(name: str) -> str:
    """`name` from this interpreter's venv (where the test extras install it), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found next to {sys.executable} or on PATH: run infra/bootstrap.sh --test")
    return found


GRPC_PORT_OFFSET = 10000


def free_port_with_offset(offset: int, attempts: int = 200) -> int:
    """A free loopback port P with P + offset free too, for servers that derive one port from the other."""
    for _ in range(attempts):
        port = free_port()
        if port + offset > 65535:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port + offset))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free loopback port P with P+{offset} free after {attempts} tries")


def process_tree_rss(pid: int) -> int:
    """Resident bytes of `pid` and all its descendants (servers that fork workers), from /proc."""
    children: dict[int, list[int]] = {}
    rss_pages: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            statm = (entry / "statm").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
        rss_pages[int(entry.name)] = int(statm.split()[1])
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += rss_pages.get(current, 0)
        todo.extend(children.get(current, []))
    return total * os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------------------------- S3


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    data_dir: Path
    server: ServerProcess = field(repr=False)
    # How it was started, so a fault test can kill it and start it again on the same ports and data.
    argv: tuple[str, ...] = field(default=(), repr=False)
    base: Path | None = field(default=None, repr=False)

    def env(self) -> dict[str, str]:
        """AWS_* variables that point boto3 (and anything built on it) at this server.

        boto3 >= 1.36's default CRC32 request/response checksums work with SeaweedFS 4.x (checked), so
        AWS_REQUEST_CHECKSUM_CALCULATION is left at its default.
        """
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            # Keep a developer's ~/.aws profile, session token or other endpoint out of the tests.
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, *, access_key: str | None = None, secret_key: str | None = None) -> S3Client:
        """A boto3 S3 client for this server (with other credentials, to test refusals)."""
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=access_key or self.access_key,
            aws_secret_access_key=secret_key or self.secret_key,
            region_name=self.region,
            config=Config(connect_timeout=5, read_timeout=60, retries={"mode": "standard", "max_attempts": 2}),
        )

    def rss_bytes(self) -> int:
        return process_tree_rss(self.server.pid)


def _s3_ready(endpoint_url: str, access_key: str, secret_key: str) -> bool:
    # /healthz answers before the filer behind the gateway is up: only a signed call proves readiness.
    if not http_ok(f"{endpoint_url}/healthz", timeout=1.0):
        return False
    import boto3
    from botocore.config import Config

    client = boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1}),
    )
    try:
        client.list_buckets()
    except Exception:
        return False
    return True


@contextlib.contextmanager
def seaweedfs(
    base: Path, *, access_key: str = "quant-release-test", secret_key: str | None = None, region: str = "us-east-1"
) -> Iterator[S3Server]:
    """Run SeaweedFS `weed mini` (master, volume, filer, S3 gateway in one process) under `base`."""
    secret_key = secret_key or uuid.uuid4().hex
    data_dir = base / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    config = base / "s3.json"
    config.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "quant-release-test",
                        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    }
                ]
            }
        )
    )
    s3_port, admin_port = free_port(), free_port_with_offset(GRPC_PORT_OFFSET)
    ports = {
        "s3.port": s3_port,
        "s3.port.grpc": free_port(),
        "master.port": free_port(),
        "master.port.grpc": free_port(),
        "volume.port": free_port(),
        "volume.port.grpc": free_port(),
        "filer.port": free_port(),
        "filer.port.grpc": free_port(),
        # The admin server listens even with -admin.ui=false (on 23646/33646 by default): move it too.
        # Its plugin worker dials admin.port + 10000 whatever -admin.port.grpc says, so keep that offset.
        "admin.port": admin_port,
        "admin.port.grpc": admin_port + GRPC_PORT_OFFSET,
    }
    argv = [
        find_executable("weed"),
        # Global flags, before the command: glog otherwise writes weed.<host>.log.* files into /tmp, and
        # config_dir keeps a developer's ~/.seaweedfs/*.toml out.
        "-logtostderr",
        f"-config_dir={base}",
        "mini",
        f"-dir={data_dir}",
        # Without both, weed binds 0.0.0.0 and advertises a non-loopback address.
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config}",
        # Default unix sockets go to /tmp/seaweedfs-*-<port>.sock and outlive the server.
        f"-s3.localSocket={base / 's3.sock'}",
        f"-filer.localSocket={base / 'filer.sock'}",
        *(f"-{name}={port}" for name, port in ports.items()),
    ]
    endpoint_url = f"http://127.0.0.1:{s3_port}"
    with running_server(
        "seaweedfs",
        argv,
        ready=lambda: _s3_ready(endpoint_url, access_key, secret_key),
        log_dir=base,
        # Go's heap otherwise grows to the machine's size under a multipart upload.
        env={"GOMEMLIMIT": "256MiB"},
        cwd=base,
        timeout=60,
    ) as server:
        yield S3Server(
            endpoint_url=endpoint_url,
            access_key=access_key,
            secret_key=secret_key,
            region=region,
            data_dir=data_dir,
            server=server,
            argv=tuple(argv),
            base=base,
        )


def restart_seaweedfs(s3: S3Server) -> ServerProcess:
    """Start a killed `seaweedfs(...)` server again, same ports and data dir; the caller stops it."""
    assert s3.base is not None and s3.argv, "not started by seaweedfs()"
    return start_server(
        "seaweedfs-restarted",
        s3.argv,
        ready=lambda: _s3_ready(s3.endpoint_url, s3.access_key, s3.secret_key),
        log_dir=s3.base,
        env={"GOMEMLIMIT": "256MiB"},
        cwd=s3.base,
        timeout=60,
    )


def create_bucket(s3: S3Server, stem: str = "test") -> str:
    name = f"{stem}-{uuid.uuid4().hex[:12]}"
    s3.client().create_bucket(Bucket=name)
    return name


def delete_bucket(s3: S3Server, name: str) -> None:
    client = s3.client()
    with contextlib.suppress(Exception):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", []) if "Key" in obj]
            if keys:
                client.delete_objects(Bucket=name, Delete={"Objects": keys})  # type: ignore[typeddict-item]
        client.delete_bucket(Bucket=name)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A fresh, empty bucket for one test, removed afterwards."""
    name = create_bucket(s3_server)
    yield name
    delete_bucket(s3_server, name)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process's environment pointed at the test S3 server (for code that builds its own client)."""
    env = s3_server.env()
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


# ------------------------------------------------------------------------------------------ MLflow


@dataclass(frozen=True)
class MlflowServer:
    tracking_uri: str
    artifact_bucket: str
    artifact_prefix: str
    s3: S3Server = field(repr=False)
    server: ServerProcess = field(repr=False)

    @property
    def artifact_root(self) -> str:
        return f"s3://{self.artifact_bucket}/{self.artifact_prefix}"

    def env(self) -> dict[str, str]:
        """What a client process needs: the tracking URI (artifacts go through the server's proxy)."""
        return {"MLFLOW_TRACKING_URI": self.tracking_uri, **NO_PHONE_HOME}

    def rss_bytes(self) -> int:
        return process_tree_rss(self.server.pid)


def mlflow_argv(port: int, backend_db: Path, artifacts_destination: str) -> list[str]:
    """`mlflow server` on 127.0.0.1:`port`, one worker, a sqlite backend store, proxied artifacts."""
    return [
        find_executable("mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{backend_db}",
        "--artifacts-destination",
        artifacts_destination,
    ]


# Otherwise the server forks a huey consumer with 7 job workers (~2 GB).
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **NO_PHONE_HOME}


def start_local_mlflow(name: str, base: Path, port: int) -> ServerProcess:
    """An MLflow server of one test's own (its store and artifacts under `base`), which the test may stop and
    start again on the same port and store; the caller stops it."""
    return start_server(
        name,
        mlflow_argv(port, base / "mlflow.db", (base / "artifacts").as_uri()),
        ready=lambda: http_ok(f"http://127.0.0.1:{port}/health"),
        log_dir=base,
        env=MLFLOW_SERVER_ENV,
        cwd=base,
        timeout=90,
    )


@pytest.fixture(scope="session")
def mlflow_server(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    base = tmp_path_factory.mktemp("mlflow")
    bucket = create_bucket(s3_server, "mlflow")
    port = free_port()
    argv = mlflow_argv(port, base / "mlflow.db", f"s3://{bucket}/mlartifacts")
    env = {
        **s3_server.env(),
        # MLflow's S3 artifact repository reads its endpoint from here, not from AWS_ENDPOINT_URL.
        "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint_url,
        **MLFLOW_SERVER_ENV,
    }
    tracking_uri = f"http://127.0.0.1:{port}"
    with running_server(
        "mlflow",
        argv,
        ready=lambda: http_ok(f"{tracking_uri}/health"),
        log_dir=base,
        env=env,
        cwd=base,
        timeout=90,
    ) as server:
        yield MlflowServer(
            tracking_uri=tracking_uri,
            artifact_bucket=bucket,
            artifact_prefix="mlartifacts",
            s3=s3_server,
            server=server,
        )


# ----------------------------------------------------------------------------------------- Prefect


@dataclass(frozen=True)
class PrefectServer:
    api_url: str
    home: Path
    client_home: Path
    server: ServerProcess = field(repr=False)

    def env(self) -> dict[str, str]:
        """For a client process: this server, and a PREFECT_HOME of its own (profiles, local storage)."""
        return {
            "PREFECT_API_URL": self.api_url,
            "PREFECT_HOME": str(self.client_home),
            "PREFECT_PROFILES_PATH": str(self.client_home / "profiles.toml"),
            **NO_PHONE_HOME,
        }

    def rss_bytes(self) -> int:
        return process_tree_rss(self.server.pid)


def prefect_server_env(home: Path, port: int) -> dict[str, Any]:
    return {
        "PREFECT_HOME": str(home),
        "PREFECT_PROFILES_PATH": str(home / "profiles.toml"),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        # Without it an analytics call at start-up also logs "database is locked".
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # No browser here: skip building and serving the UI bundle.
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        # A PREFECT_API_URL inherited from the caller must not point the server elsewhere.
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "DO_NOT_TRACK": "true",
    }


@contextlib.contextmanager
def prefect_at(base: Path, timeout: float = 90) -> Iterator[PrefectServer]:
    """A Prefect server on a free loopback port whose database, log and homes are all under `base`."""
    home, client_home = base / "server-home", base / "client-home"
    home.mkdir(parents=True)
    client_home.mkdir()
    port = free_port()
    argv = [find_executable("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    api_url = f"http://127.0.0.1:{port}/api"
    with running_server(
        "prefect",
        argv,
        ready=lambda: http_ok(f"{api_url}/health"),
        log_dir=base,
        env=prefect_server_env(home, port),
        cwd=base,
        timeout=timeout,
    ) as server:
        yield PrefectServer(api_url=api_url, home=home, client_home=client_home, server=server)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    with prefect_at(tmp_path_factory.mktemp("prefect")) as server:
        yield server
