"""Tolerances: the bounds the end-to-end figures must meet, read from the user's value.

``Tolerance`` (default: ``cosine_mean ≥ 0.999``) names lower bounds on the cosines, the argmax
agreement of the task head and a user metric, and an upper bound on ``max_rel_err``.
``parse_tolerance`` builds one from a number, a ``key=value`` string or a dict; ``guarded`` is a
figure under the margin rule (what the check set supports for data it did not see); ``tighten``
moves the bounds the written file missed so the guard can aim for the torch module's share.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

from .errors import SurgeonError
from .metrics import Figures

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
MARGIN_EXTREME = 1.25

AGREEMENT_NEEDS_LOGITS = ("tolerance names 'agreement' but the model has no *logits output to take the argmax of "
                          "(task heads name theirs logits, start_logits, ...)")


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

    def judged(self, figures: Figures, name: str) -> float | None:
        """The value of ``name`` the tolerance is checked on: ``guarded`` (the margin rule) or as measured."""
        return guarded(figures, name) if self.margin else figures.get(name)

    def violations(self, figures: Figures) -> list[str]:
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


def guarded(figures: Figures, name: str) -> float | None:
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


FILE_ROUNDS = 3  # the file round (``tighten``): files written and measured at most: the first, then two further descents of the guard


def tighten(tolerance: Tolerance, torch_figures: Figures, file_figures: Figures) -> Tolerance:
    """``tolerance`` with each bound the file missed tightened for the torch module the guard measures:
    the file's error on that criterion (1 − cosine, 1 − agreement, max_rel_err; judged values) was
    ``ratio`` times the torch module's on the same check set, so the torch module may keep only
    1/ratio of the allowed error. Where the torch module had no error at all, the bound moves by the
    file's whole gap instead."""
    changes: dict[str, Any] = {}
    for name in tolerance.violations(file_figures):
        if name == "metric":
            continue  # a user metric has no error scale to divide
        bound = tolerance.bounds()[name]
        a, b = tolerance.judged(torch_figures, name), tolerance.judged(file_figures, name)
        if a is None or b is None or math.isnan(a) or math.isnan(b):
            continue
        higher = CRITERIA[name]
        err_torch, err_file = (1.0 - a, 1.0 - b) if higher else (a, b)
        allowed = (1.0 - bound) if higher else bound
        if err_torch > 0 and err_file > err_torch:
            allowed = allowed * err_torch / err_file
        else:
            allowed = allowed - abs(err_file - err_torch)
        allowed = max(allowed, 0.0)
        changes[name] = 1.0 - allowed if higher else allowed
    return replace(tolerance, **changes)
