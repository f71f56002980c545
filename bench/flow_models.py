"""Hand-written normalizing flows for the flow benchmark and the flow-pass tests.

Convention (the one ``flow-fold`` / ``flow-inverse`` rely on): ``forward(x)`` maps data to latent (the
density direction) and returns ``(z, log_det)`` with ``log_det`` of shape ``[batch]``; ``inverse(z)``
is the exact inverse, written by hand here so the benchmark can time it against the distilled one.

* ``ActNorm``: z = (x + b)·exp(s) per channel; log_det = Σs · (spatial size) — parameter-only.
* ``InvertibleLinear``: z = W x (a dense layer, or Glow's invertible 1×1 convolution on images);
  log_det = log|det W| · (spatial size) — parameter-only (slogdet of a parameter).
* ``Permute``: a fixed permutation, by indexing (no log-det term) or as a permutation matrix
  (log_det = log|det P| = 0, parameter-only).
* ``AffineCoupling``: RealNVP's masked form y = b·x + (1−b)·(x·exp(s(b·x)) + t(b·x)).
* ``MADE``: masked autoregressive affine z = (x − μ(x))·exp(−α(x)); its exact inverse is
  sequential, one network pass per dimension.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _spatial(x: Tensor) -> int:
    n = 1
    for d in x.shape[2:]:
        n = n * d
    return n


class ActNorm(nn.Module):
    """Per-channel affine with learned log-scale (Glow); channels are dimension 1."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.loc = nn.Parameter(0.1 * torch.randn(channels))
        self.log_scale = nn.Parameter(0.1 * torch.randn(channels))

    def _shape(self, x: Tensor) -> list[int]:
        return [1, -1] + [1] * (x.dim() - 2)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        shape = self._shape(x)
        z = (x + self.loc.view(shape)) * torch.exp(self.log_scale.view(shape))
        ld = self.log_scale.sum() * _spatial(x)
        return z, ld.expand(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        shape = self._shape(z)
        return z * torch.exp(-self.log_scale.view(shape)) - self.loc.view(shape)


class InvertibleLinear(nn.Module):
    """z = W x over the channel dimension (dense for [B, D], a 1×1 convolution for [B, C, H, W])."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(channels, channels))
        self.weight = nn.Parameter(q * (1.0 + 0.1 * torch.rand(channels)))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if x.dim() == 2:
            z = F.linear(x, self.weight)
        else:
            z = F.conv2d(x, self.weight.view(*self.weight.shape, 1, 1))
        ld = torch.linalg.slogdet(self.weight)[1] * _spatial(x)
        return z, ld.expand(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        w_inv = torch.linalg.inv(self.weight)
        if z.dim() == 2:
            return F.linear(z, w_inv)
        return F.conv2d(z, w_inv.view(*w_inv.shape, 1, 1))


class Permute(nn.Module):
    """A fixed permutation of dimension 1 (reversal by default)."""

    def __init__(self, dim: int, seed: int | None = None, as_matrix: bool = False) -> None:
        super().__init__()
        perm = torch.arange(dim - 1, -1, -1) if seed is None else torch.randperm(dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))
        self.as_matrix = as_matrix
        if as_matrix:
            self.register_buffer("matrix", torch.eye(dim)[perm])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.as_matrix:
            return F.linear(x, self.matrix), torch.linalg.slogdet(self.matrix)[1].expand(x.shape[0])
        return x[:, self.perm], x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor) -> Tensor:
        return z[:, self.inv_perm]


def _mlp(i: int, o: int, hidden: int, depth: int = 2) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = i
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), nn.ReLU()]
        d = hidden
    last = nn.Linear(d, o)
    nn.init.zeros_(last.weight)  # start at the identity transform: stable training
    nn.init.zeros_(last.bias)
    return nn.Sequential(*layers, last)


class AffineCoupling(nn.Module):
    """RealNVP affine coupling, masked form: y = b·x + (1−b)·(x·exp(s) + t), (s, t) = net(b·x)."""

    def __init__(self, dim: int, hidden: int, parity: int = 0, mask: Tensor | None = None) -> None:
        super().__init__()
        b = ((torch.arange(dim) + parity) % 2).float() if mask is None else mask.float()
        self.register_buffer("mask", b)
        self.net = _mlp(dim, 2 * dim, hidden)
        self.scale = nn.Parameter(torch.ones(dim))

    def _st(self, xb: Tensor) -> tuple[Tensor, Tensor]:
        s, t = self.net(xb).chunk(2, dim=-1)
        return self.scale * torch.tanh(s), t  # a soft clamp of the log-scale keeps exp(s) bounded

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xb = x * self.mask
        s, t = self._st(xb)
        y = xb + (1 - self.mask) * (x * torch.exp(s) + t)
        return y, ((1 - self.mask) * s).sum(-1)

    def inverse(self, y: Tensor) -> Tensor:
        yb = y * self.mask
        s, t = self._st(yb)
        return yb + (1 - self.mask) * ((y - t) * torch.exp(-s))


class MaskedLinear(nn.Linear):
    def __init__(self, i: int, o: int, mask: Tensor) -> None:
        super().__init__(i, o)
        self.register_buffer("mask", mask)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """Masked autoregressive affine transform: z = (x − μ(x))·exp(−α(x)), μ_i, α_i from x_<i."""

    def __init__(self, dim: int, hidden: int, depth: int = 2) -> None:
        super().__init__()
        deg_in = torch.arange(1, dim + 1)
        degs = [deg_in]
        layers: list[nn.Module] = []
        for _ in range(depth):
            deg_h = torch.arange(hidden) % max(dim - 1, 1) + 1
            layers += [MaskedLinear(degs[-1].numel(), hidden, (deg_h[:, None] >= degs[-1][None, :]).float()), nn.ReLU()]
            degs.append(deg_h)
        out = MaskedLinear(hidden, 2 * dim, (deg_in.repeat(2)[:, None] > degs[-1][None, :]).float())
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)
        self.net = nn.Sequential(*layers, out)
        self.dim = dim

    def _params(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, alpha = self.net(x).chunk(2, dim=-1)
        return mu, 3.0 * torch.tanh(alpha / 3.0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, alpha = self._params(x)
        return (x - mu) * torch.exp(-alpha), -alpha.sum(-1)

    def inverse(self, z: Tensor) -> Tensor:
        # Sequential: pass i fixes dimension i (its μ_i, α_i depend only on the dimensions before it,
        # all already exact), so D passes give the exact inverse.
        x = torch.zeros_like(z)
        for _ in range(self.dim):
            mu, alpha = self._params(x)
            x = z * torch.exp(alpha) + mu
        return x


class Flow(nn.Module):
    """A sequence of transforms; ``forward(x) → (z, log_det)``, ``inverse(z) → x``, standard-normal base."""

    def __init__(self, *transforms: nn.Module) -> None:
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        ld = x.new_zeros(x.shape[0])
        for t in self.transforms:
            x, l = t(x)
            ld = ld + l
        return x, ld

    def inverse(self, z: Tensor) -> Tensor:
        for t in reversed(self.transforms):
            z = t.inverse(z)
        return z

    def log_prob(self, x: Tensor) -> Tensor:
        z, ld = self(x)
        return log_normal(z) + ld


def log_normal(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over every dimension but the first."""
    z = z.reshape(z.shape[0], -1)
    return -0.5 * (z * z).sum(-1) - 0.5 * z.shape[1] * math.log(2 * math.pi)


def realnvp(dim: int, layers: int = 6, hidden: int = 64) -> Flow:
    """RealNVP-style: ActNorm → affine coupling (alternating masks), an invertible linear mix every
    other layer."""
    parts: list[nn.Module] = []
    for i in range(layers):
        parts += [ActNorm(dim), AffineCoupling(dim, hidden, parity=i % 2)]
        if i % 2 == 1 and i < layers - 1:
            parts.append(InvertibleLinear(dim))
    return Flow(*parts)


def maf(dim: int, layers: int = 4, hidden: int = 64) -> Flow:
    """MAF: MADE layers with the order reversed between them, ActNorm after each."""
    parts: list[nn.Module] = []
    for i in range(layers):
        parts += [MADE(dim, hidden), ActNorm(dim)]
        if i < layers - 1:
            parts.append(Permute(dim))
    return Flow(*parts)


def glow_like(channels: int = 4, hidden: int = 16) -> Flow:
    """An image flow ([B, C, H, W]) with ActNorm and invertible 1×1 convolutions (for flow-fold)."""
    return Flow(ActNorm(channels), InvertibleLinear(channels), ActNorm(channels), InvertibleLinear(channels))
