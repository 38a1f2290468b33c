"""The built-in engine behind the engine interface, on a tiny random Llama: scoring, generation, benchmark, pool."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from quant_release.engines.base import BenchmarkRequest, BenchmarkWorkload
from quant_release.engines.bench_report import percentile
from quant_release.engines.builtin import BuiltinBackend, BuiltinEngine, common_prefix_len
from quant_release.engines.pool import EnginePool
from quant_release.errors import QuantReleaseError
from quant_release.records import EngineHandle
from tests.support.tiny import VOCAB, make_tiny_llama

SHARED = (
    "The following are multiple choice questions about the Python language.\n\n"
    "What does the assert statement do when its expression is false?\n"
    "A. nothing\nB. raises AssertionError\nC. prints a warning\nD. exits\nAnswer: B\n\n"
    "Which keyword starts a function definition?\nA. func\nB. lambda\nC. def\nD. fn\nAnswer: C\n\n"
)
QUESTIONS = (
    "Which statement leaves a loop early?\nA. break\nB. pass\nC. yield\nD. return\nAnswer:",
    "What type does len() return?\nA. float\nB. str\nC. int\nD. list\nAnswer:",
    "Which of these is immutable? Pick the one that cannot change.\nA. list\nB. dict\nC. set\nD. tuple\nAnswer:",
)
CONTEXTS = [SHARED + q for q in QUESTIONS]
# One token each in the tiny BPE tokenizer (" A" is two there: space, letter), for the single-token path.
WORDS = [" the", " of", " a", " in"]
# BF16 arithmetic in different batch shapes: log-probs agree to this, not bit for bit.
ATOL = 3e-2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # gain=1: numerics comparisons (prefix cache vs full forward) need a non-chaotic network.
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "bf16", gain=1.0)


@pytest.fixture(scope="module")
def engine(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> BuiltinEngine:
    handle = BuiltinBackend().prepare("bf16", model_dir, tmp_path_factory.mktemp("work"), "cpu", {})
    return BuiltinBackend().load(handle)


def _manual_scores(engine: BuiltinEngine, contexts: list[str], choices: list[str]) -> list[list[float]]:
    """Sum of log-softmax over each choice's tokens, one full forward per (context, choice), no cache reuse."""
    rows = []
    for context in contexts:
        ids = engine.encode(context)
        row = []
        for choice in choices:
            cont = engine.tokenizer(choice, add_special_tokens=False)["input_ids"]
            full = ids + cont
            engine.runtime.reserve(1, len(full))
            logits = engine.runtime.prefill([full], [0], 0, torch.arange(len(full))[None])[0].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            row.append(sum(float(logprobs[len(ids) - 1 + i, token]) for i, token in enumerate(cont)))
        rows.append(row)
    return rows


def _single_token(engine: BuiltinEngine, choices: list[str]) -> bool:
    return all(len(engine.tokenizer(c, add_special_tokens=False)["input_ids"]) == 1 for c in choices)


# --- scoring --------------------------------------------------------------------------------------


def test_contexts_share_a_long_token_prefix(engine: BuiltinEngine) -> None:
    ids = [engine.encode(c) for c in CONTEXTS]
    assert common_prefix_len(ids) > 0.6 * min(len(i) for i in ids)


@pytest.mark.parametrize("choices", [WORDS, [" A", " B", " C", " D"]], ids=["single-token", "multi-token"])
def test_prefix_cached_scores_equal_scoring_each_context_alone(engine: BuiltinEngine, choices: list[str]) -> None:
    together = engine.score_choices(CONTEXTS, choices)
    alone = [engine.score_choices([c], choices)[0] for c in CONTEXTS]
    manual = _manual_scores(engine, CONTEXTS, choices)
    np.testing.assert_allclose(together, alone, atol=ATOL, rtol=0)
    np.testing.assert_allclose(together, manual, atol=ATOL, rtol=0)
    # Each context got its own logits, not another's: every row is nearest to its own context's scores.
    distance = np.abs(np.array(together)[:, None, :] - np.array(alone)[None, :, :]).sum(-1)
    assert list(distance.argmin(axis=1)) == [0, 1, 2]


