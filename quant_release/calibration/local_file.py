"""A local file as calibration text: `file:PATH`, plain text (.txt, .md: paragraphs separated by blank
lines are the documents) or JSON lines (.jsonl: one document per line, its `text` field, or the line
itself when it is a JSON string)."""

from __future__ import annotations

import functools
import json
from pathlib import Path

from quant_release.calibration import CalibrationSource, register_family
from quant_release.errors import ConfigError
from quant_release.hashing import sha256_file

PREFIX = "file:"
JSONL_FIELD = "text"


def read_documents(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"calibration file {path}: cannot read it: {exc}") from exc
    if path.suffix != ".jsonl":
        return [p.strip() for p in text.split("\n\n") if p.strip()]
    documents = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"calibration file {path}, line {number}: not JSON ({exc.msg})") from None
        value = row.get(JSONL_FIELD) if isinstance(row, dict) else row
        if not isinstance(value, str):
            raise ConfigError(
                f"calibration file {path}, line {number}: expected a string or an object with {JSONL_FIELD!r}"
            )
        if value.strip():
            documents.append(value.strip())
    return documents


def _documents(path: Path, samples: int) -> list[str]:
    del samples  # the whole file: it is local, and the windows take what they need
    return read_documents(path)


@register_family("file", "file:PATH for a local .txt or .jsonl file")
def parse(spec: str) -> CalibrationSource | None:
    if not spec.startswith(PREFIX):
        return None
    path = Path(spec.removeprefix(PREFIX)).expanduser()
    if not spec.removeprefix(PREFIX):
        raise ConfigError("calibration dataset file: needs a path, e.g. file:/data/calib.jsonl")
    return CalibrationSource(
        name=spec,
        description=f"the local file {path}",
        documents=functools.partial(_documents, path),
        available=lambda endpoint: path.is_file(),
        auto_rank=None,
        identity=lambda: sha256_file(path) if path.is_file() else None,
    )
