"""Attention sites: ``scaled_dot_product_attention`` calls and hand-written softmax attention.

Definition: a softmax over the key axis of a Q·Kᵀ product of two activations (any scaling, including
none as in T5; additive or boolean masks; position bias; dropout) whose result multiplies V.

The manual pattern is a definition, not a template: starting at every softmax we walk back through
score-shaping ops (scale, mask, bias, casts) to a product of two *activations* (a product with a
weight is a Linear, i.e. a classifier head), and forward through casts/dropout/head-masks to a
product with V. Each refusal carries its reason.
"""

from __future__ import annotations

from torch import fx

from ._graph import PRODUCTS, GraphView
from .sites import NearMiss, Site

# Ops between Q·Kᵀ and softmax that shape scores without changing which product they come from.
SCORE_OPS = {"add", "sub", "mul", "div", "masked_fill", "where", "to", "dropout", "clamp", "tanh", "neg",
             "view", "reshape", "_unsafe_view", "contiguous", "expand", "float", "maximum", "minimum"}
# Ops between softmax and P·V: casts, dropout, head masks, zeroing of fully masked rows.
PROB_OPS = {"to", "dropout", "mul", "masked_fill", "where", "view", "reshape", "_unsafe_view", "contiguous",
            "expand"}
_MAX_DEPTH = 12


def _softmax_dim(view: GraphView, n: fx.Node) -> int | None:
    if n.op == "call_module":
        return getattr(view.module_of(n), "dim", None)
    dim = view.arg(n, 1, "dim")
    return dim if isinstance(dim, int) else None


def _is_activation_product(view: GraphView, n: fx.Node) -> bool:
    """A matmul/bmm/einsum whose two operands both depend on the model input."""
    if view.op(n) not in PRODUCTS:
        return False
    operands = product_operands(view, n)
    return len(operands) == 2 and all(view.is_dynamic(o) for o in operands)


def product_operands(view: GraphView, n: fx.Node) -> list[fx.Node]:
    """The two tensors a product multiplies: matmul / bmm / mm ``(a, b)``, ``baddbmm``'s batch pair,
    ``einsum``'s operands (listed or as one list)."""
    op = view.op(n)
    if op == "einsum":
        ops = n.args[1:] if len(n.args) > 1 else []
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = ops[0]
        return [o for o in ops if isinstance(o, fx.Node)]
    if op == "baddbmm":
        return [o for o in n.args[1:3] if isinstance(o, fx.Node)]
    return [o for o in n.args[:2] if isinstance(o, fx.Node)]


def _bounded_search(start: list[fx.Node], step, found):  # noqa: ANN001 - small private helper
    """Breadth-first from ``start``: ``found(n)`` → stop with its result; ``step(n)`` → next nodes."""
    frontier, seen = list(start), set()
    for _ in range(_MAX_DEPTH):
        nxt = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            hit = found(n)
            if hit is not None:
                return hit
            nxt += step(n)
        if not nxt:
            break
        frontier = nxt
    return None


def _find_scores_product(view: GraphView, softmax: fx.Node) -> fx.Node | None:
    """Nearest activation·activation product feeding the softmax through score-shaping ops."""
    start = [softmax.args[0]] if softmax.args and isinstance(softmax.args[0], fx.Node) else []
    return _bounded_search(
        start,
        step=lambda n: [i for i in view.data_inputs(n) if view.is_dynamic(i)] if view.op(n) in SCORE_OPS else [],
        found=lambda n: n if _is_activation_product(view, n) else None)


def _find_pv(view: GraphView, softmax: fx.Node) -> tuple[fx.Node | None, fx.Node | None]:
    """The product P·V fed by the softmax, and the operand node through which P enters it."""
    hit = _bounded_search(
        [softmax],
        step=lambda n: [u for u in view.users(n) if view.op(u) in PROB_OPS],
        found=lambda n: next(((u, n) for u in view.users(n) if view.op(u) in PRODUCTS), None))
    return hit if hit is not None else (None, None)


def _key_axis_ok(view: GraphView, softmax: fx.Node, qk: fx.Node) -> tuple[bool, str]:
    dim = _softmax_dim(view, softmax)
    nd = view.ndim(softmax)
    if dim is None:
        return False, "softmax axis is not a constant"
    if nd is not None and dim < 0:
        dim += nd
    if nd is not None and dim != nd - 1:
        return False, f"softmax over axis {dim} of a rank-{nd} score tensor, not the key axis (last) of Q·Kᵀ"
    return True, ""


def _shapes(view: GraphView, **nodes: fx.Node | None) -> dict:
    return {k: view.shape(v) for k, v in nodes.items() if v is not None and view.shape(v) is not None}


def find_attention(view: GraphView) -> tuple[list[Site], list[NearMiss]]:
    sites: list[Site] = []
    misses: list[NearMiss] = []
    for n in view.find("scaled_dot_product_attention"):
        q, k, v = (view.arg(n, i, name) for i, name in enumerate(("query", "key", "value")))
        sites.append(Site("attention", view.module_path(n), "sdpa", {"sdpa": n},
                          _shapes(view, q=q, k=k, v=v),
                          {"is_causal": bool(view.arg(n, 5, "is_causal", False)),
                           "masked": view.arg(n, 3, "attn_mask") is not None,
                           "gqa": bool(view.arg(n, 7, "enable_gqa", False))}))
    for sm in view.find("softmax"):
        module = view.module_path(sm)
        qk = _find_scores_product(view, sm)
        if qk is None:
            misses.append(NearMiss("attention", module, sm.name,
                                   "softmax input is not a product of two activations (Q·Kᵀ); e.g. a classifier head"))
            continue
        ok, why = _key_axis_ok(view, sm, qk)
        if not ok:
            misses.append(NearMiss("attention", module, sm.name, why))
            continue
        pv, p_operand = _find_pv(view, sm)
        if pv is None:
            misses.append(NearMiss("attention", module, sm.name, "softmax result does not multiply V"))
            continue
        operands = product_operands(view, pv)
        if view.op(pv) != "einsum" and (not operands or operands[0] is not p_operand):
            misses.append(NearMiss("attention", module, sm.name,
                                   "softmax result enters its product as the right operand, not as P in P·V"))
            continue
        v = next((o for o in operands if o is not p_operand), None)
        if v is None or not view.is_dynamic(v):
            misses.append(NearMiss("attention", module, sm.name,
                                   "softmax result multiplies a constant, not V (an activation)"))
            continue
        qo, ko = (product_operands(view, qk) + [None, None])[:2]
        sites.append(Site("attention", module, "manual",
                          {"qk": qk, "softmax": sm, "pv": pv, "q": qo, "k": ko, "p": p_operand, "v": v},
                          _shapes(view, q=qo, k=ko, v=v, scores=qk),
                          {"product": view.op(qk)}))
    return sites, misses
