"""Determinism: the same ``surgeon optimize --target onnx-int8 / onnx-fp8`` twice gives a byte-identical
``model.onnx`` and identical report figures (report.json with the timings removed).

Both runs are in one process, which is the harder case: anything keyed by a global counter (node or
module names), an object id, dict/set iteration or an unseeded RNG would differ between them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from surgeon import cli

FACTORY = '''
import torch
from tests._models import TinyTransformer

def make():
    torch.manual_seed(0)
    return TinyTransformer(layers=2, dim=16).eval(), (torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1)),)
'''


def _figures(report: Any) -> Any:
    """The report without wall-clock figures (``timings_s``, ``seconds``, the speed section's latencies)."""
    if isinstance(report, dict):
        return {k: _figures(v) for k, v in report.items()
                if k not in ("timings_s", "seconds", "latency_ms", "latency_spread_ms", "latency_ratio")}
    if isinstance(report, list):
        return [_figures(v) for v in report]
    return report


@pytest.mark.slow
@pytest.mark.parametrize("target, passes", [("onnx-int8", "linear-quant{dtype=int8}"),
                                            ("onnx-fp8", "attention-fp8,linear-quant{dtype=fp8}")])
def test_same_command_twice_gives_identical_outputs(target: str, passes: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "detfac.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    g = torch.Generator().manual_seed(3)
    torch.save([(torch.randint(0, 50, (4, 9), generator=g),) for _ in range(8)], tmp_path / "calib.pt")
    reports, digests = [], []
    for run in ("a", "b"):
        torch.manual_seed(run == "b")  # the caller's RNG state must not matter either
        code = cli.main(["optimize", "detfac:make", "-o", run, "--calib", "calib.pt", "--passes", passes,
                         "--target", target, "--no-speed"])
        assert code == 0
        digests.append(hashlib.sha256((tmp_path / run / "model.onnx").read_bytes()).hexdigest())
        reports.append(json.loads((tmp_path / run / "report.json").read_text()))
    assert digests[0] == digests[1]
    assert _figures(reports[0]) == _figures(reports[1])
    assert reports[0]["counts"]["applied"] > 0  # something was quantized: the comparison is not trivial
