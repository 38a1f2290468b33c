"""MLflow tracking: one parent run per release run, a nested run per stage. The only module importing mlflow.

Uses `MlflowClient` with explicit run ids (no fluent global "active run"), so nothing leaks between
runs in one process. The tracking URI is checked before any heavy work, and anything that could hold
a secret (credentials inside URIs, token-like values) is redacted before it is logged.
"""

from __future__ import annotations

import base64
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quant_release.errors import SECRET_WORDS, ConfigError, TrackingUnreachableError, redact

if TYPE_CHECKING:
    from quant_release.system_metrics import SystemMetricsSampler

# Stores with a model registry: a tracking server and the database stores. MLflow's file store has none.
_REGISTRY_SCHEMES = {"http", "https", "sqlite", "postgresql", "mysql", "mssql", "databricks"}
_SUPPORTED_SCHEMES = {"http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks"}
_SECRET_KEY = re.compile(SECRET_WORDS, re.IGNORECASE)
_PARAM_MAX = 6000  # MLflow's limit on a param value


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → {"section.field": "value"}, secrets redacted, values cut to MLflow's limit."""
    out: dict[str, str] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
            continue
        text = "***" if _SECRET_KEY.search(str(key)) and value else redact(str(value))
        out[name] = text[:_PARAM_MAX]
    return out


def check_tracking_uri(uri: str, timeout: float = 10.0) -> None:
    """Fail fast on a URI MLflow cannot use: unknown scheme, or a server that does not answer."""
    scheme = urllib.parse.urlsplit(uri).scheme.split("+")[0]
    if not scheme:
        return  # a plain directory: MLflow's file store
    if scheme not in _SUPPORTED_SCHEMES:
        raise ConfigError(f"MLFLOW_TRACKING_URI {redact(uri)!r}: unsupported scheme {scheme or '(none)'!r}")
    if scheme in ("http", "https"):
        parts = urllib.parse.urlsplit(uri.rstrip("/") + "/health")
        # urllib takes `user:password@host` for a host name: send the credentials as MLflow's client
        # does (basic auth), to the host alone.
        host = parts.netloc.rpartition("@")[2]
        request = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=host)))
        if parts.username is not None:
            pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            request.add_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                if response.status != 200:
                    raise ConfigError(f"MLflow server {redact(uri)} answered {response.status} on /health")
        except (urllib.error.URLError, OSError, ValueError) as exc:  # ValueError: UnicodeError of a bad host
            reason = getattr(exc, "reason", exc)
            raise ConfigError(f"MLflow server {redact(uri)} is not reachable: {reason}") from exc


@dataclass(frozen=True)
class DatasetRef:
    """An input of a release run, for MLflow's `log_input` (the run page's Datasets, searchable by digest)."""

    name: str
    fingerprint: str  # our sha256 (hex); MLflow keeps at most 36 characters as the digest, the whole as a tag
    uri: str  # where it came from: a URL, a path, s3://..., or our own spec (pypi:..., python-docs)
    context: str  # MLflow's `mlflow.data.context` input tag: model, calibration, evaluation


def supports_registry(tracking_uri: str) -> bool:
    """Whether the tracking store has MLflow's model registry (a server or a database; not a directory)."""
    return urllib.parse.urlsplit(tracking_uri).scheme.split("+")[0] in _REGISTRY_SCHEMES


def _dataset_source(uri: str) -> Any:
    """MLflow's own source type for URLs, s3:// and paths; our spec strings (pypi:..., python-docs) as they are."""
    from mlflow.data.dataset_source import DatasetSource
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    scheme = urllib.parse.urlsplit(uri).scheme
    if scheme in ("http", "https"):
        return HTTPDatasetSource(uri)  # type: ignore[no-untyped-call]  # mlflow leaves it unannotated
    if scheme == "s3" or uri.startswith("/"):
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source

        with warnings.catch_warnings():  # a path matches MLflow's local source twice, which it warns about
            warnings.simplefilter("ignore", UserWarning)
            return resolve_dataset_source(uri)

    class SpecSource(DatasetSource):
        """A source MLflow has no type for; shown with its spec, never loaded by MLflow."""

        def __init__(self, spec: str) -> None:
            self.spec = spec

        @staticmethod
        def _get_source_type() -> str:
            return "quant_release"

        def load(self, **kwargs: Any) -> Any:
            raise NotImplementedError(f"{self.spec}: load it with quant-release")

        @staticmethod
        def _can_resolve(raw_source: Any) -> bool:
            return False

        @classmethod
        def _resolve(cls, raw_source: Any) -> SpecSource:
            return cls(str(raw_source))

        def to_dict(self) -> dict[str, Any]:
            return {"uri": self.spec}

        @classmethod
        def from_dict(cls, source_dict: dict[str, Any]) -> SpecSource:
            return cls(source_dict["uri"])

    return SpecSource(uri)


