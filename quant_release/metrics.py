"""The metric vocabulary: every number a run reports, defined once.

Each `Metric` names its canonical key (what MLflow logs, e.g. `mmlu/fp8`), the record it is read from and
how, and where else it appears: its `--summary-json` key, a row of the headline table (printed at the end
of a run, at the top of the model card and as the Prefect artifact), the card's `model-index`. Records
produce their metrics through this table (`Record.metrics()`), and the summary, MLflow's parent run, the
closing table, the card and the Prefect artifact all read from it, so a new metric is one entry here
(plus, if it is a new measurement, the record field it reads).

Keys are stable: dashboards and MLflow's compare view rely on them. Summary keys are a contract of
`--summary-json`: add, never rename.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from quant_release.records import (
    Engines,
    MmluResult,
    ModelSource,
    QuantizedCheckpoint,
    Record,
    ThroughputMeasurement,
    ThroughputResult,
    safetensors_bytes,
)

R = TypeVar("R", bound=Record)
Column = Literal["bf16", "fp8"]


@dataclass(frozen=True)
class Metric(Generic[R]):
    key: str  # canonical: the MLflow key
    record: type[R]
    value: Callable[[R], float | None]  # None: the record holds no such measurement (not measured, older record)
    label: str  # what a reader sees next to the number
    fmt: str = ".4g"  # format spec of the number
    suffix: str = ""  # after the formatted number, e.g. "x"
    summary: str | None = None  # key under `metrics` in --summary-json
    headline: Column | None = None  # column of the headline table (its row is `label`); needs `summary`
    model_index: str | None = None  # name of the MMLU result in the card's model-index

    def of(self, record: Record | None) -> float | None:
        value = self.value(record) if isinstance(record, self.record) else None
        return None if value is None else float(value)

    def format(self, value: float | None) -> str:
        return "-" if value is None else format(value, self.fmt) + self.suffix


@dataclass(frozen=True)
class MetricFamily(Generic[R]):
    """Metrics whose keys carry a name from the data, e.g. one per MMLU category."""

    key: str  # with {placeholders}, e.g. "mmlu/{variant}/category/{category}"
    record: type[R]
    values: Callable[[R], dict[str, float]]  # filled-in key -> value
    label: str

    def of(self, record: Record | None) -> dict[str, float]:
        return self.values(record) if isinstance(record, self.record) else {}

    def matches(self, key: str) -> bool:
        pattern = re.sub(r"\\\{[a-z_]+\\\}", "[^/]+", re.escape(self.key))
        return re.fullmatch(pattern, key) is not None


def _fidelity(field: str) -> Callable[[QuantizedCheckpoint], float | None]:
    """A figure of the checkpoint's fidelity report; None when fidelity was not measured."""

    def value(r: QuantizedCheckpoint) -> float | None:
        return float(getattr(r.fidelity, field)) if r.fidelity else None

    return value


def _per_variant(
    key: str, value: Callable[[ThroughputMeasurement], float], label: str, fmt: str
) -> tuple[Metric[ThroughputResult], ...]:
    """The BF16 and the FP8 metric of one throughput measurement (`key` has a {variant})."""

    def bf16(r: ThroughputResult) -> float:
        return value(r.bf16)

    def fp8(r: ThroughputResult) -> float:
        return value(r.fp8)

    return (
        Metric(key.format(variant="bf16"), ThroughputResult, bf16, f"{label} (BF16)", fmt),
        Metric(key.format(variant="fp8"), ThroughputResult, fp8, f"{label} (FP8)", fmt),
    )


