"""Coupling sites: normalizing-flow transforms with an exact analytic inverse.

A *transform chain* is ``u → y`` through elementwise ``mul/div/add/sub`` whose other operands are
*conditioner values*: functions of a parametric network's outputs only (through slicing, exp,
sigmoid, softplus, soft clamps, constants). Then:

* ``affine`` / ``additive`` coupling: the conditioner does not depend on ``u``, except through values
  that are merged into the output unchanged (the other half, or the half a two-sided block already
  transformed), and ``y`` is merged with them by ``cat``/``stack``, indexed writes (``index_put``,
  ``copy_``, scatter) or complementary masks (``x·m + (1−m)·y``).
* ``autoregressive``: the conditioner depends on ``u`` itself through masked linear layers only
  (``W ⊙ M``, MADE) — the transform is invertible one dimension at a time.

Anything else (a gate ``x·σ(Wx)`` in a transformer, a residual add) is not a coupling. A linear layer
with a frozen orthogonal weight (a permutation: FrEIA ``AllInOneBlock``) is not a conditioner network:
its output is the flow's data, which the next coupling transforms.
"""

from __future__ import annotations

import networkx as nx
import torch
from torch import fx

from ._graph import VIEWS, GraphView
from .sites import NearMiss, Site

_UNARY_HEAD = {"exp", "sigmoid", "softplus", "tanh", "atan", "abs", "neg", "log", "logsigmoid", "clamp",
               "clamp_min", "clamp_max", "hardtanh", "to", "dropout", "exp2", "sqrt", "reciprocal", "square",
               # NaN guards on the conditioner's output (normflows: where(isfinite(s), s, nan))
               "isfinite", "isnan", "isinf", "nan_to_num", "logical_not"}
_SLICING = {"slice", "select", "getitem", "split", "index", "index_select", "narrow"} | VIEWS
_BINARY = {"add", "sub", "mul", "div", "rsub", "pow", "maximum", "minimum", "where"}
_CHAIN = {"mul", "div", "add", "sub"}
# Joins and reductions of conditioner values are still conditioner values (GIN: s − mean(s)).
_JOIN_REDUCE = {"cat", "stack", "flip", "roll", "mean", "sum", "amax", "amin", "logsumexp", "cumsum"}
_MERGE_WRITES = {"index_put", "copy", "slice_scatter", "select_scatter", "index_copy", "scatter", "masked_scatter"}
_SCALE_FNS = ("exp", "sigmoid", "softplus", "tanh", "atan", "exp2")


def _fixed_mixing(view: GraphView, n: fx.Node) -> bool:
    """A linear layer whose weight is a frozen (``requires_grad=False``) orthogonal square matrix:
    a fixed rotation or permutation of the flow's data (FrEIA ``AllInOneBlock``'s soft permutation,
    inverted by its transpose), not a conditioner network. What it outputs is still the data a later
    coupling transforms; counted as a network, every value after it would look like a conditioner
    value and the next block's coupling would have no transformed operand."""
    if view.op(n) != "linear":
        return False
    w: object = view.arg(n, 1, "weight")
    if n.op == "call_module":
        w = getattr(view.module_of(n), "weight", None)
    elif isinstance(w, fx.Node):
        w = view.constant(w)
    if not isinstance(w, torch.Tensor) or w.requires_grad or w.dim() != 2 or w.shape[0] != w.shape[1]:
        return False
    with torch.no_grad():
        wd = w.detach().double()
        # an orthogonal W keeps every vector's norm: one O(n²) product rules out the frozen weights
        # of a loaded network (a .pt2 program's) before the O(n³) check
        v = torch.ones(wd.shape[1], dtype=torch.float64)
        if abs(float((wd @ v).norm()) - float(v.norm())) > 1e-3 * float(v.norm()):
            return False
        return bool(torch.allclose(wd @ wd.T, torch.eye(wd.shape[0], dtype=torch.float64), atol=1e-4))


def _parametric(view: GraphView, n: fx.Node) -> bool:
    """A layer with a constant weight: Linear/Conv, or a matmul with a parameter operand (a fixed
    orthogonal mixing of the data is not one: ``_fixed_mixing``)."""
    op = view.op(n)
    if op == "linear" and _fixed_mixing(view, n):
        return False
    if op in ("linear", "conv"):
        return True
    if op in ("addmm", "mm", "matmul", "bmm", "einsum"):
        ins = [a for a in n.all_input_nodes]
        return any(not view.is_dynamic(a) for a in ins) and any(view.is_dynamic(a) for a in ins)
    return bool(op and op.startswith("module:")) and any(
        isinstance(p, torch.nn.Parameter) for p in view.module_of(n).parameters(recurse=False))


