"""Normalizing flows on scikit-learn's digits (D = 64): flow-fold, flow-inverse, linear-quant, side by side.

Data: the 1797 8×8 digits shipped with scikit-learn (pixel levels 0…16), a seeded 80/20 split (1437
train, 360 test), dequantized (v = pixel + u, u ~ U[0, 1), fixed seed) and logit-transformed:
y = logit(α + (1 − 2α)·v/17), α = 0.05. Bits per dimension are reported in the 17-level pixel space
(the logit transform's log-Jacobian is accounted for): bpd = −(log p(y) + log|dy/dv|) / (64 ln 2).

Models (trained here, fixed seeds, Adam; bench/flow_models.py):
* RealNVP-style: ActNorm → masked affine coupling (alternating masks), invertible linear mixes.
* MAF: MADE layers, order reversed between them, ActNorm after each.

For each: test bpd of the trained flow; ``flow-fold`` (exact: outputs compared); ``flow-inverse``
distilled on the training images through ``surgeon.passes.flow_inverse.distill_inverse`` (the optimize
pipeline's fit/check split of the calibration batches, guard on the check part) and measured on the
held-out test images: median / p90 relative reconstruction error ‖g(f(x)) − x‖/‖x‖; time to draw 1000
samples (z ~ N(0, I) → x) with the exact inverse and with the auxiliary one; a sample-quality proxy
(the original flow's log-likelihood of the samples, in bpd — lower is more "typical" — and the mean
distance from a sample to its nearest held-out image, both for exact and auxiliary samples).
``linear-quant`` on the coupling networks is run through ``surgeon.optimize`` with the bits/dim
change as the guard's metric when that pass is available.

    python bench/flows.py                  # writes bench/results/flows.md
    python bench/flows.py --quick          # fewer training steps (a smoke run)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flow_models import Flow, log_normal, maf, realnvp  # noqa: E402

ALPHA = 0.05
LEVELS = 17
D = 64


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_data(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y_train, y_test, ljac_train, ljac_test)``: logit-space data [N, 64] and per-sample log|dy/dv|."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pix = torch.tensor(digits.data, dtype=torch.float64)
    i_train, i_test = train_test_split(range(len(pix)), test_size=0.2, random_state=seed, stratify=digits.target)
    gen = torch.Generator().manual_seed(seed)
    v = pix + torch.rand(pix.shape, generator=gen, dtype=torch.float64)
    s = ALPHA + (1 - 2 * ALPHA) * v / LEVELS
    y = torch.log(s) - torch.log1p(-s)
    ljac = (math.log(1 - 2 * ALPHA) - math.log(LEVELS) - torch.log(s) - torch.log1p(-s)).sum(1)
    return y[i_train].float(), y[i_test].float(), ljac[i_train], ljac[i_test]


def bpd(flow: torch.nn.Module, y: Tensor, ljac: Tensor) -> float:
    """Bits per dimension in 17-level pixel space (exact, from the flow's forward)."""
    with torch.no_grad():
        z, ld = flow(y)
        lp = log_normal(z).double() + ld.double() + ljac
    return float(-lp.mean() / (D * math.log(2)))


def train(flow: Flow, y: Tensor, steps: int, lr: float = 1e-3, batch: int = 128, seed: int = 0) -> float:
    """Maximum likelihood with Adam (cosine schedule); returns the seconds spent."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    flow.train()
    start = time.perf_counter()
    for _ in range(steps):
        idx = torch.randint(0, y.shape[0], (batch,), generator=gen)
        loss = -flow.log_prob(y[idx]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), 10.0)
        opt.step()
        sched.step()
    flow.eval()
    return time.perf_counter() - start


def timed(fn: Any, *args: Any, repeats: int = 3) -> tuple[float, Any]:
    """Best wall time of ``repeats`` calls (the machine is shared: the best is the least disturbed)."""
    best, out = math.inf, None
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.no_grad():
            out = fn(*args)
        best = min(best, time.perf_counter() - t)
    return best, out
