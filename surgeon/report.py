"""The optimize report: ``report.json`` (versioned schema, docs/report.md) and a self-contained ``report.html``.

``make_report`` assembles the dict from the pipeline's typed results; ``render_html`` turns it into one
HTML file with its plots embedded as base64 PNG (matplotlib, Agg backend) — no external resource, so
the file can be mailed or archived as is. Non-finite figures (an SQNR of +∞ when a site is exact, NaN
when an output went non-finite) are written as ``null``: JSON has no infinities.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

from .pass_manager import Diagnostic
from .verify import Figures, GuardResult, Tolerance

SCHEMA_VERSION = 1
STATUS_COLORS = {"applied": "#2e7d32", "rolled_back": "#c62828", "skipped": "#9e9e9e"}


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
        entry = {"id": r.site, "kind": r.kind, "module": r.module, "variant": variants.get(r.site),
                 "pass": r.pass_name, "status": c.status, "metrics": dict(c.metrics),
                 "solo_end_to_end": c.solo.to_json()}
        if c.ladder:
            # the rung it ended on, its ladder, and its solo figures on each rung (rung → cosine mean, ...)
            entry["rung"] = c.rung
            entry["ladder"] = list(c.ladder)
            if len(c.solo_rungs) > 1:
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
        entry = by_id.get(chk.site)
        if entry is None:
            continue
        entry["check"] = {"accepted": chk.accepted, **chk.figures}
        if not chk.accepted and entry["status"] == "applied":
            entry["status"] = "rolled_back"
            entry["reason"] = chk.reason
            entry["rollback"] = {"check": chk.reason}
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


# --------------------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------------------
def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _short(module: str, limit: int = 34) -> str:
    module = module or "<root>"
    return module if len(module) <= limit else "…" + module[-(limit - 1):]


def plot_sites(report: dict) -> str | None:
    """Data URI of a PNG: per-site SQNR and solo end-to-end error, coloured by status."""
    sites = report.get("sites") or []
    if not sites:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    labels = [_short(s["module"]) + f" [{s['kind']}]" for s in sites]
    colors = [STATUS_COLORS.get(s["status"], "#000000") for s in sites]
    sqnr = [(s.get("metrics") or {}).get("sqnr_db") for s in sites]
    one_minus = []
    for s in sites:
        cos = (s.get("solo_end_to_end") or {}).get("cosine_mean")
        one_minus.append(None if cos is None else max(1.0 - cos, 1e-9))
    height = max(2.6, 0.32 * len(sites) + 1.2)
    fig, axes = plt.subplots(1, 2, figsize=(11, height), sharey=True)
    ys = list(range(len(sites)))
    axes[0].barh(ys, [v if v is not None else 0.0 for v in sqnr], color=colors)
    for y, v in zip(ys, sqnr):
        if v is None:
            axes[0].text(0, y, " n/a (exact or not measured)", va="center", fontsize=7)
    axes[0].set_xlabel("site output SQNR (dB, higher is better)")
    axes[0].set_yticks(ys, labels, fontsize=7)
    axes[0].invert_yaxis()
    axes[1].barh(ys, [v if v is not None else 0.0 for v in one_minus], color=colors)
    if any(v is not None for v in one_minus):
        axes[1].set_xscale("log")  # a log axis needs one positive value (all exact sites: none)
    for y, v in zip(ys, one_minus):
        if v is None:
            axes[1].text(axes[1].get_xlim()[0], y, " n/a (not measured alone)", va="center", fontsize=7)
    axes[1].set_xlabel("1 − end-to-end cosine (mean), only this site on (lower is better)")
    tol = (report.get("tolerance") or {}).get("cosine_mean")
    if tol is not None and tol < 1.0:
        axes[1].axvline(1.0 - tol, color="#555555", linestyle="--", linewidth=1)
        axes[1].text(1.0 - tol, -0.6, " tolerance", fontsize=7, color="#555555")
    handles = [Patch(color=c, label=s.replace("_", " ")) for s, c in STATUS_COLORS.items()]
    fig.legend(handles=handles, loc="upper center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    uri = _png(fig)
    plt.close(fig)
    return uri


def plot_steps(report: dict) -> str | None:
    """Data URI of a PNG: end-to-end mean cosine after each rollback (None when nothing was rolled back)."""
    steps = report.get("rollback_steps") or []
    if len(steps) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    xs = list(range(len(steps)))
    ys = [(st.get("end_to_end") or {}).get("cosine_mean") for st in steps]
    fig, ax = plt.subplots(figsize=(6, 2.8))
    ax.plot(xs, [1.0 - y if y is not None else float("nan") for y in ys], marker="o", color="#1565c0")
    ax.set_yscale("log")
    ax.set_xticks(xs, [str(len(st["kept"])) for st in steps])
    ax.set_xlabel("sites on (after each rollback)")
    ax.set_ylabel("1 − cosine (mean)")
    tol = (report.get("tolerance") or {}).get("cosine_mean")
    if tol is not None and tol < 1.0:
        ax.axhline(1.0 - tol, color="#555555", linestyle="--", linewidth=1)
    fig.tight_layout()
    uri = _png(fig)
    plt.close(fig)
    return uri


def _num(v: Any, digits: int = 6) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return html.escape(str(v))


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em;color:#222;max-width:1200px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.85em}td,th{border:1px solid #ddd;padding:3px 7px;text-align:left}
th{background:#f4f4f4}.applied{color:#2e7d32}.rolled_back{color:#c62828}.skipped{color:#757575}
.big{font-size:1.1em}.warn{color:#b26a00}code{background:#f4f4f4;padding:0 3px}img{max-width:100%}
"""


