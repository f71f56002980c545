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
(True where the residual stream was centred) for later passes to read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, fx

from surgeon.analysis import GraphView, analyze_graph, site_id
from surgeon.pass_manager import Diagnostic, Pass, PassContext, PassResult
from surgeon.passes._fx import copy_meta
from surgeon.passes._norm_math import NormParts, constant_of, drop_unused, find_norms, set_constant

__all__ = ["NormFold"]

_PASS_THROUGH = {"to", "clone", "contiguous", "alias", "detach", "identity"}
_RESHAPES = {"view", "reshape", "_unsafe_view"}
aten = torch.ops.aten


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
class _Closure:
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
            why = self.const(n, w, 1) or self.const(n, b, b_axis(constant_of(self.gm, b)))
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


def b_axis(t: Tensor | None) -> int:
    return 0 if t is None or t.dim() <= 1 else t.dim() - 1


def _stream_reader_problem(view: GraphView, nodes: set[fx.Node], invariant: set[fx.Node]) -> tuple[fx.Node, str] | None:
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
def _affine_readers(gm: fx.GraphModule, view: GraphView, out: fx.Node) -> list[tuple[fx.Node, str]] | str:
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
    closure: _Closure | None = None


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
                r = _affine_readers(gm, view, p.parts.node)
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
            cl = _Closure(gm, view)
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
            problem = _stream_reader_problem(view, nodes, invariant)
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
