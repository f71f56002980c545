"""The weight-only run-time module of ``linear-quant{dtype=int4 | int8w}``: ``WeightOnlyLinear``.

The activation stays float32; only the weight is stored in fewer bits and dequantized in front of the
product. Stored layout ``[in, out]`` (a linear's Wᵀ), so the file holds ``DequantizeLinear → MatMul``
with nothing in between, which ONNX Runtime's CPU optimizer fuses into ``MatMulNBits``:

    int4-b<B>   blocks of B input rows per output column, one scale and one zero point a block:
                asymmetric uint4  q = clamp(rne(w / s) + z, 0, 15),  s = (max − min) / 15,  z = rne(−min / s)
                symmetric  int4   q = clamp(rne(w / s), −8, 7),      s = max|w| / 7,     z = 0
                (``surgeon::dequantize_int4``: DequantizeLinear with ``block_size``, opset 21+)
    int8w       one scale per output column, symmetric int8 (|q| ≤ 127: no activation is quantized,
                so there is no u8·s8 saturation to avoid): DequantizeLinear(axis=1)

Every rung's codes are computed once (the guard switches rungs by name); ``active=False`` computes
the original layer with the float weight kept for rollback. GPTQ re-rounds the codes of every rung
under the layer's input moments (``gptq``), keeping the scales and zero points.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from surgeon.formats import round_half_even
from surgeon.passes._gptq import gptq_round
from surgeon.quant_ops import dequantize, dequantize_int4, quantize

__all__ = ["WeightOnlyLinear", "INT8W", "int4_rung", "rung_block", "quantize_int4"]

INT8W = "int8w"
ERROR_COLUMNS = 1024  # output columns ``output_error`` estimates a layer's relative error over
_INT4 = re.compile(r"int4-b(\d+)$")


def int4_rung(block: int) -> str:
    """The rung name of INT4 with ``block`` input rows per scale, e.g. ``int4-b32``."""
    return f"int4-b{block}"


def rung_block(rung: str) -> int | None:
    """The block size of an ``int4-b<B>`` rung; None for any other rung."""
    m = _INT4.match(rung)
    return int(m.group(1)) if m else None


def _code_range(symmetric: bool) -> tuple[float, float]:
    return (-8.0, 7.0) if symmetric else (0.0, 15.0)


def quantize_int4(stored: Tensor, block: int, symmetric: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(codes, scale, zero point) of ``stored`` ([in, out]) in blocks of ``block`` rows, round to
    nearest; codes int8 (symmetric) or uint8, one a byte; scale / zero point ``[ceil(in / block), out]``."""
    rows, cols = stored.shape
    nblocks = -(-rows // block)
    w = F.pad(stored.detach().float(), (0, 0, 0, nblocks * block - rows)).reshape(nblocks, block, cols)
    lo_code, hi_code = _code_range(symmetric)
    if symmetric:
        amax = w.abs().amax(1)
        scale = torch.where(amax > 0, amax / hi_code, torch.ones_like(amax))
        zero = torch.zeros_like(scale)
    else:
        # the range always holds 0, so a zero weight (padding too) is exactly representable
        lo, hi = w.amin(1).clamp(max=0), w.amax(1).clamp(min=0)
        scale = torch.where(hi > lo, (hi - lo) / hi_code, torch.ones_like(hi))
        zero = round_half_even(-lo / scale).clamp(lo_code, hi_code)
    q = (round_half_even(w / scale[:, None]) + zero[:, None]).clamp(lo_code, hi_code)
    dtype = torch.int8 if symmetric else torch.uint8
    return q.reshape(-1, cols)[:rows].to(dtype), scale, zero.to(dtype)


class WeightOnlyLinear(nn.Module):
    """``x ⊗ dq(W_q) + b`` with the weight in 4 or 8 bits, the activation float; ``active=False``
    computes the original layer exactly. ``op``: ``linear`` (y = x Wᵀ + b), ``matmul`` (y = x W),
    ``addmm`` (y = b + x W). ``rungs``: ``int4-b<B>`` and / or ``int8w``, best first."""

    def __init__(self, op: str, weight: Tensor, bias: Tensor | None, rungs: tuple[str, ...],
                 symmetric: bool = False) -> None:
        super().__init__()
        self.op, self.symmetric = op, symmetric
        self.active: bool = True
        self.rungs = rungs
        self.rung: str = rungs[0]
        # rung → relative output error on the fit inputs (``output_error``), once the fit has seen them
        self.local_error: dict[str, float] = {}
        self._dq_cache: dict[str, Tensor] = {}  # rung → dequantized weight (eager runs; see _weight)
        self.register_buffer("weight", weight.detach())  # for rollback; not traced while active
        self.register_buffer("bias", None if bias is None else bias.detach())
        stored = self.stored_weight()
        for rung in rungs:
            block = rung_block(rung)
            if block is not None:
                q, s, z = quantize_int4(stored, block, symmetric)
            else:
                amax = stored.abs().amax(0)
                s = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
                z = torch.zeros_like(s, dtype=torch.int8)
                q = quantize(stored, s, 1, "int8", z)
            self.register_buffer(self._key(rung, "q"), q)
            self.register_buffer(self._key(rung, "scale"), s)
            self.register_buffer(self._key(rung, "zero"), z)

    @staticmethod
    def _key(rung: str, what: str) -> str:
        return f"{what}_{rung.replace('-', '_')}"

    def codes(self, rung: str) -> tuple[Tensor, Tensor, Tensor]:
        """(codes, scale, zero point) stored for ``rung``."""
        return tuple(getattr(self, self._key(rung, w)) for w in ("q", "scale", "zero"))  # type: ignore[return-value]

    def stored_weight(self) -> Tensor:
        """The float weight in the stored layout ``[in, out]``."""
        w = self.weight.detach().float()
        return (w.t() if self.op == "linear" else w).contiguous()

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1] if self.op == "linear" else self.weight.shape[0])

    def dequantized_weight(self, rung: str | None = None) -> Tensor:
        rung = rung or self.rung
        q, s, z = self.codes(rung)
        block = rung_block(rung)
        return dequantize(q, s, 1, z) if block is None else dequantize_int4(q, s, z, block)

    def stored_bytes(self, rung: str) -> int:
        """Bytes the file stores for ``rung``: codes (4 or 8 bits each), fp32 scales, zero points."""
        q, s, z = self.codes(rung)
        bits = 8 if rung_block(rung) is None else 4
        return (q.numel() * bits + z.numel() * bits) // 8 + 4 * s.numel()

    def gptq(self, h: Tensor, damp: float, *, rounding: bool = True) -> None:
        """Re-round every rung's codes by GPTQ for input moments ``h`` = E[xᵀx] (passes/_gptq.py);
        scales and zero points stay, so input column k uses its block's (or the column's) grid.
        ``rounding=False`` keeps the codes. Either way each rung's ``local_error`` is set from ``h``."""
        stored = self.stored_weight()
        for rung in self.rungs if rounding else ():
            q, s, z = self.codes(rung)
            block = rung_block(rung) or stored.shape[0]  # int8w: one "block" spanning every row
            lo, hi = _code_range(self.symmetric) if rung_block(rung) else (-127.0, 127.0)
            s64, z64 = s.double().reshape(-1, s.shape[-1]), z.double().reshape(-1, s.shape[-1])

            def round_column(col: Tensor, k: int, s64: Tensor = s64, z64: Tensor = z64, block: int = block,
                             lo: float = lo, hi: float = hi) -> Tensor:
                sk, zk = s64[k // block], z64[k // block]
                return ((col / sk).round() + zk).clamp(lo, hi).sub(zk) * sk

            w = gptq_round(stored.t(), h, round_column, damp).t()  # on the grid: codes = w / s + z exactly
            rep = min(block, stored.shape[0])
            codes = (w / s64.repeat_interleave(rep, 0)[: w.shape[0]]).round() + z64.repeat_interleave(rep, 0)[: w.shape[0]]
            setattr(self, self._key(rung, "q"), codes.clamp(lo, hi).to(q.dtype))
        self._dq_cache.clear()
        self.local_error = self.output_errors(h, self.rungs)

    def output_error(self, h: Tensor, rung: str) -> float:
        """This layer's relative output error on ``rung`` for inputs of second moments ``h`` = E[xᵀx]:
        E‖x·ΔW‖² / E‖x·W‖² = tr(ΔWᵀ h ΔW) / tr(Wᵀ h W) (stored layout [in, out], ΔW = dq(W_q) − W): the
        error where the layer acts, measured without running the model (the guard's solo figure at scale).
        Over at most ``ERROR_COLUMNS`` output columns (a seeded subset, the same for both traces), in
        float32: it costs in² × columns multiply-adds per rung, and ranks sites (a few digits suffice)."""
        return self.output_errors(h, (rung,))[rung]

    def output_errors(self, h: Tensor, rungs: tuple[str, ...]) -> dict[str, float]:
        """``output_error`` of each of ``rungs``, the denominator computed once."""
        w = self.stored_weight()
        rows, cols = w.shape[0], None
        if w.shape[1] > ERROR_COLUMNS:
            cols = torch.randperm(w.shape[1], generator=torch.Generator().manual_seed(0))[:ERROR_COLUMNS]
            w = w[:, cols]
        h = h.float()
        den = float(((h @ w) * w).sum())
        out = {}
        for rung in rungs:
            dq = self.dequantized_weight(rung)[:rows]
            dw = (dq if cols is None else dq[:, cols]) - w
            out[rung] = float(((h @ dw) * dw).sum()) / den if den > 0 else 0.0
        return out

    def __getstate__(self) -> dict:
        # a copy (the pipeline deep-copies fitted layers into the rebuilt graph) or a pickle carries the
        # codes, not the dequantized weights derived from them: a copy of those is the model's size again
        state = self.__dict__.copy()
        state["_dq_cache"] = {}
        return state

    def _exact(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight) if self.op == "linear" else torch.matmul(x, self.weight)
        return y if self.bias is None else y + self.bias

    def _weight(self, x: Tensor) -> Tensor:
        """The dequantized weight of the current rung; in eager runs (the fit's and the guard's many
        forwards) kept per rung until the codes change, since dequantizing every Linear on every call
        was most of a decoder's fit time. Traced (export, fx), the dequantize op itself is recorded."""
        if torch.compiler.is_compiling() or isinstance(x, torch.fx.Proxy):
            return self.dequantized_weight()
        w = self._dq_cache.get(self.rung)
        if w is None:
            w = self._dq_cache[self.rung] = self.dequantized_weight()
        return w

    def forward(self, x: Tensor) -> Tensor:
        if not self.active:
            return self._exact(x)
        y = torch.matmul(x, self._weight(x))
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        kind = "symmetric int4" if self.symmetric else "asymmetric uint4"
        return (f"op={self.op}, weight={tuple(self.weight.shape)}, weight-only ({kind} blocks / int8 per "
                f"channel), rung={self.rung}" + ("" if self.active else ", active=False"))
