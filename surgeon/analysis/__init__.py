"""The standard-part analyzer: finds attention, norm+residual and flow-coupling sites. Read-only.

Definitions (docs/analysis.md states them with examples; tests use them exactly):

* ``attention``: a ``scaled_dot_product_attention`` call, or a softmax over the key axis of a Q·Kᵀ
  product of two activations (any scaling, additive/boolean masks, position bias, dropout) whose
  result multiplies V.
* ``norm_residual``: a LayerNorm/RMSNorm (hand-written RMSNorm too) tied to a residual connection:
  post-norm (its input is ``x + F(x)``), pre-norm (it reads the residual stream ``x`` and its branch
  output is added back to ``x``), parallel (several pre-norm branches closing on one add).
* ``coupling``: a normalizing-flow transform with an exact analytic inverse: affine/additive
  coupling and masked autoregressive affine transforms.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..inputs import Inputs
from ._graph import SHAPE_OPS, GraphView  # GraphView is public: passes read graphs through it
from .sites import NearMiss, Site, site_id

__all__ = ["KINDS", "SHAPE_OPS", "Analysis", "GraphView", "NearMiss", "Site", "analyze", "analyze_graph", "site_id"]

KINDS = ("attention", "norm_residual", "coupling")



@dataclass
class Analysis:
    """Result of ``analyze``: sites, near-misses and how the graph was captured."""

    gm: fx.GraphModule
    sites: list[Site]
    near_misses: list[NearMiss]
    capture: dict = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {k: sum(1 for s in self.sites if s.kind == k) for k in KINDS}

    def by_kind(self, kind: str) -> list[Site]:
        return [s for s in self.sites if s.kind == kind]

    def to_json(self) -> dict:
        return {
            "capture": self.capture,
            "sites": [s.to_json() for s in self.sites],
            "counts": self.counts(),
            "near_misses": [m.to_json() for m in self.near_misses],
        }


def analyze_graph(gm: fx.GraphModule, capture_info: dict | None = None) -> Analysis:
    """Find the sites of an already captured GraphModule (never modifies it)."""
    from .attention import find_attention
    from .flows import find_couplings
    from .norms import find_norm_residuals

    view = GraphView(gm)
    sites: list[Site] = []
    misses: list[NearMiss] = []
    for finder in (find_attention, find_norm_residuals, find_couplings):
        s, m = finder(view)
        sites += s
        misses += m
    order = {n: i for i, n in enumerate(view.nodes)}
    sites.sort(key=lambda s: order[s.anchor])
    return Analysis(gm, sites, misses, capture_info or {})


def analyze(model: nn.Module | fx.GraphModule, example_inputs: Inputs | None = None) -> Analysis:
    """Capture ``model`` (unless it is already a GraphModule) and find its sites."""
    from ..capture import capture

    if isinstance(model, fx.GraphModule) and example_inputs is None:
        return analyze_graph(model, {"method": "given"})
    if example_inputs is None:
        raise TypeError("analyze(model, example_inputs): example_inputs is required for an nn.Module")
    cap = capture(model, example_inputs)
    if cap.method == "fx":
        _propagate_shapes(cap.gm, example_inputs)
    return analyze_graph(cap.gm, cap.to_json())


def _propagate_shapes(gm: fx.GraphModule, inputs: Inputs) -> None:
    from torch.fx.passes.shape_prop import ShapeProp

    from ..inputs import as_args_kwargs

    args, kwargs = as_args_kwargs(inputs)
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    flat = list(args) + [kwargs[n] for n in names[len(args):] if n in kwargs]
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*flat)
    except Exception:  # noqa: BLE001 - shapes are cosmetic for fx graphs
        pass
