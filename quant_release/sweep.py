"""What a killed run (SIGKILL, OOM, a lost node) leaves behind, cleaned by the next run on the same host.

Stage work directories carry their owner in their name (`.partial-<key>-<rand>-<pid>@<host>`), so a
directory is removed only when its owner is provably gone: same host, and no process with that pid.
MLflow runs carry the same two tags; RUNNING runs whose owner is gone are ended as KILLED.

A Prefect flow run that is cancelled or crashes is cleaned at once, not at the next run: the release flow's
`on_cancellation` / `on_crashed` hooks (flows/release.py) call `close_flow_run`, in the worker once it has
killed the flow run's process, or in the flow-run process itself once the flow's body has unwound.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from quant_release.tracking import Tracker

PID_TAG = "quant_release.pid"
HOST_TAG = "quant_release.host"
FLOW_RUN_TAG = "prefect.flow_run.id"  # quant_release/prefect_ui.py: flow_run_tags
_OWNED = re.compile(r"^\.(?:partial|old)-[0-9a-f]+-[0-9a-f]{8}-(?P<pid>\d+)@(?P<host>.+)$")


def host() -> str:
    return socket.gethostname()


def owner_tags() -> dict[str, str]:
    return {PID_TAG: str(os.getpid()), HOST_TAG: host()}


def work_name(prefix: str, key: str) -> str:
    """`.partial-<key>-<rand>-<pid>@<host>` (prefix `partial` or `old`)."""
    return f".{prefix}-{key}-{uuid.uuid4().hex[:8]}-{os.getpid()}@{host()}"


def owner_gone(pid: str, owner_host: str) -> bool:
    if owner_host != host():
        return False  # another machine's run: nothing here can prove it dead
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, ValueError, OverflowError):
        return False
    return False


def sweep_partials(state_dir: Path, only_pid: str | None = None) -> list[Path]:
    """Remove stage work directories of dead runs (with `only_pid`, of that process only); return them."""
    removed: list[Path] = []
    stages = state_dir / "stages"
    if not stages.is_dir():
        return removed
    for path in stages.glob("*/.*"):
        match = _OWNED.match(path.name)
        if not match or not path.is_dir() or (only_pid is not None and match["pid"] != only_pid):
            continue
        if owner_gone(match["pid"], match["host"]) or _is_me(match["pid"], match["host"], only_pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def close_dead_runs(tracker: Tracker) -> list[str]:
    """End as KILLED the RUNNING MLflow runs (parents and their stage runs) whose owner process is gone."""
    client = tracker.client
    closed: list[str] = []
    running = client.search_runs(
        [tracker.experiment_id],
        filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host()}'",
        max_results=1000,
    )
    for run in running:
        tags = run.data.tags
        if run.info.run_id == tracker.parent_run_id or not owner_gone(tags.get(PID_TAG, ""), tags.get(HOST_TAG, "")):
            continue
        client.set_tag(run.info.run_id, "quant_release.closed_by", "sweep: owner process gone")
        client.set_terminated(run.info.run_id, status="KILLED")
        closed.append(run.info.run_id)
    return closed


def _is_me(pid: str, owner_host: str, only_pid: str | None) -> bool:
    """A hook running in the flow-run process itself, after the flow's body has unwound: its own leftovers."""
    return only_pid is not None and owner_host == host() and pid == str(os.getpid())


def close_flow_run(
    state_dir: Path, tracking_uri: str, flow_run_id: str, status: Literal["KILLED", "FAILED"]
) -> tuple[list[str], list[Path]]:
    """End the RUNNING MLflow runs (parent and stage runs) of Prefect flow run `flow_run_id` as `status` and
    remove the stage work directories of its process once that process is gone. Returns (runs, dirs)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    closed: list[str] = []
    removed: list[Path] = []
    if not experiments:
        return closed, removed
    parents = client.search_runs(experiments, filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'")
    for parent in parents:
        stage_runs = client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and attributes.status = 'RUNNING'",
        )
        for run in [*stage_runs, parent]:
            if run.info.status != "RUNNING":
                continue
            client.set_tag(run.info.run_id, "quant_release.closed_by", f"prefect: flow run {status.lower()}")
            client.set_terminated(run.info.run_id, status=status)
            closed.append(run.info.run_id)
        pid = parent.data.tags.get(PID_TAG)
        if pid and parent.data.tags.get(HOST_TAG) == host():
            removed += sweep_partials(state_dir, only_pid=pid)
    return closed, removed
