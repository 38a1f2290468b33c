"""Calibration text sources, by registry: `quantization.calib_dataset` chooses one by name.

A source is a function returning documents (plain strings) for `samples` calibration windows, registered
with `@register(name, description)`. Every module in this package is imported on first import of the
package, so adding a source is one module with one registration (see python_docs.py): the config's
choices, the CLI's `--calib-dataset` choices and the Prefect form's dropdown come from `SOURCES`.

`auto` tries the sources that have an `auto_rank`, lowest first, and picks the first that is
`available` (cnn_dailymail when the Hub answers, else python-docs), once, in preflight.

Sources with arguments come from a *family* (`@register_family`): a parser that recognises its specs,
e.g. `file:PATH` (hub_dataset.py, local_file.py). A spec is checked in preflight (`resolve`: the file
exists, the Hub answers), so a typo costs seconds, not a model download.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

from quant_release.errors import ConfigError

AUTO = "auto"
Documents = Callable[[int], list[str]]
# A family of sources named by a spec (`file:PATH`, `NAME:CONFIG:SPLIT:COLUMN`): spec -> documents, or
# None when the spec is not of this family. Raises ConfigError for a spec of its family that is malformed.
Family = Callable[[str], "CalibrationSource | None"]


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
    # What the quantize stage's cache key records beyond the name: a file's sha256, a dataset's commit.
    identity: Callable[[], str | None] = lambda: None


SOURCES: dict[str, CalibrationSource] = {}
FAMILIES: dict[str, tuple[str, Family]] = {}  # name -> (what its specs look like, parser)


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


def register_family(name: str, syntax: str) -> Callable[[Family], Family]:
    """Register a parser of specs that name a source with arguments (a file, any Hub dataset)."""

    def decorate(parse: Family) -> Family:
        if name in FAMILIES:
            raise ValueError(f"calibration source family {name!r} is registered twice")
        FAMILIES[name] = (syntax, parse)
        return parse

    return decorate


def choices() -> tuple[str, ...]:
    """What `quantization.calib_dataset` accepts: `auto` and every registered source."""
    return (AUTO, *sorted(SOURCES))


def auto_order() -> list[str]:
    """The sources `auto` tries, in order."""
    ranked = sorted((s for s in SOURCES.values() if s.auto_rank is not None), key=lambda s: s.auto_rank or 0)
    return [s.name for s in ranked]


def source(name: str) -> CalibrationSource:
    """A registered source by name, or the source a family's spec names (parsed, not yet read)."""
    if name in SOURCES:
        return SOURCES[name]
    if name != AUTO:
        for _, parse in FAMILIES.values():
            found = parse(name)
            if found is not None:
                return found
    forms = "; ".join(syntax for syntax, _ in FAMILIES.values())
    raise ConfigError(f"unknown calibration dataset {name!r}; known: {', '.join(choices())}; or {forms}")


def resolve(requested: str, endpoint: str) -> str:
    """Turn `auto` into a concrete source name, once, before the run, so the cache key is stable."""
    if requested != AUTO:
        chosen = source(requested)
        # Asked for by name: a source that cannot be reached now fails here, not after the download.
        if not chosen.available(endpoint):
            where = f"{chosen.description}; Hub {endpoint}" if chosen.name in SOURCES else chosen.description
            raise ConfigError(
                f"--calib-dataset {chosen.name}: not available now ({where}); "
                f"choose another with --calib-dataset ({', '.join(choices())})"
            )
        return chosen.name
    from quant_release.netlimits import single_attempt

    with single_attempt():  # a probe: an absent Hub means "next source", not a retry with backoff
        for name in auto_order():
            if SOURCES[name].available(endpoint):
                return name
    raise ConfigError("calib_dataset=auto: no calibration source is available; choose one with --calib-dataset")


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
