"""The one device resolver, and the package versions recorded with every run."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from quant_release import environment
from quant_release.environment import resolved_device, torch_built_for_gpu
from quant_release.errors import EngineUnavailableError


def _fake_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cuda: str) -> None:
    package = tmp_path / "torch"
    package.mkdir()
    (package / "version.py").write_text(f"from typing import Optional\ncuda: Optional[str] = {cuda}\nhip = None\n")
    spec = importlib.machinery.ModuleSpec("torch", None, is_package=True)
    spec.submodule_search_locations = [str(package)]
    real = importlib.util.find_spec
    monkeypatch.setattr(
        environment.importlib.util, "find_spec", lambda name, *a: spec if name == "torch" else real(name, *a)
    )


def test_cpu_build_is_recognised_without_importing_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_torch(tmp_path, monkeypatch, "None")
    assert torch_built_for_gpu() is False
    assert resolved_device("auto") == "cpu"
    with pytest.raises(EngineUnavailableError, match="device=cuda was requested") as info:
        resolved_device("cuda")
    assert info.value.exit_code == 4


def test_gpu_build_asks_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_torch(tmp_path, monkeypatch, "'12.8'")
    assert torch_built_for_gpu() is True


def test_the_installed_torch_agrees() -> None:
    """This machine's answer without torch equals torch's own (in a fresh process, so torch is not loaded yet)."""
    code = (
        "import sys; from quant_release.environment import resolved_device\n"
        "device = resolved_device('auto'); loaded = 'torch' in sys.modules\n"
        "import torch; print(device, torch.cuda.is_available(), loaded)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    device, cuda, loaded = out
    assert device == ("cuda" if cuda == "True" else "cpu")
    if not torch_built_for_gpu():
        assert loaded == "False"
    assert resolved_device("cpu") == "cpu"


def test_package_versions_name_every_package() -> None:
    versions = environment.package_versions()
    assert set(versions) == {"python", *environment.PACKAGES}
    assert environment.package_version("no-such-distribution-qr") == "not installed"
