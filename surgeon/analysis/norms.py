"""Norm + residual sites: LayerNorm / RMSNorm (library or hand-written) tied to a residual connection.

* pre-norm: the norm reads the residual stream ``x`` and an add ``x + G(norm(x))`` closes its branch;
  ``parallel`` when one add closes the branches of several norms reading the same ``x`` (GPT-NeoX,
  GPT-J).
* post-norm: the norm's input is a residual add ``x + F(x)`` (F's input derives from x) that no pre-norm
  owns — the add that closes a pre-norm branch is that pre-norm's, so the final norm of a pre-norm stack
  reading it is not a post-norm.

Hand-written RMSNorm (Llama, T5): ``x * rsqrt(mean(x², -1) + eps) [* w]``, also with ``1/sqrt`` or a
division by ``sqrt``; hand-written LayerNorm: ``(x - mean(x)) / sqrt(var(x) + eps)``.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from ._graph import GraphView
from .sites import NearMiss, Site

_CASTS = {"to"}


@dataclass
class Norm:
    node: fx.Node  # the norm's output (after the affine weight when hand-written)
    x: fx.Node  # the value normalised (casts skipped)
    flavor: str  # layernorm | rmsnorm
    written: str  # library | hand-written


def all_norms(view: GraphView) -> list[Norm]:
    """Every LayerNorm / RMSNorm of the graph: library calls first, then hand-written ones."""
    return _library(view) + _hand_written(view)


def _reduction_of_square(view: GraphView, n: fx.Node) -> fx.Node | None:
    """If ``n`` is mean(x²) (or mean(x*x), var(x)), return x."""
    if view.op(n) not in ("mean", "var"):
        return None
    src = n.args[0]
    if view.op(n) == "var":
        return view.skip_back(src, _CASTS)
    op = view.op(src)
    if op in ("pow", "square") and (op == "square" or n.args and src.args[1] == 2):
        return view.skip_back(src.args[0], _CASTS)
    if op == "mul" and len(src.args) == 2 and src.args[0] is src.args[1]:
        return view.skip_back(src.args[0], _CASTS)
    return None


def _inv_std_source(view: GraphView, n: fx.Node) -> tuple[fx.Node | None, str]:
    """For 1/sqrt(stat + eps) expressed as rsqrt, reciprocal(sqrt) or pow(-0.5): (x, 'rms'|'var')."""
    op = view.op(n)
    inner = None
    if op == "rsqrt":
        inner = n.args[0]
    elif op == "reciprocal" and view.op(n.args[0]) == "sqrt":
        inner = n.args[0].args[0]
    elif op == "pow" and len(n.args) > 1 and n.args[1] == -0.5:
        inner = n.args[0]
    if not isinstance(inner, fx.Node) or view.op(inner) != "add":
        return None, ""
    stat = next((a for a in inner.args if isinstance(a, fx.Node)), None)
    if stat is None:
        return None, ""
    x = _reduction_of_square(view, stat)
    return (x, "var" if view.op(stat) == "var" else "rms") if x is not None else (None, "")


def _scaled_copy_of(view: GraphView, a: object, src: fx.Node) -> bool:
    """``a`` is ``src`` (through casts) or ``src`` times a constant (γ applied before normalising)."""
    if not isinstance(a, fx.Node):
        return False
    a = view.skip_back(a, _CASTS)
    if a is src:
        return True
    if view.op(a) == "mul" and len(a.args) == 2:
        x, y = a.args
        return (isinstance(x, fx.Node) and view.skip_back(x, _CASTS) is src and not view.is_dynamic(y)) or \
               (isinstance(y, fx.Node) and view.skip_back(y, _CASTS) is src and not view.is_dynamic(x))
    return False


def _hand_written(view: GraphView) -> list[Norm]:
    """Hand-written RMSNorm / LayerNorm: x·rsqrt(mean(x²)+eps) or (x−μ)/sqrt(var+eps)."""
    found: list[Norm] = []
    for n in view.nodes:
        op = view.op(n)
        x = flavor = None
        if op == "mul" and len(n.args) == 2:
            for a, b in ((n.args[0], n.args[1]), (n.args[1], n.args[0])):
                if isinstance(b, fx.Node):
                    src, stat = _inv_std_source(view, b)
                    if src is not None and _scaled_copy_of(view, a, src):
                        x, flavor = src, "rmsnorm" if stat == "rms" else "layernorm"
                        break
        elif op == "div" and isinstance(n.args[1], fx.Node) and view.op(n.args[1]) == "sqrt":
            inner = n.args[1].args[0]
            if view.op(inner) == "add":
                stat = next((a for a in inner.args if isinstance(a, fx.Node)), None)
                src = _reduction_of_square(view, stat) if stat is not None else None
                if src is not None and _scaled_copy_of(view, n.args[0], src):
                    x, flavor = src, "rmsnorm" if view.op(stat) == "mean" else "layernorm"
        if x is None:
            continue
        # (x − mean(x)) normalised by its own second moment is a LayerNorm written out.
        if view.op(x) == "sub" and isinstance(x.args[1], fx.Node) and view.op(x.args[1]) == "mean" \
                and x.args[1].args[0] is x.args[0]:
            flavor, x = "layernorm", view.skip_back(x.args[0], _CASTS)
        out = n
        # the affine weight (and bias) belong to the norm: w * y [+ b], through casts
        for _ in range(3):
            nxt = [u for u in view.users(out) if view.op(u) in ("mul", "add", "to")]
            if len(view.users(out)) != 1 or not nxt:
                break
            u = nxt[0]
            others = [a for a in u.args if isinstance(a, fx.Node) and a is not out]
            if view.op(u) != "to" and (not others or any(view.is_dynamic(a) for a in others)):
                break
            out = u
        found.append(Norm(out, x, flavor, "hand-written"))
    return found


def _library(view: GraphView) -> list[Norm]:
    found = []
    for n in view.find("layer_norm", "rms_norm"):
        x = n.args[0] if n.args else n.kwargs.get("input")
        out = n
        if n.op == "call_function" and "native_layer_norm" in str(n.target):
            out = next((u for u in n.users if u.args[1] == 0), n)  # getitem 0 of (out, mean, rstd)
        found.append(Norm(out, view.skip_back(x, _CASTS), "layernorm" if view.op(n) == "layer_norm" else "rmsnorm",
                           "library"))
    return found


def _is_residual_add(view: GraphView, add: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``add`` = x + F(x) with both operands activations and x an ancestor of F(x): return (x, F(x))."""
    if view.op(add) != "add" or len(add.args) < 2:
        return None
    a, b = add.args[0], add.args[1]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    if not (view.is_dynamic(a) and view.is_dynamic(b)):
        return None
    if a is not b and view.has_path(a, b):
        return a, b
    if a is not b and view.has_path(b, a):
        return b, a
    return None


