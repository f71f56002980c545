"""Fuzzing the whole pipeline: random small models → analyze → optimize → save(ONNX target).

The property (docs/fuzzing.md), for every drawn case (tests/_fuzz_models.py):

* either a clear refusal — a ``SurgeonError`` whose message is one non-empty line;
* or a written model whose end-to-end error, re-measured here on the result's check batches (the
  reloaded ``model.pt2`` against the original module, not read from the report), is within the
  tolerance whenever the report says ``tolerance.met`` (ε = 1e-6 per bound), agrees with the
  report's figure, and whose ``model.onnx`` run in onnxruntime agrees with ``model.pt2``;
* never any other exception.

12 examples here (CI, to keep it under 30 minutes with everything else); ``python bench/fuzz.py --examples 200``
runs the same property on 200.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from _fuzz_models import cases, make_case, run_case
from hypothesis import HealthCheck, given, settings

SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.filter_too_much, HealthCheck.large_base_example])


@settings(max_examples=12, **SETTINGS)
@given(case=cases())
def test_pipeline_property(case) -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        outcome = run_case(case, Path(tmp) / "out")
    # A known bug outside surgeon (an onnxruntime optimizer rule) is tracked by its own strict xfail
    # below; every other outcome already passed its assertions inside run_case.
    assert outcome.kind in ("met", "not_met", "refused", "known_bug"), outcome


# --------------------------------------------------------------------------------------------------
# cases the fuzzer found, kept as regression tests
# --------------------------------------------------------------------------------------------------
def _run(case, tmp_path: Path):
    torch.set_num_threads(1)
    return run_case(case, tmp_path / "out")


@pytest.mark.xfail(strict=True, reason="onnxruntime 1.31 ReluQuantRewrite drops a Relu before an fp8 "
                                       "QuantizeLinear (targets/onnx.py runs and ships the file with it on)")
def test_ort_drops_relu_before_fp8_quantize(tmp_path: Path) -> None:
    # MADE's hidden ReLU feeds a linear whose input is quantized to e4m3 (smooth=0: no Mul in between).
    case = make_case("flow", {"dim": 8, "transforms": ["additive-coupling", "made", "linear"], "hidden": 8,
                              "input_scale": 1.0, "batches": 12},
                     passes="flow-fold,linear-quant{dtype=fp8,method=mse,smooth=0}", target="onnx-fp8",
                     tolerance=0.99, seed=15267)
    outcome = _run(case, tmp_path)
    assert outcome.kind != "known_bug", outcome.message


def test_own_verification_opens_fp8_files_without_relu_quant_rewrite(tmp_path: Path) -> None:
    # The case above, through surgeon's own check of the file it writes: targets/onnx.session() turns
    # the faulty rule off for FP8 files, so report.json measures the file, not the ORT bug (cosine
    # 0.972 with the rule on; docs/fuzzing.md).
    case = make_case("flow", {"dim": 8, "transforms": ["additive-coupling", "made", "linear"], "hidden": 8,
                              "input_scale": 1.0, "batches": 12},
                     passes="flow-fold,linear-quant{dtype=fp8,method=mse,smooth=0}", target="onnx-fp8",
                     tolerance=0.99, seed=15267)
    _run(case, tmp_path)
    target = json.loads((tmp_path / "out/report.json").read_text())["targets"]["onnx-fp8"]
    assert target["ort_disabled_optimizers"] == ["ReluQuantRewrite"]
    assert target["max_abs_diff"] <= 1e-5, target["max_abs_diff"]
