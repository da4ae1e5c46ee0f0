"""The one error type users see: the CLI turns it into a one-line message and exit code."""

from __future__ import annotations


class TinyPTQError(Exception):
    """A user-facing error (bad input, missing data, bad configuration).

    The message is one line that names the culprit; the CLI prints it without a
    traceback and exits with ``exit_code``.
    """

    exit_code = 2


class ConfigError(TinyPTQError):
    """Unknown stage, option, bit-width or malformed pipeline / grid file."""


class ModelError(TinyPTQError):
    """Missing, corrupt or unsupported model (file or layer)."""


class DataError(TinyPTQError):
    """Missing or malformed dataset, wrong input shape, NaN/Inf in data."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of ``exc``'s message cut to ``limit`` characters, else its type name.

    Third-party libraries raise messages of many lines (or none); a one-line
    user message needs just the first meaningful one.
    """
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return type(exc).__name__