def test_batched_scoring_chooses_like_one_question_at_a_time(engine: BuiltinEngine) -> None:
    """The same shared prefix, the questions as one batch or one per forward pass: the same answers."""
    contexts = [SHARED + q + suffix for q in QUESTIONS for suffix in ("", " ", "\n")]
    batched = engine.score_choices(contexts, WORDS)
    engine.max_slots = 1
    try:
        single = engine.score_choices(contexts, WORDS)
    finally:
        engine.max_slots = 256
    assert [int(np.argmax(r)) for r in batched] == [int(np.argmax(r)) for r in single]
    np.testing.assert_allclose(batched, single, atol=ATOL, rtol=0)


@pytest.mark.parametrize("choices", [WORDS, [" A", " B"]], ids=["single-token", "multi-token"])
def test_contexts_without_common_prefix(engine: BuiltinEngine, choices: list[str]) -> None:
    contexts = ["Alpha beta gamma", "Zeta eta theta iota"]
    assert engine.encode(contexts[0])[0] != engine.encode(contexts[1])[0]
    np.testing.assert_allclose(
        engine.score_choices(contexts, choices), _manual_scores(engine, contexts, choices), atol=ATOL, rtol=0
    )


def test_context_that_is_a_prefix_of_another(engine: BuiltinEngine) -> None:
    contexts = [SHARED, SHARED + QUESTIONS[0]]
    choices = [" A", " B"]
    np.testing.assert_allclose(
        engine.score_choices(contexts, choices), _manual_scores(engine, contexts, choices), atol=ATOL, rtol=0
    )


def test_multi_token_choices_equal_manual_sum(engine: BuiltinEngine) -> None:
    choices = [" A B", " C", " the function returns None"]
    assert not _single_token(engine, choices)
    scores = engine.score_choices(CONTEXTS, choices)
    np.testing.assert_allclose(scores, _manual_scores(engine, CONTEXTS, choices), atol=ATOL, rtol=0)
    # A longer continuation is a sum of more negative terms.
    assert all(row[2] < row[1] for row in scores)


def test_single_and_multi_token_paths_agree(engine: BuiltinEngine) -> None:
    assert _single_token(engine, WORDS)
    single_path = engine.score_choices(CONTEXTS, WORDS)
    multi_path = engine.score_choices(CONTEXTS, [*WORDS, " A B"])  # one long choice: the multi-token path
    np.testing.assert_allclose(single_path, [row[:4] for row in multi_path], atol=ATOL, rtol=0)


def test_scores_are_log_probabilities(engine: BuiltinEngine) -> None:
    scores = engine.score_choices(CONTEXTS[:1], WORDS)
    assert all(s < 0 for s in scores[0])
    assert sum(float(np.exp(s)) for s in scores[0]) < 1


def test_score_choices_reports_progress_and_handles_empty(engine: BuiltinEngine) -> None:
    calls: list[tuple[int, int]] = []
    engine.score_choices(CONTEXTS, [" A"], on_step=lambda d, t: calls.append((d, t)))
    assert calls[-1] == (3, 3)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert engine.score_choices([], [" A"]) == []


def test_empty_choice_is_rejected(engine: BuiltinEngine) -> None:
    with pytest.raises(ValueError, match="at least one token"):
        engine.score_choices(CONTEXTS, [" A", ""])


# --- greedy next tokens ---------------------------------------------------------------------------


def test_greedy_next_tokens_one_per_position(engine: BuiltinEngine) -> None:
    generator = torch.Generator().manual_seed(0)
    sequences = [torch.randint(2, VOCAB, (n,), generator=generator).tolist() for n in (5, 17, 1)]
    out = engine.greedy_next_tokens(sequences)
    assert [len(o) for o in out] == [5, 17, 1]
    for ids, tokens in zip(sequences, out, strict=True):
        engine.runtime.reserve(1, len(ids))
        expected = engine.runtime.prefill([ids], [0], 0, torch.arange(len(ids))[None])[0].argmax(dim=-1).tolist()
        assert tokens == expected
        assert all(0 <= t < VOCAB for t in tokens)


# --- generation -----------------------------------------------------------------------------------


def _decode_by_hand(engine: BuiltinEngine, prompt: list[int], steps: int) -> list[int]:
    engine.runtime.reserve(1, len(prompt) + steps)
    engine.runtime.active.zero_()
    engine.runtime.prefill([prompt], [0])
    engine.runtime.active[0] = 1
    out = []
    for _ in range(steps):
        out.append(int(engine.runtime.tokens[0]))
        engine.runtime.decode(1)
    engine.runtime.active.zero_()
    return out


