"""System metrics while a stage runs: CPU, host memory and, where NVIDIA GPUs are visible, each GPU's load.

A `SystemMetricsSampler` is a thread that takes a sample every `interval` seconds and once more when it is
stopped, and hands each to `log(values, step)`; the stage's MLflow run gets them (quant_release/tracking.py,
`Tracker.stage`). Names are MLflow's own (`system/cpu_utilization_percentage`, ...), so MLflow's UI shows
them on its System Metrics tab as it does for its own monitor.

Why not MLflow's `SystemMetricsMonitor`: it logs only after each full interval and drops the sample in
progress when stopped, so a stage shorter than the interval gets no point at all; an error while collecting
escapes its thread; it asks the server for the run's status before every sample. Here the last sample is
always taken at stop, so every stage has at least one.

A sampling or logging error never reaches the stage: sampling stops, and the error is handed back once, at
stop, to be reported by the caller's thread (Progress and Prefect's run logger are not for other threads).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

PREFIX = "system/"
THREAD_NAME = "quant-release-system-metrics"


class SystemMetricsSampler:
    """Use as `with SystemMetricsSampler(log, interval) as sampler: ...`; afterwards `sampler.error`."""

    def __init__(self, log: Callable[[Mapping[str, float], int], None], interval: float) -> None:
        if interval <= 0:
            raise ValueError(f"sampling interval must be positive, got {interval}")
        self.log = log
        self.interval = interval
        self.samples = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> SystemMetricsSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=THREAD_NAME, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Take the last sample and end the thread; returns once it has ended."""
        self._stop.set()
        if self._thread is not None:
            # Bounded: the last sample is one log call, under the MLflow client's own time limits.
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        try:
            import psutil

            psutil.cpu_percent()  # the first call only sets the origin that the next one measures from
            gpus = _Gpus()
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            return
        try:
            # wait() returns True once stopped: one more sample then, covering the time since the last one.
            while True:
                stopping = self._stop.wait(self.interval)
                self.log({PREFIX + key: value for key, value in _host(psutil).items()} | gpus.sample(), self.samples)
                self.samples += 1
                if stopping:
                    return
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            gpus.close()


def _host(psutil: Any) -> dict[str, float]:
    memory = psutil.virtual_memory()
    return {
        "cpu_utilization_percentage": float(psutil.cpu_percent()),  # all cores, since the previous sample
        "system_memory_usage_megabytes": memory.used / 1e6,
        "system_memory_usage_percentage": memory.used / memory.total * 100,
    }


class _Gpus:
    """NVIDIA GPUs through NVML (nvidia-ml-py), the ones CUDA_VISIBLE_DEVICES lets this process use.

    Numbered as CUDA numbers them in this process (`gpu_0` is `cuda:0`, as in peak_gpu0_bytes). No driver,
    no GPU or no nvidia-ml-py: no GPU metrics, which is not an error.
    """

    def __init__(self) -> None:
        self.handles: list[Any] = []
        self._nvml: Any = None
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # ImportError, or NVMLError without a driver (this CPU machine)
            return
        self._nvml = pynvml
        try:
            self.handles = _visible_handles(pynvml, os.environ.get("CUDA_VISIBLE_DEVICES"))
        except BaseException:
            self.close()
            raise

    def sample(self) -> dict[str, float]:
        values: dict[str, float] = {}
        for index, handle in enumerate(self.handles):
            memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            utilization = self._nvml.nvmlDeviceGetUtilizationRates(handle)
            values[f"{PREFIX}gpu_{index}_utilization_percentage"] = float(utilization.gpu)
            values[f"{PREFIX}gpu_{index}_memory_usage_megabytes"] = memory.used / 1e6
            values[f"{PREFIX}gpu_{index}_memory_usage_percentage"] = memory.used / memory.total * 100
        return values

    def close(self) -> None:
        if self._nvml is not None:
            self._nvml.nvmlShutdown()  # NVML counts its inits: this undoes ours only
            self._nvml = None


def _visible_handles(pynvml: Any, visible: str | None) -> list[Any]:
    if visible is None:
        return [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    handles = []
    for entry in (part.strip() for part in visible.split(",")):
        if not entry or entry.startswith("-"):
            break  # CUDA stops at the first invalid entry; "" and "-1" hide every GPU
        if entry.isdigit():
            handles.append(pynvml.nvmlDeviceGetHandleByIndex(int(entry)))
        else:  # a GPU-<uuid>; one NVML cannot find stops sampling like any other error
            handles.append(pynvml.nvmlDeviceGetHandleByUUID(entry))
    return handles
