"""A read-only view of an fx graph that speaks in canonical op names.

torch.export graphs carry aten overloads (``aten.add.Tensor``), torch.fx graphs carry torch
functions, ``operator`` functions, method names and leaf modules. The analyzer's patterns are written
against one vocabulary (``add``, ``softmax``, ``matmul``, ``layer_norm``…) so they match both.

Data edges exclude shape queries (``sym_size``, ``size``): with dynamic shapes every ``view`` reads the
sizes of its input, which would otherwise make everything an ancestor of everything.
"""

from __future__ import annotations

import operator
from functools import cached_property
from typing import Any, Iterable

import networkx as nx
import torch
from torch import fx, nn

_ALIASES = {
    "_softmax": "softmax", "special_softmax": "softmax", "safe_softmax": "softmax", "_safe_softmax": "softmax",
    "truediv": "div", "div_": "div", "itruediv": "div", "floordiv": "floordiv",
    "iadd": "add", "add_": "add", "imul": "mul", "mul_": "mul", "isub": "sub", "sub_": "sub",
    "native_layer_norm": "layer_norm", "_fused_rms_norm": "rms_norm",
    "_to_copy": "to", "type_as": "to", "float": "to", "type": "to", "contiguous": "to", "clone": "to",
    "alias": "to", "detach": "to", "lift_fresh_copy": "to", "_to_dtype": "to", "identity": "to",
    "native_dropout": "dropout", "feature_dropout": "dropout", "alpha_dropout": "dropout", "dropout_": "dropout",
    "pow_": "pow", "square": "square", "exp_": "exp", "sigmoid_": "sigmoid", "tanh_": "tanh",
    "masked_fill_": "masked_fill", "index_put_": "index_put", "copy_": "copy", "neg": "neg",
    "reciprocal": "reciprocal", "conv1d": "conv", "conv2d": "conv", "conv3d": "conv", "convolution": "conv",
    "_convolution": "conv", "permute": "permute", "t": "transpose", "swapaxes": "transpose",
    "swapdims": "transpose", "mT": "transpose", "getitem": "getitem", "chunk": "split",
    "split_with_sizes": "split", "tensor_split": "split", "unsafe_split": "split", "unsafe_chunk": "split",
    "unbind": "split", "narrow": "slice", "softplus": "softplus", "logsigmoid": "logsigmoid",
}
_MODULE_OPS: list[tuple[type, str]] = [
    (nn.Linear, "linear"), (nn.LayerNorm, "layer_norm"), (nn.Softmax, "softmax"),
    (nn.Dropout, "dropout"), (nn.Identity, "to"), (nn.Conv1d, "conv"), (nn.Conv2d, "conv"),
    (nn.Conv3d, "conv"), (nn.Sigmoid, "sigmoid"), (nn.Tanh, "tanh"), (nn.Softplus, "softplus"),
    (nn.ReLU, "relu"), (nn.GELU, "gelu"), (nn.Embedding, "embedding"),
]
if hasattr(nn, "RMSNorm"):
    _MODULE_OPS.append((nn.RMSNorm, "rms_norm"))

SHAPE_OPS = {"sym_size", "size", "dim", "numel", "sym_numel", "sym_stride", "stride", "_assert_tensor_metadata",
             "sym_constrain_range_for_size", "_assert_scalar", "sym_storage_offset",
             # value-free constructors: their result depends on the input's shape, not its values
             "ones_like", "zeros_like", "full_like", "new_ones", "new_zeros", "new_full", "rand_like",
             "randn_like",
             # ``x.dtype`` / ``x.device`` in an fx trace (``torch.tensor(nan, dtype=x.dtype)``): metadata
             "tensor_metadata"}
# attributes of a tensor that describe it without reading its values
_METADATA_ATTRS = {"dtype", "device", "shape", "ndim", "layout", "is_cuda", "requires_grad", "is_floating_point"}
TRANSPARENT = {"to", "dropout"}  # value-preserving in eval mode
PRODUCTS = {"matmul", "bmm", "mm", "einsum", "baddbmm"}
VIEWS = {"view", "reshape", "_unsafe_view", "permute", "transpose", "unsqueeze", "squeeze", "expand",
         "flatten", "unflatten", "contiguous", "repeat", "repeat_interleave", "expand_as", "view_as"}


