"""Peak memory of a stage: host RSS of this process and, where CUDA is in use, GPU memory per GPU.

Host: Linux keeps a resettable high-water mark of the resident set (`VmHWM` in /proc/self/status,
reset by writing 5 to /proc/self/clear_refs), so a stage's own peak is exact, not sampled. Where that
cannot be reset (not Linux), the process's lifetime peak is reported and `rss_scope` says so. Engines
that run in child processes (vLLM, TensorRT-LLM workers) are not in this figure.

GPU: PyTorch's caching allocator's peak reserved bytes per device (what the process held from the
driver; CUDA context and other libraries' allocations are not counted). Only read when torch is
already imported and CUDA initialized: a CPU-only stage never imports torch for this.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

CLEAR_REFS = Path("/proc/self/clear_refs")
STATUS = Path("/proc/self/status")


@dataclass
class PeakMemory:
    """Use as `with PeakMemory() as peak: ...`; afterwards `peak.rss_bytes`, `peak.gpu_bytes`."""

    rss_bytes: int | None = None
    rss_scope: Literal["stage", "process"] = "stage"
    gpu_bytes: dict[str, int] = field(default_factory=dict)

    def __enter__(self) -> PeakMemory:
        try:
            CLEAR_REFS.write_text("5")
        except OSError:
            self.rss_scope = "process"
        for index in _cuda_devices():
            import torch

            torch.cuda.reset_peak_memory_stats(index)
        return self

    def __exit__(self, *exc: object) -> None:
        self.rss_bytes = _peak_rss()
        for index in _cuda_devices():
            import torch

            self.gpu_bytes[f"cuda:{index}"] = int(torch.cuda.max_memory_reserved(index))


def peaks_so_far() -> tuple[int | None, dict[str, int]]:
    """Host and per-GPU peaks since the enclosing PeakMemory began, without resetting them."""
    gpu: dict[str, int] = {}
    for index in _cuda_devices():
        import torch

        gpu[f"cuda:{index}"] = int(torch.cuda.max_memory_reserved(index))
    return _peak_rss(), gpu


def _peak_rss() -> int | None:
    try:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def _cuda_devices() -> range:
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return range(0)
    return range(torch.cuda.device_count())