# Order matters: it is the order of --summary-json's `metrics` and of the headline table's rows.
VOCABULARY: tuple[Metric[Any], ...] = (
    Metric("model/parameters", ModelSource, lambda r: r.num_parameters, "parameters", ",.0f"),
    Metric("model/bf16_bytes", ModelSource, lambda r: safetensors_bytes(r.files), "BF16 checkpoint bytes", ",.0f"),
    Metric(
        "model/fp8_bytes", QuantizedCheckpoint, lambda r: safetensors_bytes(r.files), "FP8 checkpoint bytes", ",.0f"
    ),
    Metric("quantize/quantized_layers", QuantizedCheckpoint, lambda r: r.quantized_layers, "quantized layers", "d"),
    Metric("quantize/calib_tokens", QuantizedCheckpoint, lambda r: r.calibration.tokens, "calibration tokens", ",.0f"),
    Metric("build/bf16_weight_bytes", Engines, lambda r: r.bf16.weight_bytes, "BF16 weights as loaded", ",.0f"),
    Metric("build/fp8_weight_bytes", Engines, lambda r: r.fp8.weight_bytes, "FP8 weights as loaded", ",.0f"),
    Metric(
        "mmlu/bf16",
        MmluResult,
        lambda r: r.bf16.accuracy,
        "MMLU accuracy",
        ".2%",
        summary="mmlu_bf16",
        headline="bf16",
        model_index="MMLU accuracy (BF16 baseline)",
    ),
    Metric(
        "mmlu/fp8",
        MmluResult,
        lambda r: r.fp8.accuracy,
        "MMLU accuracy",
        ".2%",
        summary="mmlu_fp8",
        headline="fp8",
        model_index="MMLU accuracy (FP8)",
    ),
    Metric("mmlu/questions", MmluResult, lambda r: r.questions, "MMLU questions", "d", summary="mmlu_questions"),
    Metric(
        "throughput/bf16_tok_s",
        ThroughputResult,
        lambda r: r.bf16.output_throughput,
        "Output tokens/s",
        ".1f",
        summary="throughput_bf16_tok_s",
        headline="bf16",
    ),
    Metric(
        "throughput/fp8_tok_s",
        ThroughputResult,
        lambda r: r.fp8.output_throughput,
        "Output tokens/s",
        ".1f",
        summary="throughput_fp8_tok_s",
        headline="fp8",
    ),
    Metric(
        "fp8_speedup",
        ThroughputResult,
        lambda r: r.fp8_speedup,
        "FP8 speedup",
        ".2f",
        suffix="x",
        summary="fp8_speedup",
        headline="fp8",
    ),
    Metric(
        "build/fp8_top1_agreement",
        Engines,
        lambda r: r.top1_agreement,
        "Next-token agreement",
        ".2%",
        summary="fp8_top1_agreement",
        headline="fp8",
    ),
    # Fidelity of the exported checkpoint on held-out text (quantize stage, quant_release/fidelity.py).
    Metric(
        "quantize/ppl_bf16",
        QuantizedCheckpoint,
        _fidelity("ppl_bf16"),
        "Held-out perplexity",
        ".3f",
        summary="ppl_bf16",
        headline="bf16",
    ),
    Metric(
        "quantize/ppl_fp8",
        QuantizedCheckpoint,
        _fidelity("ppl_fp8"),
        "Held-out perplexity",
        ".3f",
        summary="ppl_fp8",
        headline="fp8",
    ),
    Metric(
        "quantize/kl_bf16_fp8",
        QuantizedCheckpoint,
        _fidelity("kl_bf16_fp8"),
        "KL(BF16 || FP8), nats/token",
        ".4f",
        summary="quant_kl",
        headline="fp8",
    ),
    Metric(
        "quantize/ppl_fp32",
        QuantizedCheckpoint,
        _fidelity("ppl_fp32"),
        "held-out perplexity (fp32 reference)",
        ".3f",
        summary="ppl_fp32",
    ),
    Metric(
        "quantize/kl_fp32_bf16",
        QuantizedCheckpoint,
        _fidelity("kl_fp32_bf16"),
        "KL(fp32 || BF16), the noise floor",
        ".4f",
        summary="kl_fp32_bf16",
    ),
    Metric(
        "quantize/kl_fp32_fp8",
        QuantizedCheckpoint,
        _fidelity("kl_fp32_fp8"),
        "KL(fp32 || FP8)",
        ".4f",
        summary="kl_fp32_fp8",
    ),
    Metric(
        "quantize/top1_bf16_vs_fp32",
        QuantizedCheckpoint,
        _fidelity("top1_bf16_vs_fp32"),
        "top-1 agreement BF16 vs fp32",
        ".2%",
    ),
    Metric(
        "quantize/top1_fp8_vs_fp32",
        QuantizedCheckpoint,
        _fidelity("top1_fp8_vs_fp32"),
        "top-1 agreement FP8 vs fp32",
        ".2%",
    ),
    Metric(
        "quantize/top1_fp8_vs_bf16",
        QuantizedCheckpoint,
        _fidelity("top1_fp8_vs_bf16"),
        "top-1 agreement FP8 vs BF16 (exported files, emulated)",
        ".2%",
    ),
    Metric(
        "quantize/fidelity_tokens",
        QuantizedCheckpoint,
        _fidelity("tokens"),
        "held-out tokens scored",
        "d",
    ),
    Metric(
        "quantize/fidelity_gate_max_ppl_increase",
        QuantizedCheckpoint,
        lambda r: r.gate.max_ppl_increase if r.gate else None,
        "fidelity gate: largest FP8 perplexity increase allowed",
        ".2%",
    ),
    Metric(
        "quantize/fidelity_gate_overridden",
        QuantizedCheckpoint,
        lambda r: float(r.gate.overridden) if r.gate else None,
        "fidelity gate failed and was overridden (1) or not (0)",
        ".0f",
        summary="fidelity_gate_overridden",
    ),
    *_per_variant("throughput/{variant}_req_s", lambda m: m.request_throughput, "requests/s", ".3f"),
    *_per_variant("latency/{variant}_ttft_ms_p50", lambda m: m.ttft_ms.p50, "TTFT p50 (ms)", ".1f"),
    *_per_variant("latency/{variant}_tpot_ms_p50", lambda m: m.tpot_ms.p50, "TPOT p50 (ms)", ".1f"),
    *_per_variant("latency/{variant}_e2e_ms_p50", lambda m: m.e2e_latency_ms.p50, "end-to-end latency p50 (ms)", ".1f"),
    # MMLU as a paired BF16-vs-FP8 comparison, each variant with its own standard error (quant_release/paired.py).
    # Last: their summary keys were added after the contract's.
    Metric(
        "mmlu/delta",
        MmluResult,
        lambda r: r.fp8.accuracy - r.bf16.accuracy,
        "MMLU FP8 - BF16",
        "+.2%",
        summary="mmlu_delta",
    ),
    Metric(
        "mmlu/agreement",
        MmluResult,
        lambda r: r.agreement,
        "MMLU answers in agreement",
        ".2%",
        summary="mmlu_same_answer_rate",
    ),
    Metric(
        "mmlu/bf16_stderr",
        MmluResult,
        lambda r: r.bf16.stderr,
        "MMLU std. error (BF16)",
        ".2%",
        summary="mmlu_bf16_stderr",
    ),
    Metric(
        "mmlu/fp8_stderr", MmluResult, lambda r: r.fp8.stderr, "MMLU std. error (FP8)", ".2%", summary="mmlu_fp8_stderr"
    ),
    Metric(
        "mmlu/paired/delta_low",
        MmluResult,
        lambda r: r.paired and r.paired.delta_low,
        "MMLU delta, 95% interval low",
        "+.2%",
        summary="mmlu_delta_low",
    ),
    Metric(
        "mmlu/paired/delta_high",
        MmluResult,
        lambda r: r.paired and r.paired.delta_high,
        "MMLU delta, 95% interval high",
        "+.2%",
        summary="mmlu_delta_high",
    ),
    Metric(
        "mmlu/paired/mcnemar_p",
        MmluResult,
        lambda r: r.paired and r.paired.mcnemar_p_value,
        "MMLU McNemar p",
        ".3g",
        summary="mmlu_mcnemar_p",
    ),
)