def find_norm_residuals(view: GraphView) -> tuple[list[Site], list[NearMiss]]:
    norms = all_norms(view)
    sites: list[Site] = []
    misses: list[NearMiss] = []
    pre: dict[fx.Node, fx.Node] = {}  # norm node -> closing add
    owned_adds: dict[fx.Node, list[fx.Node]] = {}  # closing add -> pre-norms it closes
    for nm in norms:
        x = nm.x
        closing = None
        # The closing add reads x itself (through casts), or a chain of adds starting at x when
        # parallel branches are summed one after the other: (x + attn(n1(x))) + mlp(n2(x)).
        frontier = [(xs, xs) for xs in view.skip_forward(x, _CASTS)]
        for _ in range(4):
            nxt = []
            for via, cur in frontier:
                for add in view.users(cur):
                    if view.op(add) != "add" or len(add.args) < 2:
                        continue
                    a, b = add.args[0], add.args[1]
                    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
                        continue
                    other = b if a is cur else a if b is cur else None
                    if other is None or other is cur:
                        continue
                    if view.has_path(nm.node, other):
                        if closing is None or view.has_path(add, closing):  # the nearest closing add
                            closing = add
                    else:
                        nxt.append((via, add))
            frontier = nxt
        if closing is not None:
            pre[nm.node] = closing
            owned_adds.setdefault(closing, []).append(nm.node)
    owned = set(owned_adds)
    for nm in norms:
        module = view.module_path(nm.node)
        details = {"norm": nm.flavor, "written": nm.written}
        if nm.node in pre:
            add = pre[nm.node]
            # parallel: other pre-norms read the same residual stream x (GPT-NeoX, parallel blocks)
            siblings = [o for o in norms if o is not nm and o.x is nm.x and o.node in pre]
            variant = "parallel" if siblings else "pre"
            sites.append(Site("norm_residual", module, variant, {"norm": nm.node, "input": nm.x, "add": add},
                              {"x": view.shape(nm.x)}, dict(details)))
            continue
        res = _is_residual_add(view, nm.x) if view.op(nm.x) == "add" else None
        if res is not None and nm.x not in owned:
            sites.append(Site("norm_residual", module, "post", {"norm": nm.node, "input": nm.x, "add": nm.x},
                              {"x": view.shape(nm.x)}, dict(details)))
            continue
        if res is not None:
            owner = view.module_path(owned_adds[nm.x][0])
            reason = (f"reads a residual stream whose add already closes the pre-norm branch of "
                      f"'{owner or '<root>'}' and its output is not added back (a final norm)")
        elif view.op(nm.x) == "add":
            reason = "input is a sum of independent activations (e.g. word + position embeddings), not x + F(x)"
        else:
            reason = "no residual: its input is not x + F(x) and its output is not added back to its input"
        misses.append(NearMiss("norm_residual", module, nm.node.name, f"{nm.flavor} {reason}"))
    return sites, misses
