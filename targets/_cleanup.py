"""Clean-ups of the exported ONNX graph that change nothing it computes on finite inputs.

``drop_softmax_nan_guards``:

    Before:  w = Softmax(s + Where(m, 0, c));  y = Where(IsNaN(w), 0, w)      (c a finite constant)
    After:   y = w

The exporter lowers a boolean-masked ``scaled_dot_product_attention`` this way, with c = the float
minimum, and keeps the guard for -inf fills. With a finite c even a fully masked row is a finite
vector, and the softmax of a finite vector (exp(s − max s) / Σ, the sum ≥ 1) is never NaN. So the
guard can only fire when s itself holds NaN or ±inf, that is, when the activations were already
non-finite, and it then zeroes them where they would otherwise propagate. On MiniLM (batch 8 × 128)
the guards cost 6.5 % of an ONNX Runtime CPU run, over a [batch, heads, seq, seq] tensor per layer.
Skipped when: c or the zero is not a constant, c is not finite, or the guard's value is a graph output.

``attention_heads_in_place``:

    Before:  Y = Reshape(T(Attention(T(R(q)), T(R(k)), T(R(v)), m)), shape)
             with R = Reshape [b, t, H·d] → [b, t, H, d] and T = Transpose(perm=[0, 2, 1, 3])
    After:   Y = Reshape(Attention(q, k, v, m, q_num_heads=H, kv_num_heads=H_kv), shape)   (3-d q, k, v)

The opset-23 ``Attention`` op splits the hidden axis into heads itself: the 3-d form is the same
computation (the op defines it as this reshape and transpose) without the four copies of Q, K, V and
the output per layer (about 20 % of MiniLM's attention on ONNX Runtime's CPU kernel). ORT's kernel
reads a 3-d call's mask only at full size, so the rewrite needs the mask's query axis to be the
query length (Hugging Face's masks are [b, 1, t, s]).
Skipped when: a reshape or transpose is not exactly that, an intermediate has another consumer, the
head counts or head size are not static, or the mask's query axis is not the query length.

``attention_gqa_in_place``:

    Before:  Attention(q, R(E(U(k))), R(E(U(v))), m)     with U = Unsqueeze(axes=[2]),
             E = Expand to [b, H_kv, n, s, d], R = Reshape to [b, H_kv·n, s, d]   (4-d)
    After:   Attention(q, k, v, m)                        (K, V with H_kv heads)

Hugging Face's ``repeat_kv`` (what a GQA model runs when ``scaled_dot_product_attention`` gets a
mask) repeats each key/value head n times in a row; the op's grouped-query attention reads, for query
head i, key/value head ⌊i / n⌋ — the same heads, so the same computation, without copying the keys
and values n times per layer (at a decoder's step, the whole cache: a quarter of a Llama step's
kernel time on ONNX Runtime's CPU provider at past length 1024).
Skipped when: any step is not exactly that, n or H_kv is not static, an intermediate has another
consumer, or only one of K and V has the pattern.

``layer_norm_rows``:

    Before:  y = LayerNormalization(Add(a, r), γ, β, axis=-1)                      ([…, E])
    After:   y = Reshape(LayerNormalization(Reshape(Add(a, r), [-1, E]), γ, β, axis=-1), Shape(Add(a, r)))

Layer normalization is per row over the last axis, so normalizing the [n, E] rows of the same
buffer is the same computation, element for element; the reshapes copy nothing. What changes is what
ONNX Runtime makes of it: it fuses an ``Add`` read by a ``LayerNormalization`` into one
``SkipLayerNormalization``, whose CPU kernel (ORT 1.32) is about 2.4× slower than the two ops it
replaces (measured on [4, 512, 384]: 1.95 ms fused, 0.82 ms for Add + LayerNormalization, 2 threads;
13 % of MiniLM's INT8 file at 4 × 512). The reshape between them keeps them apart.
Skipped when: the normalization's axis is not the last, γ is not a 1-d constant, the input is not an
``Add``, or the op's mean / inverse-deviation outputs are read.

``attention_mask_elided`` (run last: the others do not look into subgraphs):

    Before:  y = Attention(q, k, v, m)
    After:   y = If(c, then: Attention(q, k, v), else: Attention(q, k, v, m)),
             c = ReduceMin(Cast(m, float)) = 1 for a boolean m,  ReduceMax(|m|) = 0 for an additive m
             (c computed once per distinct mask, which a Hugging Face model builds once for all layers)

A mask that masks nothing is the identity (the op adds 0 to every score), so both branches compute
the same; the first skips the mask's per-element conversion and addition, which costs ONNX Runtime's
CPU kernel as much as a quarter of the op (measured on one MiniLM layer at [4, 512, 384], 2 threads:
11.0 ms with a [4, 1, 512, 512] boolean mask of all true, 8.8 ms without). Batches without padding
(long documents cut into full windows) take the first branch; padded ones the second, at the cost of
one reduction over the mask per model.
Skipped when: the call has past keys/values or more than one output, the mask's element type or Q's
is unknown, or the mask is additive and not shared by the heads ([b, 1, q, k]): a per-head additive
mask is a position bias (T5's), which never masks nothing, and checking it would cost a pass over it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["drop_softmax_nan_guards", "attention_heads_in_place", "attention_gqa_in_place", "layer_norm_rows",
           "attention_mask_elided", "attention_calls", "all_nodes"]


def _constants(graph: Any) -> dict[str, Any]:
    """Name → TensorProto of initializers and Constant nodes (decoded only when looked at: a large
    model's weights are never copied to numpy for a check that reads a few scalars)."""
    protos = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    protos[node.output[0]] = a.t
    return protos


def _has_subgraphs(graph: Any) -> bool:
    # a subgraph may read a value by name: the rewrites that rename or drop values do not track that
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute)


