"""Errors surgeon reports to users.

Every error a user can cause is a ``SurgeonError``: the CLI prints its message on one line and exits
with its ``exit_code`` (no traceback unless ``--debug``). Anything else escaping is a bug in surgeon.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import traceback
from typing import Any, Iterator

# Terminal colour and cursor codes (CSI sequences): torch's ONNX ConversionError and some library messages
# carry them, and quoted inside a one-line error they reach logs and pipelines as raw bytes.
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def strip_ansi(text: str) -> str:
    """``text`` without ANSI escape sequences (``\\x1b[1;31m`` and the like)."""
    return _ANSI.sub("", text)


class SurgeonError(Exception):
    """An error caused by the input (model, data, options, paths). Exit code 2."""

    exit_code: int = 2

    def __init__(self, message: str) -> None:
        # One line, always, and plain text: pipelines grep for it.
        super().__init__(" ".join(strip_ansi(str(message)).split()))


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


class PipelineError(SurgeonError):
    """An unexpected failure inside a stage of the pipeline (a bug in surgeon or in a library it
    drives), in one line naming the stage, the pass and the module where they are known; the
    original exception is its ``__cause__`` (the CLI's ``--debug`` shows it). Exit code 1: an
    internal error, not bad input — but still a ``SurgeonError``, so a caller of the Python API
    catches one type."""

    exit_code = 1


def module_of_failure(exc: BaseException, model: Any) -> str | None:
    """Dotted path of the innermost submodule of ``model`` whose code raised ``exc``, if any
    (``"<root>"`` for the model's own ``forward``)."""
    names = {id(m): n for n, m in model.named_modules()}
    found = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        owner = frame.f_locals.get("self")
        if owner is not None and id(owner) in names:
            found = names[id(owner)] or "<root>"
    if found is None and exc.__cause__ is not None and exc.__cause__ is not exc:
        return module_of_failure(exc.__cause__, model)
    return found


@contextlib.contextmanager
def stage(name: str, *, pass_name: str | None = None, model: Any = None) -> Iterator[None]:
    """Turn any exception but a ``SurgeonError`` raised inside into a ``PipelineError`` naming the
    stage, the pass and (found from the traceback, given ``model``) the module, cause chained."""
    try:
        yield
    except SurgeonError:
        raise
    except Exception as exc:  # noqa: BLE001 - every other failure is internal, named where it happened
        where = module_of_failure(exc, model) if model is not None else None
        raise PipelineError(f"internal error in stage '{name}'" + (f", pass '{pass_name}'" if pass_name else "")
                            + (f", module '{where}'" if where else "") + f": {first_line(exc)}") from exc


def first_line(exc: BaseException, *, limit: int = 300, trim: bool = False) -> str:
    """``"ValueError: <first line of the message>"``, cut to ``limit`` characters: how a foreign
    exception is quoted inside a one-line ``SurgeonError`` (or a report note).

    ``trim`` also strips trailing whitespace from that line (``surgeon.distributed`` matches the
    text of collective failures)."""
    lines = strip_ansi(str(exc)).strip().splitlines()
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
