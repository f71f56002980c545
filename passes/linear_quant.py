"""Quantize Linear / MatMul / Conv layers with a constant weight to FP8 or INT8 (weights + activations).

Before:  y = x · Wᵀ + b                       (aten.linear, nn.Linear; aten.matmul x·W; conv1d/2d/3d)
After:   y = dq(q(x; s_x)) · dq(W_q; s_W) + b
         W_q = q(Wᵀ; s_W) is stored quantized (float8_e4m3fn / int8 buffer), s_W per output channel
         (``granularity=channel``) or per tensor; s_x per tensor, static, calibrated (max |
         percentile | mse). The linear weight is stored transposed ([in, out], per-channel axis 1),
         so the ONNX file holds ``DequantizeLinear(W_q) → MatMul`` with nothing in between: the
         layout ONNX Runtime's QDQ fusion turns into one integer kernel (MatMulIntegerToFloat).
         Embedding tables no linear owns (``embeddings=True``): weight-only, one scale per row, stored
         FP8 (dtype=fp8) or INT8 (dtype=int8), so the table — half of a small BERT's weights — shrinks
         in the file too (see ``QuantEmbedding`` for where the dequantize sits and why).
INT8 weights use 7 bits (|q| ≤ 63) unless ``reduce_range=False``: x86 CPUs without VNNI multiply u8
activations by s8 weights with ``vpmaddubsw``, whose int16 pair sums saturate when 2·255·|w| > 32767;
with |w| ≤ 63 they cannot, so ONNX Runtime computes exactly what the torch module computes.
Weights are rounded by GPTQ (``rounding=gptq``, passes/_gptq.py): each input column's rounding
error is compensated on the columns not rounded yet through (XᵀX)⁻¹ of the layer's calibration
inputs, which recovers most of the bit the 7-bit range costs (MiniLM held-out cosine min 0.9938 →
0.9959); ``rounding=nearest`` rounds each weight alone.

Skipped when: the weight is not a constant (computed from an input); the constant is the left
operand of the matmul; a conv is transposed; a table is also read by a linear (tied weights: the
linear owns it) or has fewer than ``min_table`` elements; the node is already quantized.
Sites: ``linear:<module path>:<node>`` (one per layer) and ``embedding:<module path>:<node>``;
each is one switchable submodule, so the guard can roll back single layers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from surgeon._inputs import call
from surgeon.analysis import GraphView, site_id
from surgeon.calibration import RunningAmax
from surgeon.pass_manager import Diagnostic, Pass, PassContext, PassResult, SiteRecord
from surgeon.passes._gptq import gptq_round
from surgeon.quant import FP8_MAX, Quantizer, dequantize, quantize

__all__ = ["LinearQuant", "QuantLinear", "QuantEmbedding", "PREFIX"]

PREFIX = "surgeon_linear_quant_"
INT8_WEIGHT_MAX = {True: 63.0, False: 127.0}  # reduce_range → 7-bit weights (see module docstring)


def _weight_scale(w: Tensor, axis: int | None, dtype: str, qmax: float) -> Tensor:
    """Symmetric weight scale: max for fp8 (a float format keeps relative precision over its range);
    for int8 the clip per channel that minimises the weight's squared error (grid over 0.5–1 × max)."""
    a = w.detach().abs().float()
    amax = a.amax() if axis is None else a.movedim(axis, 0).reshape(a.shape[axis], -1).amax(1)
    amax = torch.where(amax > 0, amax, torch.ones_like(amax))
    if dtype == "fp8":
        return amax / FP8_MAX
    rows = w.detach().float().reshape(1, -1) if axis is None else w.detach().float().movedim(axis, 0).reshape(w.shape[axis], -1)
    amax_r = amax.reshape(-1)
    best = amax_r / qmax
    best_err = torch.full_like(best, float("inf"))
    for ratio in torch.linspace(0.5, 1.0, 26):
        s = (amax_r * ratio / qmax)[:, None]
        err = ((torch.round(rows / s).clamp(-qmax, qmax) * s - rows) ** 2).sum(1)
        better = err < best_err
        best = torch.where(better, s[:, 0], best)
        best_err = torch.where(better, err, best_err)
    return best.reshape(amax.shape)