def _mmlu_categories(r: MmluResult) -> dict[str, float]:
    return {
        f"mmlu/{variant}/category/{category}": value
        for variant, scores in (("bf16", r.bf16), ("fp8", r.fp8))
        for category, value in scores.per_category.items()
    }


def _sweep_speedups(r: ThroughputResult) -> dict[str, float]:
    return {f"throughput/c{point.concurrency}/fp8_speedup": point.fp8_speedup for point in r.sweep}


def _mmlu_group_errors(r: MmluResult) -> dict[str, float]:
    return {
        f"mmlu/{variant}/{group.level}/{group.name.replace(' ', '_')}/stderr": group.stderr
        for variant, scores in (("bf16", r.bf16), ("fp8", r.fp8))
        for group in scores.groups
        if group.level == "category"
    }


def _mmlu_subcategories(r: MmluResult) -> dict[str, float]:
    return {
        f"mmlu/{variant}/subcategory/{name.replace(' ', '_')}": value
        for variant, scores in (("bf16", r.bf16), ("fp8", r.fp8))
        for name, value in scores.per_subcategory.items()
    }


FAMILIES: tuple[MetricFamily[Any], ...] = (
    MetricFamily("mmlu/{variant}/category/{category}", MmluResult, _mmlu_categories, "MMLU accuracy per category"),
    MetricFamily(
        "mmlu/{variant}/category/{category}/stderr", MmluResult, _mmlu_group_errors, "MMLU std. error per category"
    ),
    MetricFamily(
        "mmlu/{variant}/subcategory/{subcategory}", MmluResult, _mmlu_subcategories, "MMLU accuracy per subcategory"
    ),
    MetricFamily(
        "throughput/c{concurrency}/fp8_speedup", ThroughputResult, _sweep_speedups, "FP8 speedup per concurrency"
    ),
)

# Logged by the stage runner, not read from a record: how long a stage took (cached: reading it back).
STAGE_SECONDS = "stage/{stage}/seconds"


def stage_seconds_key(stage: str) -> str:
    return STAGE_SECONDS.format(stage=stage)


