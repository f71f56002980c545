"""The contract every registered pass keeps (parametrized over ``surgeon.passes.registered()``).

* its class is a frozen dataclass subclass of ``Pass`` whose ``name`` is its registry name;
* ``spec()`` round-trips through ``parse_pipeline`` (default instance and one non-default option);
* it honours ``PassContext.enabled_sites``: with none enabled it registers no ``SiteRecord``, with
  one site enabled only that one. Exact passes may register no record by design (``PassContext``
  docstring): norm-fold does, so for it the test only checks that it registers none;
* every "skipped" diagnostic gives a reason (each case model has a near-miss where the pass has one).

A pass added to the registry needs a case in ``CASES`` (the test says so).
"""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch import nn

import surgeon.passes
from surgeon.capture import capture
from surgeon.errors import SurgeonError
from surgeon.pass_manager import Pass, PassContext, PassManager, parse_pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from _models import MADE, AffineCoupling, Flow, ManualAttention, TinyTransformer  # noqa: E402
from digits_vit import TinyViT  # noqa: E402
from flow_models import glow_like  # noqa: E402

EXACT_NO_RECORDS = {"norm-fold"}  # exact rewrites: nothing for the guard to switch off
# Passes that rewrite a decoder step's cache format (surgeon.decoder.DecoderStep, --target onnx-decoder),
# not an fx graph: on any captured graph they decline, with the reason (their own guard is the decoder one).
DECODER_STEP_PASSES = {"kv-cache-quant"}


def _transformer(placement: str) -> Callable[[], tuple[nn.Module, tuple]]:
    def make() -> tuple[nn.Module, tuple]:
        torch.manual_seed(0)
        return TinyTransformer(layers=2, placement=placement).eval(), (torch.randint(0, 50, (2, 6)),)
    return make


def _vit() -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    return TinyViT(attn="sdpa").eval(), (torch.rand(2, 1, 8, 8),)  # two SDPA sites


def _einsum_attention() -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    return ManualAttention(product="einsum").eval(), (torch.randn(2, 6, 16),)


def _glow() -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    return glow_like(4).eval(), (torch.randn(2, 4, 3, 3),)


def _flow() -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    return Flow(AffineCoupling(8), MADE(8)).eval(), (torch.randn(4, 8),)


# name → (a model with the pass's sites, and a near-miss where the pass has one; one non-default spec)
CASES: dict[str, tuple[Callable[[], tuple[nn.Module, tuple]], str | None]] = {
    "attention-fp8": (_transformer("pre"), "attention-fp8{granularity=tensor}"),
    "attention-int8": (_vit, "attention-int8{granularity=tensor}"),
    "linear-quant": (_transformer("pre"), "linear-quant{dtype=int8,rounding=nearest}"),  # tables < min_table: skipped
    "norm-fold": (_transformer("post"), "norm-fold{rmsnorm=False}"),  # post-norm: γ/β not foldable
    "norm-gate": (_transformer("pre"), "norm-gate{steps=7}"),  # the final norm is no residual site
    "flow-fold": (_glow, None),  # no options
    "flow-inverse": (_flow, "flow-inverse{corrections=1,steps=10}"),
    "kv-cache-quant": (_transformer("pre"), "kv-cache-quant{dtype=fp8,granularity=tensor}"),  # declines on fx graphs
}


def _case(name: str):
    if name not in CASES:
        pytest.fail(f"pass '{name}' is registered but has no case in tests/test_pass_contract.py CASES")
    return CASES[name]


def _run(name: str, model: nn.Module, inputs: tuple, enabled: set[str] | None):
    gm = capture(model, inputs).gm
    return PassManager([surgeon.passes.pass_class(name)()]).run(copy.deepcopy(gm), PassContext(enabled_sites=enabled))


