"""Errors surgeon reports to users.

Every error a user can cause is a ``SurgeonError``: the CLI prints its message on one line and exits
with its ``exit_code`` (no traceback unless ``--debug``). Anything else escaping is a bug in surgeon.
"""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Iterator


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


def first_line(exc: BaseException, *, limit: int = 300, trim: bool = False) -> str:
    """``"ValueError: <first line of the message>"``, cut to ``limit`` characters: how a foreign
    exception is quoted inside a one-line ``SurgeonError`` (or a report note).

    ``trim`` also strips trailing whitespace from that line (``surgeon.distributed`` matches the
    text of collective failures)."""
    lines = str(exc).strip().splitlines()
    line = lines[0] if lines else ""
    # torch.export.load points at warnings surgeon does not show (it prints one line): drop the pointer.
    line = line.replace(" Please check the warnings above for possible errors.", "").replace(
        "Please check the warnings above for possible errors.", "").rstrip()
    return f"{type(exc).__name__}: {line.strip() if trim else line}"[:limit]


@contextlib.contextmanager
def quiet(*loggers: str, output: bool = False) -> Iterator[None]:
    """Silence what libraries print about errors surgeon reports in one line.

    The named ``loggers`` are raised to CRITICAL for the duration. With ``output`` every logger
    below ERROR is disabled as well and stdout/stderr are swallowed: a failing ``torch.export``
    prints graph dumps to stdout and warnings to stderr, which would corrupt ``--json`` output and
    the one-line error contract."""
    named = [logging.getLogger(n) for n in loggers]
    levels = [lg.level for lg in named]
    for lg in named:
        lg.setLevel(logging.CRITICAL)
    if output:
        logging.disable(logging.WARNING)
    try:
        if output:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                yield
        else:
            yield
    finally:
        if output:
            logging.disable(logging.NOTSET)
        for lg, level in zip(named, levels):
            lg.setLevel(level)
