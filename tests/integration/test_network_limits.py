"""Every network client has a time limit and retries transient failures only (quant_release/netlimits.py).

Hangs: the CLI, as a subprocess, against an endpoint that accepts connections and never answers
(tests/support/silent_server.py), for the Hub, S3 and MLflow: one line, exit 2, within a bound.
Retries: the real huggingface_hub client, with our client installed, against the Hub test server
answering 500/429 a few times and then recovering (its fault-injection switch); 401/404 are not retried.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import _http as hf_http

from quant_release.netlimits import NetLimits, hub_client
from tests.support.hub_fixtures import HubServer, hub_server
from tests.support.silent_server import silent_server
from tests.unit.test_cli_bad_input import Env, assert_bad_input, cli, llama_dir

__all__ = ["cli", "hub_server", "llama_dir"]  # fixtures used here

# Short limits so a hang costs seconds; the bound below is generous for a loaded 2-core machine.
SHORT = {
    "QUANT_RELEASE_NET_CONNECT_TIMEOUT": "2",
    "QUANT_RELEASE_NET_READ_TIMEOUT": "2",
    "QUANT_RELEASE_NET_RETRIES": "1",
}
HANG_BOUND_S = 25.0


@pytest.fixture
def silent() -> Iterator[str]:
    with silent_server() as url:
        yield url


def test_hub_that_never_answers(cli: Env, silent: str) -> None:
    result = cli.run("run", "--model", "some-org/some-model", env={**SHORT, "HF_ENDPOINT": silent})
    assert_bad_input(result, "cannot reach", silent, "some-org/some-model")
    assert result.seconds < HANG_BOUND_S


def test_s3_endpoint_that_never_answers(cli: Env, silent: str) -> None:
    env = {
        **SHORT,
        "QUANT_RELEASE_ARTIFACT_URI": "s3://quiet-bucket/releases",
        "AWS_ENDPOINT_URL": silent,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    result = cli.run("run", env=env)
    assert_bad_input(result, silent)
    assert "test-secret" not in result.stderr
    assert result.seconds < HANG_BOUND_S


def test_mlflow_server_that_never_answers(cli: Env, silent: str) -> None:
    result = cli.run("run", env={**SHORT, "MLFLOW_TRACKING_URI": silent})
    assert_bad_input(result, silent, "not reachable")
    assert result.seconds < HANG_BOUND_S


# --- retries against the Hub test server --------------------------------------------------------------


@pytest.fixture
def hub(hub_server: HubServer) -> Iterator[HubServer]:
    """huggingface_hub's shared client is ours (as `netlimits.install` sets it) for this test only."""
    limits = NetLimits(connect_timeout=5, read_timeout=10, retries=3, backoff=0.05)
    hf_http.set_client_factory(lambda: hub_client(limits))
    try:
        yield hub_server
    finally:
        _faults(hub_server, pattern="^$", status=500, count=0)
        hf_http.set_client_factory(hf_http.default_client_factory)


def _faults(server: HubServer, **body: Any) -> dict[str, Any]:
    with httpx.Client(timeout=10) as client:
        if body:
            response = client.post(f"{server.endpoint}/api/_test/faults", json=body)
        else:
            response = client.get(f"{server.endpoint}/api/_test/faults")
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


@pytest.mark.parametrize("status", [500, 503, 429])
def test_transient_errors_are_retried_until_the_hub_recovers(hub: HubServer, status: int) -> None:
    _faults(hub, pattern=r"^/api/whoami-v2$", status=status, count=2)
    assert HfApi(endpoint=hub.endpoint, token=hub.token).whoami()["name"] == hub.user
    assert _faults(hub)["seen"] == 3  # two faults, then the answer


def test_a_hub_that_stays_down_fails_after_the_retries(hub: HubServer) -> None:
    _faults(hub, pattern=r"^/api/whoami-v2$", status=502, count=100)
    with pytest.raises(HfHubHTTPError):
        HfApi(endpoint=hub.endpoint, token=hub.token).whoami()
    assert _faults(hub)["seen"] == 4  # the first try and 3 retries


@pytest.mark.parametrize("status", [401, 403, 404])
def test_client_errors_are_not_retried(hub: HubServer, status: int) -> None:
    _faults(hub, pattern=r"^/api/whoami-v2$", status=status, count=100)
    with pytest.raises(HfHubHTTPError):
        HfApi(endpoint=hub.endpoint, token=hub.token).whoami()
    assert _faults(hub)["seen"] == 1


def test_a_non_idempotent_request_is_not_repeated_on_5xx(hub: HubServer) -> None:
    _faults(hub, pattern=r"^/api/repos/create$", status=500, count=100)
    with pytest.raises(HfHubHTTPError):
        HfApi(endpoint=hub.endpoint, token=hub.token).create_repo(hub.new_repo_id("no-retry"), private=True)
    assert _faults(hub)["seen"] == 1


def test_a_probe_is_a_single_attempt(hub: HubServer) -> None:
    """Resolving `--calib-dataset auto` asks whether the Hub is there: an absent or failing Hub means
    "take the next source", so the probe is not retried with backoff."""
    from quant_release.calibration.hub_dataset import hub_dataset_reachable
    from quant_release.netlimits import single_attempt

    _faults(hub, pattern=r"^/api/datasets/", status=503, count=100)
    with single_attempt():
        assert not hub_dataset_reachable("abisee/cnn_dailymail", hub.endpoint)
    assert _faults(hub)["seen"] == 1
    # Outside a probe the same request is retried as usual.
    assert not hub_dataset_reachable("abisee/cnn_dailymail", hub.endpoint)
    assert _faults(hub)["seen"] == 1 + 4