def _masked_weight(view: GraphView, n: fx.Node) -> bool:
    """The layer's weight is ``W ⊙ M`` with M a constant 0/1 mask (MADE's masked linear)."""
    if view.op(n) != "linear":
        return False
    w = view.arg(n, 1, "weight")
    if not isinstance(w, fx.Node) or view.op(w) != "mul" or view.is_dynamic(w):
        return False
    for a in w.args:
        t = view.constant(a) if isinstance(a, fx.Node) else None
        if t is not None and t.numel() and bool(((t == 0) | (t == 1)).all()) and bool((t == 0).any()):
            return True
    return False


class _Finder:
    def __init__(self, view: GraphView) -> None:
        self.v = view
        self._cond: dict[fx.Node, bool] = {}

    def conditioner(self, n: object) -> bool:
        """True when ``n`` is computed from parametric-layer outputs only (plus constants)."""
        v = self.v
        if not isinstance(n, fx.Node) or not v.is_dynamic(n):
            return False
        if n in self._cond:
            return self._cond[n]
        self._cond[n] = False  # cycle guard
        op = v.op(n)
        if _parametric(v, n):
            res = True
        elif op in _UNARY_HEAD or op in _SLICING or op in _BINARY or op in _JOIN_REDUCE:
            dyn = [a for a in n.all_input_nodes if v.is_dynamic(a)]
            res = bool(dyn) and all(self.conditioner(a) for a in dyn)
        else:
            res = False
        self._cond[n] = res
        return res

    def sources(self, c: fx.Node) -> set[fx.Node]:
        """The parametric layers whose outputs the conditioner value ``c`` is computed from."""
        out, todo, seen = set(), [c], set()
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            if _parametric(self.v, n):
                out.add(n)
            else:
                todo += [a for a in n.all_input_nodes if self.conditioner(a)]
        return out

    def chain_step(self, n: fx.Node) -> tuple[fx.Node, fx.Node] | None:
        """If ``n`` is u ∘ c with exactly one conditioner operand c: return (u, c)."""
        v = self.v
        if v.op(n) not in _CHAIN or len(n.args) < 2:
            return None
        a, b = n.args[0], n.args[1]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node) and v.is_dynamic(a) and v.is_dynamic(b)):
            return None
        ca, cb = self.conditioner(a), self.conditioner(b)
        if ca == cb:
            return None

        if v.op(n) in ("div", "sub") and ca:  # c / u or c − u do not transform u affinely by c
            return None
        return (b, a) if ca else (a, b)


def _scale_fn(view: GraphView, c: fx.Node) -> str:
    seen, todo = set(), [c]
    while todo:
        n = todo.pop()
        if n in seen or not isinstance(n, fx.Node):
            continue
        seen.add(n)
        if view.op(n) in _SCALE_FNS:
            return view.op(n)
        if _parametric(view, n):
            continue
        todo += [a for a in n.all_input_nodes if view.is_dynamic(a)]
    return "linear"


def _merge(view: GraphView, y: fx.Node) -> tuple[str, fx.Node | None, list[fx.Node]]:
    """How ``y`` is merged into the transform's output: (kind, merge node, the other merged values)."""
    skip = {"to", "dropout"} | VIEWS
    frontier, seen = [y], set()
    for _ in range(4):
        nxt = []
        for n in frontier:
            for u in view.users(n):
                if u in seen:
                    continue
                seen.add(u)
                op = view.op(u)
                if op in ("cat", "stack"):
                    parts = u.args[0] if isinstance(u.args[0], (list, tuple)) else []
                    others = [view.skip_back(p, skip) for p in parts if isinstance(p, fx.Node) and p is not n]
                    return op, u, others
                if op in _MERGE_WRITES:
                    base = view.skip_back(u.args[0], skip | {"slice", "select"}) if isinstance(u.args[0], fx.Node) else None
                    writes = [w for w in view.nodes if view.op(w) in _MERGE_WRITES and isinstance(w.args[0], fx.Node)
                              and view.skip_back(w.args[0], skip | {"slice", "select"}) is base]
                    vals = [w.args[2] if view.op(w) in ("index_put", "index_copy", "scatter") and len(w.args) > 2
                            else w.args[1] for w in writes]
                    others = [view.skip_back(x, skip) for x in vals if isinstance(x, fx.Node) and x is not n]
                    return "indexed-write", u, others
                if op == "where":
                    others = [a for a in u.args[1:3] if isinstance(a, fx.Node) and a is not n and view.is_dynamic(a)]
                    return "where", u, others
                if op == "add" and all(isinstance(a, fx.Node) for a in u.args[:2]):
                    other = u.args[1] if u.args[0] is n else u.args[0]
                    if _masked_by_constant(view, n) or _masked_by_constant(view, other):
                        src = other.args[0] if view.op(other) == "mul" and view.is_dynamic(other.args[0]) else other
                        src = other.args[1] if view.op(other) == "mul" and not view.is_dynamic(other.args[0]) else src
                        return "mask", u, [other, src]
                if op in skip or (op == "mul" and _masked_by_constant(view, u)):
                    nxt.append(u)
        frontier = nxt
    return "none", None, []


