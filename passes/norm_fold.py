"""Exact norm folds: γ/β into the linear layers that read the norm, LayerNorm → RMSNorm on centred streams.

Before:  y = γ ⊙ (x − μ(x)) / √(var(x) + eps) + β,     z = W y + b        (every reader of y a linear)
After:   y = x / √(mean(x²) + eps),                     z = (W diag γ) y + (b + W β)
         with every writer of the residual stream x centred over the channel axis:
         W_out ← C W_out, b_out ← C b_out, E ← E C (embeddings, position tables, class tokens),
         C = I − 11ᵀ/d, so μ(x) = 0 and var(x) = mean(x²): the LayerNorm *is* an RMSNorm.
RMSNorm sites get the γ fold only (RMSNorm is not invariant to the mean, nothing to centre).

Identities (SliceGPT, Ashkboos et al. 2024): a norm's affine is a diagonal map followed by a shift,
so it commutes into the next linear map; LayerNorm(x + c·1) = LayerNorm(x), so the mean of the stream
can be removed anywhere upstream of the norms without changing any norm's output — and removing it
at the writers (weights whose output rows are summed into x) makes the stream zero-mean everywhere.

Skipped when (each with its reason in the diagnostic):
* γ/β fold: a reader of the norm's output is not a linear/addmm with constant weights (through
  views, casts, slices that keep the channel axis) — e.g. the residual add of a post-norm block, or
  the model output; the norm's weight/bias/eps are not constants; the norm spans several axes.
* LayerNorm → RMSNorm: a writer of the stream cannot be centred (a value computed at run time, the
  normalised output γ ⊙ n̂ + β of a post-norm block, whose channel mean no weight can remove), or a
  reader of the stream is not invariant to its mean (a non-LayerNorm consumer, the model output).
  The γ/β fold still applies then, with the LayerNorm kept (without its affine).

Exact rewrite: the pass registers no guarded site (there is nothing for the guard to decide, and a
fold cannot be switched off without keeping both weight sets); it applies identically on every run,
including the pipeline's rebuild, and reports one diagnostic per norm. Constants are replaced by new
parameters (``<name>_folded``, ``<name>_centred``); tied weights are untied where a fold needs it.
Each norm it rewrites carries ``node.meta["surgeon"] = {"pass": "norm-fold", "residual_centred": bool}``
(True where the residual stream was centred) for later passes to read. The graph walks that decide
where a fold or the centring applies are passes/_norm_stream.py; norm anatomy passes/_norm_math.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, fx

from surgeon.analysis import GraphView, analyze_graph, site_id
from surgeon.pass_manager import Diagnostic, Pass, PassContext, PassResult
from surgeon.passes._fx import copy_meta
from surgeon.passes._norm_math import NormParts, constant_of, drop_unused, find_norms, set_constant
from surgeon.passes._norm_stream import Closure, affine_readers, stream_reader_problem

__all__ = ["NormFold"]

aten = torch.ops.aten


def _f64(t: Tensor) -> Tensor:
    return t.detach().to(torch.float64)


def _fold_into(gm: fx.GraphModule, leaf: fx.Node, kind: str, gamma: Tensor | None, beta: Tensor | None) -> None:
    """Rewrite one reader: W ← W diag γ, b ← b + W β (addmm keeps W as [in, out])."""
    if kind == "linear":
        w_node = leaf.args[1]
        b_node = leaf.args[2] if len(leaf.args) > 2 else leaf.kwargs.get("bias")
        W = constant_of(gm, w_node)
        w = _f64(W)
        shift = w @ _f64(beta) if beta is not None else None
        if gamma is not None:
            set_constant(gm, leaf, w_node, (w * _f64(gamma)[None, :]).to(W.dtype), "folded")
    else:
        b_node, w_node = leaf.args[0], leaf.args[2]
        W = constant_of(gm, w_node)
        w = _f64(W)
        shift = _f64(beta) @ w if beta is not None else None
        if gamma is not None:
            set_constant(gm, leaf, w_node, (_f64(gamma)[:, None] * w).to(W.dtype), "folded")
    if shift is None:
        return
    if b_node is not None:
        b = constant_of(gm, b_node)
        set_constant(gm, leaf, b_node, (_f64(b) + shift).to(b.dtype), "folded")
        return
    new = set_constant(gm, leaf, None, shift.to(W.dtype), "folded_bias", base=str(w_node.target))
    args = list(leaf.args) + [None] * (3 - len(leaf.args))
    args[2] = new
    leaf.args = tuple(args)
    leaf.kwargs = {k: v for k, v in leaf.kwargs.items() if k != "bias"}


# --------------------------------------------------------------------------------------------------
# the pass
# --------------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    parts: NormParts
    site: str
    kind: str
    readers: list[tuple[fx.Node, str]] | None = None
    fold_reason: str = ""
    centred: bool = False
    centre_reason: str = ""
    closure: Closure | None = None


@dataclass(frozen=True)
class NormFold(Pass):
    """Fold norm affines into the next linear layers; LayerNorm → RMSNorm where the stream can be centred."""

    name: ClassVar[str] = "norm-fold"
    # its contract examples (tests/test_pass_contract.py): a model with its sites, then near-misses
    examples: ClassVar[tuple[str, ...]] = ("_pass_examples:transformer_post", "_pass_examples:transformer_post")
    example_spec: ClassVar[str] = "norm-fold{rmsnorm=False}"  # a non-default option
    rmsnorm: bool = True  # convert LayerNorm to RMSNorm by centring the writers of the residual stream
    affine: bool = True  # fold γ/β into the linear layers that read the norm

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        view = GraphView(gm)
        sites = {s.nodes["norm"]: s for s in analyze_graph(gm).by_kind("norm_residual")}
        plans: list[_Plan] = []
        diags: list[Diagnostic] = []
        for nm, parts in find_norms(gm, view):
            site = sites.get(nm.node)
            kind = "norm_residual" if site else "norm"
            sid = site.id if site else site_id("norm", view.module_path(nm.node), nm.node.name)
            if isinstance(parts, str):
                diags.append(Diagnostic(self.name, sid, "skipped", f"{nm.flavor}: {parts}",
                                        view.module_path(nm.node), kind))
                continue
            plans.append(_Plan(parts, sid, kind))

        for p in plans:
            if self.affine:
                r = affine_readers(gm, view, p.parts.node)
                if isinstance(r, str):
                    p.fold_reason = r
                else:
                    p.readers = r
            else:
                p.fold_reason = "γ/β folding is off (affine=False)"
        self._plan_centring(gm, view, plans)

        writers: dict[fx.Node, None] = {}
        for p in plans:
            if p.centred:
                writers.update(dict.fromkeys(p.closure.writers))
        centre_plan: dict[tuple[fx.Node, fx.Node], int] = {}
        for p in plans:
            if p.centred:
                centre_plan.update(p.closure.plan)
        for (user, c), axis in centre_plan.items():
            t = constant_of(gm, c)
            w = _f64(t)
            set_constant(gm, user, c, (w - w.mean(axis, keepdim=True)).to(t.dtype), "centred")

        modified = bool(centre_plan)
        for p in plans:
            changed = self._rewrite(gm, p)
            modified |= changed
            diags.append(self._diagnostic(view, p, changed))
        if writers:
            names = sorted({str(w.target) if w.op == "get_attr" else view.module_path(w) or w.name for w in writers})
            diags.append(Diagnostic(self.name, None, "applied",
                                    f"centred {len(writers)} writer(s) of the residual stream: {', '.join(names)}"))
        gm.recompile()
        return PassResult(gm, modified, diags)

    # -- planning -----------------------------------------------------------------------------------
    def _plan_centring(self, gm: fx.GraphModule, view: GraphView, plans: list[_Plan]) -> None:
        candidates = []
        for p in plans:
            if p.parts.flavor != "layernorm":
                continue
            if not self.rmsnorm:
                p.centre_reason = "LayerNorm → RMSNorm is off (rmsnorm=False)"
                continue
            cl = Closure(gm, view)
            why = cl.centre(p.parts.x, -1)
            if why:
                p.centre_reason = f"the mean subtraction cannot move into the writers: {why}"
            else:
                p.closure = cl
                candidates.append(p)
        # A centred value must only be read by centred values or by LayerNorms (mean-invariant).
        invariant = {n for p in plans if p.parts.flavor == "layernorm" for n in p.parts.core}
        while candidates:
            nodes = {n for p in candidates for n in p.closure.axis}
            problem = stream_reader_problem(view, nodes, invariant)
            if problem is None:
                break
            bad, why = problem
            for p in [p for p in candidates if bad in p.closure.axis]:
                p.centre_reason = f"the mean subtraction cannot move into the writers: {why}"
                candidates.remove(p)
        for p in candidates:
            p.centred = True

    # -- rewriting ----------------------------------------------------------------------------------
    def _rewrite(self, gm: fx.GraphModule, p: _Plan) -> bool:
        parts, g = p.parts, gm.graph
        fold = p.readers is not None and (parts.weight is not None or parts.bias is not None)
        if not fold and not p.centred:
            return False
        gamma = constant_of(gm, parts.weight) if parts.weight is not None else None
        beta = constant_of(gm, parts.bias) if parts.bias is not None else None
        if fold:
            for leaf, kind in p.readers:
                _fold_into(gm, leaf, kind, gamma, beta)
        w = None if fold else parts.weight
        with g.inserting_before(parts.node):
            if p.centred or parts.flavor == "rmsnorm":
                new = g.call_function(aten.rms_norm.default, (parts.x, [parts.dim], w, parts.eps))
            else:
                new = g.call_function(aten.layer_norm.default, (parts.x, [parts.dim], w, None, parts.eps))
            copy_meta(new, parts.node)
            # what later passes read (norm-gate: the stream is centred, the original has no equal value)
            new.meta["surgeon"] = {"pass": self.name, "residual_centred": p.centred}
            out = new
            if not fold and parts.bias is not None:
                out = g.call_function(aten.add.Tensor, (new, parts.bias))
                copy_meta(out, parts.node)
        parts.node.replace_all_uses_with(out)
        drop_unused(gm, parts.core)
        return True

    def _diagnostic(self, view: GraphView, p: _Plan, changed: bool) -> Diagnostic:
        parts = p.parts
        label = "LayerNorm" if parts.flavor == "layernorm" else "RMSNorm"
        if not changed:
            reasons = [r for r in (p.fold_reason, p.centre_reason) if r] or ["it has no γ/β to fold"]
            return Diagnostic(self.name, p.site, "skipped", f"{label}: " + "; ".join(reasons), parts.module, p.kind)
        done = []
        if p.centred:
            done.append("LayerNorm → RMSNorm (the residual stream is centred at its writers)")
        if p.readers is not None:
            mods = sorted({view.module_path(leaf) or leaf.name for leaf, _ in p.readers})
            what = "γ/β" if parts.bias is not None else "γ"
            done.append(f"{label} {what} folded into {len(p.readers)} linear layer(s): {', '.join(mods)}"
                        if parts.weight is not None or parts.bias is not None else f"{label} has no affine to fold")
        else:
            done.append(f"γ/β kept: {p.fold_reason}")
        if parts.flavor == "layernorm" and not p.centred:
            done.append(f"mean subtraction kept: {p.centre_reason}")
        return Diagnostic(self.name, p.site, "applied", "; ".join(done), parts.module, p.kind)
