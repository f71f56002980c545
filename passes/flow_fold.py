"""Constant-fold the parameter-only terms of a flow's log-determinant (exact).

Before:  log_det = … + Σ log|s| · H·W + log|det W| · H·W + log|det P| + …   (recomputed every call)
After:   log_det = … + c₁ · H·W + c₂ · H·W + c₃ + …   with cᵢ buffers computed once, with the graph's own
         ops and dtypes (so the outputs are bit-identical to the original's).
The fold is generic: a maximal subgraph whose inputs are only parameters, buffers and literals
(ActNorm's Σ log-scale, slogdet of an invertible 1×1 convolution's weight, slogdet of a permutation
matrix = 0, Glow's LU Σ log|diag U|) is replaced by its value, wherever that subgraph feeds a
log-det output. Anything that reads an input — even only its shape (the H·W factor) — stays.

A flow returns ``(z, log_det)`` (log-dets: every output after the first). One site per folded value:
``flow_logdet:<module>:<node>``; the guard compares the buffer with the recomputed value (exact).

Skipped when: the model returns a single output (no log-det to fold); no parameter-only value with
arithmetic in it feeds a log-det (coupling and autoregressive log-dets depend on the input); the
parameter-only value is not a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import fx

from surgeon.analysis import SHAPE_OPS, GraphView, site_id
from surgeon.pass_manager import Diagnostic, Pass, PassContext, PassResult, SiteRecord
from surgeon.passes._flows import ancestors, computes, evaluate, module_of, output_leaves, parameter_only

__all__ = ["FlowFold", "PREFIX"]

PREFIX = "surgeon_flow_fold_"
KIND = "flow_logdet"


@dataclass(frozen=True)
class FlowFold(Pass):
    """Fold parameter-only log-det terms of a normalizing flow into constant buffers (no options)."""

    name: ClassVar[str] = "flow-fold"
    # its contract examples (tests/test_pass_contract.py): a model with its sites, then near-misses
    examples: ClassVar[tuple[str, ...]] = ("_pass_examples:glow", "_pass_examples:flow")

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        leaves = [n for n in output_leaves(gm) if isinstance(n, fx.Node)]
        if len(leaves) < 2:
            return PassResult(gm, False, [Diagnostic(
                self.name, None, "skipped", "the model returns a single output, so there is no log-det to fold "
                "(a flow's forward returns (z, log_det))")])
        params = parameter_only(gm)
        on_logdet = ancestors(leaves[1:])
        is_term = _TermTest(gm, leaves[0], set(leaves[1:]))
        # Fold points: the frontier of each parameter-only subgraph (something not parameter-only
        # reads it) that is a log-det *term* and costs arithmetic to recompute.
        frontier = [n for n in gm.graph.nodes
                    if n in params and n in on_logdet and n.op != "get_attr"
                    and any(u not in params for u in n.users) and computes(n, params) and is_term(n)]
        if not frontier:
            return PassResult(gm, False, [Diagnostic(
                self.name, None, "skipped", "no parameter-only term feeds the log-det (coupling and autoregressive "
                "log-dets depend on the input): nothing to fold")])
        diags: list[Diagnostic] = []
        wanted = []
        for n in frontier:
            site = site_id(KIND, module_of(n), n.name)
            if ctx.wants(site):
                wanted.append((site, n))
        values = evaluate(gm, [n for _, n in wanted], params)
        used = {str(t) for t in (getattr(gm, "_buffers", {}) or {})}
        index = 0
        modified = False
        for site, n in wanted:
            module = module_of(n)
            value = values[n]
            if not isinstance(value, torch.Tensor):
                diags.append(Diagnostic(self.name, site, "skipped", f"the parameter-only value {n.name} is a "
                                        f"{type(value).__name__}, not a tensor", module, KIND))
                continue
            while f"{PREFIX}{index}" in used or hasattr(gm, f"{PREFIX}{index}"):
                index += 1
            attr = f"{PREFIX}{index}"
            used.add(attr)
            gm.register_buffer(attr, value.detach().clone())
            with gm.graph.inserting_before(n):
                const = gm.graph.get_attr(attr)
            const.meta.update({k: v for k, v in n.meta.items() if k in ("val", "tensor_meta", "nn_module_stack")})
            original = n.name
            n.replace_all_uses_with(const)
            desc = _describe(n, params)
            ctx.register(SiteRecord(site, KIND, module, self.name, [], probe=const.name, reference=original))
            diags.append(Diagnostic(self.name, site, "applied", f"{desc} folded into buffer {attr} "
                                    f"(shape {list(value.shape)})", module, KIND))
            modified = True
        if modified:
            _erase_dead(gm, params)
            gm.graph.lint()
            gm.recompile()
        return PassResult(gm, modified, diags)


class _TermTest:
    """Is a parameter-only value an additive log-det term?

    Follow its users while they do not depend on input *values* (an ``expand`` to the batch size, a
    product with H·W read from the input's shape); the first value-dependent users must be
    additions on the log-det path only (the accumulation ``log_det + term``), or the value must reach
    a log-det output directly. ``(1 − mask)·s`` in a coupling's log-det is not a term (it multiplies an
    input-dependent s), nor is ActNorm's ``exp(log s)`` (it scales z)."""

    def __init__(self, gm: fx.GraphModule, z: fx.Node, logdets: set[fx.Node]) -> None:
        self.view = GraphView(gm)
        self.z_path = ancestors([z])
        self.logdets = logdets

    def __call__(self, n: fx.Node) -> bool:
        view, todo, seen = self.view, [n], set()
        while todo:
            cur = todo.pop()
            if cur in seen:
                continue
            seen.add(cur)
            for u in cur.users:
                if u.op == "output":
                    if cur not in self.logdets:
                        return False
                elif u in self.z_path:
                    return False
                elif view.op(u) in SHAPE_OPS:
                    continue
                elif view.is_dynamic(u):
                    if view.op(u) not in ("add", "sub") or (view.op(u) == "sub" and u.args[0] is not cur):
                        return False
                else:
                    todo.append(u)
        return True


def _describe(n: fx.Node, params: set[fx.Node]) -> str:
    """The ops of the folded subgraph, e.g. ``linalg_slogdet → getitem``."""
    from surgeon.passes._flows import op_name

    ops, todo, seen = [], [n], set()
    while todo:
        cur = todo.pop()
        if cur in seen or cur.op == "get_attr":
            continue
        seen.add(cur)
        ops.append(op_name(cur))
        todo += [i for i in cur.all_input_nodes if i in params]
    return "parameter-only " + " ← ".join(dict.fromkeys(ops))


def _erase_dead(gm: fx.GraphModule, params: set[fx.Node]) -> None:
    """Erase the parameter-only nodes nothing reads any more (a fold leaves its subgraph dead; a
    slogdet's unused sign output would otherwise keep the slogdet alive)."""
    for n in reversed(list(gm.graph.nodes)):
        if n in params and not n.users:
            gm.graph.erase_node(n)
