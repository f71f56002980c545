"""The graph side of the two attention passes (attention-fp8, attention-int8): the facts they ask of an
attention site and the rewrite steps they share. Passes never import each other, so it lives here.

Finding the sites is ``surgeon.analysis.attention``; what the substitutes compute (the exact SDPA
decomposition with quantization hooks) is ``passes/_sdpa.py``.

``shift_preserving`` says whether centring K (subtracting its mean over the keys, which shifts each
row of Q·Kᵀ by −q·k̄) leaves the softmax unchanged: true when every op from Q·Kᵀ to the softmax maps a
per-row shift to a per-row shift. ``key_axis`` / ``head_axis`` locate the keys and the heads of a
product's operand (matmul-like products and einsum). ``rewrite_sites`` runs a pass's handler on each
site and records the outcome; ``substitute_sdpa`` swaps an SDPA call for a pass's submodule.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import networkx as nx
import torch
from torch import fx, nn

from surgeon.analysis import GraphView, Site, analyze_graph
from surgeon.analysis.attention import product_operands
from surgeon.pass_manager import Diagnostic, PassContext, PassResult, SiteRecord
from surgeon.passes._fx import copy_meta

__all__ = ["ROW_VIEWS", "add_site_module", "attention_sites", "check_options", "distinct_operands",
           "head_axis", "key_axis", "quantizer_paths", "rewrite_sites", "scalar_like", "sdpa_site_args",
           "shift_preserving", "substitute_sdpa"]

ROW_VIEWS = {"view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "expand", "flatten", "unflatten",
             "repeat", "expand_as", "view_as", "permute", "transpose"}


def scalar_like(view: GraphView, a: Any) -> bool:
    """A Python number, a symbolic scalar, or a tensor constant along the last axis (per-row factor)."""
    if isinstance(a, (int, float)):
        return True
    if not isinstance(a, fx.Node):
        return False
    val = a.meta.get("val")
    if val is not None and not isinstance(val, torch.Tensor):
        return True  # SymInt / SymFloat / number
    shape = view.shape(a)
    return shape is not None and (len(shape) == 0 or shape[-1] == 1)


def shift_preserving(view: GraphView, qk: fx.Node, softmax: fx.Node, training: bool) -> str | None:
    """None when every op from Q·Kᵀ to the softmax maps a per-row shift to a per-row shift, else why not.

    Then centring K (which shifts each row of Q·Kᵀ by −q·k̄) leaves the softmax unchanged."""
    chain = (nx.descendants(view.G, qk) & nx.ancestors(view.G, softmax)) | {qk}
    for n in [n for n in view.nodes if n in chain]:
        outside = [u for u in view.users(n) if u not in chain and u is not softmax]
        if outside:
            return f"the scores '{n.name}' are also used by '{outside[0].name}'"
        if n is qk:
            continue
        op = view.op(n)
        on = [a for a in n.all_input_nodes if a in chain]
        args = list(n.args) + list(n.kwargs.values())
        others = [a for a in args if not (isinstance(a, fx.Node) and a in chain)]
        why = f"'{n.name}' ({op}) between Q·Kᵀ and softmax does not preserve a per-row shift"
        if op in ("to", "neg") or (op == "dropout" and not training):
            continue
        if op in ("add", "sub"):
            if len(on) == 1 and sum(a is on[0] for a in args) == 1:
                continue
            return why
        if op in ("mul", "div"):
            if len(on) != 1 or sum(a is on[0] for a in args) != 1 or (op == "div" and n.args[0] is not on[0]):
                return why
            if all(scalar_like(view, a) for a in others if isinstance(a, (fx.Node, int, float))):
                continue
            return why
        if op == "masked_fill":
            if n.args and n.args[0] in chain and len(on) == 1:
                continue
            return why
        if op == "where":
            if len(n.args) == 3 and n.args[0] not in chain and len(on) == 1:
                continue
            return why
        if op in ROW_VIEWS:
            src, dst = view.shape(on[0]) if on else None, view.shape(n)
            if op in ("permute", "transpose"):
                return why  # whether the last axis moves is not worth guessing: refuse
            if src and dst and src[-1] == dst[-1]:
                continue
            return why
        return why
    return None


_SCALE_SEARCHES = ("max", "percentile", "mse")
_MATMULS = {"matmul", "bmm", "mm", "baddbmm"}


def _einsum_parts(node: fx.Node) -> tuple[list[str], str] | None:
    eq = node.args[0] if node.args and isinstance(node.args[0], str) else None
    if eq is None or "->" not in eq:
        return None
    lhs, out = eq.replace(" ", "").split("->")
    return lhs.split(","), out


def _letter_axis(sub: str, letter: str) -> int | None:
    """Axis of ``letter`` in an einsum operand subscript (handles one ellipsis)."""
    if letter not in sub:
        return None
    if "..." not in sub:
        return sub.index(letter)
    head, tail = sub.split("...")
    if letter in head:
        return head.index(letter)
    return tail.index(letter) - len(tail)  # negative: counted from the end


def _operand_index(view: GraphView, prod: fx.Node, operand: fx.Node) -> int:
    return [i for i, o in enumerate(product_operands(view, prod)) if o is operand][0]


def key_axis(view: GraphView, qk: fx.Node, k: fx.Node) -> int | None:
    """Axis of the ``k`` operand of Q·Kᵀ that indexes keys (the scores' last axis)."""
    if view.op(qk) in _MATMULS:
        return -1  # Q @ Kᵀ: the right operand's columns are the keys
    if view.op(qk) == "einsum":
        parts = _einsum_parts(qk)
        if parts is None or not parts[1] or parts[1].endswith("."):
            return None
        subs, out = parts
        return _letter_axis(subs[_operand_index(view, qk, k)], out[-1])
    return None


def head_axis(view: GraphView, prod: fx.Node, operand: fx.Node) -> int | None:
    """Head axis of a product operand laid out [..., H, rows, cols] (None: no head axis known)."""
    rank = view.ndim(operand)
    if view.op(prod) == "einsum":
        parts = _einsum_parts(prod)
        out_rank = view.ndim(prod)
        if parts is None or out_rank is None or out_rank < 4 or "." in parts[1]:
            return None
        head = parts[1][out_rank - 3]
        axis = _letter_axis(parts[0][_operand_index(view, prod, operand)], head)
        if axis is not None and axis < 0 and rank is not None:
            axis += rank
        return axis
    if rank is None or rank < 4:
        return None
    return rank - 3


def check_options(granularity: str, method: str) -> None:
    """Refuse a scale granularity or a scale search the attention passes do not have."""
    if granularity not in ("tensor", "head"):
        raise ValueError(f"granularity must be 'tensor' or 'head', got '{granularity}'")
    if method not in _SCALE_SEARCHES:
        raise ValueError(f"method must be 'max', 'percentile' or 'mse', got '{method}'")


def attention_sites(gm: fx.GraphModule, ctx: PassContext) -> list[Site]:
    """The analyzer's attention sites of ``gm`` that ``ctx`` wants rewritten."""
    return [s for s in analyze_graph(gm).by_kind("attention") if ctx.wants(s.id)]


def add_site_module(gm: fx.GraphModule, prefix: str, module: nn.Module) -> str:
    """Add ``module`` to ``gm`` as ``prefix`` + the first index no child of ``gm`` takes yet; its name."""
    taken = {n for n, _ in gm.named_children()}
    i = 0
    while f"{prefix}{i}" in taken:
        i += 1
    gm.add_submodule(f"{prefix}{i}", module)
    return f"{prefix}{i}"


def quantizer_paths(name: str) -> list[str]:
    """A site module and its ``q``, ``k``, ``v``, ``p`` quantizers: what the guard switches."""
    return [name] + [f"{name}.{c}" for c in ("q", "k", "v", "p")]


def distinct_operands(q: fx.Node, k: fx.Node, p: fx.Node, v: fx.Node) -> str | None:
    """Why a hand-written site's operands cannot be quantized separately, or None."""
    if q is k:
        return "Q·Kᵀ multiplies a tensor by itself: its two operands cannot be quantized separately"
    if p is v:
        return "P·V multiplies a tensor by itself: its two operands cannot be quantized separately"
    return None


def sdpa_site_args(gm: fx.GraphModule, view: GraphView, node: fx.Node,
                   per_head: bool) -> tuple[dict[str, Any], list[str], int | None, int | None] | str:
    """A ``scaled_dot_product_attention`` node's arguments by name, the notes for the site's record and
    the head axes of Q and K (None: per-tensor scales); or why a quantized attention pass skips it."""
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
    defaults = (None, None, None, None, 0.0, False)
    a = {nm: view.arg(node, i, nm, d) for i, (nm, d) in enumerate(zip(names, defaults))}
    # scale and enable_gqa are keyword-only in torch's signature
    a["scale"], a["enable_gqa"] = node.kwargs.get("scale"), node.kwargs.get("enable_gqa", False)
    if not isinstance(a["dropout_p"], (int, float)):
        return "dropout_p is not a constant"
    if a["dropout_p"] > 0 and gm.training:
        return (f"dropout_p={a['dropout_p']:g} in a graph in training mode: the decomposition does not "
                "reproduce dropout (capture the model in eval mode)")
    notes: list[str] = []
    if a["dropout_p"] > 0:
        notes.append(f"dropout_p={a['dropout_p']:g} ignored (inference)")
    rank_q, rank_k = view.ndim(a["query"]), view.ndim(a["key"])
    head_q = rank_q - 3 if rank_q is not None and rank_q >= 4 else None
    head_k = rank_k - 3 if rank_k is not None and rank_k >= 4 else None
    if per_head and (head_q is None or head_k is None):
        known = rank_q is not None and rank_k is not None
        notes.append(f"per-tensor scales: {rank_q}-d query / {rank_k}-d key have no head axis" if known
                     else "per-tensor scales: the rank of query/key is unknown (graph without shapes)")
        head_q = head_k = None
    return a, notes, head_q, head_k


def substitute_sdpa(gm: fx.GraphModule, site: Site, args: dict[str, Any], prefix: str, module: nn.Module,
                    pass_name: str, **record: Any) -> SiteRecord:
    """Call ``module`` (added to ``gm`` under ``prefix``) with the SDPA node's ``args`` in its place; the
    site's record (``record``: more ``SiteRecord`` fields) names the module and its quantizers."""
    node = site.nodes["sdpa"]
    name = add_site_module(gm, prefix, module)
    kwargs = {k: args[k] for k in ("attn_mask", "is_causal", "scale", "enable_gqa")}
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(name, (args["query"], args["key"], args["value"]), kwargs)
    copy_meta(new, node)
    old_name = node.name
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return SiteRecord(site.id, "attention", site.module, pass_name, quantizer_paths(name), probe=new.name,
                      reference=old_name, **record)


Handler = Callable[[fx.GraphModule, GraphView, Site], "tuple[SiteRecord, str] | str"]


def rewrite_sites(name: str, gm: fx.GraphModule, ctx: PassContext, sites: Iterable[Site],
                  handlers: dict[str, Handler], declined: str | None = None) -> PassResult:
    """Rewrite each attention site of ``sites`` with the handler for its variant (``"sdpa"``,
    ``"manual"``): a handler returns ``(SiteRecord, reason)`` or the reason it skips the site. Every
    site gets its diagnostic; ``declined`` skips them all with that reason. Returns the PassResult."""
    view = GraphView(gm)
    diags: list[Diagnostic] = []
    modified = False
    for site in sites:
        if site.kind != "attention":
            continue
        handler = handlers.get(site.variant)
        outcome = declined or (handler(gm, view, site) if handler else f"unknown attention variant '{site.variant}'")
        if isinstance(outcome, str):
            diags.append(Diagnostic(name, site.id, "skipped", outcome, site.module, site.kind))
            continue
        record, reason = outcome
        ctx.register(record)
        diags.append(Diagnostic(name, site.id, "applied", reason, site.module, site.kind))
        modified = True
    if modified:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, modified, diags)
