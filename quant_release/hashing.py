"""Content hashes: one sha256 per file, one fingerprint per set of files, one per piece of source code.

Stages use these to name cache entries, to check that what was stored is what was produced, and to
notice that the code behind a finished result has changed (`code_fingerprint`).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel

# Large enough that Python's per-call overhead vanishes next to disk reads; small enough to stay
# cheap in memory when several hashes run at once.
CHUNK_BYTES = 8 * 1024 * 1024


class FileDigest(BaseModel):
    """One file of a set (a checkpoint, a release folder): its relative POSIX path, size and sha256."""

    path: str
    size: int
    sha256: str


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


# --- source code ------------------------------------------------------------------------------------


def code_fingerprint(sources: Iterable[str]) -> str:
    """One sha256 over the code of `sources`, blind to comments, docstrings and formatting.

    Each source is a module (`tasks.evaluate`), a package (`quant_release.calibration`: every module
    in it) or a data file inside a package (`quant_release:templates/model_card.md.j2`, hashed as is).
    Modules are found without being imported, so hashing the engine's code does not load torch.
    """
    digest = hashlib.sha256()
    for source in sorted(set(sources)):
        digest.update(f"{source}\0{_source_hash(source)}\n".encode())
    return digest.hexdigest()


@functools.cache
def _source_hash(source: str) -> str:
    package, sep, resource = source.partition(":")
    if sep:
        return sha256_file(_package_dir(package) / resource)
    spec = importlib.util.find_spec(source)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"no module named {source!r}")
    if spec.submodule_search_locations:  # a package: all of its modules, by relative path
        root = Path(spec.origin).parent
        files = sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)
        return fingerprint((p.relative_to(root).as_posix(), syntax_hash(p.read_text())) for p in files)
    return syntax_hash(Path(spec.origin).read_text())


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"no package named {package!r}")
    return Path(spec.origin).parent


def syntax_hash(code: str) -> str:
    """sha256 of Python code's syntax tree without docstrings: comments, blank lines, line breaks and
    docstrings do not change it, any change to what the code does does."""
    tree = ast.parse(code)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and isinstance(body, list)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(json.dumps(_canonical(tree), separators=(",", ":")).encode()).hexdigest()


def _canonical(node: Any) -> Any:
    # Like ast.dump without positions, but leaving out empty fields, whose presence differs between
    # Python versions (3.12 added `type_params=[]` to every function): an interpreter upgrade alone
    # should not invalidate a finished download.
    if isinstance(node, ast.AST):
        fields = [[name, _canonical(value)] for name, value in ast.iter_fields(node) if value not in (None, [])]
        return [type(node).__name__, fields]
    if isinstance(node, list):
        return [_canonical(item) for item in node]
    return repr(node)
