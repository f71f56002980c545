"""Shared helpers of the ``norm-fold`` and ``norm-gate`` passes: norm anatomy and constant surgery.

A LayerNorm / RMSNorm over the last axis, library (``aten.layer_norm``, ``aten.rms_norm``) or written
out by hand, is read as ``NormParts``: the value normalised ``x``, ``eps``, the affine ``γ`` / ``β``
(get_attr nodes or None) and the nodes that compute it (``core``), so a pass can replace it as a whole.

    layernorm:  y = γ ⊙ (x − μ(x)) / √(var(x) + eps) + β
    rmsnorm:    y = γ ⊙ x / √(mean(x²) + eps)        (+ β where a model adds one)

Constants are never modified in place: ``set_constant`` registers a new parameter beside the old one
and rewires one use; ``drop_unused`` erases dead nodes and the attributes no node reads any more, so
the parameter count of the result is the real one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from surgeon.analysis import GraphView

__all__ = ["NormParts", "find_norms", "reference_norm", "set_constant", "drop_unused", "constant_of"]

_CASTS = {"to"}


@dataclass
class NormParts:
    """One norm over the last axis, ready to be replaced."""

    node: fx.Node  # the norm's output (after γ/β)
    x: fx.Node  # the value normalised
    flavor: str  # layernorm | rmsnorm
    written: str  # library | hand-written
    eps: float
    dim: int  # size of the normalised (last) axis
    weight: fx.Node | None  # γ (get_attr) or None
    bias: fx.Node | None  # β (get_attr) or None
    core: list[fx.Node] = field(default_factory=list)  # nodes computing y from x (graph order), node last
    module: str = ""


def constant_of(gm: fx.GraphModule, node: Any) -> Tensor | None:
    """The tensor a get_attr node reads (parameter, buffer or constant), else None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    obj: Any = gm
    for part in str(node.target).split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj if isinstance(obj, Tensor) else None


def _last_dim(view: GraphView, n: fx.Node) -> int | None:
    shape = view.shape(n)
    if not shape or not isinstance(shape[-1], int):
        return None
    return shape[-1]


def _is_last_axis(dims: Any, rank: int | None) -> bool:
    if isinstance(dims, int):
        dims = [dims]
    if not isinstance(dims, (list, tuple)) or len(dims) != 1 or not isinstance(dims[0], int):
        return False
    return dims[0] == -1 or (rank is not None and dims[0] == rank - 1)


def _dtype_change(x: fx.Node, node: fx.Node) -> str | None:
    a, b = x.meta.get("val"), node.meta.get("val")
    if isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype != b.dtype:
        return f"mixed precision: normalises {a.dtype} into {b.dtype}".replace("torch.", "")
    return None


def _library_parts(gm: fx.GraphModule, view: GraphView, node: fx.Node, x: fx.Node, flavor: str) -> NormParts | str:
    if node.op != "call_function":
        return "the norm is a module call (fx fallback capture): only exported graphs are rewritten"
    if "native" in str(node.target) or "fused" in str(node.target):
        return f"{node.target} returns several values; only aten.layer_norm / aten.rms_norm are rewritten"
    shape = view.arg(node, 1, "normalized_shape")
    d = _last_dim(view, x)
    if d is None:
        return "the size of the normalised axis is unknown (no shape metadata)"
    if not isinstance(shape, (list, tuple)) or len(shape) != 1 or shape[0] != d:
        return f"normalises over {list(shape) if isinstance(shape, (list, tuple)) else shape}, not the last axis alone"
    if flavor == "layernorm":
        w, b, eps = view.arg(node, 2, "weight"), view.arg(node, 3, "bias"), view.arg(node, 4, "eps", 1e-5)
    else:
        w, b, eps = view.arg(node, 2, "weight"), None, view.arg(node, 3, "eps")
    for role, c in (("weight", w), ("bias", b)):
        if c is not None and constant_of(gm, c) is None:
            return f"the norm's {role} is not a constant"
    why = _dtype_change(x, node)
    if why:
        return why
    # casts between x and the norm belong to it (they are erased with it once unused)
    path = (nx.descendants(view.G, x) & nx.ancestors(view.G, node)) if x is not node.args[0] else set()
    core = [n for n in view.nodes if n in path] + [node]
    if eps is None:  # aten.rms_norm's default
        val = x.meta.get("val")
        eps = torch.finfo(val.dtype if isinstance(val, Tensor) else torch.float32).eps
    if not isinstance(eps, (int, float)):
        return "eps is not a constant"
    return NormParts(node, x, flavor, "library", float(eps), d, w, b, core, view.module_path(node))


def _hand_parts(gm: fx.GraphModule, view: GraphView, node: fx.Node, x: fx.Node, flavor: str) -> NormParts | str:
    """Read eps, γ and β off a hand-written norm: every constant it touches must be one of the three."""
    d = _last_dim(view, x)
    if d is None:
        return "the size of the normalised axis is unknown (no shape metadata)"
    core_set = (nx.descendants(view.G, x) & nx.ancestors(view.G, node)) | {node}
    core = [n for n in view.nodes if n in core_set]
    rank = view.ndim(x)
    eps = weight = bias = None
    for n in core:
        op = view.op(n)
        # a no-op cast of x may be shared with the residual add (``x.to(float32)`` returns x itself)
        if n is not node and op not in _CASTS and any(u not in core_set for u in view.users(n)):
            outside = next(u for u in view.users(n) if u not in core_set)
            return f"its intermediate '{n.name}' is also read by '{outside.name}'"
        if op in ("mean", "var", "sum") and not _is_last_axis(view.arg(n, 1, "dim"), rank):
            return f"'{n.name}' reduces over {view.arg(n, 1, 'dim')}, not the last axis alone"
        consts = [a for a in n.args if isinstance(a, fx.Node) and a not in core_set and a.op == "get_attr"]
        scalars = [a for a in n.args[1:] if isinstance(a, (int, float)) and not isinstance(a, bool)]
        if op == "add" and any(view.op(a) in ("mean", "var") for a in n.args if isinstance(a, fx.Node)):
            if not scalars:
                return f"eps is a tensor ('{n.name}' adds a computed or stored value), not a number"
            eps = float(scalars[0])
        elif op == "mul" and consts and weight is None:
            weight = consts[0]
        elif op == "add" and consts and bias is None:
            bias = consts[0]
        elif consts:
            return f"'{n.name}' ({op}) applies a constant that is neither γ nor β"
        elif op in ("mul", "div", "add", "sub") and scalars:
            return f"'{n.name}' ({op}) applies the constant {scalars[0]} that is not eps"
    if eps is None:
        return "eps could not be read from the hand-written norm"
    why = _dtype_change(x, node)
    if why:
        return why
    for role, c in (("γ", weight), ("β", bias)):
        t = constant_of(gm, c) if c is not None else None
        if c is not None and (t is None or t.dim() != 1 or t.shape[0] != d):
            return f"its {role} is not a vector of the normalised axis' size {d}"
    return NormParts(node, x, flavor, "hand-written", eps, d, weight, bias, core, view.module_path(node))


def find_norms(gm: fx.GraphModule, view: GraphView) -> list[tuple[Any, NormParts | str]]:
    """Every norm of the graph (analyzer's definition) with its parts or the reason it cannot be read."""
    from surgeon.analysis.norms import all_norms

    out = []
    for nm in all_norms(view):
        parts = (_library_parts if nm.written == "library" else _hand_parts)(gm, view, nm.node, nm.x, nm.flavor)
        out.append((nm, parts))
    order = {n: i for i, n in enumerate(view.nodes)}
    out.sort(key=lambda p: order[p[0].node])
    return out


def reference_norm(x: Tensor, flavor: str, eps: float, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """The norm ``NormParts`` describes, computed with torch (what a switched-off substitute returns)."""
    shape = (x.shape[-1],)
    if flavor == "layernorm":
        return F.layer_norm(x, shape, weight, bias, eps)
    y = F.rms_norm(x, shape, weight, eps)
    return y + bias if bias is not None else y


# --------------------------------------------------------------------------------------------------
# constant surgery
# --------------------------------------------------------------------------------------------------
def _owner(gm: nn.Module, target: str) -> tuple[nn.Module, str]:
    path, _, leaf = target.rpartition(".")
    return (gm.get_submodule(path) if path else gm), leaf


def set_constant(gm: fx.GraphModule, user: fx.Node, old: fx.Node | None, value: Tensor, tag: str,
                 base: str | None = None) -> fx.Node:
    """Make ``user`` read a new parameter holding ``value`` instead of ``old`` (a get_attr node).

    The parameter is registered beside the old one as ``<leaf>_<tag>`` (``base`` names it when there
    is no old constant, e.g. a bias created by a fold); other users of ``old`` are not touched."""
    target = str(old.target) if old is not None else str(base)
    owner, leaf = _owner(gm, target)
    name, i = f"{leaf}_{tag}", 1
    while hasattr(owner, name):
        i += 1
        name = f"{leaf}_{tag}{i}"
    owner.register_parameter(name, nn.Parameter(value.detach().clone(), requires_grad=False))
    path = f"{target.rpartition('.')[0]}.{name}" if "." in target else name
    first = next(n for n in gm.graph.nodes if n.op != "get_attr") if old is None else old
    with gm.graph.inserting_before(first):
        new = gm.graph.get_attr(path)
    new.meta["val"] = value
    if old is not None:
        user.replace_input_with(old, new)
        drop_unused(gm, [old])
    return new


def drop_unused(gm: fx.GraphModule, nodes: list[fx.Node]) -> None:
    """Erase ``nodes`` (and shape assertions on them) once unused; delete attributes no node reads."""
    graph = gm.graph
    alive = set(graph.nodes)
    targets = set()
    for n in reversed(nodes):
        if n not in alive:
            continue
        if n.op == "get_attr":
            if not n.users:
                targets.add(str(n.target))
                graph.erase_node(n)
                alive.discard(n)
            continue
        for u in list(n.users):
            if u.op == "call_function" and "assert_tensor_metadata" in str(u.target):
                graph.erase_node(u)
                alive.discard(u)
        if n.users:
            continue
        inputs = list(n.all_input_nodes)
        graph.erase_node(n)
        alive.discard(n)
        for i in inputs:
            if i.op == "get_attr" and not i.users:
                targets.add(str(i.target))
                graph.erase_node(i)
                alive.discard(i)
    still = {str(n.target) for n in graph.nodes if n.op == "get_attr"}
    dropped = [t for t in sorted(targets - still)]
    # a tied weight is one tensor under several names; once no node reads it, every alias goes
    gone = set()
    for t in dropped:
        owner, leaf = _owner(gm, t)
        value = getattr(owner, leaf, None)
        if isinstance(value, Tensor):
            gone.add(id(value))
    for name, value in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if id(value) in gone and name not in still and name not in dropped:
            dropped.append(name)
    for t in dropped:
        owner, leaf = _owner(gm, t)
        if leaf in owner._parameters:
            del owner._parameters[leaf]
        elif leaf in owner._buffers:
            del owner._buffers[leaf]
        elif hasattr(owner, leaf):
            delattr(owner, leaf)
