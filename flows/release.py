"""The Prefect flow `quant-release` (deployments: infra/prefect.yaml): the release pipeline as one flow run.

Its body is `flows.pipeline.run_release`, where each stage becomes a Prefect task run. The CLI runs this
flow when a Prefect server is configured (PREFECT_API_URL), and the same body directly otherwise.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.pipeline import new_run_id, run_release
from quant_release import netlimits
from quant_release.config import ReleaseConfig, load_settings
from quant_release.progress import Progress


def _current_run_id() -> str:
    from prefect.runtime import flow_run

    name = flow_run.get_name()
    return name if name else new_run_id()


@flow(name="quant-release", flow_run_name=new_run_id, validate_parameters=True, log_prints=False)
def release(config: ReleaseConfig = ReleaseConfig()) -> dict[str, Any]:  # noqa: B008 - Prefect reads the default
    """Quantize a Hugging Face LLM to FP8, evaluate and benchmark it against BF16, and publish it."""
    settings = load_settings()
    netlimits.install(settings)  # time limits and retries on every network client
    summary = run_release(config, settings, _current_run_id(), Progress(enabled=settings.progress))
    return summary.model_dump(mode="json")
