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
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import fx

from .errors import SurgeonError
from .inputs import Inputs, call
from .metrics import EndToEnd, Figures, Metric, PairStats, combine_ranks, first_float, total_over_ranks
from .pass_manager import SiteRecord, set_site_active, set_site_rung
from .profile import KEEP
from .tap import run_tapped
from .tolerance import AGREEMENT_NEEDS_LOGITS, CRITERIA, Tolerance


@dataclass
class SiteCheck:
    """What the guard measured and decided for one substituted site."""

    record: SiteRecord
    metrics: dict[str, float | None]
    solo: Figures  # the model output with only this site on, at its first rung
    status: str = "applied"  # "applied" | "rolled_back"
    reason: str = ""
    cause: dict[str, Any] = field(default_factory=dict)  # the figure that caused a rollback
    rung: str = ""  # the rung it ended on ("keep" when rolled back)
    ladder: tuple[str, ...] = ()  # its rungs, best first, ending in "keep"
    solo_rungs: dict[str, Figures] = field(default_factory=dict)  # solo figures at each rung
    steps: list[str] = field(default_factory=list)  # why it left each rung it left


@dataclass
class GuardResult:
    """Outcome of ``guard``: per-site checks, the kept sites, the configurations measured."""

    sites: list[SiteCheck]
    kept: list[str]
    end_to_end: Figures  # the kept configuration, measured on the rewritten graph
    all_applied: Figures  # every site on
    met: bool
    tolerance: Tolerance
    steps: list[dict] = field(default_factory=list)  # configuration after each rollback and its figures
    batches: int = 0
    samples: int = 0
    rungs: dict[str, str] = field(default_factory=dict)  # kept site → the rung it is on
    # continue the descent from this result under a tighter tolerance (the solo figures are reused)
    resume: Callable[..., "GuardResult"] | None = field(default=None, repr=False, compare=False)


def ladder(record: SiteRecord) -> tuple[str, ...]:
    """A site's rungs, best first, ending in ``keep`` (a single-substitute site: ``("on", "keep")``)."""
    return (*(record.rungs or ("on",)), KEEP)


def _configure(gm: fx.GraphModule, records: Sequence[SiteRecord], active: "set[str] | dict[str, str]") -> None:
    """Sites in ``active`` on (a set: at their first rung; a dict: at the rung named), the others exact."""
    for r in records:
        rung = active.get(r.site, KEEP) if isinstance(active, dict) else (ladder(r)[0] if r.site in active else KEEP)
        if r.rungs:
            set_site_rung(gm, r, rung)
        else:
            set_site_active(gm, r, rung != KEEP)


class _Benefit:
    """What a site's rung buys, as one number: its share of all weight bytes saved plus its share of
    all multiply-adds moved to 8 bits (each share in [0, 1]), times the rung's relative speed on the
    target's runtime (``benefit[rung]["speed"]``, 1 if absent). Sites that declare no benefit count as
    the mean of those that do (and as 1 when none does: then the order is by error alone)."""

    def __init__(self, records: Sequence[SiteRecord]) -> None:
        self.records = {r.site: r for r in records}
        keys = ("weight_bytes", "macs")
        first = [r.benefit.get(ladder(r)[0], {}) for r in records]
        self.totals = {k: sum(float(b.get(k, 0.0)) for b in first) for k in keys}
        known = [self._raw(r, ladder(r)[0]) for r in records if r.benefit]
        self.default = (sum(known) / len(known)) if known else 1.0

    def _raw(self, r: SiteRecord, rung: str) -> float:
        # "speed": how fast the target's runtime runs this rung relative to its fastest (profile.speed)
        b = r.benefit.get(rung, {})
        return float(b.get("speed", 1.0)) * sum(float(b.get(k, 0.0)) / t for k, t in self.totals.items() if t > 0)

    def __call__(self, site: str, rung: str) -> float:
        if rung == KEEP:
            return 0.0
        r = self.records[site]
        return self._raw(r, rung) if r.benefit else self.default


class _Progress:
    """A rich progress bar when asked for, a no-op otherwise."""

    def __init__(self, enabled: bool, desc: str) -> None:
        self.enabled, self.desc = enabled, desc
        self.bar: Any = None
        self.task: Any = None

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TimeElapsedColumn(), transient=True)
            self.bar.__enter__()
            self.task = self.bar.add_task(self.desc, total=None)
        return self

    def add(self, total: int, desc: str | None = None) -> None:
        if self.bar is not None:
            task = self.bar.tasks[0]
            self.bar.update(self.task, total=(task.total or 0) + total, description=desc or self.desc)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)


