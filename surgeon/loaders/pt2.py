"""``*.pt2``: an ``ExportedProgram`` written by ``torch.export.save``, read with the tensor-only unpickler."""

from __future__ import annotations

import contextlib
import inspect
import pickle
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import SurgeonError, first_line, quiet
from ..inputs import Inputs
from .common import LoadedModel, refuse_text

__all__ = ["is_pt2", "load_pt2"]


def is_pt2(source: str, path: Path) -> bool:
    return path.suffix.lower() == ".pt2"


class _Pt2KeywordModule(nn.Module):
    """An exported program whose example inputs mix positional and keyword arguments, called by keyword.

    ``ExportedProgram.module()`` insists on the exact (args, kwargs) split it was exported with, while
    ``Inputs`` is either a tuple or a dict: this adapter takes every input by name and splits them
    again. Its ``forward`` gets an explicit signature so ``torch.export`` can key dynamic shapes by name.
    """

    def __init__(self, program: nn.Module, positional: list[str]) -> None:
        super().__init__()
        self.program = program
        self._positional = positional

    def forward(self, **inputs: Any) -> Any:
        args = [inputs.pop(n) for n in self._positional]
        return self.program(*args, **inputs)


def _keyword_adapter(program: nn.Module, positional: list[str], names: list[str]) -> nn.Module:
    P = inspect.Parameter
    sig = inspect.Signature([P("self", P.POSITIONAL_OR_KEYWORD)] + [P(n, P.KEYWORD_ONLY) for n in names])

    def forward(self: _Pt2KeywordModule, **inputs: Any) -> Any:
        return _Pt2KeywordModule.forward(self, **inputs)

    forward.__signature__ = sig  # type: ignore[attr-defined]
    cls = type("Pt2KeywordModule", (_Pt2KeywordModule,), {"forward": forward})
    return cls(program, positional)


class _NoOpaquePickles:
    """Stands in for the ``pickle`` module inside torch's .pt2 archive reader."""

    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def loads(data: bytes, **_: Any) -> Any:
        raise pickle.UnpicklingError("an opaque pickled object (unpickling it could run code from the file)")


@contextlib.contextmanager
def _tensor_only_unpickling() -> Iterator[None]:
    """Make ``torch.export.load`` unpickle tensors only.

    A .pt2 is a zip of JSON and raw tensor bytes, but its example inputs, some weights and constants
    are pickles, and torch (2.13) reads them with ``torch.load(weights_only=False)`` (directly, or as
    a fallback when the tensor-only unpickler refuses) and opaque constants with ``pickle.loads``:
    a crafted file runs code on load. Inside this context every ``torch.load`` is tensor-only and
    ``pickle.loads`` in the archive reader refuses."""
    real_load = torch.load

    def tensor_only_load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        kwargs.pop("pickle_module", None)
        return real_load(*args, **kwargs)

    try:
        from torch.export.pt2_archive import _package
    except ImportError:  # another torch layout: torch.load is still covered
        _package = None
    saved = getattr(_package, "pickle", None)
    torch.load = tensor_only_load  # type: ignore[assignment]
    if saved is not None:
        _package.pickle = _NoOpaquePickles  # type: ignore[union-attr,assignment]
    try:
        yield
    finally:
        torch.load = real_load  # type: ignore[assignment]
        if saved is not None:
            _package.pickle = saved  # type: ignore[union-attr]


def load_pt2(source: str, path: Path, *, trust_pickle: bool = False, text: str | None = None) -> LoadedModel:
    refuse_text(text, source, "a .pt2 file")
    from .. import quant  # noqa: F401 - registers torch.ops.surgeon.*, which surgeon's own outputs call

    try:
        with quiet("torch.export", "torch._export"), _tensor_only_unpickling():
            ep = torch.export.load(str(path))
        program = ep.module()
    except Exception as exc:  # noqa: BLE001 - any failure to read the archive is the file's fault
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, pickle.UnpicklingError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise SurgeonError(f"refusing to load .pt2 file '{source}': it holds pickled objects beyond tensors "
                               "(loading them would run code from the file); re-export it with "
                               "torch.export.save from plain tensors") from exc
        raise SurgeonError(f"could not read .pt2 file '{source}': {first_line(exc)}") from exc
    # ep.module() makes train()/eval() raise because the graph keeps the mode it was exported in; the
    # plain nn.Module methods only set flags the graph no longer reads, so restore them (capture and
    # verification call eval() on every model).
    for name in ("train", "eval"):
        program.__dict__.pop(name, None)
    notes = [".pt2 graph keeps the train/eval behaviour it was exported with"]
    example = ep.example_inputs
    if example is None:
        raise SurgeonError(f".pt2 file '{source}' carries no example inputs: save it with torch.export.save "
                           "from torch.export.export(model, args)")
    args, kwargs = example
    model: nn.Module = program
    if args and kwargs:
        user_inputs = list(ep.graph_signature.user_inputs)
        positional = user_inputs[: len(args)]
        if len(user_inputs) != len(args) + len(kwargs) or any(not isinstance(a, torch.Tensor) for a in args):
            raise SurgeonError(f".pt2 file '{source}' mixes positional and keyword example inputs in a way "
                               "surgeon cannot name: export it with keyword inputs only")
        inputs: Inputs = {**dict(zip(positional, args)), **dict(kwargs)}
        model = _keyword_adapter(program, positional, list(inputs))
        notes.append(f"positional inputs {', '.join(positional)} are passed by name (Inputs is a tuple or a "
                     "dict); the graph is wrapped as 'program'")
    elif kwargs:
        inputs = dict(kwargs)
    else:
        inputs = tuple(args)
    return LoadedModel(model, inputs, "pt2", source, notes=notes)
