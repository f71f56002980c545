"""ONNX targets: ``onnx`` (as computed), ``onnx-fp8`` and ``onnx-int8`` (standard Q/DQ only).

The exporter lowers, it never rewrites: ``torch.onnx.export(dynamo=True)`` of the graph's export form
(``targets/_export_form.py``: the same computation in forms torch.onnx lowers) with a translation table
(``targets/_lowering.py``) that turns surgeon's quantize/dequantize custom ops into ``QuantizeLinear``
/ ``DequantizeLinear`` (opset 21). Whatever the passes stored quantized (FP8 / INT8 buffers feeding a
dequantize) lands in the file as an FP8 / INT8 initializer, so the file shrinks. The clean-ups follow
the export as onnxscript rewrite rules (``targets/_cleanup/``), their counts in the figures.

Every file written is verified before it replaces anything:

1. ``onnx.checker.check_model(full_check=True)`` (types and shapes inferred through the graph);
2. an onnxruntime CPU session (for FP8 files with ``session.disable_quant_qdq = 1``: ORT ≥ 1.31 on
   CPU otherwise fuses FP8 Q/DQ → MatMul into an integer kernel that rejects float8 inputs);
3. ORT outputs compared with the torch module exported (max abs diff) and with the original model
   (cosine per sample);
4. the file run where it claims dynamic axes, against the torch module: batch 1 and 3, and each other
   symbolic size at three quarters (``shape_probes``). An axis the model or the file cannot take there
   is exported again as static (every axis, once the batch fails), so no file claims a dynamic axis it
   cannot run at; ``shape_check`` in the figures says what was fixed and why.

The file (and its external data past ~1.8 GB, ``targets/_external_data.py``) is written under a
temporary directory in the output directory and renamed over ``model.onnx`` only once all of that
holds, so a crash never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import fx, nn

from surgeon.capture import auto_dynamic_shapes
from surgeon.errors import SurgeonError, first_line
from surgeon.inputs import Inputs, as_args_kwargs, call

from ._cleanup import all_nodes, clean
from ._export_form import export_form
from ._external_data import placed_onnx, save_onnx
from ._lowering import OPSET, fold_four_bit_casts, translation_table
from ._ort_checks import fp32_bytes, shape_probes, static_axes, verify_onnx
from ._ort_session import DENORMAL_AS_ZERO, FP8_DISABLED_OPTIMIZERS, FP8_SESSION_OPTION, needs_fp8_option, session, session_config

IR_VERSION = 11  # onnxruntime 1.31 refuses IR 14 (what onnx.helper writes by default); 11 = the opset-23 era

# the checks and session options live in their own modules; importable from here, where docs/deploy.md points
__all__ = ["export_onnx", "verify_onnx", "session", "session_config", "DENORMAL_AS_ZERO",
           "needs_fp8_option", "fp32_bytes", "IR_VERSION", "FP8_SESSION_OPTION",
           "FP8_DISABLED_OPTIMIZERS"]


# ------------------------------------------------------------------------------------------------
# names and dynamic shapes
# ------------------------------------------------------------------------------------------------
def _forward_params(module: Any) -> list[str]:
    fn = module.forward if isinstance(module, nn.Module) else None
    if fn is None:
        return []
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def input_names_of(module: Any, inputs: Inputs) -> list[str]:
    """Names the ONNX inputs get: the keyword names, else the forward's parameter names."""
    args, kwargs = as_args_kwargs(inputs)
    params = _forward_params(module)
    names = [params[i] if i < len(params) else f"input_{i}" for i in range(len(args))]
    names += [k for k, v in kwargs.items()]
    return names


def _output_names(module: Any, inputs: Inputs, n_outputs: int) -> list[str] | None:
    """The original's output names (ModelOutput / dict keys) when they map 1:1 onto ONNX outputs."""
    try:
        with torch.no_grad():
            out = call(module, inputs)
    except Exception:  # noqa: BLE001 - names are cosmetic
        return None
    if hasattr(out, "keys") and callable(out.keys):
        names = [k for k, v in out.items() if isinstance(v, torch.Tensor)]
        if len(names) == n_outputs and all(isinstance(v, torch.Tensor) for v in out.values()):
            return names
        return None
    if isinstance(out, torch.Tensor):
        return ["output"] if n_outputs == 1 else None
    return None


