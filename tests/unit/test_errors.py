"""How errors become the text a user reads, and the once-per-process source hash behind preflight."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import tasks.download as download
from quant_release.errors import ConfigError, error_message


def test_our_errors_read_verbatim() -> None:
    assert error_message(ConfigError("model 'x' not found")) == "model 'x' not found"
    assert error_message(ConfigError("first\nsecond")) == "first\nsecond"


def test_other_errors_name_their_type_and_keep_the_first_line() -> None:
    assert error_message(RuntimeError("calibration diverged\n  at layer 3")) == "RuntimeError: calibration diverged"


def test_errors_without_a_message_are_their_type() -> None:
    assert error_message(KeyError()) == "KeyError"
    assert error_message(ConfigError("")) == "ConfigError"


def test_source_file_is_hashed_once_and_again_after_a_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = download.sha256_file
    monkeypatch.setattr(download, "sha256_file", lambda p: calls.append(str(p)) or real(p))
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF v1")
    first = download._file_sha256(path)
    assert download._file_sha256(path) == first
    assert len(calls) == 1
    path.write_bytes(b"GGUF v2, longer")
    os.utime(path, ns=(1, 2))
    assert download._file_sha256(path) != first
    assert len(calls) == 2
