"""ONNX targets: ``onnx`` (as computed), ``onnx-fp8`` and ``onnx-int8`` (standard Q/DQ only).

The exporter lowers, it never rewrites: ``torch.onnx.export(dynamo=True)`` with a translation table
(``targets/_lowering.py``) that turns surgeon's quantize/dequantize custom ops into ``QuantizeLinear``
/ ``DequantizeLinear`` (opset 21). Whatever the passes stored quantized (FP8 / INT8 buffers feeding a
dequantize) lands in the file as an FP8 / INT8 initializer, so the file shrinks. One clean-up follows
the export: the exporter's NaN guard after a softmax whose mask fill is finite, where it can never
fire on finite inputs (``targets/_cleanup/``).

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

The file is written to a temporary name in the output directory and renamed over ``model.onnx``
only once all of that holds, so a crash never leaves a half-written file behind.
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

import numpy as np
import torch
from torch import fx, nn

from surgeon.capture import auto_dynamic_shapes
from surgeon.errors import SurgeonError, first_line
from surgeon.inputs import Inputs, as_args_kwargs, call, tensors_of
from surgeon.resources import placed_file

from ._cleanup import all_nodes, clean
from ._lowering import OPSET, translation_table
from ._manual_attention import fuse_manual_attention

IR_VERSION = 11  # onnxruntime 1.31 refuses IR 14 (what onnx.helper writes by default); 11 = the opset-23 era
FP8_SESSION_OPTION = ("session.disable_quant_qdq", "1")
# ORT's (1.31, 1.32) level-2 rule ReluQuantRewrite drops a Relu feeding a QuantizeLinear whose zero point is
# the bottom of the quantized range; for FLOAT8E4M3FN (signed) that is false, Q(relu(x)) != Q(x) for
# x < 0, so FP8 files are opened with it off (docs/deploy.md, found by the fuzzer).
FP8_DISABLED_OPTIMIZERS = ("ReluQuantRewrite",)
# Flush-to-zero / denormals-are-zero on ORT's threads. A masked attention score (mask fill -inf or
# finfo.min) reaches MLAS's exp clamped at -103.97, whose result 7e-46 is a denormal: x86 handles
# denormals in microcode, and MiniLM's softmax over padded keys ran 4x slower (1.0 vs 4.3 ns an element,
# [4, 12, 512, 512], one thread), its P·V product likewise. With FTZ/DAZ those probabilities are 0, as
# torch computes them; every value that changes is below 1.2e-38.
DENORMAL_AS_ZERO = ("session.set_denormal_as_zero", "1")

__all__ = ["export_onnx", "verify_onnx", "session", "session_config", "DENORMAL_AS_ZERO", "has_fp8",
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
_TARGET_RE = re.compile(r"target=([\w.:]+)\]?\(")


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


@contextlib.contextmanager
def _export_form(module: Any) -> Any:
    """The graph the exporter is handed, for the duration of the export (the module's own graph is put
    back after): the rewrites below, each the same computation in a form torch.onnx lowers (well).

    Each ``aten.chunk`` of a GraphModule becomes one ``aten.slice`` per chunk used.

    A GraphModule captured by torch.export keeps ``chunk`` (``x.chunk(2, -1)`` of a coupling flow); the
    ONNX exporter lowers it to a ``SplitToSequence`` without sizes that onnxscript's constant folding
    cannot fold (``AttributeError`` inside ``FoldConstantsPass``: ``optimize --target onnx`` died there).
    Chunk ``i`` is ``x[..., i·step:(i+1)·step]`` with ``step = ceil(size / chunks)`` (torch.chunk's
    definition; ``slice`` clamps the last one), the size symbolic where the dimension is dynamic.

    Each ``aten.view`` / ``aten.reshape`` of a transposed / permuted tensor reads a contiguous copy of
    it (``aten.clone``, an ``Identity`` in ONNX): the capture saw ``scaled_dot_product_attention``'s CPU
    output in a [b, t, h, d] layout, so the transpose back was contiguous and a reshape of it a view;
    the exporter's own decomposition of that op writes [b, h, t, d], and the same view of its
    transpose fails (T5's attention output, reshaped to [b, t, h·d], stopped ``--target onnx`` there).
    For the same reason each ``aten.contiguous`` is a ``clone`` (a copy in every trace, not only where
    the tracer's strides say so). An SDPA whose keys and values have one head broadcast over the
    queries' (multi-query attention: Falcon) gets ``enable_gqa=True``, the same computation, which the
    exporter's ``Attention`` lowering takes (it asserts equal head counts otherwise). Hand-written
    attention becomes SDPA (``targets/_manual_attention.py``)."""
    import copy
    import operator

    gm = module if isinstance(module, fx.GraphModule) else None
    nodes = list(gm.graph.nodes) if gm is not None else []
    chunks = [n for n in nodes if n.op == "call_function" and n.target is torch.ops.aten.chunk.default
              and n.users and all(u.target is operator.getitem for u in n.users)]
    def transposed_view(n: fx.Node) -> bool:
        return (n.op == "call_function" and n.target in (torch.ops.aten.view.default, torch.ops.aten.reshape.default)
                and isinstance(n.args[0], fx.Node)
                and n.args[0].target in (torch.ops.aten.transpose.int, torch.ops.aten.permute.default))

    views = [n for n in nodes if transposed_view(n) or n.target is torch.ops.aten.contiguous.default]
    def broadcast_kv(n: fx.Node) -> bool:
        """SDPA whose K/V have one head broadcast over Q's (multi-query attention, Falcon)."""
        if n.op != "call_function" or n.target is not torch.ops.aten.scaled_dot_product_attention.default:
            return False
        q, k = (getattr(a, "meta", {}).get("val") for a in n.args[:2])
        return (getattr(q, "ndim", 0) == 4 and getattr(k, "ndim", 0) == 4 and str(k.shape[1]) == "1"
                and str(q.shape[1]) != "1" and not n.kwargs.get("enable_gqa", False))

    def inferred_heads(n: fx.Node) -> list[tuple[fx.Node, int]]:
        """(view, heads) for each SDPA operand read as ``view(x, [b, t, -1, d]).transpose(1, 2)``
        (through copies) where the capture knows the head count."""
        if n.op != "call_function" or n.target is not torch.ops.aten.scaled_dot_product_attention.default:
            return []
        found = []
        for arg in n.args[:3]:
            heads = getattr(getattr(arg, "meta", {}).get("val"), "shape", [None, None])[1:2]
            cur = arg
            while isinstance(cur, fx.Node) and cur.target in (torch.ops.aten.clone.default,
                                                               torch.ops.aten.contiguous.default):
                cur = cur.args[0]
            if not (isinstance(cur, fx.Node) and cur.target is torch.ops.aten.transpose.int
                    and {d % 4 for d in cur.args[1:3] if isinstance(d, int)} == {1, 2}):
                continue
            view = cur.args[0]
            shape = view.args[1] if isinstance(view, fx.Node) and view.target in (
                torch.ops.aten.view.default, torch.ops.aten.reshape.default) and len(view.args) > 1 else None
            if isinstance(shape, (list, tuple)) and len(shape) == 4 and shape[2] == -1 and heads \
                    and isinstance(heads[0], int):
                found.append((view, int(heads[0])))
        return found

    # hand-written attention has a softmax; the analyzer (on the copy below) looks only where there is one
    manual = any(n.op == "call_function" and "softmax" in str(n.target) for n in nodes)
    mqa = [n for n in nodes if broadcast_kv(n)]
    heads = [vh for n in nodes for vh in inferred_heads(n)]
    if not chunks and not views and not manual and not mqa and not heads:
        yield
        return
    saved = gm.graph  # type: ignore[union-attr]
    work = copy.deepcopy(saved)  # nodes copied, meta shallow: cheap
    for view, count in [vh for n in work.nodes for vh in inferred_heads(n)]:
        # the head count, not -1: a model's heads are its weights' (the capture knows them), but the
        # exporter re-derives -1 from the other sizes. Where one of those is a constant the model ties
        # to an input dim only indirectly (Whisper's encoder: 100 positions = (frames − 1) // 2 + 1),
        # the query heads come out as ((frames − 1) // 2 + 1) // 25, the keys' as 4, and the exporter's
        # Attention lowering refuses the pair as unequal heads.
        shape = list(view.args[1])
        shape[2] = count
        view.args = (view.args[0], shape, *view.args[2:])
    for node in [n for n in work.nodes if broadcast_kv(n)]:
        # one K/V head broadcast over the query heads is grouped-query attention with one group: the
        # same computation, and the form the exporter's Attention op takes (it refuses broadcast heads)
        node.kwargs = {**node.kwargs, "enable_gqa": True}
    for node in [n for n in work.nodes if n.op == "call_function" and n.target is torch.ops.aten.contiguous.default]:
        # a copy only where the tracer sees non-contiguous strides; a clone copies in every trace
        node.target = torch.ops.aten.clone.default
        node.kwargs = {"memory_format": torch.contiguous_format}
    for node in [n for n in work.nodes if transposed_view(n)]:
        with work.inserting_before(node):
            dense = work.call_function(torch.ops.aten.clone.default, (node.args[0],),
                                       {"memory_format": torch.contiguous_format})
        dense.meta.update(node.args[0].meta)
        node.args = (dense, *node.args[1:])
    for node in [n for n in work.nodes if n.op == "call_function" and n.target is torch.ops.aten.chunk.default
                 and n.users and all(u.target is operator.getitem for u in n.users)]:
        src, count = node.args[0], int(node.args[1])
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        val = src.meta.get("val") if isinstance(src, fx.Node) else None
        static = isinstance(val, torch.Tensor) and isinstance(val.shape[dim], int)
        with work.inserting_before(node):
            if static:
                step: Any = -(-int(val.shape[dim]) // count)  # type: ignore[union-attr]
            else:
                size = work.call_function(torch.ops.aten.sym_size.int, (src, dim))
                step = work.call_function(operator.floordiv, (work.call_function(operator.add, (size, count - 1)), count))
            for user in list(node.users):
                i = int(user.args[1])
                if static:
                    lo, hi = step * i, step * (i + 1)
                else:
                    lo = work.call_function(operator.mul, (step, i))
                    hi = work.call_function(operator.mul, (step, i + 1))
                piece = work.call_function(torch.ops.aten.slice.Tensor, (src, dim, lo, hi))
                piece.meta.update(user.meta)
                user.replace_all_uses_with(piece)
                work.erase_node(user)
        work.erase_node(node)
    gm.graph = work  # type: ignore[union-attr]
    gm.recompile()  # type: ignore[union-attr]
    if manual:
        fuse_manual_attention(gm)  # type: ignore[arg-type]  # hand-written attention → SDPA → Attention op
    try:
        yield
    finally:
        gm.graph = saved  # type: ignore[union-attr]
        gm.recompile()  # type: ignore[union-attr]


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
    """Export ``module_or_ep`` (nn.Module / GraphModule / ExportedProgram) to ``path`` (one file).

    ``dynamic_shapes="auto"`` marks every input dim ``Dim.AUTO`` (batch and sequence stay dynamic
    where the model allows); ``None`` exports static shapes. Inputs keep the original's names
    (``input_names`` or the forward's parameter names); outputs take the original's ModelOutput keys
    when they map 1:1. Surgeon's Q/DQ custom ops lower to standard QuantizeLinear/DequantizeLinear.
    ``cleanup=False`` keeps the graph as the exporter wrote it (the softmax NaN guards of
    ``targets/_cleanup/`` stay), e.g. for a baseline that surgeon did not touch; ``cleanups``, when
    given, receives how many times each clean-up rule applied.
    Raises ``SurgeonError`` naming the operator and its module when an op has no ONNX lowering."""
    import onnx

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
        with _quiet(), _export_form(module_or_ep):
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
    onnx.save_model(model, str(path))
    return path


def _optimize(model: Any) -> None:
    """What ``torch.onnx.export(optimize=True)`` does (constant folding, dead code, common
    sub-expressions) without onnxscript's opset-23 fusions: its RotaryEmbedding rule fuses a cos/sin
    cache of batch 1 (HF Llama's position_ids) that ONNX Runtime's kernel refuses at any other batch
    size ("Inputs 'cos_cache' and 'sin_cache' are expected to have the same shape as input 'x'")."""
    import onnxscript.optimizer

    onnxscript.optimizer.optimize_ir(model)


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


# ------------------------------------------------------------------------------------------------
# verification
# ------------------------------------------------------------------------------------------------
def has_fp8(model_or_path: Any) -> bool:
    """Whether the ONNX model holds any FLOAT8 tensor (initializer or Q/DQ zero point)."""
    import onnx

    model = onnx.load(str(model_or_path)) if isinstance(model_or_path, (str, os.PathLike)) else model_or_path
    fp8 = {onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E4M3FNUZ, onnx.TensorProto.FLOAT8E5M2,
           onnx.TensorProto.FLOAT8E5M2FNUZ}
    for t in model.graph.initializer:
        if t.data_type in fp8:
            return True
    for node in model.graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type in fp8:
                return True
    return False


def needs_fp8_option(model_or_path: Any) -> bool:
    """Whether ORT must run the file with ``session.disable_quant_qdq = 1``: some QuantizeLinear
    produces FP8 (its zero point is a float8 tensor). ORT's CPU QDQ fusion turns FP8 Q/DQ around a
    MatMul into an integer kernel that rejects float8; weight-only FP8 (DequantizeLinear of an FP8
    initializer, e.g. an embedding table) is not fused and needs no flag — which matters, since the
    flag also switches off the INT8 fusion."""
    import onnx

    model = onnx.load(str(model_or_path)) if isinstance(model_or_path, (str, os.PathLike)) else model_or_path
    fp8 = {onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E4M3FNUZ, onnx.TensorProto.FLOAT8E5M2,
           onnx.TensorProto.FLOAT8E5M2FNUZ}
    fp8_values = {t.name for t in model.graph.initializer if t.data_type in fp8}
    for node in model.graph.node:
        if node.op_type == "Constant" and any(a.type == onnx.AttributeProto.TENSOR and a.t.data_type in fp8
                                              for a in node.attribute):
            fp8_values.update(node.output)
    return any(n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in fp8_values
               for n in model.graph.node)


def session_config(path: str | os.PathLike, *, fp8: bool | None = None) -> dict[str, str]:
    """The ORT session config entries surgeon runs ``path`` with, and a server should too: FTZ/DAZ
    (``DENORMAL_AS_ZERO``) always, ``session.disable_quant_qdq=1`` for a file with FP8 Q/DQ."""
    config = dict([DENORMAL_AS_ZERO])
    if fp8 if fp8 is not None else needs_fp8_option(path):
        config.update([FP8_SESSION_OPTION])
    return config


def session(path: str | os.PathLike, *, threads: int | None = None, fp8: bool | None = None,
            optimized_path: str | os.PathLike | None = None, optimize: bool = True,
            spinning: bool | None = None) -> Any:
    """An onnxruntime CPU session for ``path`` with ``session_config(path)`` (FTZ/DAZ; the FP8 option
    when the file needs it).

    ``spinning=False`` turns intra-op thread spinning off (``session.intra_op.allow_spinning=0``), as
    the targets' ``time()`` measures; ``None`` leaves ORT's default."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if spinning is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    use_fp8 = fp8 if fp8 is not None else needs_fp8_option(path)
    for key, value in session_config(path, fp8=use_fp8).items():
        so.add_session_config_entry(key, value)
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(FP8_DISABLED_OPTIMIZERS) if use_fp8 else None)


def feeds_for(sess: Any, inputs: Inputs) -> dict[str, np.ndarray]:
    args, kwargs = as_args_kwargs(inputs)
    names = [i.name for i in sess.get_inputs()]
    if kwargs and not args and all(isinstance(kwargs.get(n), torch.Tensor) for n in names):
        # keyword inputs by name: a tokenizer's dict need not list them in the forward's order
        return {n: kwargs[n].detach().cpu().numpy() for n in names}
    values = [v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor)]
    if len(names) != len(values):
        raise SurgeonError(f"the ONNX file has {len(names)} inputs but {len(values)} tensors were given")
    return {n: v.detach().cpu().numpy() for n, v in zip(names, values)}


def file_feeds(path: str | os.PathLike, inputs: Inputs) -> dict[str, np.ndarray]:
    """``feeds_for`` without a session: the file's graph inputs (those not initializers), in order."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    names = [i.name for i in graph.input if i.name not in initializers]
    args, kwargs = as_args_kwargs(inputs)
    values = [v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor)]
    if len(names) != len(values):
        raise SurgeonError(f"the ONNX file has {len(names)} inputs but {len(values)} tensors were given")
    return {n: v.detach().cpu().numpy() for n, v in zip(names, values)}


def peak_memory(path: str | os.PathLike, inputs: Inputs, *, threads: int = 2) -> dict[str, Any]:
    """Peak resident memory of one ORT run of ``path`` on ``inputs``, in a fresh process, with the
    session options surgeon runs it with (``targets/_ort_memory.py``)."""
    from ._ort_memory import peak_run_memory

    fp8 = needs_fp8_option(path)
    return peak_run_memory(path, file_feeds(path, inputs), threads=threads, config=session_config(path, fp8=fp8),
                           disabled_optimizers=FP8_DISABLED_OPTIMIZERS if fp8 else ())


def run_ort(sess: Any, inputs: Inputs) -> list[np.ndarray]:
    """Run ``sess`` on torch inputs (positional order = ONNX input order)."""
    return sess.run(None, feeds_for(sess, inputs))


def _torch_outputs(module: Any, inputs: Inputs) -> list[np.ndarray]:
    with torch.no_grad():
        out = call(module, inputs)
    return [t.detach().float().cpu().numpy() for t in tensors_of(out)]


def _float_outputs(outs: list[np.ndarray]) -> list[np.ndarray]:
    return [o.astype(np.float32) for o in outs if np.issubdtype(o.dtype, np.floating)]


def _max_abs(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    from ._base import max_abs_diff

    return max_abs_diff(a, b, "the ONNX file")


def _quantile_abs(a: list[np.ndarray], b: list[np.ndarray], q: float) -> float:
    """Quantile of |a − b| over all output elements. Quantized files differ from torch in isolated
    elements: a float difference of 1 ulp upstream (ORT and torch sum in different orders) moves a
    value across a rounding boundary of the next quantizer, which then differs by one quantization
    step; the quantile shows the bulk, the max shows those flips."""
    diffs = [np.abs(x.astype(np.float64) - y.astype(np.float64)).ravel() for x, y in zip(a, b) if x.size]
    return float(np.quantile(np.concatenate(diffs), q)) if diffs else 0.0


def cosine_per_sample(a: list[np.ndarray], b: list[np.ndarray], inputs: Inputs | None = None) -> np.ndarray:
    """Cosine of each sample's outputs (all floating outputs, flattened per batch row); positions the
    inputs' ``attention_mask`` marks as padding are left out (``surgeon.verify.position_mask``)."""
    a, b = _masked(a, inputs), _masked(b, inputs)
    rows_a = np.concatenate([x.reshape(x.shape[0], -1) if x.ndim else x.reshape(1, 1) for x in a], axis=1)
    rows_b = np.concatenate([x.reshape(x.shape[0], -1) if x.ndim else x.reshape(1, 1) for x in b], axis=1)
    rows_a, rows_b = rows_a.astype(np.float64), rows_b.astype(np.float64)
    num = (rows_a * rows_b).sum(1)
    den = np.linalg.norm(rows_a, axis=1) * np.linalg.norm(rows_b, axis=1)
    return np.where(den > 0, num / np.maximum(den, 1e-300), (np.abs(rows_a - rows_b).max(1) == 0).astype(float))


def _masked(outputs: list[np.ndarray], inputs: Inputs | None) -> list[np.ndarray]:
    """``outputs`` with the padded positions (``attention_mask`` = 0) set to 0 where the output is
    [batch, seq, …]; unchanged without a mask."""
    from surgeon.verify import position_mask

    out = []
    for x in outputs:
        valid = position_mask(inputs, torch.from_numpy(np.ascontiguousarray(x))) if inputs is not None else None
        out.append(np.where(valid.numpy() > 0, x, 0) if valid is not None else x)
    return out


def cosine_by_output(names: list[str], a: list[np.ndarray], b: list[np.ndarray],
                     inputs: Inputs | None = None) -> dict[str, dict[str, Any]]:
    """Per named output: cosine min/mean over samples, and what was measured (padding left out or not)."""
    from surgeon.verify import position_mask

    figures: dict[str, dict[str, Any]] = {}
    for name, x, y in zip(names, a, b):
        cos = cosine_per_sample([x], [y], inputs)
        masked = inputs is not None and position_mask(inputs, torch.from_numpy(np.ascontiguousarray(x))) is not None
        figures[name] = {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
                         "measured": "per sample, padded positions (attention_mask = 0) left out" if masked
                         else "per sample, every element"}
    return figures


def _input_tensors(sess_inputs: Sequence[str], inputs: Inputs) -> list[tuple[Any, torch.Tensor]] | None:
    """(key in ``inputs``, tensor) for each file input, matched as ``feeds_for`` matches them; None when
    the inputs are nested (no tensor per key)."""
    args, kwargs = as_args_kwargs(inputs)
    if kwargs and not args and all(isinstance(kwargs.get(n), torch.Tensor) for n in sess_inputs):
        return [(n, kwargs[n]) for n in sess_inputs]
    keys = [i for i in range(len(args))] + list(kwargs)
    values = list(args) + list(kwargs.values())
    pairs = [(k, v) for k, v in zip(keys, values) if isinstance(v, torch.Tensor)]
    return pairs if len(pairs) == len(sess_inputs) else None


def _replaced(inputs: Inputs, new: dict[Any, torch.Tensor]) -> Inputs:
    args, kwargs = as_args_kwargs(inputs)
    if kwargs and not args:
        return {k: new.get(k, v) for k, v in kwargs.items()}
    return tuple(new.get(i, a) for i, a in enumerate(args))


def shape_probes(path: str | os.PathLike, module: Any, inputs: Inputs,
                 base_diff: float) -> tuple[list[dict[str, Any]], list[tuple[str, int]]]:
    """Run the file where it claims to be dynamic, at sizes it was not exported with, against ``module``.

    The batch axis (every input whose axis 0 is symbolic) at 1 and 3 (rows repeated cyclically), and
    each other symbolic size (inputs sharing the size change together) cut to three quarters. A probe
    the torch module refuses means the model fixes that axis; one the file cannot run, or runs with a
    difference from torch beyond ``max(1e-4, 10 × base_diff)`` (``base_diff``: at the verified shape;
    for a quantized file also at most 10 % of the output's largest magnitude),
    means the file claims an axis it cannot take. Returns ``(probes, axes)``: what each probe found
    and the (input, axis) pairs that must be static."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    init = {t.name for t in graph.initializer}
    dims = {vi.name: [d.dim_param for d in vi.type.tensor_type.shape.dim] for vi in graph.input if vi.name not in init}
    names = list(dims)
    pairs = _input_tensors(names, inputs)
    if pairs is None:
        return [{"skipped": "nested inputs"}], []
    sess = session(path, fp8=needs_fp8_option(path))
    quantized = any(n.op_type in ("QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger") for n in all_nodes(graph))
    batch_axes = [(n, 0) for n in names if dims[n] and dims[n][0]]
    sizes: dict[int, list[tuple[str, int]]] = {}
    for (n, (_key, t)) in zip(names, pairs):
        for axis, sym in enumerate(dims[n]):
            if axis and sym and t.dim() > axis and t.shape[axis] >= 2:
                sizes.setdefault(int(t.shape[axis]), []).append((n, axis))
    by_name = dict(zip(names, pairs))
    tries: list[tuple[str, list[tuple[str, int]], dict[str, Any], Inputs]] = []
    rows = {int(by_name[n][1].shape[0]) for n, _ in batch_axes}
    for b in (1, 3):
        if batch_axes and rows and b not in rows:
            new = {by_name[n][0]: by_name[n][1][torch.arange(b) % by_name[n][1].shape[0]] for n, _ in batch_axes}
            tries.append((f"batch {b}", batch_axes, {"batch": b}, _replaced(inputs, new)))
    for size, axes in sizes.items():
        cut = max(1, size * 3 // 4)
        new = {}
        for n, axis in axes:
            key, t = by_name[n]
            new[key] = (new.get(key, t)).narrow(axis, 0, cut)
        tries.append((f"{', '.join(f'{n}[{a}]' for n, a in axes)} {size} → {cut}", axes, {"length": cut}, _replaced(inputs, new)))
    probes: list[dict[str, Any]] = []
    static: list[tuple[str, int]] = []
    for label, axes, what, probe in tries:
        record: dict[str, Any] = {"probe": label, **what}
        try:
            ref = _torch_outputs(module, probe)
        except Exception as exc:  # noqa: BLE001 - the model itself fixes this axis
            record["error"] = f"the torch module refuses it: {first_line(exc)[:200]}"
            probes.append(record)
            static += axes
            continue
        try:
            got = _float_outputs(run_ort(sess, probe))
            diff = _max_abs(got, [r for r in ref if np.issubdtype(r.dtype, np.floating)])
        except Exception as exc:  # noqa: BLE001 - a file that claims an axis it cannot take
            record["error"] = " ".join(first_line(exc).split())[:200]
            probes.append(record)
            static += axes
            continue
        record["max_abs_diff"] = diff
        scale = max((float(np.abs(r).max()) for r in ref if r.size and np.issubdtype(r.dtype, np.floating)), default=0.0)
        # a quantized file moves isolated values by a quantization step wherever a float ulp crosses a
        # rounding boundary, and another batch has other such values: 10 % of the output's range is
        # far above those and far below what a file computing at the wrong shape gives
        bound = max(1e-4, 10 * base_diff, 0.1 * scale if quantized else 0.0)
        if not diff <= bound:
            record["error"] = f"differs from torch by {diff:.3g} (at the exported shape {base_diff:.3g})"
            static += axes
        probes.append(record)
    return probes, list(dict.fromkeys(static))


def _static_axes(path: str | os.PathLike, module: Any, inputs: Inputs, static: list[tuple[str, int]]) -> Any:
    """``auto_dynamic_shapes`` with the ``static`` (file input, axis) pairs fixed; everything fixed (None)
    where the batch axis is among them or the file's inputs do not map one to one onto the spec."""
    import onnx

    if any(axis == 0 for _, axis in static):
        return None
    graph = onnx.load(str(path), load_external_data=False).graph
    init = {t.name for t in graph.initializer}
    names = [vi.name for vi in graph.input if vi.name not in init]
    pairs = _input_tensors(names, inputs)
    spec = auto_dynamic_shapes(module, inputs)
    args, kwargs = as_args_kwargs(inputs)
    spec_keys = list(spec) if isinstance(spec, dict) else list(range(len(spec)))
    if pairs is None or len(spec_keys) != len(args) + len(kwargs):
        return None
    # a key of ``inputs`` (argument position or keyword) → the spec's key (parameter name or position)
    to_spec = dict(zip([*range(len(args)), *kwargs], spec_keys))
    out = dict(spec) if isinstance(spec, dict) else list(spec)
    for name, (key, _t) in zip(names, pairs):
        fixed = {a for n, a in static if n == name}
        dims = out[to_spec[key]]
        if fixed and isinstance(dims, dict):
            out[to_spec[key]] = {i: d for i, d in dims.items() if i not in fixed} or None
    return out if isinstance(out, dict) else tuple(out)


def fp32_bytes(model: nn.Module) -> int:
    """Bytes the fp32 ONNX file stores for ``model``'s weights: unique float parameters and buffers × 4."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr() if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * (4 if t.is_floating_point() else t.element_size())
    return total


def verify_onnx(path: str | os.PathLike, module: Any, inputs: Inputs, *, original: nn.Module | None = None,
                original_inputs: Inputs | None = None, fp32_size: int | None = None,
                check_batch: bool = True) -> dict[str, Any]:
    """Check ``path`` and compare it in onnxruntime with ``module`` (and ``original``).

    Returns the figures: ``max_abs_diff`` (ORT vs the torch module), ``cosine_min`` / ``cosine_mean``
    (ORT vs the original, per sample), ``bytes``, ``fp32_bytes``, ``size_ratio``, ``fp8_session_option``
    and, with ``check_batch``, ``shape_check`` (``shape_probes``: the file run at batch 1 and 3 and at
    another size of each other dynamic axis against ``module``; the axes it claims but cannot take)
    with ``batch1_max_abs_diff``. Raises ``SurgeonError`` when the checker or onnxruntime rejects the
    file at the verified shape."""
    import onnx

    path = Path(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001
        raise SurgeonError(f"onnx.checker rejected {path.name}: {' '.join(str(exc).split())[:300]}") from exc
    fp8 = needs_fp8_option(path)
    try:
        sess = session(path, fp8=fp8)
        ort_out = _float_outputs(run_ort(sess, inputs))
    except SurgeonError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise SurgeonError(f"onnxruntime cannot run {path.name}: {' '.join(str(exc).split())[:300]}") from exc
    ref = _torch_outputs(module, inputs)
    written = onnx.load(str(path), load_external_data=False)  # read once: its opset and its ops
    figures: dict[str, Any] = {
        "file": path.name,
        "bytes": path.stat().st_size,
        "opset": next((int(o.version) for o in written.opset_import if o.domain in ("", "ai.onnx")), OPSET),
        "max_abs_diff": _max_abs(ort_out, ref),
        "p999_abs_diff": _quantile_abs(ort_out, ref, 0.999),
        "fp8_session_option": f"{FP8_SESSION_OPTION[0]}={FP8_SESSION_OPTION[1]}" if fp8 else None,
        "session_config": session_config(path, fp8=fp8),
        "ort_disabled_optimizers": list(FP8_DISABLED_OPTIMIZERS) if fp8 else [],
        "inputs": [{"name": i.name, "shape": [d if isinstance(d, int) else str(d) for d in i.shape]}
                   for i in sess.get_inputs()],
    }
    if any(n.op_type == "QuantizeLinear" for n in written.graph.node):
        # Noise floor: the same file under ORT with graph optimizations off. Quantizers turn ulp-level
        # float differences (fused vs unfused kernels, summation order) into whole quantization steps,
        # so deep quantized models differ from themselves across runtimes by as much as from torch.
        plain = session(path, fp8=fp8, optimize=False)
        figures["ort_unoptimized_max_abs_diff"] = _max_abs(_float_outputs(run_ort(plain, inputs)), ort_out)
    if original is not None:
        orig_out = _torch_outputs(original, original_inputs if original_inputs is not None else inputs)
        if len(orig_out) == len(ort_out):
            cos_inputs = original_inputs if original_inputs is not None else inputs
            cos = cosine_per_sample(ort_out, orig_out, cos_inputs)
            figures["cosine_min"] = float(cos.min())
            figures["cosine_mean"] = float(cos.mean())
            names = [o.name for o in sess.get_outputs() if o.type in ("tensor(float)", "tensor(double)",
                                                                       "tensor(float16)", "tensor(bfloat16)")]
            if len(names) == len(ort_out):
                figures["cosine_by_output"] = cosine_by_output(names, ort_out, orig_out, cos_inputs)
        if fp32_size is None:
            fp32_size = fp32_bytes(original)
    if fp32_size:
        figures["fp32_bytes"] = int(fp32_size)
        figures["size_ratio"] = round(figures["bytes"] / fp32_size, 4)
    if check_batch:
        # where the file claims dynamic axes: does it run there (write_onnx rewrites a file that does not;
        # here, for a file given to verify, the failures are figures)
        probes, failing = shape_probes(path, module, inputs, figures["max_abs_diff"])
        figures["shape_check"] = {"probes": probes, "claimed_dynamic_but_fail": [f"{n}:{a}" for n, a in failing]}
        one = next((p for p in probes if p.get("batch") == 1 and "max_abs_diff" in p), None)
        if one is not None:
            figures["batch1_max_abs_diff"] = one["max_abs_diff"]
    return figures


def write_onnx(module: Any, example_inputs: Inputs, outdir: str | os.PathLike, *, filename: str = "model.onnx",
               original: nn.Module | None = None, original_inputs: Inputs | None = None,
               verify_inputs: Inputs | None = None, input_names: Sequence[str] | None = None,
               fp32_size: int | None = None, tolerance: float | None = None, opset: int = OPSET) -> dict[str, Any]:
    """Export, verify and atomically place ``OUTDIR/model.onnx``; return the verification figures.

    ``tolerance`` (max abs diff ORT vs torch module), when given, must hold or nothing is written."""
    cleanups: dict[str, int] = {}
    with placed_file(outdir, filename, suffix=".onnx.tmp") as tmp:
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
            spec = None if everything else _static_axes(tmp, module, vin, fixed)
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
