"""The benchmark stage's workloads (trtllm-bench-style lengths, prompt files) and its plot."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from quant_release import benchmarking
from quant_release.errors import ConfigError
from tests.support.throughput import throughput


def _encode(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_token_norm_dist_draws_the_asked_lengths_from_real_text() -> None:
    requests = benchmarking.token_norm_dist(_encode, 400, 100, 20, 50, 10, seed=3, max_input=10_000)
    inputs = [len(r.prompt) for r in requests]
    outputs = [r.output_len for r in requests]
    assert abs(statistics.mean(inputs) - 100) < 4 and abs(statistics.stdev(inputs) - 20) < 3
    assert abs(statistics.mean(outputs) - 50) < 2 and abs(statistics.stdev(outputs) - 10) < 2
    # Pieces of English text, not random ids: mostly letters and spaces.
    text = "".join(chr(t) for r in requests[:20] for t in r.prompt)
    assert sum(c.isalpha() or c == " " for c in text) > 0.8 * len(text)


def test_token_norm_dist_is_deterministic_and_seeded() -> None:
    a = benchmarking.token_norm_dist(_encode, 20, 30, 5, 8, 2, seed=1, max_input=100)
    b = benchmarking.token_norm_dist(_encode, 20, 30, 5, 8, 2, seed=1, max_input=100)
    c = benchmarking.token_norm_dist(_encode, 20, 30, 5, 8, 2, seed=2, max_input=100)
    assert a == b
    assert benchmarking.fingerprint(a) == benchmarking.fingerprint(b) != benchmarking.fingerprint(c)


def test_zero_stdev_gives_fixed_lengths_and_limits_hold() -> None:
    requests = benchmarking.token_norm_dist(_encode, 5, 500, 0, 1, 0, seed=0, max_input=64)
    assert [len(r.prompt) for r in requests] == [64] * 5
    assert [r.output_len for r in requests] == [1] * 5


def test_prompt_file_txt_and_jsonl(tmp_path: Path) -> None:
    txt = tmp_path / "prompts.txt"
    txt.write_text("first prompt\n\nsecond one\n")
    requests = benchmarking.prompt_file(txt, _encode, 7, 0, seed=0)
    assert [r.prompt for r in requests] == [tuple(_encode("first prompt")), tuple(_encode("second one"))]
    assert [r.output_len for r in requests] == [7, 7]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(json.dumps({"prompt": "a b", "output_tokens": 3}) + "\n" + json.dumps({"prompt": "c"}) + "\n")
    requests = benchmarking.prompt_file(jsonl, _encode, 9, 0, seed=0, limit=5)
    assert [(r.prompt, r.output_len) for r in requests] == [(tuple(_encode("a b")), 3), (tuple(_encode("c")), 9)]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.txt", None, "No such file"),
        ("empty.txt", "\n\n", "holds no prompts"),
        ("bad.jsonl", '{"text": "x"}\n', "line 1: expected"),
    ],
)
def test_bad_prompt_files_are_one_line_errors(tmp_path: Path, name: str, content: str | None, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        benchmarking.prompt_file(path, _encode, 4, 0, seed=0)


def test_describe_reports_what_was_sent() -> None:
    requests = benchmarking.token_norm_dist(_encode, 10, 20, 0, 5, 0, seed=0, max_input=100)
    info = benchmarking.describe("token-norm-dist", requests, seed=0)
    assert (info.requests, info.input_mean, info.input_stdev, info.output_mean) == (10, 20, 0, 5)
    assert info.fingerprint == benchmarking.fingerprint(requests)


def test_plot_is_a_png(tmp_path: Path) -> None:
    path = benchmarking.plot_sweep(throughput(100.0, 160.0).sweep, "builtin on CPU", tmp_path / "plot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5000