def test_registry_is_lazy_and_complete() -> None:
    assert surgeon.passes.registered() == sorted(
        ["attention-fp8", "attention-int8", "linear-quant", "norm-fold", "norm-gate", "flow-fold", "flow-inverse",
         "kv-cache-quant"])
    code = ("import sys, surgeon.passes, surgeon.pass_manager; "
            "print(sorted(m for m in sys.modules if m.startswith('surgeon.passes.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # importing the registry imports no pass module


@pytest.mark.parametrize("name", surgeon.passes.registered())
def test_class_and_spec_round_trip(name: str) -> None:
    cls = surgeon.passes.pass_class(name)
    assert isinstance(cls, type) and issubclass(cls, Pass) and cls is not Pass
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    assert cls.name == name
    p = cls()
    assert parse_pipeline(p.spec())[0] == p
    _, spec = _case(name)
    if spec is None:
        assert not dataclasses.fields(cls), f"{name} has options: give CASES a non-default spec"
        return
    q = parse_pipeline(spec)[0]
    assert q != p  # a non-default option value
    assert parse_pipeline(q.spec())[0] == q


@pytest.mark.parametrize("spec, message", [
    ("linear-quant{dtype=int8", "at the end (character 24): '}' expected to close the options of 'linear-quant' opened "
                                "at character 13: 'linear-quant{dtype=int8▸'"),
    ("attention-fp8{p_bits=8,,}", "at character 24: empty option in the options of 'attention-fp8': "
                                  "'attention-fp8{p_bits=8,▸,}'"),
    ("attention-fp8,,linear-quant", "at character 15: a pass name expected, found ',': 'attention-fp8,▸,linear-quant'"),
    ("attention-fp8 linear-quant", "at character 15: ',' expected between passes, found 'l': "
                                   "'attention-fp8 ▸linear-quant'"),
    ("linear-quant{dtype}", "at character 14: option 'dtype' of pass 'linear-quant' must be written key=value: "
                            "'linear-quant{▸dtype}'"),
    ("attention-fp8{p_bits=8}}", "at character 24: '}' without a matching '{': 'attention-fp8{p_bits=8}▸}'"),
    ("linear-quant{dtype={int8}}", "at character 20: '{' inside the options of 'linear-quant' (opened at character 13): "
                                   "'linear-quant{dtype=▸{int8}}'"),
])
def test_spec_errors_point_at_the_character(spec: str, message: str) -> None:
    with pytest.raises(SurgeonError) as info:
        parse_pipeline(spec)
    assert str(info.value) == "cannot parse pass pipeline " + message


def test_spec_whitespace_and_empty_options() -> None:
    passes = parse_pipeline(" attention-fp8{ p_bits = 1 , granularity=tensor } , norm-fold{} ")
    assert [p.spec() for p in passes] == ["attention-fp8{p_bits=1,granularity=tensor,method=max}",
                                          "norm-fold{rmsnorm=True,affine=True}"]


@pytest.mark.parametrize("name", surgeon.passes.registered())
def test_honours_enabled_sites_and_explains_skips(name: str) -> None:
    make, _ = _case(name)
    model, inputs = make()
    _, ctx, diags = _run(name, model, inputs, None)
    for d in diags:
        assert d.pass_name == name
        assert d.status in ("applied", "skipped")
        if d.status == "skipped":
            assert d.reason.strip(), d
    if name in DECODER_STEP_PASSES:
        assert not ctx.records and diags and all(d.status == "skipped" for d in diags), [d.to_json() for d in diags]
        return
    assert any(d.status == "applied" for d in diags), [d.to_json() for d in diags]
    if name in EXACT_NO_RECORDS:
        assert not ctx.records  # by design (PassContext): an exact pass has no site to switch off
        return
    assert ctx.records, f"{name} registered no site on its case model"
    assert all(r.pass_name == name and r.site == s for s, r in ctx.records.items())

    _, none, _ = _run(name, model, inputs, set())
    assert not none.records

    first = sorted(ctx.records)[0]
    _, one, _ = _run(name, model, inputs, {first})
    assert set(one.records) == {first}


def _mlp() -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)).eval(), (torch.randn(4, 8),)


# near-misses: a site the pass looks at and refuses (with its reason)
NEAR_MISSES = {
    "attention-int8": _einsum_attention,  # hand-written with einsum products: matmul / bmm only
    "linear-quant": _transformer("pre"),  # embedding tables smaller than min_table
    "norm-fold": _transformer("post"),  # post-norm: the residual add reads the norm, γ/β not foldable
    "flow-fold": _flow,  # coupling and autoregressive log-dets depend on the input
    "flow-inverse": _mlp,  # no coupling site
}


@pytest.mark.parametrize("name", sorted(NEAR_MISSES))
def test_near_misses_are_explained(name: str) -> None:
    model, inputs = NEAR_MISSES[name]()
    _, _, diags = _run(name, model, inputs, None)
    skipped = [d for d in diags if d.status == "skipped"]
    assert skipped and all(d.reason.strip() for d in skipped), [d.to_json() for d in diags]


def test_distill_inverse_split_is_the_pipelines() -> None:
    """flow-inverse's standalone helper splits fit/check batches by the optimize pipeline's rule."""
    from surgeon.optimize import split_batches
    from surgeon.passes.flow_inverse import split_indices

    for n in (1, 2, 3, 8, 13):
        for fraction, seed in ((0.25, 0), (0.5, 3), (0.1, 7)):
            split = split_batches(list(range(n)), fraction, seed)
            assert split_indices(n, fraction, seed) == (split.fit_index, split.check_index)
