"""Stage 2 of ``optimize``: the calibration batches, materialised, validated and split.

``prepare_batches`` checks every batch before any work (non-empty, finite, same structure, dtype and
rank as the example inputs, accepted by the captured graph); ``split_batches`` makes the seeded
fit/check split (the check part is never used to fit). Reading ``--calib`` is
``surgeon.pipeline.calib_read``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..errors import SurgeonError, first_line
from ..inputs import Inputs, batch_size, call, named_inputs

__all__ = ["DEFAULT_CHECK_FRACTION", "MIN_CHECK_SAMPLES", "Split", "prepare_batches", "read_batches", "split_batches"]

DEFAULT_CHECK_FRACTION = 0.25
MIN_CHECK_SAMPLES = 64  # the check part grows to this many samples where the data allows (split_batches)


def _normalise(batch: Any, example: Inputs) -> Inputs:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, list):
        return tuple(batch)
    if isinstance(batch, Mapping) and not isinstance(batch, dict):
        return dict(batch)  # e.g. a tokenizer's BatchEncoding
    return batch


def _mismatch(batch: Any, example: Inputs) -> str | None:
    """Why ``batch`` cannot stand in for ``example`` (structure, dtype, rank), or None."""
    if not isinstance(batch, (tuple, dict)):
        return f"expected a tuple or dict of inputs, got {type(batch).__name__}"
    if isinstance(example, dict) != isinstance(batch, dict):
        want = f"keyword inputs ({', '.join(example)})" if isinstance(example, dict) else f"a tuple of {len(example)} input(s)"
        got = f"keyword inputs ({', '.join(batch)})" if isinstance(batch, dict) else f"a tuple of {len(batch)} input(s)"
        return f"expected {want}, got {got}"
    if isinstance(example, dict) and set(example) != set(batch):
        return f"expected inputs {', '.join(example)}, got {', '.join(map(str, batch)) or 'none'}"
    if isinstance(example, tuple) and len(example) != len(batch):
        return f"expected {len(example)} input(s), got {len(batch)}"
    ex = dict(named_inputs(example))
    for name, value in named_inputs(batch):
        want = ex[name]
        if isinstance(want, torch.Tensor):
            if not isinstance(value, torch.Tensor):
                return f"input '{name}' is a {type(value).__name__}, expected a tensor"
            if value.dtype != want.dtype:
                return (f"input '{name}' has dtype {str(value.dtype).replace('torch.', '')}, expected "
                        f"{str(want.dtype).replace('torch.', '')}")
            if value.dim() != want.dim():
                return f"input '{name}' has {value.dim()} dimension(s), expected {want.dim()}"
        elif type(value) is not type(want) and not (want is None and value is None):
            return f"input '{name}' is a {type(value).__name__}, expected {type(want).__name__}"
    return None


def _signature(batch: Inputs) -> tuple:
    return tuple((n, tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else (n, repr(v)) for n, v in named_inputs(batch))


def prepare_batches(calib: Iterable[Any] | None, example_inputs: Inputs, gm0: nn.Module) -> tuple[list[Inputs], bool]:
    """Materialise and validate the calibration batches: ``(batches, weak)``.

    ``calib=None`` → the example inputs as the only batch (``weak=True``). Batches are numbered from 1
    in messages. Each distinct shape signature is run once through ``gm0`` (the captured graph's shape
    guards are what decide whether the model accepts it). Under a process group each rank runs only
    the batches of its share and the ranks agree on the first bad batch (``surgeon.distributed``)."""
    from .. import distributed

    error: SurgeonError | None = None
    prepared: tuple[list[Inputs], bool] = ([], False)
    try:
        prepared = _prepare_batches(calib, example_inputs, gm0, distributed.rank(), distributed.world_size())
    except SurgeonError as exc:
        error = exc
    distributed.agree(error, "checking the calibration batches", getattr(error, "batch", 0))
    return prepared


def read_batches(calib: Iterable[Any]) -> list[Any]:
    """``calib`` as a list (read once: a generator feeds both the memory estimate and the run), or one
    line saying what a calibration argument is. A tensor, a dict or a tuple of tensors is a single
    batch, not batches: iterating it would split its rows (or keys) into "batches"."""
    if isinstance(calib, (torch.Tensor, dict)) or (isinstance(calib, tuple) and calib and isinstance(calib[0], torch.Tensor)):
        raise SurgeonError("calib must be an iterable of input tuples (or dicts), one per batch — "
                           "wrap a single batch in a list")
    if isinstance(calib, list):
        return calib
    try:
        return list(calib)
    except TypeError as exc:  # not iterable (a number, a model); an error inside a user's generator propagates
        if not isinstance(calib, Iterable):
            raise SurgeonError("calib must be an iterable of input tuples (or dicts), one per batch, got "
                               f"{type(calib).__name__}") from exc
        raise


def _prepare_batches(calib: Iterable[Any] | None, example_inputs: Inputs, gm0: nn.Module, rank: int,
                     world: int) -> tuple[list[Inputs], bool]:
    example = _normalise(example_inputs, example_inputs)
    if calib is None:
        return [example], True
    calib = read_batches(calib)
    batches = [_normalise(b, example) for b in calib]
    if not batches:
        raise SurgeonError("calibration data is empty")
    seen: set[tuple] = set()
    for i, batch in enumerate(batches, 1):
        why = _mismatch(batch, example)
        if why:
            raise _at(i, SurgeonError(f"calibration batch {i} does not match the model's inputs: {why}"))
        for name, value in named_inputs(batch):
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise _at(i, SurgeonError(f"calibration data contains NaN/Inf (batch {i}, input '{name}')"))
        sig = _signature(batch)
        if sig in seen or (i - 1) % world != rank:  # another rank runs this one
            continue
        try:
            with torch.no_grad():
                call(gm0, batch)
        except SurgeonError as exc:
            raise _at(i, exc) from None
        except Exception as exc:  # noqa: BLE001 - any failure here means the model refuses the batch
            raise _at(i, SurgeonError(f"calibration batch {i} does not match the model's inputs: "
                                      f"{first_line(exc)}")) from exc
        seen.add(sig)
    return batches, False


def _at(batch: int, exc: SurgeonError) -> SurgeonError:
    exc.batch = batch  # type: ignore[attr-defined]  # which error ranks agree on: the first bad batch
    return exc


@dataclass
class Split:
    """Fit and check batches (indices into the materialised calibration batches, 0-based)."""

    fit: list[Inputs]
    check: list[Inputs]
    fit_index: list[int]
    check_index: list[int]
    independent: bool  # False when a single batch serves as both


def split_batches(batches: Sequence[Inputs], check_fraction: float = DEFAULT_CHECK_FRACTION, seed: int = 0,
                  min_check_samples: int = MIN_CHECK_SAMPLES) -> Split:
    """Seeded split: ``round(n·check_fraction)`` check batches, at least one of each when n ≥ 2, and
    more check batches until they hold ``min_check_samples`` samples, but never more than half of
    the batches (the fit part calibrates): a check set of a dozen samples says little about the data
    the model will see (docs/report.md, "the check set")."""
    n = len(batches)
    if not 0.0 < check_fraction < 1.0:
        raise SurgeonError(f"check fraction must be in (0, 1), got {check_fraction}")
    if n == 1:
        return Split([batches[0]], [batches[0]], [0], [0], False)
    n_check = min(max(1, round(n * check_fraction)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    sizes = [batch_size(batches[i]) if isinstance(batches[i], (tuple, list, dict, torch.Tensor)) else 1 for i in perm]
    while n_check < n // 2 and sum(sizes[:n_check]) < min_check_samples:
        n_check += 1
    check_index = sorted(perm[:n_check])
    fit_index = sorted(perm[n_check:])
    return Split([batches[i] for i in fit_index], [batches[i] for i in check_index], fit_index, check_index, True)