def _forget(graph: Any, gone: set[str]) -> None:
    """Drop the value infos of values the rewrite removed."""
    keep = [vi for vi in graph.value_info if vi.name not in gone]
    del graph.value_info[:]
    graph.value_info.extend(keep)


def _index(graph: Any) -> tuple[dict[str, Any], dict[str, list[Any]], set[str]]:
    """(value → producing node, value → consuming nodes, graph output names) of ``graph``."""
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producer, consumers, {o.name for o in graph.output}


def _only_use(name: str, user: Any, consumers: dict[str, list[Any]], outputs: set[str]) -> bool:
    """Whether ``user`` is the one reader of ``name`` (and it is no graph output): safe to rewire."""
    return name not in outputs and [id(c) for c in consumers.get(name, [])] == [id(user)]


def drop_softmax_nan_guards(model: onnx.ModelProto) -> int:
    """Remove the guards described in the module docstring from ``model`` (in place); returns how many."""
    graph = model.graph
    if _has_subgraphs(graph):
        return 0  # a subgraph may read a value by name: not worth tracking for these files
    producer, consumers, outputs = _index(graph)
    consts = _constants(graph)

    def const(name: str) -> np.ndarray | None:
        t = consts.get(name)
        if t is None or t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                            onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16):
            return None
        return numpy_helper.to_array(t)

    def finite_mask_fill(add: Any) -> bool:
        for name in add.input:
            w = producer.get(name)
            if w is not None and w.op_type == "Where" and len(w.input) == 3:
                a, b = const(w.input[1]), const(w.input[2])
                if a is not None and b is not None and np.isfinite(a).all() and np.isfinite(b).all():
                    return True
        return False

    drop: list[Any] = []
    rename: dict[str, str] = {}
    for n in graph.node:
        if n.op_type != "Where" or len(n.input) != 3 or n.output[0] in outputs:
            continue
        isnan = producer.get(n.input[0])
        if isnan is None or isnan.op_type != "IsNaN" or len(consumers.get(isnan.output[0], [])) != 1:
            continue
        w = isnan.input[0]
        zero = const(n.input[1])
        softmax = producer.get(w)
        if n.input[2] != w or zero is None or np.any(zero != 0) or softmax is None or softmax.op_type != "Softmax":
            continue
        add = producer.get(softmax.input[0])
        if add is None or add.op_type != "Add" or not finite_mask_fill(add):
            continue
        drop += [n, isnan]
        rename[n.output[0]] = w
    if not drop:
        return 0
    for n in drop:
        graph.node.remove(n)
    for n in graph.node:
        for i, name in enumerate(n.input):
            if name in rename:
                n.input[i] = rename[name]
    _forget(graph, set(rename) | {n.output[0] for n in drop})
    return len(drop) // 2


