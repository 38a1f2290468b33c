"""infra/work-pools/*.json, checked the way they are used: Prefect's CLI creates work pools from them on a real
Prefect server (which refuses a template whose placeholders lack a variable), the Kubernetes and Docker
workers' own job configurations render them, and what they render must be a valid Kubernetes Job (strict
schema of the newest Kubernetes that kubernetes-validate knows) and valid docker-py container arguments.
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest

from tests.support.servers import PrefectServer, find_executable

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
POOLS = ROOT / "infra" / "work-pools"
KUBERNETES = POOLS / "kubernetes.json"
DOCKER = POOLS / "docker.json"
IMAGE = "registry.example.com/ml/quant-release:0.1.0"


def _template(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    assert isinstance(data, dict)
    return data


def _prefect(server: PrefectServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **server.env(), "PREFECT_CLI_PROMPT": "false"}
    return subprocess.run(
        [find_executable("prefect"), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )


def _render(configuration: Any, template: dict[str, Any], values: dict[str, Any], server: PrefectServer) -> Any:
    """The worker's job configuration for a flow run, as the worker builds it (placeholders filled, blocks
    resolved through the server, Prefect's environment added)."""
    from prefect.client.schemas.objects import FlowRun
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def build() -> Any:
        return await configuration.from_template_and_values(template, values)

    with temporary_settings({PREFECT_API_URL: server.api_url}):
        rendered = asyncio.run(build())
        rendered.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="stack-test"))
    return rendered


@pytest.mark.parametrize(("kind", "path"), [("kubernetes", KUBERNETES), ("docker", DOCKER)])
def test_prefect_creates_a_work_pool_from_the_template(prefect_server: PrefectServer, kind: str, path: Path) -> None:
    name = f"gpu-{kind}-{uuid.uuid4().hex[:6]}"
    result = _prefect(prefect_server, "work-pool", "create", name, "--type", kind, "--base-job-template", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    pool = httpx.get(f"{prefect_server.api_url}/work_pools/{name}", timeout=30).json()
    assert pool["type"] == kind
    assert pool["base_job_template"] == _template(path)


def test_the_server_refuses_a_template_with_an_undeclared_placeholder(
    prefect_server: PrefectServer, tmp_path: Path
) -> None:
    # What the pool-creation test relies on: the server checks placeholders against the variables.
    broken = _template(KUBERNETES)
    del broken["variables"]["properties"]["shm_size"]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    result = _prefect(
        prefect_server, "work-pool", "create", "broken", "--type", "kubernetes", "--base-job-template", str(path)
    )
    assert result.returncode != 0
    assert "shm_size" in result.stdout + result.stderr


def _container(manifest: dict[str, Any]) -> dict[str, Any]:
    (container,) = manifest["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def test_the_kubernetes_job_is_valid_and_asks_for_gpus_shared_memory_the_cache_and_the_secret(
    prefect_server: PrefectServer,
) -> None:
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = _template(KUBERNETES)
    manifest = _render(KubernetesWorkerJobConfiguration, template, {"image": IMAGE}, prefect_server).job_manifest
    kubernetes_validate.validate(manifest, kubernetes_validate.latest_version(), strict=True)

    assert manifest["kind"] == "Job" and manifest["apiVersion"] == "batch/v1"
    pod = manifest["spec"]["template"]["spec"]
    container = _container(manifest)
    assert container["image"] == IMAGE
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "16Gi"}
    assert mounts["dshm"] == "/dev/shm"
    assert volumes["hf-cache"]["persistentVolumeClaim"] == {"claimName": "quant-release-hf-cache"}
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert mounts["hf-cache"] == env["HF_HOME"] == "/cache/huggingface"
    assert "PREFECT__FLOW_RUN_ID" in env  # the worker's own variables are there too
    assert container["envFrom"] == [{"secretRef": {"name": "quant-release"}}]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert manifest["spec"]["backoffLimit"] == 0


