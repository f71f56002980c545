"""report.json assembly and the self-contained report.html, from hand-made guard results."""

from __future__ import annotations

import base64
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

from surgeon.pass_manager import Diagnostic, SiteRecord
from surgeon.report import SCHEMA_VERSION, json_safe, make_report, write_json
from surgeon.report_html import render_html, write_html
from surgeon.verify import Figures, GuardResult, SiteCheck, Tolerance


def _fig(cos: float, cmin: float | None = None, rel: float = 0.01, sqnr: float = 30.0) -> Figures:
    return Figures(cos, cos if cmin is None else cmin, rel, sqnr, 8)


def _report(nan_site: bool = False) -> dict:
    recs = [SiteRecord(f"attention:enc.{i}:sdpa_{i}", "attention", f"enc.{i}", "attention-fp8", [f"m{i}"], "p", "r")
            for i in range(3)]
    checks = [
        SiteCheck(recs[0], {"sqnr_db": 31.5, "cosine": 0.9996, "max_rel_err": 0.05}, _fig(0.99995)),
        SiteCheck(recs[1], {"sqnr_db": 4.0, "cosine": 0.8, "max_rel_err": 0.9}, _fig(0.97), "rolled_back",
                  "end-to-end cosine_mean 0.96 < 0.999 with 3 site(s) on; ...",
                  {"criterion": "cosine_mean", "solo": 0.97, "end_to_end": 0.96, "bound": 0.999, "sites_on": 3}),
        SiteCheck(recs[2], {"sqnr_db": math.inf if not nan_site else math.nan, "cosine": 1.0, "max_rel_err": 0.0},
                  _fig(1.0, rel=0.0, sqnr=math.inf)),
    ]
    guard = GuardResult(checks, [recs[0].site, recs[2].site], _fig(0.9995, 0.998), _fig(0.96), True,
                        Tolerance(), steps=[{"kept": [r.site for r in recs], "end_to_end": _fig(0.96).to_json(),
                                             "rolled_back": None},
                                            {"kept": [recs[0].site, recs[2].site],
                                             "end_to_end": _fig(0.9995).to_json(), "rolled_back": recs[1].site}],
                        batches=2, samples=8)
    diags = [Diagnostic("attention-fp8", "attention:dec:softmax_9", "skipped", "softmax is not over the key axis",
                        "dec", "attention"),
             Diagnostic("attention-fp8", None, "applied", "3 sites rewritten")]
    return make_report(surgeon_version="9.9", model={"source": "m", "class": "M", "inputs": "x[2x3] float32"},
                       passes=["attention-fp8{p_bits=8}"], capture={"method": "export"},
                       calibration={"batches": {"fit": 6, "check": 2}, "samples": {"fit": 48, "check": 16},
                                    "weak": False, "independent_check": True},
                       guard=guard, final=_fig(0.9995, 0.998), diagnostics=diags,
                       variants={recs[0].site: "sdpa"}, timings={"capture": 1.23456, "verify": 0.5},
                       export={"inputs": {"x": ["dynamic", 3]}}, warnings=["weak <calibration> & co"])


def test_report_schema_and_statuses() -> None:
    rep = _report()
    assert rep["schema_version"] == SCHEMA_VERSION and rep["surgeon_version"] == "9.9"
    assert [s["status"] for s in rep["sites"]] == ["applied", "rolled_back", "applied", "skipped"]
    assert rep["counts"] == {"applied": 2, "rolled_back": 1, "skipped": 1}
    skipped = rep["sites"][3]
    assert skipped["reason"] == "softmax is not over the key axis" and skipped["pass"] == "attention-fp8"
    assert skipped["metrics"] == {"sqnr_db": None, "cosine": None, "max_rel_err": None}
    rolled = rep["sites"][1]
    assert rolled["reason"].startswith("end-to-end cosine_mean 0.96") and rolled["rollback"]["solo"] == 0.97
    assert "reason" not in rep["sites"][0] and rep["sites"][0]["variant"] == "sdpa" and rep["sites"][1]["variant"] is None
    assert rep["sites"][2]["metrics"]["sqnr_db"] is None  # +inf (exact) is null in JSON
    assert rep["end_to_end"] == {"cosine_mean": 0.9995, "cosine_min": 0.998, "max_rel_err": 0.01, "sqnr_db": 30.0,
                                 "samples": 8, "check_batches": 2}
    assert rep["tolerance"]["met"] is True and rep["tolerance"]["cosine_mean"] == 0.999
    assert rep["timings_s"] == {"capture": 1.2346, "verify": 0.5}
    assert rep["diagnostics"] == [{"pass_name": "attention-fp8", "site": None, "status": "applied",
                                   "reason": "3 sites rewritten", "module": "", "kind": ""}]


def test_json_is_strict_and_round_trips(tmp_path: Path) -> None:
    rep = _report(nan_site=True)
    write_json(rep, tmp_path / "r.json")
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == rep
    assert json_safe({"a": (1.0, float("nan")), "b": {2: float("-inf")}}) == {"a": [1.0, None], "b": {"2": None}}


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.add(tag)
        self.refs += [v for k, v in attrs if k in ("src", "href", "data", "srcset") and v is not None]


def test_html_self_contained_with_plots(tmp_path: Path) -> None:
    rep = _report()
    write_html(rep, tmp_path / "r.html")
    page = (tmp_path / "r.html").read_text()
    parser = _Refs()
    parser.feed(page)
    assert not parser.tags & {"script", "link", "iframe", "object", "embed"}
    assert len(parser.refs) == 2  # per-site plot + rollback plot, both embedded
    for ref in parser.refs:
        assert ref.startswith("data:image/png;base64,")
        assert base64.b64decode(ref.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http" not in page.replace("http-equiv", "")
    # User-provided text is escaped; the table has one row per site.
    assert "weak &lt;calibration&gt; &amp; co" in page and "<calibration>" not in page
    assert len(re.findall(r"<tr><td>\d+</td>", page)) == 4
    assert "<b>2</b> site(s) applied, <b>1</b> rolled back, <b>1</b> skipped" in page


def test_html_without_sites_or_rollbacks() -> None:
    rep = _report()
    rep["sites"], rep["rollback_steps"] = [], rep["rollback_steps"][:1]
    page = render_html(rep)
    assert "<img" not in page and "<h2>Sites</h2>" in page


def test_site_plot_when_no_site_was_measured_alone() -> None:
    # Only exact rewrites (norm-fold): no solo cosine anywhere. A log axis over all-zero bars made
    # matplotlib warn "Data has no positive values" on every such report.
    import warnings

    rep = _report()
    for s in rep["sites"]:
        s["solo_end_to_end"] = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        page = render_html(rep)
    assert page.count("data:image/png;base64,") == 2
