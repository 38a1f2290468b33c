"""A cached stage is reused only while its files are what the stage wrote (quant_release/integrity.py).

The real CLI quantizes a tiny Llama; then the exported checkpoint is corrupted in place without
changing its size or inode (a tensor key renamed inside the safetensors header, as a bad disk, a stray
editor or a careless tool could): the rerun names the file and quantizes again instead of reporting
`cached`. An untouched result is reused without reading its weights again.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from quant_release.records import QuantizedCheckpoint
from quant_release.state import StageStore
from tests.support.tiny import make_tiny_llama
from tests.unit.test_cli_bad_input import PREFIX, SCRIPT, SCRUBBED

pytestmark = pytest.mark.integration

QUICK = [
    "--stages", "download", "quantize", "--calib-dataset", "python-docs", "--calib-samples", "8", "--calib-seq", "32",
    "--fidelity-tokens", "64", "--override-fidelity-gate",
]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def _run(tmp_path: Path, model: Path) -> tuple[dict[str, dict[str, str]], str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED and not k.startswith("QUANT_RELEASE_")}
    env.update({"QUANT_RELEASE_STATE_DIR": str(tmp_path / "state"), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)})
    summary = tmp_path / "summary.json"
    proc = subprocess.run(
        [str(SCRIPT), "run", "--model", str(model), *QUICK, "--summary-json", str(summary)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and PREFIX not in proc.stderr, proc.stderr
    stages: dict[str, dict[str, str]] = json.loads(summary.read_text())["stages"]
    return stages, proc.stderr


def _quantized(state: Path) -> tuple[StageStore, str]:
    (result,) = (state / "stages" / "quantize").iterdir()
    return StageStore(state), result.name


def test_a_same_size_corruption_of_a_cached_checkpoint_reruns_the_stage(tmp_path: Path, tiny_model: Path) -> None:
    state = tmp_path / "state"
    first, _ = _run(tmp_path, tiny_model)
    assert first["quantize"]["status"] == "completed"

    # Untouched: trusted from the stamps alone, no file hashed again; the CLI reuses it.
    store, key = _quantized(state)
    record = store.load("quantize", key, QuantizedCheckpoint)
    assert record is not None and store.rehashed == []
    again, _ = _run(tmp_path, tiny_model)
    assert again["quantize"]["status"] == "cached"

    (weights,) = record.checkpoint_dir.glob("*.safetensors")
    before = weights.stat()
    data = weights.read_bytes()
    assert b'weight_scale"' in data
    with weights.open("r+b") as handle:  # in place: same inode, same size
        handle.write(data.replace(b'weight_scale"', b'weight_scalf"', 1))
    assert (weights.stat().st_size, weights.stat().st_ino) == (before.st_size, before.st_ino)

    third, stderr = _run(tmp_path, tiny_model)
    assert third["download"]["status"] == "cached"
    assert third["quantize"]["status"] == "completed", stderr
    notes = [line for line in stderr.splitlines() if "finished result not reused" in line]
    assert notes == [f"[quantize] finished result not reused: {weights} changed since the stage wrote it (sha256 "
                     "differs)"], stderr  # fmt: skip
    # The rerun wrote a whole new result over the corrupted one.
    assert b'weight_scalf"' not in weights.read_bytes()
    store, key = _quantized(state)
    assert store.load("quantize", key, QuantizedCheckpoint) is not None and store.rehashed == []
