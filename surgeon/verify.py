"""Verification guard: measure every substituted site on held-out data, roll back what breaks the tolerance.

The calibration batches are split into a *fit* part (calibration, pass fitting) and a *check* part that
only this module sees. On the check part, streaming (one batch at a time, only running sums kept):

* per site, with only that site switched on: the site's output in the rewritten graph (the record's
  ``probe`` node) against the original graph's value at the same point (``reference`` node):
  SQNR = 10·log10(Σ ref² / Σ (ref − out)²) dB, cosine = ⟨ref, out⟩ / (‖ref‖·‖out‖) over all elements,
  max_rel_err = max |ref − out| / max |ref|; and the model output with only that site on ("solo");
* end to end, with every kept site on: per-sample cosine of the flattened first floating output
  (mean and min over the check samples), max_rel_err and SQNR of that output, or a user
  ``metric(ref_outputs, outputs) -> float`` (higher is better) averaged over the check batches.

Under a ``torch.distributed`` process group (``surgeon.distributed``), ``check`` is this rank's share of
the check batches: the running sums and counts are SUM-reduced, the maxima MAX- and the minimum
cosine MIN-reduced over the ranks before any figure is computed, so every rank derives the figures
(and the rollback decisions) of one process that measured all shares; they differ from it only by
the order of float64 additions.

Tolerance (``Tolerance``; default: ``cosine_mean ≥ 0.999``): while the kept configuration violates it,
the kept site with the worst solo figure *for the first violated criterion* is rolled back and the
configuration is measured again. Rollbacks are exact (an inactive site computes what the original
computed), so an empty configuration always meets a cosine tolerance; a user metric may still fail,
in which case the best configuration measured is kept and ``GuardResult.met`` is False.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import fx
from torch.utils import _pytree as pytree

from .errors import SurgeonError
from .inputs import Inputs, as_args_kwargs, call, tensors_of
from .pass_manager import SiteRecord, set_site_active, set_site_rung

Metric = Callable[[Any, Any], float]

#: Tolerance criteria: name → True when higher is better.
CRITERIA: dict[str, bool] = {"cosine_mean": True, "cosine_min": True, "max_rel_err": False, "metric": True,
                             "agreement": True}
DEFAULT_COSINE_MEAN = 0.999

#: The margin rule (docs/report.md, "the margin"): a check set is a sample of the data the file will
#: see, so a criterion must hold for what the check set *estimates*, not only for what it measured.
#: Means (cosine_mean, agreement) are taken at their one-sided 95 % lower confidence bound
#: (mean − 1.645·s/√n; for a proportion p, p − 1.645·√(p(1−p)/n)). Extremes (cosine_min,
#: max_rel_err) have no distribution-free bound for unseen samples: the worst error measured must
#: leave MARGIN_EXTREME headroom (error × 1.25 within the bound). A user metric is taken as measured.
MARGIN_Z = 1.645
AGREEMENT_NEEDS_LOGITS = ("tolerance names 'agreement' but the model has no *logits output to take the argmax of "
                          "(task heads name theirs logits, start_logits, ...)")
MARGIN_EXTREME = 1.25


# --------------------------------------------------------------------------------------------------
# tolerance
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tolerance:
    """Bounds the end-to-end figures must meet; ``None`` = not constrained.

    ``cosine_mean`` / ``cosine_min`` / ``metric`` are lower bounds, ``max_rel_err`` an upper bound.
    """

    cosine_mean: float | None = DEFAULT_COSINE_MEAN
    cosine_min: float | None = None
    max_rel_err: float | None = None
    metric: float | None = None
    agreement: float | None = None  # argmax agreement of the *logits outputs (task heads)
    margin: bool = True  # judge the margined figures (``guarded``), not the measured ones

    def bounds(self) -> dict[str, float]:
        """The constrained criteria in checking order (user metric first, then the task metric, then cosines)."""
        order = ("metric", "agreement", "cosine_min", "cosine_mean", "max_rel_err")
        return {k: getattr(self, k) for k in order if getattr(self, k) is not None}

    def judged(self, figures: "Figures", name: str) -> float | None:
        """The value of ``name`` the tolerance is checked on: ``guarded`` (the margin rule) or as measured."""
        return guarded(figures, name) if self.margin else figures.get(name)

    def violations(self, figures: "Figures") -> list[str]:
        """Names of the violated criteria, in checking order (empty: the tolerance holds)."""
        bad = []
        for name, bound in self.bounds().items():
            value = self.judged(figures, name)
            if value is None or math.isnan(value):
                bad.append(name)
            elif (value < bound) if CRITERIA[name] else (value > bound):
                bad.append(name)
        return bad

    def describe(self) -> str:
        return ", ".join(f"{k} {'≥' if CRITERIA[k] else '≤'} {v:g}" for k, v in self.bounds().items()) or "none"

    def to_json(self) -> dict:
        return {**{k: getattr(self, k) for k in CRITERIA}, "margin": self.margin}


def guarded(figures: "Figures", name: str) -> float | None:
    """``figures``' value of ``name`` under the margin rule (``MARGIN_Z``, ``MARGIN_EXTREME``): what the
    check set supports for data it did not see. NaN and None pass through."""
    value = figures.get(name)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return value
    if name == "cosine_mean":
        n, sd = figures.samples, figures.cosine_std
        return value - MARGIN_Z * sd / math.sqrt(n) if sd is not None and n > 1 else value
    if name == "agreement":
        n = figures.agreement_count or 0
        return value - MARGIN_Z * math.sqrt(max(value * (1.0 - value), 0.0) / n) if n > 0 else value
    if name == "cosine_min":
        return 1.0 - (1.0 - value) * MARGIN_EXTREME
    if name == "max_rel_err":
        return value * MARGIN_EXTREME
    return value


_TOL_ITEM = re.compile(r"^\s*([A-Za-z_-]+)\s*=\s*(\S+)\s*$")
_KEYS = (*CRITERIA, "margin")


def _bound(name: str, raw: Any) -> float:
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise SurgeonError(f"tolerance {name}={raw} is not a number") from None
    if math.isnan(value):
        raise SurgeonError(f"tolerance {name}={raw} is not a number")
    if name.startswith("cosine") and not -1.0 <= value <= 1.0:
        raise SurgeonError(f"tolerance {name}={raw} is not a cosine in [-1, 1]")
    if name == "max_rel_err" and value < 0:
        raise SurgeonError(f"tolerance max_rel_err={raw} must be ≥ 0")
    if name == "agreement" and not 0.0 <= value <= 1.0:
        raise SurgeonError(f"tolerance agreement={raw} is not a fraction in [0, 1]")
    return value


def parse_tolerance(spec: "Tolerance | float | str | dict | None", *, has_metric: bool = False) -> Tolerance:
    """Build a ``Tolerance`` from a user value.

    ``None`` → ``cosine_mean ≥ 0.999`` (with a user metric a bound must be given); a number → the
    minimum ``cosine_mean`` (or, with a user metric, the minimum metric); ``"cosine_min=0.995,
    cosine_mean=0.999"`` or a dict → exactly the criteria named (keys: cosine_mean, cosine_min,
    max_rel_err, metric)."""
    if isinstance(spec, Tolerance):
        if spec.metric is not None and not has_metric:
            raise SurgeonError("tolerance names 'metric' but no metric callable was given")
        return spec
    if spec is None:
        if has_metric:
            raise SurgeonError("a user metric needs a tolerance: the minimum metric value to accept "
                               "(e.g. tolerance=0.99)")
        return Tolerance()
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        key = "metric" if has_metric else "cosine_mean"
        bounds: dict[str, Any] = {"cosine_mean": None, key: _bound(key, spec)}
        return Tolerance(**bounds)
    if isinstance(spec, str):
        text = spec.strip()
        if "=" not in text:
            try:
                number = float(text)
            except ValueError:
                raise SurgeonError(f"cannot parse tolerance '{spec}': give a number (minimum mean cosine) "
                                   f"or key=value pairs ({', '.join(_KEYS)})") from None
            return parse_tolerance(number, has_metric=has_metric)
        items: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            m = _TOL_ITEM.match(part)
            if not m:
                raise SurgeonError(f"cannot parse tolerance '{spec}': '{part}' is not key=value")
            items[m.group(1)] = m.group(2)
        spec = items
    if isinstance(spec, dict):
        if not spec:
            raise SurgeonError("empty tolerance: name at least one criterion (e.g. cosine_mean=0.999)")
        values: dict[str, Any] = {k: None for k in CRITERIA}
        margin = True
        for key, raw in spec.items():
            if key == "margin":
                if str(raw).strip().lower() not in ("0", "1", "true", "false", "on", "off"):
                    raise SurgeonError(f"tolerance margin={raw} must be 1 (the margin rule, default) or 0 (as measured)")
                margin = str(raw).strip().lower() in ("1", "true", "on")
                continue
            if key not in CRITERIA:
                hint = f"; did you mean {key.replace('-', '_')}?" if key.replace("-", "_") in _KEYS else ""
                raise SurgeonError(f"unknown tolerance key '{key}' (known: {', '.join(_KEYS)}{hint})")
            values[key] = _bound(key, raw)
        if values["metric"] is not None and not has_metric:
            raise SurgeonError("tolerance names 'metric' but no metric callable was given")
        if not any(v is not None for v in values.values()):
            raise SurgeonError("empty tolerance: name at least one criterion (e.g. cosine_mean=0.999)")
        return Tolerance(**values, margin=margin)
    raise SurgeonError(f"cannot use {type(spec).__name__} as a tolerance")


# --------------------------------------------------------------------------------------------------
# streaming statistics
# --------------------------------------------------------------------------------------------------
def _first_float(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value if value.is_floating_point() else value.float()
    found = tensors_of(value)
    return found[0] if found else None


def position_mask(inputs: Any, like: torch.Tensor) -> torch.Tensor | None:
    """Which positions of the output ``like`` are real tokens: the inputs' ``attention_mask`` (a
    keyword input of shape [batch, seq]) as a float tensor that broadcasts over ``like`` (1 = real,
    0 = padding), or None when the inputs have no such mask or ``like`` is not [batch, seq, …].

    Padded positions carry whatever the model computes there; a user reads only the real ones, so
    the figures (cosines, errors) leave them out (docs/report.md: "what is measured")."""
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or like.dim() < 2 or tuple(like.shape[:2]) != tuple(mask.shape):
        return None
    return (mask != 0).to(torch.float64).reshape(*mask.shape, *([1] * (like.dim() - 2)))


def sqnr_db(signal: float, noise: float) -> float:
    """10·log10(signal / noise); +inf when there is no noise at all."""
    if noise == 0.0:
        return math.inf if signal > 0 or signal == 0 else math.nan
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _cos(dot: float, a2: float, b2: float) -> float:
    if a2 == 0.0 and b2 == 0.0:
        return 1.0  # two zero tensors agree
    if a2 == 0.0 or b2 == 0.0:
        return 0.0
    return dot / math.sqrt(a2 * b2)


class PairStats:
    """Running comparison of a reference tensor stream with a candidate stream (O(1) memory).

    ``update`` takes one batch; per-sample cosines use the first dimension as the sample axis for
    tensors of two or more dimensions (a lower-dimensional output counts as one sample).
    """

    def __init__(self) -> None:
        self.ref2 = self.out2 = self.dot = self.err2 = 0.0
        self.max_err = self.max_ref = 0.0
        self.cos_sum = self.dev_sum = self.dev_sq = 0.0  # dev = 1 − cosine: a spread without cancellation
        self.cos_min = math.inf
        self.cosines: list[float] = []  # this process's per-sample cosines (the spread in the report)
        self.samples = 0
        self.nonfinite = False
        self.mismatch: str | None = None

    def update(self, ref: torch.Tensor, out: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """``valid`` (``position_mask``): positions outside it count in no figure."""
        if tuple(ref.shape) != tuple(out.shape):
            self.mismatch = f"shape {tuple(out.shape)} differs from the reference's {tuple(ref.shape)}"
            return
        r = ref.detach().to(torch.float64)
        o = out.detach().to(torch.float64)
        if valid is not None:
            keep = valid.bool()
            r, o = torch.where(keep, r, 0.0), torch.where(keep, o, 0.0)  # a NaN at a padded position does not count
        if not bool(torch.isfinite(o).all()):
            self.nonfinite = True
        d = r - o
        self.ref2 += float((r * r).sum())
        self.out2 += float((o * o).sum())
        self.dot += float((r * o).sum())
        self.err2 += float((d * d).sum())
        if d.numel():
            self.max_err = max(self.max_err, float(d.abs().max()))
            self.max_ref = max(self.max_ref, float(r.abs().max()))
        rows_r = r.reshape(r.shape[0], -1) if r.dim() >= 2 else r.reshape(1, -1)
        rows_o = o.reshape(rows_r.shape)
        dots = (rows_r * rows_o).sum(1)
        na, nb = (rows_r * rows_r).sum(1), (rows_o * rows_o).sum(1)
        for dt, a2, b2 in zip(dots.tolist(), na.tolist(), nb.tolist()):
            c = _cos(dt, a2, b2)
            self.cos_sum += c
            self.dev_sum += 1.0 - c
            self.dev_sq += (1.0 - c) * (1.0 - c)
            self.cos_min = min(self.cos_min, c) if not math.isnan(c) else math.nan
            self.cosines.append(c)
            self.samples += 1

    def _pack(self) -> tuple[list[float], list[float], list[float]]:
        """(SUM, MAX, MIN) terms for a cross-rank reduction; NaN encoded as flags (MAX/MIN need not
        propagate it)."""
        cos_nan = isinstance(self.cos_min, float) and math.isnan(self.cos_min)
        sums = [self.ref2, self.out2, self.dot, self.err2, self.cos_sum, float(self.samples), float(self.nonfinite),
                float(self.mismatch is not None), float(cos_nan), self.dev_sum, self.dev_sq]
        maxes = [math.inf if math.isnan(v) else v for v in (self.max_err, self.max_ref)]
        return sums, maxes, [-math.inf if cos_nan else self.cos_min]

    def _unpack(self, sums: list[float], maxes: list[float], mins: list[float]) -> None:
        self.ref2, self.out2, self.dot, self.err2, self.cos_sum = sums[:5]
        self.samples, self.nonfinite = int(sums[5]), bool(sums[6])
        if sums[7] and self.mismatch is None:
            self.mismatch = "the output shape differs from the reference's on another rank"
        self.max_err, self.max_ref = maxes
        self.cos_min = math.nan if sums[8] else mins[0]
        self.dev_sum, self.dev_sq = sums[9], sums[10]

    def _rel(self) -> float:
        if self.max_ref == 0.0:
            return 0.0 if self.max_err == 0.0 else math.inf
        return self.max_err / self.max_ref

    def _bad(self) -> bool:
        return self.nonfinite or self.samples == 0

    def site_metrics(self) -> dict[str, float | None]:
        """``sqnr_db``, ``cosine`` (all elements), ``max_rel_err`` (NaN where outputs were non-finite)."""
        if self.mismatch is not None:
            return {"sqnr_db": None, "cosine": None, "max_rel_err": None}
        if self._bad():
            return {"sqnr_db": math.nan, "cosine": math.nan, "max_rel_err": math.nan}
        return {"sqnr_db": sqnr_db(self.ref2, self.err2), "cosine": _cos(self.dot, self.ref2, self.out2),
                "max_rel_err": self._rel()}

    def figures(self) -> "Figures":
        if self._bad() or self.mismatch is not None:
            return Figures(math.nan, math.nan, math.nan, math.nan, self.samples)
        mean = self.cos_sum / self.samples
        # sample standard deviation of the per-sample cosines, from reducible sums of 1 − cosine (cosines
        # sit near 1: Σc² − n·mean² would cancel to noise, the deviations from 1 do not)
        dev = self.dev_sum / self.samples
        var = (self.dev_sq - self.samples * dev * dev) / (self.samples - 1) if self.samples > 1 else 0.0
        return Figures(mean, self.cos_min, self._rel(), sqnr_db(self.ref2, self.err2), self.samples,
                       cosine_std=math.sqrt(max(var, 0.0)), cosines=list(self.cosines))


@dataclass
class Figures:
    """End-to-end figures of one configuration on the check set."""

    cosine_mean: float
    cosine_min: float
    max_rel_err: float
    sqnr_db: float
    samples: int
    metric: float | None = None
    cosine_std: float | None = None  # spread of the per-sample cosines (sample standard deviation)
    agreement: float | None = None  # argmax agreement of the *logits outputs (None: the model has none)
    agreement_count: int | None = None  # predictions compared (samples, or real token positions)
    cosines: list[float] | None = field(default=None, repr=False)  # per-sample cosines (this process)

    def get(self, name: str) -> float | None:
        return getattr(self, name)

    def spread(self) -> dict[str, Any]:
        """The per-sample cosine distribution: quantiles and a bootstrap 95 % interval of the mean
        (1000 resamples, seeded), from the samples this process measured."""
        cos = [c for c in (self.cosines or []) if not math.isnan(c)]
        if not cos:
            return {}
        t = torch.tensor(cos, dtype=torch.float64)
        qs = torch.quantile(t, torch.tensor([0.01, 0.05, 0.5], dtype=torch.float64)).tolist()
        gen = torch.Generator().manual_seed(0)
        means = t[torch.randint(len(cos), (1000, len(cos)), generator=gen)].mean(1)
        lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        return {"samples": len(cos), "cosine_std": self.cosine_std, "cosine_p01": qs[0], "cosine_p05": qs[1],
                "cosine_median": qs[2], "cosine_mean_ci95": [lo, hi]}

    def to_json(self) -> dict:
        out: dict[str, Any] = {"cosine_mean": self.cosine_mean, "cosine_min": self.cosine_min,
                               "max_rel_err": self.max_rel_err, "sqnr_db": self.sqnr_db, "samples": self.samples}
        if self.cosine_std is not None:
            out["cosine_std"] = self.cosine_std
        if self.metric is not None:
            out["metric"] = self.metric
        if self.agreement is not None:
            out["agreement"] = self.agreement
            out["agreement_count"] = self.agreement_count
        return out


def logits_outputs(output: Any) -> dict[str, torch.Tensor]:
    """The task head's outputs: floating tensors whose output name ends in ``logits`` (``logits``,
    ``start_logits`` / ``end_logits``), by name; empty for an output without names (a tensor, a tuple)."""
    if not isinstance(output, Mapping):
        return {}
    return {k: v for k, v in output.items()
            if isinstance(k, str) and k.endswith("logits") and isinstance(v, torch.Tensor) and v.is_floating_point()}


def _rows(tensors: Sequence[torch.Tensor], inputs: Any) -> torch.Tensor:
    """Several outputs of one batch as [batch, features] (padded positions zeroed), side by side."""
    rows = []
    for t in tensors:
        t = t.detach().to(torch.float64)
        valid = position_mask(inputs, t)
        if valid is not None:
            t = torch.where(valid.bool(), t, 0.0)
        rows.append(t.reshape(t.shape[0], -1) if t.dim() >= 1 else t.reshape(1, 1))
    return torch.cat(rows, 1)


class _EndToEnd:
    """What the end-to-end figures compare: the task head's ``*logits`` outputs where the model names
    them (all of them, side by side per sample; plus their argmax agreement), else the first floating
    output; padded positions left out (``position_mask``); plus the user metric's batch average."""

    def __init__(self, metric: Metric | None) -> None:
        self.stats = PairStats()
        self.metric = metric
        self.metric_sum = 0.0
        self.batches = 0
        self.agree = 0.0
        self.agree_n = 0

    def update(self, ref_out: Any, out: Any, inputs: Any = None) -> None:
        ref_heads, heads = logits_outputs(ref_out), logits_outputs(out)
        if ref_heads and set(ref_heads) <= set(heads):
            r_list, o_list = list(ref_heads.values()), [heads[k] for k in ref_heads]
            if len(r_list) == 1:
                self.stats.update(r_list[0], o_list[0], position_mask(inputs, r_list[0]))
            elif all(a.shape == b.shape for a, b in zip(r_list, o_list)):
                self.stats.update(_rows(r_list, inputs), _rows(o_list, inputs))
            else:
                self.stats.mismatch = "the logits outputs' shapes differ from the reference's"
            for a, b in zip(r_list, o_list):
                if a.shape != b.shape or a.dim() == 0:
                    continue
                same = (a.argmax(-1) == b.argmax(-1)).to(torch.float64)
                valid = position_mask(inputs, same) if same.dim() >= 2 else None
                w = valid if valid is not None else torch.ones_like(same)
                self.agree += float((same * w).sum())
                self.agree_n += int(w.sum())
        else:
            r, o = _first_float(ref_out), _first_float(out)
            if r is None or o is None:
                raise SurgeonError("the model output holds no floating tensor to compare; pass a metric callable")
            self.stats.update(r, o, position_mask(inputs, r))
        if self.metric is not None:
            self.metric_sum += float(self.metric(ref_out, out))
        self.batches += 1

    def _pack(self) -> tuple[list[float], list[float], list[float]]:
        sums, maxes, mins = self.stats._pack()
        return sums + [self.agree, float(self.agree_n), self.metric_sum, float(self.batches)], maxes, mins

    def _unpack(self, sums: list[float], maxes: list[float], mins: list[float]) -> None:
        self.stats._unpack(sums[:-4], maxes, mins)
        self.agree, self.agree_n = sums[-4], int(sums[-3])
        self.metric_sum, self.batches = sums[-2], int(sums[-1])

    def figures(self) -> Figures:
        fig = self.stats.figures()
        if self.metric is not None:
            fig.metric = self.metric_sum / max(self.batches, 1)
        if self.agree_n:
            fig.agreement, fig.agreement_count = self.agree / self.agree_n, self.agree_n
        return fig


