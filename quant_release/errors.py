"""Errors that reach the user as one line and a non-zero exit, never as a traceback."""

from __future__ import annotations


class QuantReleaseError(Exception):
    """Base class: the message is complete and meant for the user as is."""

    exit_code = 1


class ConfigError(QuantReleaseError):
    """Bad input: a malformed config, an unknown model or repo, a missing token. Found before heavy work."""

    exit_code = 2


class UnsupportedModelError(ConfigError):
    """The model exists but this pipeline cannot quantize or serve it (e.g. not a Llama architecture)."""


class MissingUpstreamError(QuantReleaseError):
    """A single stage was asked to run but a stage it depends on has no finished result on disk."""

    exit_code = 3


class EngineUnavailableError(QuantReleaseError):
    """The selected engine's package or hardware is not present on this machine."""

    exit_code = 4


def error_message(exc: BaseException) -> str:
    """What the user reads about `exc`: our own errors verbatim (they are written for the user, one line by
    design), anything else as `Type: first line`."""
    text = str(exc).strip()
    if isinstance(exc, QuantReleaseError) and text:
        return text
    lines = text.splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