def measure_config(gm0: fx.GraphModule, gm: fx.GraphModule, records: Sequence[SiteRecord],
                   active: "set[str] | dict[str, str]",
                   check: Sequence[Inputs], metric: Metric | None = None, progress: _Progress | None = None,
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


def _oriented(name: str, value: float | None) -> float:
    """Higher is better; NaN/None is worst."""
    if value is None or math.isnan(value):
        return -math.inf
    return value if CRITERIA[name] else -value


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.6g}"


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
    site_stats = {r.site: PairStats() for r in records}
    solo_acc = {(r.site, rung): EndToEnd(metric) for r in records for rung in ladder(r)[:-1]}
    all_acc = EndToEnd(metric)
    exact_acc = EndToEnd(metric)  # the original against itself: the figures of "no error"
    refs = [r.reference for r in records if r.probe and r.reference]
    samples = 0
    with _Progress(progress, "verifying") as bar, torch.no_grad():
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

    def measure(config: dict[str, str], bar: _Progress) -> Figures:
        bar.add(len(check), f"verifying ({len(config)} site(s) on)")
        return measure_config(gm0, gm, records, config, check, metric, bar, distributed=distributed)

    stepper = _Stepper(records, checks, exact, all_fig, measure, lambda config: _configure(gm, records, config))
    return stepper.run(tolerance, progress=progress, batches=n_check, samples=samples)


class _Measured(dict[str, Figures]):
    """A site's solo figures by rung, each measured when the descent first asks for it (a ladder whose
    first rung holds measures nothing below it)."""

    def __init__(self, measure: Callable[[str], Figures]) -> None:
        super().__init__()
        self.measure = measure

    def __missing__(self, rung: str) -> Figures:
        self[rung] = fig = self.measure(rung)
        return fig


def ladder_guard(records: Sequence[SiteRecord], solo: Callable[[str, str], Figures],
                 measure: Callable[[dict[str, str]], Figures], exact: Figures, tolerance: Tolerance) -> GuardResult:
    """The guard's descent over figures the caller measures (a model that is not an fx graph: a
    decoder's cache): ``solo(site, rung)`` the figures with only ``site`` on at ``rung``, ``measure(config)``
    those of a configuration (site → rung; the sites not in it exact), ``exact`` those of no error.
    Solo figures are measured lazily, so a ladder whose first rung holds costs one measurement."""
    records = list(records)
    checks = {}
    for r in records:
        solo_rungs = _Measured(functools.partial(solo, r.site))
        checks[r.site] = SiteCheck(r, {}, solo_rungs[ladder(r)[0]], rung=ladder(r)[0], ladder=ladder(r),
                                   solo_rungs=solo_rungs)
    all_fig = measure({r.site: ladder(r)[0] for r in records})
    stepper = _Stepper(records, checks, exact, all_fig, lambda config, bar: measure(config), lambda config: None)
    return stepper.run(tolerance)