def _combine(accs: Sequence[Any], distributed: bool | None, what: str = "verification") -> None:
    """Reduce ``PairStats`` / ``_EndToEnd`` accumulators over the process group: three collectives
    (SUM, MAX, MIN) for all of them together. A no-op without a group or with ``distributed=False``."""
    from . import distributed as dist

    if not accs or not (dist.active() if distributed is None else (distributed and dist.active())):
        return
    packed = [a._pack() for a in accs]
    flat = [torch.tensor([v for p in packed for v in p[i]], dtype=torch.float64) for i in range(3)]
    red = [dist.all_reduce(t, op, what).tolist() for t, op in zip(flat, ("sum", "max", "min"))]
    pos = [0, 0, 0]
    for a, p in zip(accs, packed):
        parts = []
        for i in range(3):
            parts.append(red[i][pos[i]:pos[i] + len(p[i])])
            pos[i] += len(p[i])
        a._unpack(*parts)


def _total(n: int, distributed: bool | None, what: str = "verification") -> int:
    from . import distributed as dist

    if not (dist.active() if distributed is None else (distributed and dist.active())):
        return n
    return int(dist.all_reduce(torch.tensor([n], dtype=torch.int64), "sum", what)[0])


# --------------------------------------------------------------------------------------------------
# running graphs with taps
# --------------------------------------------------------------------------------------------------
def flat_inputs(gm: fx.GraphModule, inputs: Inputs) -> list[Any]:
    """``inputs`` as the flat placeholder values of ``gm`` (what ``fx.Interpreter.run`` takes)."""
    args, kwargs = as_args_kwargs(inputs)
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is not None and info.in_spec is not None:
        spec = info.in_spec
        # Order keyword inputs like the captured signature: pytree flattens dicts in insertion order.
        if kwargs and spec.num_children == 2:
            kw_spec = spec.children_specs[1]
            if kw_spec.type is dict and set(kw_spec.context) == set(kwargs):
                kwargs = {k: kwargs[k] for k in kw_spec.context}
        return pytree.tree_leaves((tuple(args), kwargs))
    import inspect

    bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return list(bound.arguments.values())


