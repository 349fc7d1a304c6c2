"""Errors a user can act on. The CLI prints them as one line on stderr, never as a traceback."""

from __future__ import annotations


class PersoncarError(Exception):
    """A user-facing failure: bad input, bad configuration, unreachable source.

    The message is one line naming the file, record and rule that failed.
    """

    exit_code = 2


class DataValidationError(PersoncarError):
    """The dataset failed validation (fatal defects, or repairable ones above threshold)."""

    exit_code = 1


def one_line(text: object) -> str:
    """``text`` (an exception or message) on one line, for a log line or a CLI error."""
    return " ".join(str(text).split()) or type(text).__name__
