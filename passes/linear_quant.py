"""Quantize Linear / MatMul / Conv layers with a constant weight to FP8 or INT8 (weights + activations),
or Linear / MatMul layers weight-only to INT4 blocks or INT8 per channel (``dtype=int4`` / ``int8w``).

Before:  y = x · Wᵀ + b                       (aten.linear, nn.Linear; aten.matmul x·W; conv1d/2d/3d)
After:   y = dq(q(x; s_x)) · dq(W_q; s_W) + b
         W_q = q(Wᵀ; s_W) is stored quantized (float8_e4m3fn / int8 buffer), s_W per output channel
         (``granularity=channel``) or per tensor; s_x per tensor, static, calibrated (max |
         percentile | mse). The linear weight is stored transposed ([in, out], per-channel axis 1),
         so the ONNX file holds ``DequantizeLinear(W_q) → MatMul`` with nothing in between: the
         layout ONNX Runtime's QDQ fusion turns into one integer kernel (MatMulIntegerToFloat).
         Embedding tables no linear owns (``embeddings=True``): weight-only, one scale per row, stored
         FP8 (dtype=fp8) or INT8 (dtype=int8), so the table — half of a small BERT's weights — shrinks
         in the file too (passes/_quant_layers.py's ``QuantEmbedding`` says where the dequantize sits and why).
Rungs (the guard steps a layer down them before it keeps the layer in float; the target's profile
names those its runtime runs): INT8 ``int8-dynamic`` → ``int8-dynamic-outliers`` → ``int8-static``
(``QuantLinear``; onnx-int8), ``int8-static`` → ``int8-weight`` (openvino-int8: the weight-only step,
y = x · dq(W_q; s_W) + b with 8-bit per-channel codes, which OpenVINO runs as its weight-compressed
FullyConnected); FP8 ``fp8-static`` → ``fp8-weight`` (onnx-fp8), the weight-only step:
y = x · dq(W_q; s_W) + b, the activation in float, the bytes still saved.
INT8 weights use 7 bits (|q| ≤ 63) unless ``reduce_range=False``: x86 CPUs without VNNI multiply u8
activations by s8 weights with ``vpmaddubsw``, whose int16 pair sums saturate when 2·255·|w| > 32767;
with |w| ≤ 63 they cannot, so ONNX Runtime computes exactly what the torch module computes.
Weights are rounded by GPTQ (``rounding=gptq``, passes/_gptq.py): each input column's rounding
error is compensated on the columns not rounded yet through (XᵀX)⁻¹ of the layer's calibration
inputs, which recovers most of the bit the 7-bit range costs (MiniLM held-out cosine min 0.9938 →
0.9959); ``rounding=nearest`` rounds each weight alone.

Weight-only (decoders on CPU, passes/_quant_weight.py): y = x · dq(W_q) + b with x in float32;
``dtype=int4``: 4-bit codes in blocks of ``block`` input rows with a scale and a zero point per block
(asymmetric uint4 unless ``symmetric=True``: on the trained tiny decoder's weights asymmetric had
the lower output error, see docs/passes/linear-quant.md); ``dtype=int8w``: int8 per output channel.
Rungs ``int4-b<block>`` → finer blocks the profile lists → ``int8w`` → keep (``linear-weight``
ladder: int4-b128 → int4-b32 → int8w, each rung more accurate and slower than the one before; ORT
fuses each into ``MatMulNBits``). Convs are skipped (no 4-bit conv kernel).

Skipped when: the weight is not a constant (computed from an input); the constant is the left
operand of the matmul; a conv is transposed; a table is also read by a linear (tied weights: the
linear owns it) or has fewer than ``min_table`` elements; the node is already quantized.
Sites: ``linear:<module path>:<node>`` (one per layer) and ``embedding:<module path>:<node>``;
each is one switchable submodule, so the guard can roll back single layers.
This module matches the layers and swaps them in; the substitutes are passes/_quant_layers.py, the
fit on calibration batches (SmoothQuant, outlier channels, GPTQ) passes/_quant_fit.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Literal, Optional

from torch import Tensor, fx, nn

from surgeon.analysis import GraphView, site_id
from surgeon.pass_manager import Diagnostic, Pass, PassContext, PassResult, SiteRecord
from surgeon.passes._quant_fit import gptq_layers, input_amax, mark_outliers, smooth_layers
from surgeon.passes._quant_layers import FP8_WEIGHT, INT8_WEIGHT, OUTLIERS, QuantEmbedding, QuantLinear
from surgeon.passes._quant_match import match_layer
from surgeon.passes._quant_weight import INT8W, WeightOnlyLinear, int4_rung, rung_block

__all__ = ["LinearQuant", "PREFIX"]

PREFIX = "surgeon_linear_quant_"
INT8_RUNGS = ("int8-static", "int8-dynamic", OUTLIERS, INT8_WEIGHT)
# Without a target profile (the Python API without target=): the calibrated static scale alone, as
# before rungs existed; a target's profile names the rungs its runtime runs.
DEFAULT_LADDER = ("int8-static", "keep")
WEIGHT_ONLY = ("int4", "int8w")
# Weight-only rungs without a profile's ``linear-weight`` ladder: the coarsest block measured (smallest,
# fastest), the finest, then 8 bits: error falls at each step (docs/passes/linear-quant.md has the figures).
DEFAULT_WEIGHT_LADDER = (int4_rung(128), int4_rung(32), INT8W, "keep")


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
    # its contract examples (tests/test_pass_contract.py): a model with its sites, then near-misses
    examples: ClassVar[tuple[str, ...]] = ("_pass_examples:transformer_pre", "_pass_examples:transformer_pre")
    example_spec: ClassVar[str] = "linear-quant{dtype=int8,rounding=nearest}"  # a non-default option
    # int4 / int8w: weight-only (the activation stays float32)
    dtype: Literal["fp8", "int8", "int4", "int8w"] = "fp8"
    block: int = 128  # int4: input rows per scale and zero point (a power of two ≥ 16, ORT's MatMulNBits)
    symmetric: bool = False  # int4: signed codes with zero point 0, instead of uint4 with a zero point
    granularity: Literal["channel", "tensor"] = "channel"
    method: Literal["max", "percentile", "mse"] = "mse"  # activation clip; mse beat max and percentile on MiniLM
    embeddings: bool = True  # weight-only quantization of tables no linear owns (the word embeddings)
    # int8: 7-bit weights (exact on AVX2 u8·s8 kernels); None → the target profile's weight bits (7 without one)
    reduce_range: Optional[bool] = None
    # int8 activations: auto → the target profile's ladder (static, then dynamic); or only one of them
    activations: Literal["auto", "static", "dynamic"] = "auto"
    # int8-dynamic-outliers rung: input channels whose calibrated max |x| is over outliers × the median
    # channel's are computed in float (at most max_outliers of the channels; 0 = no such rung)
    outliers: float = 8.0
    max_outliers: float = 0.02
    min_table: int = 1024  # smaller tables are not worth a Q/DQ pair
    smooth: float = 0.8  # SmoothQuant migration strength α (0 = off), fitted on the fit batches
    rounding: Literal["nearest", "gptq"] = "gptq"  # weight rounding (linear / matmul; convs: nearest)
    damp: float = 0.1  # GPTQ: damp × mean(diag XᵀX) added to the diagonal (see passes/_gptq.py)
    hessian_mb: int = 512  # GPTQ: memory for XᵀX statistics per pass over the fit batches

    def __post_init__(self) -> None:
        if self.dtype not in ("fp8", "int8", *WEIGHT_ONLY):
            raise ValueError(f"dtype must be fp8, int8, int4 or int8w, got {self.dtype}")
        if self.block < 16 or self.block & (self.block - 1):
            raise ValueError(f"block must be a power of two ≥ 16 (ORT's MatMulNBits), got {self.block}")
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
        if self.outliers < 0 or not 0 <= self.max_outliers < 1:
            raise ValueError(f"outliers must be ≥ 0 and max_outliers in [0, 1), got {self.outliers}, {self.max_outliers}")
        if self.activations not in ("auto", "static", "dynamic"):
            raise ValueError(f"activations must be auto, static or dynamic, got {self.activations}")
        if self.dtype == "fp8" and self.activations == "dynamic":
            raise ValueError("activations=dynamic needs dtype=int8 (dynamic quantization is uint8 in ONNX)")

    # -- what the target runs -----------------------------------------------------------------------
    def _reduce_range(self, profile: Any) -> bool:
        if self.reduce_range is not None:
            return self.reduce_range
        return getattr(profile, "int8_weight_bits", 7) < 8

    def _weight_rungs(self, profile: Any) -> tuple[str, ...]:
        """Weight-only rungs, best first: the requested block, then the profile's finer blocks and int8w."""
        if self.dtype == INT8W:
            return (INT8W,)
        ladder = profile.formats("linear-weight") if profile is not None else ()
        ladder = ladder if len(ladder) > 1 else DEFAULT_WEIGHT_LADDER
        rest = tuple(r for r in ladder if r == INT8W or 0 < (rung_block(r) or 0) < self.block)
        return (int4_rung(self.block), *rest)

    def _rungs(self, op: str, profile: Any) -> tuple[str, ...]:
        """The substitutes a layer may take, best first (the guard steps down them before keeping it)."""
        if self.dtype == "fp8":
            ladder = tuple(profile.formats("linear")) if profile is not None else ()
            return ("fp8-static", FP8_WEIGHT) if FP8_WEIGHT in ladder and op != "conv" else ("fp8-static",)
        ladder = tuple(profile.formats("linear")) if profile is not None else DEFAULT_LADDER
        if self.activations == "static":  # int8-weight quantizes no activation: it stays
            ladder = tuple(r for r in ladder if r in ("int8-static", INT8_WEIGHT)) or ("int8-static",)
        elif self.activations == "dynamic":
            ladder = tuple(r for r in ladder if r.startswith("int8-dynamic")) or ("int8-dynamic",)
        if self.outliers == 0 or self.max_outliers == 0:
            ladder = tuple(r for r in ladder if r != OUTLIERS)
        if op == "conv":  # the dynamic ops are a matmul: a conv keeps its calibrated scale
            ladder = tuple(r for r in ladder if r == "int8-static") or ("int8-static",)
        return tuple(r for r in ladder if r in INT8_RUNGS) or ("int8-static",)

    # -- fitting ----------------------------------------------------------------------------------
    def fit(self, gm: fx.GraphModule, ctx: PassContext, batches: Iterable[Any]) -> None:
        """SmoothQuant, then GPTQ rounding, on the fit batches.

        SmoothQuant: s_c = amax(x_c)^α / amax(W_c)^(1−α) per input channel, then recalibrate. Two
        streaming passes with bounded state (one running max per input channel per layer): (1)
        input-channel maxima of every layer's float input; (2) after the weights are requantized as
        diag(s)·W, the per-tensor activation quantizers are calibrated again on x / s.
        GPTQ (``rounding=gptq``): E[x̃ᵀx̃] of each layer's smoothed input, accumulated with the
        quantized model running (the inputs the layer will see), then each weight re-rounded
        (passes/_quant_fit.py).
        Other passes' quantizers are left as they are."""
        if self.dtype in WEIGHT_ONLY:
            # nearest rounding too: the inputs' moments give each rung's error where the layer acts
            gptq_layers(gm, [m for m in gm.modules() if isinstance(m, WeightOnlyLinear) and m.active],
                        list(batches), self.damp, self.hessian_mb, rounding=self.rounding == "gptq")
            return
        layers = [m for _, m in gm.named_modules()
                  if isinstance(m, QuantLinear) and m.smoothable and m.active and m.dtype == self.dtype]
        if not layers:
            return
        batches = list(batches)
        split = [m for m in layers if OUTLIERS in m.rungs]
        static = [m for m in layers if f"{m.dtype}-static" in m.rungs] if self.smooth > 0 else []  # smoothing: static scale only
        # one pass of the float model serves both: outlier channels and SmoothQuant read the same maxima
        amax = input_amax(gm, list({id(m): m for m in split + static}.values()), batches) if split or static else {}
        if split:
            mark_outliers(split, amax, self.outliers, self.max_outliers)
            for record in ctx.records.values():  # a layer without outliers: that rung is int8-dynamic's twin
                if record.pass_name == self.name and OUTLIERS in record.rungs:
                    m = gm.get_submodule(record.submodules[0])
                    if isinstance(m, QuantLinear) and not m.outlier_count:
                        record.rungs = tuple(r for r in record.rungs if r != OUTLIERS)
                        record.benefit.pop(OUTLIERS, None)
                    elif isinstance(m, QuantLinear):
                        record.benefit[OUTLIERS] = m.benefit(OUTLIERS, record.benefit[OUTLIERS])
        if static:
            smooth_layers(gm, static, amax, batches, self.smooth)
        if self.rounding == "gptq":
            gptq_layers(gm, layers, batches, self.damp, self.hessian_mb)

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
            found = match_layer(gm, view, node)
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
            profile = getattr(ctx, "profile", None)
            speed = getattr(profile, "speed_of", lambda r: 1.0)
            shape = "x".join(map(str, w.shape))
            base = {"macs": float(_macs(node, w, op))}
            if self.dtype in WEIGHT_ONLY:
                if op == "conv":
                    diags.append(Diagnostic(self.name, site, "skipped", "weight-only formats are for linear "
                                            "layers (ORT has no 4-bit conv kernel): conv kept", module, "linear"))
                    continue
                sub = new_name(module or node.name)
                rungs = self._weight_rungs(profile)
                layer = WeightOnlyLinear(op, w, b, rungs, symmetric=self.symmetric)
                fp32 = 4 * w.numel()
                benefit = {r: {**base, "weight_bytes": float(fp32 - layer.stored_bytes(r)), "speed": speed(r)}
                           for r in rungs}
                detail = f"weight-only {op} weight[{shape}]: {' → '.join(rungs)}"
            else:
                sub = new_name(module or node.name)
                rungs = self._rungs(op, profile)
                layer = QuantLinear(op, w, b, dtype=self.dtype, granularity=self.granularity, method=self.method,
                                    reduce_range=self._reduce_range(profile), conv=conv, name=sub, rungs=rungs)
                base["weight_bytes"] = float(layer.weight_bytes_saved())
                benefit = {r: {**layer.benefit(r, base), "speed": speed(r)} for r in rungs}
                bits = 7 if layer.reduce_range and self.dtype == "int8" else 8
                detail = (f"{self.dtype} {op} weight[{shape}] {self.granularity} ({bits}-bit), activation per "
                          f"tensor: {' → '.join(rungs)} ({self.method} clip where static)")
            record = SiteRecord(site, "linear", module, self.name, [sub], rungs=rungs, benefit=benefit)
            _swap(gm, ctx, node, sub, layer, x, record)
            diags.append(Diagnostic(self.name, site, "applied", detail, module, "linear"))
            modified = True

        if self.embeddings:
            modified |= self._tables(gm, view, ctx, diags, linear_weights, new_name)
        diags += self._experts(gm, view, linear_weights)
        if modified:
            _drop_dead_constants(gm)
        return PassResult(gm, modified, diags)

    def _experts(self, gm: fx.GraphModule, view: GraphView, linear_weights: set[int]) -> list[Diagnostic]:
        """List the 3-D weights no linear owns (an MoE's stacked expert matrices, ``[experts, in, out]``,
        read by a grouped matmul or by indexing): not a layer this pass rewrites, so they stay float,
        and the report says so rather than leaving them out."""
        diags = []
        for node in gm.graph.nodes:
            if node.op != "get_attr":
                continue
            w = view.constant(node)
            if not isinstance(w, Tensor) or w.dim() != 3 or not w.is_floating_point() or not node.users:
                continue
            if w.untyped_storage().data_ptr() in linear_weights:
                continue
            reader = next(iter(node.users))
            if view.op(reader) in ("conv", "convolution", "conv1d"):
                continue  # a conv1d weight: the layer loop above gave its reason
            module = view.module_path(reader)
            diags.append(Diagnostic(
                self.name, site_id("linear", module, node.name), "skipped",
                f"3-D weight {node.target}[{'x'.join(map(str, w.shape))}] (stacked expert matrices) is read by "
                f"{getattr(reader.target, '__name__', reader.target)}, not by a linear layer: kept in float",
                module, "linear"))
        return diags

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
            # weight-only: the table is stored in 8 bits, gathered rows are dequantized
            rung = self.dtype if self.dtype in ("fp8", "int8") else "int8"
            _swap(gm, ctx, node, sub, QuantEmbedding(table, pad, rung), ids,
                  SiteRecord(site, "embedding", module, self.name, [sub], rungs=(rung,),
                             benefit={rung: {"weight_bytes": 3.0 * table.numel(), "macs": 0.0}}))
            diags.append(Diagnostic(self.name, site, "applied", f"{rung} weight-only table[{'x'.join(map(str, table.shape))}]",
                                    module, "embedding"))
            modified = True
        return modified


def _macs(node: fx.Node, w: Tensor, op: str) -> int:
    """Multiply-adds per sample the layer moves to 8 bits: output elements per sample × inputs per
    output (w.numel() / output channels); 0 when the output shape was not recorded."""
    val = node.meta.get("val")
    if not isinstance(val, Tensor) or val.dim() == 0:
        return 0
    per_sample = val.numel() // max(int(val.shape[0]), 1) if val.dim() > 1 else val.numel()
    out_channels = w.shape[0] if op in ("linear", "conv") else w.shape[-1]
    return int(per_sample * (w.numel() // max(int(out_channels), 1)))


def _drop_dead_constants(gm: fx.GraphModule) -> None:
    """Erase get_attr nodes left without users (the weights now live in the quantized submodules)."""
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
