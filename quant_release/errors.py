"""Errors that reach the user as one line and a non-zero exit, never as a traceback; and `redact`, which
keeps credentials out of every message, log line and MLflow field."""

from __future__ import annotations

import re

# Words that mark a name (a config key, a query parameter) as holding a secret.
SECRET_WORDS = r"token|secret|password|passwd|api[_-]?key|credential"
# `scheme://user:password@host`: the userinfo part, wherever a URL appears in a text.
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")
# `?token=...` / `&api_key=...`: the value of a credential-looking query parameter.
_SECRET_QUERY = re.compile(rf"(?P<key>[?&][^=&#\s]*(?:{SECRET_WORDS})[^=&#\s]*=)[^&#\s]+", re.IGNORECASE)


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


class TrackingUnreachableError(QuantReleaseError):
    """The MLflow server stopped answering mid-run for longer than its client's retries span."""


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


def redact(value: str) -> str:
    """Mask credentials in URLs anywhere in `value` (error messages quote URLs too)."""
    return _SECRET_QUERY.sub(r"\g<key>***", _URL_USERINFO.sub(r"\g<scheme>***@", value))
