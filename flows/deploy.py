"""`quant-release deploy`: `prefect deploy` of infra/prefect.yaml, then the deployments' schemas closed.

`prefect deploy` builds the top level of a deployment's parameter schema itself and leaves out
`additionalProperties: false`, so the REST API (and the UI) accept an unknown top-level parameter
(`{"mmlu_questions": 2}` next to or instead of `config`) with HTTP 201, and the run fails later on the worker when
the flow binds its parameters. After deploying, this sets `additionalProperties: false` on each deployment's
schema, so the server refuses such a run when it is created (409), as it already does for unknown fields inside
`config` (ReleaseConfig forbids extras).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from quant_release.errors import ConfigError

DEFAULT_PREFECT_FILE = Path("infra/prefect.yaml")


def prefect_executable() -> str:
    """The prefect CLI of this interpreter's venv (the one the worker runs), else the one on PATH."""
    beside = Path(sys.executable).parent / "prefect"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("prefect")
    if found is None:
        raise ConfigError("prefect is not installed: pip install prefect (the version in infra/requirements.lock)")
    return found


def deployment_names(prefect_file: Path) -> list[str]:
    """`FLOW/NAME` of every deployment in a prefect.yaml (the flow is the entrypoint's Prefect flow name)."""
    try:
        data = yaml.safe_load(prefect_file.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{prefect_file}: cannot read it: {exc}") from exc
    from flows.release import release

    return [f"{release.name}/{d['name']}" for d in data.get("deployments") or [] if d.get("name")]


def closed_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with unknown top-level parameters refused (everything else as `prefect deploy` made it)."""
    return {**schema, "additionalProperties": False}


def close_schemas(names: list[str]) -> list[str]:
    """Set `additionalProperties: false` on each existing deployment's parameter schema; returns those changed.

    A deployment that does not exist (not selected by `prefect deploy --name ...`, never deployed) is skipped.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate
    from prefect.exceptions import ObjectNotFound

    changed = []
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                deployment = client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            schema = closed_schema(dict(deployment.parameter_openapi_schema or {}))
            if deployment.parameter_openapi_schema != schema:
                client.update_deployment(deployment.id, DeploymentUpdate(parameter_openapi_schema=schema))
                changed.append(name)
    return changed


def deploy(prefect_args: list[str]) -> int:
    """`prefect deploy` with `prefect_args`, plus `--prefect-file infra/prefect.yaml` and `--all` unless they
    choose a file or deployments, then close the schemas of the file's deployments. Returns prefect's exit code
    when it fails."""
    args = list(prefect_args)
    if not {"--all", "--name", "-n"} & {a.split("=", 1)[0] for a in args}:
        args.append("--all")  # no deployment chosen: all of them, as prefect would otherwise ask or fail
    if "--prefect-file" not in args:
        args = ["--prefect-file", str(DEFAULT_PREFECT_FILE), *args]
    prefect_file = Path(args[args.index("--prefect-file") + 1])
    names = deployment_names(prefect_file)  # before deploying: a bad file fails here, not half-way
    result = subprocess.run([prefect_executable(), "deploy", *args], check=False)
    if result.returncode != 0:
        return result.returncode
    for name in close_schemas(names):
        print(f"quant-release: {name}: unknown top-level parameters are now refused (additionalProperties: false)")
    return 0
