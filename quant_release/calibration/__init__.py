"""Calibration text sources, by registry: `quantization.calib_dataset` chooses one by name.

A source is a function returning documents (plain strings) for `samples` calibration windows, registered
with `@register(name, description)`. Every module in this package is imported on first import of the
package, so adding a source is one module with one registration (see python_docs.py): the config's
choices, the CLI's `--calib-dataset` choices and the Prefect form's dropdown come from `SOURCES`.

`auto` tries the sources that have an `auto_rank`, lowest first, and picks the first that is
`available` (cnn_dailymail when the Hub answers, else python-docs), once, in preflight.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

from quant_release.errors import ConfigError

AUTO = "auto"
Documents = Callable[[int], list[str]]


def _always(endpoint: str) -> bool:
    del endpoint
    return True


@dataclass(frozen=True)
class CalibrationSource:
    name: str
    description: str
    documents: Documents  # (calibration windows wanted) -> enough documents to cut them from
    available: Callable[[str], bool]  # (Hub endpoint) -> usable now; asked only by `auto`
    auto_rank: int | None  # order in which `auto` tries it; None: only when chosen by name


SOURCES: dict[str, CalibrationSource] = {}


def register(
    name: str, description: str, *, auto_rank: int | None = None, available: Callable[[str], bool] = _always
) -> Callable[[Documents], Documents]:
    """Register the decorated `documents(samples) -> list[str]` function as calibration source `name`."""

    def decorate(documents: Documents) -> Documents:
        if name in SOURCES or name == AUTO:
            raise ValueError(f"calibration source {name!r} is registered twice (or is reserved)")
        SOURCES[name] = CalibrationSource(name, description, documents, available, auto_rank)
        return documents

    return decorate


def choices() -> tuple[str, ...]:
    """What `quantization.calib_dataset` accepts: `auto` and every registered source."""
    return (AUTO, *sorted(SOURCES))


def auto_order() -> list[str]:
    """The sources `auto` tries, in order."""
    ranked = sorted((s for s in SOURCES.values() if s.auto_rank is not None), key=lambda s: s.auto_rank or 0)
    return [s.name for s in ranked]


def source(name: str) -> CalibrationSource:
    try:
        return SOURCES[name]
    except KeyError:
        raise ConfigError(f"unknown calibration dataset {name!r}; known: {', '.join(choices())}") from None


def resolve(requested: str, endpoint: str) -> str:
    """Turn `auto` into a concrete source name, once, before the run, so the cache key is stable."""
    if requested != AUTO:
        chosen = source(requested)
        # Asked for by name: a source that cannot be reached now fails here, not after the download.
        if not chosen.available(endpoint):
            raise ConfigError(
                f"--calib-dataset {chosen.name}: not available now ({chosen.description}; Hub {endpoint}); "
                f"choose another with --calib-dataset ({', '.join(choices())})"
            )
        return chosen.name
    for name in auto_order():
        if SOURCES[name].available(endpoint):
            return name
    raise ConfigError("calib_dataset=auto: no calibration source is available; choose one with --calib-dataset")


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
