"""cnn_dailymail 3.0.0 news articles, streamed through `datasets`, as NVIDIA's FP8 releases calibrate."""

from __future__ import annotations

import os

from quant_release.calibration import register
from quant_release.errors import ConfigError

DATASET = ("abisee/cnn_dailymail", "3.0.0")
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


@register(
    "cnn_dailymail",
    "news articles, streamed through `datasets` (needs the Hub)",
    auto_rank=0,
    available=lambda endpoint: hub_dataset_reachable(DATASET[0], endpoint),
)
def documents(samples: int) -> list[str]:
    """The first training articles, streamed (no full download); `datasets` reads HF_ENDPOINT itself."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise ConfigError("calib_dataset=cnn_dailymail needs the `datasets` package") from exc
    # Articles are ~800 tokens; two per calibration window fill every window.
    count = max(samples, 1) * 2
    stream = datasets.load_dataset(*DATASET, split="train", streaming=True)
    articles: list[str] = []
    for row in stream:
        articles.append(str(row["article"]))
        if len(articles) >= count:
            break
    return articles
