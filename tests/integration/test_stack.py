"""`quant-release stack up|status|env|down`, the real CLI starting the real servers, used the way the README says.

One stack for the module (its start-up is the cost: about 30 s on 2 cores): `up` on free ports, the printed
exports used with boto3, MLflow's client and Prefect's API, `up` again, `status`, and `down` last, which
must leave no process of the stack behind. The bad-input tests start nothing and must leave nothing.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import stat
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from quant_release.stack import SERVICES, group_members
from tests.support.process import free_port
from tests.support.servers import NO_PHONE_HOME, find_executable

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _cli_env() -> dict[str, str]:
    """The caller's environment without anything that points at other servers."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("AWS_", "MLFLOW_", "PREFECT_", "QUANT_RELEASE_"))
    }
    return {**env, **NO_PHONE_HOME}


def stack_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [find_executable("quant-release"), "stack", *args],
        cwd=ROOT,
        env=_cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def parse_exports(stdout: str) -> dict[str, str]:
    exports = {}
    for line in stdout.splitlines():
        if line.startswith("export "):
            name, _, value = line.removeprefix("export ").partition("=")
            (exports[name],) = shlex.split(value)
    return exports


def pids_in(state_dir: Path) -> dict[str, int]:
    return {name: int((state_dir / f"{name}.pid").read_text()) for name in SERVICES}


def processes_using(path: Path) -> list[int]:
    """Live processes whose command line names `path`: whatever the stack started there, however it forked."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(path) in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def _kill_leftovers(state_dir: Path) -> None:
    for pid in processes_using(state_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass(frozen=True)
class Stack:
    state_dir: Path
    s3_port: int
    mlflow_port: int
    prefect_port: int
    up: subprocess.CompletedProcess[str]
    seconds: float

    @property
    def exports(self) -> dict[str, str]:
        return parse_exports(self.up.stdout)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    state_dir = tmp_path_factory.mktemp("stack") / "state"
    ports = {"s3": free_port(), "mlflow": free_port(), "prefect": free_port()}
    started = time.monotonic()
    up = stack_cli("up", "--dir", str(state_dir), *(f"--{name}-port={port}" for name, port in ports.items()))
    seconds = time.monotonic() - started
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield Stack(state_dir, ports["s3"], ports["mlflow"], ports["prefect"], up, seconds)
    finally:
        stack_cli("down", "--dir", str(state_dir), "--timeout", "10")
        _kill_leftovers(state_dir)


def test_up_prints_the_urls_and_the_environment_to_export(stack: Stack) -> None:
    exports = stack.exports
    assert exports["PREFECT_API_URL"] == f"http://127.0.0.1:{stack.prefect_port}/api"
    assert exports["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{stack.mlflow_port}"
    assert exports["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{stack.s3_port}"
    assert exports["QUANT_RELEASE_ARTIFACT_URI"] == "s3://quant-release/artifacts"
    assert exports["AWS_ACCESS_KEY_ID"] and len(exports["AWS_SECRET_ACCESS_KEY"]) >= 32
    table = [line for line in stack.up.stdout.splitlines() if line and not line.startswith(("export ", "#"))]
    assert table[0].split()[:2] == ["s3", f"http://127.0.0.1:{stack.s3_port}"]
    assert table[1].split()[:2] == ["mlflow", f"http://127.0.0.1:{stack.mlflow_port}"]
    assert table[2].split()[:2] == ["prefect", f"http://127.0.0.1:{stack.prefect_port}"]
    # The generated key pair is the owner's only.
    credentials = stack.state_dir / "s3-credentials.json"
    assert exports["AWS_SECRET_ACCESS_KEY"] in credentials.read_text()
    assert stat.S_IMODE(credentials.stat().st_mode) == 0o600
    assert stat.S_IMODE((stack.state_dir / "seaweedfs" / "s3.json").stat().st_mode) == 0o600
    for name in SERVICES:
        assert (stack.state_dir / f"{name}.log").is_file()
    print(f"stack up took {stack.seconds:.1f} s")


def test_status_shows_each_service_healthy_with_its_pid(stack: Stack) -> None:
    result = stack_cli("status", "--dir", str(stack.state_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    pids = pids_in(stack.state_dir)
    lines = result.stdout.splitlines()
    assert len(lines) == len(SERVICES)
    for name, line in zip(SERVICES, lines, strict=True):
        assert line.split()[0] == name and line.endswith("healthy"), line
        assert f"pid {pids[name]} " in line
        # Detached: each server leads a session of its own, so it outlives the CLI that started it.
        assert os.getsid(pids[name]) == pids[name]


def test_the_printed_environment_reaches_every_service(stack: Stack) -> None:
    import boto3
    from mlflow.tracking import MlflowClient

    exports = stack.exports
    s3 = boto3.session.Session().client(
        "s3",
        endpoint_url=exports["AWS_ENDPOINT_URL"],
        aws_access_key_id=exports["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=exports["AWS_SECRET_ACCESS_KEY"],
        region_name=exports["AWS_DEFAULT_REGION"],
    )
    bucket, prefix = exports["QUANT_RELEASE_ARTIFACT_URI"].removeprefix("s3://").split("/", 1)
    key = f"{prefix}/probe-{uuid.uuid4().hex}.txt"
    s3.put_object(Bucket=bucket, Key=key, Body=b"stack probe")
    listed = [item["Key"] for item in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    assert key in listed
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b"stack probe"

    # MLflow: the tracking API, and an artifact that the server stores in the stack's bucket.
    client = MlflowClient(tracking_uri=exports["MLFLOW_TRACKING_URI"])
    experiment_id = client.create_experiment(f"stack-{uuid.uuid4().hex[:8]}")
    assert experiment_id in {experiment.experiment_id for experiment in client.search_experiments()}
    run = client.create_run(experiment_id)
    client.log_text(run.info.run_id, "hello", "probe.txt")
    stored = [item["Key"] for item in s3.list_objects_v2(Bucket=bucket, Prefix="mlflow/").get("Contents", [])]
    assert any(name.endswith(f"{run.info.run_id}/artifacts/probe.txt") for name in stored), stored

    with urllib.request.urlopen(f"{exports['PREFECT_API_URL']}/health", timeout=10) as response:
        assert response.status == 200
        assert response.read().strip() == b"true"
    # Both UIs are served: the README sends people there.
    for ui in (f"http://127.0.0.1:{stack.prefect_port}/", exports["MLFLOW_TRACKING_URI"] + "/"):
        with urllib.request.urlopen(ui, timeout=10) as response:
            assert response.headers.get_content_type() == "text/html"


def _proc_net_address(hex_address: str) -> str:
    """/proc/net/tcp{,6} print an address as 32-bit words in host (little-endian) byte order."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, words)


