"""cnn_dailymail 3.0.0 news articles, streamed through `datasets`, as NVIDIA's FP8 releases calibrate.

The same as the Hub dataset spec `abisee/cnn_dailymail:3.0.0:train:article` (hub_dataset.py), by name.
"""

from __future__ import annotations

from quant_release.calibration import register
from quant_release.calibration.hub_dataset import ROWS_PER_WINDOW, hub_dataset_reachable, stream_column

DATASET = ("abisee/cnn_dailymail", "3.0.0")
SPLIT, COLUMN = "train", "article"


@register(
    "cnn_dailymail",
    "news articles, streamed through `datasets` (needs the Hub)",
    auto_rank=0,
    available=lambda endpoint: hub_dataset_reachable(DATASET[0], endpoint),
)
def documents(samples: int) -> list[str]:
    """The first training articles, streamed (no full download); `datasets` reads HF_ENDPOINT itself."""
    # Articles are ~800 tokens; two per calibration window fill every window.
    return stream_column(*DATASET, SPLIT, COLUMN, max(samples, 1) * ROWS_PER_WINDOW)
