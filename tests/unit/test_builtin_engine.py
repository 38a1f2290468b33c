"""The built-in PyTorch engine on a tiny random Llama: scoring, greedy tokens, benchmark, pool."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from quant_release.engines.base import BenchmarkWorkload
from quant_release.engines.builtin import BuiltinBackend, BuiltinEngine, _percentile
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
    "Which of these is immutable?\nA. list\nB. dict\nC. set\nD. tuple\nAnswer:",
)
CONTEXTS = [SHARED + q for q in QUESTIONS]
# One token each in the tiny BPE tokenizer (" A" is two there: space, letter), for the single-token path.
WORDS = [" the", " of", " a", " in"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # gain=1: numerics comparisons (prefix cache vs full forward) need a non-chaotic network.
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "bf16", gain=1.0)


@pytest.fixture(scope="module")
def engine(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> BuiltinEngine:
    handle = BuiltinBackend().prepare("bf16", model_dir, tmp_path_factory.mktemp("work"), "cpu", {})
    loaded = BuiltinBackend().load(handle)
    loaded.model.float()  # fp32: cached and uncached paths then agree to rounding
    return loaded


def _manual_scores(engine: BuiltinEngine, contexts: list[str], choices: list[str]) -> list[list[float]]:
    """Sum of log-softmax over each choice's tokens, one full forward per (context, choice), no cache."""
    rows = []
    for context in contexts:
        ids = engine.encode(context)
        row = []
        for choice in choices:
            cont = engine.tokenizer(choice, add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                logits = engine.model(torch.tensor([ids + cont])).logits[0].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            row.append(sum(float(logprobs[len(ids) - 1 + i, token]) for i, token in enumerate(cont)))
        rows.append(row)
    return rows


def _single_token(engine: BuiltinEngine, choices: list[str]) -> bool:
    return all(len(engine.tokenizer(c, add_special_tokens=False)["input_ids"]) == 1 for c in choices)


# --- scoring --------------------------------------------------------------------------------------


def test_contexts_share_a_long_token_prefix(engine: BuiltinEngine) -> None:
    from quant_release.engines.builtin import _common_prefix_len

    ids = [engine.encode(c) for c in CONTEXTS]
    assert _common_prefix_len(ids) > 0.6 * min(len(i) for i in ids)


@pytest.mark.parametrize("choices", [WORDS, [" A", " B", " C", " D"]], ids=["single-token", "multi-token"])
def test_prefix_cached_scores_equal_scoring_each_context_alone(engine: BuiltinEngine, choices: list[str]) -> None:
    together = engine.score_choices(CONTEXTS, choices)
    alone = [engine.score_choices([c], choices)[0] for c in CONTEXTS]
    manual = _manual_scores(engine, CONTEXTS, choices)
    np.testing.assert_allclose(together, alone, atol=1e-4, rtol=0)
    np.testing.assert_allclose(together, manual, atol=1e-4, rtol=0)
    # The rows differ: each context got its own logits, not the first one's.
    assert not np.allclose(together[0], together[1], atol=1e-4)


@pytest.mark.parametrize("choices", [WORDS, [" A", " B"]], ids=["single-token", "multi-token"])
def test_contexts_without_common_prefix(engine: BuiltinEngine, choices: list[str]) -> None:
    contexts = ["Alpha beta gamma", "Zeta eta theta iota"]
    assert engine.encode(contexts[0])[0] != engine.encode(contexts[1])[0]
    np.testing.assert_allclose(
        engine.score_choices(contexts, choices), _manual_scores(engine, contexts, choices), atol=1e-4, rtol=0
    )


def test_context_that_is_a_prefix_of_another(engine: BuiltinEngine) -> None:
    contexts = [SHARED, SHARED + QUESTIONS[0]]
    choices = [" A", " B"]
    np.testing.assert_allclose(
        engine.score_choices(contexts, choices), _manual_scores(engine, contexts, choices), atol=1e-4, rtol=0
    )


def test_multi_token_choices_equal_manual_sum(engine: BuiltinEngine) -> None:
    choices = [" A B", " C", " the function returns None"]
    assert not _single_token(engine, choices)
    scores = engine.score_choices(CONTEXTS, choices)
    np.testing.assert_allclose(scores, _manual_scores(engine, CONTEXTS, choices), atol=1e-4, rtol=0)
    # A longer continuation is a sum of more negative terms.
    assert all(row[2] < row[1] for row in scores)


def test_single_and_multi_token_paths_agree(engine: BuiltinEngine) -> None:
    assert _single_token(engine, WORDS)
    single_path = engine.score_choices(CONTEXTS, WORDS)
    multi_path = engine.score_choices(CONTEXTS, [*WORDS, " A B"])  # one long choice: the multi-token path
    np.testing.assert_allclose(single_path, [row[:4] for row in multi_path], atol=1e-4, rtol=0)


def test_scores_are_log_probabilities(engine: BuiltinEngine) -> None:
    scores = engine.score_choices(CONTEXTS[:1], WORDS)
    assert all(s < 0 for s in scores[0])
    assert sum(float(np.exp(s)) for s in scores[0]) < 1


def test_score_choices_reports_progress_and_handles_empty(engine: BuiltinEngine) -> None:
    calls: list[tuple[int, int]] = []
    engine.score_choices(CONTEXTS, [" A"], on_step=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 3), (2, 3), (3, 3)]
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
        with torch.inference_mode():
            expected = engine.model(torch.tensor([ids])).logits[0].argmax(dim=-1).tolist()
        assert tokens == expected
        assert all(0 <= t < VOCAB for t in tokens)


