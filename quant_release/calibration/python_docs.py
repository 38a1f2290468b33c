"""python-docs: the English reference text that ships with CPython. Offline; the fallback of `auto`."""

from __future__ import annotations

from quant_release import textdata
from quant_release.calibration import register


@register(
    "python-docs",
    "the English reference text that ships with CPython (offline)",
    auto_rank=1,
)
def documents(samples: int) -> list[str]:
    del samples  # ~465k characters: enough for any sane request, reused beyond that (textdata.token_windows)
    # The calibration split only: the held-out topics are the build stage's fidelity probe.
    return textdata.python_docs("calibration")
