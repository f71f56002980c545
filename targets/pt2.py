"""The ``torch`` target: ``OUTDIR/model.pt2`` (``torch.export.save``), run by torch itself.

``surgeon optimize`` writes ``model.pt2`` from its own exported program (``Result.save``); this target
is the same format for a module on its own (``surgeon export --target torch``) and the latency
measurement of a written ``.pt2``."""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from surgeon import profile as _profile
from surgeon.resources import publish_mode

from ._base import Target, max_abs_diff

__all__ = ["TorchTarget", "TORCH", "portable", "save_program"]


def _outputs(module: Any, inputs: Any) -> list[Any]:
    import torch

    from surgeon.inputs import call, tensors_of

    with torch.no_grad():
        return [t.detach().float() for t in tensors_of(call(module, inputs))]


def _decompositions() -> dict[Any, Callable[..., Any]]:
    from surgeon import quant_dynamic, quant_ops

    return {**quant_ops.DECOMPOSITIONS, **quant_dynamic.DECOMPOSITIONS}


def _renamed(spec: Any, renamed: dict[str, str]) -> Any:
    """``spec`` (an input or output spec) naming the node ``renamed`` maps its argument's name to."""
    import dataclasses

    name = getattr(spec.arg, "name", None)
    if name not in renamed or not dataclasses.is_dataclass(spec.arg):
        return spec
    return dataclasses.replace(spec, arg=dataclasses.replace(spec.arg, name=renamed[name]))


def _drop_unused_state(ep: Any) -> Any:
    """``ep`` without the parameters, buffers and constants no node reads.

    ``torch.export`` lifts every tensor of the module, used or not: a quantized layer keeps its fp32
    weight for the guard's switch (``active = False``), so the program would store it beside the
    int8 / fp8 one. Those inputs are erased from the graph and the signature."""
    import copy

    from torch.export import ExportedProgram
    from torch.export.graph_signature import ExportGraphSignature, InputKind

    gm = copy.deepcopy(ep.graph_module)  # the caller's program is left as it was
    # the copy's graph names its nodes afresh, and a name that shadows a builtin gets a suffix (a
    # Sequential's placeholder 'input' becomes 'input_1'): the signature must name the copy's nodes
    # (nodes keep their order, so they pair up)
    renamed = {old.name: new.name for old, new in zip(ep.graph.nodes, gm.graph.nodes) if old.name != new.name}
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    kept, dropped = [], []
    input_specs = [_renamed(spec, renamed) for spec in ep.graph_signature.input_specs]
    output_specs = [_renamed(spec, renamed) for spec in ep.graph_signature.output_specs]
    for spec in input_specs:
        node = placeholders.get(spec.arg.name) if hasattr(spec.arg, "name") else None
        if (spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR)
                and node is not None and not node.users):
            dropped.append((spec, node))
        else:
            kept.append(spec)
    if not dropped:
        return ep
    state_dict, constants = dict(ep.state_dict), dict(ep.constants)
    for spec, node in dropped:
        gm.graph.erase_node(node)
        state_dict.pop(spec.target, None)
        constants.pop(spec.target, None)
    gm.graph.lint()
    gm.recompile()
    signature = ExportGraphSignature(input_specs=kept, output_specs=output_specs)
    return ExportedProgram(root=gm, graph=gm.graph, graph_signature=signature, state_dict=state_dict,
                           range_constraints=ep.range_constraints, module_call_graph=ep.module_call_graph,
                           example_inputs=ep.example_inputs, constants=constants, verifiers=ep.verifiers)


def portable(ep: Any) -> Any:
    """The program as it is saved: surgeon's custom ops replaced by their aten bodies (the very
    operations the ops run, so bit-exact), unused tensors dropped. It loads with ``torch.export.load``
    in a process that never imported surgeon, and stores quantized weights only."""
    table = _decompositions()
    if any(n.op == "call_function" and n.target in table for n in ep.graph.nodes):
        # only surgeon's ops are decomposed: an empty table leaves every aten op as it was exported
        with warnings.catch_warnings():
            # torch 2.13 deep-copies its own module call graph here, and copying a LeafSpec trips
            # torch's deprecation of isinstance(treespec, LeafSpec): a FutureWarning about torch's
            # code, not the user's, printed on every optimize
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                                    category=FutureWarning)
            ep = ep.run_decompositions(table)
        for node in ep.graph.nodes:
            # provenance run_decompositions records per node (debugging only): it would make the
            # graph of a small model several times larger than the weights it saves
            node.meta.pop("from_node", None)
    return _drop_unused_state(ep)


def save_program(ep: Any, path: str | os.PathLike) -> dict[str, Any]:
    """``torch.export.save(portable(ep), path)``; returns the file's figures: ``bytes`` and the bytes
    of its stored tensors by dtype (``tensor_bytes``)."""
    import torch

    ep = portable(ep)
    torch.export.save(ep, str(path))
    by_dtype: dict[str, int] = {}
    for t in [*ep.state_dict.values(), *ep.constants.values()]:
        if isinstance(t, torch.Tensor):
            key = str(t.dtype).replace("torch.", "")
            by_dtype[key] = by_dtype.get(key, 0) + t.numel() * t.element_size()
    return {"bytes": Path(path).stat().st_size, "tensor_bytes": dict(sorted(by_dtype.items()))}