# --- benchmark ------------------------------------------------------------------------------------


def _prompts(count: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(2, VOCAB) for _ in range(length)] for _ in range(count)]


@pytest.mark.parametrize(("requests", "batch_size", "output_len", "warmup"), [(5, 2, 3, 1), (4, 4, 1, 0)])
def test_benchmark_counts_and_timings(
    engine: BuiltinEngine, requests: int, batch_size: int, output_len: int, warmup: int
) -> None:
    steps: list[tuple[int, int]] = []
    workload = BenchmarkWorkload(
        prompts=_prompts(requests, 8), output_len=output_len, batch_size=batch_size, warmup_requests=warmup
    )
    m = engine.benchmark(workload, on_step=lambda d, t: steps.append((d, t)))
    assert m.requests == requests
    assert m.output_tokens == requests * output_len
    assert m.seconds > 0
    assert m.output_tok_s == pytest.approx(m.output_tokens / m.seconds, rel=1e-9)
    assert m.requests_s == pytest.approx(requests / m.seconds, rel=1e-9)
    assert m.ttft_ms_p50 > 0
    assert m.tpot_ms_p50 >= 0
    assert m.ttft_ms_p90 >= m.ttft_ms_p50
    assert m.tpot_ms_p90 >= m.tpot_ms_p50
    assert steps[-1] == (requests, requests)
    assert len(steps) == -(-requests // batch_size)


def test_benchmark_rejects_unequal_prompts_in_a_batch(engine: BuiltinEngine) -> None:
    workload = BenchmarkWorkload(prompts=[[5] * 8, [6] * 9], output_len=2, batch_size=2, warmup_requests=0)
    with pytest.raises(ValueError, match="equal length"):
        engine.benchmark(workload)


@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_percentile_matches_numpy_linear(q: float, n: int) -> None:
    rng = np.random.default_rng(n)
    values = rng.exponential(size=n).tolist()
    assert _percentile(values, q) == pytest.approx(float(np.percentile(values, 100 * q, method="linear")), rel=1e-12)


def test_percentile_of_nothing_is_nan() -> None:
    assert np.isnan(_percentile([], 0.5))


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


def test_engine_reports_weights_and_device(engine: BuiltinEngine) -> None:
    params = sum(p.numel() for p in engine.model.parameters())  # tied embedding counted once
    assert engine.weight_bytes() == 4 * params  # fp32 after .float()
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
