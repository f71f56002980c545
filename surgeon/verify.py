"""Verification guard: measure every substituted site on held-out data, roll back what breaks the tolerance.

The calibration batches are split into a *fit* part (calibration, pass fitting) and a *check* part that
only this module sees. On the check part, streaming (``surgeon.metrics``: one batch at a time, only
running sums kept):

* per site, with only that site switched on: the site's output in the rewritten graph (the record's
  ``probe`` node) against the original graph's value at the same point (``reference`` node, read
  with ``surgeon.tap``): SQNR, cosine and max_rel_err over all elements; and the model output with
  only that site on ("solo");
* end to end, with every kept site on: per-sample cosine of the model output (mean and min over the
  check samples), max_rel_err and SQNR of that output, or a user metric averaged over the check batches.

Under a ``torch.distributed`` process group (``surgeon.distributed``), ``check`` is this rank's share of
the check batches; the figures are combined over the ranks before any rollback is decided, so every
rank takes the decisions of one process that measured all shares.

Tolerance (``surgeon.tolerance``; default: ``cosine_mean ≥ 0.999``): while the kept configuration
violates it, the kept site with the worst solo figure *for the first violated criterion* is rolled back
and the configuration is measured again. Rollbacks are exact (an inactive site computes what the
original computed), so an empty configuration always meets a cosine tolerance; a user metric may still
fail, in which case the best configuration measured is kept and ``GuardResult.met`` is False.
Which site steps down next, and how far, is decided in ``surgeon.descent``.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import fx

from .descent import GuardResult, Progress, SiteCheck, Stepper, ladder, ladder_guard
from .errors import SurgeonError
from .inputs import Inputs, call
from .local_solo import LOCAL_SOLO_SITES, local_solo_errors
from .metrics import EndToEnd, Figures, Metric, PairStats, combine_ranks, first_float, total_over_ranks
from .pass_manager import SiteRecord, set_site_active, set_site_rung
from .profile import KEEP
from .tap import run_tapped
from .tolerance import AGREEMENT_NEEDS_LOGITS, Tolerance

__all__ = ["GuardResult", "SiteCheck", "guard", "ladder", "ladder_guard", "measure_config", "measure_model"]


def _configure(gm: fx.GraphModule, records: Sequence[SiteRecord], active: "set[str] | dict[str, str]") -> None:
    """Sites in ``active`` on (a set: at their first rung; a dict: at the rung named), the others exact."""
    for r in records:
        rung = active.get(r.site, KEEP) if isinstance(active, dict) else (ladder(r)[0] if r.site in active else KEEP)
        if r.rungs:
            set_site_rung(gm, r, rung)
        else:
            set_site_active(gm, r, rung != KEEP)


def measure_config(gm0: fx.GraphModule, gm: fx.GraphModule, records: Sequence[SiteRecord],
                   active: "set[str] | dict[str, str]",
                   check: Sequence[Inputs], metric: Metric | None = None, progress: Progress | None = None,
                   *, distributed: bool | None = None) -> Figures:
    """End-to-end figures of ``gm`` with the sites in ``active`` on (others exact) against ``gm0``;
    ``active`` a set (first rungs) or a dict site → rung."""
    _configure(gm, records, active)
    acc = EndToEnd(metric)
    with torch.no_grad():
        for batch in check:
            acc.update(call(gm0, batch), call(gm, batch), batch)
            if progress:
                progress.advance()
    combine_ranks([acc], distributed)
    return acc.figures()


def measure_model(reference: Any, candidate: Any, check: Sequence[Inputs], metric: Metric | None = None, *,
                  distributed: bool | None = None) -> Figures:
    """End-to-end figures of any ``candidate`` callable against ``reference`` on ``check`` (this rank's
    share under a process group, combined over the ranks unless ``distributed=False``)."""
    acc = EndToEnd(metric)
    with torch.no_grad():
        for batch in check:
            acc.update(call(reference, batch), call(candidate, batch), batch)
    combine_ranks([acc], distributed)
    return acc.figures()


def guard(gm0: fx.GraphModule, gm: fx.GraphModule, records: Sequence[SiteRecord], check: Sequence[Inputs],
          tolerance: Tolerance, metric: Metric | None = None, *, progress: bool = False,
          distributed: bool | None = None) -> GuardResult:
    """Measure every site of ``gm`` against ``gm0`` on ``check``, step sites down their ladders until
    ``tolerance`` holds.

    Every site starts on its first rung. While the configuration violates the tolerance, the move
    taken is the one with the most error removed per unit of benefit given up: for each site on a
    rung and each lower rung of its ladder (``keep`` last), gain = solo error at the current rung −
    solo error at the lower one (for the first violated criterion; 0 for ``keep``), cost = benefit
    lost (``_Benefit``). A move that keeps the benefit (an INT8 layer going from a static to a
    dynamic activation scale) costs nothing and goes first. When no move has a positive gain, the
    site with the worst solo error goes to ``keep`` (interactions the solo figures cannot see).

    ``gm`` is left with the kept sites on their rungs and the others off. Under a process group
    ``check`` is this rank's share (possibly empty) and the figures are combined over the ranks."""
    records = list(records)
    n_check = total_over_ranks(len(check), distributed)
    if not n_check:
        raise SurgeonError("no check batches to verify on")
    if len(records) > LOCAL_SOLO_SITES and metric is None:
        local = local_solo_errors(gm, records, check, distributed_run=distributed)
        if local is not None:
            return _guard_local(gm0, gm, records, check, tolerance, local, n_check, progress=progress,
                                distributed=distributed)
    site_stats = {r.site: PairStats() for r in records}
    solo_acc = {(r.site, rung): EndToEnd(metric) for r in records for rung in ladder(r)[:-1]}
    all_acc = EndToEnd(metric)
    exact_acc = EndToEnd(metric)  # the original against itself: the figures of "no error"
    refs = [r.reference for r in records if r.probe and r.reference]
    samples = 0
    with Progress(progress, "verifying") as bar, torch.no_grad():
        bar.add(len(check) * (len(solo_acc) + 2))
        for batch in check:
            ref_out, ref_vals = run_tapped(gm0, batch, refs)
            exact_acc.update(ref_out, ref_out, batch)
            bar.advance()
            for r in records:
                for i, rung in enumerate(ladder(r)[:-1]):
                    _configure(gm, records, {r.site: rung})
                    tap = [r.probe] if (i == 0 and r.probe and r.reference) else []
                    out, vals = run_tapped(gm, batch, tap)
                    if r.probe in vals and r.reference in ref_vals:
                        a, b = first_float(ref_vals[r.reference]), first_float(vals[r.probe])
                        if a is not None and b is not None:
                            site_stats[r.site].update(a, b)
                    solo_acc[(r.site, rung)].update(ref_out, out, batch)
                    bar.advance()
            _configure(gm, records, {r.site for r in records})
            all_out = call(gm, batch)
            all_acc.update(ref_out, all_out, batch)
            first = first_float(ref_out)
            samples += int(first.shape[0]) if first is not None and first.dim() >= 2 else 1
            bar.advance()
        combine_ranks([*site_stats.values(), *solo_acc.values(), all_acc, exact_acc], distributed)
        samples = total_over_ranks(samples, distributed)

        checks = {r.site: SiteCheck(r, site_stats[r.site].site_metrics(), solo_acc[(r.site, ladder(r)[0])].figures(),
                                    rung=ladder(r)[0], ladder=ladder(r),
                                    solo_rungs={rung: solo_acc[(r.site, rung)].figures() for rung in ladder(r)[:-1]})
                  for r in records}
        exact = exact_acc.figures()
        all_fig = all_acc.figures()
    if tolerance.agreement is not None and exact.agreement is None:
        raise SurgeonError(AGREEMENT_NEEDS_LOGITS)

    def measure(config: dict[str, str], bar: Progress) -> Figures:
        bar.add(len(check), f"verifying ({len(config)} site(s) on)")
        return measure_config(gm0, gm, records, config, check, metric, bar, distributed=distributed)

    stepper = Stepper(records, checks, exact, all_fig, measure, lambda config: _configure(gm, records, config))
    return stepper.run(tolerance, progress=progress, batches=n_check, samples=samples)