def _rename_dims(model: Any, inputs: Inputs, names: Sequence[str]) -> None:
    """Name symbolic dims ``batch`` (axis 0) and, for 2-d integer inputs (tokens), ``sequence``.

    torch.export gives each input its own symbol (``s72``, ``s43``) even where the model needs them
    equal; a server reads ``batch`` / ``sequence`` more easily and ORT treats names as documentation."""
    args, kwargs = as_args_kwargs(inputs)
    values = list(args) + list(kwargs.values())
    mapping: dict[str, str] = {}
    for vi, name in zip(model.graph.input, names):
        idx = list(names).index(name)
        v = values[idx] if idx < len(values) else None
        token_like = isinstance(v, torch.Tensor) and v.dim() == 2 and not v.is_floating_point()
        for axis, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.dim_param and d.dim_param not in mapping:
                mapping[d.dim_param] = "batch" if axis == 0 else ("sequence" if token_like and axis == 1 else d.dim_param)
    if not mapping:
        return

    def fix(value_infos: Any) -> None:
        for vi in value_infos:
            if not vi.type.HasField("tensor_type"):
                continue
            for d in vi.type.tensor_type.shape.dim:
                if d.dim_param in mapping:
                    d.dim_param = mapping[d.dim_param]

    fix(model.graph.input)
    fix(model.graph.output)
    fix(model.graph.value_info)


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------
_OP_RE = re.compile(r"No ONNX function found for <OpOverload\(op='([^']+)', overload='([^']+)'\)>")


def _module_of_op(module: Any, inputs: Inputs, op: str) -> str | None:
    """Module path (``nn_module_stack``) of the first node calling aten/custom op ``op``."""
    gm = module if isinstance(module, fx.GraphModule) else None
    if gm is None and isinstance(module, nn.Module):
        args, kwargs = as_args_kwargs(inputs)
        try:
            gm = torch.export.export(module, args, kwargs or None, strict=False).graph_module
        except Exception:  # noqa: BLE001
            return None
    if gm is None:
        return None
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        name = getattr(target, "name", None)
        full = name() if callable(name) else str(target)
        if full.replace("::", ".").startswith(op):
            stack = node.meta.get("nn_module_stack") or {}
            if stack:
                path = list(stack.values())[-1][0]
                return re.sub(r"^L\['self'\]\.?", "", str(path)).replace("._modules['", ".").replace("']", "") or "<root>"
            return "<root>"
    return None


def _conversion_error(exc: BaseException, module: Any, inputs: Inputs) -> SurgeonError | None:
    chain, seen = [], set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(str(e))
        e = e.__cause__ or e.__context__
    text = "\n".join(chain)
    m = _OP_RE.search(text)
    if not m:
        return None
    op = m.group(1) if m.group(2) == "default" else f"{m.group(1)}.{m.group(2)}"
    where = _module_of_op(module, inputs, m.group(1))
    loc = f" in module '{where}'" if where else ""
    hint = _LOWERING_HINTS.get(m.group(1), "replace it, or register a translation for it")
    return SurgeonError(f"cannot export to ONNX: operator '{op}'{loc} has no ONNX lowering ({hint})")


# ONNX ops the exporter's optimizer (onnxscript constant folding) can fail on → the aten ops that
# produce them, to name the module in the one-line error.
_FOLD_RE = re.compile(r"Error during constant folding for node '([^']*)' \(([^:)]*)::(\w+)\)")
_ONNX_OP_SOURCES = {"SplitToSequence": ("aten.chunk", "aten.split", "aten.unbind", "aten.tensor_split")}


def _optimizer_error(exc: BaseException, module: Any, inputs: Inputs) -> SurgeonError | None:
    """A failure inside the exporter's ONNX optimizer, as one line naming the ONNX op and the module."""
    text, e, seen = [], exc, set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        text.append(str(e))
        e = e.__cause__ or e.__context__
    m = _FOLD_RE.search("\n".join(text))
    if not m:
        return None
    op = m.group(3)
    where = next((w for src in _ONNX_OP_SOURCES.get(op, ()) if (w := _module_of_op(module, inputs, src))), None)
    loc = f" in module '{where}'" if where else ""
    return SurgeonError(f"cannot export to ONNX: the exporter's optimizer fails on {op} (node '{m.group(1)}'){loc}: "
                        f"{first_line(exc.__cause__ or exc)}")


def _refuse_number_outputs(module: Any) -> None:
    """Refuse, in one line, a graph that returns a Python number as one of its outputs.

    An ONNX graph's outputs are tensors that nodes compute; the exporter fails on a constant number
    with ``AttributeError: 'float' object has no attribute 'name'`` (a ``ConversionError``). FrEIA's
    ``NICECouplingBlock`` returns its log-Jacobian determinant as the number 0.0 (additive coupling
    preserves volume), and a flow that sums the blocks' determinants returns that number."""
    import torch.utils._pytree as pytree

    gm = module if isinstance(module, fx.GraphModule) else None
    out = next((n for n in gm.graph.nodes if n.op == "output"), None) if gm is not None else None
    if out is None:
        return
    leaves = pytree.tree_leaves(out.args[0])
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, (int, float, bool)) and not isinstance(leaf, fx.Node):
            raise SurgeonError(f"cannot export to ONNX: output {i} of the model is the Python number {leaf!r}, "
                               f"not a tensor computed from its inputs (no operation or module produces it; "
                               f"FrEIA's NICECouplingBlock, e.g., returns its log-Jacobian determinant as 0.0): "
                               f"return a tensor there (torch.zeros(batch) for a constant log-determinant), "
                               f"or drop that output")