# Also logged by the stage runner: the stage's peak host RSS and peak GPU memory per GPU (quant_release/memory.py).
STAGE_PEAK_RSS = "stage/{stage}/peak_rss_bytes"
STAGE_PEAK_GPU = "stage/{stage}/peak_gpu{index}_bytes"


def stage_memory_metrics(stage: str, rss_bytes: int | None, gpu_bytes: Mapping[str, int]) -> dict[str, float]:
    """The peak-memory metrics of one stage, under their canonical keys (`gpu_bytes` keyed `cuda:N`)."""
    out: dict[str, float] = {}
    if rss_bytes is not None:
        out[STAGE_PEAK_RSS.format(stage=stage)] = float(rss_bytes)
    for device, value in gpu_bytes.items():
        out[STAGE_PEAK_GPU.format(stage=stage, index=device.rpartition(":")[2])] = float(value)
    return out


# A stage's own MLflow run logs its timing and memory under these run-local keys; every key above (the
# comparison vocabulary, `stage/<stage>/...` included) is logged on the parent run only, so an experiment
# chart gets one point per release, not one from the parent and one from a stage run.
STAGE_RUN_SECONDS = "seconds"
STAGE_RUN_PEAK_RSS = "peak_rss_bytes"
STAGE_RUN_PEAK_GPU = "peak_gpu{index}_bytes"


def stage_run_metrics(
    seconds: float | None, rss_bytes: int | None = None, gpu_bytes: Mapping[str, int] | None = None
) -> dict[str, float]:
    """What a stage's own MLflow run logs: its time and peak memory, under run-local keys."""
    out: dict[str, float] = {}
    if seconds is not None:
        out[STAGE_RUN_SECONDS] = float(seconds)
    if rss_bytes is not None:
        out[STAGE_RUN_PEAK_RSS] = float(rss_bytes)
    for device, value in (gpu_bytes or {}).items():
        out[STAGE_RUN_PEAK_GPU.format(index=device.rpartition(":")[2])] = float(value)
    return out


def record_metrics(record: Record) -> dict[str, float]:
    """Every metric of the vocabulary that `record` produces, under its canonical key."""
    out: dict[str, float] = {}
    for metric in VOCABULARY:
        value = metric.of(record)
        if value is not None:
            out[metric.key] = value
    for family in FAMILIES:
        out.update(family.of(record))
    return out


def summary_metrics(records: Iterable[Record]) -> dict[str, float | None]:
    """The --summary-json `metrics`: every metric with a summary key, None when its stage did not run."""
    by_type = {type(record): record for record in records}
    return {m.summary: m.of(by_type.get(m.record)) for m in VOCABULARY if m.summary}


@dataclass(frozen=True)
class HeadlineRow:
    label: str
    bf16: str  # formatted; "" where the metric has no BF16 column
    fp8: str

    @property
    def measured(self) -> bool:
        return any(cell not in ("", "-") for cell in (self.bf16, self.fp8))


def headline_rows(summary_values: Mapping[str, float | None]) -> list[HeadlineRow]:
    """The headline table (label, BF16, FP8), from --summary-json `metrics` values."""
    rows: dict[str, dict[Column, str]] = {}
    for metric in VOCABULARY:
        if metric.headline is None or metric.summary is None:
            continue
        rows.setdefault(metric.label, {})[metric.headline] = metric.format(summary_values.get(metric.summary))
    return [HeadlineRow(label, cells.get("bf16", ""), cells.get("fp8", "")) for label, cells in rows.items()]


def model_index_metrics(result: MmluResult) -> list[dict[str, Any]]:
    """The card's model-index metrics: the FP8 model's own result first, then the baseline."""
    chosen = [m for m in VOCABULARY if m.model_index and m.record is MmluResult]
    chosen.sort(key=lambda m: m.headline != "fp8")
    return [{"type": "accuracy", "name": m.model_index, "value": m.of(result)} for m in chosen]


def _check_vocabulary() -> None:
    keys = [m.key for m in VOCABULARY] + [f.key for f in FAMILIES] + [STAGE_SECONDS, STAGE_PEAK_RSS, STAGE_PEAK_GPU]
    summaries = [m.summary for m in VOCABULARY if m.summary]
    for name, values in (("key", keys), ("summary key", summaries)):
        duplicates = sorted({v for v in values if values.count(v) > 1})
        if duplicates:
            raise RuntimeError(f"metric {name}s defined twice: {duplicates}")
    for metric in VOCABULARY:
        if metric.headline and not metric.summary:
            raise RuntimeError(f"headline metric {metric.key} needs a summary key (the table is printed from it)")


_check_vocabulary()