def _quantize_weight(w: Tensor, axis: int | None, dtype: str, reduce_range: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """(W_q, scale, zero_point) with the exact semantics of surgeon's Q custom ops."""
    if dtype == "fp8":
        s = _weight_scale(w, axis, dtype, FP8_MAX)
        return quantize(w.float(), s, axis or 0, "fp8"), s, None
    qmax = INT8_WEIGHT_MAX[reduce_range]
    s = _weight_scale(w, axis, dtype, qmax)
    zp = torch.zeros_like(s, dtype=torch.int8)
    # The scale may clip (s < amax / qmax): QuantizeLinear only clamps to ±127, the 7-bit bound
    # that keeps vpmaddubsw from saturating is ours to keep.
    return quantize(w.float(), s, axis or 0, "int8", zp).clamp(-int(qmax), int(qmax)), s, zp


class QuantLinear(nn.Module):
    """``dq(q(x)) ⊗ dq(W_q) + b`` for one layer; ``active=False`` computes the original layer exactly.

    ``op``: ``linear`` (y = x Wᵀ + b, W_q stored as Wᵀ), ``matmul`` (y = x W), ``conv`` (F.convNd)."""

    def __init__(self, op: str, weight: Tensor, bias: Tensor | None, *, dtype: str = "fp8",
                 granularity: str = "channel", method: str = "max", reduce_range: bool = True,
                 conv: dict | None = None, name: str = "") -> None:
        super().__init__()
        self.op, self.dtype, self.conv = op, dtype, dict(conv or {})
        self.active: bool = True
        # The float weight stays for rollback (active=False); only the branch traced lands in a file.
        self.register_buffer("weight", weight.detach())
        self.register_buffer("bias", None if bias is None else bias.detach())
        # output channel: columns of Wᵀ / W (axis 1), rows of a conv weight (axis 0)
        self.axis = None if granularity == "tensor" else (0 if op == "conv" else 1)
        self.reduce_range = reduce_range
        self.register_buffer("inv_smooth", None)
        self._smooth: Tensor | None = None  # SmoothQuant's s itself (1/inv_smooth would round differently)
        self._set_weight(self._stored_weight())
        self.act = Quantizer(dtype=dtype, axis=None, method=method, name=name)

    def _set_weight(self, stored: Tensor) -> None:
        q, s, zp = _quantize_weight(stored, self.axis, self.dtype, self.reduce_range)
        self.register_buffer("qweight", q)
        self.register_buffer("wscale", s)
        self.register_buffer("wzero", zp)

    @property
    def smoothable(self) -> bool:
        return self.op in ("linear", "matmul")

    def _stored_weight(self) -> Tensor:
        """The float weight in the stored layout (Wᵀ for a linear), diag(s)-scaled once smoothed;
        computed when needed rather than kept, so a layer holds no second float copy of its weight."""
        w = self.weight.detach()
        stored = w.t() if self.op == "linear" else w
        if self._smooth is not None:
            stored = stored.float() * self._smooth.to(stored)[:, None]
        return stored.contiguous()

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1] if self.op == "linear" else self.weight.shape[0])

    def input_channel_amax(self) -> Tensor:
        """max |W| over outputs, per input channel (the weight side of the smoothing balance)."""
        w = self.weight.detach().float()
        return (w.abs().amax(0) if self.op == "linear" else w.abs().amax(1))

    def smooth_with(self, s: Tensor) -> None:
        """Migrate per-input-channel scale ``s`` from the activation to the weight (SmoothQuant):
        x·W = (x / s)·(diag(s) W) exactly in real arithmetic; only what gets quantized changes."""
        self._smooth = s.to(self.weight)
        self._set_weight(self._stored_weight())
        self.inv_smooth = (1.0 / self._smooth).to(torch.float32)

    def round_with(self, h: Tensor, damp: float) -> None:
        """Re-round the stored weight by GPTQ (passes/_gptq.py) for inputs whose second moments are
        ``h`` = E[x̃ᵀx̃] (x̃ the smoothed input). Scales and layout stay; only grid points move."""
        s, zp = self.wscale, self.wzero
        qmax = INT8_WEIGHT_MAX[self.reduce_range]
        s64 = s.double()

        def round_column(col: Tensor) -> Tensor:  # one input channel: a [out] vector, scale per out
            if self.dtype == "int8":  # the custom op's rounding (half to even), inline: called per column
                return torch.round(col / s64).clamp(-qmax, qmax) * s64
            return dequantize(quantize(col.float(), s, 0, "fp8"), s, 0).double()

        w = gptq_round(self._stored_weight().t(), h, round_column, damp)
        # w is on the grid already: quantizing it again returns exactly the integers chosen above
        q = quantize(w.t().float().contiguous(), s, self.axis or 0, self.dtype, zp)
        self.qweight = q.clamp(-int(qmax), int(qmax)) if self.dtype == "int8" else q

    def _smoothed(self, x: Tensor) -> Tensor:
        return x if self.inv_smooth is None else x * self.inv_smooth

    def _exact(self, x: Tensor) -> Tensor:
        return self._apply_op(x, self.weight, transposed=False)

    def _apply_op(self, x: Tensor, w: Tensor, transposed: bool) -> Tensor:
        if self.op == "linear":
            y = torch.matmul(x, w) if transposed else F.linear(x, w)
        elif self.op == "matmul":
            y = torch.matmul(x, w)
        else:
            conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[w.dim() - 2]
            return conv(x, w, self.bias, **self.conv)
        return y if self.bias is None else y + self.bias

    def dequantized_weight(self) -> Tensor:
        return dequantize(self.qweight, self.wscale, self.axis or 0, self.wzero)

    def forward(self, x: Tensor) -> Tensor:
        if not self.active or self.act.mode == "observe":
            if self.active:
                self.act(self._smoothed(x))  # statistics of the float model's (smoothed) activation
            return self._exact(x)
        return self._apply_op(self.act(self._smoothed(x)), self.dequantized_weight(), transposed=self.op == "linear")

    def extra_repr(self) -> str:
        gran = "tensor" if self.axis is None else f"channel(axis={self.axis})"
        return f"op={self.op}, dtype={self.dtype}, weight={tuple(self.weight.shape)}, granularity={gran}" + (
            "" if self.active else ", active=False")


