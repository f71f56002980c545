"""Errors surgeon reports to users.

Every error a user can cause is a ``SurgeonError``: the CLI prints its message on one line and exits
with its ``exit_code`` (no traceback unless ``--debug``). Anything else escaping is a bug in surgeon.
"""

from __future__ import annotations


class SurgeonError(Exception):
    """An error caused by the input (model, data, options, paths). Exit code 2."""

    exit_code: int = 2

    def __init__(self, message: str) -> None:
        # One line, always: pipelines grep for it.
        super().__init__(" ".join(str(message).split()))


class CaptureError(SurgeonError):
    """The model could not be captured as a graph by torch.export nor torch.fx."""


class ToleranceNotMet(SurgeonError):
    """No configuration met the tolerance; the best model found was still written. Exit code 3."""

    exit_code = 3


class InsufficientMemory(SurgeonError):
    """The estimated peak memory of the run exceeds what is available; refused before any work. Exit 4.

    A distinct code because the cure differs from other bad input: the same command with smaller
    calibration batches (or on a larger machine) succeeds."""

    exit_code = 4
