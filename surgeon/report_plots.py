"""The report's charts: per-site error and the rollback steps, as matplotlib figures (Agg backend) and
as base64 PNG data URIs that ``report.html`` embeds."""

from __future__ import annotations

import base64
import io
from typing import Any

STATUS_COLORS = {"applied": "#2e7d32", "rolled_back": "#c62828", "skipped": "#9e9e9e"}


def _png(fig: Any) -> str | None:
    """``fig`` as a PNG data URI, the figure closed (None for no figure)."""
    if fig is None:
        return None
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
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
    return _png(sites_figure(report))


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
    return _png(steps_figure(report))
