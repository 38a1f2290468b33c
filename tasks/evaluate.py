"""evaluate: MMLU k-shot accuracy of BF16 and FP8 on the same deterministic questions, as a paired comparison.

Prompts follow the original MMLU / TensorRT-LLM examples/mmlu.py format byte for byte (optionally wrapped
in the tokenizer's chat template). Two scorings, chosen per run and recorded with every number:

- `generate` (the published method, examples/mmlu.py): greedy generation of 2 tokens; correct when the
  stripped text starts with the answer letter. An output that starts with no letter counts as wrong.
- `loglikelihood`: the letter whose token (" A".." D") has the highest log-probability after "Answer:".

Both variants answer the same questions, so the comparison is paired (quant_release/paired.py): the
accuracy delta with a bootstrap interval, the same-answer rate and McNemar's exact test. Every question's
prompt facts and both variants' answers go to predictions.jsonl, so any number in the card can be traced
to the questions behind it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from quant_release import mmlu, mmlu_report, paired
from quant_release.config import MmluConfig
from quant_release.engines.pool import EnginePool
from quant_release.errors import ConfigError
from quant_release.progress import Progress
from quant_release.records import EngineHandle, Engines, MmluResult, ModelSource, Variant
from quant_release.stage import RunContext, stage_task

METHODS = {
    "generate": (
        f"greedy generation of {mmlu.GENERATED_TOKENS} tokens after 'Answer:', correct when the stripped "
        "text starts with the answer letter (TensorRT-LLM examples/mmlu.py)"
    ),
    "loglikelihood": "log-likelihood of the answer letter after 'Answer:' (argmax over A-D)",
}
PREDICTIONS = "predictions.jsonl"
CHART = "mmlu_categories.png"


def cache_inputs(config: MmluConfig, dataset_fingerprint: str) -> dict[str, Any]:
    return {**config.model_dump(exclude={"enabled"}), "data_fingerprint": dataset_fingerprint}


def method_text(config: MmluConfig) -> str:
    template = ", in the chat template" if config.chat_template else ""
    return f"{METHODS[config.scoring]}; {config.num_fewshot}-shot, original MMLU prompt{template}"


def chat_wrapper(model_dir: Path) -> Callable[[str], str]:
    """The prompt as one user turn of the tokenizer's chat template, ready for the assistant's answer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"--mmlu-chat-template: the tokenizer in {model_dir} has no chat template")
    bos = tokenizer.bos_token
    # Engines encode with special tokens: a template that writes BOS itself would get it twice.
    adds_bos = bos is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]

    def wrap(text: str) -> str:
        messages = [{"role": "user", "content": text}]
        wrapped = str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        return wrapped.removeprefix(bos) if adds_bos and bos else wrapped

    return wrap


def wrap_prompt(prompt: mmlu.Prompt, wrap: Callable[[str], str]) -> mmlu.Prompt:
    """`prompt` in the chat template. Its prefix stays the shared part (template start + shots), so a
    subject's questions still go to the engine together; the answer follows the assistant header, so the
    scored letters carry no leading space."""
    text = wrap(prompt.text)
    at = text.find(prompt.prefix)
    prefix = text[: at + len(prompt.prefix)] if at >= 0 else ""
    return replace(prompt, prefix=prefix, text=text, candidates=mmlu.LETTERS)


def build_all_prompts(
    tasks: list[mmlu.SubjectTask],
    config: MmluConfig,
    encode: Callable[[str], list[int]],
    wrap: Callable[[str], str] | None,
) -> list[mmlu.Prompt]:
    def fits(text: str) -> bool:
        return len(encode(wrap(text) if wrap else text)) <= config.max_seq_len

    prompts = [p for t in tasks for p in mmlu.build_prompts(t, config.num_fewshot, fits)]
    return [wrap_prompt(p, wrap) for p in prompts] if wrap else prompts


def predict(
    engine: Any, prompts: list[mmlu.Prompt], scoring: str, on_step: Callable[[int, int], None]
) -> tuple[dict[str, int | None], dict[str, Any]]:
    """Each question's chosen answer (None: the generated text starts with no letter) and the raw output
    behind it: the generated text, or the four letters' log-probs."""
    if scoring == "generate":
        texts = mmlu.generate_answers(engine, prompts, on_step)
        return {qid: mmlu.answer_of(text) for qid, text in texts.items()}, dict(texts)
    logprobs = mmlu.score_prompts(engine, prompts, on_step)
    return {qid: mmlu.choose(row) for qid, row in logprobs.items()}, dict(logprobs)


def _letter(index: int | None) -> str | None:
    return None if index is None else mmlu.LETTERS[index]