class QuantEmbedding(nn.Module):
    """Weight-only table lookup with one scale per row, stored FP8 or INT8.

    fp8:  ``gather(dq(E_q; s_row), ids)``. ONNX's Gather takes no float8 input, so the dequantize
          comes first; ORT folds a DequantizeLinear of an initializer to a constant at load time
          (under the FP8 session option), so the table costs nothing per run.
    int8: ``float(gather(E_q, ids)) · gather(s_row, ids)``, the same product as a per-row
          DequantizeLinear but of the rows read only: with INT8 Q/DQ fusion on, ORT keeps
          DequantizeLinear nodes and would dequantize the whole table on every run."""

    def __init__(self, weight: Tensor, padding_idx: int | None = None, dtype: str = "fp8") -> None:
        super().__init__()
        self.active: bool = True
        self.padding_idx = padding_idx
        self.dtype = dtype
        self.register_buffer("weight", weight.detach())
        w = weight.detach().float()
        if dtype == "fp8":
            q, s, _ = _quantize_weight(w, 0, "fp8", True)
        else:
            amax = w.abs().amax(1)
            s = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
            q = quantize(w, s, 0, "int8", torch.zeros_like(s, dtype=torch.int8))
        self.register_buffer("qweight", q)
        self.register_buffer("wscale", s)

    def forward(self, ids: Tensor) -> Tensor:
        if not self.active:
            return F.embedding(ids, self.weight)
        if self.dtype == "fp8":
            return F.embedding(ids, dequantize(self.qweight, self.wscale, 0))
        return F.embedding(ids, self.qweight).to(torch.float32) * F.embedding(ids, self.wscale[:, None])

    def extra_repr(self) -> str:
        return f"{self.dtype} weight-only, table={tuple(self.weight.shape)}" + ("" if self.active else ", active=False")


def _run_with_input_hook(gm: fx.GraphModule, layers: list[QuantLinear], record: Any, batches: list[Any]) -> None:
    """One pass over ``batches`` with ``record(layer, args)`` seeing every layer's inputs."""
    hooks = [m.register_forward_pre_hook(record) for m in layers]
    try:
        with torch.no_grad():
            for b in batches:
                call(gm, b)
    finally:
        for h in hooks:
            h.remove()


def _target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t.overloadpacket.__name__
    return getattr(t, "__name__", str(t))


def _safe(path: str) -> str:
    return re.sub(r"[^0-9A-Za-z_]", "_", path) or "root"


