"""``*.pt/.pth/.pkl/.pickle/.bin``: a pickle, refused unless ``trust_pickle`` (unpickling runs code); read
with ``weights_only=True`` first, and fully only when that fails because it holds a module."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SurgeonError, first_line
from .common import BATCH, SEED, LoadedModel, as_inputs, refuse_text, type_names

__all__ = ["PICKLE_SUFFIXES", "is_pickle", "load_pickle"]

PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin")


def is_pickle(source: str, path: Path) -> bool:
    return path.suffix.lower() in PICKLE_SUFFIXES


def _infer_inputs(model: nn.Module, source: str) -> tuple:
    """Random inputs for a pickled module whose first layer tells the input shape."""
    first = next((m for m in model.modules()
                  if not any(True for _ in m.children()) and any(True for _ in m.parameters(recurse=False))), None)
    ask = "save (model, example_inputs) instead, e.g. torch.save((model, (x,)), path)"
    gen = torch.Generator().manual_seed(SEED)
    if isinstance(first, nn.Linear):
        dims = (first.in_features,)
    elif isinstance(first, nn.Conv2d):
        dims = (first.in_channels, 32, 32)
    else:
        layer = type(first).__name__ if first is not None else "no layer with parameters"
        raise SurgeonError(f"cannot infer example inputs for the pickled {type(model).__name__} in '{source}': "
                           f"its first layer is {layer}, not Linear or Conv2d; {ask}")
    # A batch equal to another dimension would be tied to it by torch.export's duck sizing.
    batch = next(b for b in range(BATCH, BATCH + 4) if b not in dims)
    x = torch.randn((batch, *dims), generator=gen)
    try:
        with torch.no_grad():
            model.eval()(x)
    except Exception as exc:  # noqa: BLE001
        raise SurgeonError(f"cannot infer example inputs for the pickled {type(model).__name__} in '{source}': "
                           f"a {tuple(x.shape)} input failed ({first_line(exc)}); {ask}") from exc
    return (x,)


def _is_weights_only(obj: Any) -> bool:
    if not isinstance(obj, dict) or not obj:
        return False
    for key in ("state_dict", "model_state_dict"):
        if isinstance(obj.get(key), dict):
            return True
    return all(isinstance(v, torch.Tensor) for v in obj.values())


def _unpickle(path: Path, source: str) -> tuple[Any, bool]:
    """The pickled object and whether a full (code-running) unpickling was needed."""
    try:
        with warnings.catch_warnings():
            # Plain pickle.dump files use protocol 4; the tensor-only unpickler warns, then copes or refuses.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True), False
    except pickle.UnpicklingError:
        pass  # holds classes beyond tensors (a module): the user trusted it, so unpickle fully
    except Exception as exc:  # noqa: BLE001
        raise SurgeonError(f"could not read pickle '{source}': {first_line(exc)}") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False), True
    except RuntimeError as exc:
        if "magic number" not in str(exc):
            raise SurgeonError(f"could not read pickle '{source}': {first_line(exc)}") from exc
    except Exception as exc:  # noqa: BLE001
        raise SurgeonError(f"could not read pickle '{source}': {first_line(exc)}") from exc
    # Not torch.save's format: a plain pickle.dump.
    try:
        with open(path, "rb") as f:
            return pickle.load(f), True  # noqa: S301 - only reached with trust_pickle
    except Exception as exc:  # noqa: BLE001
        raise SurgeonError(f"could not read pickle '{source}': {first_line(exc)}") from exc


def load_pickle(source: str, path: Path, *, trust_pickle: bool = False, text: str | None = None) -> LoadedModel:
    refuse_text(text, source, "a pickle")
    if not trust_pickle:
        raise SurgeonError(f"refusing to load pickle '{source}': unpickling can run arbitrary code; pass "
                           "--trust-pickle only if you trust its source, or save the model with "
                           "torch.export.save (.pt2)")
    if not path.is_file():
        raise SurgeonError(f"pickle '{source}' is not a file")
    obj, full = _unpickle(path, source)
    notes = [f"'{path.name}' unpickled " + ("fully (it holds code objects; --trust-pickle given)" if full
                                            else "with weights_only=True")]
    model, raw_inputs, given = None, None, False
    if isinstance(obj, nn.Module):
        model = obj
    elif isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[0], nn.Module):
        model, raw_inputs, given = obj[0], obj[1], True
    elif isinstance(obj, dict) and isinstance(obj.get("model"), nn.Module):
        model = obj["model"]
        given = "example_inputs" in obj
        raw_inputs = obj.get("example_inputs")
    elif _is_weights_only(obj):
        raise SurgeonError(f"pickle '{source}' holds weights only, no model: save the module itself "
                           "(torch.save(model, path)) or (model, example_inputs), or use a .pt2 file or a "
                           "Hugging Face model directory")
    if model is None:
        raise SurgeonError(f"pickle '{source}' holds a {type_names(obj)}, not an nn.Module, (model, "
                           "example_inputs) or {'model': ..., 'example_inputs': ...}")
    if given:
        inputs = as_inputs(raw_inputs)
        if inputs is None:
            raise SurgeonError(f"pickle '{source}': example_inputs must be a tuple or dict, got "
                               f"{type_names(raw_inputs)}")
    else:
        inputs = _infer_inputs(model, source)
        notes.append(f"example input inferred from the first layer: random {tuple(inputs[0].shape)}")
    return LoadedModel(model, inputs, "pickle", source, notes=notes)

