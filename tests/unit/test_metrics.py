"""The metric vocabulary: records produce their metrics through it, and every report reads from it."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from quant_release import metrics, modelcard
from quant_release.config import ReleaseConfig
from quant_release.records import Engines, MmluResult, Record, Results, StageReport, ThroughputResult
from quant_release.stages import STAGES
from quant_release.summary import build_summary, summary_table
from tests.unit.test_modelcard import _checkpoint, _engines, _inputs, _mmlu, _source, _throughput

# What --summary-json promised before the vocabulary existed: these keys stay (add, never rename).
SUMMARY_CONTRACT = [
    "mmlu_bf16",
    "mmlu_fp8",
    "mmlu_questions",
    "throughput_bf16_tok_s",
    "throughput_fp8_tok_s",
    "fp8_speedup",
    "fp8_top1_agreement",
]
# MLflow keys that dashboards and the tests of earlier runs read.
MLFLOW_CONTRACT = ["mmlu/bf16", "mmlu/fp8", "mmlu/fp8/category/stem", "throughput/fp8_tok_s", "fp8_speedup"]


def _records() -> list[Record]:
    return [_source("hub"), _checkpoint(), _engines("scaled_mm"), _mmlu(), _throughput()]


def _known(key: str) -> bool:
    return any(m.key == key for m in metrics.VOCABULARY) or any(f.matches(key) for f in metrics.FAMILIES)


def test_every_metric_a_record_produces_is_in_the_vocabulary() -> None:
    produced: dict[str, float] = {}
    for record in _records():
        for key in record.metrics():
            assert _known(key), key
        produced.update(record.metrics())
    for key in MLFLOW_CONTRACT:
        assert key in produced
    assert produced["mmlu/fp8/category/stem"] == _mmlu().fp8.per_category["stem"]
    assert produced["mmlu/questions"] == 228.0
    assert set(produced) >= {m.key for m in metrics.VOCABULARY}  # each entry is produced by some record


def test_summary_keys_keep_the_contract() -> None:
    keys = [m.summary for m in metrics.VOCABULARY if m.summary]
    assert keys[: len(SUMMARY_CONTRACT)] == SUMMARY_CONTRACT
    values = metrics.summary_metrics(_records())
    assert list(values) == keys
    assert values["mmlu_fp8"] == _mmlu().fp8.accuracy
    assert values["fp8_top1_agreement"] == _engines("scaled_mm").top1_agreement
    assert metrics.summary_metrics([]) == dict.fromkeys(keys)


def test_family_patterns_match_only_their_shape() -> None:
    family = metrics.FAMILIES[0]
    assert family.matches("mmlu/bf16/category/stem")
    assert not family.matches("mmlu/bf16/category/")
    assert not family.matches("mmlu/bf16/category/a/b")
    assert not family.matches("mmlu/bf16")


def test_headline_rows_are_formatted_by_the_vocabulary() -> None:
    rows = {row.label: row for row in metrics.headline_rows(metrics.summary_metrics(_records()))}
    assert list(rows) == [
        "MMLU accuracy",
        "Output tokens/s",
        "FP8 speedup",
        "Next-token agreement",
        "Held-out perplexity",
        "KL(BF16 || FP8), nats/token",
    ]
    assert (rows["Held-out perplexity"].bf16, rows["Held-out perplexity"].fp8) == ("33.640", "33.710")
    assert (rows["MMLU accuracy"].bf16, rows["MMLU accuracy"].fp8) == ("33.33%", "32.46%")
    assert (rows["Output tokens/s"].bf16, rows["Output tokens/s"].fp8) == ("1234.6", "2071.0")
    assert (rows["FP8 speedup"].bf16, rows["FP8 speedup"].fp8) == ("", "1.68x")
    assert rows["Next-token agreement"].fp8 == "93.21%"
    empty = metrics.headline_rows(metrics.summary_metrics([]))
    assert [(r.bf16, r.fp8) for r in empty] == [("-", "-"), ("-", "-"), ("", "-"), ("", "-"), ("-", "-"), ("", "-")]
    assert not any(row.measured for row in empty)


def test_model_index_lists_the_fp8_result_first() -> None:
    result = _mmlu()
    assert metrics.model_index_metrics(result) == [
        {"type": "accuracy", "name": "MMLU accuracy (FP8)", "value": result.fp8.accuracy},
        {"type": "accuracy", "name": "MMLU accuracy (BF16 baseline)", "value": result.bf16.accuracy},
    ]


def test_vocabulary_refuses_a_key_defined_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    twice = (*metrics.VOCABULARY, dataclasses.replace(metrics.VOCABULARY[0], summary=None))
    monkeypatch.setattr(metrics, "VOCABULARY", twice)
    with pytest.raises(RuntimeError, match="defined twice"):
        metrics._check_vocabulary()


def test_a_new_metric_is_one_entry_and_reaches_every_report(monkeypatch: pytest.MonkeyPatch) -> None:
    """Add one entry: MLflow, --summary-json, the closing table and the card's headline all show it."""
    new: metrics.Metric[Any] = metrics.Metric(
        "throughput/fp8_ttft_ms_p90",
        ThroughputResult,
        lambda r: r.fp8.ttft_ms.p90,
        "TTFT p90 (ms)",
        ".1f",
        summary="fp8_ttft_ms_p90",
        headline="fp8",
    )
    monkeypatch.setattr(metrics, "VOCABULARY", (*metrics.VOCABULARY, new))
    throughput = _throughput()
    expected = throughput.fp8.ttft_ms.p90

    assert throughput.metrics()["throughput/fp8_ttft_ms_p90"] == expected  # MLflow's stage run
    summary = build_summary(
        run_id="r",
        config=ReleaseConfig(),
        checked_revision=None,
        reports={s: StageReport(status="completed") for s in STAGES},
        results=Results(_records()),
        tracking_uri="sqlite:///x",
        mlflow_run_id=None,
        versions={},
        device="cpu",
        error=None,
        seconds=1.0,
    )
    assert summary.metrics["fp8_ttft_ms_p90"] == expected  # --summary-json
    assert summary.parent_metrics["throughput/fp8_ttft_ms_p90"] == expected  # MLflow's parent run
    line = next(line for line in summary_table(summary).splitlines() if line.startswith("TTFT p90 (ms)"))
    assert line.split()[-1] == f"{expected:.1f}"  # the closing table (and the Prefect artifact)
    card = modelcard.render(_inputs())
    assert f"| TTFT p90 (ms) |  | {expected:.1f} |" in card  # the card's headline table


def test_card_headline_table_equals_the_closing_tables_rows() -> None:
    inputs = _inputs()
    card = modelcard.render(inputs)
    for row in inputs.headline():
        assert f"| {row.label} | {row.bf16} | {row.fp8} |" in card
    assert isinstance(inputs.records().get(Engines), Engines)
    assert isinstance(inputs.records().get(MmluResult), MmluResult)
