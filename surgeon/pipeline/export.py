"""Stage 6 of ``optimize``: ``torch.export`` the rebuilt model (batch/sequence dynamic where the original
accepted any size) and the artifacts delivered beside it."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from ..capture import auto_dynamic_shapes
from ..errors import SurgeonError, first_line
from ..inputs import Inputs, as_args_kwargs, call

__all__ = ["export_artifacts", "export_info", "plain", "plain_outputs", "reexport"]


def plain(value: Any) -> Any:
    """Outputs as built-in containers: a ModelOutput (a Mapping) or namedtuple becomes a dict."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return {k: plain(v) for k, v in value._asdict().items()}  # type: ignore[attr-defined]
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    return value


@contextmanager
def plain_outputs(gm: fx.GraphModule, example_inputs: Inputs) -> Iterator[bool]:
    """Temporarily make an exported GraphModule return built-in containers (dict for a ModelOutput).

    A ``.pt2`` whose output spec names a library class (transformers' ModelOutput) only loads in a
    process that imported that class first; with dicts it loads with torch alone."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is None or info.out_spec is None:
        yield False
        return
    with torch.no_grad():
        out = call(gm, example_inputs)
    _, spec = pytree.tree_flatten(plain(out))
    if spec == info.out_spec or spec.num_leaves != info.out_spec.num_leaves:
        yield False
        return
    old_attr = getattr(gm, "_out_spec", None)
    gm.graph._codegen.pytree_info = info._replace(out_spec=spec)  # type: ignore[attr-defined]
    gm._out_spec = spec
    gm.recompile()
    try:
        yield True
    finally:
        gm.graph._codegen.pytree_info = info  # type: ignore[attr-defined]
        gm._out_spec = old_attr
        gm.recompile()


def reexport(final: fx.GraphModule, example_inputs: Inputs) -> tuple[Any, list[str]]:
    """``torch.export`` the final model, every input dimension ``Dim.AUTO``: ``(program, notes)``.

    Dimensions the model fixes (a feature width) come out static, the others (batch, sequence)
    dynamic; if the dynamic export fails, a static one is written and the note says why."""
    args, kwargs = as_args_kwargs(example_inputs)
    notes: list[str] = []
    attempts = [auto_dynamic_shapes(final, example_inputs), None]
    last: Exception | None = None
    with plain_outputs(final, example_inputs) as changed:
        if changed:
            notes.append("model.pt2 returns the model's output as a plain dict (no library class is needed to load it)")
        for ds in attempts:
            try:
                ep = torch.export.export(final, tuple(args), kwargs or None, dynamic_shapes=ds, strict=False)
                if ds is None:
                    notes.append("model.pt2 has static shapes: the dynamic export failed "
                                 f"({first_line(last) if last else 'not attempted'})")
                return ep, notes
            except Exception as exc:  # noqa: BLE001 - the next attempt is static; the note keeps the cause
                last = exc
    raise SurgeonError(f"cannot export the optimized model with torch.export: {first_line(last)}")  # type: ignore[arg-type]


def export_artifacts(artifacts: Mapping[str, nn.Module], final: fx.GraphModule,
                     example_inputs: Inputs) -> tuple[dict[str, Inputs], dict[str, Any]]:
    """Export each artifact (batch dimension dynamic): ``(example inputs, programs)`` by name.

    An artifact maps the model's output back (a flow inverse: z → x), so its example input is the
    model's first floating output on the example inputs."""
    inputs: dict[str, Inputs] = {}
    programs: dict[str, Any] = {}
    for name, module in artifacts.items():
        with torch.no_grad():
            leaves = [t for t in pytree.tree_leaves(plain(call(final, example_inputs)))
                      if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not leaves:
            raise SurgeonError(f"cannot export the {name}: the model has no floating output to feed it")
        z = (leaves[0].detach(),)
        ds = ({0: torch.export.Dim.AUTO},) if z[0].dim() else None
        try:
            programs[name] = torch.export.export(module.eval(), z, dynamic_shapes=ds, strict=False)
        except Exception as exc:  # noqa: BLE001
            raise SurgeonError(f"cannot export the {name} with torch.export: {first_line(exc)}") from exc
        inputs[name] = z
    return inputs, programs


def export_info(ep: Any) -> dict:
    """Input dimensions of an exported program: an int where static, "dynamic" where symbolic."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    inputs: dict[str, list] = {}
    user_inputs = set(ep.graph_signature.user_inputs)
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in user_inputs:
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            inputs[node.name] = [int(d) if is_concrete_int(d) else "dynamic" for d in val.shape]
    return {"inputs": inputs, "format": "torch.export (.pt2)"}

