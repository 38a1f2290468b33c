"""What a release run shows in the Prefect UI: progress in the Logs tab and as progress artifacts, table and
link artifacts, Cached states.

Only called inside a flow run (flows/release.py, `flows.pipeline.in_flow_run()`), so prefect is imported
here lazily: a run without a Prefect server never imports it. Nothing here decides anything about the run;
it only reports what the run's records and summary already hold.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Callable
from typing import Any, cast
from uuid import UUID

from quant_release.records import Record, ThroughputResult

PROGRESS_LOGGER = "quant_release.prefect"


def run_log_sink() -> Callable[[str], None]:
    """A Progress sink that sends each line to the current flow or task run's logs on the Prefect server.

    Prefect's own run logger inherits PREFECT_LOGGING_LEVEL, which the CLI sets to CRITICAL to keep the
    terminal clean; this logger sends to the API only (no console handler), at INFO, whatever that level is.
    """
    from prefect.logging.handlers import APILogHandler
    from prefect.logging.loggers import PrefectLogAdapter, get_run_logger

    logger = logging.getLogger(PROGRESS_LOGGER)
    if not any(isinstance(handler, APILogHandler) for handler in logger.handlers):
        logger.addHandler(APILogHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the terminal already has the line from Progress's own stream

    def sink(line: str) -> None:
        # Asked per line: inside a stage the context is its task run, so the line lands on that task too.
        run_logger = get_run_logger()
        extra = dict(run_logger.extra or {}) if isinstance(run_logger, logging.LoggerAdapter) else {}
        PrefectLogAdapter(logger, extra=extra).info(line)

    return sink


class ProgressArtifacts:
    """A Progress board (quant_release/progress.py): one progress artifact per stage, `<stage>-progress`.

    Made on the stage's first update, inside its task run, so the artifact belongs to that task run and
    to the flow run; later updates change its value and description (Progress paces them).
    """

    def __init__(self) -> None:
        self._ids: dict[str, UUID] = {}

    def update(self, stage: str, percent: float, description: str) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        artifact_id = self._ids.get(stage)
        if artifact_id is None:
            created = create_progress_artifact(progress=percent, key=f"{stage}-progress", description=description)
            self._ids[stage] = cast(UUID, created)  # a UUID when called from synchronous code, as stages are
        else:
            update_progress_artifact(artifact_id, progress=percent, description=description)


def flow_run_tags() -> dict[str, str]:
    """The current flow run's id, name and UI URL, as MLflow tags (so an MLflow run leads back to Prefect)."""
    from prefect.runtime import deployment, flow_run

    tags = {"prefect.flow_run.id": str(flow_run.get_id() or ""), "prefect.flow_run.name": str(flow_run.get_name())}
    url = flow_run.get_flow_run_ui_url()
    if url:
        tags["prefect.flow_run.url"] = url
    if deployment.get_id():
        tags["prefect.deployment.name"] = f"{flow_run.get_flow_name()}/{deployment.get_name()}"
    return {key: value for key, value in tags.items() if value}


def cached(record: Record, message: str) -> Any:
    """A task's return value that ends its task run as Cached, not Completed.

    Prefect 3 has no Cached() constructor: its own cache hits are Completed states named "Cached", which
    the UI shows as Cached; a state a task returns is taken as its final state.
    """
    from prefect.states import Completed

    return Completed(name="Cached", data=record, message=message)


def mlflow_run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The MLflow UI page of a run, for a tracking server (a local store has no UI to link to).

    Without the credentials a tracking URI may carry (`http://user:password@host`): the link is stored in
    Prefect's database and shown to everyone who can see the flow run; a browser asks for them itself."""
    parts = urllib.parse.urlsplit(tracking_uri)
    if parts.scheme not in ("http", "https"):
        return None
    base = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def throughput_table(throughput: ThroughputResult) -> list[dict[str, Any]]:
    """One row per concurrency of the sweep: what the benchmark stage measured, BF16 against FP8."""
    return [
        {
            "concurrency": point.concurrency,
            "bf16_output_tok_s": round(point.bf16.output_throughput, 2),
            "fp8_output_tok_s": round(point.fp8.output_throughput, 2),
            "fp8_speedup": round(point.fp8_speedup, 3),
            "bf16_ttft_p50_ms": round(point.bf16.ttft_ms.p50, 2),
            "fp8_ttft_p50_ms": round(point.fp8.ttft_ms.p50, 2),
            "bf16_tpot_p50_ms": round(point.bf16.tpot_ms.p50, 3),
            "fp8_tpot_p50_ms": round(point.fp8.tpot_ms.p50, 3),
        }
        for point in throughput.sweep
    ]


def links(
    *, mlflow_url: str | None, artifact_uri: str | None, hub_url: str | None, hub_revision: str | None
) -> dict[str, str]:
    """Artifact key → link, for each place the run wrote to that has an address."""
    found: dict[str, str] = {}
    if mlflow_url:
        found["mlflow-run"] = mlflow_url
    if artifact_uri:
        found["release-artifacts"] = artifact_uri  # s3://... as is: S3-compatible stores have no common console
    if hub_url:
        found["hub-commit"] = f"{hub_url.rstrip('/')}/tree/{hub_revision}" if hub_revision else hub_url
    return found


def publish_artifacts(throughput: ThroughputResult | None, link_targets: dict[str, str], run_id: str) -> None:
    """The throughput table and the links, as artifacts of the current flow run."""
    from prefect.artifacts import create_link_artifact, create_table_artifact

    if throughput is not None:
        create_table_artifact(
            table=throughput_table(throughput),
            key="throughput",
            description=f"quant-release run {run_id}: output tokens/s and latency per concurrency, BF16 vs FP8",
        )
    for key, link in link_targets.items():
        create_link_artifact(link=link, link_text=link, key=key, description=f"quant-release run {run_id}: {key}")
