"""Files that appear whole or not at all: write beside the target, then rename over it.

A rename within one directory is atomic, so a reader (another process, a crash-recovering rerun)
sees either the old file or the complete new one, never half of it.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

# Temporary names start and end like this, so listings and cleanups can tell them from real files.
PARTIAL_PREFIX = ".qr-"
PARTIAL_SUFFIX = ".partial"


def is_partial(path: Path) -> bool:
    return path.name.startswith(PARTIAL_PREFIX) and path.name.endswith(PARTIAL_SUFFIX)


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """A not-yet-existing temporary path beside `final`; the caller writes it, and it replaces `final`
    only if no error escapes. On error it is removed and `final` is left as it was."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{PARTIAL_PREFIX}{final.name}.{uuid.uuid4().hex[:8]}{PARTIAL_SUFFIX}")
    try:
        yield tmp
        tmp.replace(final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
