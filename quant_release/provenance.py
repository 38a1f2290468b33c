"""Where a run came from, as MLflow tags and a run name people can read in a list of runs.

MLflow sets `mlflow.source.*` and `mlflow.user` itself only for fluent `mlflow.start_run`; the tracker
creates runs through `MlflowClient` (explicit run ids), so these are set here, under MLflow's own tag
names, which its UI shows in the run's "Source", "User" and "Git commit" fields.
"""

from __future__ import annotations

import getpass
import subprocess
import sys
from pathlib import Path

from quant_release.config import ReleaseConfig

_PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def git_commit(directory: Path = _PACKAGE_ROOT) -> str | None:
    """The commit of the checkout this code runs from (an editable install), or None outside a git checkout."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=directory, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and len(commit) == 40 else None


def _user() -> str | None:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        return None


def default_tags(entry_point: str | None = None) -> dict[str, str]:
    """MLflow's own source tags for this process: entry point, git commit, user."""
    tags = {
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": entry_point or Path(sys.argv[0]).name or "quant-release",
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    user = _user()
    if user:
        tags["mlflow.user"] = user
    return tags


def model_name(source: str) -> str:
    """A short name for a model source: `meta-llama/Llama-3.1-8B` → `Llama-3.1-8B`, a .gguf file → its stem."""
    name = source.removeprefix("pypi:").rstrip("/").split("/")[-1]
    return name.removesuffix(".gguf")


def run_name(config: ReleaseConfig, run_id: str) -> str:
    """`--run-name` if given, else model, scheme and the run id (which starts with the UTC date and time)."""
    if config.tracking.run_name:
        return config.tracking.run_name
    return f"{model_name(config.source.model)} {config.quantization.algorithm} {run_id}"
