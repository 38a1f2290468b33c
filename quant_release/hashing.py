"""Content hashes for checkpoints and artifacts: one sha256 per file, one fingerprint per set of files.

Stages use these to name cache entries and to check that what was downloaded is what was uploaded.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

from quant_release.records import FileDigest

# Large enough that Python's per-call overhead vanishes next to disk reads; small enough to stay
# cheap in memory when several hashes run at once.
CHUNK_BYTES = 8 * 1024 * 1024


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks so multi-GB safetensors never sit in memory whole."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def iter_files(directory: str | os.PathLike[str]) -> list[Path]:
    """Every regular file under `directory` (recursively), sorted by POSIX relative path.

    Symlinked directories are not followed, so a link cannot pull in files from elsewhere or loop;
    a symlink to a file counts as that file (Hugging Face caches link to blobs), a dangling one raises.
    """
    root = Path(directory)
    if not root.is_dir():
        raise NotADirectoryError(f"not a directory: {root}")
    found: list[Path] = []
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_file():
                found.append(path)
            elif path.is_symlink() and not path.exists():
                # A file the set should have but cannot read: better no digest than a wrong one.
                raise FileNotFoundError(f"dangling symlink: {path} -> {path.readlink()}")
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def digest_dir(directory: str | os.PathLike[str]) -> list[FileDigest]:
    """(relative POSIX path, size, sha256) for every file under `directory`, sorted by path."""
    root = Path(directory)
    return [
        FileDigest(path=path.relative_to(root).as_posix(), size=path.stat().st_size, sha256=sha256_file(path))
        for path in iter_files(root)
    ]


def fingerprint(items: Iterable[FileDigest | tuple[str, str]]) -> str:
    """One sha256 over a set of (path, sha256) pairs, independent of their order.

    Sizes are left out on purpose: the file hash already covers the content.
    """
    pairs = sorted((item.path, item.sha256) if isinstance(item, FileDigest) else item for item in items)
    digest = hashlib.sha256()
    for path, file_sha in pairs:
        # NUL and newline cannot appear in a hex digest, and NUL not in a path: no two sets collide.
        digest.update(path.encode("utf-8") + b"\0" + file_sha.encode("ascii") + b"\n")
    return digest.hexdigest()


def tensor_shapes(checkpoint_dir: str | os.PathLike[str]) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a directory's .safetensors files, from the headers alone (no weights read)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for shard in sorted(Path(checkpoint_dir).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes
