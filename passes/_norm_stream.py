"""Graph walks of ``norm-fold``: the writers of the residual stream and the readers of a norm's output.

``Closure.centre`` follows a value upstream through adds, views, casts, transposes, concatenations and
slices to the layers that write it (linear / addmm / conv weights, embedding and position tables,
class tokens) and plans how to make it zero-mean along the channel axis, or says why it cannot;
``stream_reader_problem`` finds a centred value read by something not invariant to its mean.
``affine_readers`` follows a norm's output downstream to the linear layers that can absorb γ / β.
Nothing here edits the graph: the pass applies the plans.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, fx

from surgeon.analysis import GraphView
from surgeon.passes._norm_math import constant_of

__all__ = ["Closure", "stream_reader_problem", "affine_readers"]

_PASS_THROUGH = {"to", "clone", "contiguous", "alias", "detach", "identity"}
_RESHAPES = {"view", "reshape", "_unsafe_view"}


def _shape(view: GraphView, n: Any) -> list | None:
    return view.shape(n) if isinstance(n, fx.Node) else None


def _eval_dropout(view: GraphView, n: fx.Node) -> bool:
    """An inference-mode dropout (aten.dropout(x, p, train=False) or p == 0): the identity."""
    if view.op(n) != "dropout" or n.op != "call_function":
        return False
    p, train = view.arg(n, 1, "p", 0.5), view.arg(n, 2, "train", True)
    return train is False or p == 0


def _norm_axis(a: int, rank: int) -> int:
    return a + rank if a < 0 else a


# --------------------------------------------------------------------------------------------------
# centring the residual stream
# --------------------------------------------------------------------------------------------------
class Closure:
    """The writers of one value and how to centre them: ``plan[(user, constant)] = axis``."""

    def __init__(self, gm: fx.GraphModule, view: GraphView) -> None:
        self.gm, self.view = gm, view
        self.axis: dict[fx.Node, int] = {}  # non-constant nodes whose value gets centred
        self.plan: dict[tuple[fx.Node, fx.Node], int] = {}
        self.writers: list[fx.Node] = []

    def const(self, user: fx.Node, c: Any, axis: int, writer: bool = False) -> str | None:
        """Plan centring constant ``c`` (as read by ``user``) along ``axis``; ``writer``: it is summed
        into the stream itself (a position table, a class token), not the weight of a layer."""
        if writer and isinstance(c, fx.Node) and c not in self.writers:
            self.writers.append(c)
        t = constant_of(self.gm, c)
        if t is None:
            return f"'{c.name}' read by '{user.name}' is not a constant"
        if not 0 <= axis < t.dim() or t.shape[axis] == 1:
            return f"the constant '{c.target}' broadcasts over the channel axis"
        if self.plan.setdefault((user, c), axis) != axis:
            return f"the constant '{c.target}' would be centred along two axes"
        return None

    def centre(self, n: Any, axis: int) -> str | None:
        """Plan the rewrites that make ``n``'s value zero-mean along ``axis``; None, or why not."""
        view = self.view
        if not isinstance(n, fx.Node):
            return None if n == 0 else f"the constant {n} is added to the residual stream"
        shape = _shape(view, n)
        if shape is None:
            return f"'{n.name}' has no shape metadata"
        rank = len(shape)
        axis = _norm_axis(axis, rank)
        if n in self.axis:
            return None if self.axis[n] == axis else f"'{n.name}' is reached along two channel axes"
        self.axis[n] = axis
        op = view.op(n)
        last = axis == rank - 1

        def arg(i: int, name: str, default: Any = None) -> Any:
            return view.arg(n, i, name, default)

        if n.op == "get_attr":
            return f"the constant '{n.target}' is the residual stream itself"
        if n.op == "placeholder":
            return f"the model input '{n.name}' is written into the residual stream"
        if op in ("add", "sub"):
            a, b = arg(0, "input"), arg(1, "other")
            if n.kwargs.get("alpha", 1) != 1:
                return f"'{n.name}' adds with alpha"
            for o in (a, b):
                if isinstance(o, fx.Node) and o.op == "get_attr":
                    t = constant_of(self.gm, o)
                    oa = axis - (rank - (t.dim() if t is not None else 0))
                    why = self.const(n, o, oa, writer=True) if t is not None and oa >= 0 else \
                        f"the constant '{o.target}' broadcasts over the channel axis"
                else:
                    os = _shape(view, o)
                    if isinstance(o, fx.Node) and (os is None or axis - (rank - len(os)) < 0
                                                   or os[axis - (rank - len(os))] != shape[axis]):
                        return f"'{o.name}' is broadcast over the channel axis in '{n.name}'"
                    why = self.centre(o, axis - (rank - len(os)) if isinstance(o, fx.Node) else axis)
                if why:
                    return why
            return None
        if op in _PASS_THROUGH or _eval_dropout(view, n):
            return self.centre(view.data_inputs(n)[0] if op != "dropout" else arg(0, "input"), axis)
        if op == "dropout":
            return f"'{n.name}' is a dropout in training mode"
        if op == "mul":
            a, b = arg(0, "input"), arg(1, "other")
            if isinstance(b, (int, float)):
                return self.centre(a, axis)
            if isinstance(a, (int, float)):
                return self.centre(b, axis)
            return f"'{n.name}' multiplies the stream by a tensor"
        if op in _RESHAPES:
            src = arg(0, "input")
            ss = _shape(view, src)
            if not last or ss is None or ss[-1] != shape[-1] or not isinstance(shape[-1], int):
                return f"'{n.name}' reshapes the channel axis"
            return self.centre(src, len(ss) - 1)
        if op == "transpose":
            d0, d1 = (_norm_axis(d, rank) for d in (arg(1, "dim0"), arg(2, "dim1")))
            return self.centre(arg(0, "input"), d1 if axis == d0 else d0 if axis == d1 else axis)
        if op == "permute":
            dims = [_norm_axis(d, rank) for d in arg(1, "dims")]
            return self.centre(arg(0, "input"), dims[axis])
        if op == "flatten":
            src = arg(0, "input")
            ss = _shape(view, src)
            if ss is None:
                return f"'{src.name}' has no shape metadata"
            start, end = (_norm_axis(d, len(ss)) for d in (arg(1, "start_dim", 0), arg(2, "end_dim", -1)))
            if start <= axis <= start and start != end:
                return f"'{n.name}' flattens the channel axis"
            return self.centre(src, axis if axis < start else axis + (end - start))
        if op == "unsqueeze":
            d = _norm_axis(arg(1, "dim"), rank)
            if d == axis:
                return f"'{n.name}' creates the channel axis"
            return self.centre(arg(0, "input"), axis if axis < d else axis - 1)
        if op == "expand":
            src = arg(0, "input")
            ss = _shape(view, src)
            sa = axis - (rank - len(ss)) if ss is not None else -1
            if sa < 0 or ss[sa] != shape[axis]:
                return f"'{n.name}' broadcasts over the channel axis"
            if src.op == "get_attr":
                return self.const(n, src, sa, writer=True)
            return self.centre(src, sa)
        if op == "cat":
            tensors, dim = arg(0, "tensors"), _norm_axis(arg(1, "dim", 0), rank)
            if dim == axis:
                return f"'{n.name}' concatenates along the channel axis"
            for t in tensors:
                why = self.const(n, t, axis, writer=True) if t.op == "get_attr" else self.centre(t, axis)
                if why:
                    return why
            return None
        if op in ("slice", "select"):
            src = arg(0, "input")
            ss = _shape(view, src)
            if ss is None:
                return f"'{src.name}' has no shape metadata"
            dim = _norm_axis(arg(1, "dim", 0), len(ss))
            # select drops its axis: output axes at or after it sit one further in the input
            src_axis = axis + 1 if op == "select" and axis >= dim else axis
            if src_axis == dim:
                return f"'{n.name}' ({op}) cuts the channel axis"
            return self.centre(src, src_axis)
        # writers: affine layers with constant weights
        if op == "linear" and n.op == "call_function":
            if not last:
                return f"'{n.name}' (linear) is read along another axis than its output features"
            w, b = arg(1, "weight"), arg(2, "bias")
            why = self.const(n, w, 0) or (self.const(n, b, 0) if b is not None else None)
            self.writers.append(n)
            return why
        if op == "addmm" and n.op == "call_function":
            if not last:
                return f"'{n.name}' (addmm) is read along another axis than its output features"
            b, w = arg(0, "input"), arg(2, "mat2")
            why = self.const(n, w, 1) or self.const(n, b, _bias_axis(constant_of(self.gm, b)))
            self.writers.append(n)
            return why
        if op == "conv" and n.op == "call_function":
            if axis != 1:
                return f"'{n.name}' (convolution) is read along another axis than its output channels"
            w = n.args[1]
            b = n.args[2] if len(n.args) > 2 else None
            transposed = "convolution" in str(n.target) and bool(n.args[6])
            groups = n.args[8] if "convolution" in str(n.target) else (n.args[6] if len(n.args) > 6 else 1)
            if transposed or groups != 1:
                return f"'{n.name}' is a transposed or grouped convolution: its output channels cannot be centred by its weight"
            why = self.const(n, w, 0) or (self.const(n, b, 0) if isinstance(b, fx.Node) else None)
            self.writers.append(n)
            return why
        if op == "embedding" and n.op == "call_function":
            if not last:
                return f"'{n.name}' (embedding) is read along another axis than its features"
            self.writers.append(n)
            return self.const(n, arg(0, "weight"), 1)
        return f"'{n.name}' ({op}, {view.module_path(n) or '<root>'}) writes the residual stream and cannot be centred"


