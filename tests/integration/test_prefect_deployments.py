"""infra/prefect.yaml deployed the way its README says, on a real Prefect server, with Prefect's own CLI.

What matters to an operator: the deployments register with their parameters and concurrency limit, a
schedule created once survives every later `prefect deploy` (in whatever state the team left it), and
the on-demand deployment accepts a run with parameters and refuses bad ones at trigger time.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.servers import PrefectServer, find_executable

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _prefect(server: PrefectServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **server.env(), "PREFECT_CLI_PROMPT": "false"}
    return subprocess.run(
        [find_executable("prefect"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180, check=False
    )


def _quant_release_deploy(server: PrefectServer) -> subprocess.CompletedProcess[str]:
    """The README's way to deploy: `prefect deploy` of infra/prefect.yaml, then the schemas closed."""
    env = {**os.environ, **server.env(), "PREFECT_CLI_PROMPT": "false"}
    return subprocess.run(
        [find_executable("quant-release"), "deploy", "--", "--no-prompt"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip


def _api(server: PrefectServer, method: str, path: str, body: Any = None) -> Any:
    response = httpx.request(method, f"{server.api_url}{path}", json=body, timeout=30)
    response.raise_for_status()
    return response.json() if response.content else None


def _deployment(server: PrefectServer, name: str) -> dict[str, Any]:
    return _api(server, "GET", f"/deployments/name/quant-release/{name}")  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def deployed(prefect_server: PrefectServer) -> PrefectServer:
    pool = _prefect(prefect_server, "work-pool", "create", "quant-release", "--type", "process")
    assert pool.returncode == 0 or "already exists" in pool.stdout + pool.stderr, pool.stdout + pool.stderr
    result = _quant_release_deploy(prefect_server)
    assert result.returncode == 0, result.stdout + result.stderr
    return prefect_server


def test_both_deployments_register_with_their_settings(deployed: PrefectServer) -> None:
    nightly = _deployment(deployed, "nightly")
    on_demand = _deployment(deployed, "on-demand")
    assert nightly["parameters"]["config"]["mmlu"]["questions_per_subject"] == 8
    assert on_demand["parameters"] == {}
    for deployment in (nightly, on_demand):
        assert deployment["entrypoint"] == "flows/release.py:release"
        assert deployment["work_pool_name"] == "quant-release"
        assert deployment["enforce_parameter_schema"] is True
        assert deployment["global_concurrency_limit"]["limit"] == 1


def test_a_schedule_survives_redeploying_in_the_state_it_was_left(deployed: PrefectServer) -> None:
    created = _prefect(deployed, "deployment", "schedule", "create", "quant-release/nightly", "--cron", "0 2 * * *",
                       "--timezone", "UTC")  # fmt: skip
    assert created.returncode == 0, created.stdout + created.stderr
    (schedule,) = _deployment(deployed, "nightly")["schedules"]
    assert schedule["active"] is True
    assert schedule["schedule"]["cron"] == "0 2 * * *"
    for expected_active in (True, False):
        if not expected_active:
            paused = _prefect(deployed, "deployment", "schedule", "pause", "quant-release/nightly", schedule["id"])
            assert paused.returncode == 0, paused.stdout + paused.stderr
        again = _quant_release_deploy(deployed)
        assert again.returncode == 0, again.stdout + again.stderr
        (kept,) = _deployment(deployed, "nightly")["schedules"]
        assert (kept["schedule"]["cron"], kept["active"]) == ("0 2 * * *", expected_active)


def test_on_demand_accepts_parameters_and_refuses_bad_ones_at_trigger_time(deployed: PrefectServer) -> None:
    deployment_id = _deployment(deployed, "on-demand")["id"]
    good = {"config": {"source": {"model": "org/name"}, "mmlu": {"questions_per_subject": 2}}}
    run = _api(deployed, "POST", f"/deployments/{deployment_id}/create_flow_run", {"parameters": good})
    assert run["parameters"] == good
    response = httpx.post(
        f"{deployed.api_url}/deployments/{deployment_id}/create_flow_run",
        json={"parameters": {"config": {"mmlu": {"num_fewshot": 99}}}},
        timeout=30,
    )
    assert response.status_code == 409, response.text  # schema enforced: no run is created
    assert "num_fewshot" in json.dumps(response.json())


def test_malformed_hub_repo_id_is_refused_at_trigger_time(deployed: PrefectServer) -> None:
    """The `pattern` of publish.hub_repo_id is in the deployment's schema: the server refuses the run (409,
    Prefect's status for parameters that fail the schema), and so does `prefect deployment run`."""
    deployment_id = _deployment(deployed, "on-demand")["id"]
    bad = {"config": {"publish": {"push_to_hub": True, "hub_repo_id": "not a repo"}}}
    response = httpx.post(
        f"{deployed.api_url}/deployments/{deployment_id}/create_flow_run", json={"parameters": bad}, timeout=30
    )
    assert response.status_code == 409, response.text
    assert "does not match" in response.text and "hub_repo_id" in response.text
    good = {"config": {"publish": {"push_to_hub": True, "hub_repo_id": "org/name-FP8"}}}
    ok = httpx.post(
        f"{deployed.api_url}/deployments/{deployment_id}/create_flow_run", json={"parameters": good}, timeout=30
    )
    assert ok.status_code == 201, ok.text

    cli = _prefect(deployed, "deployment", "run", "quant-release/on-demand", "--params", json.dumps(bad))
    assert cli.returncode != 0
    assert "hub_repo_id" in cli.stdout + cli.stderr


def test_unknown_top_level_parameter_is_refused_by_the_cli(deployed: PrefectServer) -> None:
    """`prefect deployment run` checks parameter names against the schema before it creates a run."""
    cli = _prefect(deployed, "deployment", "run", "quant-release/on-demand", "--param", "mmlu_questions=2")
    assert cli.returncode != 0
    assert "mmlu_questions" in cli.stdout + cli.stderr
    # Inside `config` the schema itself says additionalProperties: false (ReleaseConfig forbids extras).
    deployment_id = _deployment(deployed, "on-demand")["id"]
    response = httpx.post(
        f"{deployed.api_url}/deployments/{deployment_id}/create_flow_run",
        json={"parameters": {"config": {"mmlu_questions": 2}}},
        timeout=30,
    )
    assert response.status_code == 409, response.text


def test_unknown_top_level_parameter_is_refused_by_the_server(deployed: PrefectServer, tmp_path: Path) -> None:
    """`prefect deploy` leaves `additionalProperties` out of the top level of the schema, so the REST API (the
    UI's form posts there) accepted `{"mmlu_questions": 2}` with 201 and the run failed on the worker.
    `quant-release deploy` closes it: the server refuses the run when it is created."""
    for name in ("nightly", "on-demand"):
        deployment = _deployment(deployed, name)
        assert deployment["parameter_openapi_schema"]["additionalProperties"] is False
        assert set(deployment["parameter_openapi_schema"]["properties"]) == {"config"}  # nothing else changed
        for parameters in ({"mmlu_questions": 2}, {"config": {}, "mmlu_questions": 2}):
            response = httpx.post(
                f"{deployed.api_url}/deployments/{deployment['id']}/create_flow_run",
                json={"parameters": parameters},
                timeout=30,
            )
            assert response.status_code in (409, 422), response.text
            assert "mmlu_questions" in response.text
    # What a plain `prefect deploy` does (the gap `quant-release deploy` closes), shown on a copy of the file
    # with another deployment name, so the deployments above keep their closed schemas.
    data = yaml.safe_load((ROOT / "infra/prefect.yaml").read_text())
    data["deployments"] = [{**data["deployments"][1], "name": "open-schema"}]
    copy = tmp_path / "prefect.yaml"
    copy.write_text(yaml.safe_dump(data))
    plain = _prefect(deployed, "deploy", "--prefect-file", str(copy), "--all", "--no-prompt")
    assert plain.returncode == 0, plain.stdout + plain.stderr
    opened = _deployment(deployed, "open-schema")
    assert "additionalProperties" not in opened["parameter_openapi_schema"]
    response = httpx.post(
        f"{deployed.api_url}/deployments/{opened['id']}/create_flow_run",
        json={"parameters": {"mmlu_questions": 2}},
        timeout=30,
    )
    assert response.status_code == 201, response.text
