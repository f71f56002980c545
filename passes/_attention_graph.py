"""Graph facts about an attention site that more than one attention pass needs.

``shift_preserving`` says whether centring K (subtracting its mean over the keys, which shifts each
row of Q·Kᵀ by −q·k̄) leaves the softmax unchanged: true when every op from Q·Kᵀ to the softmax maps a
per-row shift to a per-row shift. attention-fp8 and attention-int8 both ask it (passes never import
each other, so it lives here).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import networkx as nx
import torch
from torch import fx

from surgeon.analysis import GraphView

__all__ = ["ROW_VIEWS", "fresh_name", "rewrite_sites", "scalar_like", "sdpa_site_args", "shift_preserving"]

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


def fresh_name(gm: fx.GraphModule, prefix: str) -> str:
    """``prefix`` + the first index no child of ``gm`` is called yet."""
    taken = {n for n, _ in gm.named_children()}
    i = 0
    while f"{prefix}{i}" in taken:
        i += 1
    return f"{prefix}{i}"


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


def rewrite_sites(name: str, gm: fx.GraphModule, ctx: Any, sites: Iterable[Any],
                  handlers: dict[str, Callable[[fx.GraphModule, GraphView, Any], Any]],
                  declined: str | None = None) -> Any:
    """Rewrite each attention site of ``sites`` with the handler for its variant (``"sdpa"``,
    ``"manual"``): a handler returns ``(SiteRecord, reason)`` or the reason it skips the site. Every
    site gets its diagnostic; ``declined`` skips them all with that reason. Returns the PassResult."""
    from surgeon.pass_manager import Diagnostic, PassResult

    view = GraphView(gm)
    diags: list[Any] = []
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
