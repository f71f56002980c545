"""The ``torch`` target: ``OUTDIR/model.pt2`` (``torch.export.save``), run by torch itself.

``surgeon optimize`` writes ``model.pt2`` from its own exported program (``Result.save``); this target
is the same format for a module on its own (``surgeon export --target torch``) and the latency
measurement of a written ``.pt2``."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from surgeon import profile as _profile

from ._base import Target, max_abs_diff

__all__ = ["TorchTarget", "TORCH"]


def _outputs(module: Any, inputs: Any) -> list[Any]:
    import torch

    from surgeon.inputs import call, tensors_of

    with torch.no_grad():
        return [t.detach().float() for t in tensors_of(call(module, inputs))]


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
            torch.export.save(ep, str(tmp))
            figures = self.verify(tmp, module, verify_inputs if verify_inputs is not None else example_inputs,
                                  original=original)
            final = outdir / (filename or self.filename)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()
        figures.update({"file": final.name, "path": str(final), "target": self.name, "dynamic_shapes": dynamic})
        return figures

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
        torch.export.save(ep, str(path))

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


TORCH = TorchTarget(
    name="torch", format="pt2", runtime=_profile.TORCH.runtime, profile=_profile.TORCH,
    description="model.pt2 (torch.export.save): loads with torch alone, batch and sequence dynamic",
    default_passes="attention-fp8", filename="model.pt2")
