"""GPTQ weight rounding (Frantar et al., 2022): round one input column at a time and push its error
onto the columns not rounded yet, weighted by the inverse Hessian of the layer's squared output error.

For a layer y = x·Wᵀ with inputs X, the output error of a rounded weight Ŵ is ‖X(W − Ŵ)ᵀ‖², whose
Hessian in each output row is H = XᵀX (input × input). Rounding column i alone costs
(w_i − ŵ_i)² / [H⁻¹]_ii; the optimal change of the columns j > i that compensates it is
−(w_i − ŵ_i)·[H⁻¹]_ij / [H⁻¹]_ii (optimal brain surgeon). With U the upper Cholesky factor of H⁻¹
these are the rows of U, so one factorisation serves every column. Columns are processed in blocks
whose updates to the rest are applied once per block ("lazy batch" updates, same result).

Nearest rounding is the special case H = I. The scales are not changed: only which grid point
each weight goes to, so the file layout (and the exactness of the integer kernels) stays the same.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["gptq_round"]


def gptq_round(w: Tensor, h: Tensor, round_column: Callable[[Tensor, int], Tensor], damp: float = 0.1,
               block: int = 32) -> Tensor:
    """Rounded ``w`` ([out, in]) under input second moments ``h`` ([in, in], e.g. XᵀX / n).

    ``round_column(col, k)`` maps input column ``k`` ([out], float64) to its rounded (dequantized)
    values with the layer's fixed scales (per output channel, or per block of columns: hence ``k``).
    ``damp`` × mean(diag H) is added to the diagonal: H is a sample estimate and near-singular where
    inputs are correlated (GPTQ uses 0.01; larger values pull the result towards nearest rounding).
    Returns the rounded weight, float64.

    Runs on one intra-op thread: the loop is thousands of small vector updates, which several threads
    only slow down (their barriers; on a loaded 2-core machine a 4096 × 576 weight took 20 s on two
    threads, 0.5 s on one). ``block`` 32: the per-column updates touch out × block / 2 elements, the
    once-per-block matrix product does the rest (same result for any block size)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _gptq_round(w, h, round_column, damp, block)
    finally:
        torch.set_num_threads(threads)


def _gptq_round(w: Tensor, h: Tensor, round_column: Callable[[Tensor, int], Tensor], damp: float,
                block: int) -> Tensor:
    w = w.detach().to(torch.float64).clone()
    h = h.detach().to(torch.float64).clone()
    n = h.shape[0]
    dead = torch.diagonal(h) <= 0
    # An input that is always zero carries no information: its weights cannot matter, rounding them
    # to zero avoids spreading noise through H's (otherwise singular) inverse.
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diagonal(h).mean() * torch.eye(n, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    out = torch.empty_like(w)
    for start in range(0, n, block):
        stop = min(start + block, n)
        wb = w[:, start:stop].clone()
        err = torch.empty_like(wb)
        ub = u[start:stop, start:stop]
        for j in range(stop - start):
            col = wb[:, j]
            q = round_column(col, start + j)
            out[:, start + j] = q
            e = (col - q) / ub[j, j]
            wb[:, j + 1:] -= e[:, None] * ub[j, j + 1:][None, :]
            err[:, j] = e
        w[:, stop:] -= err @ u[start:stop, stop:]
    return out