def _listening_sockets(pids: list[int]) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state that one of `pids` holds, from /proc."""
    inodes = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    target = str(fd.readlink())
                    if target.startswith("socket:["):
                        inodes.add(target.removeprefix("socket:[").removesuffix("]"))
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                address, port = fields[1].split(":")
                found.append((_proc_net_address(address), int(port, 16)))
    return found


def test_every_server_listens_on_loopback_only(stack: Stack) -> None:
    members = [pid for leader in pids_in(stack.state_dir).values() for pid in group_members(leader)]
    listening = _listening_sockets(members)
    ports = {port for _, port in listening}
    assert {stack.s3_port, stack.mlflow_port, stack.prefect_port} <= ports
    assert {address for address, _ in listening} == {"127.0.0.1"}, listening


def test_up_again_finds_the_stack_running_and_prints_the_same_environment(stack: Stack) -> None:
    pids = pids_in(stack.state_dir)
    again = stack_cli("up", "--dir", str(stack.state_dir))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already running" in again.stdout
    assert parse_exports(again.stdout) == stack.exports
    assert pids_in(stack.state_dir) == pids
    env = stack_cli("env", "--dir", str(stack.state_dir))
    assert env.returncode == 0 and parse_exports(env.stdout) == stack.exports


def test_a_port_in_use_is_refused_in_one_line_and_nothing_starts(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = stack_cli(
            "up", "--dir", str(state_dir), f"--s3-port={free_port()}", f"--mlflow-port={port}",
            f"--prefect-port={free_port()}",
        )  # fmt: skip
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        f"quant-release: error: port {port} on 127.0.0.1 (mlflow) is in use by another program; "
        "choose another with --mlflow-port"
    ]
    assert result.stdout == ""
    assert not list(state_dir.glob("*.pid")) and not (state_dir / "stack.json").exists()
    assert processes_using(state_dir) == []
    status = stack_cli("status", "--dir", str(state_dir))
    assert status.returncode == 1 and status.stderr.startswith("quant-release: error: no stack is running")


def test_a_start_that_times_out_stops_what_it_started_and_names_the_log(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    # No server answers within a tenth of a second: the health checks fail, as with a server that hangs.
    result = stack_cli(
        "up", "--dir", str(state_dir), f"--s3-port={free_port()}", f"--mlflow-port={free_port()}",
        f"--prefect-port={free_port()}", "--timeout", "0.1",
    )  # fmt: skip
    try:
        assert result.returncode == 1, result.stdout + result.stderr
        (line,) = result.stderr.splitlines()
        assert line.startswith("quant-release: error: seaweedfs did not answer"), line
        assert line.endswith(f"within 0.1 s; see {state_dir / 'seaweedfs.log'}"), line
        assert processes_using(state_dir) == []
        assert not list(state_dir.glob("*.pid")) and not (state_dir / "stack.json").exists()
    finally:
        _kill_leftovers(state_dir)


def test_down_stops_every_process_keeps_the_data_and_status_then_fails(stack: Stack) -> None:
    pids = pids_in(stack.state_dir)
    forked = {pid for pid in processes_using(stack.state_dir) if pid not in pids.values()}
    result = stack_cli("down", "--dir", str(stack.state_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith("stopped: prefect, mlflow, seaweedfs")
    for name, pid in pids.items():
        assert group_members(pid) == [], f"{name} (process group {pid}) still has processes"
    assert processes_using(stack.state_dir) == [], f"left running (forked: {sorted(forked)})"
    assert not list(stack.state_dir.glob("*.pid"))
    # The data stays for the next `up`.
    assert (stack.state_dir / "mlflow" / "mlflow.db").is_file()
    assert (stack.state_dir / "prefect" / "prefect.db").is_file()
    assert (stack.state_dir / "s3-credentials.json").is_file()
    status = stack_cli("status", "--dir", str(stack.state_dir))
    assert status.returncode == 1, status.stdout + status.stderr
    again = stack_cli("down", "--dir", str(stack.state_dir))
    assert again.returncode == 0 and "nothing was running" in again.stdout
    purged = stack_cli("down", "--dir", str(stack.state_dir), "--purge")
    assert purged.returncode == 0 and not stack.state_dir.exists()
