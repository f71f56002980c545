"""``OUTDIR/model.pt2`` loads where users load it: torch alone, no surgeon import, bit for bit.

surgeon's Q/DQ custom ops are decomposed to aten in the saved program (targets/pt2.py) and the fp32
weights a quantized layer keeps for the guard are not stored."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from _models import TinyTransformer

import surgeon

# two runs cover the three outputs (CI time): FP8 attention with INT8 linears, and FP8 linears; nearest
# rounding without SmoothQuant (CI time: what is tested is the saved Q/DQ arithmetic, not the fit)
CASES = {"int8": "attention-fp8,linear-quant{dtype=int8,rounding=nearest,smooth=0}",
         "fp8": "linear-quant{dtype=fp8,rounding=nearest,smooth=0}"}


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, surgeon.Result]]:
    torch.manual_seed(0)
    model = TinyTransformer(layers=1, dim=16, vocab=64).eval()
    ex = (torch.randint(0, 64, (2, 8)),)
    calib = [(torch.randint(0, 64, (2, 8)),) for _ in range(2)]
    root = tmp_path_factory.mktemp("pt2")
    out = {}
    for name, spec in CASES.items():
        res = surgeon.optimize(model, ex, calib, passes=spec, tolerance=-1)
        kinds = {s["pass"] for s in res.report["sites"] if s["status"] == "applied"}
        assert kinds == set(re.sub(r"\{[^}]*\}", "", spec).split(",")), kinds  # each substitute is in the file
        res.save(root / name, speed=False)
        out[name] = (root / name / "model.pt2", res)
    return out


def test_model_pt2_loads_with_torch_alone_and_equals_result_module_bitwise(written, tmp_path: Path) -> None:
    torch.manual_seed(5)
    held_out = [torch.randint(0, 64, (3, 11)), torch.randint(0, 64, (1, 5))]  # not the export's shapes
    expected = {name: [res.module(x) for x in held_out] for name, (_, res) in written.items()}
    torch.save({"inputs": held_out, "expected": expected,
                "paths": {name: str(p) for name, (p, _) in written.items()}}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import sys, torch
        torch.set_num_threads(1)  # as this test process (conftest): a GEMM's sum order may follow the thread count
        d = torch.load({str(tmp_path / 'io.pt')!r})
        for name, path in d["paths"].items():
            module = torch.export.load(path).module()
            for x, want in zip(d["inputs"], d["expected"][name]):
                got = module(x)
                assert torch.equal(got, want), (name, (got - want).abs().max().item())
        assert not any(m == "surgeon" or m.startswith("surgeon.") for m in sys.modules), "surgeon was imported"
        print("ok", len(d["paths"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["ok", str(len(CASES))]


def test_model_pt2_has_no_surgeon_ops_and_stores_quantized_weights_only(written) -> None:
    for name, (path, res) in written.items():
        ep = torch.export.load(str(path))
        assert not [n for n in ep.graph.nodes if n.op == "call_function" and "surgeon" in str(n.target)], name
        stored = {**ep.state_dict, **ep.constants}
        # every stored tensor is read by the graph: no fp32 copy of a quantized weight rides along
        read = {n.name for n in ep.graph.nodes if n.op == "placeholder" and n.users}
        lifted = {s.target: s.arg.name for s in ep.graph_signature.input_specs if s.target is not None}
        assert set(stored) <= set(lifted) and all(lifted[k] in read for k in stored), name
        fp32_matrices = [k for k, v in stored.items() if v.dtype == torch.float32 and v.dim() == 2]
        # every linear and table linear-quant quantized is stored in 8 bits only
        assert not fp32_matrices, (name, fp32_matrices)
        report = res.report["export"]["pt2"]
        assert report["bytes"] == path.stat().st_size
        dtypes = {"int8": "int8", "fp8": "float8_e4m3fn"}
        if name in dtypes:
            assert report["tensor_bytes"][dtypes[name]] > 0


def test_saving_shows_no_torch_deprecation_warning(written, tmp_path: Path) -> None:
    """torch's run_decompositions deep-copies a LeafSpec and warns about its own deprecated isinstance
    check (a FutureWarning on every optimize): silenced there, and only that message."""
    import warnings

    _, res = written["int8"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        res.save(tmp_path / "again", speed=False)
    assert not [w for w in seen if issubclass(w.category, FutureWarning)], [str(w.message) for w in seen]
