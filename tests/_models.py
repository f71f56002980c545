"""Hand-written models for analyzer and pass tests (random weights, tiny)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class ManualAttention(nn.Module):
    """Softmax attention written out; variants are options, as in the analyzer's definition."""

    def __init__(self, dim: int = 16, heads: int = 2, scale: str = "mul", mask_side: str | None = None,
                 causal: bool = False, dropout: bool = False, layout: str = "4d", product: str = "matmul",
                 softmax_dim: int = -1, bool_mask: bool = False) -> None:
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.scale, self.mask_side, self.causal, self.layout = scale, mask_side, causal, layout
        self.product, self.softmax_dim, self.bool_mask = product, softmax_dim, bool_mask
        self.drop = nn.Dropout(0.1) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor, mem: torch.Tensor | None = None) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if mem is not None:  # cross-attention: keys and values from another sequence
            _, k, v = self.qkv(mem).chunk(3, dim=-1)
        s = k.shape[1]
        q = q.view(b, t, self.h, self.d).transpose(1, 2)
        k = k.view(b, s, self.h, self.d).transpose(1, 2)
        v = v.view(b, s, self.h, self.d).transpose(1, 2)
        if self.layout == "3d":
            q, k, v = (z.reshape(b * self.h, -1, self.d) for z in (q, k, v))
        if self.product == "einsum":
            scores = torch.einsum("bhqd,bhkd->bhqk", q, k)
        elif self.layout == "3d":
            scores = torch.bmm(q, k.transpose(1, 2))
        else:
            scores = q @ k.transpose(-2, -1)
        if self.scale == "mul":
            scores = scores * (1.0 / math.sqrt(self.d))
        elif self.scale == "div":
            scores = scores / math.sqrt(self.d)
        if self.causal:
            keep = torch.ones(t, s, dtype=torch.bool, device=x.device).tril()
            scores = scores.masked_fill(~keep, float("-inf"))
        if self.mask_side is not None:
            bias = (torch.arange(s, device=x.device) % 3 == 0).float() * -1e4
            if self.bool_mask:
                scores = torch.where(bias == 0, scores, torch.finfo(scores.dtype).min)
            elif self.mask_side == "left":
                scores = bias + scores
            else:
                scores = scores + bias
        p = self.drop(F.softmax(scores, dim=self.softmax_dim))
        if self.product == "einsum":
            o = torch.einsum("bhqk,bhkd->bhqd", p, v)
        elif self.layout == "3d":
            o = torch.bmm(p, v).view(b, self.h, t, self.d)
        else:
            o = p @ v
        return self.out(o.transpose(1, 2).reshape(b, t, c))


