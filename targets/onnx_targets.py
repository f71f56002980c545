"""The ONNX targets ``onnx``, ``onnx-fp8`` and ``onnx-int8``: ``OUTDIR/model.onnx`` for ONNX Runtime's
CPU provider. Lowering and verification are ``targets/onnx.py``; this module adds what each target
checks beyond that (which quantization the module carries; for INT8, what ORT's optimized graph fuses,
against the profile's graph requirements) and the latency measurement."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from surgeon import profile as _profile

from ._attention import attention_lowering
from ._base import Target, quantized_dtypes

__all__ = ["OnnxTarget", "ONNX", "ONNX_FP8", "ONNX_INT8", "quantized_dtypes", "ort_fusion"]

INTEGER_KERNELS = ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "QLinearConv",
                   "DynamicQuantizeMatMul", "QGemm")


# ORT's fused kernels by family: a quantized graph should keep every family the fp32 graph gets
# (a bias folded into DynamicQuantizeMatMul turns BiasGelu into Gelu: same family).
FUSED_FAMILIES = {
    "LayerNormalization": "LayerNormalization", "SkipLayerNormalization": "SkipLayerNormalization",
    "SimplifiedLayerNormalization": "LayerNormalization", "SkipSimplifiedLayerNormalization": "SkipLayerNormalization",
    "BiasGelu": "Gelu", "Gelu": "Gelu", "FastGelu": "Gelu", "QuickGelu": "Gelu",
    "Attention": "Attention", "MultiHeadAttention": "Attention", "GroupQueryAttention": "Attention",
}


def _optimized(path: str | os.PathLike) -> Any:
    """The graph ORT's CPU provider runs for the file (after its graph optimizations)."""
    import onnx

    from ._ort_session import session

    with tempfile.TemporaryDirectory() as tmp:
        opt = Path(tmp) / "optimized.onnx"
        session(path, optimized_path=opt)
        return onnx.load(str(opt))


def fusions_kept(path: str | os.PathLike, baseline: str | os.PathLike) -> dict[str, Any]:
    """ORT's fused-kernel families in the file's optimized graph against the original's (``baseline``,
    exported the same way): ``{"families": {family: {"original": n, "file": m}}, "kept": bool}``."""
    counts: dict[str, dict[str, int]] = {}
    for key, p in (("original", baseline), ("file", path)):
        for node in _optimized(p).graph.node:
            family = FUSED_FAMILIES.get(node.op_type)
            if family:
                counts.setdefault(family, {"original": 0, "file": 0})[key] += 1
    return {"families": counts, "kept": all(c["file"] >= c["original"] for c in counts.values())}


def ort_fusion(path: str | os.PathLike) -> dict[str, Any]:
    """What ORT's CPU provider makes of the file: integer kernels vs float MatMuls fed by a DequantizeLinear."""
    model = _optimized(path)
    producers = {o: n for n in model.graph.node for o in n.output}
    ops: dict[str, int] = {}
    float_after_dq = 0
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
        if n.op_type in ("MatMul", "Gemm", "FusedMatMul", "FusedGemm"):
            if any(i in producers and producers[i].op_type == "DequantizeLinear" for i in n.input):
                float_after_dq += 1
    integer = sum(ops.get(k, 0) for k in INTEGER_KERNELS)
    return {"integer_kernels": integer, "float_matmul_after_dequantize": float_after_dq}


# How each INT8 graph requirement of the profile is read off ort_fusion()'s figures.
_INT8_CHECKS = {
    _profile.INT8_FUSED: lambda f: f["integer_kernels"] > 0,
    _profile.INT8_NO_FLOAT_AFTER_DQ: lambda f: f["float_matmul_after_dequantize"] == 0,
}