_VIEW_LIKE = VIEWS | {"slice", "select", "as_strided", "alias", "to", "narrow", "diagonal"}


def _target_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return target.overloadpacket.__name__
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target.__name__
    if target is operator.getitem:
        return "getitem"
    name = getattr(target, "__name__", None) or str(target)
    return name


class GraphView:
    """Canonical op names, data-edge graph (networkx) and metadata for one GraphModule."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.nodes: list[fx.Node] = list(gm.graph.nodes)
        self._ops: dict[fx.Node, str | None] = {n: self._canonical(n) for n in self.nodes}

    # --- op vocabulary -------------------------------------------------------------------------
    def _canonical(self, n: fx.Node) -> str | None:
        if n.op == "call_module":
            mod = self.gm.get_submodule(str(n.target))
            for cls, name in _MODULE_OPS:
                if isinstance(mod, cls):
                    return name
            return "module:" + type(mod).__name__
        if n.op in ("call_function", "call_method"):
            name = _target_name(n.target) if n.op == "call_function" else str(n.target)
            if name.startswith("__") and name.endswith("__"):  # operator dunders: __and__, __mul__
                name = name.strip("_")
            if n.target is getattr and len(n.args) > 1 and n.args[1] in _METADATA_ATTRS:
                return "tensor_metadata"
            name = _ALIASES.get(name, name)
            if name.endswith("_") and _ALIASES.get(name[:-1], name[:-1]) in {"add", "mul", "sub", "div"}:
                name = name[:-1]
            return name
        return n.op  # placeholder / get_attr / output

    def op(self, n: Any) -> str | None:
        return self._ops.get(n) if isinstance(n, fx.Node) else None

    def find(self, *ops: str) -> list[fx.Node]:
        return [n for n in self.nodes if self._ops[n] in ops]

    # --- arguments -----------------------------------------------------------------------------
    def arg(self, n: fx.Node, index: int, name: str, default: Any = None) -> Any:
        """Argument by position or keyword, for functions and methods alike."""
        if name in n.kwargs:
            return n.kwargs[name]
        if len(n.args) > index:
            return n.args[index]
        return default

    def module_of(self, n: fx.Node) -> nn.Module | None:
        return self.gm.get_submodule(str(n.target)) if n.op == "call_module" else None

    def constant(self, n: Any) -> torch.Tensor | None:
        """The tensor behind a get_attr node (parameter, buffer or lifted constant)."""
        if isinstance(n, fx.Node) and n.op == "get_attr":
            obj: Any = self.gm
            for part in str(n.target).split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    return None
            return obj if isinstance(obj, torch.Tensor) else None
        return None

    # --- data-edge graph -----------------------------------------------------------------------
    def data_inputs(self, n: fx.Node) -> list[fx.Node]:
        """Input nodes that carry values (not shapes) into ``n``."""
        return [i for i in n.all_input_nodes if self._ops[i] not in SHAPE_OPS]

    @cached_property
    def G(self) -> nx.DiGraph:
        g = nx.DiGraph()
        g.add_nodes_from(self.nodes)
        for n in self.nodes:
            for i in self.data_inputs(n):
                g.add_edge(i, n)
        # An in-place write (index_put_, copy_, x[i] = v) puts data into a buffer: whoever reads that
        # buffer afterwards depends on the written value, although no argument says so.
        order = {n: i for i, n in enumerate(self.nodes)}
        for m in self.nodes:
            base = self.mutated_base(m)
            if base is None:
                continue
            readers, todo = [], [base]
            while todo:
                cur = todo.pop()
                for u in cur.users:
                    if u is m or order[u] <= order[m]:
                        if self._ops[u] in _VIEW_LIKE and order[u] < order[m]:
                            todo.append(u)  # a view taken before the write sees it too
                        continue
                    readers.append(u)
            for r in readers:
                g.add_edge(m, r)
        return g

    def mutated_base(self, n: fx.Node) -> fx.Node | None:
        """The buffer an in-place node writes into (through views/slices), else None."""
        if n.op not in ("call_function", "call_method"):
            return None
        if n.target is operator.setitem:
            target = n.args[0]
        elif isinstance(n.target, torch._ops.OpOverload):
            if not n.target._schema.is_mutable or not n.args:
                return None
            target = n.args[0]
        elif _target_name(n.target).endswith("_") and not _target_name(n.target).endswith("__") and n.args:
            target = n.args[0]
        else:
            return None
        while isinstance(target, fx.Node) and self._ops.get(target) in _VIEW_LIKE and target.args:
            target = target.args[0]
        return target if isinstance(target, fx.Node) else None

    @cached_property
    def dynamic(self) -> set[fx.Node]:
        """Nodes whose value depends on a model input (not only on parameters and constants)."""
        inputs = [n for n in self.nodes if n.op == "placeholder" and self._is_tensor_placeholder(n)]
        out: set[fx.Node] = set(inputs)
        for p in inputs:
            out |= nx.descendants(self.G, p)
        return out

    def _is_tensor_placeholder(self, n: fx.Node) -> bool:
        val = n.meta.get("val", n.meta.get("tensor_meta"))
        return val is None or isinstance(val, torch.Tensor) or hasattr(val, "shape")

    def is_dynamic(self, n: Any) -> bool:
        return isinstance(n, fx.Node) and n in self.dynamic

    def ancestors(self, n: fx.Node) -> set[fx.Node]:
        return nx.ancestors(self.G, n)

    def has_path(self, a: fx.Node, b: fx.Node) -> bool:
        return a is b or nx.has_path(self.G, a, b)

    def users(self, n: fx.Node) -> list[fx.Node]:
        return [u for u in n.users if self._ops[u] not in SHAPE_OPS]

    # --- walking through value-preserving ops ---------------------------------------------------
    def skip_back(self, n: fx.Node, ops: Iterable[str] = TRANSPARENT) -> fx.Node:
        """Follow single-input value-preserving ops (casts, eval dropout) towards the producer."""
        ops = set(ops)
        while self._ops.get(n) in ops:
            ins = self.data_inputs(n)
            if not ins:
                break
            n = ins[0]
        return n

    def skip_forward(self, n: fx.Node, ops: Iterable[str] = TRANSPARENT) -> list[fx.Node]:
        """All nodes reachable from ``n`` through value-preserving ops (``n`` included)."""
        ops, out, todo = set(ops), [n], [n]
        while todo:
            cur = todo.pop()
            for u in self.users(cur):
                if self._ops[u] in ops and self.data_inputs(u) and self.data_inputs(u)[0] is cur and u not in out:
                    out.append(u)
                    todo.append(u)
        return out

    # --- metadata ------------------------------------------------------------------------------
    def shape(self, n: Any) -> list | None:
        if not isinstance(n, fx.Node):
            return None
        val = n.meta.get("val")
        if val is None:
            tm = n.meta.get("tensor_meta")
            val = tm
        shape = getattr(val, "shape", None)
        if shape is None:
            return None
        return [int(s) if isinstance(s, int) or (hasattr(s, "node") and str(s).isdigit()) else str(s) for s in shape]

    def ndim(self, n: Any) -> int | None:
        s = self.shape(n)
        return None if s is None else len(s)

    def module_path(self, n: fx.Node) -> str:
        """Dotted path of the innermost nn.Module that produced ``n`` (``""`` for the root)."""
        if n.op == "call_module":
            return str(n.target)
        stack = n.meta.get("nn_module_stack")
        if stack:
            path = list(stack.values())[-1][0]
            return _clean_path(str(path))
        return ""


def _clean_path(path: str) -> str:
    # torch.fx's tracer stores paths like "L['self'].encoder.layer[0]" in some versions.
    path = path.replace("L['self'].", "").replace("L['self']", "")
    out = []
    for ch in path:
        out.append("." if ch == "[" else ("" if ch in "]'\"" else ch))
    return "".join(out).strip(".")
