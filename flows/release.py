"""The Prefect flow `quant-release` (deployments: infra/prefect.yaml): the release pipeline as one flow run.

Its body is `flows.pipeline.run_release`, where each stage becomes a Prefect task run. The CLI runs this
flow when a Prefect server is configured (PREFECT_API_URL), and the same body directly otherwise.

The flow sets no `flow_run_name`: Prefect would apply it to every run, renaming a run that was given a name
in the UI or by `prefect deployment run --flow-run-name`. The CLI names its flow runs itself (the run id).
"""

from __future__ import annotations

import re
from typing import Any

from prefect import flow

from flows.pipeline import new_run_id, run_release
from quant_release import netlimits
from quant_release.config import ReleaseConfig, load_settings
from quant_release.prefect_ui import ProgressArtifacts, run_log_sink
from quant_release.progress import Progress

# What new_run_id makes: the CLI names the flow run after the run id it reads the summary back by.
RUN_ID = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{6}$")


def run_id_for(flow_run_name: str | None) -> str:
    """The run id (state and artifact paths) for a flow run: its name when the CLI chose it, else a new one.

    A name typed in the UI ("nightly retry, new calib") or made up by Prefect ("crafty-owl") is no safe or
    unique path component; it stays the flow run's name, and MLflow records it beside the run id.
    """
    return flow_run_name if flow_run_name and RUN_ID.match(flow_run_name) else new_run_id()


@flow(name="quant-release", validate_parameters=True, log_prints=False)
def release(config: ReleaseConfig = ReleaseConfig()) -> dict[str, Any]:  # noqa: B008 - Prefect reads the default
    """Quantize a Hugging Face LLM to FP8, evaluate and benchmark it against BF16, and publish it."""
    from prefect.runtime import flow_run

    settings = load_settings()
    netlimits.install(settings)  # time limits and retries on every network client
    progress = Progress(enabled=settings.progress, sink=run_log_sink(), board=ProgressArtifacts())
    summary = run_release(config, settings, run_id_for(flow_run.get_name()), progress)
    return summary.model_dump(mode="json")
