"""How `stack down` finds and stops what `stack up` started, with real processes (no servers): a process
group whose leader died still has its children stopped, and a pid that now belongs to another process is
left alone."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from quant_release.stack import (
    SERVICES,
    Ports,
    ProcessRecord,
    StackState,
    down,
    group_members,
    process_start_ticks,
    status,
)


def _record(process: subprocess.Popen[bytes]) -> ProcessRecord:
    return ProcessRecord(pid=process.pid, start_ticks=process_start_ticks(process.pid))


def _write_state(state_dir: Path, records: dict[str, ProcessRecord]) -> None:
    state_dir.mkdir(exist_ok=True)
    state = StackState(ports=Ports(1, 2, 3), bucket="b", processes=records)
    (state_dir / "stack.json").write_text(state.to_json())
    for name, record in records.items():
        (state_dir / f"{name}.pid").write_text(f"{record.pid}\n")


def test_down_stops_the_children_of_a_leader_that_died(tmp_path: Path) -> None:
    # A server that forked workers and then crashed: the workers keep running in its process group.
    leader = subprocess.Popen(["bash", "-c", "sleep 300 & sleep 300 & wait"], start_new_session=True)
    record = _record(leader)
    deadline = time.monotonic() + 10
    while len(group_members(leader.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    children = [pid for pid in group_members(leader.pid) if pid != leader.pid]
    assert len(children) == 2
    try:
        os.kill(leader.pid, signal.SIGKILL)
        leader.wait()
        assert sorted(group_members(leader.pid)) == sorted(children)
        _write_state(tmp_path, {"mlflow": record})
        assert down(tmp_path, timeout=5) == ["mlflow"]
        assert group_members(leader.pid) == []
        assert not (tmp_path / "mlflow.pid").exists() and not (tmp_path / "stack.json").exists()
    finally:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_down_leaves_a_process_that_only_shares_the_recorded_pid_alone(tmp_path: Path) -> None:
    other = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        # Recorded with another start time: the pid was reused by a process the stack did not start.
        stale = ProcessRecord(pid=other.pid, start_ticks=(process_start_ticks(other.pid) or 0) + 1)
        _write_state(tmp_path, {"prefect": stale})
        assert down(tmp_path, timeout=5) == []
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_status_of_a_stack_whose_servers_died_says_stopped(tmp_path: Path) -> None:
    # As after a reboot: the record is there, the processes are not.
    gone = subprocess.Popen(["true"], start_new_session=True)
    record = ProcessRecord(pid=gone.pid, start_ticks=process_start_ticks(gone.pid))
    gone.wait()
    _write_state(tmp_path, dict.fromkeys(SERVICES, record))
    (tmp_path / "s3-credentials.json").write_text('{"access_key": "a", "secret_key": "b"}')
    services = status(tmp_path)
    assert [(service.name, service.running, service.healthy) for service in services] == [
        (name, False, False) for name in SERVICES
    ]