def _local_figures(err: float, exact: Figures) -> Figures:
    """Figures standing in for a site's solo figures from its local error ``err``, for ranking only:
    each criterion's loss (``Stepper.loss``) is ``err``."""
    agreement = None if exact.agreement is None else exact.agreement * (1.0 - err)
    return Figures(1.0 - err, 1.0 - err, err, float("nan"), exact.samples, agreement=agreement,
                   agreement_count=exact.agreement_count)


def _guard_local(gm0: fx.GraphModule, gm: fx.GraphModule, records: list[SiteRecord], check: Sequence[Inputs],
                 tolerance: Tolerance, local: dict[tuple[str, str], float], n_check: int, *, progress: bool,
                 distributed: bool | None) -> GuardResult:
    """``guard`` over many sites: the solo figures are the sites' local errors (``surgeon.local_solo``),
    and the descent gallops (a prefix search over the ranked moves), so whole-model measurements are
    every site on, no site on, and O(log moves) configurations — not sites × rungs."""
    exact_acc, all_acc = EndToEnd(None), EndToEnd(None)
    samples = 0
    with Progress(progress, "verifying") as bar, torch.no_grad():
        bar.add(len(check))
        _configure(gm, records, {r.site for r in records})
        for batch in check:
            ref_out = call(gm0, batch)
            exact_acc.update(ref_out, ref_out, batch)
            all_acc.update(ref_out, call(gm, batch), batch)
            first = first_float(ref_out)
            samples += int(first.shape[0]) if first is not None and first.dim() >= 2 else 1
            bar.advance()
        combine_ranks([all_acc, exact_acc], distributed)
        samples = total_over_ranks(samples, distributed)
    exact, all_fig = exact_acc.figures(), all_acc.figures()
    if tolerance.agreement is not None and exact.agreement is None:
        raise SurgeonError(AGREEMENT_NEEDS_LOGITS)
    checks = {}
    for r in records:
        errs = {rung: local[(r.site, rung)] for rung in ladder(r)[:-1]}
        solo = {rung: _local_figures(e, exact) for rung, e in errs.items()}
        checks[r.site] = SiteCheck(r, {"local_rel_err": errs[ladder(r)[0]]}, solo[ladder(r)[0]], rung=ladder(r)[0],
                                   ladder=ladder(r), solo_rungs=solo, solo_local=errs)

    def measure(config: dict[str, str], bar: Progress) -> Figures:
        bar.add(len(check), f"verifying ({len(config)} site(s) on)")
        return measure_config(gm0, gm, records, config, check, None, bar, distributed=distributed)

    stepper = Stepper(records, checks, exact, all_fig, measure, lambda config: _configure(gm, records, config),
                      gallop=True)
    return stepper.run(tolerance, progress=progress, batches=n_check, samples=samples)
