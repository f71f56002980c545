"""Load a model and its example inputs from what a user points at, never reaching the network.

Accepted specs, tried in this order:

- ``package.module:factory`` (when no such path exists): ``factory()`` returns ``(model, example_inputs)``;
  the current directory is importable while the module is imported.
- a directory: a Hugging Face model directory (``config.json`` + weights + tokenizer), loaded with
  ``AutoModel.from_pretrained(dir, local_files_only=True, trust_remote_code=False)``, ``use_cache=False``;
  example inputs from the tokenizer (text) or the config (``pixel_values`` of the configured image size).
- ``*.pt2``: an ``ExportedProgram`` written by ``torch.export.save``; it carries its example inputs. Its
  pickled parts (example inputs, some weights) are read with the tensor-only unpickler: a file whose
  pickles hold anything else is refused (torch itself would fall back to full unpickling).
- ``*.pt/.pth/.pkl/.pickle/.bin``: a pickle, refused unless ``trust_pickle`` (unpickling runs code);
  read with ``weights_only=True`` first, and fully only when that fails because it holds a module.

Example inputs always have batch 2 and, for text, two sentences of different length padded to ≥ 3
tokens: ``torch.export`` specialises dimensions of size 1 (and ties dimensions of equal size), and the
captured graph must accept any batch size and sentence length.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import pickle
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ._inputs import Inputs
from .errors import SurgeonError

__all__ = ["DEFAULT_TEXT", "LoadedModel", "PICKLE_SUFFIXES", "load", "load_model"]

DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog."
# Second sentence of the example batch; two candidates of different length so one always differs in
# length from the user's sentence (padding, and a mask with zeros, are then part of the example).
_OTHER_TEXTS = (
    "Surgeon swaps the standard parts of a network for lighter ones and checks every change on real data.",
    "Lighter parts, same answers.",
)
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin")
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
_TOKENIZER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                    "sentencepiece.bpe.model", "tokenizer.model")
_SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
_PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
_SEED = 0
_BATCH = 2


@dataclass
class LoadedModel:
    """A loaded model, example inputs it runs on, and where they came from."""

    model: nn.Module
    example_inputs: Inputs  # tuple (positional) or dict (keyword), see surgeon._inputs
    kind: str  # "pt2" | "hf" | "factory" | "pickle"
    source: str  # the spec as given
    tokenizer: Any = None  # HF tokenizer for text models, else None
    notes: list[str] = field(default_factory=list)  # what loading decided on the user's behalf

    @property
    def is_text(self) -> bool:
        """True for a Hugging Face text model (one that came with a tokenizer)."""
        return self.tokenizer is not None

    def text_inputs(self, sentences: list[str], max_length: int = 128) -> dict:
        """Tokenize ``sentences`` into one padded batch of the keyword inputs the model's forward takes.

        Sentences longer than ``max_length`` tokens (or the model's position limit) are truncated.
        """
        if self.tokenizer is None:
            raise SurgeonError(f"model '{self.source}' has no tokenizer: text inputs need a Hugging Face "
                               "text model directory")
        if isinstance(sentences, str):
            sentences = [sentences]
        if not sentences:
            raise SurgeonError("no sentences to tokenize")
        return _tokenize(self.model, self.tokenizer, list(sentences), max_length)


def load_model(spec: str | os.PathLike, *, trust_pickle: bool = False, text: str | None = None) -> LoadedModel:
    """Load ``spec`` (see the module docstring) as a model in eval mode plus example inputs.

    ``text`` is the first sentence of a text model's example batch (default ``DEFAULT_TEXT``); giving it
    for anything but a Hugging Face text model is an error. Every user error is a one-line
    ``SurgeonError`` naming the spec.
    """
    source = os.fsdecode(os.fspath(spec))
    if _FACTORY_RE.match(source) and not os.path.exists(source):
        _refuse_text(text, source, "a factory")
        loaded = _load_factory(source)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise SurgeonError(f"model path '{source}' does not exist")
        suffix = path.suffix.lower()
        if path.is_dir():
            loaded = _load_hf(path, source, text)
        elif suffix == ".pt2":
            _refuse_text(text, source, "a .pt2 file")
            loaded = _load_pt2(path, source)
        elif suffix in PICKLE_SUFFIXES:
            _refuse_text(text, source, "a pickle")
            loaded = _load_pickle(path, source, trust_pickle)
        elif suffix == ".onnx":
            # An ONNX file is already an export: the substitutions work on the PyTorch graph it came from.
            raise SurgeonError(f"unknown model format '{source}': an ONNX file is already an export, and surgeon "
                               "rewrites PyTorch models; give the .pt2 file, Hugging Face model directory or "
                               "package.module:factory it was exported from")
        else:
            raise SurgeonError(f"unknown model format '{source}': expected a .pt2 file, a Hugging Face model "
                               "directory, package.module:factory, or a pickle (.pt/.pth/.pkl/.bin)")
    loaded.model.eval()
    if loaded.kind in ("factory", "pickle"):
        _check_runs(loaded)
    loaded.notes.extend(_size_one_notes(loaded.example_inputs))
    return loaded


def _check_runs(loaded: LoadedModel) -> None:
    """Refuse example inputs the model cannot run on, now, in one line: later the same mistake surfaces
    as a capture failure deep inside torch.export (with its own log tracebacks) or an internal error."""
    from ._inputs import call

    what = "factory" if loaded.kind == "factory" else "pickle"
    try:
        with torch.no_grad():
            call(loaded.model, loaded.example_inputs)
    except Exception as exc:  # noqa: BLE001 - any failure here is a mismatch between the user's model and inputs
        from ._inputs import describe

        raise SurgeonError(f"the model of {what} '{loaded.source}' fails on its example inputs "
                           f"({describe(loaded.example_inputs)}): {_one_line(exc)}") from exc


def load(spec: str | os.PathLike, *, trust_pickle: bool = False, text: str | None = None) -> tuple[nn.Module, Inputs]:
    """``(model, example_inputs)`` of ``load_model(spec, ...)``."""
    loaded = load_model(spec, trust_pickle=trust_pickle, text=text)
    return loaded.model, loaded.example_inputs


# --------------------------------------------------------------------------------------------- helpers


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"[:300]


def _refuse_text(text: str | None, source: str, what: str) -> None:
    if text is not None:
        raise SurgeonError(f"a sentence (--text) applies only to Hugging Face text models; '{source}' is {what}")


def _as_inputs(value: Any) -> Inputs | None:
    """``value`` as Inputs (a lone tensor becomes a 1-tuple, a list a tuple), or None if it cannot be."""
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (tuple, list)):
        return tuple(value)
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return dict(value)
    return None


def _type_names(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        inner = ", ".join(type(v).__name__ for v in value[:4]) + (", ..." if len(value) > 4 else "")
        return f"{type(value).__name__} ({inner})"
    return type(value).__name__


def _size_one_notes(inputs: Inputs) -> list[str]:
    items = inputs.items() if isinstance(inputs, dict) else ((f"arg{i}", v) for i, v in enumerate(inputs))
    notes = []
    for name, v in items:
        if isinstance(v, torch.Tensor) and 1 in tuple(v.shape):
            notes.append(f"example input {name} has shape {tuple(v.shape)}: torch.export specialises "
                         "dimensions of size 1, so the captured graph will only accept that size there")
    return notes


@contextlib.contextmanager
def _quiet(*logger_names: str) -> Iterator[None]:
    """Silence library loggers that print tracebacks for errors we report in one line."""
    loggers = [logging.getLogger(n) for n in logger_names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _forward_params(model: nn.Module) -> set[str] | None:
    """Names the forward takes explicitly; None when it only takes ``*args/**kwargs``."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    names = {p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return names or None


# ------------------------------------------------------------------------------------------------ .pt2


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


def _load_pt2(path: Path, source: str) -> LoadedModel:
    from . import quant  # noqa: F401 - registers torch.ops.surgeon.*, which surgeon's own outputs call

    try:
        with _quiet("torch.export", "torch._export"), _tensor_only_unpickling():
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
        raise SurgeonError(f"could not read .pt2 file '{source}': {_one_line(exc)}") from exc
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


# --------------------------------------------------------------------------------------------- factory


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


def _load_factory(source: str) -> LoadedModel:
    module_name, attr = source.split(":")
    with _cwd_importable():
        importlib.invalidate_caches()  # a module written moments ago must be found
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - a module that fails at import time is the user's
            raise SurgeonError(f"cannot import module '{module_name}' of factory '{source}': "
                               f"{_one_line(exc)}") from exc
        if not hasattr(module, attr):
            raise SurgeonError(f"module '{module_name}' has no attribute '{attr}' (factory '{source}')")
        factory = getattr(module, attr)
        if not callable(factory):
            raise SurgeonError(f"factory '{source}' is not callable (it is a {type(factory).__name__})")
        try:
            result = factory()  # still inside: a factory may import its siblings lazily
        except SurgeonError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise SurgeonError(f"factory '{source}' raised {_one_line(exc)}") from exc
    inputs = None
    if isinstance(result, (tuple, list)) and len(result) == 2 and isinstance(result[0], nn.Module):
        inputs = _as_inputs(result[1])
    if inputs is None:
        raise SurgeonError(f"factory '{source}' must return (nn.Module, example_inputs) with example_inputs "
                           f"a tuple or dict, got {_type_names(result)}")
    return LoadedModel(result[0], inputs, "factory", source)


# ---------------------------------------------------------------------------------------------- pickle


def _infer_inputs(model: nn.Module, source: str) -> tuple:
    """Random inputs for a pickled module whose first layer tells the input shape."""
    first = next((m for m in model.modules()
                  if not any(True for _ in m.children()) and any(True for _ in m.parameters(recurse=False))), None)
    ask = "save (model, example_inputs) instead, e.g. torch.save((model, (x,)), path)"
    gen = torch.Generator().manual_seed(_SEED)
    if isinstance(first, nn.Linear):
        dims = (first.in_features,)
    elif isinstance(first, nn.Conv2d):
        dims = (first.in_channels, 32, 32)
    else:
        layer = type(first).__name__ if first is not None else "no layer with parameters"
        raise SurgeonError(f"cannot infer example inputs for the pickled {type(model).__name__} in '{source}': "
                           f"its first layer is {layer}, not Linear or Conv2d; {ask}")
    # A batch equal to another dimension would be tied to it by torch.export's duck sizing.
    batch = next(b for b in range(_BATCH, _BATCH + 4) if b not in dims)
    x = torch.randn((batch, *dims), generator=gen)
    try:
        with torch.no_grad():
            model.eval()(x)
    except Exception as exc:  # noqa: BLE001
        raise SurgeonError(f"cannot infer example inputs for the pickled {type(model).__name__} in '{source}': "
                           f"a {tuple(x.shape)} input failed ({_one_line(exc)}); {ask}") from exc
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
        raise SurgeonError(f"could not read pickle '{source}': {_one_line(exc)}") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False), True
    except RuntimeError as exc:
        if "magic number" not in str(exc):
            raise SurgeonError(f"could not read pickle '{source}': {_one_line(exc)}") from exc
    except Exception as exc:  # noqa: BLE001
        raise SurgeonError(f"could not read pickle '{source}': {_one_line(exc)}") from exc
    # Not torch.save's format: a plain pickle.dump.
    try:
        with open(path, "rb") as f:
            return pickle.load(f), True  # noqa: S301 - only reached with trust_pickle
    except Exception as exc:  # noqa: BLE001
        raise SurgeonError(f"could not read pickle '{source}': {_one_line(exc)}") from exc


def _load_pickle(path: Path, source: str, trust_pickle: bool) -> LoadedModel:
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
        raise SurgeonError(f"pickle '{source}' holds a {_type_names(obj)}, not an nn.Module, (model, "
                           "example_inputs) or {'model': ..., 'example_inputs': ...}")
    if given:
        inputs = _as_inputs(raw_inputs)
        if inputs is None:
            raise SurgeonError(f"pickle '{source}': example_inputs must be a tuple or dict, got "
                               f"{_type_names(raw_inputs)}")
    else:
        inputs = _infer_inputs(model, source)
        notes.append(f"example input inferred from the first layer: random {tuple(inputs[0].shape)}")
    return LoadedModel(model, inputs, "pickle", source, notes=notes)


# ---------------------------------------------------------------------------------------- Hugging Face


def _hf_weights(path: Path, source: str) -> str:
    for name in _SAFETENSORS + _PICKLED_WEIGHTS:
        if (path / name).is_file():
            return name
    if any(path.glob("*.safetensors")):
        return next(iter(sorted(path.glob("*.safetensors")))).name
    raise SurgeonError(f"Hugging Face model directory '{source}' has no weights: expected model.safetensors "
                       "(or pytorch_model.bin)")


def _import_transformers() -> Any:
    # Set before the hub library reads its constants at import time.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError as exc:
        raise SurgeonError("loading a Hugging Face model directory needs transformers: "
                           "pip install 'surgeon[hf]'") from exc
    return transformers


@contextlib.contextmanager
def _no_progress_bars(transformers: Any) -> Iterator[None]:
    logging_ = transformers.utils.logging
    enabled = logging_.is_progress_bar_enabled()
    logging_.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging_.enable_progress_bar()


def _max_positions(model: nn.Module, tokenizer: Any, requested: int | None) -> int:
    limits = [n for n in (requested, getattr(getattr(model, "config", None), "max_position_embeddings", None),
                          getattr(tokenizer, "model_max_length", None)) if isinstance(n, int) and n > 0]
    return min(limits) if limits else 512


def _tokenize(model: nn.Module, tokenizer: Any, sentences: list[str], max_length: int | None) -> dict:
    batch = tokenizer(sentences, padding=True, truncation=True,
                      max_length=_max_positions(model, tokenizer, max_length), return_tensors="pt")
    params = _forward_params(model)
    return {k: v for k, v in batch.items()
            if k in _TOKENIZER_INPUTS and (params is None or k in params)}


def _load_tokenizer(transformers: Any, path: Path, source: str, notes: list[str]) -> Any:
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise SurgeonError(f"Hugging Face model directory '{source}' has no tokenizer files (tokenizer.json, "
                           "vocab.txt, ...): a text model needs its tokenizer for example inputs")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                               trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        raise SurgeonError(f"could not load the tokenizer of '{source}': {_one_line(exc)}") from exc
    if tokenizer.pad_token is None:
        # Causal LMs (GPT-2) ship without a pad token; any existing token works since the mask hides it.
        fallback = tokenizer.eos_token or tokenizer.unk_token or tokenizer.sep_token
        if fallback is None:
            raise SurgeonError(f"the tokenizer of '{source}' has no pad, eos or unk token to pad a batch with")
        tokenizer.pad_token = fallback
        notes.append(f"tokenizer has no pad token: padding with {fallback!r}")
    return tokenizer


def _example_text(model: nn.Module, tokenizer: Any, text: str) -> dict:
    n = len(tokenizer(text, truncation=True, max_length=_max_positions(model, tokenizer, None))["input_ids"])
    other = next(s for s in _OTHER_TEXTS
                 if len(tokenizer(s, truncation=True, max_length=_max_positions(model, tokenizer, None))["input_ids"]) != n)
    return _tokenize(model, tokenizer, [text, other], None)


def _pixel_values(config: Any) -> torch.Tensor | None:
    for cfg in (config, getattr(config, "vision_config", None)):
        size = getattr(cfg, "image_size", None)
        if size is None:
            continue
        h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
        channels = getattr(cfg, "num_channels", 3)
        gen = torch.Generator().manual_seed(_SEED)
        return torch.randn(_BATCH, channels, h, w, generator=gen)
    return None


def _load_hf(path: Path, source: str, text: str | None) -> LoadedModel:
    if not (path / "config.json").is_file():
        raise SurgeonError(f"directory '{source}' is not a Hugging Face model directory: no config.json")
    weights = _hf_weights(path, source)
    transformers = _import_transformers()
    notes: list[str] = []
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    if weights in _PICKLED_WEIGHTS:
        # pytorch_model.bin is a pickle: load it only with the tensor-only unpickler.
        if "weights_only" in inspect.signature(transformers.PreTrainedModel.from_pretrained).parameters:
            kwargs["weights_only"] = True
        notes.append(f"weights read from {weights} (a pickle) with weights_only=True")
    else:
        kwargs["use_safetensors"] = True
    try:
        with _no_progress_bars(transformers):
            config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True,
                                                             trust_remote_code=False)
            if getattr(config, "use_cache", None) is not None:
                # A KV cache output is not a tensor graph export can return; we never decode step by step.
                config.use_cache = False
                notes.append("use_cache=False")
            model = transformers.AutoModel.from_pretrained(str(path), config=config, **kwargs)
    except SurgeonError:
        raise
    except Exception as exc:  # noqa: BLE001
        hint = ""
        if '"auto_map"' in (path / "config.json").read_text(errors="replace"):
            hint = " (the model needs its own code, and surgeon never uses trust_remote_code: " \
                   "load it in a package.module:factory instead)"
        raise SurgeonError(f"could not load Hugging Face model from '{source}': {_one_line(exc)}{hint}") from exc
    model.eval()
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes - {torch.float32}:
        # Calibration statistics and error measurements are taken against an fp32 reference.
        model.float()
        notes.append(f"weights converted from {', '.join(sorted(str(d) for d in dtypes))} to float32")

    params = _forward_params(model) or set()
    inputs: dict[str, Any] = {}
    tokenizer = None
    if "input_ids" in params:
        tokenizer = _load_tokenizer(transformers, path, source, notes)
        inputs.update(_example_text(model, tokenizer, DEFAULT_TEXT if text is None else text))
        if getattr(model.config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
            # AutoModel of an encoder-decoder (T5, BART) runs both stacks; teacher-forcing the same ids
            # through the decoder gives it a realistic input of the same shape.
            inputs["decoder_input_ids"] = inputs["input_ids"].clone()
            if "decoder_attention_mask" in params and "attention_mask" in inputs:
                inputs["decoder_attention_mask"] = inputs["attention_mask"].clone()
    elif text is not None:
        _refuse_text(text, source, f"a {type(model).__name__} (no input_ids)")
    if "pixel_values" in params:
        pixels = _pixel_values(model.config)
        if pixels is None:
            raise SurgeonError(f"cannot build pixel_values for '{source}': its config has no image_size; "
                               "use package.module:factory")
        inputs["pixel_values"] = pixels
    if not inputs:
        raise SurgeonError(f"cannot build example inputs for '{source}' ({type(model).__name__}): its forward "
                           "takes neither input_ids nor pixel_values; use package.module:factory")
    return LoadedModel(model, inputs, "hf", source, tokenizer=tokenizer, notes=notes)
