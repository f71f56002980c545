"""The records the analyzer produces: ``Site`` (a standard part found) and ``NearMiss`` (why something
that looked like one is not). Their own module so the finders (attention, norms, flows) import them
without importing the package that imports the finders."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import fx

__all__ = ["NearMiss", "Site", "site_id"]


def site_id(kind: str, module: str, node_name: str) -> str:
    """A site's id, ``kind:module:node`` (``<root>`` for the top-level module): the format of
    ``Site.id``, which a pass uses for the sites it finds on its own so ids match across the tools."""
    return f"{kind}:{module or '<root>'}:{node_name}"


@dataclass
class Site:
    """One standard part found in the graph.

    ``nodes`` maps roles to fx nodes of the analysed GraphModule. Roles by kind/variant:

    * attention/sdpa: ``sdpa``.
    * attention/manual: ``qk`` (the Q·Kᵀ product), ``softmax``, ``pv`` (the P·V product),
      ``q``, ``k`` (operands of ``qk``), ``p``, ``v`` (operands of ``pv``).
    * norm_residual: ``norm`` (the norm's output node), ``input`` (value normalised), ``add`` (the
      residual add: its input for post-norm, the add closing the branch for pre-norm).
    * coupling: ``input`` (transformed part u), ``output`` (last node of the transform), ``merge``
      where present; ``conditioner`` nodes in ``details``.
    """

    kind: str
    module: str
    variant: str
    nodes: dict[str, fx.Node]
    shapes: dict[str, Any] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def anchor(self) -> fx.Node:
        for role in ("sdpa", "softmax", "norm", "output"):
            if role in self.nodes:
                return self.nodes[role]
        return next(iter(self.nodes.values()))

    @property
    def id(self) -> str:
        """Stable identifier: ``kind:module:anchor-node`` (unique within one graph)."""
        return site_id(self.kind, self.module, self.anchor.name)

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "kind": self.kind,
            "module": self.module,
            "variant": self.variant,
            "nodes": {k: v.name for k, v in self.nodes.items()},
            "shapes": self.shapes,
            "details": {k: v for k, v in self.details.items() if isinstance(v, (str, int, float, bool, list, type(None)))},
        }


@dataclass
class NearMiss:
    """Something that looked like a site but is not one, and why."""

    kind: str
    module: str
    node: str
    reason: str

    def to_json(self) -> dict:
        return {"kind": self.kind, "module": self.module, "node": self.node, "reason": self.reason}
