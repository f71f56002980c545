"""``package.module:factory``: ``factory()`` returns ``(model, example_inputs)``; the current directory is
importable while the module is imported."""

from __future__ import annotations

import contextlib
import importlib
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator

from torch import nn

from ..errors import SurgeonError, first_line
from .common import LoadedModel, as_inputs, refuse_text, type_names

__all__ = ["FACTORY_RE", "call_factory", "is_factory", "load_factory"]

FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def is_factory(source: str, path: Path) -> bool:
    """``pkg.module:name`` naming no existing path (checked before any path: it is not one)."""
    return bool(FACTORY_RE.match(source)) and not os.path.exists(source)


@contextlib.contextmanager
def _cwd_importable() -> Iterator[None]:
    cwd = os.getcwd()
    present = any(os.path.abspath(p or os.curdir) == cwd for p in sys.path)
    if not present:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if not present and cwd in sys.path:
            sys.path.remove(cwd)


def call_factory(source: str) -> Any:
    """Import ``package.module`` of ``source`` (the current directory importable) and return what
    calling its factory returns; every failure is a one-line ``SurgeonError`` naming the factory."""
    module_name, attr = source.split(":")
    with _cwd_importable():
        importlib.invalidate_caches()  # a module written moments ago must be found
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - a module that fails at import time is the user's
            raise SurgeonError(f"cannot import module '{module_name}' of factory '{source}': "
                               f"{first_line(exc)}") from exc
        if not hasattr(module, attr):
            raise SurgeonError(f"module '{module_name}' has no attribute '{attr}' (factory '{source}')")
        factory = getattr(module, attr)
        if not callable(factory):
            raise SurgeonError(f"factory '{source}' is not callable (it is a {type(factory).__name__})")
        try:
            return factory()  # still inside: a factory may import its siblings lazily
        except SurgeonError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise SurgeonError(f"factory '{source}' raised {first_line(exc)}") from exc


def load_factory(source: str, path: Path, *, trust_pickle: bool = False, text: str | None = None) -> LoadedModel:
    refuse_text(text, source, "a factory")
    result = call_factory(source)
    inputs = None
    if isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[0], nn.Module):
        inputs = as_inputs(result[1])
    if inputs is None:
        raise SurgeonError(f"factory '{source}' must return (nn.Module, example_inputs) with example_inputs "
                           f"a tuple or dict, got {type_names(result)}")
    return LoadedModel(result[0], inputs, "factory", source)

