"""The example pass of docs/architecture.md ("Adding a pass") runs as written.

The first ```python block of that section is executed as a module, its pass registered through
``surgeon.passes.register`` and run by name through ``PassManager`` on a tiny MLP: every
``aten.relu`` is replaced by ``aten.clamp``, and the output is bit-identical (tolerance 0:
clamp(x, 0) and relu(x) compute the same float for every x).
"""

from __future__ import annotations

import copy
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import surgeon.passes
from surgeon.capture import capture
from surgeon.errors import SurgeonError
from surgeon.pass_manager import PassContext, PassManager, parse_pipeline

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
MODULE = "surgeon_docs_architecture_example"


def _example_source() -> str:
    text = DOC.read_text(encoding="utf-8")
    section = re.search(r"^## Adding a pass\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert section, "docs/architecture.md has no '## Adding a pass' section"
    block = re.search(r"^```python\n(.*?)^```", section.group(1), flags=re.S | re.M)
    assert block, "the 'Adding a pass' section has no ```python block"
    return block.group(1)


@pytest.fixture
def example_pass():
    module = types.ModuleType(MODULE)
    sys.modules[MODULE] = module
    try:
        exec(compile(_example_source(), str(DOC), "exec"), module.__dict__)
        cls = module.ReluToClamp
        surgeon.passes.register(cls.name, cls)
        try:
            yield cls
        finally:
            surgeon.passes.unregister(cls.name)
    finally:
        del sys.modules[MODULE]
    assert "relu-clamp" not in surgeon.passes.registered()


def _ops(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def test_doc_example_pass_replaces_relu_exactly(example_pass) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(32, 8)
    gm0 = capture(model, (x,)).gm
    assert _ops(gm0).count("aten.relu.default") == 2

    assert parse_pipeline("relu-clamp") == [example_pass()]
    gm, ctx, diags = PassManager("relu-clamp").run(copy.deepcopy(gm0))
    ops = _ops(gm)
    assert "aten.relu.default" not in ops and ops.count("aten.clamp.default") == 2
    assert [d.status for d in diags] == ["applied", "applied"]
    assert sorted(ctx.records) == ["relu:1:relu", "relu:3:relu_1"]
    with torch.no_grad():
        for xb in (x, torch.randn(5, 8), torch.zeros(3, 8)):
            assert torch.equal(gm(xb), gm0(xb))  # tolerance 0: bit-identical

    # the pipeline's rebuild with one kept site rewrites that one only
    kept = "relu:1:relu"
    gm1, ctx1, _ = PassManager("relu-clamp").run(copy.deepcopy(gm0), PassContext(enabled_sites={kept}))
    assert set(ctx1.records) == {kept} and _ops(gm1).count("aten.relu.default") == 1


def test_register_refuses_a_duplicate_name(example_pass) -> None:
    with pytest.raises(SurgeonError, match="already registered"):
        surgeon.passes.register("relu-clamp", example_pass)
    with pytest.raises(SurgeonError, match="already registered"):
        surgeon.passes.register("norm-fold", f"{MODULE}:ReluToClamp")


def test_unknown_pass_message_lists_the_registered_ones(example_pass) -> None:
    with pytest.raises(SurgeonError, match=r"unknown pass 'nope' \(known: .*relu-clamp"):
        parse_pipeline("nope")
