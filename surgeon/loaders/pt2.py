"""``*.pt2``: an ``ExportedProgram`` written by ``torch.export.save``, read with the tensor-only unpickler."""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import json
import pickle
import zipfile
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import SurgeonError, first_line, quiet
from ..inputs import Inputs
from .common import LoadedModel, refuse_text

__all__ = ["KNOWN_PYTREE_LIBRARIES", "is_pt2", "load_pt2"]

# Libraries whose output classes register themselves as pytree nodes when their module is imported
# (transformers' ``ModelOutput`` family, diffusers' ``BaseOutput``): a .pt2 naming one of their
# classes in a pytree spec loads once that module is imported. Importing an installed library's own
# module runs no code from the file; any other class is refused (surgeon imports nothing the file names).
KNOWN_PYTREE_LIBRARIES = ("transformers", "diffusers")


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


def _spec_types(value: Any, found: set[str]) -> None:
    """Collect the ``type`` names of a serialized pytree spec (``[1, {"type": …, "children_spec": …}]``)."""
    if isinstance(value, dict):
        if isinstance(value.get("type"), str) and "children_spec" in value:
            found.add(value["type"])
        for v in value.values():
            _spec_types(v, found)
    elif isinstance(value, list):
        for v in value:
            _spec_types(v, found)


def _named_classes(path: Path) -> set[str]:
    """Class names the archive's pytree specs (inputs and outputs of every program) refer to, read
    from its JSON alone. An unreadable archive yields nothing: ``torch.export.load`` says why."""
    found: set[str] = set()
    try:
        with zipfile.ZipFile(path) as archive:
            for name in archive.namelist():
                if "/models/" not in name or not name.endswith(".json"):
                    continue
                stack: list[Any] = [json.loads(archive.read(name))]
                while stack:
                    item = stack.pop()
                    if isinstance(item, dict):
                        for key, v in item.items():
                            if key.endswith("_spec") and isinstance(v, str) and v.startswith("["):
                                with contextlib.suppress(ValueError):
                                    _spec_types(json.loads(v), found)
                            else:
                                stack.append(v)
                    elif isinstance(item, list):
                        stack.extend(item)
    except (OSError, ValueError, zipfile.BadZipFile):
        return set()
    return found


def _resolve_pytree_classes(source: str, path: Path) -> None:
    """Register the pytree node classes the file names, importing only known libraries' modules."""
    from torch.utils import _pytree as pytree

    known = getattr(pytree, "SERIALIZED_TYPE_TO_PYTHON_TYPE", {})
    for name in sorted(_named_classes(path)):
        if name in known:
            continue
        package, module = name.partition(".")[0], name.rpartition(".")[0]
        if package not in KNOWN_PYTREE_LIBRARIES:
            raise SurgeonError(f".pt2 file '{source}' names the class {name} in its pytree spec, which surgeon "
                               f"does not import (it imports only {', '.join(KNOWN_PYTREE_LIBRARIES)}'s own "
                               "output classes); export the model with tuple or dict outputs")
        if importlib.util.find_spec(package) is None:
            raise SurgeonError(f".pt2 file '{source}' names the class {name} in its pytree spec: install "
                               f"{package} to load it (pip install {package})")
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - a module the installed version lacks
            raise SurgeonError(f".pt2 file '{source}' names the class {name}, which the installed {package} "
                               f"cannot provide: {first_line(exc)}") from exc
        if name not in getattr(pytree, "SERIALIZED_TYPE_TO_PYTHON_TYPE", {}):
            raise SurgeonError(f".pt2 file '{source}' names the class {name}, which the installed {package} "
                               "does not register as a pytree node (another version wrote the file?)")


def _check_integrity(source: str, path: Path) -> None:
    """Refuse an archive whose entries fail their CRC: torch's reader does not check them, so a .pt2 with
    damaged weight bytes would load and be optimized as if nothing were wrong. A file that does not open
    as a zip at all is left to ``torch.export.load``, which says why (not a zip, no permission)."""
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, ValueError, zipfile.BadZipFile):
        return
    with archive:
        try:
            bad = archive.testzip()  # reads every entry: the whole file once
        except Exception as exc:  # noqa: BLE001 - a damaged local header or compressed stream
            raise SurgeonError(f"could not read .pt2 file '{source}': the archive is corrupt ({first_line(exc)})") from exc
    if bad is not None:
        raise SurgeonError(f"could not read .pt2 file '{source}': the archive is corrupt (CRC check failed for '{bad}')")


def load_pt2(source: str, path: Path, *, trust_pickle: bool = False, text: str | None = None) -> LoadedModel:
    refuse_text(text, source, "a .pt2 file")
    from .. import quant  # noqa: F401 - registers torch.ops.surgeon.*, which surgeon's own outputs call

    _check_integrity(source, path)
    _resolve_pytree_classes(source, path)
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
