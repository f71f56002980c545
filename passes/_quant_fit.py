"""Fit algorithms of ``linear-quant``: how calibration batches shape the quantized layers.

Each runs the graph over the fit batches with forward pre-hooks on the ``QuantLinear`` layers and
keeps bounded state (one running max per input channel, or one XᵀX per layer within a memory
budget), so memory does not grow with the number of batches:

* ``input_amax``: per-input-channel max |x| of each layer's input in the float model;
* ``mark_outliers``: input channels whose range is far over the median's go to the float product
  of the ``int8-dynamic-outliers`` rung (``QuantLinear.set_outliers``);
* ``smooth_layers``: SmoothQuant, s_c = amax(x_c)^α / amax(W_c)^(1−α) per input channel migrated into the
  weight, then the activation quantizers calibrated again on x / s;
* ``gptq_layers``: E[x̃ᵀx̃] of each layer's smoothed input, accumulated with the quantized model running
  (the inputs the layer will see), then every stored weight re-rounded by GPTQ (passes/_gptq.py);
  weight-only layers (``WeightOnlyLinear``, no smoothing) re-round the codes of each of their rungs.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, fx, nn

from surgeon.calibration import RunningAmax
from surgeon.inputs import call
from surgeon.passes._gptq import gptq_round
from surgeon.passes._quant_layers import INT8_WEIGHT_MAX, QuantLinear
from surgeon.passes._quant_weight import WeightOnlyLinear
from surgeon.quant_ops import dequantize, quantize

__all__ = ["input_amax", "mark_outliers", "smooth_layers", "gptq_layers", "round_layer"]


def _run_with_input_hook(gm: fx.GraphModule, layers: list[Any], record: Callable[[nn.Module, tuple], None],
                         batches: list[Any], index: list[int] | None = None) -> None:
    """One pass over ``batches`` with ``record(layer, args)`` seeing every layer's inputs (``index[0]``:
    the batch being run, for a hook that must count a batch once)."""
    hooks = [m.register_forward_pre_hook(record) for m in layers]
    try:
        with torch.no_grad():
            for i, b in enumerate(batches):
                if index is not None:
                    index[0] = i
                call(gm, b)
    finally:
        for h in hooks:
            h.remove()


def input_amax(gm: fx.GraphModule, layers: list[QuantLinear], batches: list[Any]) -> dict[int, Tensor | None]:
    """Per-input-channel max |x| of each layer's input (keyed by ``id(layer)``) in the float model
    (these layers exact), one streaming pass with one running max per channel per layer."""
    amax: dict[int, RunningAmax] = {id(m): RunningAmax(0) for m in layers}

    def record(m: nn.Module, args: tuple) -> None:
        x = args[0]
        amax[id(m)].update(x.detach().reshape(-1, x.shape[-1]).t())

    saved = [(m, m.active) for m in layers]
    for m in layers:
        m.active = False
    try:
        _run_with_input_hook(gm, layers, record, batches)
    finally:
        for m, active in saved:
            m.active = active
    return {k: v.value for k, v in amax.items()}


def mark_outliers(layers: list[QuantLinear], amax: dict[int, Tensor | None], ratio: float, max_share: float) -> None:
    """Give each layer the input channels whose max |x| is over ``ratio`` × the median channel's, the
    widest first, at most ``max_share`` of its channels (at least one)."""
    for m in layers:
        a = amax[id(m)]
        if a is None or not bool(torch.isfinite(a).all()):
            continue
        limit = max(int(max_share * a.numel()), 1)
        over_median = a / a.median().clamp_min(1e-12)
        over = torch.nonzero(over_median > ratio).flatten()
        if over.numel():
            m.set_outliers(over[over_median[over].argsort(descending=True)][:limit])


def smooth_layers(gm: fx.GraphModule, layers: list[QuantLinear], amax: dict[int, Tensor | None], batches: list[Any],
           alpha: float) -> None:
    """SmoothQuant with migration strength ``alpha``, then recalibrate the layers' activation scales
    on the smoothed inputs x / s (one more pass over ``batches``)."""
    saved = [(m, m.act.mode) for m in layers]
    for m in layers:
        xa = amax[id(m)]
        if xa is not None:
            wa = m.input_channel_amax().to(xa)
            ok = (xa > 0) & (wa > 0)
            sc = torch.where(ok, xa.clamp_min(1e-8) ** alpha / wa.clamp_min(1e-8) ** (1 - alpha),
                             torch.ones_like(xa)).clamp(1e-4, 1e4)
            m.smooth_with(sc)
        m.act.mode = "observe"  # calibrate the activation scales again, on x / s
        m.act.reset()
    with torch.no_grad():
        for b in batches:
            call(gm, b)
    for m, mode in saved:
        if m.act.amax is not None:
            m.act.finalize()
        m.act.mode = "quant" if m.act.calibrated else mode


# Rows of each layer's input that its second moments E[xᵀx] are estimated from, over all batches (a
# seeded subset of each batch's rows beyond its share): a d×d estimate needs thousands of rows, and the
# product costs rows × d² per layer — a 30-layer decoder's 8 × 512-token batches made it most of the run.
MAX_MOMENT_ROWS = 32768


def gptq_layers(gm: fx.GraphModule, layers: list[QuantLinear] | list[WeightOnlyLinear], batches: list[Any], damp: float,
                hessian_mb: int, *, rounding: bool = True) -> None:
    """Re-round every layer's weights by GPTQ for the inputs it sees over ``batches`` (weight-only layers
    with ``rounding=False``: only their ``local_error`` from those inputs' moments, codes as they are)."""
    # XᵀX is in² per input: weight-only layers that read one tensor (q/k/v, gate/up) share one matrix
    # (float32 sums, as GPTQ keeps them), a smoothed INT8 layer has its own (float64 sums: its input is
    # its own x / s). Inputs are taken in groups that fit hessian_mb, one pass over the batches per
    # group, so memory is bounded whatever the model's size.
    slot = _input_slots(gm, layers)
    sizes: dict[Any, int] = {}
    for m in layers:
        sizes[slot[id(m)]] = m.in_features ** 2 * (8 if isinstance(m, QuantLinear) else 4)
    budget = hessian_mb * 2**20
    groups: list[list[Any]] = [[]]
    used = 0
    for key, size in sizes.items():
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(key)
        used += size
    per_batch = -(-MAX_MOMENT_ROWS // max(len(batches), 1))
    batch = [0]
    for group in groups:
        keys = set(group)
        members = [m for m in layers if slot[id(m)] in keys]
        stats: dict[Any, list] = {k: [None, 0, -1] for k in group}  # [Σ xᵀx, rows, last batch added]
        gen = torch.Generator().manual_seed(0)

        def record(m: Any, args: tuple, stats: dict = stats, gen: torch.Generator = gen) -> None:
            st = stats[slot[id(m)]]
            if st[2] == batch[0]:  # another layer on the same input added this batch's moments
                return
            x = m.smoothed(args[0].detach()) if isinstance(m, QuantLinear) else args[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(torch.float32)
            if x.shape[0] > per_batch:  # a seeded subset of the rows: H's estimate needs thousands, not all
                x = x[torch.randperm(x.shape[0], generator=gen)[:per_batch]]
            xtx = x.t() @ x  # one batch in float32 (fast); an INT8 layer's sum in float64
            xtx = xtx.to(torch.float64) if isinstance(m, QuantLinear) else xtx
            st[0] = xtx if st[0] is None else st[0] + xtx
            st[1] += x.shape[0]
            st[2] = batch[0]

        _run_with_input_hook(gm, members, record, batches, batch)
        for m in members:
            h, n, _ = stats[slot[id(m)]]
            if h is not None and n and isinstance(m, QuantLinear):
                round_layer(m, h / n, damp)
            elif h is not None and n:
                m.gptq(h.double() / n, damp, rounding=rounding)


def _input_slots(gm: fx.GraphModule, layers: list[Any]) -> dict[int, Any]:
    """Which input each layer's moments are taken on (by ``id(layer)``): the graph node feeding it for
    weight-only layers (so q/k/v share one), the layer itself for smoothed INT8 layers."""
    wanted = {id(m) for m in layers}
    slot: dict[int, Any] = {id(m): id(m) for m in layers}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.args and isinstance(node.args[0], fx.Node):
            m = gm.get_submodule(str(node.target))
            if id(m) in wanted and not isinstance(m, QuantLinear):
                slot[id(m)] = ("input", node.args[0].name)
    return slot


def round_layer(m: QuantLinear, h: Tensor, damp: float) -> None:
    """Re-round ``m``'s stored weights by GPTQ for inputs whose second moments are ``h`` = E[x̃ᵀx̃]
    (x̃ the smoothed input). Scales and layout stay; only grid points move. The dynamic rung's weight
    sees the unsmoothed x = x̃·diag(s), so its moments are diag(s)·h·diag(s)."""
    if f"{m.dtype}-static" in m.rungs:
        m.qweight = _rounded(m, m.stored_weight(), m.wscale, m.dtype, h, damp)
    if hasattr(m, "dqweight"):
        s = m.smoothing
        h_x = h if s is None else h * (s.double()[:, None] * s.double()[None, :])
        m.dqweight = _rounded(m, m.stored_weight(smoothed=False), m.dwscale, "int8", h_x, damp)
        if m.outlier_count:
            h_o = h_x.clone()  # the outlier inputs are zero in the integer product
            h_o[m.outlier_index, :] = 0
            h_o[:, m.outlier_index] = 0
            m.oqweight = _rounded(m, m.inlier_weight(), m.owscale, "int8", h_o, damp)


def _rounded(m: QuantLinear, stored: Tensor, s: Tensor, dtype: str, h: Tensor, damp: float) -> Tensor:
    """``stored`` (``m``'s layout) quantized with the scales ``s``, rounded by GPTQ under ``h``."""
    qmax = INT8_WEIGHT_MAX[m.reduce_range]
    s64 = s.double()

    def round_column(col: Tensor, _k: int) -> Tensor:  # one input channel: a [out] vector, scale per out
        if dtype == "int8":  # the custom op's rounding (half to even), inline: called per column
            return torch.round(col / s64).clamp(-qmax, qmax) * s64
        return dequantize(quantize(col.float(), s, 0, "fp8"), s, 0).double()

    w = gptq_round(stored.t(), h, round_column, damp)
    # w is on the grid already: quantizing it again returns exactly the integers chosen above
    zp = torch.zeros_like(s, dtype=torch.int8) if dtype == "int8" else None
    q = quantize(w.t().float().contiguous(), s, m.axis or 0, dtype, zp)
    return q.clamp(-int(qmax), int(qmax)) if dtype == "int8" else q
