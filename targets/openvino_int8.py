"""The ``openvino-int8`` target: ``OUTDIR/model.xml`` + ``model.bin`` (OpenVINO IR) for OpenVINO's
CPU plugin, with ``openvino_config.json`` (the compile properties it is served with) and a README.

Lowering: the module after the passes is exported to ONNX as for the ONNX targets (static INT8 Q/DQ:
symmetric per-channel int8 weights, a calibrated per-tensor activation scale), then read by
``openvino.convert_model`` and written as IR (``save_model``, weights kept fp32 where they are
float). OpenVINO turns each activation QuantizeLinear → DequantizeLinear pair into a FakeQuantize and
each DequantizeLinear of an int8 weight into a compressed weight; its low-precision transformations
then run the layer as an int8 FullyConnected (brgemm, VNNI / AMX) with the bias folded in. A layer on
the weight-only rung (``int8-weight``: DequantizeLinear of its int8 weight → MatMul, no activation
Q/DQ) becomes a FullyConnected with a compressed i8 weight, dequantized in the kernel. A *dynamic*
quantization (DynamicQuantizeLinear + MatMulInteger, what onnx-int8 writes) is not turned into int8
there, so the profile's ladder is static → weight-only → keep. IR rather than the Q/DQ ONNX file:
the two compile to the same runtime graph (same int8 layers, latency within noise, docs/openvino.md),
IR loads without the ONNX frontend and is what OpenVINO's model server reads.

Verification runs the IR in OpenVINO with the precision hint it is served with (``bf16`` on CPUs
with bf16 arithmetic, else ``f32``: ``targets/_openvino_runtime.py``), against the torch module and
the original; the figures also say how many layers the plugin runs in int8 and with compressed int8
weights (its runtime model's execution precisions and input types). ``openvino`` is the optional
extra ``surgeon[openvino]``, imported on first use.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from surgeon import profile as _profile

from ._base import Target, max_abs_diff, quantized_dtypes
from ._openvino_runtime import (
    CONFIG_FILE,
    compile_file,
    deploy_config,
    feeds_for,
    infer,
    int8_layers,
    read_config,
    require_openvino,
)

__all__ = ["OpenVINOTarget", "OPENVINO_INT8", "save_ir"]


def save_ir(onnx_path: str | os.PathLike, xml_path: str | os.PathLike, config: dict[str, str]) -> None:
    """``onnx_path`` converted to OpenVINO IR at ``xml_path`` (``.bin`` beside it), with the deploy
    ``config`` written beside it as ``openvino_config.json``. fp32 constants stay fp32 (save_model's
    default would halve them to fp16: a rounding the verification would have to absorb)."""
    ov = require_openvino()
    xml = Path(xml_path)
    model = ov.convert_model(str(onnx_path))
    ov.save_model(model, str(xml), compress_to_fp16=False)
    (xml.parent / CONFIG_FILE).write_text(json.dumps(
        {"compile_properties": config, "device": "CPU",
         "why": "the inference precision the file was verified with; serve it with the same"}, indent=2) + "\n",
        encoding="utf-8")


WEIGHT_RUNG = "int8-weight"  # linear-quant's weight-only INT8 rung (the profile's ladder names it)


def _int8_linears(module: Any, *, weight_only: bool = False) -> int:
    """Linear / matmul layers of ``module`` that compute with an INT8 weight and activation (the passes'
    ``QuantLinear`` on an int8 rung, rolled-back ones left out): each should be an int8 layer in OpenVINO;
    ``weight_only``: those on the weight-only rung instead, each a weight-compressed layer there."""
    import torch

    return sum(1 for _, m in module.named_modules()
               if type(m).__name__ == "QuantLinear" and getattr(m, "active", True)
               and getattr(m, "dtype", None) == "int8" and isinstance(getattr(m, "qweight", None), torch.Tensor)
               and (getattr(m, "rung", None) == WEIGHT_RUNG) == weight_only)


def _torch_outputs(module: Any, inputs: Any) -> list[Any]:
    import torch

    from surgeon.inputs import call, tensors_of

    with torch.no_grad():
        out = call(module, inputs)
    return [t.detach().float().cpu().numpy() for t in tensors_of(out)]


def _quantile_abs(a: list[Any], b: list[Any], q: float) -> float:
    """Quantile of |a − b| over all output elements (the bulk; the max shows single rounding flips)."""
    import numpy as np

    diffs = [np.abs(x.astype(np.float64) - y.astype(np.float64)).ravel() for x, y in zip(a, b) if x.size]
    return float(np.quantile(np.concatenate(diffs), q)) if diffs else 0.0


def _ir_bytes(xml: Path) -> int:
    return xml.stat().st_size + (xml.with_suffix(".bin").stat().st_size if xml.with_suffix(".bin").exists() else 0)


@dataclass(frozen=True)
class OpenVINOTarget(Target):
    """``OUTDIR/model.xml`` (+ ``.bin``): OpenVINO IR from surgeon's Q/DQ ONNX, verified in OpenVINO."""

    def require_runtime(self) -> None:
        """Without ``openvino``: one line naming the extra (``pip install 'surgeon[openvino]'``)."""
        require_openvino()

    def lower(self, module: Any, example_inputs: Any, outdir: str | os.PathLike, *, original: Any = None,
              verify_inputs: Any = None, filename: str | None = None, **kw: Any) -> dict[str, Any]:
        """Export to ONNX, convert and write the IR, its deploy config and README; verify it in OpenVINO."""
        require_openvino()  # before the export: without the extra, one line naming it
        from ._openvino_readme import write_readme
        from .onnx import export_onnx

        out = Path(outdir)
        out.mkdir(parents=True, exist_ok=True)
        name = filename or self.filename
        config = deploy_config()
        with tempfile.TemporaryDirectory(dir=out, prefix=".ov-") as tmp:
            onnx_path = Path(tmp) / "model.onnx"
            export_onnx(module, example_inputs, onnx_path, original=original, opset=self.opset)
            staged = Path(tmp) / "ir"
            staged.mkdir()
            save_ir(onnx_path, staged / name, config)
            vin = verify_inputs if verify_inputs is not None else example_inputs
            figures = self.verify(staged / name, module, vin, original=original)
            for f in staged.iterdir():  # verified: placed (a reader never sees a partial IR)
                os.replace(f, out / f.name)
        xml = out / name
        figures.update(path=str(xml), file=xml.name, quantized=quantized_dtypes(module),
                       readme=write_readme(xml, config))
        if self.quantized and figures["quantized"].get(self.quantized, 0) == 0:
            figures["notes"] = [f"target {self.name} but the module has no {self.quantized} quantization: the "
                                "file computes in float"]
        return figures

    @property
    def opset(self) -> int:
        from ._lowering import OPSET

        return self.profile.onnx_opset or OPSET

    def verify(self, path: str | os.PathLike, module: Any, inputs: Any, *, original: Any = None,
               **kw: Any) -> dict[str, Any]:
        """The IR in OpenVINO (with its deploy config) against ``module`` and ``original`` on ``inputs``:
        max / 99.9th-percentile abs diff, cosines, bytes, and the layers the plugin runs in int8."""
        import numpy as np

        from ._ort_checks import cosine_by_output

        xml = Path(path)
        config = read_config(xml)
        compiled = compile_file(xml, config=config)
        got = [o.astype(np.float32) for o in infer(compiled, feeds_for(compiled, inputs))
               if np.issubdtype(o.dtype, np.floating)]
        ref = _torch_outputs(module, inputs)
        figures: dict[str, Any] = {
            "target": self.name, "runtime": self.runtime, "file": xml.name, "bytes": _ir_bytes(xml),
            "compile_properties": config, "session_config": config,
            "max_abs_diff": max_abs_diff(got, ref, "the OpenVINO file"),
            "p999_abs_diff": _quantile_abs(got, ref, 0.999),
            "inputs": [{"name": i.get_any_name(), "shape": str(i.get_partial_shape())} for i in compiled.inputs],
            "openvino_cpu": int8_layers(compiled),
        }
        if original is not None:
            from surgeon.metrics import cosine_per_sample

            orig = _torch_outputs(original, inputs)
            cos = cosine_per_sample(got, orig, inputs)
            figures["cosine_min"], figures["cosine_mean"] = float(cos.min()), float(cos.mean())
            names = [o.get_any_name() for o in compiled.outputs]
            figures["cosine_by_output"] = cosine_by_output(names, got, orig, inputs)
        if self.quantized == "int8":
            ov_cpu = figures["openvino_cpu"]
            linears, weight_only = _int8_linears(module), _int8_linears(module, weight_only=True)
            ov_cpu["int8_linears_in_module"], ov_cpu["int8_weight_linears_in_module"] = linears, weight_only
            met = {_profile.OPENVINO_INT8_FC: linears + weight_only > 0 and ov_cpu["int8"] >= linears,
                   _profile.OPENVINO_INT8_WEIGHT_FC: ov_cpu["int8_weight"] >= weight_only}
            figures["graph_requirements"] = [{"requirement": r, "met": met.get(r, False)}
                                             for r in self.profile.graph_requirements]
            figures["graph_requirements_met"] = all(r["met"] for r in figures["graph_requirements"])
        return figures

    def baseline(self, original: Any, example_inputs: Any, path: str | os.PathLike) -> None:
        """The original through the same exporter and converter (fp32), with the same deploy config."""
        from .onnx import export_onnx

        dest = Path(path)
        with tempfile.TemporaryDirectory() as tmp:
            export_onnx(original, example_inputs, Path(tmp) / "original.onnx", original=original, opset=self.opset)
            save_ir(Path(tmp) / "original.onnx", Path(tmp) / dest.name, deploy_config())
            for f in Path(tmp).iterdir():
                if f.suffix != ".onnx":
                    shutil.move(str(f), dest.parent / f.name)

    def runner(self, path: str | os.PathLike, inputs: Any, *, threads: int = 2) -> Callable[[], Any]:
        """One infer request of the file compiled with its deploy config, ``threads`` threads, one stream."""
        compiled = compile_file(path, threads=threads)
        feeds = feeds_for(compiled, inputs)
        request = compiled.create_infer_request()
        return lambda: request.infer(feeds)

    def open(self, path: str | os.PathLike) -> Callable[..., Any]:
        """The file compiled with its deploy config, as a callable on torch inputs returning
        ``{output name: tensor}`` in the file's output order."""
        import torch

        compiled = compile_file(path)
        names = [o.get_any_name() for o in compiled.outputs]
        request = compiled.create_infer_request()

        def run(*args: Any, **kwargs: Any) -> dict[str, Any]:
            outs = infer(compiled, feeds_for(compiled, kwargs if kwargs else tuple(args)), request)
            return {n: torch.from_numpy(o) for n, o in zip(names, outs)}

        return run


OPENVINO_INT8 = OpenVINOTarget(
    name="openvino-int8", format="openvino-ir", runtime=_profile.OPENVINO_CPU_INT8.runtime,
    profile=_profile.OPENVINO_CPU_INT8, filename="model.xml",
    description="model.xml/.bin (OpenVINO IR) with static INT8 linears OpenVINO's CPU plugin runs as int8 "
                "kernels; bf16 elsewhere where the CPU has it (pip install 'surgeon[openvino]')",
    default_passes="linear-quant{dtype=int8}", quantized="int8")
