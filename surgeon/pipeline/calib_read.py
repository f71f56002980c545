"""``--calib``: what calibration data is (a ``.pt`` file of batches, a text file or list of sentences,
a directory of images or audio) and reading it into batches, for the CLI and ``surgeon.calibration_batches``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import SurgeonError, first_line
from ..inputs import Inputs
from .calib_media import media_model, read_media_dir
from .calib_text import TEXT_BATCH, TEXT_MAX_LENGTH, Tokenized, text_batches


def read_calibration(path: str, loaded: Any, *, batch_size: int = TEXT_BATCH,
                     max_length: int = TEXT_MAX_LENGTH, force: bool = False) -> list[Inputs]:
    """Calibration batches from ``--calib FILE``: sentences (text models), a ``.pt`` list of inputs, or
    a directory of images (vision models) or audio files (audio models) run through the model
    directory's processor (``read_media_dir``). Sentences that do not fit the model
    (``text_batches``) are refused unless ``force``."""
    p = Path(path)
    if not p.exists():
        raise SurgeonError(f"cannot read calibration file '{path}': no such file")
    if p.is_dir():
        media = media_model(loaded)
        if media is None or media.modality is None:
            raise SurgeonError(f"cannot read calibration file '{path}': it is a directory")
        return read_media_dir(path, media, batch_size=batch_size)
    if p.suffix.lower() in (".pt", ".pth"):
        try:
            data = torch.load(p, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
            raise SurgeonError(f"cannot read calibration file '{path}': not a torch.save file of input tuples "
                               f"({first_line(exc)})") from None
        if isinstance(data, (tuple, dict, torch.Tensor)) or not isinstance(data, list):
            raise SurgeonError(f"calibration file '{path}' must hold a list of input tuples (or dicts), one per "
                               f"batch; it holds a {type(data).__name__}")
        if not data:
            raise SurgeonError(f"calibration file '{path}' is empty")
        return data
    if loaded is None or not loaded.is_text:
        raise SurgeonError(f"calibration file '{path}' is not a .pt file: a model without a tokenizer needs a .pt "
                           "file holding a list of input tuples (text files need a Hugging Face text model)")
    return text_batches(read_lines(path), loaded, batch_size, max_length, f"calibration file '{path}'", force)


def read_lines(path: str | os.PathLike) -> list[str]:
    """The non-blank lines of the UTF-8 text file ``path``, stripped; anything else is one line of error."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SurgeonError(f"cannot read calibration file '{path}': not UTF-8 text") from None
    except OSError as exc:
        raise SurgeonError(f"cannot read calibration file '{path}': {exc.strerror or exc}") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise SurgeonError(f"calibration file '{path}' is empty")
    return lines



def calibration_batches(data: str | os.PathLike | Sequence[str], model: Any = None, *,
                        batch_size: int = TEXT_BATCH, max_length: int = TEXT_MAX_LENGTH,
                        force: bool = False) -> list[Inputs]:
    """Calibration batches for ``surgeon.optimize(..., calib=…)``, by the CLI's ``--calib`` rules.

    ``data``: a text file (one sentence per line; blank lines skipped), a list of sentences, a
    ``.pt`` file holding a list of input tuples/dicts (returned as it is; ``model`` is not needed), or
    a directory of images or audio files for a vision or audio model (``model``: its Hugging Face
    directory, loaded model or module; read through the directory's image processor or feature
    extractor, ``batch_size`` files a batch: ``read_media_dir``).
    ``model``: what tokenizes the sentences — a Hugging Face model directory (its tokenizer, and
    only the inputs its model's forward takes), a ``surgeon.loaders.LoadedModel``, a Hugging Face
    tokenizer, or a Hugging Face model (its ``name_or_path``'s tokenizer). ``batch_size`` sentences
    per batch (default 8, as the CLI), each padded and truncated to ``max_length`` tokens. Raises
    ``SurgeonError`` with the CLI's one-line messages; sentences that do not fit the model (unknown
    tokens, one repeated line, lines of a few tokens) are refused unless ``force`` (``--force-calib``);
    thin text is a ``UserWarning``. The result is a plain list (``torch.save`` it and ``torch.load``
    reads it back with ``weights_only=True``)."""
    import warnings

    batches = calibration(data, model, batch_size=batch_size, max_length=max_length, force=force)
    for note in getattr(batches, "notes", []):
        warnings.warn(note, stacklevel=2)
    return list(batches)


def calibration(data: str | os.PathLike | Sequence[str], model: Any = None, *, batch_size: int = TEXT_BATCH,
                max_length: int = TEXT_MAX_LENGTH, force: bool = False) -> list[Inputs]:
    """``calibration_batches`` as ``optimize`` reads a path: text comes back as ``CalibrationBatches``
    carrying ``text_stats`` and ``notes`` for the report."""
    if batch_size < 1:
        raise SurgeonError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(data, (str, os.PathLike)) and Path(data).suffix.lower() in (".pt", ".pth"):
        return read_calibration(str(data), None)
    if isinstance(data, (str, os.PathLike)) and Path(data).is_dir():
        return read_calibration(str(data), _media_of(model), batch_size=batch_size)
    loaded = _tokenizer_of(model)
    if isinstance(data, (str, os.PathLike)):
        return read_calibration(str(data), loaded, batch_size=batch_size, max_length=max_length, force=force)
    sentences = [str(x).strip() for x in data if str(x).strip()]
    if not sentences:
        raise SurgeonError("calibration data is empty")
    return text_batches(sentences, loaded, batch_size, max_length, "the calibration sentences", force)


def _media_of(model: Any) -> Any:
    """What reads a calibration directory for ``model`` (see ``calibration_batches``): a loaded model
    (a model directory is loaded), or a module with its ``name_or_path`` directory."""
    if model is None:
        raise SurgeonError("a calibration directory needs the model: give its Hugging Face model directory")
    if isinstance(model, (str, os.PathLike)):
        from ..loaders import load_model

        return load_model(model)
    return model


def _tokenizer_of(model: Any) -> Any:
    """Something with ``text_inputs`` for ``model`` (see ``calibration_batches``)."""
    if model is None:
        raise SurgeonError("sentences need a tokenizer: give the Hugging Face model directory (or its tokenizer)")
    if hasattr(model, "text_inputs") and hasattr(model, "is_text"):
        if not model.is_text:
            raise SurgeonError(f"model '{model.source}' has no tokenizer: sentences need a Hugging Face text model")
        return model
    if isinstance(model, (str, os.PathLike)):
        from ..loaders import load_model

        return _text_model(load_model(model))
    if isinstance(model, nn.Module):
        path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
        if not path or not Path(str(path)).is_dir():
            raise SurgeonError(f"cannot find the tokenizer of this {type(model).__name__}: give its model directory "
                               "or tokenizer to surgeon.calibration_batches")
        try:
            import transformers

            tok = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure is the same user error
            raise SurgeonError(f"cannot load the tokenizer of '{path}': {first_line(exc)}") from None
        return Tokenized(tok, model)
    if callable(model):
        return Tokenized(model, None)  # a tokenizer
    raise SurgeonError(f"cannot tokenize with a {type(model).__name__}: give a model directory or a tokenizer")


def _text_model(loaded: Any) -> Any:
    if not loaded.is_text:
        raise SurgeonError(f"model '{loaded.source}' has no tokenizer: sentences need a Hugging Face text model")
    return loaded