class Tracker:
    """A parent MLflow run and its nested stage runs."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        artifact_location: str | None = None,
        system_metrics_interval: float | None = None,
    ) -> None:
        """`system_metrics_interval`: seconds between system metric samples in each stage run; None: none."""
        from mlflow.tracking import MlflowClient

        if "@" in urllib.parse.urlsplit(tracking_uri).netloc:
            # MLflow prints "View run ... at: <tracking URI>" on every run end, password included.
            os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        self.tracking_uri = tracking_uri
        self.client: MlflowClient = _FailFastClient(MlflowClient(tracking_uri=tracking_uri), tracking_uri)  # type: ignore[assignment]
        existing = self.client.get_experiment_by_name(experiment)
        if existing is not None and existing.lifecycle_stage == "deleted":
            raise ConfigError(
                f"MLflow experiment {experiment!r} is deleted; restore it in MLflow or choose another --experiment"
            )
        if existing is not None:
            self.experiment_id = existing.experiment_id
        else:
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=artifact_location)
        self.parent_run_id: str | None = None
        self.system_metrics_interval = system_metrics_interval
        # (run, key, step) -> value already logged: logging it again would add a point to the metric's history.
        self._logged: dict[tuple[str, str, int], float] = {}

    # -- parent run ----------------------------------------------------------------------------
    def start(self, run_name: str | None, params: Mapping[str, Any], tags: Mapping[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=_redacted(tags))
        self.parent_run_id = run.info.run_id
        self.log_params(self.parent_run_id, params)
        return self.parent_run_id

    def finish(self, status: str) -> None:
        if self.parent_run_id:
            self.client.set_terminated(self.parent_run_id, status=status)

    # -- stage runs ----------------------------------------------------------------------------
    @contextmanager
    def stage(
        self, name: str, tags: Mapping[str, str] | None = None, warn: Callable[[str], None] | None = None
    ) -> Iterator[str]:
        """A nested run for one stage; FAILED (with the error as a tag) if the body raises.

        While it is open, system metrics are sampled into it (`system_metrics_interval`); sampling ends before
        the run does, whatever ends it. `warn` gets the one line saying why sampling stopped early, if it did.
        """
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        from quant_release.sweep import owner_tags

        all_tags = {"stage": name, **owner_tags(), **(tags or {})}
        if self.parent_run_id:
            all_tags[MLFLOW_PARENT_RUN_ID] = self.parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=_redacted(all_tags))
        run_id = run.info.run_id
        sampler = self._start_sampling(run_id)
        try:
            yield run_id
        except BaseException as exc:
            from quant_release.signals import is_interrupt

            _stop_sampling(sampler, warn)
            try:
                self.set_tags(run_id, {"error": str(exc) or type(exc).__name__})
                self.client.set_terminated(run_id, status="KILLED" if is_interrupt(exc) else "FAILED")
            except Exception:  # MLflow failing too: `exc` is still the error to report (the next run closes it)
                pass
            raise
        _stop_sampling(sampler, warn)
        self.client.set_terminated(run_id, status="FINISHED")

    def _start_sampling(self, run_id: str) -> SystemMetricsSampler | None:
        if self.system_metrics_interval is None:
            return None
        from mlflow.entities import Metric

        from quant_release.system_metrics import SystemMetricsSampler

        def log(values: Mapping[str, float], step: int) -> None:
            now = int(time.time() * 1000)
            metrics = [Metric(_metric_key(key), float(value), now, step) for key, value in values.items()]
            self.client.log_batch(run_id, metrics=metrics)

        sampler = SystemMetricsSampler(log, self.system_metrics_interval)
        sampler.start()
        return sampler

    # -- logging -------------------------------------------------------------------------------
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        flat = [Param(k, v) for k, v in flatten(params).items()]
        for first in range(0, len(flat), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(run_id, params=flat[first : first + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = []
        for k, v in metrics.items():
            key, value = _metric_key(k), float(v)
            if self._logged.get((run_id, key, step)) == value:
                continue
            self._logged[(run_id, key, step)] = value
            items.append(Metric(key, value, now, step))
        for first in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[first : first + 1000])

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in _redacted(tags).items()])

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, redact(text), artifact_file)

    def log_inputs(self, run_id: str, datasets: list[DatasetRef]) -> None:
        """The run's inputs as MLflow datasets (metadata only: name, digest, source), each with its context."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        inputs = []
        for ref in datasets:
            uri = redact(ref.uri)
            # MetaDataset's `profile` is abstract only in mlflow's stubs; the class implements it (None).
            dataset = MetaDataset(_dataset_source(uri), name=ref.name, digest=ref.fingerprint[:36])  # type: ignore[abstract]
            tags = [InputTag("mlflow.data.context", ref.context), InputTag("quant_release.sha256", ref.fingerprint)]
            inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=tags))
        if inputs:
            self.client.log_inputs(run_id, datasets=inputs)

    def register_model_version(
        self, name: str, source: str, run_id: str | None, tags: Mapping[str, str], description: str
    ) -> str:
        """A new version of registered model `name` (created on first use) whose files are at `source`."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name, description=description)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = self.client.create_model_version(
            name, source, run_id=run_id, tags=_redacted(tags), description=description
        )
        return str(version.version)

    def log_table(self, run_id: str, data: Mapping[str, list[Any]], artifact_file: str) -> None:
        """A table (columns of equal length) that MLflow's UI shows and compares across runs."""
        self.client.log_table(run_id, data=dict(data), artifact_file=artifact_file)