class RMSNorm(nn.Module):
    """Hand-written RMSNorm as in Llama/T5: x · rsqrt(mean(x²) + eps) · w."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim) + 0.1 * torch.randn(dim)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(var + self.eps)).to(x.dtype)


class ManualLayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.g, self.b, self.eps = nn.Parameter(torch.ones(dim)), nn.Parameter(torch.zeros(dim)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x - x.mean(-1, keepdim=True)
        return self.g * xc / torch.sqrt(xc.pow(2).mean(-1, keepdim=True) + self.eps) + self.b


class Block(nn.Module):
    """A transformer block: norm placement and norm type are options."""

    def __init__(self, dim: int = 16, placement: str = "pre", norm: str = "layernorm", causal: bool = False) -> None:
        super().__init__()
        make = {"layernorm": lambda: nn.LayerNorm(dim), "rmsnorm": lambda: RMSNorm(dim),
                "manual-layernorm": lambda: ManualLayerNorm(dim), "torch-rmsnorm": lambda: nn.RMSNorm(dim)}[norm]
        self.n1, self.n2 = make(), make()
        self.attn = ManualAttention(dim, causal=causal)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.placement = placement

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.placement == "pre":
            x = x + self.attn(self.n1(x))
            return x + self.mlp(self.n2(x))
        if self.placement == "parallel":  # GPT-NeoX: x + attn(n1(x)) + mlp(n2(x))
            return x + self.attn(self.n1(x)) + self.mlp(self.n2(x))
        x = self.n1(x + self.attn(x))
        return self.n2(x + self.mlp(x))


class TinyTransformer(nn.Module):
    """Embeddings (+ embedding norm for post-norm stacks), blocks, final norm for pre-norm stacks."""

    def __init__(self, layers: int = 2, dim: int = 16, placement: str = "pre", norm: str = "layernorm",
                 vocab: int = 50, causal: bool = False) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(64, dim)
        self.emb_norm = nn.LayerNorm(dim) if placement == "post" else nn.Identity()
        self.blocks = nn.ModuleList(Block(dim, placement, norm, causal) for _ in range(layers))
        self.final = nn.LayerNorm(dim) if placement != "post" else nn.Identity()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb_norm(self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device)))
        for b in self.blocks:
            x = b(x)
        return self.final(x)


def mlp(i: int, o: int, h: int = 16) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.ReLU(), nn.Linear(h, o))


class AffineCoupling(nn.Module):
    """RealNVP coupling: split, (log s, t) = net(x1), y2 = x2·exp(clamp(log s)) + t, cat.

    ``scale`` chooses exp / sigmoid / softplus; ``additive`` drops the scale (NICE)."""

    def __init__(self, dim: int = 8, scale: str = "exp", additive: bool = False, two_sided: bool = False) -> None:
        super().__init__()
        self.half, self.scale, self.additive, self.two_sided = dim // 2, scale, additive, two_sided
        self.net = mlp(self.half, self.half if additive else 2 * self.half)
        self.net2 = mlp(self.half, self.half if additive else 2 * self.half) if two_sided else None

    def _t(self, net: nn.Module, cond: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = net(cond)
        if self.additive:
            return x + h, torch.zeros(x.shape[0], device=x.device)
        logs, t = h.chunk(2, dim=-1)
        if self.scale == "exp":
            logs = 2.0 * torch.tanh(logs / 2.0)  # soft clamp
            return x * torch.exp(logs) + t, logs.sum(-1)
        s = torch.sigmoid(logs + 2.0) if self.scale == "sigmoid" else F.softplus(logs) + 1e-3
        return x * s + t, torch.log(s).sum(-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x1, x2 = x[:, : self.half], x[:, self.half:]
        y2, ld = self._t(self.net, x1, x2)
        if self.two_sided:
            x1, ld2 = self._t(self.net2, y2, x1)
            ld = ld + ld2
        return torch.cat([x1, y2], dim=-1), ld


class MaskedCoupling(nn.Module):
    """The original RealNVP form with a binary mask b: y = b·x + (1−b)·(x·exp(s(b·x)) + t(b·x))."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.register_buffer("mask", (torch.arange(dim) % 2).float())
        self.s, self.t = mlp(dim, dim), mlp(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xm = x * self.mask
        s = torch.tanh(self.s(xm))
        y = x * torch.exp(s) + self.t(xm)
        return xm + (1 - self.mask) * y


class MaskedLinear(nn.Linear):
    def __init__(self, i: int, o: int, mask: torch.Tensor) -> None:
        super().__init__(i, o)
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """Masked autoregressive affine transform: z = (x − μ(x)) · exp(−α(x)), μ_i, α_i from x_<i."""

    def __init__(self, dim: int = 8, hidden: int = 32) -> None:
        super().__init__()
        deg_in = torch.arange(1, dim + 1)
        deg_h = torch.arange(hidden) % (dim - 1) + 1
        self.l1 = MaskedLinear(dim, hidden, (deg_h[:, None] >= deg_in[None, :]).float())
        self.l2 = MaskedLinear(hidden, 2 * dim, (deg_in.repeat(2)[:, None] > deg_h[None, :]).float())
        self.dim = dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, alpha = self.l2(torch.relu(self.l1(x))).chunk(2, dim=-1)
        alpha = torch.tanh(alpha)
        return (x - mu) * torch.exp(-alpha), -alpha.sum(-1)


class Flow(nn.Module):
    """A stack of transforms with permutations between them (a flow's forward: data → latent)."""

    def __init__(self, *transforms: nn.Module) -> None:
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ld = torch.zeros(x.shape[0])
        for t in self.transforms:
            out = t(x)
            x, l = out if isinstance(out, tuple) else (out, torch.zeros(x.shape[0]))
            ld = ld + l
            x = x.flip(-1)
        return x, ld


def digits_bench():
    """``bench/digits_vit.py`` as a module (the digits ViT the slow attention tests train)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "digits_vit.py"
    spec = importlib.util.spec_from_file_location("digits_vit", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


class NormflowsFlow(nn.Module):
    """normflows' AffineCouplingBlock twice with a swap between (its capture fixes the batch dimension);
    ``logdet``: also return the summed log-determinants (a second output, the Add ORT once failed on).
    Needs the normflows package (tests import it with ``pytest.importorskip`` first)."""

    def __init__(self, *, init_zeros: bool = True, logdet: bool = False) -> None:
        import normflows as nf

        super().__init__()
        self.logdet = logdet
        layers: list[nn.Module] = []
        for _ in range(2):
            layers += [nf.flows.AffineCouplingBlock(nf.nets.MLP([2, 16, 4], init_zeros=init_zeros)),
                       nf.flows.Permute(4, mode="swap")]
        self.flows = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> Any:
        ld: Any = 0
        for f in self.flows:
            x, step = f(x)
            ld = ld + step
        return (x, ld) if self.logdet else x


def tiny_bert(vocab_size: int, hidden: int = 32, layers: int = 2, seed: int = 0) -> nn.Module:
    """A random-weight BertModel (2 heads, FFN 2 × hidden, 64 positions) in eval mode."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=2 * hidden, max_position_embeddings=64)
    return BertModel(cfg).eval()


def save_bert_dir(out: Path, tokenizer: Any, hidden: int = 32, layers: int = 2) -> Path:
    """A Hugging Face directory at ``out``: ``tiny_bert`` and ``tokenizer``."""
    tiny_bert(len(tokenizer), hidden, layers).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
