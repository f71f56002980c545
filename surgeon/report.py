"""The optimize report: ``report.json`` (versioned schema, docs/report.md).

``make_report`` assembles the dict from the pipeline's typed results (``surgeon.report_html`` renders
it as ``report.html``). Non-finite figures (an SQNR of +∞ when a site is exact, NaN when an output went
non-finite) are written as ``null``: JSON has no infinities.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

from .metrics import Figures
from .pass_manager import Diagnostic
from .tolerance import Tolerance
from .verify import GuardResult

SCHEMA_VERSION = 1
DECODER_SCHEMA = "surgeon.decoder/1"  # a decoder OUTDIR's report.json (surgeon.decoder.pipeline)



def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as None and tuples/sets as lists (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return json_safe(value.item())
    return value


def site_entries(guard: GuardResult, diagnostics: Iterable[Diagnostic], variants: dict[str, str],
                 checks: Iterable[Any] = ()) -> list[dict]:
    """One entry per site a pass touched: measured sites in graph order, then the exact rewrites
    (``applied`` with ``exact: true``: nothing to measure or roll back), then the skipped ones.

    ``checks``: pass-specific acceptance tests on the final model (``Pass.check``); their figures go
    under the site's ``check``, and a rejected one turns an applied site into ``rolled_back``."""
    sites: list[dict] = []
    for c in guard.sites:
        r = c.record
        entry: dict[str, Any] = {"id": r.site, "kind": r.kind, "module": r.module, "variant": variants.get(r.site),
                                 "pass": r.pass_name, "status": c.status, "metrics": dict(c.metrics)}
        if c.solo_local is None:
            entry["solo_end_to_end"] = c.solo.to_json()
        else:  # many sites: ranked by the error where each acts (surgeon.local_solo), not measured end to end
            entry["solo_local_rel_err"] = dict(c.solo_local)
        if c.ladder:
            # the rung it ended on, its ladder, and its solo figures on each rung (rung → cosine mean, ...)
            entry["rung"] = c.rung
            entry["ladder"] = list(c.ladder)
            if len(c.solo_rungs) > 1 and c.solo_local is None:
                entry["solo_end_to_end_by_rung"] = {k: v.to_json() for k, v in c.solo_rungs.items()}
            if r.benefit:
                entry["benefit"] = dict(r.benefit.get(c.rung, next(iter(r.benefit.values()))))
        if c.status == "rolled_back":
            entry["reason"] = c.reason
            entry["rollback"] = dict(c.cause)
        elif c.reason:
            entry["reason"] = c.reason  # the rungs it stepped down and why
        sites.append(entry)
    by_id = {e["id"]: e for e in sites}
    for chk in checks:
        checked = by_id.get(chk.site)
        if checked is None:
            continue
        checked["check"] = {"accepted": chk.accepted, **chk.figures}
        if not chk.accepted and checked["status"] == "applied":
            checked["status"] = "rolled_back"
            checked["reason"] = chk.reason
            checked["rollback"] = {"check": chk.reason}
    measured = {c.record.site for c in guard.sites}
    for d in diagnostics:
        if d.status == "applied" and d.site is not None and d.site not in measured:
            measured.add(d.site)
            sites.append({"id": d.site, "kind": d.kind, "module": d.module, "variant": variants.get(d.site),
                          "pass": d.pass_name, "status": "applied", "exact": True, "reason": d.reason,
                          "metrics": {"sqnr_db": None, "cosine": None, "max_rel_err": None}})
    for d in diagnostics:
        if d.status == "skipped" and d.site is not None and d.site not in measured:
            sites.append({"id": d.site, "kind": d.kind, "module": d.module, "variant": variants.get(d.site),
                          "pass": d.pass_name, "status": "skipped", "reason": d.reason,
                          "metrics": {"sqnr_db": None, "cosine": None, "max_rel_err": None}})
    return sites


def make_report(*, surgeon_version: str, model: dict, passes: list[str], capture: dict, calibration: dict,
                guard: GuardResult, final: Figures, diagnostics: list[Diagnostic], variants: dict[str, str],
                timings: dict[str, float], export: dict, warnings: list[str], checks: Iterable[Any] = (),
                target: dict | None = None) -> dict:
    """The report dict (what ``report.json`` holds; schema in docs/report.md)."""
    sites = site_entries(guard, diagnostics, variants, checks)
    counts = {s: sum(1 for e in sites if e["status"] == s) for s in ("applied", "rolled_back", "skipped")}
    tolerance: Tolerance = guard.tolerance
    end_to_end = final.to_json()
    end_to_end["check_batches"] = guard.batches
    report = {
        "schema_version": SCHEMA_VERSION,
        "surgeon_version": surgeon_version,
        "model": model,
        "passes": passes,
        "target": target,  # the deploy target optimize ran for and its runtime profile (None: none)
        "capture": capture,
        "calibration": calibration,
        "tolerance": {**tolerance.to_json(), "description": tolerance.describe(),
                      "met": not tolerance.violations(final)},
        "sites": sites,
        "counts": counts,
        "end_to_end": end_to_end,
        "end_to_end_all_applied": guard.all_applied.to_json(),
        "rollback_steps": guard.steps,
        "diagnostics": [d.to_json() for d in diagnostics if d.site is None],
        "export": export,
        "warnings": list(warnings),
        "timings_s": {k: round(v, 4) for k, v in timings.items()},
        "targets": {},
        "outputs": {},
    }
    return json_safe(report)


def write_json(report: dict, path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(json_safe(report), indent=2, allow_nan=False) + "\n", encoding="utf-8")