def _stop_sampling(sampler: SystemMetricsSampler | None, warn: Callable[[str], None] | None) -> None:
    if sampler is None:
        return
    sampler.stop()
    if sampler.error is not None and warn is not None:
        warn(f"system metrics stopped after {sampler.samples} samples: {redact(sampler.error)}")


def _redacted(tags: Mapping[str, str]) -> dict[str, str]:
    return {key: redact(str(value))[:5000] for key, value in tags.items()}


def _metric_key(key: str) -> str:
    # MLflow allows alphanumerics, _ - . space : / only.
    return re.sub(r"[^A-Za-z0-9_\-. :/]", "_", key)


# How MLflow's client says that urllib3 gave up on a request (every retry spent on connection errors, resets or
# read timeouts); the cause at the end: "[Errno 111] Connection refused", "Read timed out", ...
_RETRIES_SPENT = re.compile(r"Max retries exceeded.*?(\[Errno \d+\] [^'\")]+|Read timed out|RemoteDisconnected)", re.S)


class _FailFastClient:
    """An MlflowClient whose calls, once one has spent every retry against an unreachable server, fail as one
    clear `TrackingUnreachableError`, and whose later calls try once each (quant_release/netlimits.py:
    mlflow_retries_spent)."""

    def __init__(self, client: Any, tracking_uri: str) -> None:
        self._client = client
        self._uri = tracking_uri
        self._spent: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return attr(*args, **kwargs)
            except Exception as exc:
                spent = _RETRIES_SPENT.search(str(exc))
                if spent is None:
                    raise
                from quant_release import netlimits

                if not self._spent:  # the first call to give up says how long it tried; later ones say the same
                    retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "?")
                    self._spent.append(
                        f"MLflow server {redact(self._uri)} did not answer ({spent.group(1).strip()}) through "
                        f"{retries} retries (QUANT_RELEASE_NET_MLFLOW_OUTAGE); finished stages are kept, "
                        "rerun to resume"
                    )
                    netlimits.mlflow_retries_spent()
                raise TrackingUnreachableError(self._spent[0]) from exc

        return call
