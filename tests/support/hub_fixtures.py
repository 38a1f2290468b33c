"""pytest fixtures for the Hub test server (`tests/support/hub_server.py`), run as a real child process.

- `hub_server` (session): the running server (stopped by PID at the end), as a `HubServer` with `endpoint`,
  `token`, `user`, `org`, a second user (`other_token`, `other_user`) for permission tests, and
  `new_repo_id()` for fresh repo ids.
- `hub_env` (per test): HF_ENDPOINT, HF_TOKEN, HF_HUB_DISABLE_XET=1, HF_HUB_OFFLINE=0 and a private HF_HOME in
  the environment, which is what a subprocess needs. `huggingface_hub` reads most of these at import time, so
  for in-process code the fixture also patches the copies it already holds (`constants.ENDPOINT`, ...,
  and the import-time `HfApi` behind `huggingface_hub.upload_folder` & co) and routes public Hub hosts to the
  server (`hub_card_validation`).
- `hub_card_validation`: `ModelCard.validate` posts to https://huggingface.co whatever HF_ENDPOINT says; this
  routes that request to the server.

Without `hub_env`, in-process code must pass `endpoint=` (HfApi, hf_hub_download and snapshot_download take it)
and set `huggingface_hub.constants.HF_HUB_DISABLE_XET = True`, or uploads go through Xet, which the server
does not speak.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import huggingface_hub
import pytest
from huggingface_hub import constants as hf_constants
from huggingface_hub import hf_api
from huggingface_hub.utils import _http as hf_http

from tests.support.process import free_port, http_ok, running_server

REPO_ROOT = Path(__file__).resolve().parents[2]
PUBLIC_HUB_HOSTS = frozenset({"huggingface.co", "hf.co", "hub-ci.huggingface.co"})


@dataclass(frozen=True)
class HubServer:
    endpoint: str
    token: str
    user: str
    org: str
    other_token: str
    other_user: str
    data_dir: Path
    log_path: Path
    pid: int

    def new_repo_id(self, prefix: str = "repo", *, namespace: str | None = None) -> str:
        """A repo id no other test uses (the server is shared by the whole session)."""
        return f"{namespace or self.user}/{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    root = tmp_path_factory.mktemp("hub-server")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    user, org, other_user = "qr-tester", "qr-org", "qr-outsider"
    token, other_token = f"hf_test_{uuid.uuid4().hex}", f"hf_other_{uuid.uuid4().hex}"
    argv = [
        sys.executable, "-m", "tests.support.hub_server",
        "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(root / "data"),
        "--token", f"{token}={user}:{org}", "--token", f"{other_token}={other_user}",
    ]  # fmt: skip

    def ready() -> bool:
        return http_ok(f"{endpoint}/api/health")

    with running_server("hub-server", argv, ready=ready, log_dir=root / "logs", cwd=REPO_ROOT) as server:
        yield HubServer(
            endpoint=endpoint,
            token=token,
            user=user,
            org=org,
            other_token=other_token,
            other_user=other_user,
            data_dir=root / "data",
            log_path=server.log_path,
            pid=server.pid,
        )


@pytest.fixture
def hub_env(hub_card_validation: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> HubServer:
    """Environment of a Hub client talking to the test server, with a private cache, for this test only.

    Includes `hub_card_validation`, so in-process code reaches no public Hub host at all.
    """
    hub_server = hub_card_validation
    cache = tmp_path / "hf-home"
    env = {
        "HF_ENDPOINT": hub_server.endpoint,
        "HF_TOKEN": hub_server.token,
        "HF_HUB_DISABLE_XET": "1",  # the server speaks LFS "basic" only
        "HF_HUB_OFFLINE": "0",
        "HF_HOME": str(cache),
        "HF_HUB_CACHE": str(cache / "hub"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    # huggingface_hub read these at import time; patch the copies so in-process calls follow the env too.
    monkeypatch.setattr(hf_constants, "ENDPOINT", hub_server.endpoint)
    monkeypatch.setattr(
        hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub_server.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_HOME", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache / "hub"))
    monkeypatch.setattr(hf_api.api, "endpoint", hub_server.endpoint)
    return hub_server


class _PublicHubToTestServer(httpx.BaseTransport):
    """Sends requests for the public Hub's hosts to the test server instead; others go out unchanged."""

    def __init__(self, endpoint: str) -> None:
        self._target = httpx.URL(endpoint)
        self._inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.host in PUBLIC_HUB_HOSTS:
            request.url = request.url.copy_with(
                scheme=self._target.scheme, host=self._target.host, port=self._target.port
            )
            request.headers["Host"] = self._target.netloc.decode()
        return self._inner.handle_request(request)

    def close(self) -> None:
        self._inner.close()


@pytest.fixture
def hub_card_validation(hub_server: HubServer) -> Iterator[HubServer]:
    """`RepoCard.validate` posts to https://huggingface.co/api/validate-yaml whatever HF_ENDPOINT says; while
    this fixture is active, the shared client of `huggingface_hub` sends that request to the test server."""

    def factory() -> httpx.Client:
        return httpx.Client(
            transport=_PublicHubToTestServer(hub_server.endpoint),
            event_hooks={"request": [hf_http.hf_request_event_hook]},
            follow_redirects=True,
            timeout=None,
        )

    huggingface_hub.set_client_factory(factory)
    try:
        yield hub_server
    finally:
        huggingface_hub.set_client_factory(hf_http.default_client_factory)