def test_the_kubernetes_variables_reach_the_job(prefect_server: PrefectServer) -> None:
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    values = {
        "image": IMAGE,
        "gpu_count": 8,
        "shm_size": "64Gi",
        "hf_cache_pvc": "team-hf-cache",
        "hf_home": "/mnt/hf",
        "secret_name": "release-secrets",
        "node_selector": {"node.kubernetes.io/instance-type": "p5.48xlarge"},
        "tolerations": [],
        "env": {"MLFLOW_TRACKING_URI": "http://mlflow.internal:5000"},
        "memory_request": "200Gi",
        "namespace": "ml",
    }
    manifest = _render(KubernetesWorkerJobConfiguration, _template(KUBERNETES), values, prefect_server).job_manifest
    kubernetes_validate.validate(manifest, kubernetes_validate.latest_version(), strict=True)
    pod = manifest["spec"]["template"]["spec"]
    container = _container(manifest)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert container["resources"]["requests"]["memory"] == "200Gi"
    assert pod["volumes"][0]["emptyDir"]["sizeLimit"] == "64Gi"
    assert pod["volumes"][1]["persistentVolumeClaim"]["claimName"] == "team-hf-cache"
    env = {item["name"]: item.get("value") for item in container["env"]}
    assert env["HF_HOME"] == "/mnt/hf" and env["MLFLOW_TRACKING_URI"] == "http://mlflow.internal:5000"
    assert {"name": "hf-cache", "mountPath": "/mnt/hf"} in container["volumeMounts"]
    assert container["envFrom"] == [{"secretRef": {"name": "release-secrets"}}]
    assert pod["nodeSelector"] == values["node_selector"]
    assert manifest["metadata"]["namespace"] == "ml"


def test_the_validator_rejects_a_job_field_kubernetes_does_not_know(prefect_server: PrefectServer) -> None:
    # Prefect's own default template had `completions` in the pod spec; this one has it in the Job spec.
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    manifest = _render(KubernetesWorkerJobConfiguration, _template(KUBERNETES), {"image": IMAGE}, prefect_server)
    misplaced = copy.deepcopy(manifest.job_manifest)
    misplaced["spec"]["template"]["spec"]["completions"] = misplaced["spec"].pop("completions")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misplaced, kubernetes_validate.latest_version(), strict=True)


def test_the_docker_container_gets_gpus_shared_memory_and_the_cache_volume(prefect_server: PrefectServer) -> None:
    from docker.models.containers import _create_container_args
    from prefect_docker.worker import DockerWorkerJobConfiguration

    rendered = _render(DockerWorkerJobConfiguration, _template(DOCKER), {"image": IMAGE}, prefect_server)
    # The arguments the Docker worker hands to docker-py's containers.create, turned into the Engine API's
    # HostConfig by docker-py itself (which refuses a malformed shm_size or device request).
    create = _create_container_args(
        {
            "image": rendered.image,
            "command": rendered.command,
            "environment": rendered.env,
            "volumes": rendered.volumes,
            "version": "1.44",
            **rendered.container_create_kwargs,
        }
    )
    host = create["host_config"]
    assert host["DeviceRequests"] == [
        {"Driver": "nvidia", "Count": -1, "DeviceIDs": [], "Capabilities": [["gpu"]], "Options": {}}
    ]
    assert host["ShmSize"] == 16 * 1024**3
    assert host["Binds"] == ["quant-release-hf-cache:/cache/huggingface"]
    assert rendered.env["HF_HOME"] == "/cache/huggingface"
    assert create["image"] == IMAGE

    two = _render(DockerWorkerJobConfiguration, _template(DOCKER), {"image": IMAGE, "gpu_count": 2}, prefect_server)
    assert two.container_create_kwargs["device_requests"][0]["count"] == 2


def test_a_docker_secret_comes_from_a_prefect_secret_block(prefect_server: PrefectServer) -> None:
    """The way infra/README.md tells to pass secrets to Docker workers: a Secret block referenced in `env`."""
    from prefect.blocks.system import Secret
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_docker.worker import DockerWorkerJobConfiguration

    token = f"hf_{uuid.uuid4().hex}"
    with temporary_settings({PREFECT_API_URL: prefect_server.api_url}):
        Secret(value=token).save("stack-test-hf-token", overwrite=True)
    env = {"HF_TOKEN": "{{ prefect.blocks.secret.stack-test-hf-token }}"}
    rendered = _render(DockerWorkerJobConfiguration, _template(DOCKER), {"image": IMAGE, "env": env}, prefect_server)
    assert rendered.env["HF_TOKEN"] == token
    # A deployment's env is merged with the template's default, so the cache location stays.
    assert rendered.env["HF_HOME"] == "/cache/huggingface"
