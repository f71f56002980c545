"""Streaming calibration with bounded statistics.

``calibrate(module, batches)`` runs every batch once through ``module`` with all calibratables (e.g.
``surgeon.quant.Quantizer``) in ``observe`` mode, then ``finalize()``s them and switches them to
``quant`` mode. Nothing keeps activations: each observed tensor folds into statistics of fixed size,

    RunningAmax   amax ← max(amax, max|x|)                   per tensor, or one value per index of an axis
    Histogram     counts[bins] of |x| on [0, hi], hi = 2^k    grows by merging adjacent bin pairs

so memory after 8 batches equals memory after 10 000 (tests/test_calibration.py checks it). Both
statistics have ``merge(other)``: merging is exact (histogram ranges are powers of two, so two
histograms always align after pair-merging the narrower one), and both have ``all_reduce()``, the
same combination over a ``torch.distributed`` process group (amax: MAX; histogram: range MAX, then
counts SUM), so ``calibrate`` under ``torchrun`` finalises the scales one process would (see
``surgeon.distributed``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from .errors import SurgeonError
from .formats import FP8_MAX, INT8_MAX, round_half_even
from .inputs import Inputs, batch_size, call

__all__ = ["RunningAmax", "Histogram", "Calibratable", "calibratables", "calibrate", "CalibrationStats",
           "all_reduce_statistics", "can_all_reduce"]


def _rows(x: Tensor, axis: int | None) -> Tensor:
    """|x| as float32 with shape (C, N): C = 1 per tensor, else one row per index of ``axis``."""
    a = x.detach().abs().to(torch.float32)
    if axis is None:
        return a.reshape(1, -1)
    return a.movedim(axis, 0).reshape(a.shape[axis], -1)


class RunningAmax:
    """Running max of |x|, per tensor (``axis=None``, a 0-d value) or per index of ``axis`` (1-d).

    NaN is sticky (``torch.maximum`` propagates it) and so is inf, so a consumer can tell that the
    stream was not finite."""

    def __init__(self, axis: int | None = None) -> None:
        self.axis = axis
        self.value: Tensor | None = None

    def update(self, x: Tensor) -> None:
        if x.numel() == 0:
            return
        a = x.detach().abs()
        if self.axis is None:
            cur = a.amax().to(torch.float32)
        else:
            dims = [d for d in range(x.dim()) if d != self.axis]
            cur = (a.amax(dim=dims) if dims else a).to(torch.float32)
        self._fold(cur)

    def _fold(self, cur: Tensor) -> None:
        if self.value is None:
            self.value = cur.clone()
            return
        if cur.shape != self.value.shape:
            raise SurgeonError(f"observed {tuple(cur.shape)} amax values along axis {self.axis}, "
                               f"earlier batches had {tuple(self.value.shape)}")
        self.value = torch.maximum(self.value, cur.to(self.value.device))

    def merge(self, other: "RunningAmax") -> None:
        if other.value is not None:
            self._fold(other.value)

    def all_reduce(self, what: str = "calibration") -> None:
        """MAX over the ``torch.distributed`` process group (exact; a no-op without one).

        NaN becomes +inf first (a MAX reduction need not propagate NaN): still non-finite, so a
        consumer rejects the stream as it would in one process."""
        from . import distributed

        v = None if self.value is None else torch.nan_to_num(self.value, nan=math.inf)
        out = distributed.all_reduce_optional(v, "max", what)
        if out is not None:
            self.value = out.to(torch.float32)

    def nbytes(self) -> int:
        return 0 if self.value is None else self.value.numel() * self.value.element_size()


class Histogram:
    """Fixed-size histogram of |x| (one row per index of ``axis``, or one row per tensor).

    Row ``c`` covers ``[0, hi[c])`` with ``bins`` equal bins; ``hi`` is the smallest power of two
    strictly above the largest value seen. When a value ``>= hi`` arrives, ``hi`` doubles as often as
    needed and each doubling merges adjacent bin pairs, so memory stays ``bins`` counts per row. Bin
    widths are powers of two, so ``floor(|x| / width)`` is exact and pair-merging commutes with
    binning: the counts do not depend on how the stream was split into batches, and merging two
    histograms equals histogramming both streams. Non-finite values are counted in ``nonfinite`` and
    left out of the bins.
    """

    def __init__(self, bins: int = 2048, axis: int | None = None) -> None:
        if bins < 2 or bins & (bins - 1):
            raise SurgeonError(f"histogram bins must be a power of two >= 2, got {bins}")
        self.bins = bins
        self.axis = axis
        self.counts: Tensor | None = None  # (C, bins) int64
        self.hi: Tensor | None = None  # (C,) float64, 0 for a row that has seen only zeros
        self.amax: Tensor | None = None  # (C,) float32, finite values only
        self.nonfinite = 0

    # -- building ----------------------------------------------------------------------------------
    def _ensure(self, rows: int, device: torch.device) -> None:
        if self.counts is None:
            self.counts = torch.zeros(rows, self.bins, dtype=torch.int64, device=device)
            self.hi = torch.zeros(rows, dtype=torch.float64, device=device)
            self.amax = torch.zeros(rows, dtype=torch.float32, device=device)
        elif self.counts.shape[0] != rows:
            raise SurgeonError(f"histogram along axis {self.axis} has {self.counts.shape[0]} rows, "
                               f"a new batch has {rows}")

    def _grow(self, new_max: Tensor) -> None:
        """Raise ``hi`` strictly above ``new_max`` where it is not (the smallest power of two)."""
        assert self.hi is not None
        need = (new_max >= self.hi) & (new_max > 0)
        if bool(need.any()):
            self._rescale(torch.where(need, _pow2_above(new_max), self.hi))

    def _rescale(self, target: Tensor) -> None:
        """Widen each row's range to ``target`` (a power of two >= ``hi``) by pair-merging bins."""
        assert self.counts is not None and self.hi is not None
        # a row that has seen only zeros (hi == 0) holds them in bin 0, which is bin 0 at any range
        grow = (target > self.hi) & (self.hi > 0)
        ratio = torch.where(grow, target / torch.where(grow, self.hi, torch.ones_like(self.hi)), 1.0)
        k = torch.round(torch.log2(ratio)).to(torch.int64)  # exact: both are powers of two
        self.hi = torch.maximum(self.hi, target)
        half = self.bins // 2
        for step in range(min(int(k.max()), self.bins.bit_length())):
            rows = k > step
            c = self.counts[rows]
            merged = c.view(c.shape[0], half, 2).sum(-1)
            self.counts[rows] = torch.cat([merged, torch.zeros_like(merged)], dim=1)

    def update(self, x: Tensor) -> None:
        if x.numel() == 0:
            return
        a = _rows(x, self.axis)
        self._ensure(a.shape[0], a.device)
        assert self.counts is not None and self.hi is not None and self.amax is not None
        finite = torch.isfinite(a)
        self.nonfinite += int((~finite).sum())
        a = torch.where(finite, a, torch.zeros_like(a))
        cmax = a.amax(dim=1)
        self.amax = torch.maximum(self.amax, cmax)
        self._grow(cmax.to(torch.float64))
        width = (self.hi / self.bins).to(torch.float32)
        # rows with hi == 0 have only zeros: any positive width bins them into bin 0
        width = torch.where(width > 0, width, torch.ones_like(width))
        idx = torch.floor(a / width[:, None]).clamp_(0, self.bins - 1).to(torch.int64)
        idx += torch.arange(a.shape[0], device=a.device)[:, None] * self.bins
        idx = idx[finite]
        self.counts += torch.bincount(idx, minlength=self.counts.numel()).view_as(self.counts)

    def merge(self, other: "Histogram") -> None:
        """Add ``other``'s counts (exact: both ranges are powers of two, so their bins align)."""
        if other.counts is None:
            return
        if other.bins != self.bins:
            raise SurgeonError(f"cannot merge histograms with {self.bins} and {other.bins} bins")
        assert other.hi is not None and other.amax is not None
        self._ensure(other.counts.shape[0], other.counts.device)
        theirs = Histogram(other.bins, other.axis)
        theirs.counts, theirs.hi = other.counts.clone(), other.hi.clone()
        target = torch.maximum(self.hi, theirs.hi)  # type: ignore[arg-type]
        theirs._rescale(target)
        self._rescale(target)
        assert self.counts is not None and self.amax is not None
        self.counts += theirs.counts
        self.amax = torch.maximum(self.amax, other.amax)
        self.nonfinite += other.nonfinite

    def all_reduce(self, what: str = "calibration") -> None:
        """Combine with every rank's histogram (``torch.distributed``; a no-op without a group).

        The ranks agree on the widest range (MAX of ``hi``, powers of two), pair-merge up to it, then
        SUM the counts: the same counts as one histogram of all ranks' data, as with ``merge``."""
        from . import distributed

        hi = distributed.all_reduce_optional(self.hi, "max", what)
        if hi is None:
            return
        self._ensure(hi.shape[0], hi.device)
        self._rescale(hi)
        assert self.counts is not None and self.amax is not None
        self.counts = distributed.all_reduce(self.counts, "sum", what)
        self.amax = distributed.all_reduce(self.amax, "max", what)
        self.nonfinite = int(distributed.all_reduce(torch.tensor([self.nonfinite], dtype=torch.int64), "sum", what))

    # -- queries -----------------------------------------------------------------------------------
    def _checked(self) -> tuple[Tensor, Tensor, Tensor]:
        if self.counts is None:
            raise SurgeonError("histogram is empty: no data was observed")
        assert self.hi is not None and self.amax is not None
        return self.counts, self.hi, self.amax

    def _out(self, v: Tensor) -> Tensor:
        return v.reshape(()) if self.axis is None else v

    def percentile(self, p: float) -> Tensor:
        """Smallest bin upper edge below which at least ``p`` % of |x| lie (capped at the max seen)."""
        if not 0.0 < p <= 100.0:
            raise SurgeonError(f"percentile must be in (0, 100], got {p}")
        counts, hi, amax = self._checked()
        cdf = counts.cumsum(dim=1).to(torch.float64)
        total = cdf[:, -1:].clamp(min=1)
        target = (p / 100.0) * total
        # a tiny relative slack keeps p=100 on the last non-empty bin despite float rounding
        idx = torch.searchsorted(cdf, target * (1 - 1e-12)).clamp(max=self.bins - 1)
        edge = (idx[:, 0] + 1).to(torch.float64) * hi / self.bins
        return self._out(torch.minimum(edge.to(torch.float32), amax))

    def mse_clip(self, dtype: str = "fp8", candidates: int = 160) -> Tensor:
        """Clip value minimizing the expected squared error of symmetric ``dtype`` quantization
        (``fp8`` e4m3 with scale clip/448, ``int8`` with scale clip/127) over the histogram.

        Candidates are ``amax · 2^(-i/16)``: a geometric grid, so that fp8's log-spaced levels are
        searched as finely near 0.01·amax as near amax; ``amax`` itself is the first, so the result
        is never worse than max calibration on the histogram. Per bin of width ``w`` and centre
        ``m``, with local quantization step ``δ(m)`` (int8: the scale; e4m3: ``2^(e-3)·scale``):

            m > clip   →  (m − clip)²          clipped
            δ(m) < w   →  δ(m)² / 12           many levels inside the bin: uniform rounding noise
            otherwise  →  (q(m) − m)²          the bin is narrower than a level: its centre decides

        (evaluating only centres, as pytorch-quantization does, overstates fp8's error on the many
        small values whose levels are finer than a bin, which biases the search toward large clips).
        """
        if dtype not in ("fp8", "int8"):
            raise SurgeonError(f"unknown quantization dtype '{dtype}' (known: fp8, int8)")
        counts, hi, amax = self._checked()
        qmax = FP8_MAX if dtype == "fp8" else INT8_MAX
        w = counts.to(torch.float64)
        width = (hi / self.bins).to(torch.float32)[:, None]
        centres = (torch.arange(self.bins, dtype=torch.float32, device=counts.device) + 0.5)[None, :] * width
        best_err = torch.full_like(hi, math.inf)
        best = amax.clone()
        for i in range(candidates):
            clip = amax * 2.0 ** (-i / 16)
            scale = torch.where(clip > 0, clip / qmax, torch.ones_like(clip))[:, None]
            v = centres / scale
            if dtype == "fp8":
                q = v.clamp(-qmax, qmax).to(torch.float8_e4m3fn).to(torch.float32)
                # e4m3: 3 mantissa bits; exponents below -6 are subnormal with the step of -6
                step = torch.exp2(torch.floor(torch.log2(v)).clamp(min=-6.0) - 3.0) * scale
            else:
                q = round_half_even(v).clamp(-qmax, qmax)
                step = scale.expand_as(v)
            e = torch.where(step < width, step * step / 12.0, (q * scale - centres) ** 2)
            e = torch.where(v > qmax, (centres - clip[:, None]) ** 2, e)
            err = (e.to(torch.float64) * w).sum(dim=1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, clip, best)
        return self._out(best)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.counts, self.hi, self.amax) if t is not None)