class _Tap(fx.Interpreter):
    """Runs a GraphModule node by node, keeping the values of the named nodes."""

    def __init__(self, gm: fx.GraphModule, names: Iterable[str]) -> None:
        super().__init__(gm)
        self.names = set(names)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = value
        return value


def run_tapped(gm: fx.GraphModule, inputs: Inputs, names: Iterable[str]) -> tuple[Any, dict[str, Any]]:
    """``(output, {node name: value})`` of one run of ``gm`` on ``inputs``."""
    names = [n for n in names if n]
    if not names:
        return call(gm, inputs), {}
    tap = _Tap(gm, names)
    out = tap.run(*flat_inputs(gm, inputs))
    return out, tap.values


# --------------------------------------------------------------------------------------------------
# the guard
# --------------------------------------------------------------------------------------------------
KEEP = "keep"  # the last rung of every ladder: the site computes exactly what the original computed


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
    acc = _EndToEnd(metric)
    with torch.no_grad():
        for batch in check:
            acc.update(call(gm0, batch), call(gm, batch), batch)
            if progress:
                progress.advance()
    _combine([acc], distributed)
    return acc.figures()


def measure_model(reference: Any, candidate: Any, check: Sequence[Inputs], metric: Metric | None = None, *,
                  distributed: bool | None = None) -> Figures:
    """End-to-end figures of any ``candidate`` callable against ``reference`` on ``check`` (this rank's
    share under a process group, combined over the ranks unless ``distributed=False``)."""
    acc = _EndToEnd(metric)
    with torch.no_grad():
        for batch in check:
            acc.update(call(reference, batch), call(candidate, batch), batch)
    _combine([acc], distributed)
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
    n_check = _total(len(check), distributed)
    if not n_check:
        raise SurgeonError("no check batches to verify on")
    site_stats = {r.site: PairStats() for r in records}
    solo_acc = {(r.site, rung): _EndToEnd(metric) for r in records for rung in ladder(r)[:-1]}
    all_acc = _EndToEnd(metric)
    exact_acc = _EndToEnd(metric)  # the original against itself: the figures of "no error"
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
                        a, b = _first_float(ref_vals[r.reference]), _first_float(vals[r.probe])
                        if a is not None and b is not None:
                            site_stats[r.site].update(a, b)
                    solo_acc[(r.site, rung)].update(ref_out, out, batch)
                    bar.advance()
            _configure(gm, records, {r.site for r in records})
            all_out = call(gm, batch)
            all_acc.update(ref_out, all_out, batch)
            first = _first_float(ref_out)
            samples += int(first.shape[0]) if first is not None and first.dim() >= 2 else 1
            bar.advance()
        _combine([*site_stats.values(), *solo_acc.values(), all_acc, exact_acc], distributed)
        samples = _total(samples, distributed)

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
