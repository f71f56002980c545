"""The contract every registered pass keeps (parametrized over ``surgeon.passes.registered()``).

* its class is a frozen dataclass subclass of ``Pass`` whose ``name`` is its registry name;
* ``spec()`` round-trips through ``parse_pipeline`` (default instance and one non-default option);
* it honours ``PassContext.enabled_sites``: with none enabled it registers no ``SiteRecord``, with
  one site enabled only that one. An exact pass may register no record by design (``PassContext``
  docstring): one that registers none must then leave its example's outputs as they were;
* every "skipped" diagnostic gives a reason, on its example and on each of its near-misses.

The cases come from the pass classes, so a new pass needs no edit here: ``examples`` names
``"module:function"`` factories returning ``(model, inputs)`` (tests/_pass_examples.py, or the pass's own
test module; tests/ and bench/ are on the path): the first has the sites the pass substitutes, any
further one is a near-miss; ``example_spec`` is a spec with a non-default option (for a pass with
options). A pass with no example (``examples = ()``) rewrites something other than an fx graph (a
decoder step's cache): on a graph it must decline every site, with the reason.
"""

from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys

import pytest
import torch
from _pass_examples import resolve
from torch import nn

import surgeon.passes
from surgeon.capture import capture
from surgeon.errors import SurgeonError
from surgeon.pass_manager import Pass, PassContext, PassManager, parse_pipeline

GRAPH = "_pass_examples:transformer_pre"  # what a pass without an fx example is run on (it must decline)


def _examples(name: str) -> tuple[str, ...]:
    cls = surgeon.passes.pass_class(name)
    examples = getattr(cls, "examples", None)
    if examples is None:
        pytest.fail(f"pass '{name}' declares no `examples` (docs/architecture.md, 'Adding a pass')")
    return tuple(examples)


def _near_misses() -> list[tuple[str, str]]:
    return [(name, ex) for name in surgeon.passes.registered() for ex in _examples(name)[1:]]


def _run(name: str, model: nn.Module, inputs: tuple, enabled: set[str] | None):
    gm = capture(model, inputs).gm
    return PassManager([surgeon.passes.pass_class(name)()]).run(copy.deepcopy(gm), PassContext(enabled_sites=enabled))


def test_registry_is_lazy_and_complete() -> None:
    code = ("import sys, surgeon.passes, surgeon.pass_manager; "
            "print(sorted(m for m in sys.modules if m.startswith('surgeon.passes.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # importing the registry imports no pass module
    # complete: every Pass subclass with a name in the package's public modules is registered, and no other
    code = ("import importlib, pkgutil, surgeon.passes as p; from surgeon.pass_manager import Pass\n"
            "for m in pkgutil.iter_modules(p.__path__):\n"
            "    mod = importlib.import_module('surgeon.passes.' + m.name)\n"
            "    print(*sorted(c.name for c in vars(mod).values() if isinstance(c, type) and issubclass(c, Pass)"
            " and c.name and c.__module__ == mod.__name__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert sorted(out.split()) == surgeon.passes.registered()


@pytest.mark.parametrize("name", surgeon.passes.registered())
def test_class_and_spec_round_trip(name: str) -> None:
    cls = surgeon.passes.pass_class(name)
    assert isinstance(cls, type) and issubclass(cls, Pass) and cls is not Pass
    assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
    assert cls.name == name
    p = cls()
    assert parse_pipeline(p.spec())[0] == p
    spec = getattr(cls, "example_spec", None)
    if spec is None:
        assert not dataclasses.fields(cls), f"{name} has options: give its class an `example_spec`"
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
    examples = _examples(name)
    model, inputs = resolve(examples[0] if examples else GRAPH)
    gm, ctx, diags = _run(name, model, inputs, None)
    for d in diags:
        assert d.pass_name == name
        assert d.status in ("applied", "skipped")
        if d.status == "skipped":
            assert d.reason.strip(), d
    if not examples:  # not an fx-graph pass: declines, with the reason
        assert not ctx.records and diags and all(d.status == "skipped" for d in diags), [d.to_json() for d in diags]
        return
    assert any(d.status == "applied" for d in diags), [d.to_json() for d in diags]
    if not ctx.records:  # an exact rewrite has no site for the guard to switch off: it must be exact
        with torch.no_grad():
            torch.testing.assert_close(gm(*inputs), model(*inputs))
        return
    assert all(r.pass_name == name and r.site == s for s, r in ctx.records.items())

    _, none, _ = _run(name, model, inputs, set())
    assert not none.records

    first = sorted(ctx.records)[0]
    _, one, _ = _run(name, model, inputs, {first})
    assert set(one.records) == {first}


@pytest.mark.parametrize("name, example", _near_misses())
def test_near_misses_are_explained(name: str, example: str) -> None:
    model, inputs = resolve(example)
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