def _shapes(model: onnx.ModelProto) -> dict[str, list[Any]]:
    """Value name → dims (int, or the symbol's name; None where unknown) from the model's value infos."""
    graph = model.graph
    out: dict[str, list[Any]] = {}
    for vi in list(graph.input) + list(graph.output) + list(graph.value_info):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]
    return out


def attention_heads_in_place(model: onnx.ModelProto) -> int:
    """Rewrite 4-d ``Attention`` calls into the 3-d form of the module docstring (in place); returns how many."""
    graph = model.graph
    if _has_subgraphs(graph):
        return 0
    shapes = _shapes(model)
    producer, consumers, outputs = _index(graph)

    def perm(node: Any) -> list[int]:
        return next((list(a.ints) for a in node.attribute if a.name == "perm"), [])

    def only_use(name: str, user: Any) -> bool:
        return _only_use(name, user, consumers, outputs)

    def heads_of(name: str, user: Any) -> tuple[str, int, int] | None:
        """(3-d input, heads, head size) when ``name`` is T(R(x)) as above and read only by ``user``."""
        t = producer.get(name)
        if t is None or t.op_type != "Transpose" or perm(t) != [0, 2, 1, 3] or not only_use(name, user):
            return None
        r = producer.get(t.input[0])
        if r is None or r.op_type != "Reshape" or not only_use(t.input[0], t):
            return None
        x, split = shapes.get(r.input[0]), shapes.get(r.output[0])
        if x is None or split is None or len(x) != 3 or len(split) != 4:
            return None
        heads, size = split[2], split[3]
        if not (isinstance(heads, int) and isinstance(size, int) and heads > 0 and size > 0):
            return None
        if split[0] != x[0] or split[1] != x[1] or (isinstance(x[2], int) and x[2] != heads * size):
            return None
        return r.input[0], heads, size

    rewritten = 0
    dead: list[Any] = []
    renamed: set[str] = set()
    for node in list(graph.node):
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx") or len(node.input) < 3:
            continue
        if len(node.input) > 4 or len([o for o in node.output if o]) != 1:
            continue  # past keys/values or extra outputs: a decoder's cache step, left as exported
        parts = [heads_of(name, node) for name in node.input[:3]]
        if any(p is None for p in parts):
            continue
        (q, hq, dq), (k, hk, dk), (v, hv, dv) = parts  # type: ignore[misc]
        if hk != hv or dq != dk:
            continue
        mask = node.input[3] if len(node.input) > 3 else ""
        if mask:
            m, qs = shapes.get(mask), shapes.get(q)
            if m is None or qs is None or len(m) < 2 or m[-2] is None or m[-2] != qs[1]:
                continue
        y = node.output[0]
        t = consumers.get(y, [])
        if len(t) != 1 or t[0].op_type != "Transpose" or perm(t[0]) != [0, 2, 1, 3] or y in outputs:
            continue
        r = consumers.get(t[0].output[0], [])
        if len(r) != 1 or r[0].op_type != "Reshape" or not only_use(t[0].output[0], r[0]):
            continue
        old_inputs = [producer[name] for name in node.input[:3]]
        dead += old_inputs + [producer[n.input[0]] for n in old_inputs] + [t[0]]
        del node.input[:3]
        node.input[0:0] = [q, k, v]
        # The reshape stays (it may flatten further, as GPT-2's [b·t, H·d]): the 3-d output holds
        # the elements in the transposed [b, t, H, d] order it read before, so it reshapes the same.
        node.output[0] = f"{y}_heads_in_place"
        r[0].input[0] = node.output[0]
        renamed.add(y)
        node.attribute.extend([onnx.helper.make_attribute("q_num_heads", hq),
                               onnx.helper.make_attribute("kv_num_heads", hk)])
        rewritten += 1
    for n in dead:
        graph.node.remove(n)
    _forget(graph, {o for n in dead for o in n.output} | renamed | _drop_unused(graph))
    return rewritten


