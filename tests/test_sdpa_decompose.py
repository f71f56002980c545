"""The exact SDPA decomposition (surgeon.passes._sdpa.sdpa_reference, quantization off) vs torch's kernel.

Tolerance: max |difference| ≤ 1e-5 on fp32 inputs of unit scale (both compute in fp32; they differ
only in summation order)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from surgeon.passes._sdpa import AttentionQuant, center_keys, sdpa_reference

TOL = 1e-5


def _qkv(b=2, h=4, hkv=None, lq=5, lk=7, e=8, ev=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, e, generator=g)
    k = torch.randn(b, hkv or h, lk, e, generator=g)
    v = torch.randn(b, hkv or h, lk, ev or e, generator=g)
    return q, k, v


def _check(q, k, v, **kw):
    ref = F.scaled_dot_product_attention(q, k, v, **kw)
    got = sdpa_reference(q, k, v, **kw)
    assert got.shape == ref.shape and got.dtype == ref.dtype
    assert torch.isfinite(got).all()
    assert (got - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("lq,lk", [(5, 5), (5, 7), (7, 3)])
def test_plain_and_lengths(lq, lk):
    _check(*_qkv(lq=lq, lk=lk))


@pytest.mark.parametrize("scale", [None, 0.05, 1.0, 2.5])
def test_scale(scale):
    _check(*_qkv(), scale=scale)


def test_value_dim_differs_from_query_dim():
    _check(*_qkv(e=8, ev=3))


@pytest.mark.parametrize("lq,lk", [(5, 5), (3, 7), (7, 3)])
def test_causal_is_top_left_aligned(lq, lk):
    _check(*_qkv(lq=lq, lk=lk), is_causal=True)


@pytest.mark.parametrize("shape", [(5, 7), (1, 7), (2, 1, 5, 7), (2, 4, 5, 7), (1, 4, 1, 7)])
def test_boolean_mask_broadcast(shape):
    g = torch.Generator().manual_seed(1)
    mask = torch.rand(shape, generator=g) > 0.3
    mask[..., 0] = True  # no fully masked row here (tested separately)
    _check(*_qkv(), attn_mask=mask)


@pytest.mark.parametrize("shape", [(5, 7), (2, 1, 1, 7), (2, 4, 5, 7)])
def test_float_mask_broadcast(shape):
    g = torch.Generator().manual_seed(2)
    mask = torch.randn(shape, generator=g)
    mask = mask.masked_fill(torch.rand(shape, generator=g) > 0.7, float("-inf"))
    mask[..., 0] = 0.0
    _check(*_qkv(), attn_mask=mask)


def test_hf_style_additive_mask_with_dtype_min():
    q, k, v = _qkv()
    keep = torch.ones(2, 7, dtype=torch.bool)
    keep[0, 5:] = False
    mask = torch.zeros(2, 1, 1, 7).masked_fill(~keep[:, None, None, :], torch.finfo(torch.float32).min)
    _check(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows_give_zero_like_torch(kind):
    q, k, v = _qkv()
    mask = torch.ones(5, 7, dtype=torch.bool)
    mask[1] = False
    mask[3, :4] = False
    if kind == "float":
        mask = torch.zeros(5, 7).masked_fill(~mask, float("-inf"))
    _check(q, k, v, attn_mask=mask)
    assert sdpa_reference(q, k, v, attn_mask=mask)[:, :, 1].abs().max() == 0


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_causal_together_with_mask(kind):
    q, k, v = _qkv(lq=6, lk=6)
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(6, 6, generator=g) > 0.4
    if kind == "float":
        mask = torch.randn(6, 6, generator=g).masked_fill(~mask, float("-inf"))
    _check(q, k, v, attn_mask=mask, is_causal=True)


@pytest.mark.parametrize("h,hkv", [(4, 2), (6, 1), (4, 4)])
def test_gqa(h, hkv):
    _check(*_qkv(h=h, hkv=hkv), enable_gqa=True)
    q, k, v = _qkv(h=h, hkv=hkv, lq=6, lk=6)
    _check(q, k, v, enable_gqa=True, is_causal=True, scale=0.3)


def test_three_dim_inputs():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(3, 5, 8, generator=g) for _ in range(3))
    _check(q, k, v, is_causal=True)


def test_half_precision_inputs_come_back_in_their_dtype():
    q, k, v = (t.to(torch.bfloat16) for t in _qkv())
    ref = F.scaled_dot_product_attention(q, k, v)
    got = sdpa_reference(q, k, v)
    assert got.dtype == torch.bfloat16
    assert (got.float() - ref.float()).abs().max().item() <= 2e-2  # one bf16 rounding of the output


def test_key_centering_is_exact():
    q, k, v = _qkv()
    mask = torch.rand(5, 7) > 0.3
    mask[:, 0] = True
    assert center_keys(k).mean(dim=-2).abs().max() < 1e-6
    plain = sdpa_reference(q, k, v, attn_mask=mask, is_causal=True)
    centered = sdpa_reference(q, k, v, attn_mask=mask, is_causal=True,
                              quant=AttentionQuant(k=lambda t: t, center_k=True))
    assert (plain - centered).abs().max().item() <= TOL
    # the hook really received centred keys
    seen = []
    sdpa_reference(q, k + 5.0, v, quant=AttentionQuant(k=lambda t: seen.append(t) or t))
    assert seen[0].mean(dim=-2).abs().max() < 1e-5


def test_hooks_are_called_on_fp32_values_before_gqa_expansion():
    q, k, v = (t.to(torch.bfloat16) for t in _qkv(h=4, hkv=2))
    shapes = {}

    def rec(name):
        def f(t):
            shapes[name] = (tuple(t.shape), t.dtype)
            return t
        return f

    sdpa_reference(q, k, v, enable_gqa=True,
                   quant=AttentionQuant(q=rec("q"), k=rec("k"), v=rec("v"), p=rec("p")))
    assert shapes == {"q": ((2, 4, 5, 8), torch.float32), "k": ((2, 2, 7, 8), torch.float32),
                      "v": ((2, 2, 7, 8), torch.float32), "p": ((2, 4, 5, 7), torch.float32)}


def test_decomposition_exports_with_dynamic_batch_and_sequence():
    class M(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return sdpa_reference(q, k, v, attn_mask=mask, enable_gqa=True, scale=0.2)

    q, k, v = _qkv(h=4, hkv=2)
    mask = torch.rand(2, 1, 5, 7) > 0.2
    b, lq, lk = torch.export.Dim("b"), torch.export.Dim("lq"), torch.export.Dim("lk")
    ep = torch.export.export(M(), (q, k, v, mask), strict=False,
                             dynamic_shapes=({0: b, 2: lq}, {0: b, 2: lk}, {0: b, 2: lk}, {0: b, 2: lq, 3: lk}))
    q2, k2, v2 = _qkv(b=3, h=4, hkv=2, lq=4, lk=9, seed=5)
    mask2 = torch.rand(3, 1, 4, 9) > 0.2
    ref = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=mask2, enable_gqa=True, scale=0.2)
    assert (ep.module()(q2, k2, v2, mask2) - ref).abs().max().item() <= TOL
