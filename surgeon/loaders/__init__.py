"""Load a model and its example inputs from what a user points at, never reaching the network.

Accepted specs, tried in the order of ``LOADERS`` (a predicate → loader table; one module per kind):

- ``package.module:factory`` (``factory.py``) (when no such path exists): ``factory()`` returns ``(model, example_inputs)``;
  the current directory is importable while the module is imported.
- a directory (``hf.py``): a Hugging Face model directory (``config.json`` + weights + tokenizer), loaded as
  the class its config's architecture names (task heads included; ``AutoModel`` for a generative head or an
  unknown architecture), or the head ``task`` names, ``local_files_only=True, trust_remote_code=False``,
  ``use_cache=False``; weights missing from the checkpoint are refused. Example inputs from the tokenizer
  (text) or the config (``pixel_values`` of the configured image size).
- ``*.gguf``, or a directory holding one GGUF and no other weights (``gguf.py``): llama.cpp's format, read
  through transformers' GGUF support (``pip install 'surgeon[gguf]'``), dequantized to fp32, the
  tokenizer from the file's metadata; loaded as its base model (``AutoModel``) here and as the causal LM
  for ``onnx-decoder``. The file's quantization (Q4_1, ...) is in the load notes.
- ``*.pt2`` (``pt2.py``): an ``ExportedProgram`` written by ``torch.export.save``; it carries its example inputs. Its
  pickled parts (example inputs, some weights) are read with the tensor-only unpickler: a file whose
  pickles hold anything else is refused (torch itself would fall back to full unpickling).
- ``*.pt/.pth/.pkl/.pickle/.bin`` (``pickled.py``): a pickle, refused unless ``trust_pickle`` (unpickling runs code);
  read with ``weights_only=True`` first, and fully only when that fails because it holds a module.

Example inputs always have batch 2 and, for text, two sentences of different length padded to ≥ 3
tokens: ``torch.export`` specialises dimensions of size 1 (and ties dimensions of equal size), and the
captured graph must accept any batch size and sentence length.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..errors import SurgeonError, first_line
from ..inputs import Inputs, call, describe
from .common import LoadedModel, size_one_notes
from .factory import call_factory, is_factory, load_factory
from .gguf import is_gguf, load_gguf, load_gguf_causal_lm
from .hf import DEFAULT_TEXT, OTHER_TEXTS, LoadedDecoder, is_hf, load_hf, load_hf_causal_lm, refuse_encoder_decoder
from .hf_heads import TASKS, check_task
from .pickled import PICKLE_SUFFIXES, is_pickle, load_pickle
from .pt2 import is_pt2, load_pt2

__all__ = ["DEFAULT_TEXT", "LOADERS", "OTHER_TEXTS", "TASKS", "LoadedDecoder", "LoadedModel", "PICKLE_SUFFIXES",
           "load", "load_decoder", "load_model"]

Predicate = Callable[[str, Path], bool]
Loader = Callable[..., LoadedModel]  # (source, path, *, trust_pickle, text) -> LoadedModel; load_hf also task



def _missing(source: str, path: Path) -> bool:
    return not path.exists()


def _refuse_missing(source: str, path: Path, **_: object) -> LoadedModel:
    raise SurgeonError(f"model path '{source}' does not exist")


def _is_onnx(source: str, path: Path) -> bool:
    return path.suffix.lower() == ".onnx"


def _refuse_onnx(source: str, path: Path, **_: object) -> LoadedModel:
    # An ONNX file is already an export: the substitutions work on the PyTorch graph it came from.
    raise SurgeonError(f"unknown model format '{source}': an ONNX file is already an export, and surgeon "
                       "rewrites PyTorch models; give the .pt2 file, Hugging Face model directory or "
                       "package.module:factory it was exported from")


# The first entry whose predicate accepts ``(source, path)`` loads it (or refuses it in one line).
LOADERS: tuple[tuple[Predicate, Loader], ...] = (
    (is_factory, load_factory),  # before any path check: 'pkg.module:name' names no file
    (_missing, _refuse_missing),
    (is_gguf, load_gguf),  # before is_hf: a directory holding a GGUF (and no other weights) is not an HF directory
    (is_hf, load_hf),
    (is_pt2, load_pt2),
    (is_pickle, load_pickle),
    (_is_onnx, _refuse_onnx),
)


def load_model(spec: str | os.PathLike, *, trust_pickle: bool = False, text: str | None = None,
               task: str | None = None) -> LoadedModel:
    """Load ``spec`` (see the module docstring) as a model in eval mode plus example inputs.

    ``text`` is the first sentence of a text model's example batch (default ``DEFAULT_TEXT``); giving it
    for anything but a Hugging Face text model is an error. ``task`` (one of ``TASKS``, Optimum's task
    names; default: none) loads a Hugging Face directory with that
    task's head instead of its config's architecture; giving it for anything else is an error. Every
    user error is a one-line ``SurgeonError`` naming the spec.
    """
    source = os.fsdecode(os.fspath(spec))
    path = Path(source).expanduser()
    check_task(task)  # before any loading: a typo costs nothing
    loader = next((load for accepts, load in LOADERS if accepts(source, path)), None)
    if loader is None:
        raise SurgeonError(f"unknown model format '{source}': expected a .pt2 file, a Hugging Face model "
                           "directory, package.module:factory, or a pickle (.pt/.pth/.pkl/.bin)")
    if task is not None and loader not in (load_hf, _refuse_missing):
        raise SurgeonError(f"--task applies only to Hugging Face model directories (it picks the head transformers "
                           f"builds); '{source}' is not one")
    loaded = loader(source, path, trust_pickle=trust_pickle, text=text, **({"task": task} if task else {}))
    loaded.model.eval()
    if loaded.kind in ("factory", "pickle"):
        _check_runs(loaded)
    loaded.notes.extend(size_one_notes(loaded.example_inputs))
    return loaded


def _check_runs(loaded: LoadedModel) -> None:
    """Refuse example inputs the model cannot run on, now, in one line: later the same mistake surfaces
    as a capture failure deep inside torch.export (with its own log tracebacks) or an internal error."""
    what = "factory" if loaded.kind == "factory" else "pickle"
    try:
        with torch.no_grad():
            call(loaded.model, loaded.example_inputs)
    except Exception as exc:  # noqa: BLE001 - any failure here is a mismatch between the user's model and inputs
        raise SurgeonError(f"the model of {what} '{loaded.source}' fails on its example inputs "
                           f"({describe(loaded.example_inputs)}): {first_line(exc)}") from exc


def load(spec: str | os.PathLike, *, trust_pickle: bool = False, text: str | None = None,
         task: str | None = None) -> tuple[nn.Module, Inputs]:
    """``(model, example_inputs)`` of ``load_model(spec, ...)``."""
    loaded = load_model(spec, trust_pickle=trust_pickle, text=text, task=task)
    return loaded.model, loaded.example_inputs


def load_decoder(spec: str | os.PathLike) -> LoadedDecoder:
    """A causal LM with its cache on (``use_cache=True``), for the ``onnx-decoder`` target: a Hugging Face
    directory (``AutoModelForCausalLM``, its tokenizer), a GGUF file (or a directory holding one) or
    ``package.module:factory`` returning the model or ``(model, tokenizer)``. Other targets keep
    ``load_model`` (``AutoModel``, no cache)."""
    source = os.fsdecode(os.fspath(spec))
    path = Path(source).expanduser()
    if is_factory(source, path):
        result = call_factory(source)
        model, tokenizer = (result[0], result[1]) if isinstance(result, (tuple, list)) and len(result) == 2 \
            else (result, None)
        if not isinstance(model, nn.Module) or not hasattr(model, "config"):
            raise SurgeonError(f"factory '{source}' must return a Hugging Face causal LM (or (model, tokenizer)) "
                               f"for onnx-decoder, got {type(model).__name__}")
        refuse_encoder_decoder(model.config, source)
        if tokenizer is None or not callable(tokenizer):
            raise SurgeonError(f"factory '{source}' returns no tokenizer: onnx-decoder needs one (return "
                               "(model, tokenizer))")
        if getattr(tokenizer, "pad_token", "") is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.use_cache = True
        return LoadedDecoder(model.eval().float(), tokenizer, source, None)
    if not path.exists():
        raise SurgeonError(f"model path '{source}' does not exist")
    if is_gguf(source, path):
        return load_gguf_causal_lm(source, path)
    if not path.is_dir():
        raise SurgeonError(f"'{source}' is not a Hugging Face model directory nor package.module:factory: "
                           "onnx-decoder needs a causal LM")
    return load_hf_causal_lm(source, path)