def attention_gqa_in_place(model: onnx.ModelProto) -> int:
    """Feed ``Attention`` the un-repeated keys and values (module docstring, in place); returns how many."""
    graph = model.graph
    if _has_subgraphs(graph):
        return 0
    shapes = _shapes(model)
    consts = _constants(graph)
    producer, consumers, outputs = _index(graph)

    def only_use(name: str, user: Any) -> bool:
        return _only_use(name, user, consumers, outputs)

    def unrepeated(name: str, user: Any) -> tuple[str, list[Any], int] | None:
        """(the [b, H_kv, s, d] input, the three nodes, n) when ``name`` is R(E(U(x))) read only by ``user``."""
        r = producer.get(name)
        if r is None or r.op_type != "Reshape" or not only_use(name, user):
            return None
        e = producer.get(r.input[0])
        if e is None or e.op_type != "Expand" or not only_use(r.input[0], r):
            return None
        u = producer.get(e.input[0])
        if u is None or u.op_type != "Unsqueeze" or len(u.input) != 2 or not only_use(e.input[0], e):
            return None
        axes = consts.get(u.input[1])
        if axes is None or numpy_helper.to_array(axes).tolist() != [2]:
            return None
        x, big, out = shapes.get(u.input[0]), shapes.get(e.output[0]), shapes.get(r.output[0])
        if x is None or big is None or out is None or (len(x), len(big), len(out)) != (4, 5, 4):
            return None
        hkv, n = big[1], big[2]
        if not (isinstance(hkv, int) and isinstance(n, int) and hkv > 0 and n > 0) or x[1] != hkv:
            return None
        if out[1] != hkv * n or out[2:] != big[3:] or big[3:] != x[2:] and None not in x[2:] + big[3:]:
            return None
        return u.input[0], [r, e, u], n

    rewritten = 0
    for node in list(graph.node):
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx") or len(node.input) < 3:
            continue
        if len(node.input) > 4 or len([o for o in node.output if o]) != 1:
            continue  # past keys/values or extra outputs: left as exported
        k, v = unrepeated(node.input[1], node), unrepeated(node.input[2], node)
        if k is None or v is None or k[2] != v[2]:
            continue
        node.input[1], node.input[2] = k[0], v[0]
        rewritten += 1
    if rewritten:
        _forget(graph, _drop_unused(graph))
    return rewritten


def layer_norm_rows(model: onnx.ModelProto) -> int:
    """Keep each ``Add`` → ``LayerNormalization`` pair apart with the reshapes of the module docstring
    (in place); returns how many."""
    graph = model.graph
    if _has_subgraphs(graph):
        return 0
    shapes = _shapes(model)
    consts = _constants(graph)
    producer, consumers, outputs = _index(graph)
    rewritten = 0
    for node in list(graph.node):
        if node.op_type != "LayerNormalization" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        if any(o and (consumers.get(o) or o in outputs) for o in node.output[1:]):
            continue
        add = producer.get(node.input[0])
        gamma = consts.get(node.input[1])
        rank = len(shapes.get(node.input[0]) or [])
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        if add is None or add.op_type != "Add" or gamma is None or len(gamma.dims) != 1 or gamma.dims[0] <= 0:
            continue
        if axis != -1 and not (rank and axis == rank - 1):
            continue
        x, y, tag = node.input[0], node.output[0], f"{node.output[0]}_rows"
        rows = onnx.numpy_helper.from_array(np.array([-1, gamma.dims[0]], np.int64), f"{tag}_shape")
        graph.initializer.append(rows)
        at = list(graph.node).index(node)
        graph.node.insert(at, onnx.helper.make_node("Reshape", [x, rows.name], [f"{tag}_in"], name=f"{tag}_in"))
        node.input[0] = f"{tag}_in"
        node.output[0] = f"{tag}_out"
        graph.node.insert(at + 2, onnx.helper.make_node("Shape", [x], [f"{tag}_dims"], name=f"{tag}_dims"))
        graph.node.insert(at + 3, onnx.helper.make_node("Reshape", [f"{tag}_out", f"{tag}_dims"], [y], name=tag))
        if axis != -1:
            for a in node.attribute:
                if a.name == "axis":
                    a.i = -1
        rewritten += 1
    return rewritten