def _pow2_above(v: Tensor) -> Tensor:
    """Smallest power of two > v (v > 0), in float64."""
    p = torch.exp2(torch.floor(torch.log2(v)) + 1)
    return torch.where(p <= v, p * 2, p)


@runtime_checkable
class Calibratable(Protocol):
    """Anything calibrate() drives: a ``mode`` ("observe" | "quant") and a ``finalize()``."""

    mode: str

    def finalize(self) -> None: ...


def calibratables(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, submodule)`` of every calibratable in ``module`` (the root included)."""
    return [(name, m) for name, m in module.named_modules() if isinstance(m, Calibratable)]


def can_all_reduce(found: Iterable[tuple[str, nn.Module]]) -> bool:
    """Whether every calibratable can combine its statistics across processes (``all_reduce_stats``)."""
    return all(callable(getattr(m, "all_reduce_stats", None)) for _, m in found)


def all_reduce_statistics(found: Iterable[tuple[str, nn.Module]]) -> None:
    """Combine every calibratable's statistics over the process group, in the same order on every
    rank (``calibratables`` lists modules in definition order, identical for identical graphs).

    A calibratable opts in with ``all_reduce_stats()``: afterwards its ``finalize()`` must give what one
    process that saw every rank's batches would compute."""
    for name, m in found:
        fn = getattr(m, "all_reduce_stats", None)
        if not callable(fn):
            raise SurgeonError(f"calibratable '{name or '<root>'}' ({type(m).__name__}) cannot combine its "
                               "statistics across processes (it has no all_reduce_stats method)")
        fn()


