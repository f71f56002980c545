"""Running an fx graph with taps: the values of chosen nodes from one run, beside its output.

The guard compares a site's output in the rewritten graph with the original graph's value at the
same point; a pass (``norm-gate``) reads intermediate values while it fits.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable

from torch import fx
from torch.utils import _pytree as pytree

from .inputs import Inputs, as_args_kwargs, call


def flat_inputs(gm: fx.GraphModule, inputs: Inputs) -> list[Any]:
    """``inputs`` as the flat placeholder values of ``gm`` (what ``fx.Interpreter.run`` takes)."""
    args, kwargs = as_args_kwargs(inputs)
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is not None and info.in_spec is not None:
        spec = info.in_spec
        # Order keyword inputs like the captured signature: pytree flattens dicts in insertion order.
        if kwargs and spec.num_children == 2:
            kw_spec = spec.children_specs[1]
            if kw_spec.type is dict and set(kw_spec.context) == set(kwargs):
                kwargs = {k: kwargs[k] for k in kw_spec.context}
        return pytree.tree_leaves((tuple(args), kwargs))
    bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    bound.apply_defaults()
    return list(bound.arguments.values())


class _Tap(fx.Interpreter):
    """Runs a GraphModule node by node, keeping the values of the named nodes."""

    def __init__(self, gm: fx.GraphModule, names: Iterable[str]) -> None:
        super().__init__(gm)
        self.names = set(names)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = value
        return value


def run_tapped(gm: fx.GraphModule, inputs: Inputs, names: Iterable[str]) -> tuple[Any, dict[str, Any]]:
    """``(output, {node name: value})`` of one run of ``gm`` on ``inputs``."""
    names = [n for n in names if n]
    if not names:
        return call(gm, inputs), {}
    tap = _Tap(gm, names)
    out = tap.run(*flat_inputs(gm, inputs))
    return out, tap.values