def test_generate_is_greedy_decoding_and_keeps_the_order(engine: BuiltinEngine) -> None:
    prompts = [engine.encode(c) for c in CONTEXTS] + [engine.encode("Unrelated words")]
    out = engine.generate(prompts, max_new_tokens=6)
    assert [len(o) for o in out] == [6] * 4
    for prompt, tokens in zip(prompts, out, strict=True):
        assert tokens == _decode_by_hand(engine, prompt, 6)


def test_generate_stops_before_a_stop_token(engine: BuiltinEngine) -> None:
    prompt = engine.encode(CONTEXTS[0])
    free = engine.generate([prompt], max_new_tokens=8)[0]
    stop = free[3]
    cut = engine.generate([prompt], max_new_tokens=8, stop_token_ids=[stop])[0]
    assert cut == free[: free.index(stop)]
    assert engine.generate([prompt], max_new_tokens=1)[0] == free[:1]
    with pytest.raises(ValueError, match="at least 1"):
        engine.generate([prompt], max_new_tokens=0)
    assert engine.generate([], max_new_tokens=3) == []


def test_decode_turns_tokens_back_into_text(engine: BuiltinEngine) -> None:
    assert engine.decode(engine.encode("Which keyword")) == "Which keyword"


# --- benchmark ------------------------------------------------------------------------------------


def _requests(count: int, seed: int = 0) -> list[BenchmarkRequest]:
    rng = random.Random(seed)
    return [
        BenchmarkRequest(tuple(rng.randrange(2, VOCAB) for _ in range(rng.randint(3, 12))), rng.randint(1, 6))
        for _ in range(count)
    ]


@pytest.mark.parametrize(("count", "concurrency", "warmup"), [(7, 3, 1), (4, 4, 0), (3, 8, 2)])
def test_benchmark_counts_and_timings(engine: BuiltinEngine, count: int, concurrency: int, warmup: int) -> None:
    steps: list[tuple[int, int]] = []
    requests = _requests(count)
    workload = BenchmarkWorkload(requests=requests, concurrency=concurrency, warmup=_requests(warmup, seed=9))
    m = engine.benchmark(workload, on_step=lambda d, t: steps.append((d, t)))
    assert m.requests == count
    assert m.concurrency == min(concurrency, count)
    assert m.input_tokens == sum(len(r.prompt) for r in requests)
    assert m.output_tokens == sum(r.output_len for r in requests)
    assert m.duration_s > 0
    assert m.output_throughput == pytest.approx(m.output_tokens / m.duration_s, rel=1e-9)
    assert m.request_throughput == pytest.approx(count / m.duration_s, rel=1e-9)
    assert m.total_token_throughput == pytest.approx((m.input_tokens + m.output_tokens) / m.duration_s, rel=1e-9)
    assert 0 < m.ttft_ms.p50 <= m.ttft_ms.p90 <= m.ttft_ms.p99
    assert m.ttft_ms.p50 <= m.e2e_latency_ms.p50 and m.ttft_ms.mean <= m.e2e_latency_ms.mean
    assert m.tpot_ms.p50 > 0
    assert m.per_user_output_throughput > 0
    assert m.e2e_latency_ms.p99 * 1e-3 <= m.duration_s
    assert m.peak_gpu_memory_bytes is None  # a CPU
    assert steps[-1] == (count, count)


def test_benchmark_generates_what_generate_generates(engine: BuiltinEngine) -> None:
    """Continuous batching decodes each request as if it ran alone (checked through the decode state)."""
    request = BenchmarkRequest(tuple(engine.encode(CONTEXTS[1])), 5)
    engine.benchmark(BenchmarkWorkload(requests=[request, *_requests(3)], concurrency=2))
    # The slot's cache and tokens were reused: a plain generate afterwards is unaffected.
    assert engine.generate([list(request.prompt)], 5)[0] == _decode_by_hand(engine, list(request.prompt), 5)


def test_benchmark_needs_requests(engine: BuiltinEngine) -> None:
    with pytest.raises(ValueError, match="at least one request"):
        engine.benchmark(BenchmarkWorkload(requests=[], concurrency=2))


@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_percentile_matches_numpy_linear(q: float, n: int) -> None:
    rng = np.random.default_rng(n)
    values = rng.exponential(size=n).tolist()
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, 100 * q, method="linear")), rel=1e-12)