def _bias_axis(t: Tensor | None) -> int:
    return 0 if t is None or t.dim() <= 1 else t.dim() - 1


def stream_reader_problem(view: GraphView, nodes: set[fx.Node], invariant: set[fx.Node]) -> tuple[fx.Node, str] | None:
    """The first centred value read by something that is not centred and not mean-invariant."""
    for n in view.nodes:
        if n not in nodes:
            continue
        for u in view.users(n):
            if u in nodes or u in invariant:
                continue
            what = "the model output" if u.op == "output" else f"'{u.name}' ({view.op(u)}, {view.module_path(u) or '<root>'})"
            return n, f"{what} reads the residual stream at '{n.name}' and is not invariant to its mean"
    return None


# --------------------------------------------------------------------------------------------------
# readers of the normalised value
# --------------------------------------------------------------------------------------------------
def affine_readers(gm: fx.GraphModule, view: GraphView, out: fx.Node) -> list[tuple[fx.Node, str]] | str:
    """Every linear/addmm reading ``out`` (through channel-preserving views), or why γ/β cannot fold."""
    leaves: list[tuple[fx.Node, str]] = []
    todo, seen = [out], {out}
    while todo:
        n = todo.pop()
        users = view.users(n)
        if not users:
            return f"'{n.name}' is not read by any layer"
        for u in users:
            op = view.op(u)
            if op == "linear" and u.op == "call_function" and view.arg(u, 0, "input") is n:
                w, b = view.arg(u, 1, "weight"), view.arg(u, 2, "bias")
                if constant_of(gm, w) is None or (b is not None and constant_of(gm, b) is None):
                    return f"'{u.name}' (linear) has a weight computed at run time"
                leaves.append((u, "linear"))
                continue
            if op == "addmm" and u.op == "call_function" and u.args[1] is n and u.args[0] is not n:
                w, b = u.args[2], u.args[0]
                if u.kwargs.get("beta", 1) != 1 or u.kwargs.get("alpha", 1) != 1:
                    return f"'{u.name}' (addmm) scales with alpha/beta"
                if constant_of(gm, w) is None or constant_of(gm, b) is None:
                    return f"'{u.name}' (addmm) has a weight computed at run time"
                leaves.append((u, "addmm"))
                continue
            ok = False
            if op in _PASS_THROUGH or _eval_dropout(view, u):
                ok = True
            elif op in _RESHAPES:
                a, b = _shape(view, n), _shape(view, u)
                ok = a is not None and b is not None and a[-1] == b[-1] and isinstance(a[-1], int)
            elif op in ("slice", "select"):
                rank = len(_shape(view, n) or [])
                ok = rank > 0 and _norm_axis(view.arg(u, 1, "dim", 0), rank) != rank - 1
            if not ok:
                what = "the model output" if u.op == "output" else f"'{u.name}' ({op}, {view.module_path(u) or '<root>'})"
                return f"{what} reads the normalised value: only linear layers can absorb γ and β"
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return leaves
