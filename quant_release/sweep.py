"""What a killed run (SIGKILL, OOM, a lost node) leaves behind, cleaned by the next run on the same host.

Stage work directories carry their owner in their name (`.partial-<key>-<rand>-<pid>@<host>`), so a
directory is removed only when its owner is provably gone: same host, and no process with that pid.
MLflow runs carry the same two tags; RUNNING runs whose owner is gone are ended as KILLED.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from quant_release.tracking import Tracker

PID_TAG = "quant_release.pid"
HOST_TAG = "quant_release.host"
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


def sweep_partials(state_dir: Path) -> list[Path]:
    """Remove stage work directories of dead runs; return what was removed."""
    removed: list[Path] = []
    stages = state_dir / "stages"
    if not stages.is_dir():
        return removed
    for path in stages.glob("*/.*"):
        match = _OWNED.match(path.name)
        if match and path.is_dir() and owner_gone(match["pid"], match["host"]):
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