def _swap(gm: fx.GraphModule, ctx: PassContext, node: fx.Node, sub: str, layer: nn.Module, x: fx.Node,
          record: SiteRecord) -> None:
    """Replace ``node`` by a call of the new submodule ``sub`` on ``x`` and register the site; the
    record's probe is the new node, its reference the replaced one (the guard compares the two)."""
    gm.add_submodule(sub, layer)
    with gm.graph.inserting_before(node):
        new = gm.graph.call_module(sub, (x,))
    new.meta.update({k: v for k, v in node.meta.items() if k in ("nn_module_stack", "val", "tensor_meta", "stack_trace")})
    record.probe, record.reference = new.name, node.name
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    ctx.register(record)


@dataclass(frozen=True)
class LinearQuant(Pass):
    """FP8 / INT8 quantization of every layer with a constant weight (see the module docstring)."""

    name: ClassVar[str] = "linear-quant"
    requires: ClassVar[tuple[str, ...]] = ("attention-fp8", "norm-fold", "norm-gate", "flow-inverse")
    dtype: Literal["fp8", "int8"] = "fp8"
    granularity: Literal["channel", "tensor"] = "channel"
    method: Literal["max", "percentile", "mse"] = "mse"  # activation clip; mse beat max and percentile on MiniLM
    embeddings: bool = True  # weight-only quantization of tables no linear owns (the word embeddings)
    reduce_range: bool = True  # int8 only: 7-bit weights, exact on AVX2 u8·s8 kernels
    min_table: int = 1024  # smaller tables are not worth a Q/DQ pair
    smooth: float = 0.8  # SmoothQuant migration strength α (0 = off), fitted on the fit batches
    rounding: Literal["nearest", "gptq"] = "gptq"  # weight rounding (linear / matmul; convs: nearest)
    damp: float = 0.1  # GPTQ: damp × mean(diag XᵀX) added to the diagonal (see passes/_gptq.py)
    hessian_mb: int = 512  # GPTQ: memory for XᵀX statistics per pass over the fit batches

    def __post_init__(self) -> None:
        if self.dtype not in ("fp8", "int8"):
            raise ValueError(f"dtype must be fp8 or int8, got {self.dtype}")
        if self.granularity not in ("channel", "tensor"):
            raise ValueError(f"granularity must be channel or tensor, got {self.granularity}")
        if self.method not in ("max", "percentile", "mse"):
            raise ValueError(f"method must be max, percentile or mse, got {self.method}")
        if not 0.0 <= self.smooth <= 1.0:
            raise ValueError(f"smooth must be in [0, 1], got {self.smooth}")
        if self.rounding not in ("nearest", "gptq"):
            raise ValueError(f"rounding must be nearest or gptq, got {self.rounding}")
        if not self.damp > 0:
            raise ValueError(f"damp must be > 0, got {self.damp}")
        if self.hessian_mb < 1:
            raise ValueError(f"hessian_mb must be ≥ 1, got {self.hessian_mb}")

    # -- fitting ----------------------------------------------------------------------------------
    def fit(self, gm: fx.GraphModule, ctx: PassContext, batches: Iterable[Any]) -> None:
        """SmoothQuant, then GPTQ rounding, on the fit batches.

        SmoothQuant: s_c = amax(x_c)^α / amax(W_c)^(1−α) per input channel, then recalibrate. Two
        streaming passes with bounded state (one running max per input channel per layer): (1)
        input-channel maxima of every layer's float input; (2) after the weights are requantized as
        diag(s)·W, the per-tensor activation quantizers are calibrated again on x / s.
        GPTQ (``rounding=gptq``): E[x̃ᵀx̃] of each layer's smoothed input, accumulated with the
        quantized model running (the inputs the layer will see), then ``QuantLinear.round_with``.
        Other passes' quantizers are left as they are."""
        layers = [m for _, m in gm.named_modules()
                  if isinstance(m, QuantLinear) and m.smoothable and m.active and m.dtype == self.dtype]
        if not layers:
            return
        batches = list(batches)
        if self.smooth > 0:
            self._smooth(gm, layers, batches)
        if self.rounding == "gptq":
            self._gptq(gm, layers, batches)

    def _gptq(self, gm: fx.GraphModule, layers: list[QuantLinear], batches: list[Any]) -> None:
        # XᵀX is in² float64 per layer: layers are taken in groups that fit hessian_mb, one pass
        # over the batches per group, so memory is bounded whatever the model's size.
        budget = self.hessian_mb * 2**20
        groups: list[list[QuantLinear]] = [[]]
        used = 0
        for m in layers:
            size = m.in_features ** 2 * 8
            if groups[-1] and used + size > budget:
                groups.append([])
                used = 0
            groups[-1].append(m)
            used += size
        for group in groups:
            stats: dict[int, list] = {id(m): [None, 0] for m in group}

            def record(m: nn.Module, args: tuple) -> None:
                x = m._smoothed(args[0].detach())
                x = x.reshape(-1, x.shape[-1]).to(torch.float32)
                st = stats[id(m)]
                xtx = (x.t() @ x).to(torch.float64)  # one batch in float32 (fast), the sum in float64
                st[0] = xtx if st[0] is None else st[0] + xtx
                st[1] += x.shape[0]

            _run_with_input_hook(gm, group, record, batches)
            for m in group:
                h, n = stats.pop(id(m))
                if h is not None and n:
                    m.round_with(h / n, self.damp)

    def _smooth(self, gm: fx.GraphModule, layers: list[QuantLinear], batches: list[Any]) -> None:
        amax: dict[int, RunningAmax] = {id(m): RunningAmax(0) for m in layers}

        def record(m: nn.Module, args: tuple) -> None:
            x = args[0]
            amax[id(m)].update(x.detach().reshape(-1, x.shape[-1]).t())

        saved = [(m, m.act.mode) for m in layers]
        for m in layers:
            m.act.mode = "observe"  # exact float path while measuring
            m.act.reset()
        _run_with_input_hook(gm, layers, record, batches)
        for m in layers:
            xa = amax[id(m)].value
            if xa is None:
                continue
            wa = m.input_channel_amax().to(xa)
            ok = (xa > 0) & (wa > 0)
            sc = torch.where(ok, xa.clamp_min(1e-8) ** self.smooth / wa.clamp_min(1e-8) ** (1 - self.smooth),
                             torch.ones_like(xa)).clamp(1e-4, 1e4)
            m.smooth_with(sc)
            m.act.reset()
        with torch.no_grad():
            for b in batches:
                call(gm, b)
        for m, mode in saved:
            if m.act.amax is not None:
                m.act.finalize()
            m.act.mode = "quant" if m.act.calibrated else mode

    # -- matching ---------------------------------------------------------------------------------
    def _layer(self, gm: fx.GraphModule, view: GraphView, node: fx.Node) -> tuple[str, fx.Node, Tensor, Tensor | None, dict] | str | None:
        """(op, x, weight, bias, conv options) for a quantizable layer, a skip reason, or None."""
        op = view.op(node)
        if node.op == "call_module":
            mod = gm.get_submodule(str(node.target))
            if isinstance(mod, nn.Linear):
                return "linear", node.args[0], mod.weight, mod.bias, {}
            if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
                    return f"conv padding {mod.padding_mode}/{mod.padding} is not lowered by this pass"
                return "conv", node.args[0], mod.weight, mod.bias, dict(
                    stride=mod.stride, padding=mod.padding, dilation=mod.dilation, groups=mod.groups)
            return None
        if node.op != "call_function":
            return None
        name = _target_name(node)
        if op == "linear":
            x, w = view.arg(node, 0, "input"), view.arg(node, 1, "weight")
            b = view.arg(node, 2, "bias")
            wt = view.constant(w)
            if wt is None:
                return "weight is not a constant (computed at run time)"
            bt = view.constant(b) if isinstance(b, fx.Node) else None
            if isinstance(b, fx.Node) and bt is None:
                return "bias is not a constant"
            return "linear", x, wt, bt, {}
        if op in ("matmul", "mm") and name in ("matmul", "mm"):
            a, w = node.args[0], node.args[1]
            wt = view.constant(w)
            if wt is None:
                if view.constant(a) is not None:
                    return "the constant is the left operand (W·x): only x·W is quantized"
                return None  # activation × activation (attention): not a layer
            if wt.dim() != 2:
                return f"matmul weight has {wt.dim()} dims (2 expected)"
            return "matmul", a, wt, None, {}
        if op == "conv" and name in ("conv1d", "conv2d", "conv3d", "convolution"):
            x, w = node.args[0], node.args[1]
            wt = view.constant(w)
            if wt is None:
                return "conv weight is not a constant"
            b = node.args[2] if len(node.args) > 2 else None
            bt = view.constant(b) if isinstance(b, fx.Node) else None
            if isinstance(b, fx.Node) and bt is None:
                return "conv bias is not a constant"
            if name == "convolution":
                if node.args[6]:
                    return "transposed convolution"
                stride, padding, dilation, groups = node.args[3], node.args[4], node.args[5], node.args[8]
            else:
                def at(i: int, default: Any) -> Any:
                    return node.args[i] if len(node.args) > i else default
                stride, padding, dilation, groups = at(3, 1), at(4, 0), at(5, 1), at(6, 1)
            if isinstance(padding, str):
                return f"conv padding '{padding}' is not lowered by this pass"
            return "conv", x, wt, bt, dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        return None

    # -- the pass -----------------------------------------------------------------------------------
    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        view = GraphView(gm)
        diags: list[Diagnostic] = []
        modified = False
        used: set[str] = {t for t in dict(gm.named_modules()) if t.startswith(PREFIX)}
        linear_weights: set[int] = set()

        def new_name(module_path: str) -> str:
            base = PREFIX + _safe(module_path)
            name, k = base, 1
            while name in used or hasattr(gm, name):
                k += 1
                name = f"{base}_{k}"
            used.add(name)
            return name

        for node in list(gm.graph.nodes):
            if node.op == "call_module" and str(node.target).startswith(PREFIX):
                continue
            found = self._layer(gm, view, node)
            if found is None:
                continue
            module = view.module_path(node)
            site = site_id("linear", module, node.name)
            if isinstance(found, str):
                diags.append(Diagnostic(self.name, site, "skipped", found, module, "linear"))
                continue
            op, x, w, b, conv = found
            linear_weights.add(w.untyped_storage().data_ptr())
            if not ctx.wants(site):
                continue
            sub = new_name(module or node.name)
            layer = QuantLinear(op, w, b, dtype=self.dtype, granularity=self.granularity, method=self.method,
                                reduce_range=self.reduce_range, conv=conv, name=sub)
            _swap(gm, ctx, node, sub, layer, x, SiteRecord(site, "linear", module, self.name, [sub]))
            shape = "x".join(map(str, w.shape))
            diags.append(Diagnostic(self.name, site, "applied", f"{self.dtype} {op} weight[{shape}] "
                                    f"{self.granularity}, activation per tensor ({self.method})", module, "linear"))
            modified = True

        if self.embeddings:
            modified |= self._tables(gm, view, ctx, diags, linear_weights, new_name)
        if modified:
            _drop_dead_constants(gm)
        return PassResult(gm, modified, diags)

    def _tables(self, gm: fx.GraphModule, view: GraphView, ctx: PassContext, diags: list[Diagnostic],
                linear_weights: set[int], new_name: Any) -> bool:
        modified = False
        for node in list(gm.graph.nodes):
            if view.op(node) != "embedding":
                continue
            if node.op == "call_module":
                mod = gm.get_submodule(str(node.target))
                table, ids, pad = mod.weight, node.args[0], mod.padding_idx
            elif node.op == "call_function":
                table, ids = view.constant(view.arg(node, 0, "weight")), view.arg(node, 1, "indices")
                pad = view.arg(node, 2, "padding_idx", -1)
                pad = None if pad is None or pad < 0 else pad
            else:
                continue
            module = view.module_path(node)
            site = site_id("embedding", module, node.name)
            if table is None:
                diags.append(Diagnostic(self.name, site, "skipped", "table is not a constant", module, "embedding"))
                continue
            if table.untyped_storage().data_ptr() in linear_weights:
                diags.append(Diagnostic(self.name, site, "skipped", "table is tied to a linear weight (the linear "
                                        "quantizes it)", module, "embedding"))
                continue
            if table.numel() < self.min_table:
                diags.append(Diagnostic(self.name, site, "skipped", f"table has {table.numel()} elements "
                                        f"(< min_table={self.min_table})", module, "embedding"))
                continue
            if not ctx.wants(site):
                continue
            sub = new_name(module or node.name)
            _swap(gm, ctx, node, sub, QuantEmbedding(table, pad, self.dtype), ids,
                  SiteRecord(site, "embedding", module, self.name, [sub]))
            diags.append(Diagnostic(self.name, site, "applied", f"{self.dtype} weight-only table[{'x'.join(map(str, table.shape))}]",
                                    module, "embedding"))
            modified = True
        return modified


def _drop_dead_constants(gm: fx.GraphModule) -> None:
    """Erase get_attr nodes left without users (the weights now live in the quantized submodules)."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
