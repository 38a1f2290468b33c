"""The Prefect flow `quant-release` (deployments: infra/prefect.yaml): the release pipeline as one flow run.

Its body is `flows.pipeline.run_release`, where each stage becomes a Prefect task run. The CLI runs this
flow when a Prefect server is configured (PREFECT_API_URL), and the same body directly otherwise.

A cancelled (from the UI or API: the worker SIGTERMs the flow run's process group, then SIGKILLs it after a
grace period) or crashed flow run leaves nothing behind: inside the process, Prefect's SIGTERM unwinds the
run like the CLI's (MLflow runs KILLED, the stage's work directory removed); then `on_cancellation` /
`on_crashed` (`close_after`, run by the worker once the process is gone) end whatever MLflow run is still
RUNNING and remove the work directories a SIGKILL left, without waiting for the next run's sweep.

The flow sets no `flow_run_name`: Prefect would apply it to every run, renaming a run that was given a name
in the UI or by `prefect deployment run --flow-run-name`. The CLI names its flow runs itself (the run id).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from prefect import Flow, flow
from prefect.client.schemas.objects import FlowRun, State
from prefect.logging.loggers import flow_run_logger

from flows.pipeline import new_run_id, run_release
from quant_release import netlimits
from quant_release.config import ReleaseConfig, load_settings
from quant_release.errors import error_message
from quant_release.prefect_ui import ProgressArtifacts, run_log_sink
from quant_release.progress import Progress
from quant_release.sweep import close_flow_run

# What new_run_id makes: the CLI names the flow run after the run id it reads the summary back by.
RUN_ID = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{6}$")


def run_id_for(flow_run_name: str | None) -> str:
    """The run id (state and artifact paths) for a flow run: its name when the CLI chose it, else a new one.

    A name typed in the UI ("nightly retry, new calib") or made up by Prefect ("crafty-owl") is no safe or
    unique path component; it stays the flow run's name, and MLflow records it beside the run id.
    """
    return flow_run_name if flow_run_name and RUN_ID.match(flow_run_name) else new_run_id()


def close_after(status: Literal["KILLED", "FAILED"]) -> Any:
    """A flow-run state hook that ends the flow run's RUNNING MLflow runs as `status` and removes its stage
    work directories (quant_release/sweep.py: close_flow_run). Never raises: it is cleanup."""

    def hook(flow: Flow[Any, Any], flow_run: FlowRun, state: State[Any]) -> None:
        logger = flow_run_logger(flow_run, flow)
        try:
            settings = load_settings()
            netlimits.install(settings)  # in the worker too: a hung MLflow server must not hang the cleanup
            closed, removed = close_flow_run(
                settings.state_dir, settings.resolved_tracking_uri(), str(flow_run.id), status
            )
        except Exception as exc:
            logger.warning(f"[cleanup] could not close this run's MLflow runs: {error_message(exc)}")
            return
        what = (state.name or state.type.value).lower()
        logger.info(
            f"[cleanup] flow run {what}: {len(closed)} MLflow run(s) ended as {status}, "
            f"{len(removed)} stage work directory(ies) removed"
        )

    hook.__name__ = f"close_mlflow_runs_as_{status.lower()}"
    return hook


@flow(
    name="quant-release",
    validate_parameters=True,
    log_prints=False,
    on_cancellation=[close_after("KILLED")],
    on_crashed=[close_after("FAILED")],
)
def release(config: ReleaseConfig = ReleaseConfig()) -> dict[str, Any]:  # noqa: B008 - Prefect reads the default
    """Quantize a Hugging Face LLM to FP8, evaluate and benchmark it against BF16, and publish it."""
    from prefect.runtime import flow_run

    settings = load_settings()
    netlimits.install(settings)  # time limits and retries on every network client
    progress = Progress(enabled=settings.progress, sink=run_log_sink(), board=ProgressArtifacts())
    summary = run_release(config, settings, run_id_for(flow_run.get_name()), progress)
    return summary.model_dump(mode="json")