def attention_mask_elided(model: onnx.ModelProto) -> int:
    """Give each masked ``Attention`` call a mask-free branch for masks that mask nothing (module
    docstring, in place); returns how many."""
    from onnx import TensorProto, helper

    graph = model.graph
    shapes = _shapes(model)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(graph.input) + list(graph.value_info)
             + list(graph.output) if vi.type.HasField("tensor_type")}
    types.update({t.name: t.data_type for t in graph.initializer})
    conds: dict[str, str] = {}
    rewritten = 0
    for node in list(graph.node):
        if node.op_type != "Attention" or node.domain not in ("", "ai.onnx") or len(node.input) != 4:
            continue
        mask, y = node.input[3], node.output[0]
        if not mask or len([o for o in node.output if o]) != 1 or len(node.output) != 1:
            continue
        mtype, ytype = types.get(mask), types.get(y) or types.get(node.input[0])  # the op's output type is Q's
        if mtype not in (TensorProto.BOOL, TensorProto.FLOAT, TensorProto.FLOAT16) or not ytype:
            continue
        dims = shapes.get(mask)
        if mtype != TensorProto.BOOL and not (dims and len(dims) == 4 and dims[1] == 1):
            continue  # a per-head additive mask is a position bias (T5): it never masks nothing
        at = list(graph.node).index(node)
        if mask not in conds:
            tag = f"{mask}_masks_nothing"
            if mtype == TensorProto.BOOL:
                nodes = [helper.make_node("Cast", [mask], [f"{tag}_f"], to=TensorProto.FLOAT),
                         helper.make_node("ReduceMin", [f"{tag}_f"], [f"{tag}_r"], keepdims=0),
                         helper.make_node("Constant", [], [f"{tag}_one"], value=helper.make_tensor("", TensorProto.FLOAT, [], [1.0])),
                         helper.make_node("Equal", [f"{tag}_r", f"{tag}_one"], [tag])]
            else:
                nodes = [helper.make_node("Abs", [mask], [f"{tag}_a"]),
                         helper.make_node("ReduceMax", [f"{tag}_a"], [f"{tag}_r"], keepdims=0),
                         helper.make_node("Constant", [], [f"{tag}_zero"], value=helper.make_tensor("", mtype, [], [0.0])),
                         helper.make_node("Equal", [f"{tag}_r", f"{tag}_zero"], [tag])]
            for i, n in enumerate(nodes):
                n.name = f"{tag}_{i}"
                graph.node.insert(at + i, n)
            at += len(nodes)
            conds[mask] = tag

        branch_if = helper.make_node("If", [conds[mask]], [y], name=f"{node.name or y}_mask_elided",
                                     then_branch=_branch(node, y, ytype, "unmasked", list(node.input[:3])),
                                     else_branch=_branch(node, y, ytype, "masked", list(node.input)))
        graph.node.remove(node)
        graph.node.insert(at, branch_if)
        rewritten += 1
    return rewritten


def _branch(node: Any, y: str, ytype: int, suffix: str, inputs: list[str]) -> Any:
    """A one-node graph: ``node``'s Attention call on ``inputs``, its output ``y_suffix``."""
    from onnx import helper

    call = helper.make_node("Attention", inputs, [f"{y}_{suffix}"], name=f"{node.name or y}_{suffix}")
    call.attribute.extend(node.attribute)
    return helper.make_graph([call], f"{y}_{suffix}", [], [helper.make_tensor_value_info(f"{y}_{suffix}", ytype, None)])


def all_nodes(graph: Any) -> list[Any]:
    """Every node of ``graph`` and of its subgraphs (``If`` branches, loop bodies), depth first."""
    out = []
    for n in graph.node:
        out.append(n)
        for a in n.attribute:
            for g in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
                      if a.type == onnx.AttributeProto.GRAPHS else []):
                out += all_nodes(g)
    return out


def attention_calls(graph: Any) -> list[Any]:
    """The ``Attention`` calls of ``graph``, one node per call: a top-level node, or for a call that
    ``attention_mask_elided`` split in two, its masked branch (the one that reads the mask)."""
    out = []
    for n in graph.node:
        if n.op_type == "Attention":
            out.append(n)
        elif n.op_type == "If" and n.name.endswith("_mask_elided"):
            out += [m for a in n.attribute if a.name == "else_branch" for m in a.g.node if m.op_type == "Attention"]
    return out


def _drop_unused(graph: Any) -> set[str]:
    """Remove nodes none of whose outputs is read (the reshape shapes the rewrite left behind) and
    initializers nothing reads; returns the removed nodes' outputs' names."""
    outputs = {o.name for o in graph.output}
    gone: set[str] = set()
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        unused = [n for n in graph.node if not any(o in used for o in n.output if o)]
        if not unused:
            orphans = [t for t in graph.initializer if t.name not in used]
            for t in orphans:
                graph.initializer.remove(t)
            return gone
        for n in unused:
            gone.update(n.output)
            graph.node.remove(n)