# Ops a surgeon pass removes where the model allows it: the message names the pass.
_LOWERING_HINTS = {
    "aten._linalg_slogdet": "a log-determinant of a constant weight is folded to a constant by the "
                            "flow-fold pass: add it with --passes flow-fold,…",
}


@contextlib.contextmanager
def _quiet() -> Any:
    """The dynamo exporter prints progress lines and torchvision warnings: keep the CLI clean."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def export_onnx(module_or_ep: Any, example_inputs: Inputs, path: str | os.PathLike, *,
                dynamic_shapes: Any = "auto", input_names: Sequence[str] | None = None,
                output_names: Sequence[str] | None = None, opset: int = OPSET,
                original: nn.Module | None = None, cleanup: bool = True,
                cleanups: dict[str, int] | None = None) -> Path:
    """Export ``module_or_ep`` (nn.Module / GraphModule / ExportedProgram) to ``path`` (with
    ``path.data`` beside it past ``_external_data.EXTERNAL_DATA_THRESHOLD``).

    ``dynamic_shapes="auto"`` marks every input dim ``Dim.AUTO`` (batch and sequence stay dynamic
    where the model allows); ``None`` exports static shapes. Inputs keep the original's names
    (``input_names`` or the forward's parameter names); outputs take the original's ModelOutput keys
    when they map 1:1. Surgeon's Q/DQ custom ops lower to standard QuantizeLinear/DequantizeLinear.
    ``cleanup=False`` keeps the graph as the exporter wrote it (the softmax NaN guards of
    ``targets/_cleanup/`` stay), e.g. for a baseline that surgeon did not touch; ``cleanups``, when
    given, receives how many times each clean-up rule applied.
    Raises ``SurgeonError`` naming the operator and its module when an op has no ONNX lowering."""
    path = Path(path)
    is_ep = isinstance(module_or_ep, torch.export.ExportedProgram)
    if isinstance(module_or_ep, nn.Module) and not isinstance(module_or_ep, fx.GraphModule):
        module_or_ep.eval()  # (an exported program's module refuses eval(): it is already frozen)
    args, kwargs = as_args_kwargs(example_inputs)
    _refuse_number_outputs(module_or_ep)
    names = list(input_names) if input_names else input_names_of(original or module_or_ep, example_inputs)
    ds = None
    if not is_ep and dynamic_shapes is not None:
        ds = (auto_dynamic_shapes(module_or_ep, example_inputs) if isinstance(dynamic_shapes, str)
              else dynamic_shapes)
    try:
        with _quiet(), export_form(module_or_ep):
            prog = torch.onnx.export(
                module_or_ep, () if is_ep else args, kwargs=None if is_ep else (kwargs or None),
                dynamo=True, opset_version=opset, dynamic_shapes=ds, external_data=False,
                custom_translation_table=translation_table(), optimize=False, verbose=False)
            _optimize(prog.model)
    except SurgeonError:
        raise
    except Exception as exc:  # noqa: BLE001 - translated to a one-line user error where we can
        err = _conversion_error(exc, module_or_ep, example_inputs) or _optimizer_error(exc, module_or_ep, example_inputs)
        if err is not None:
            raise err from exc
        raise
    if cleanup:  # exact rewrites for ORT's CPU kernels (targets/_cleanup/), on the exporter's IR
        counts = clean(prog.model)
        if cleanups is not None:
            cleanups.update(counts)
    model = prog.model_proto
    model.ir_version = min(model.ir_version, IR_VERSION if opset >= 23 else 10)  # 10: the opset-21 era
    _strip_node_metadata(model)
    graph_inputs = list(model.graph.input)
    if len(names) == len(graph_inputs):
        old_to_new = {vi.name: n for vi, n in zip(graph_inputs, names)}
        _rename_values(model, old_to_new)
        _rename_dims(model, example_inputs, names)
    outs = list(output_names) if output_names else _output_names(original or module_or_ep, example_inputs,
                                                                  len(model.graph.output)) if not is_ep else None
    if outs and len(outs) == len(model.graph.output) and len(set(outs)) == len(outs):
        taken = {vi.name for vi in model.graph.input} | {i.name for i in model.graph.initializer}
        if not (set(outs) & taken):
            _rename_values(model, {vi.name: n for vi, n in zip(model.graph.output, outs)})
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_onnx(model, path)  # past ~1.8 GB of tensors with its data beside it (targets/_external_data.py)


def _optimize(model: Any) -> None:
    """What ``torch.onnx.export(optimize=True)`` does (constant folding, dead code, common sub-expressions) without
    onnxscript's opset-23 fusions: its RotaryEmbedding rule fuses a cos/sin cache of batch 1 (HF Llama's position_ids)
    that ONNX Runtime refuses at any other batch size; then int4 weights as 4-bit initializers (targets/_lowering.py)."""
    import onnxscript.optimizer

    onnxscript.optimizer.optimize_ir(model)
    fold_four_bit_casts(model)


def _strip_node_metadata(model: Any) -> None:
    # The exporter attaches stack traces and module names to every node: for a small model they are
    # most of the file, and they carry nothing a runtime uses.
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        del vi.metadata_props[:]


def _rename_values(model: Any, mapping: dict[str, str]) -> None:
    mapping = {k: v for k, v in mapping.items() if k != v}
    if not mapping:
        return
    g = model.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.name in mapping:
            vi.name = mapping[vi.name]
    for node in all_nodes(g):  # an If branch reads outer values by name too
        for i, n in enumerate(node.input):
            if n in mapping:
                node.input[i] = mapping[n]
        for i, n in enumerate(node.output):
            if n in mapping:
                node.output[i] = mapping[n]


def write_onnx(module: Any, example_inputs: Inputs, outdir: str | os.PathLike, *, filename: str = "model.onnx",
               original: nn.Module | None = None, original_inputs: Inputs | None = None,
               verify_inputs: Inputs | None = None, input_names: Sequence[str] | None = None,
               fp32_size: int | None = None, tolerance: float | None = None, opset: int = OPSET) -> dict[str, Any]:
    """Export, verify and atomically place ``OUTDIR/model.onnx``; return the verification figures.

    ``tolerance`` (max abs diff ORT vs torch module), when given, must hold or nothing is written."""
    cleanups: dict[str, int] = {}
    with placed_onnx(outdir, filename) as tmp:
        export_onnx(module, example_inputs, tmp, input_names=input_names, original=original, opset=opset,
                    cleanups=cleanups)
        vin = verify_inputs if verify_inputs is not None else example_inputs
        figures = verify_onnx(tmp, module, vin, original=original, original_inputs=original_inputs,
                              fp32_size=fp32_size, check_batch=False)
        probes, static = shape_probes(tmp, module, vin, figures["max_abs_diff"])
        fixed, everything = list(static), False
        while static:
            # the file claims an axis it cannot run at: written again with the failing axes fixed (every
            # axis once the batch one fails, or where fixing those was not enough), so that its inputs
            # state what it takes
            # at the verified inputs' shape: the one the file is checked (and the verdict measured) at
            spec = None if everything else static_axes(tmp, module, vin, fixed)
            everything = spec is None
            export_onnx(module, vin, tmp, input_names=input_names, original=original, opset=opset,
                        dynamic_shapes=spec, cleanups=cleanups)
            figures = verify_onnx(tmp, module, vin, original=original, original_inputs=original_inputs,
                                  fp32_size=fp32_size, check_batch=False)
            again, static = ([], []) if everything else shape_probes(tmp, module, vin, figures["max_abs_diff"])
            probes += [{**p, "file": "exported again with the failing axes static"} for p in again]
            everything = everything or bool(static)
        figures["shape_check"] = {
            "probes": probes,
            "static_axes": ["all"] if everything else [f"{name}:{axis}" for name, axis in fixed],
            "note": ("the file takes only the input shapes it was exported with: "
                     + "; ".join(f"{i['name']} {i['shape']}" for i in figures["inputs"])) if everything else
                    ("fixed at the exported size (the model or the file cannot take another): "
                     + ", ".join(f"{n} axis {a}" for n, a in fixed)) if fixed else
                    "every dynamic axis ran at a size it was not exported with, matching torch"}
        one = next((p for p in figures["shape_check"]["probes"] if p.get("batch") == 1 and "max_abs_diff" in p), None)
        if one is not None:
            figures["batch1_max_abs_diff"] = one["max_abs_diff"]
        if tolerance is not None and figures["max_abs_diff"] > tolerance:
            raise SurgeonError(f"ONNX file differs from the torch module by {figures['max_abs_diff']:.3g} "
                               f"(tolerance {tolerance:g}); nothing written")
    final = Path(outdir) / filename
    figures["cleanups"] = cleanups
    figures["file"] = final.name
    figures["path"] = str(final)
    return figures
