"""Finished stage results on disk, keyed by everything that determines them.

Layout: STATE_DIR/stages/<stage>/<key>/{record.json, ...outputs}. A stage writes into a private
temporary directory; only when it returned does the directory move into place (one rename), with
record.json inside. So a crash leaves no half-written result that a later run could mistake for a
finished one, and re-running a stage never destroys the previous result until the new one exists.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from quant_release import integrity
from quant_release.atomic import write_text_atomic
from quant_release.records import Record
from quant_release.sweep import work_name

# Bump when a stage's outputs change meaning in a way the keys do not see (the code version of each
# stage is part of its key already), so old results stop matching. 4: keys include code versions.
STORE_VERSION = 4
R = TypeVar("R", bound=Record)


def canonical_json(value: Any) -> str:
    def default(obj: Any) -> Any:
        if isinstance(obj, BaseModel):
            return obj.model_dump(mode="json")
        if isinstance(obj, Path):
            return str(obj)
        raise TypeError(f"cannot key on {type(obj).__name__}")

    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=default)


def cache_key(stage: str, inputs: Mapping[str, Any]) -> str:
    """First 20 hex digits of sha256 over the stage name, store version and canonical inputs."""
    payload = canonical_json({"stage": stage, "version": STORE_VERSION, "inputs": dict(inputs)})
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


class StageStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        # Files hashed again on reuse because their stat changed (observable by tests; see integrity.py).
        self.rehashed: list[Path] = []

    def result_dir(self, stage: str, key: str) -> Path:
        return self.root / "stages" / stage / key

    def load(self, stage: str, key: str, record_type: type[R]) -> R | None:
        return self.load_checked(stage, key, record_type)[0]

    def load_checked(self, stage: str, key: str, record_type: type[R]) -> tuple[R | None, str | None]:
        """The finished record, or None and (when a result exists but is not trusted) one line saying why."""
        result = self.result_dir(stage, key)
        record_file = result / "record.json"
        if not record_file.is_file():
            return None, None
        try:
            record = record_type.model_validate_json(record_file.read_text())
        except ValueError:
            # An unreadable record (older format, manual edits) is treated as absent, not trusted.
            return None, f"{record_file} is unreadable"
        # Outputs deleted or truncated since: the stage runs again instead of handing on a broken path.
        missing = record.missing_outputs()
        if missing:
            return None, f"{missing[0]} is missing or changed size"
        if integrity.has_stamps(result):  # results committed before stamps existed: sizes only, as above
            verdict = integrity.verify(result)
            self.rehashed.extend(verdict.rehashed)
            if verdict.problem:
                return None, verdict.problem
        return record, None

    @contextlib.contextmanager
    def writing(self, stage: str, key: str) -> Iterator[Path]:
        """A fresh temporary directory for the stage to fill; see `commit`. Removed if the stage fails."""
        parent = self.root / "stages" / stage
        parent.mkdir(parents=True, exist_ok=True)
        work = parent / work_name("partial", key)  # names its owner: quant_release/sweep.py
        work.mkdir()
        try:
            yield work
        finally:
            if work.exists():
                shutil.rmtree(work, ignore_errors=True)

    def commit(self, stage: str, key: str, work: Path, record: R) -> R:
        """Write record.json into `work`, then move it to the result directory in one rename.

        Paths inside the record that point into `work` are rewritten to the final location.
        """
        final = self.result_dir(stage, key)
        relocated = type(record).model_validate_json(
            record.model_dump_json().replace(json.dumps(str(work))[1:-1], json.dumps(str(final))[1:-1])
        )
        write_text_atomic(work / "record.json", relocated.model_dump_json(indent=2))
        # Stamped last, with the hashes the stage computed already, so a same-size corruption is caught.
        integrity.stamp(work, record.hashed_files())
        if final.exists():
            # A re-run replaces the old result only now that the new one is complete.
            trash = final.with_name(work_name("old", key))
            final.replace(trash)
            work.replace(final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            work.replace(final)
        return relocated
