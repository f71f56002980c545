"""``report.html``: the report dict as one self-contained HTML page.

Inline CSS, the charts of ``surgeon.report_plots`` embedded as base64 PNG, no scripts and no external
resource, so the file can be mailed or archived as is.
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path
from typing import Any

from .report import DECODER_SCHEMA
from .report_names import model_name
from .report_plots import plot_sites, plot_steps


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
    if report.get("schema") == DECODER_SCHEMA:
        return _decoder_page(report)
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
        _head(name),
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
    parts.append(_timings(r))
    return "\n".join(parts)


def _head(name: str) -> str:
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' content='width="
            f"device-width, initial-scale=1'><title>{html.escape(name)} — surgeon report</title><style>{_CSS}</style>"
            f"</head><body><h1>{html.escape(name)}</h1>")


def _timings(r: dict) -> str:
    e, t = html.escape, r.get("timings_s", {})
    return ("<h2>Timings (s)</h2><table><tr>" + "".join(f"<th>{e(k)}</th>" for k in t) + "</tr><tr>"
            + "".join(f"<td>{_num(v, 4)}</td>" for v in t.values()) + "</tr></table></body></html>")


def _decoder_page(r: dict) -> str:
    """A decoder OUTDIR's page: the cache's ladder with each rung's figures, the file's check, what it bought."""
    e = html.escape
    g, v, tol, cal = r.get("guard", {}), r.get("verification", {}), r.get("tolerance", {}), r.get("calibration", {})
    c, ppl, verdict = v.get("cache_bytes_per_token", {}), v.get("perplexity", {}), r.get("verdict") or {}
    parts = [_head(model_name(r)),
             f"<p class='sub'>surgeon optimize of <code>{e(str(r.get('model', {}).get('source', '')))}</code> — "
             f"surgeon {e(str(r.get('surgeon_version')))}, report schema {e(str(r.get('schema')))}, target "
             f"<code>{e(str((r.get('target') or {}).get('name')))}</code>, passes "
             f"<code>{e(', '.join(r.get('passes', [])) or 'none')}</code>.</p>",
             f"<p class='big'>Key/value cache <b>{e(str(g.get('chosen')))}</b>: {_num(c.get('file'), 4)} bytes per "
             f"token, <b>{_num(c.get('ratio'), 4)}×</b> fp32. The file's perplexity {_num(ppl.get('file'), 5)} "
             f"(fp32 torch {_num(ppl.get('fp32_torch'), 5)}, ratio <b>{_num(ppl.get('ratio'), 5)}</b>) on "
             f"{_num(ppl.get('texts'))} held-out text(s); greedy tokens vs torch generate "
             f"<b>{_num(v.get('greedy_agreement_vs_torch_generate'), 4)}</b>. Tolerance ({e(str(tol.get('description')))}): "
             f"<span class='{'applied' if verdict.get('status') == 'met' else 'rolled_back'}'>"
             f"{e(str(verdict.get('summary')))}</span>.</p>",
             _decoder_file_figures(r.get("end_to_end") or {}),
             f"<p>Calibration: {e(str(cal.get('source')))}, {_num(cal.get('fit_lines'))} line(s) fit ({_num(cal.get('fit_tokens'))} "
             f"tokens), {_num(cal.get('held_out_lines'))} held out ({_num(cal.get('held_out_tokens'))} tokens).</p>"]
    parts += [f"<p class='warn'>warning: {e(w)}</p>" for w in r.get("warnings", [])]
    parts.append("<h2>Guard: the cache's ladder</h2><table><tr><th>rung</th><th>status</th><th>perplexity</th>"
                 "<th>× fp32</th><th>greedy agreement</th><th>reason</th></tr>")
    parts += [f"<tr><td>{e(x['rung'])}</td><td class='{e(x['status'])}'>{e(x['status'].replace('_', ' '))}</td>"
              f"<td>{_num(x.get('perplexity'), 5)}</td><td>{_num(x.get('ppl_ratio'), 5)}</td>"
              f"<td>{_num(x.get('agreement'), 4)}</td><td class='w'>{e(x.get('reason', ''))}</td></tr>"
              for x in g.get("rungs", [])]
    parts.append(f"</table><h2>Verification in onnxruntime</h2><p>{_num(v.get('new_tokens'))} greedy steps of "
                 f"{_num(v.get('prompts'))} prompt(s): logits max |Δ| {_num(v.get('logits_max_abs_diff'), 3)} vs "
                 f"{e(str(v.get('logits_vs')))}, {_num(v.get('logits_max_abs_diff_vs_fp32_torch'), 3)} vs the fp32 "
                 f"LM; tokens identical to torch generate: {'yes' if v.get('greedy_identical_to_torch_generate') else 'no'}.</p>")
    sp, ms = r.get("speed") or {}, (r.get("speed") or {}).get("decode_step_ms") or {}
    if ms:
        parts.append(f"<h2>What it bought</h2><p>One decode step at past {_num(sp.get('past_length'))}, batch "
                     f"{_num(sp.get('batch'))}: {_num(ms.get('optimized'), 4)} ms vs {_num(ms.get('original'), 4)} ms "
                     f"for the fp32-cache file ({_num(sp.get('latency_ratio'), 4)}×, this machine); cache "
                     f"{_num(sp.get('cache_ratio'), 4)}× the fp32 cache's bytes.</p>")
    return "\n".join([*parts, "<h2>Targets</h2>" + targets_table(r.get("targets") or {}), _timings(r)])


def _decoder_file_figures(e2e: dict) -> str:
    """The decoder file's verdict figures: held-out texts and tokens, the perplexity ratio's interval,
    the judged values and the file rounds."""
    if not e2e:
        return ""
    lo, hi = (e2e.get("spread") or {}).get("ppl_ratio_ci95") or (None, None)
    judged, rounds = e2e.get("judged") or {}, e2e.get("file_rounds") or []
    return (f"<p>Judged on <code>{html.escape(str((e2e.get('measured_on') or {}).get('file')))}</code> in onnxruntime: "
            f"{_num(e2e.get('texts'))} held-out text(s), {_num(e2e.get('tokens'))} tokens; perplexity "
            f"<b>×{_num(e2e.get('ppl_ratio'), 5)}</b> (95 % bootstrap interval {_num(lo, 5)}–{_num(hi, 5)}), agreement "
            f"<b>{_num(e2e.get('agreement'), 4)}</b>; judged" + (" with the margin" if e2e.get("margin") else "")
            + f": ×{_num(judged.get('ppl_ratio'), 5)}, {_num(judged.get('agreement'), 4)}"
            + (f"; the file was written and judged {len(rounds)} times (the last one is kept)" if len(rounds) > 1 else "")
            + ".</p>")


def write_html(report: dict, path: str | os.PathLike) -> None:
    Path(path).write_text(render_html(report), encoding="utf-8")
