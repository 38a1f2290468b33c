"""evaluate: MMLU k-shot accuracy of BF16 and FP8 on the same deterministic questions.

Prompts follow the original MMLU / TensorRT-LLM examples/mmlu.py format. Each answer is the letter
whose token (" A".." D") the model gives the highest log-probability after "Answer:" — the
letter-restricted form of greedy decoding, which never produces an unparseable answer. Every
question's prompt, shot count and both variants' log-probs go to predictions.jsonl, so any number in
the card can be traced to the questions behind it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from quant_release import mmlu
from quant_release.config import MmluConfig
from quant_release.engines.pool import EnginePool
from quant_release.progress import Progress
from quant_release.records import EngineHandle, Engines, MmluResult, Variant
from quant_release.stage import RunContext, stage_task

METHOD = "loglikelihood of the answer letter after 'Answer:' (argmax over A-D), k-shot, original MMLU prompt"


def cache_inputs(config: MmluConfig, dataset_fingerprint: str) -> dict[str, Any]:
    return {**config.model_dump(exclude={"enabled"}), "data_fingerprint": dataset_fingerprint}


def score_variant(
    engine: Any,
    prompts: list[mmlu.Prompt],
    progress: Progress,
    variant: Variant,
) -> dict[str, list[float]]:
    """Log-probs of the four letters for every prompt; prompts sharing a few-shot prefix go together."""
    return mmlu.score_prompts(engine, prompts, progress.bound_step("evaluate", f"{variant} questions"))


def run_evaluate(
    config: MmluConfig, dataset: mmlu.MmluDataset, engines: Engines, pool: EnginePool, out_dir: Path, progress: Progress
) -> MmluResult:
    tasks = mmlu.select(dataset, config.subjects, config.num_fewshot, config.questions_per_subject, config.seed)
    bf16 = pool.get(engines.bf16)

    def fits(text: str) -> bool:
        return len(bf16.encode(text)) <= config.max_seq_len

    prompts = [p for t in tasks for p in mmlu.build_prompts(t, config.num_fewshot, fits)]
    progress.note("evaluate", f"{len(prompts)} questions in {len(tasks)} subjects from {dataset.source}")
    logprobs: dict[Variant, dict[str, list[float]]] = {}
    seconds: dict[Variant, float] = {}
    variants: tuple[tuple[Variant, EngineHandle], ...] = (("bf16", engines.bf16), ("fp8", engines.fp8))
    for variant, engine_handle in variants:
        engine = pool.get(engine_handle)
        start = time.perf_counter()
        logprobs[variant] = score_variant(engine, prompts, progress, variant)
        seconds[variant] = time.perf_counter() - start
    preds = {v: {qid: mmlu.choose(row) for qid, row in logprobs[v].items()} for v in logprobs}
    predictions_file = out_dir / "predictions.jsonl"
    with predictions_file.open("w") as out:
        for prompt in prompts:
            qid = prompt.question_id
            out.write(
                json.dumps(
                    {
                        "id": qid,
                        "answer": mmlu.LETTERS[prompt.answer],
                        "shots": prompt.num_shots,
                        "bf16": mmlu.LETTERS[preds["bf16"][qid]],
                        "fp8": mmlu.LETTERS[preds["fp8"][qid]],
                        "bf16_logprobs": logprobs["bf16"][qid],
                        "fp8_logprobs": logprobs["fp8"][qid],
                    }
                )
                + "\n"
            )
    same = sum(preds["bf16"][p.question_id] == preds["fp8"][p.question_id] for p in prompts)
    return MmluResult(
        data_source=dataset.source,
        num_fewshot=config.num_fewshot,
        method=METHOD,
        subjects=len(tasks),
        questions=len(prompts),
        bf16=mmlu.mmlu_scores(tasks, preds["bf16"]),
        fp8=mmlu.mmlu_scores(tasks, preds["fp8"]),
        agreement=same / len(prompts),
        predictions_file=predictions_file,
        seconds_bf16=seconds["bf16"],
        seconds_fp8=seconds["fp8"],
    )


@stage_task("evaluate")
def evaluate_task(ctx: RunContext) -> MmluResult:
    config, engines, dataset = ctx.config.mmlu, ctx.results.get(Engines), ctx.preflight.mmlu_dataset
    assert dataset is not None  # preflight loads it whenever evaluate runs
    return ctx.runner.run(
        "evaluate",
        cache_inputs(config, dataset.fingerprint),
        lambda work: run_evaluate(config, dataset, engines, ctx.runner.engines, work.dir, ctx.progress),
    )