@dataclass
class CalibrationStats:
    """What a calibration run saw."""

    batches: int
    samples: int
    seconds: float
    calibrated: int  # how many calibratables were finalized

    def to_json(self) -> dict:
        return {"batches": self.batches, "samples": self.samples, "seconds": round(self.seconds, 4),
                "calibrated": self.calibrated}


def calibrate(module: nn.Module, batches: Iterable[Inputs], *, desc: str = "calibrating",
              progress: bool = True, reset: bool = True, distributed: bool | None = None) -> CalibrationStats:
    """Stream ``batches`` through ``module`` once and calibrate every calibratable in it.

    All calibratables are set to ``observe`` (statistics forgotten first when ``reset``), each batch
    runs under ``torch.no_grad()``, then every calibratable is ``finalize()``d and set to ``quant``.
    ``batches`` may be any iterable (a generator is consumed once; nothing is kept). The module's
    train/eval mode is left as the caller set it.

    ``distributed`` (default: whether a ``torch.distributed`` group is active): ``batches`` are this
    rank's share, and the statistics and counts are combined over all ranks before ``finalize()``
    (``all_reduce_statistics``), so every rank ends with the scales of one process that saw all shares."""
    from . import distributed as dist

    combine = dist.active() if distributed is None else (distributed and dist.active())
    found = calibratables(module)
    for name, m in found:
        if getattr(m, "name", None) == "":
            m.name = name or "<root>"  # so a NaN/Inf error names the module
        if reset and callable(getattr(m, "reset", None)):
            m.reset()
        m.mode = "observe"
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    n_batches = n_samples = 0
    start = time.perf_counter()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    console = Console(stderr=True)  # stdout stays clean for piped output (JSON reports)
    # A transient bar shows nothing on a non-terminal, so skip its refresh thread there. rich keeps
    # one speed sample per advance for `speed_estimate_period` seconds (up to 1000, even when
    # disabled): a zero period keeps memory flat in the number of batches (no ETA is shown).
    with Progress(*columns, console=console, transient=True, speed_estimate_period=0.0,
                  disable=not (progress and console.is_terminal)) as bar:
        task = bar.add_task(desc, total=total)
        with torch.no_grad():
            for inputs in batches:
                call(module, inputs)
                n_batches += 1
                n_samples += batch_size(inputs)
                bar.advance(task)
    if combine:
        counts = dist.all_reduce(torch.tensor([n_batches, n_samples], dtype=torch.int64), "sum", desc)
        n_batches, n_samples = int(counts[0]), int(counts[1])
        if n_batches:
            all_reduce_statistics(found)
    if n_batches == 0:
        raise SurgeonError("no calibration batches: the calibration data is empty")
    for _, m in found:
        m.finalize()
        m.mode = "quant"
    return CalibrationStats(n_batches, n_samples, time.perf_counter() - start, len(found))
