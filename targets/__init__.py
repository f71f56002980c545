"""Exporters: they lower a GraphModule to a deployable file, never rewrite it.

``write_target(name, result_or_gm, outdir)`` writes ``OUTDIR/model.onnx`` for the targets in
``TARGETS`` and records the verification figures (``targets/onnx.py``) in ``result.report["targets"]``.
``run_export_cli(args)`` is ``surgeon export MODEL --target T -o OUTDIR`` (no pass; for
``onnx-fp8`` / ``onnx-int8`` the ``linear-quant`` pass with its defaults, calibrated on what is at
hand — see docs/deploy.md).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from surgeon.errors import SurgeonError

TARGETS: tuple[str, ...] = ("onnx", "onnx-fp8", "onnx-int8")
_DTYPE = {"onnx-fp8": "fp8", "onnx-int8": "int8"}

__all__ = ["TARGETS", "write_target", "run_export_cli", "check_target"]


def check_target(name: str) -> None:
    """Refuse a target name that does not exist (before any work is done)."""
    if name not in TARGETS:
        raise SurgeonError(f"unknown target '{name}' (known: {', '.join(TARGETS)})")


def _quantized_dtypes(module: Any) -> dict[str, int]:
    """How many quantize/dequantize points of each dtype the module computes with."""
    import torch
    from torch import fx

    from surgeon.quant import Quantizer

    counts = {"fp8": 0, "int8": 0}
    for _, m in module.named_modules():
        if isinstance(m, Quantizer) and getattr(m, "active", True):
            counts[m.dtype] = counts.get(m.dtype, 0) + 1
        q = getattr(m, "qweight", None)
        if isinstance(q, torch.Tensor) and getattr(m, "active", True):
            counts["fp8" if q.dtype == torch.float8_e4m3fn else "int8"] += 1
    if isinstance(module, fx.GraphModule):
        for node in module.graph.nodes:
            name = str(node.target)
            if "surgeon.quantize_fp8" in name or "surgeon::quantize_fp8" in name:
                counts["fp8"] += 1
            elif "surgeon.quantize_int8" in name or "surgeon::quantize_int8" in name:
                counts["int8"] += 1
    return counts


def _ort_fusion(path: Path) -> dict[str, Any]:
    """What ORT's CPU provider makes of the file: integer kernels vs float MatMuls fed by a DequantizeLinear."""
    import onnx

    from .onnx import session

    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "optimized.onnx"
        session(path, optimized_path=opt)
        model = onnx.load(str(opt))
    producers = {o: n for n in model.graph.node for o in n.output}
    ops: dict[str, int] = {}
    float_after_dq = 0
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
        if n.op_type in ("MatMul", "Gemm", "FusedMatMul", "FusedGemm"):
            if any(i in producers and producers[i].op_type == "DequantizeLinear" for i in n.input):
                float_after_dq += 1
    integer = sum(ops.get(k, 0) for k in ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger",
                                          "QLinearConv", "DynamicQuantizeMatMul", "QGemm"))
    return {"integer_kernels": integer, "float_matmul_after_dequantize": float_after_dq}


def write_target(name: str, result_or_gm: Any, outdir: str | os.PathLike, *, example_inputs: Any = None,
                 original: Any = None, verify_inputs: Any = None, report: dict | None = None) -> Path:
    """Write ``OUTDIR/model.onnx`` for target ``name`` and return its path.

    ``result_or_gm`` is an optimize ``Result`` (``.module``, ``.example_inputs``, ``.original``,
    ``.check_batches``, ``.report``) or a module; keyword arguments override or supply what a bare
    module lacks. The figures (``targets/onnx.verify_onnx``: max abs diff to the torch module, cosine
    to the original, sizes; for INT8 also what ORT fused) go to ``report["targets"][name]``."""
    check_target(name)
    from .onnx import write_onnx

    res = result_or_gm
    module = getattr(res, "module", res)
    inputs = example_inputs if example_inputs is not None else getattr(res, "example_inputs", None)
    if inputs is None:
        raise SurgeonError(f"target {name}: example inputs are needed to export the module")
    original = original if original is not None else getattr(res, "original", None)
    if verify_inputs is None:
        checks = getattr(res, "check_batches", None) or []
        verify_inputs = checks[0] if checks else inputs
    report = report if report is not None else getattr(res, "report", None)
    figures = write_onnx(module, inputs, outdir, original=original, verify_inputs=verify_inputs)
    figures["target"] = name
    counts = _quantized_dtypes(module)
    figures["quantized"] = counts
    want = _DTYPE.get(name)
    notes = []
    if want and counts.get(want, 0) == 0:
        notes.append(f"target {name} but the module has no {want} quantization (add linear-quant{{dtype={want}}} "
                     f"to the passes): the file computes in float")
    other = {"fp8": "int8", "int8": "fp8"}.get(want or "", None)
    if other and counts.get(other, 0):
        notes.append(f"target {name} but the module also quantizes {counts[other]} point(s) to {other}: "
                     f"the file holds both")
    path = Path(figures["path"])
    if want == "int8":
        figures["ort_cpu"] = _ort_fusion(path)
    figures.pop("path", None)
    if notes:
        figures["notes"] = notes
    # Modules delivered beside the model (a flow's distilled inverse) go out as fp32 ONNX too.
    for extra, module_x in (getattr(res, "artifacts", None) or {}).items():
        x_inputs = res.artifact_inputs[extra]
        extra_figures = write_onnx(module_x, x_inputs, outdir, filename=f"{extra}.onnx", verify_inputs=x_inputs)
        extra_figures.pop("path", None)
        figures.setdefault("artifacts", {})[extra] = extra_figures
    if isinstance(report, dict):
        report.setdefault("targets", {})[name] = figures
    return path


