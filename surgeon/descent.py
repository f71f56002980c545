"""The guard's descent: which substituted sites step down their ladders, and in which order.

``surgeon.verify`` measures (solo figures per site and rung, end-to-end figures of a configuration);
this module decides. While a configuration violates the tolerance, the move taken is the one with
the most error removed per unit of benefit given up: for each site on a rung and each lower rung of
its ladder (``keep`` last), gain = solo error at the current rung − solo error at the lower one (for
the first violated criterion; 0 for ``keep``), cost = benefit lost (``_Benefit``). With ``gallop``
(hundreds of sites: a decoder's every Linear) the order of moves is fixed from the solo figures and
the shortest prefix of it that holds the tolerance is searched (1, 2, 4, ... moves, then a bisection),
so the cost is O(log moves) measurements rather than one per move.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from .metrics import Figures
from .pass_manager import SiteRecord
from .profile import KEEP
from .tolerance import CRITERIA, Tolerance

__all__ = ["GuardResult", "SiteCheck", "ladder", "ladder_guard"]

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
    # many-site guards (surgeon.local_solo): the solo figures stand in for the relative output error where
    # the site acts, by rung; None where the solo figures were measured end to end
    solo_local: dict[str, float] | None = None


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


class Progress:
    """A rich progress bar when asked for, a no-op otherwise."""

    def __init__(self, enabled: bool, desc: str) -> None:
        self.enabled, self.desc = enabled, desc
        self.bar: Any = None
        self.task: Any = None

    def __enter__(self) -> "Progress":
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


def _oriented(name: str, value: float | None) -> float:
    """Higher is better; NaN/None is worst."""
    if value is None or math.isnan(value):
        return -math.inf
    return value if CRITERIA[name] else -value


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.6g}"


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
                 measure: Callable[[dict[str, str]], Figures], exact: Figures, tolerance: Tolerance, *,
                 gallop: bool = False) -> GuardResult:
    """The guard's descent over figures the caller measures (a model that is not an fx graph: a
    decoder's cache): ``solo(site, rung)`` the figures with only ``site`` on at ``rung``, ``measure(config)``
    those of a configuration (site → rung; the sites not in it exact), ``exact`` those of no error.
    Solo figures below a site's first rung are measured lazily, when the descent first ranks them.
    ``gallop``: the moves in the order the solo figures give, the shortest prefix that holds the
    tolerance searched (1, 2, 4, ... moves, then a bisection): hundreds of sites cost O(log n)
    measurements; the figures of configurations between the measured ones are not seen."""
    records = list(records)
    checks = {}
    for r in records:
        solo_rungs = _Measured(functools.partial(solo, r.site))
        checks[r.site] = SiteCheck(r, {}, solo_rungs[ladder(r)[0]], rung=ladder(r)[0], ladder=ladder(r),
                                   solo_rungs=solo_rungs)
    all_fig = measure({r.site: ladder(r)[0] for r in records})
    stepper = Stepper(records, checks, exact, all_fig, lambda config, bar: measure(config), lambda config: None,
                       gallop=gallop)
    return stepper.run(tolerance)


class Stepper:
    """The guard's descent, resumable: the solo figures measured once, then configurations stepped
    down until a tolerance holds. ``run`` starts from every site on its first rung, or from where
    the last ``run`` ended (``GuardResult.resume``: the written file missed a tolerance the torch
    module met, so the pipeline asks for a tighter one)."""

    def __init__(self, records: list[SiteRecord], checks: dict[str, SiteCheck], exact: Figures, all_fig: Figures,
                 measure: Callable[[dict[str, str], Progress], Figures],
                 configure: Callable[[dict[str, str]], None], *, gallop: bool = False) -> None:
        # measure: the figures of a configuration (site → rung); configure: leave the model in one;
        # gallop: a prefix search over the ranked moves (``ladder_guard``'s many-site descent, ``_search``)
        self.records, self.checks, self.exact, self.all_fig = records, checks, exact, all_fig
        self.gallop = gallop
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

    def _moves(self, criterion: str) -> list[tuple[float, float, str, str]]:
        """The best move of each site on (priority, gain, site, lower rung), best first: the most error
        removed (solo figures, ``criterion``) per benefit given up; moves with no gain are not listed."""
        config, benefit, loss = self.config, self.benefit, self.loss
        moves = []
        for site, rung in config.items():
            lad = self.checks[site].ladder
            here = loss(site, rung, criterion)
            best: tuple[float, float, str, str] | None = None
            for lower in lad[lad.index(rung) + 1:]:
                gain = here - loss(site, lower, criterion)
                if not gain > 0:
                    continue
                cost = benefit(site, rung) - benefit(site, lower)
                priority = gain / max(cost, 1e-9 * max(benefit(site, rung), 1e-12))
                if best is None or (priority, gain) > best[:2]:
                    best = (priority, gain, site, lower)
            if best is not None:
                moves.append(best)
        return sorted(moves, key=lambda m: m[:2], reverse=True)

    def _apply_move(self, best: tuple[float, float, str, str] | None, criterion: str, fig: Figures,
                    tolerance: Tolerance, sites_on: int) -> tuple[str, str]:
        """Take one move (``None``: the solo figures explain nothing, the worst site goes to keep) and
        write its reason on the site; returns (site, rung it went to)."""
        checks, config, benefit, loss = self.checks, self.config, self.benefit, self.loss
        if best is None:
            site = max(config, key=lambda s: loss(s, config[s], criterion))
            to, why = KEEP, "no single step removes error by the solo figures; the worst of those on"
        else:
            _, gain, site, to = best
            why = (f"the most error removed per benefit given up ({criterion} gain {gain:.3g} for "
                   f"{benefit(site, config[site]) - benefit(site, to):.3g} of the benefit)")
        now, bound = tolerance.judged(fig, criterion), tolerance.bounds()[criterion]
        cmp = "<" if CRITERIA[criterion] else ">"
        c = checks[site]
        solo_value = c.solo_rungs[config[site]].get(criterion) if c.solo_local is None else None
        judged = " (with the margin)" if tolerance.margin and now != fig.get(criterion) else ""
        text = (f"end-to-end {criterion}{judged} {_fmt(now)} {cmp} {bound:g} with {sites_on} site(s) on; "
                + (f"with only this site on {criterion} is {_fmt(solo_value)}" if c.solo_local is None else
                   f"its relative output error where it acts is {_fmt(c.solo_local.get(config[site]))} (the ranking figure)"))
        worst = max(config, key=lambda s: loss(s, config[s], criterion))
        if to == KEEP:
            c.status, c.rung = "rolled_back", KEEP
            c.reason = text + (", the worst of those kept" if best is None or worst == site
                               else f"; rolled back before worse sites: {why}")
            c.cause = {"criterion": criterion, "solo": solo_value, "end_to_end": now, "bound": bound,
                       "sites_on": sites_on}
            del config[site]
        else:
            c.steps.append(f"{config[site]} → {to}: {text}; {why}")
            c.rung = config[site] = to
        return site, to

    def _record(self, fig: Figures, done: list[tuple[str, str]]) -> None:
        """Note a measured configuration (the current one) and the moves that led to it."""
        config = self.config
        self.configs.append((dict(config), fig))
        for site, to in done:
            self.steps.append({"kept": list(config), "rungs": dict(config), "end_to_end": fig.to_json(),
                               "rolled_back": site if to == KEEP else None,
                               "stepped": None if to == KEEP else {"site": site, "to": to}})

    def _search(self, criterion: str, fig: Figures, tolerance: Tolerance, bar: Progress) -> Figures:
        """The galloping descent for ``criterion``: the order of moves is decided by the solo figures
        alone (the best move of the configuration each previous move leaves, until every site is kept
        exact), then the shortest prefix of that order whose configuration holds ``criterion`` is found
        with 1, 2, 4, ... moves and a bisection between the last prefix that broke it and the first that
        held: O(log n) measurements for n moves (more moves, less error: assumed, as the descent does).
        The moves of that prefix are taken; returns its figures."""
        start = dict(self.config)
        order: list[tuple[float, float, str, str]] = []
        try:
            while self.config:
                moves = self._moves(criterion)
                best = moves[0] if moves else None
                site = best[2] if best else max(self.config, key=lambda s: self.loss(s, self.config[s], criterion))
                to = best[3] if best else KEEP
                order.append(best if best else (0.0, 0.0, site, KEEP))
                if to == KEEP:
                    del self.config[site]
                else:
                    self.config[site] = to
        finally:
            self.config.clear()
            self.config.update(start)

        def config_at(k: int) -> dict[str, str]:
            cfg = dict(start)
            for _, _, site, to in order[:k]:
                if to == KEEP:
                    cfg.pop(site, None)
                else:
                    cfg[site] = to
            return cfg

        measured: dict[int, Figures] = {0: fig}

        def holds(k: int) -> bool:
            if k not in measured:
                measured[k] = self.measure(config_at(k), bar)
                self.configs.append((config_at(k), measured[k]))
            return criterion not in tolerance.violations(measured[k])

        lo, hi = 0, 1  # order[:lo] breaks the criterion; find the first hi that holds it
        while hi < len(order) and not holds(hi):
            lo, hi = hi, min(hi * 2, len(order))
        hi = min(hi, len(order))
        if not holds(hi):
            lo = hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if holds(mid) else (mid, hi)
        broke = measured[lo]  # the figures the taken moves were decided against
        on = len(start)
        # a placeholder (gain 0: no move removed error) is the worst site going to keep, as _apply_move(None) picks
        done = [self._apply_move(None if best[1] == 0.0 else best, criterion, broke, tolerance, on)
                for best in order[:hi] if best is not None]
        self._record(measured[hi], done)
        return measured[hi]

    def run(self, tolerance: Tolerance, *, progress: bool = False, batches: int = 0, samples: int = 0) -> GuardResult:
        checks, config, benefit = self.checks, self.config, self.benefit
        fig = self.fig
        with Progress(progress, "verifying") as bar, torch.no_grad():
            while config and (bad := tolerance.violations(fig)):
                criterion = bad[0]
                if self.gallop:
                    fig = self._search(criterion, fig, tolerance, bar)
                    continue
                moves = self._moves(criterion)
                on = len(config)
                site, to = self._apply_move(moves[0] if moves else None, criterion, fig, tolerance, on)
                fig = self.measure(dict(config), bar)
                self._record(fig, [(site, to)])
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
