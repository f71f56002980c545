"""Example models the pass contract runs on (tests/test_pass_contract.py).

A pass names its examples on its class (``examples: ClassVar[tuple[str, ...]]``, each ``"module:function"``
with tests/ and bench/ on the import path): the first a model with the sites it substitutes, any
further one a near-miss it must explain. Each function returns ``(model, inputs)``, seeded, in eval
mode. A new pass names one of these or a function in its own test module: the contract test needs
no edit.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from _models import MADE, AffineCoupling, Flow, ManualAttention, TinyTransformer  # noqa: E402
from digits_vit import TinyViT  # noqa: E402
from flow_models import glow_like  # noqa: E402

Example = tuple[nn.Module, tuple]


def resolve(spec: str) -> Example:
    """Build the example ``"module:function"`` names."""
    module, _, function = spec.partition(":")
    return getattr(importlib.import_module(module), function)()


def transformer_pre() -> Example:
    """Pre-norm: attention and norm+residual sites; its final norm is no residual site, its embedding
    tables are smaller than linear-quant's ``min_table``."""
    torch.manual_seed(0)
    return TinyTransformer(layers=2, placement="pre").eval(), (torch.randint(0, 50, (2, 6)),)


def transformer_post() -> Example:
    """Post-norm: the residual add reads the norm, so γ/β are not foldable."""
    torch.manual_seed(0)
    return TinyTransformer(layers=2, placement="post").eval(), (torch.randint(0, 50, (2, 6)),)


def vit_sdpa() -> Example:
    """Two scaled_dot_product_attention sites."""
    torch.manual_seed(0)
    return TinyViT(attn="sdpa").eval(), (torch.rand(2, 1, 8, 8),)


def einsum_attention() -> Example:
    """Attention written by hand with einsum products (not matmul / bmm)."""
    torch.manual_seed(0)
    return ManualAttention(product="einsum").eval(), (torch.randn(2, 6, 16),)


def glow() -> Example:
    """A Glow-like flow: log-determinants that do not depend on the input."""
    torch.manual_seed(0)
    return glow_like(4).eval(), (torch.randn(2, 4, 3, 3),)


def flow() -> Example:
    """Affine coupling and an autoregressive (MADE) layer: log-dets that depend on the input."""
    torch.manual_seed(0)
    return Flow(AffineCoupling(8), MADE(8)).eval(), (torch.randn(4, 8),)


def mlp() -> Example:
    """Linear, ReLU, Linear: no attention, norm or coupling site."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)).eval(), (torch.randn(4, 8),)
