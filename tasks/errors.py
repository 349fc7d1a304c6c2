"""Errors a user can act on. The CLI prints them as one line on stderr, never as a traceback."""

from __future__ import annotations


#: ``personcar``'s exit codes: 2 a user error (bad input, configuration or arguments; the same command
#: fails the same way), 1 the dataset failed validation (and any crash), 3 out of accelerator memory,
#: 75 a storage or network failure (``EX_TEMPFAIL``: a retry may pass). Only that and a crash are
#: retried: a trainer pod that exits with one of ``NO_RETRY_EXIT_CODES``, or 1 with its one error
#: line, fails its task at once (:func:`tasks.k8s.retry_may_pass`), and so does a worker task that
#: raises any other PersoncarError (:func:`tasks.dag_tasks.stage_task`).
NO_RETRY_EXIT_CODES = (2, 3)
TEMPORARY_FAILURE = 75


class PersoncarError(Exception):
    """A user-facing failure: bad input, bad configuration, unreachable source.

    The message is one line naming the file, record and rule that failed.
    """

    exit_code = 2


class TemporaryError(PersoncarError):
    """A failure a retry may mend: storage or network (an endpoint back, a bucket created)."""

    exit_code = TEMPORARY_FAILURE


class DataValidationError(PersoncarError):
    """The dataset failed validation (fatal defects, or repairable ones above threshold)."""

    exit_code = 1


def one_line(text: object) -> str:
    """``text`` (an exception or message) on one line, for a log line or a CLI error."""
    return " ".join(str(text).split()) or type(text).__name__