def test_percentile_of_nothing_is_nan() -> None:
    assert np.isnan(percentile([], 0.5))


# --- backend --------------------------------------------------------------------------------------


def test_prepare_fp8_on_a_bf16_dir_is_an_error(model_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(QuantReleaseError, match="not a modelopt checkpoint"):
        BuiltinBackend().prepare("fp8", model_dir, tmp_path, "cpu", {"fp8_gemm": "auto"})


def test_prepare_bf16_handle(model_dir: Path, tmp_path: Path) -> None:
    handle = BuiltinBackend().prepare("bf16", model_dir, tmp_path, "cpu", {"x": "y"})
    assert handle.kind == "builtin"
    assert handle.variant == "bf16"
    assert handle.device == "cpu"
    assert handle.model_dir == model_dir
    assert handle.options == {"x": "y"}


def test_engine_reports_weights_and_device(engine: BuiltinEngine, model_dir: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        stored = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())  # noqa: SIM118
    assert engine.weight_bytes() == 2 * stored  # BF16, tied embedding stored and held once
    assert engine.device_name.startswith("CPU")


# --- EnginePool -----------------------------------------------------------------------------------


class FakeEngine:
    def __init__(self, handle: EngineHandle, log: list[str]) -> None:
        self.handle = handle
        self.log = log
        self.closed = False

    def close(self) -> None:
        self.closed = True
        self.log.append(f"close {self.handle.model_dir.name}")


@pytest.fixture
def load_log(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    log: list[str] = []

    def fake_load(self: BuiltinBackend, handle: EngineHandle) -> Any:
        log.append(f"load {handle.model_dir.name}")
        return FakeEngine(handle, log)

    monkeypatch.setattr(BuiltinBackend, "load", fake_load)
    return log


def _handle(name: str, **extra: Any) -> EngineHandle:
    return EngineHandle(kind="builtin", variant="bf16", model_dir=Path("/m") / name, device="cpu", **extra)


def test_pool_reuses_a_loaded_engine(load_log: list[str]) -> None:
    pool = EnginePool(capacity=2)
    first = pool.get(_handle("a"))
    # weight_bytes and load_seconds are measurements, not identity: same engine.
    again = pool.get(_handle("a", weight_bytes=123, load_seconds=4.5))
    assert again is first
    assert load_log == ["load a"]


def test_pool_closes_the_least_recently_used_beyond_capacity(load_log: list[str]) -> None:
    pool = EnginePool(capacity=2)
    a = pool.get(_handle("a"))
    b = pool.get(_handle("b"))
    assert pool.get(_handle("a")) is a  # a is now the most recently used
    c = pool.get(_handle("c"))
    # The evicted engine is closed before the next one loads: never three sets of weights in memory.
    assert load_log == ["load a", "load b", "close b", "load c"]
    assert b.closed
    assert not a.closed
    assert not c.closed
    assert pool.get(_handle("a")) is a
    assert load_log.count("load a") == 1
    pool.close()
    assert a.closed
    assert c.closed


def test_pool_treats_options_and_variant_as_identity(load_log: list[str]) -> None:
    pool = EnginePool(capacity=4)
    pool.get(_handle("a"))
    pool.get(EngineHandle(kind="builtin", variant="fp8", model_dir=Path("/m/a"), device="cpu"))
    pool.get(_handle("a", options={"fp8_gemm": "emulated"}))
    assert load_log == ["load a", "load a", "load a"]


# --- MMLU generation scoring on this engine -----------------------------------------------------------


def test_mmlu_generation_scoring_reads_the_letter_the_engine_writes(engine: BuiltinEngine) -> None:
    from quant_release import mmlu

    prompts = [
        mmlu.Prompt(question_id=f"q{i}", prefix=SHARED, text=SHARED + question, num_shots=2, answer=0)
        for i, question in enumerate(QUESTIONS)
    ]
    answers = mmlu.generate_answers(engine, prompts)
    assert set(answers) == {"q0", "q1", "q2"}
    for prompt in prompts:
        expected = engine.decode(engine.generate([engine.encode(prompt.text)], mmlu.GENERATED_TOKENS)[0])
        assert answers[prompt.question_id] == expected
    assert mmlu.answer_of(" B\n") == 1
    assert mmlu.answer_of("D.") == 3
    assert mmlu.answer_of(" the") is None
