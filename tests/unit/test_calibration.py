"""Calibration sources by registry: the choices the config, the CLI and the Prefect form offer, and `auto`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from flows.cli import build_parser, config_from_args
from quant_release import calibration
from quant_release.config import QuantizationConfig, ReleaseConfig, build_config
from quant_release.errors import ConfigError
from tests.support.process import free_port

# --- the registry and what is derived from it -------------------------------------------------------


def test_the_three_choices_come_from_the_registry() -> None:
    assert calibration.choices() == ("auto", "cnn_dailymail", "python-docs")
    assert set(calibration.SOURCES) == {"cnn_dailymail", "python-docs"}
    assert calibration.auto_order() == ["cnn_dailymail", "python-docs"]


def test_config_schema_suggests_the_named_sources() -> None:
    schema = ReleaseConfig.model_json_schema()
    field = schema["$defs"]["QuantizationConfig"]["properties"]["calib_dataset"]
    # Suggestions, not an enum: a file or a Hub dataset spec is free text.
    assert field["examples"] == list(calibration.choices())
    assert "enum" not in field
    assert field["default"] == "auto"
    for name in calibration.SOURCES:
        assert name in field["description"]
    assert "NAME[:CONFIG]:SPLIT:COLUMN" in field["description"] and "file:PATH" in field["description"]


def test_config_rejects_an_unknown_source() -> None:
    with pytest.raises(
        ConfigError, match=r"quantization\.calib_dataset \(--calib-dataset\): .*unknown calibration dataset 'wikitext'"
    ):
        build_config({"quantization": {"calib_dataset": "wikitext"}})
    assert QuantizationConfig(calib_dataset="python-docs").calib_dataset == "python-docs"


def test_cli_flag_takes_names_and_specs() -> None:
    parser = build_parser()
    for value in ("cnn_dailymail", "abisee/cnn_dailymail:3.0.0:train:article", "file:/data/calib.jsonl"):
        assert (
            config_from_args(parser.parse_args(["run", "--calib-dataset", value])).quantization.calib_dataset == value
        )
    with pytest.raises(ConfigError, match="unknown calibration dataset 'wikitext'"):
        config_from_args(parser.parse_args(["run", "--calib-dataset", "wikitext"]))


def test_a_registered_source_is_found_and_resolved(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calibration, "SOURCES", dict(calibration.SOURCES))

    @calibration.register("tiny-test-text", "two sentences, for this test", auto_rank=-1)
    def documents(samples: int) -> list[str]:
        return ["one sentence.", "another sentence."][: max(samples, 1)]

    assert "tiny-test-text" in calibration.choices()
    assert calibration.source("tiny-test-text").documents(2) == ["one sentence.", "another sentence."]
    assert calibration.resolve("auto", "http://unused.example") == "tiny-test-text"  # ranked first, always there
    with pytest.raises(ValueError, match="twice"):
        calibration.register("tiny-test-text", "again")(documents)


def test_python_docs_source_is_the_calibration_split() -> None:
    from quant_release import textdata

    assert calibration.source("python-docs").documents(64) == textdata.python_docs("calibration")


def test_unknown_source_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown calibration dataset 'nope'"):
        calibration.resolve("nope", "http://unused.example")
    assert json.dumps(calibration.choices())  # plain strings, serialisable into a schema


# --- resolve: `auto` and explicit names -------------------------------------------------------------


def _clear_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)


def test_auto_is_python_docs_when_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_offline(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls: list[str] = []

    def never(*args: object, **kwargs: object) -> None:
        calls.append("called")
        raise AssertionError("no Hub call when offline")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", never)
    assert calibration.resolve("auto", "https://huggingface.co") == "python-docs"
    assert calls == []


def test_auto_is_python_docs_when_datasets_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_offline(monkeypatch)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert calibration.resolve("auto", f"http://127.0.0.1:{free_port()}") == "python-docs"


def test_auto_is_python_docs_when_endpoint_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_offline(monkeypatch)
    start = time.monotonic()
    assert calibration.resolve("auto", f"http://127.0.0.1:{free_port()}") == "python-docs"
    assert time.monotonic() - start < 20  # a refused connection is not waited on for minutes


def test_auto_is_cnn_dailymail_when_the_hub_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_offline(monkeypatch)
    seen: list[tuple[str, str]] = []

    import huggingface_hub

    def answer(self: huggingface_hub.HfApi, repo_id: str, **kwargs: object) -> object:
        seen.append((self.endpoint, repo_id))
        return object()

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", answer)
    assert calibration.resolve("auto", "http://hub.example") == "cnn_dailymail"
    assert seen == [("http://hub.example", "abisee/cnn_dailymail")]


def test_explicit_dataset_is_returned_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    _clear_offline(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert calibration.resolve("python-docs", f"http://127.0.0.1:{free_port()}") == "python-docs"


@pytest.mark.parametrize("offline", ["0", "1"])
def test_explicit_hub_dataset_that_is_unreachable_is_bad_input(monkeypatch: pytest.MonkeyPatch, offline: str) -> None:
    """Chosen by name but not reachable: one line at preflight, not a failed quantize stage minutes later."""
    _clear_offline(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    endpoint = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError, match=r"--calib-dataset cnn_dailymail: not available now.*python-docs"):
        calibration.resolve("cnn_dailymail", endpoint)


# --- sources with arguments: Hub dataset specs and local files ---------------------------------------


@pytest.mark.parametrize(
    ("spec", "parsed"),
    [
        ("abisee/cnn_dailymail:3.0.0:train:article", ("abisee/cnn_dailymail", "3.0.0", "train", "article")),
        ("hf:wikitext:wikitext-2-raw-v1:test:text", ("wikitext", "wikitext-2-raw-v1", "test", "text")),
        ("org/data:train:text", ("org/data", None, "train", "text")),
    ],
)
def test_hub_dataset_specs_parse(spec: str, parsed: tuple[str, str | None, str, str]) -> None:
    from quant_release.calibration.hub_dataset import parse_spec

    assert parse_spec(spec) == parsed
    assert calibration.source(spec).name == spec


@pytest.mark.parametrize("spec", ["org/data:train:", "org/data:a:b:c:d", "org/data:train:a/b"])
def test_malformed_hub_specs_are_config_errors(spec: str) -> None:
    with pytest.raises(ConfigError, match="NAME\\[:CONFIG\\]:SPLIT:COLUMN"):
        build_config({"quantization": {"calib_dataset": spec}})


def test_a_text_file_is_paragraphs_and_a_jsonl_file_is_lines(tmp_path: Path) -> None:
    text = tmp_path / "calib.txt"
    text.write_text("First paragraph,\nstill first.\n\n\nSecond paragraph.\n")
    assert calibration.source(f"file:{text}").documents(4) == ["First paragraph,\nstill first.", "Second paragraph."]
    rows = tmp_path / "calib.jsonl"
    rows.write_text('{"text": "one"}\n\n"two"\n{"text": "  "}\n')
    assert calibration.source(f"file:{rows}").documents(4) == ["one", "two"]
    rows.write_text('{"article": "no text field"}\n')
    with pytest.raises(ConfigError, match="line 1: expected a string or an object with 'text'"):
        calibration.source(f"file:{rows}").documents(4)


def test_a_missing_file_fails_in_preflight_and_an_edited_one_changes_identity(tmp_path: Path) -> None:
    path = tmp_path / "calib.txt"
    with pytest.raises(
        ConfigError,
        match=r"--calib-dataset file:.*calib.txt: not available now \(the local file [^;]*\); choose another",
    ):
        calibration.resolve(f"file:{path}", "http://unused.example")
    path.write_text("some text")
    assert calibration.resolve(f"file:{path}", "http://unused.example") == f"file:{path}"
    first = calibration.source(f"file:{path}").identity()
    path.write_text("other text")
    assert first is not None and calibration.source(f"file:{path}").identity() != first
    assert calibration.source("python-docs").identity() is None


def test_old_option_names_still_work() -> None:
    old = build_config({"quantization": {"calib_samples": 16, "calib_seq_len": 128, "calib_batch_size": 4}})
    assert (old.quantization.calib_size, old.quantization.calib_seq, old.quantization.batch_size) == (16, 128, 4)
    assert old.quantization.calib_samples == 16  # the former attribute, read-only
    args = build_parser().parse_args(["run", "--calib-samples", "16", "--calib-seq-len", "128", "--batch-size", "0"])
    config = config_from_args(args).quantization
    assert (config.calib_size, config.calib_seq, config.batch_size) == (16, 128, 0)
