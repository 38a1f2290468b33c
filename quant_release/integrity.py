"""Is a finished stage result still what the stage wrote? Cheap to answer on every cache hit.

When a stage commits, every file of its result directory is stamped (`integrity.json`): sha256, size,
mtime_ns and inode. On reuse a file whose stat is unchanged is trusted without reading it; one whose
size, mtime or inode changed is hashed again, and a different sha256 makes the result "not finished"
(the stage runs again). A match (a `touch`, a copy back) refreshes the stamp, so it is hashed once.
Every .safetensors file's header is parsed on every reuse (a few KB each), whatever its stat says.

Writes in the same clock tick as the stamp would keep mtime unchanged ("racily clean", as git calls
it): the stamp file is written until its own mtime is later than every stamped file's, and a file is
trusted by stat only when its mtime is earlier than the stamp file's, so any later write is re-hashed.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ValidationError

from quant_release.atomic import write_text_atomic
from quant_release.hashing import iter_files, sha256_file

INTEGRITY_FILE = "integrity.json"
# A safetensors header beyond this is corrupt, not large (the format's own reader caps it at 100 MB).
MAX_HEADER_BYTES = 100_000_000


class FileStamp(BaseModel):
    path: str  # relative POSIX path inside the result directory
    size: int
    sha256: str
    mtime_ns: int
    inode: int


class Stamps(BaseModel):
    files: list[FileStamp]


@dataclass
class Verdict:
    """`problem`: None when the result can be trusted, else one line naming the file that changed."""

    problem: str | None = None
    rehashed: list[Path] = field(default_factory=list)


def stamp(directory: Path, known: Mapping[Path, str] | None = None) -> None:
    """Write `directory/integrity.json` for every file in it. `known`: sha256s the stage already
    computed (absolute path → hex), reused when the size still matches, so nothing is hashed twice."""
    known = {Path(p).resolve(): h for p, h in (known or {}).items()}
    files: list[FileStamp] = []
    for path in iter_files(directory):
        rel = path.relative_to(directory).as_posix()
        if rel == INTEGRITY_FILE:
            continue
        st = path.stat()
        sha = known.get(path.resolve()) or sha256_file(path)
        files.append(FileStamp(path=rel, size=st.st_size, sha256=sha, mtime_ns=st.st_mtime_ns, inode=st.st_ino))
    _write_after(directory / INTEGRITY_FILE, Stamps(files=files), max((f.mtime_ns for f in files), default=0))


def _write_after(target: Path, stamps: Stamps, newest_ns: int) -> None:
    # Rewritten until the file system clock has moved past the newest stamped file (one coarse tick,
    # a few ms), so "mtime earlier than the stamp file's" means "not written since it was stamped".
    for _ in range(200):
        write_text_atomic(target, stamps.model_dump_json(indent=1))
        if target.stat().st_mtime_ns > newest_ns or newest_ns > time.time_ns():
            return  # a file dated in the future cannot be waited out: it is re-hashed on each reuse
        time.sleep(0.005)


def has_stamps(directory: Path) -> bool:
    return (directory / INTEGRITY_FILE).is_file()


def verify(directory: Path) -> Verdict:
    """Check `directory` against its stamps; never raises (an unreadable file is a problem, not a crash)."""
    verdict = Verdict()
    stamp_file = directory / INTEGRITY_FILE
    try:
        stamps = Stamps.model_validate_json(stamp_file.read_text())
        stamped_ns = stamp_file.stat().st_mtime_ns
    except (OSError, ValueError, ValidationError) as exc:
        verdict.problem = f"{stamp_file} is unreadable ({type(exc).__name__})"
        return verdict
    refreshed = False
    for entry in stamps.files:
        path = directory / entry.path
        try:
            st = path.stat()
            same = (st.st_size, st.st_mtime_ns, st.st_ino) == (entry.size, entry.mtime_ns, entry.inode)
            if not (same and st.st_mtime_ns < stamped_ns):
                verdict.rehashed.append(path)
                if st.st_size != entry.size:
                    verdict.problem = f"{path} changed size since the stage wrote it ({entry.size} -> {st.st_size})"
                    return verdict
                if sha256_file(path) != entry.sha256:
                    verdict.problem = f"{path} changed since the stage wrote it (sha256 differs)"
                    return verdict
                entry.mtime_ns, entry.inode = st.st_mtime_ns, st.st_ino
                refreshed = True
            if path.suffix == ".safetensors":
                header_problem = safetensors_problem(path)
                if header_problem:
                    verdict.problem = f"{path}: {header_problem}"
                    return verdict
        except OSError as exc:
            verdict.problem = f"{path} cannot be read ({exc.strerror or type(exc).__name__})"
            return verdict
    if refreshed:
        # Same content, new stat: stamp it again so the next reuse does not hash it again.
        try:
            newest = max((f.mtime_ns for f in stamps.files), default=0)
            _write_after(stamp_file, stamps, newest)
        except OSError:
            pass  # a read-only state dir: correct, only slower next time
    return verdict


def safetensors_problem(path: Path) -> str | None:
    """None when the header parses and its tensors exactly cover the data, else what is wrong."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return "safetensors file shorter than its 8-byte header length"
        (length,) = struct.unpack("<Q", prefix)
        if length > min(size - 8, MAX_HEADER_BYTES):
            return f"safetensors header length {length} does not fit the file"
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        return "safetensors header is not valid JSON"
    if not isinstance(header, dict):
        return "safetensors header is not a JSON object"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"safetensors header entry {name!r} has no data offsets"
        begin, stop = offsets
        if not 0 <= begin <= stop:
            return f"safetensors header entry {name!r} has bad data offsets"
        end = max(end, stop)
    if end != size - 8 - length:
        return f"safetensors tensors cover {end} bytes of a {size - 8 - length}-byte data section"
    return None