def render_html(report: dict) -> str:
    """A self-contained HTML page for ``report`` (inline CSS, plots as data URIs, no scripts)."""
    e = html.escape
    r = report
    counts = r.get("counts", {})
    e2e = r.get("end_to_end", {})
    tol = r.get("tolerance", {})
    cal = r.get("calibration", {})
    on = e2e.get("measured_on") or {}
    ci = (e2e.get("spread") or {}).get("cosine_mean_ci95")
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>surgeon report — {e(str(r.get('model', {}).get('source', '')))}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>surgeon optimize — {e(str(r.get('model', {}).get('source', '')))}</h1>",
        f"<p>surgeon {e(str(r.get('surgeon_version')))}, report schema {e(str(r.get('schema_version')))}; "
        f"passes: <code>{e(', '.join(r.get('passes', [])))}</code>; captured with "
        f"{e(str(r.get('capture', {}).get('method')))}.</p>",
        "<p class='big'>"
        f"<b>{counts.get('applied', 0)}</b> site(s) applied, <b>{counts.get('rolled_back', 0)}</b> rolled back, "
        f"<b>{counts.get('skipped', 0)}</b> skipped. End to end"
        + (f" of <code>{e(str(on['file']))}</code> in {e(str(on.get('runtime')))}" if on.get("file") else "")
        + f" on {e2e.get('samples', '?')} check sample(s): "
        f"cosine mean <b>{_num(e2e.get('cosine_mean'))}</b>"
        + (f" (95 % interval {_num(ci[0])}–{_num(ci[1])})" if ci else "")
        + f", min <b>{_num(e2e.get('cosine_min'))}</b>, max rel. error {_num(e2e.get('max_rel_err'))}"
        + (f", argmax agreement <b>{_num(e2e.get('agreement'))}</b>" if e2e.get("agreement") is not None else "")
        + (f", metric {_num(e2e.get('metric'))}" if e2e.get("metric") is not None else "")
        + f". Tolerance ({e(str(tol.get('description')))}{', with the margin' if tol.get('margin') else ''}): "
        + (f"<span class='{'applied' if (r.get('verdict') or {}).get('status', 'met') == 'met' else 'rolled_back'}'>"
           f"{e((r.get('verdict') or {}).get('summary') or ('met' if tol.get('met') else 'NOT met'))}</span>")
        + ".</p>",
        f"<p>Calibration: {_num(cal.get('batches', {}).get('fit'))} fit batch(es) "
        f"({_num(cal.get('samples', {}).get('fit'))} samples), {_num(cal.get('batches', {}).get('check'))} check "
        f"batch(es) ({_num(cal.get('samples', {}).get('check'))} samples)"
        + ("" if cal.get("independent_check", True) else " — <span class='warn'>the check set is the fit set "
                                                          "(not independent)</span>")
        + (" — <span class='warn'>weak calibration (example inputs only)</span>" if cal.get("weak") else "")
        + ".</p>",
    ]
    sp = r.get("speed")
    if sp and "latency_ratio" in sp:
        shapes = ", ".join(f"{k} {'×'.join(map(str, v))}" for k, v in sp.get("inputs", {}).items())
        parts.append(
            f"<h2>What it bought</h2><p class='big'>On this machine ({e(str(sp['cpu'].get('class')))}: "
            f"{e(str(sp['cpu'].get('model')))}, flags {e(' '.join(sp['cpu'].get('flags', [])))}), in "
            f"{e(str(sp.get('runtime')))} with {sp.get('threads')} threads on {e(shapes)}: latency "
            f"<b>{_num(sp.get('latency_ratio'), 3)}×</b> the original ({_num(sp['latency_ms'].get('optimized'), 4)} ms "
            f"vs {_num(sp['latency_ms'].get('original'), 4)} ms, medians of {sp.get('runs')} runs side by side), "
            f"size <b>{_num(sp.get('size_ratio'), 3)}×</b> ({_num(sp['bytes'].get('optimized'))} vs "
            f"{_num(sp['bytes'].get('original'))} bytes). Target <code>{e(str(sp.get('target')))}</code>"
            + (f", exact on: {e(str((r.get('target') or {}).get('profile', {}).get('machine')))}"
               if r.get("target") else "") + ".</p>")
    for w in r.get("warnings", []):
        parts.append(f"<p class='warn'>warning: {e(w)}</p>")
    img = plot_sites(r)
    if img:
        parts.append("<h2>Per-site error</h2>")
        parts.append(f"<img alt='per-site SQNR and end-to-end error' src='{img}'>")
    steps_img = plot_steps(r)
    if steps_img:
        parts.append("<h2>Rollbacks</h2>")
        parts.append(f"<img alt='end-to-end cosine after each rollback' src='{steps_img}'>")
    parts.append("<h2>Sites</h2><table><tr><th>#</th><th>kind</th><th>module</th><th>variant</th><th>pass</th>"
                 "<th>status</th><th>SQNR dB</th><th>cosine</th><th>max rel err</th>"
                 "<th>solo e2e cosine mean</th><th>reason</th></tr>")
    for i, s in enumerate(r.get("sites", [])):
        m = s.get("metrics") or {}
        solo = s.get("solo_end_to_end") or {}
        parts.append(
            f"<tr><td>{i}</td><td>{e(str(s.get('kind')))}</td><td>{e(s.get('module') or '<root>')}</td>"
            f"<td>{e(str(s.get('variant') or ''))}</td><td>{e(str(s.get('pass')))}</td>"
            f"<td class='{e(s['status'])}'>{e(s['status'].replace('_', ' '))}"
            + (f" ({e(str(s['rung']))})" if s.get("rung") and s["rung"] not in ("on", "keep") else "") + "</td>"
            f"<td>{_num(m.get('sqnr_db'), 4)}</td><td>{_num(m.get('cosine'))}</td><td>{_num(m.get('max_rel_err'), 4)}</td>"
            f"<td>{_num(solo.get('cosine_mean'))}</td><td>{e(s.get('reason', ''))}</td></tr>")
    parts.append("</table>")
    diags = r.get("diagnostics") or []
    if diags:
        parts.append("<h2>Pass notes</h2><ul>")
        parts += [f"<li>{e(d.get('pass_name', ''))}: {e(d.get('status', ''))} {e(d.get('reason', ''))}</li>"
                  for d in diags]
        parts.append("</ul>")
    parts.append("<h2>End to end</h2><table><tr><th>configuration</th><th>cosine mean</th><th>cosine min</th>"
                 "<th>max rel err</th><th>SQNR dB</th></tr>")
    rows = [("all sites applied (torch)", r.get("end_to_end_all_applied", {}))]
    if r.get("end_to_end_torch"):
        rows.append(("kept sites, torch module", r["end_to_end_torch"]))
    rows.append((f"written file ({on['file']})" if on.get("file") else "written model", e2e))
    for label, f in rows:
        parts.append(f"<tr><td>{label}</td><td>{_num(f.get('cosine_mean'))}</td><td>{_num(f.get('cosine_min'))}</td>"
                     f"<td>{_num(f.get('max_rel_err'), 4)}</td><td>{_num(f.get('sqnr_db'), 4)}</td></tr>")
    parts.append("</table>")
    exp = r.get("export") or {}
    if exp.get("inputs"):
        dims = "; ".join(f"{e(k)}[{', '.join(map(str, v))}]" for k, v in exp["inputs"].items())
        parts.append(f"<p>model.pt2 inputs: {dims}.</p>")
    targets = r.get("targets") or {}
    if targets:
        parts.append(f"<h2>Targets</h2><pre>{e(json.dumps(targets, indent=2))}</pre>")
    parts.append("<h2>Timings (s)</h2><table><tr>"
                 + "".join(f"<th>{e(k)}</th>" for k in r.get("timings_s", {}))
                 + "</tr><tr>" + "".join(f"<td>{_num(v, 4)}</td>" for v in r.get("timings_s", {}).values())
                 + "</tr></table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(report: dict, path: str | os.PathLike) -> None:
    Path(path).write_text(render_html(report), encoding="utf-8")