class _Stepper:
    """The guard's descent, resumable: the solo figures measured once, then configurations stepped
    down until a tolerance holds. ``run`` starts from every site on its first rung, or from where
    the last ``run`` ended (``GuardResult.resume``: the written file missed a tolerance the torch
    module met, so the pipeline asks for a tighter one)."""

    def __init__(self, records: list[SiteRecord], checks: dict[str, SiteCheck], exact: Figures, all_fig: Figures,
                 measure: Callable[[dict[str, str], _Progress], Figures],
                 configure: Callable[[dict[str, str]], None]) -> None:
        # measure: the figures of a configuration (site → rung); configure: leave the model in one
        self.records, self.checks, self.exact, self.all_fig = records, checks, exact, all_fig
        self.measure, self.configure = measure, configure
        self.benefit = _Benefit(records)
        self.config: dict[str, str] = {r.site: ladder(r)[0] for r in records}
        self.fig = all_fig
        self.configs: list[tuple[dict[str, str], Figures]] = [(dict(self.config), all_fig)]
        self.steps: list[dict] = [{"kept": list(self.config), "rungs": dict(self.config), "end_to_end": all_fig.to_json(),
                                   "rolled_back": None}]

    def loss(self, site: str, rung: str, criterion: str) -> float:
        """Solo error of ``site`` on ``rung`` for ``criterion`` (0 for keep; NaN counts as worst)."""
        if rung == KEEP:
            return 0.0
        value = _oriented(criterion, self.checks[site].solo_rungs[rung].get(criterion))
        base = _oriented(criterion, self.exact.get(criterion) if criterion in ("metric", "agreement") else
                         (0.0 if criterion == "max_rel_err" else 1.0))
        return math.inf if value == -math.inf else max(base - value, 0.0)

    def run(self, tolerance: Tolerance, *, progress: bool = False, batches: int = 0, samples: int = 0) -> GuardResult:
        checks, config, benefit, loss = self.checks, self.config, self.benefit, self.loss
        fig = self.fig
        with _Progress(progress, "verifying") as bar, torch.no_grad():
            while config and (bad := tolerance.violations(fig)):
                criterion = bad[0]
                best: tuple[float, float, str, str] | None = None  # (priority, gain, site, to)
                for site, rung in config.items():
                    lad = checks[site].ladder
                    here = loss(site, rung, criterion)
                    for lower in lad[lad.index(rung) + 1:]:
                        gain = here - loss(site, lower, criterion)
                        if not gain > 0:
                            continue
                        cost = benefit(site, rung) - benefit(site, lower)
                        priority = gain / max(cost, 1e-9 * max(benefit(site, rung), 1e-12))
                        if best is None or (priority, gain) > best[:2]:
                            best = (priority, gain, site, lower)
                if best is None:  # the solo figures do not explain it: the worst site goes
                    site = max(config, key=lambda s: loss(s, config[s], criterion))
                    to, why = KEEP, "no single step removes error by the solo figures; the worst of those on"
                else:
                    _, gain, site, to = best
                    why = (f"the most error removed per benefit given up ({criterion} gain {gain:.3g} for "
                           f"{benefit(site, config[site]) - benefit(site, to):.3g} of the benefit)")
                now, bound = tolerance.judged(fig, criterion), tolerance.bounds()[criterion]
                cmp = "<" if CRITERIA[criterion] else ">"
                c = checks[site]
                solo_value = c.solo_rungs[config[site]].get(criterion)
                judged = " (with the margin)" if tolerance.margin and now != fig.get(criterion) else ""
                text = (f"end-to-end {criterion}{judged} {_fmt(now)} {cmp} {bound:g} with {len(config)} site(s) on; "
                        f"with only this site on {criterion} is {_fmt(solo_value)}")
                worst = max(config, key=lambda s: loss(s, config[s], criterion))
                if to == KEEP:
                    c.status, c.rung = "rolled_back", KEEP
                    c.reason = text + (", the worst of those kept" if best is None or worst == site
                                       else f"; rolled back before worse sites: {why}")
                    c.cause = {"criterion": criterion, "solo": solo_value, "end_to_end": now, "bound": bound,
                               "sites_on": len(config)}
                    del config[site]
                else:
                    c.steps.append(f"{config[site]} → {to}: {text}; {why}")
                    c.rung = config[site] = to
                fig = self.measure(dict(config), bar)
                self.configs.append((dict(config), fig))
                self.steps.append({"kept": list(config), "rungs": dict(config), "end_to_end": fig.to_json(),
                                   "rolled_back": site if to == KEEP else None,
                                   "stepped": None if to == KEEP else {"site": site, "to": to}})
        self.fig = fig
        met = not tolerance.violations(fig)
        chosen = dict(config)
        if not met:
            # Nothing met the tolerance: keep the best configuration measured (fewest violated criteria,
            # then the best first criterion, then the most benefit) and say so.
            criterion0 = next(iter(tolerance.bounds()))

            def score(cfg: tuple[dict[str, str], Figures]) -> tuple:
                on, f = cfg
                return (-len(tolerance.violations(f)), _oriented(criterion0, tolerance.judged(f, criterion0)),
                        len(on), sum(benefit(s, r) for s, r in on.items()))

            chosen, fig = max(self.configs, key=score)
            chosen = dict(chosen)
            for s, c in checks.items():
                if s in chosen:
                    c.rung = chosen[s]
                    if c.status == "rolled_back":
                        c.status, c.reason, c.cause = "applied", "", {}
        for s, c in checks.items():
            if s in chosen and c.steps and not c.reason:
                c.reason = "; ".join(c.steps)
        self.configure(dict(chosen))
        kept = [r.site for r in self.records if r.site in chosen]
        by_site = {r.site: r for r in self.records}
        result = GuardResult(sites=list(checks.values()), kept=kept, end_to_end=fig, all_applied=self.all_fig,
                             met=met, tolerance=tolerance, steps=self.steps, batches=batches, samples=samples,
                             rungs={s: chosen[s] for s in kept if by_site[s].rungs})
        result.resume = lambda tighter, progress=False: self.run(tighter, progress=progress, batches=batches,
                                                                  samples=samples)
        return result
