"""How errors become the text a user reads."""

from __future__ import annotations

from quant_release.errors import ConfigError, error_message


def test_our_errors_read_verbatim() -> None:
    assert error_message(ConfigError("model 'x' not found")) == "model 'x' not found"
    assert error_message(ConfigError("first\nsecond")) == "first\nsecond"


def test_other_errors_name_their_type_and_keep_the_first_line() -> None:
    assert error_message(RuntimeError("calibration diverged\n  at layer 3")) == "RuntimeError: calibration diverged"


def test_errors_without_a_message_are_their_type() -> None:
    assert error_message(KeyError()) == "KeyError"
    assert error_message(ConfigError("")) == "ConfigError"