@dataclass(frozen=True)
class OnnxTarget(Target):
    """``OUTDIR/model.onnx``: standard ONNX (opset 23: attention as the fused ``Attention`` op where it
    is ``scaled_dot_product_attention``), verified in onnxruntime (CPU)."""

    def lower(self, module: Any, example_inputs: Any, outdir: str | os.PathLike, *, original: Any = None,
              verify_inputs: Any = None, filename: str | None = None, **kw: Any) -> dict[str, Any]:
        """Export, verify and place the file (``targets/onnx.write_onnx``); add the quantization counts,
        notes where they do not match the target, and for INT8 what ORT fused (``ort_cpu``)."""
        from .onnx import write_onnx

        figures = write_onnx(module, example_inputs, outdir, filename=filename or self.filename,
                             original=original, verify_inputs=verify_inputs, opset=self.opset, **kw)
        figures["target"] = self.name
        attention = attention_lowering(module, figures["path"])
        if attention:
            figures["attention"] = attention
        counts = quantized_dtypes(module)
        figures["quantized"] = counts
        want = self.quantized
        notes = []
        if want and counts.get(want, 0) == 0:
            notes.append(f"target {self.name} but the module has no {want} quantization (add "
                         f"linear-quant{{dtype={want}}} to the passes): the file computes in float")
        other = {"fp8": "int8", "int8": "fp8"}.get(want or "", None)
        if other and counts.get(other, 0):
            notes.append(f"target {self.name} but the module also quantizes {counts[other]} point(s) to {other}: "
                         f"the file holds both")
        if want == "int8":
            figures["ort_cpu"] = ort_fusion(figures["path"])
        if notes:
            figures["notes"] = notes
        return figures

    @property
    def opset(self) -> int:
        """The ONNX opset the file is written at: the profile's, else 23 (the fused Attention op)."""
        from ._lowering import OPSET

        return self.profile.onnx_opset or OPSET

    def graph_checks(self, path: str | os.PathLike) -> dict[str, Any]:
        """ORT's optimized graph against the profile's graph requirements (INT8: the fused kernels)."""
        if self.quantized != "int8":
            return {}
        fusion = ort_fusion(path)
        checks = [{"requirement": r, "met": bool(_INT8_CHECKS[r](fusion))}
                  for r in self.profile.graph_requirements if r in _INT8_CHECKS]
        return {"ort_cpu": fusion, "graph_requirements": checks,
                "graph_requirements_met": all(c["met"] for c in checks)}

    def verify(self, path: str | os.PathLike, module: Any, inputs: Any, *, original: Any = None,
               **kw: Any) -> dict[str, Any]:
        """``targets/onnx.verify_onnx`` (checker, ORT vs torch, batch 1) plus ``graph_checks``."""
        from ._ort_checks import verify_onnx

        figures = verify_onnx(path, module, inputs, original=original, **kw)
        figures["target"] = self.name
        figures.update(self.graph_checks(path))
        return figures

    def compare(self, path: str | os.PathLike, baseline: str | os.PathLike) -> dict[str, Any]:
        """INT8: the fused kernels ORT makes of the original are still made of the file (``fusions_kept``)."""
        return {"ort_fusions": fusions_kept(path, baseline)} if self.quantized == "int8" else {}

    def baseline(self, original: Any, example_inputs: Any, path: str | os.PathLike) -> None:
        """The original through the same exporter and clean-up as ``lower`` (fp32, no quantization)."""
        from .onnx import export_onnx

        export_onnx(original, example_inputs, path, original=original, opset=self.opset)

    def runner(self, path: str | os.PathLike, inputs: Any, *, threads: int = 2) -> Callable[[], Any]:
        """An ORT CPU session with ``threads`` intra-op threads and intra-op spinning off (a spinning
        session would take the cores from the next one when files are timed round robin)."""
        from ._ort_session import feeds_for, session

        sess = session(path, threads=threads, spinning=False)
        feeds = feeds_for(sess, inputs)
        return lambda: sess.run(None, feeds)

    def open(self, path: str | os.PathLike) -> Callable[..., Any]:
        """An ORT CPU session with the deploy session config (``targets/onnx.session``), as a callable
        on torch inputs returning ``{output name: tensor}`` in the file's output order."""
        import torch

        from ._ort_session import run_ort, session

        sess = session(path)
        names = [o.name for o in sess.get_outputs()]

        def run(*args: Any, **kwargs: Any) -> dict[str, Any]:
            outs = run_ort(sess, kwargs if kwargs else tuple(args))
            return {n: torch.from_numpy(o) for n, o in zip(names, outs)}

        return run

    def peak_memory(self, path: str | os.PathLike, inputs: Any, *, threads: int = 2) -> dict[str, Any] | None:
        """One ORT run's resident-set peak in a fresh process (``targets/onnx.peak_memory``)."""
        from ._ort_session import peak_memory

        return peak_memory(path, inputs, threads=threads)

    def time(self, path: str | os.PathLike, inputs: Any, *, runs: int = 20, threads: int = 2) -> dict[str, Any]:
        return {**super().time(path, inputs, runs=runs, threads=threads), "intra_op_spinning": False}


ONNX = OnnxTarget(
    name="onnx", format="onnx", runtime=_profile.ORT_CPU.runtime, profile=_profile.ORT_CPU,
    description="model.onnx as computed (fp32; Q/DQ where the passes quantized), any ONNX runtime",
    default_passes="attention-fp8")

ONNX_FP8 = OnnxTarget(
    name="onnx-fp8", format="onnx", runtime=_profile.ORT_CPU_FP8.runtime, profile=_profile.ORT_CPU_FP8,
    description="model.onnx with FP8 (E4M3FN) Q/DQ and FP8 weights; ORT with session.disable_quant_qdq=1, or an FP8 engine",
    default_passes="attention-fp8,linear-quant{dtype=fp8}", quantized="fp8")

ONNX_INT8 = OnnxTarget(
    name="onnx-int8", format="onnx", runtime=_profile.ORT_CPU_INT8.runtime, profile=_profile.ORT_CPU_INT8,
    description="model.onnx with INT8 weights and UINT8 activations that ORT CPU fuses into integer kernels",
    default_passes="linear-quant{dtype=int8}", quantized="int8")

ONNX_INT8_VNNI = OnnxTarget(
    name="onnx-int8-vnni", format="onnx", runtime=_profile.ORT_CPU_INT8_VNNI.runtime,
    profile=_profile.ORT_CPU_INT8_VNNI,
    description="onnx-int8 with 8-bit weights, for CPUs with AVX512-VNNI or AVX-VNNI (more accurate; not exact on AVX2-only CPUs)",
    default_passes="linear-quant{dtype=int8}", quantized="int8")