@dataclass(frozen=True)
class TorchTarget(Target):
    """``OUTDIR/model.pt2``: a ``torch.export`` program, loaded with ``torch.export.load``."""

    def lower(self, module: Any, example_inputs: Any, outdir: str | os.PathLike, *, original: Any = None,
              verify_inputs: Any = None, filename: str | None = None, **kw: Any) -> dict[str, Any]:
        """torch.export (batch and sequence dynamic where the model allows, else static), save to a
        temporary name, verify, rename into place."""
        import torch

        from surgeon.capture import auto_dynamic_shapes
        from surgeon.inputs import as_args_kwargs

        outdir = Path(outdir)
        outdir.mkdir(parents=True, exist_ok=True)
        args, kwargs = as_args_kwargs(example_inputs)
        try:
            ep = torch.export.export(module, tuple(args), kwargs or None,
                                     dynamic_shapes=auto_dynamic_shapes(module, example_inputs), strict=False)
            dynamic = True
        except Exception:  # noqa: BLE001 - a model whose shapes cannot be symbolic is still exportable
            ep = torch.export.export(module, tuple(args), kwargs or None, strict=False)
            dynamic = False
        fd, tmp_name = tempfile.mkstemp(prefix=".model-", suffix=".tmp.pt2", dir=str(outdir))
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            save_program(ep, tmp)
            figures = self.verify(tmp, module, verify_inputs if verify_inputs is not None else example_inputs,
                                  original=original)
            final = outdir / (filename or self.filename)
            publish_mode(tmp)  # mkstemp made it 0600
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()
        figures.update({"file": final.name, "path": str(final), "target": self.name, "dynamic_shapes": dynamic})
        return figures

    def save_program(self, ep: Any, path: str | os.PathLike) -> dict[str, Any]:
        """Write ``ep`` as a ``.pt2`` that loads with torch alone (module function ``save_program``)."""
        return save_program(ep, path)

    def verify(self, path: str | os.PathLike, module: Any, inputs: Any, *, original: Any = None,
               **kw: Any) -> dict[str, Any]:
        """Load the file with ``torch.export.load`` and compare its outputs with ``module`` (max abs diff)
        and, given ``original``, the cosine to the original's outputs."""
        import torch

        path = Path(path)
        loaded = torch.export.load(str(path)).module()
        got = _outputs(loaded, inputs)
        figures: dict[str, Any] = {"file": path.name, "bytes": path.stat().st_size,
                                   "max_abs_diff": max_abs_diff([t.numpy() for t in got],
                                                                [t.numpy() for t in _outputs(module, inputs)],
                                                                "the .pt2 file")}
        if original is not None:
            ref = _outputs(original, inputs)
            if len(ref) == len(got):
                a = torch.cat([t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1) for t in got], 1).double()
                b = torch.cat([t.reshape(t.shape[0], -1) if t.dim() else t.reshape(1, 1) for t in ref], 1).double()
                cos = torch.nn.functional.cosine_similarity(a, b, dim=1)
                figures["cosine_min"] = float(cos.min())
                figures["cosine_mean"] = float(cos.mean())
        return figures

    def baseline(self, original: Any, example_inputs: Any, path: str | os.PathLike) -> None:
        """The original through ``torch.export`` (dynamic batch/sequence where it allows), saved as .pt2."""
        import torch

        from surgeon.capture import auto_dynamic_shapes
        from surgeon.inputs import as_args_kwargs

        args, kwargs = as_args_kwargs(example_inputs)
        try:
            ep = torch.export.export(original, tuple(args), kwargs or None,
                                     dynamic_shapes=auto_dynamic_shapes(original, example_inputs), strict=False)
        except Exception:  # noqa: BLE001 - timing needs no dynamic shapes: a static export will do
            ep = torch.export.export(original, tuple(args), kwargs or None, strict=False)
        save_program(ep, path)  # the same treatment as the optimized file, so the sizes compare

    def runner(self, path: str | os.PathLike, inputs: Any, *, threads: int = 2) -> Callable[[], Any]:
        """``torch.export.load(path).module()`` under ``torch.no_grad`` with ``threads`` intra-op threads
        (set for each call and restored, so two runners can alternate with other work between)."""
        import torch

        from surgeon.inputs import call

        module = torch.export.load(str(path)).module()

        def run() -> Any:
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                with torch.no_grad():
                    return call(module, inputs)
            finally:
                torch.set_num_threads(before)

        return run

    def open(self, path: str | os.PathLike) -> Callable[..., Any]:
        """``torch.export.load(path).module()``: the program as torch runs it."""
        import torch

        return torch.export.load(str(path)).module()


TORCH = TorchTarget(
    name="torch", format="pt2", runtime=_profile.TORCH.runtime, profile=_profile.TORCH,
    description="model.pt2 (torch.export.save): loads with torch alone, batch and sequence dynamic",
    default_passes="attention-fp8", filename="model.pt2")