def _masked_by_constant(view: GraphView, n: object) -> bool:
    return isinstance(n, fx.Node) and view.op(n) == "mul" and any(
        isinstance(a, fx.Node) and not view.is_dynamic(a) for a in n.args[:2])


def find_couplings(view: GraphView) -> tuple[list[Site], list[NearMiss]]:
    f = _Finder(view)
    steps: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}
    for n in view.nodes:
        st = f.chain_step(n)
        if st is not None:
            steps[n] = st
    # Maximal chains. A step continues the chain ending at ``cur`` only if its conditioner does not
    # depend on ``cur``: in a stack of autoregressive transforms the next one conditions on the
    # previous output, so it starts a transform of its own.
    def continues(cur: fx.Node) -> fx.Node | None:
        nxt = [w for w in view.users(cur) if w in steps and steps[w][0] is cur and not view.has_path(cur, steps[w][1])]
        return nxt[0] if len(nxt) == 1 else None

    continued = {w for cur in steps if (w := continues(cur)) is not None}
    sites: list[Site] = []
    misses: list[NearMiss] = []
    for start, (u, c0) in steps.items():
        if start in continued:
            continue
        # A transform's input never comes out of its own conditioner network (x·cos + rotate(x)·sin
        # in rotary embeddings: both terms are one projection's output).
        if any(view.has_path(p, u) for p in f.sources(c0)):
            continue
        chain, cur = [start], start
        while (cur := continues(cur)) is not None:
            chain.append(cur)
        y, conds = chain[-1], [steps[c][1] for c in chain]
        affine = any(view.op(c) in ("mul", "div") for c in chain)
        scale = next((_scale_fn(view, steps[c][1]) for c in chain if view.op(c) in ("mul", "div")), None)
        module = _site_module(view, y, conds)
        depends = any(view.has_path(u, c) for c in conds)
        details = {"scale": scale, "chain": [c.name for c in chain]}
        if depends:
            between = set(nx.descendants(view.G, u)) & set().union(*(nx.ancestors(view.G, c) for c in conds))
            layers = [n for n in between if _parametric(view, n)]
            if layers and all(_masked_weight(view, n) for n in layers):
                sites.append(Site("coupling", module, "autoregressive", {"input": u, "output": y},
                                  {"x": view.shape(u)}, {**details, "masked_layers": len(layers)}))
                continue
        kind, merge, others = _merge(view, y)
        if merge is None:
            if affine and scale in _SCALE_FNS:
                misses.append(NearMiss("coupling", module, y.name,
                                       f"affine transform u·{scale}(…) whose result is not merged with the "
                                       "conditioning part (no cat, indexed write or mask merge)"
                                       + ("; its conditioner depends on u through unmasked layers" if depends else "")))
            continue
        if depends:
            keep = {o for o in others if o is not u}
            g = view.G.subgraph([n for n in view.G if n not in keep])
            if any(nx.has_path(g, u, c) for c in conds if c in g and u in g):
                misses.append(NearMiss("coupling", module, y.name,
                                       "conditioner depends on the transformed part itself (not through a merged, "
                                       "unchanged half, nor through masked layers): no analytic inverse"))
                continue
        sites.append(Site("coupling", module, "affine" if affine else "additive",
                          {"input": u, "output": y, "merge": merge}, {"x": view.shape(u)},
                          {**details, "merge": kind}))
    return sites, misses


def _site_module(view: GraphView, y: fx.Node, conds: list[fx.Node]) -> str:
    """The module that owns the transform: y's module, or the parent of its conditioner net."""
    own = view.module_path(y)
    if own:
        return own
    paths = []
    for c in conds:
        for n in [c, *view.ancestors(c)]:
            if _parametric(view, n) and view.module_path(n):
                paths.append(view.module_path(n).split("."))
    if not paths:
        return ""
    common = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    if len(common) == min(len(p) for p in paths):  # all from one layer: its parent owns the net
        common = common[:-1]
    return ".".join(common[:-1]) if common else ""