# ------------------------------------------------------------------------------------------------
# surgeon export
# ------------------------------------------------------------------------------------------------
def _calibration_batches(loaded: Any, batch: int = 8) -> tuple[list[Any], Any, str]:
    """(fit batches, check inputs, description). Text models use surgeon's bundled sentences (first
    three quarters fit, last quarter checks); other models only have their example inputs."""
    from importlib import resources

    tok = getattr(loaded, "tokenizer", None)
    if tok is not None and callable(getattr(loaded, "text_inputs", None)):
        try:
            text = resources.files("surgeon").joinpath("data/calib_sentences.txt").read_text(encoding="utf-8")
        except (FileNotFoundError, OSError):
            text = ""
        sentences = [s.strip() for s in text.splitlines() if s.strip()]
        if len(sentences) >= 8:
            cut = len(sentences) * 3 // 4
            fit = [loaded.text_inputs(sentences[i:i + batch]) for i in range(0, cut, batch)]
            return fit, loaded.text_inputs(sentences[cut:]), f"{cut} bundled English sentences"
    return [loaded.example_inputs], loaded.example_inputs, "the example input only"


def _write_json_atomic(data: dict, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".json.tmp", dir=str(path.parent))
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


def export_model(loaded: Any, target: str, outdir: str | os.PathLike, *, warn: Any = None) -> dict:
    """Export a loaded model to ``OUTDIR/model.onnx`` with no pass (``onnx``) or with the default
    ``linear-quant`` (``onnx-fp8`` / ``onnx-int8``); returns the report written to ``report.json``."""
    from surgeon.capture import capture

    check_target(target)
    out = Path(outdir)
    started = time.perf_counter()
    cap = capture(loaded.model, loaded.example_inputs)
    gm = cap.gm
    report: dict[str, Any] = {"schema": "surgeon.export/1", "command": "export", "source": str(loaded.source),
                              "target": target, "capture": cap.to_json(), "warnings": []}
    verify_inputs = loaded.example_inputs
    dtype = _DTYPE.get(target)
    if dtype:
        from surgeon.calibration import calibrate
        from surgeon.pass_manager import PassContext
        from surgeon.passes.linear_quant import LinearQuant

        p = LinearQuant(dtype=dtype)
        ctx = PassContext()
        res = p.call(gm, ctx)
        gm = res.gm
        gm.recompile()
        fit, verify_inputs, what = _calibration_batches(loaded)
        msg = (f"{target} without a pipeline: {p.spec()} calibrated on {what}, not checked by the guard "
               f"(use `surgeon optimize --passes 'linear-quant{{dtype={dtype}}}' --calib FILE --target {target}` "
               f"for scales from your data and per-layer rollback)")
        report["warnings"].append(msg)
        if warn:
            warn(msg)
        calibrate(gm, fit, progress=False)
        p.fit(gm, ctx, fit)
        report["passes"] = [p.spec()]
        report["sites"] = [d.to_json() for d in res.diagnostics]
    write_target(target, gm, out, example_inputs=loaded.example_inputs, original=loaded.model,
                 verify_inputs=verify_inputs, report=report)
    report["timings_s"] = {"total": round(time.perf_counter() - started, 3)}
    _write_json_atomic(report, out / "report.json")
    return report


def run_export_cli(args: Any) -> int:
    """``surgeon export MODEL --target onnx|onnx-fp8|onnx-int8 -o OUTDIR [--force]``."""
    from surgeon._resources import atomic_dir, check_memory, check_output_dir
    from surgeon.load import load_model

    target = getattr(args, "target", None) or "onnx"
    check_target(target)
    out = Path(args.output)
    force = bool(getattr(args, "force", False))
    check_output_dir(out, force)
    loaded = load_model(args.model, trust_pickle=getattr(args, "trust_pickle", False), text=getattr(args, "text", None))
    check_memory(loaded.model, loaded.example_inputs)
    # Written into OUTDIR.partial-<pid> and renamed into place: OUTDIR is never half-written.
    with atomic_dir(out, force) as partial:
        report = export_model(loaded, target, partial,
                              warn=lambda m: print(f"surgeon: warning: {m}", file=sys.stderr))
    f = report["targets"][target]
    parts = [f"wrote {out / 'model.onnx'} ({f['bytes'] / 1e6:.2f} MB"]
    if f.get("size_ratio") is not None:
        parts.append(f", {f['size_ratio']:.2f}x fp32")
    parts.append(f"): ORT vs torch max abs diff {f['max_abs_diff']:.3g}")
    if f.get("cosine_min") is not None:
        parts.append(f", cosine to original min {f['cosine_min']:.5f}")
    if f.get("fp8_session_option"):
        parts.append(f"; run it with session option {f['fp8_session_option']}")
    print("".join(parts))
    return 0
