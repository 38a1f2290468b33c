"""Any Hub dataset as calibration text: `NAME[:CONFIG]:SPLIT:COLUMN` (optionally `hf:` in front).

E.g. `abisee/cnn_dailymail:3.0.0:train:article` (what the `cnn_dailymail` source is) or
`wikitext:wikitext-103-raw-v1:train:text`. Rows are streamed through `datasets` (which reads
HF_ENDPOINT itself), in the dataset's order, so the same spec at the same dataset revision gives the
same documents; empty rows are skipped.
"""

from __future__ import annotations

import functools
import os

from quant_release.calibration import CalibrationSource, register_family
from quant_release.errors import ConfigError

PREFIX = "hf:"
# Rows asked for per calibration window: news articles fill a 512-token window in about one; shorter
# rows (a sentence per row) are read until the windows are full, see `stream_column`.
ROWS_PER_WINDOW = 2


_OFF = ("", "0", "false", "False")


def hub_dataset_reachable(repo_id: str, endpoint: str, timeout: float = 5.0) -> bool:
    """Whether the Hub answers for `repo_id` (a cheap metadata call, failing fast when offline)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in _OFF or os.environ.get("HF_DATASETS_OFFLINE", "0") not in _OFF:
        return False
    from huggingface_hub import HfApi

    try:
        HfApi(endpoint=endpoint).dataset_info(repo_id, timeout=timeout)
    except Exception:
        return False
    return True


def dataset_commit(repo_id: str) -> str | None:
    """The dataset's current commit on HF_ENDPOINT (what `datasets` will stream), None if unknown."""
    from huggingface_hub import HfApi

    try:
        return HfApi().dataset_info(repo_id, timeout=10).sha
    except Exception:
        return None  # preflight already checked that it answers; the token fingerprint still pins the data


def parse_spec(spec: str) -> tuple[str, str | None, str, str]:
    """`NAME[:CONFIG]:SPLIT:COLUMN` → (name, config, split, column); ConfigError when malformed."""
    parts = spec.removeprefix(PREFIX).split(":")
    if len(parts) not in (3, 4) or not all(parts) or "/" in "".join(parts[1:]):
        raise ConfigError(f"calibration dataset {spec!r}: expected NAME[:CONFIG]:SPLIT:COLUMN")
    if len(parts) == 3:
        return parts[0], None, parts[1], parts[2]
    return parts[0], parts[1], parts[2], parts[3]


def stream_column(name: str, config: str | None, split: str, column: str, count: int) -> list[str]:
    """The first `count` non-empty values of `column`, streamed (no full download)."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ConfigError("Hub calibration datasets need the `datasets` package") from exc
    stream = datasets.load_dataset(name, config, split=split, streaming=True)
    texts: list[str] = []
    for row in stream:
        if column not in row:
            raise ConfigError(
                f"calibration dataset {name}: split {split} has no column {column!r}; it has {sorted(row)}"
            )
        text = str(row[column] or "").strip()
        if text:
            texts.append(text)
        if len(texts) >= count:
            break
    return texts


def _documents(name: str, config: str | None, split: str, column: str, samples: int) -> list[str]:
    return stream_column(name, config, split, column, max(samples, 1) * ROWS_PER_WINDOW)


@register_family("hub", "NAME[:CONFIG]:SPLIT:COLUMN for a Hub dataset")
def parse(spec: str) -> CalibrationSource | None:
    if spec.startswith("file:") or spec.count(":") < 2:
        return None
    name, config, split, column = parse_spec(spec)
    return CalibrationSource(
        name=spec,
        description=f"column {column} of {name} ({config or 'default'}, {split}) from the Hub",
        documents=functools.partial(_documents, name, config, split, column),
        available=lambda endpoint: hub_dataset_reachable(name, endpoint),
        auto_rank=None,
        identity=functools.partial(dataset_commit, name),
    )