def write_predictions(
    path: Path,
    prompts: list[mmlu.Prompt],
    subjects: dict[str, str],
    scoring: str,
    answers: dict[Variant, dict[str, int | None]],
    raw: dict[Variant, dict[str, Any]],
) -> None:
    raw_key = "text" if scoring == "generate" else "logprobs"
    with path.open("w") as out:
        for prompt in prompts:
            qid = prompt.question_id
            row: dict[str, Any] = {
                "id": qid,
                "subject": subjects[qid],
                "answer": mmlu.LETTERS[prompt.answer],
                "shots": prompt.num_shots,
                "scoring": scoring,
            }
            for variant in ("bf16", "fp8"):
                chosen = answers[variant][qid]
                row[variant] = _letter(chosen)
                row[f"{variant}_correct"] = chosen == prompt.answer
                row[f"{variant}_{raw_key}"] = raw[variant][qid]
            out.write(json.dumps(row) + "\n")


def fewshot_split(tasks: list[mmlu.SubjectTask], num_fewshot: int) -> str | None:
    if num_fewshot == 0:
        return None
    return "+".join(sorted({t.fewshot_split for t in tasks}))


def run_evaluate(
    config: MmluConfig,
    dataset: mmlu.MmluDataset,
    engines: Engines,
    pool: EnginePool,
    out_dir: Path,
    progress: Progress,
    tokenizer_dir: Path | None = None,
) -> MmluResult:
    tasks = mmlu.select(dataset, config.subjects, config.num_fewshot, config.questions_per_subject, config.seed)
    wrap = chat_wrapper(tokenizer_dir or engines.bf16.model_dir) if config.chat_template else None
    prompts = build_all_prompts(tasks, config, pool.get(engines.bf16).encode, wrap)
    subjects = {q.id: t.subject for t in tasks for q in t.questions}
    progress.note(
        "evaluate", f"{len(prompts)} questions in {len(tasks)} subjects from {dataset.source}, scoring {config.scoring}"
    )
    answers: dict[Variant, dict[str, int | None]] = {}
    raw: dict[Variant, dict[str, Any]] = {}
    seconds: dict[Variant, float] = {}
    variants: tuple[tuple[Variant, EngineHandle], ...] = (("bf16", engines.bf16), ("fp8", engines.fp8))
    for variant, handle in variants:
        engine = pool.get(handle)
        start = time.perf_counter()
        step = progress.bound_step("evaluate", f"{variant} questions")
        answers[variant], raw[variant] = predict(engine, prompts, config.scoring, step)
        seconds[variant] = time.perf_counter() - start
    predictions_file = out_dir / PREDICTIONS
    write_predictions(predictions_file, prompts, subjects, config.scoring, answers, raw)
    ids = [p.question_id for p in prompts]
    truth = {p.question_id: p.answer for p in prompts}
    comparison = paired.compare(
        [answers["bf16"][q] == truth[q] for q in ids],
        [answers["fp8"][q] == truth[q] for q in ids],
        [answers["bf16"][q] == answers["fp8"][q] for q in ids],
        seed=config.seed,
    )
    result = MmluResult(
        data_source=dataset.source,
        num_fewshot=config.num_fewshot,
        method=method_text(config),
        subjects=len(tasks),
        questions=len(prompts),
        bf16=mmlu.mmlu_scores(tasks, answers["bf16"]),
        fp8=mmlu.mmlu_scores(tasks, answers["fp8"]),
        agreement=comparison.same_answer_rate,
        predictions_file=predictions_file,
        seconds_bf16=seconds["bf16"],
        seconds_fp8=seconds["fp8"],
        scoring=config.scoring,
        chat_template=config.chat_template,
        fewshot_split=fewshot_split(tasks, config.num_fewshot),
        unanswered_bf16=sum(answers["bf16"][q] is None for q in ids),
        unanswered_fp8=sum(answers["fp8"][q] is None for q in ids),
        paired=comparison,
    )
    chart = mmlu_report.plot_categories(result, out_dir / CHART)
    return result.model_copy(update={"chart_file": chart})


@stage_task("evaluate")
def evaluate_task(ctx: RunContext) -> MmluResult:
    config, engines, dataset = ctx.config.mmlu, ctx.results.get(Engines), ctx.preflight.mmlu_dataset
    assert dataset is not None  # preflight loads it whenever evaluate runs
    source = ctx.results.find(ModelSource)  # the original tokenizer (and its chat template) lives there
    return ctx.runner.run(
        "evaluate",
        cache_inputs(config, dataset.fingerprint),
        lambda work: run_evaluate(
            config, dataset, engines, ctx.runner.engines, work.dir, ctx.progress, source.model_dir if source else None
        ),
    )
