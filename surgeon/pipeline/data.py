"""Stage 2 of ``optimize``: the calibration batches, materialised, validated and split.

``prepare_batches`` checks every batch before any work (non-empty, finite, same structure, dtype and
rank as the example inputs, accepted by the captured graph); ``split_batches`` makes the seeded
fit/check split (the check part is never used to fit); ``read_calibration`` reads ``--calib FILE``
(``read_media_dir`` a directory of images or audio files).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..errors import SurgeonError, first_line
from ..inputs import Inputs, batch_size, call, named_inputs

__all__ = ["AUDIO_SUFFIXES", "DEFAULT_CHECK_FRACTION", "IMAGE_SUFFIXES", "TEXT_BATCH", "TEXT_MAX_LENGTH", "MediaModel",
           "Split", "calibration_batches", "media_model", "prepare_batches", "read_batches", "read_calibration",
           "read_media_dir", "split_batches"]

DEFAULT_CHECK_FRACTION = 0.25
MIN_CHECK_SAMPLES = 64  # the check part grows to this many samples where the data allows (split_batches)
TEXT_BATCH = 8  # sentences per calibration batch for text models
TEXT_MAX_LENGTH = 128


def _normalise(batch: Any, example: Inputs) -> Inputs:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, list):
        return tuple(batch)
    if isinstance(batch, Mapping) and not isinstance(batch, dict):
        return dict(batch)  # e.g. a tokenizer's BatchEncoding
    return batch


def _mismatch(batch: Any, example: Inputs) -> str | None:
    """Why ``batch`` cannot stand in for ``example`` (structure, dtype, rank), or None."""
    if not isinstance(batch, (tuple, dict)):
        return f"expected a tuple or dict of inputs, got {type(batch).__name__}"
    if isinstance(example, dict) != isinstance(batch, dict):
        want = f"keyword inputs ({', '.join(example)})" if isinstance(example, dict) else f"a tuple of {len(example)} input(s)"
        got = f"keyword inputs ({', '.join(batch)})" if isinstance(batch, dict) else f"a tuple of {len(batch)} input(s)"
        return f"expected {want}, got {got}"
    if isinstance(example, dict) and set(example) != set(batch):
        return f"expected inputs {', '.join(example)}, got {', '.join(map(str, batch)) or 'none'}"
    if isinstance(example, tuple) and len(example) != len(batch):
        return f"expected {len(example)} input(s), got {len(batch)}"
    ex = dict(named_inputs(example))
    for name, value in named_inputs(batch):
        want = ex[name]
        if isinstance(want, torch.Tensor):
            if not isinstance(value, torch.Tensor):
                return f"input '{name}' is a {type(value).__name__}, expected a tensor"
            if value.dtype != want.dtype:
                return (f"input '{name}' has dtype {str(value.dtype).replace('torch.', '')}, expected "
                        f"{str(want.dtype).replace('torch.', '')}")
            if value.dim() != want.dim():
                return f"input '{name}' has {value.dim()} dimension(s), expected {want.dim()}"
        elif type(value) is not type(want) and not (want is None and value is None):
            return f"input '{name}' is a {type(value).__name__}, expected {type(want).__name__}"
    return None


def _signature(batch: Inputs) -> tuple:
    return tuple((n, tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else (n, repr(v)) for n, v in named_inputs(batch))


def prepare_batches(calib: Iterable[Any] | None, example_inputs: Inputs, gm0: nn.Module) -> tuple[list[Inputs], bool]:
    """Materialise and validate the calibration batches: ``(batches, weak)``.

    ``calib=None`` → the example inputs as the only batch (``weak=True``). Batches are numbered from 1
    in messages. Each distinct shape signature is run once through ``gm0`` (the captured graph's shape
    guards are what decide whether the model accepts it). Under a process group each rank runs only
    the batches of its share and the ranks agree on the first bad batch (``surgeon.distributed``)."""
    from .. import distributed

    error: SurgeonError | None = None
    prepared: tuple[list[Inputs], bool] = ([], False)
    try:
        prepared = _prepare_batches(calib, example_inputs, gm0, distributed.rank(), distributed.world_size())
    except SurgeonError as exc:
        error = exc
    distributed.agree(error, "checking the calibration batches", getattr(error, "batch", 0))
    return prepared


def read_batches(calib: Iterable[Any]) -> list[Any]:
    """``calib`` as a list (read once: a generator feeds both the memory estimate and the run), or one
    line saying what a calibration argument is. A tensor, a dict or a tuple of tensors is a single
    batch, not batches: iterating it would split its rows (or keys) into "batches"."""
    if isinstance(calib, (torch.Tensor, dict)) or (isinstance(calib, tuple) and calib and isinstance(calib[0], torch.Tensor)):
        raise SurgeonError("calib must be an iterable of input tuples (or dicts), one per batch — "
                           "wrap a single batch in a list")
    if isinstance(calib, list):
        return calib
    try:
        return list(calib)
    except TypeError as exc:  # not iterable (a number, a model); an error inside a user's generator propagates
        if not isinstance(calib, Iterable):
            raise SurgeonError("calib must be an iterable of input tuples (or dicts), one per batch, got "
                               f"{type(calib).__name__}") from exc
        raise


def _prepare_batches(calib: Iterable[Any] | None, example_inputs: Inputs, gm0: nn.Module, rank: int,
                     world: int) -> tuple[list[Inputs], bool]:
    example = _normalise(example_inputs, example_inputs)
    if calib is None:
        return [example], True
    calib = read_batches(calib)
    batches = [_normalise(b, example) for b in calib]
    if not batches:
        raise SurgeonError("calibration data is empty")
    seen: set[tuple] = set()
    for i, batch in enumerate(batches, 1):
        why = _mismatch(batch, example)
        if why:
            raise _at(i, SurgeonError(f"calibration batch {i} does not match the model's inputs: {why}"))
        for name, value in named_inputs(batch):
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise _at(i, SurgeonError(f"calibration data contains NaN/Inf (batch {i}, input '{name}')"))
        sig = _signature(batch)
        if sig in seen or (i - 1) % world != rank:  # another rank runs this one
            continue
        try:
            with torch.no_grad():
                call(gm0, batch)
        except SurgeonError as exc:
            raise _at(i, exc) from None
        except Exception as exc:  # noqa: BLE001 - any failure here means the model refuses the batch
            raise _at(i, SurgeonError(f"calibration batch {i} does not match the model's inputs: "
                                      f"{first_line(exc)}")) from exc
        seen.add(sig)
    return batches, False


def _at(batch: int, exc: SurgeonError) -> SurgeonError:
    exc.batch = batch  # type: ignore[attr-defined]  # which error ranks agree on: the first bad batch
    return exc


@dataclass
class Split:
    """Fit and check batches (indices into the materialised calibration batches, 0-based)."""

    fit: list[Inputs]
    check: list[Inputs]
    fit_index: list[int]
    check_index: list[int]
    independent: bool  # False when a single batch serves as both


def split_batches(batches: Sequence[Inputs], check_fraction: float = DEFAULT_CHECK_FRACTION, seed: int = 0,
                  min_check_samples: int = MIN_CHECK_SAMPLES) -> Split:
    """Seeded split: ``round(n·check_fraction)`` check batches, at least one of each when n ≥ 2, and
    more check batches until they hold ``min_check_samples`` samples, but never more than half of
    the batches (the fit part calibrates): a check set of a dozen samples says little about the data
    the model will see (docs/report.md, "the check set")."""
    n = len(batches)
    if not 0.0 < check_fraction < 1.0:
        raise SurgeonError(f"check fraction must be in (0, 1), got {check_fraction}")
    if n == 1:
        return Split([batches[0]], [batches[0]], [0], [0], False)
    n_check = min(max(1, round(n * check_fraction)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    sizes = [batch_size(batches[i]) if isinstance(batches[i], (tuple, list, dict, torch.Tensor)) else 1 for i in perm]
    while n_check < n // 2 and sum(sizes[:n_check]) < min_check_samples:
        n_check += 1
    check_index = sorted(perm[:n_check])
    fit_index = sorted(perm[n_check:])
    return Split([batches[i] for i in fit_index], [batches[i] for i in check_index], fit_index, check_index, True)


def read_calibration(path: str, loaded: Any, *, batch_size: int = TEXT_BATCH,
                     max_length: int = TEXT_MAX_LENGTH, force: bool = False) -> list[Inputs]:
    """Calibration batches from ``--calib FILE``: sentences (text models), a ``.pt`` list of inputs, or
    a directory of images (vision models) or audio files (audio models) run through the model
    directory's processor (``read_media_dir``). Sentences that do not fit the model
    (``_text_batches``) are refused unless ``force``."""
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
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SurgeonError(f"cannot read calibration file '{path}': not UTF-8 text") from None
    except OSError as exc:
        raise SurgeonError(f"cannot read calibration file '{path}': {exc.strerror or exc}") from None
    sentences = [line.strip() for line in text.splitlines() if line.strip()]
    if not sentences:
        raise SurgeonError(f"calibration file '{path}' is empty")
    return _text_batches(sentences, loaded, batch_size, max_length, f"calibration file '{path}'", force)


class CalibrationBatches(list):
    """Calibration batches tokenized from text, with what the text was like (``text_stats``) and the
    warnings it earned (``notes``): both go to the report's ``calibration``."""

    text_stats: dict[str, Any]
    notes: list[str]


#: Text that does not fit the model is refused (``--force-calib`` overrides); thin text is warned about.
UNKNOWN_REFUSE = 0.05  # share of the content tokens the tokenizer does not know
UNKNOWN_WARN = 0.01
SHORT_REFUSE = 4  # median content tokens per sentence
DISTINCT_REFUSE = 0.5  # distinct sentences / sentences
THIN_WARN = 2 * MIN_CHECK_SAMPLES  # fewer sentences than this leave a check set under MIN_CHECK_SAMPLES


def text_stats(sentences: Sequence[str], batches: Sequence[Mapping[str, Any]], tokenizer: Any,
               max_length: int) -> dict[str, Any]:
    """What tokenized text is like for the model: sentences and distinct ones, content tokens (special
    tokens and padding left out), the share the tokenizer does not know (``unknown_rate``; None for a
    tokenizer without an unknown token, e.g. byte-level BPE), the padding share of the batches, the
    content length per sentence and how many were cut at ``max_length``."""
    unk = getattr(tokenizer, "unk_token_id", None)
    special = torch.tensor(sorted(set(getattr(tokenizer, "all_special_ids", []) or [])), dtype=torch.long)
    lengths: list[int] = []
    unknown = positions = real = truncated = 0
    for b in batches:
        ids = b["input_ids"]
        mask = b.get("attention_mask")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        content = mask & ~torch.isin(ids, special) if special.numel() else mask
        if unk is not None:
            content = content | (mask & (ids == unk))  # [UNK] is itself a special token: count it as content
            unknown += int((content & (ids == unk)).sum())
        lengths += content.sum(1).tolist()
        truncated += int((mask.sum(1) >= max_length).sum())
        positions += ids.numel()
        real += int(mask.sum())
    tokens = sum(lengths)
    ordered = sorted(lengths)
    return {"sentences": len(sentences), "distinct": len(set(sentences)), "content_tokens": tokens,
            "unknown_tokens": unknown if unk is not None else None,
            "unknown_rate": (unknown / tokens if tokens else 0.0) if unk is not None else None,
            "unknown_token": getattr(tokenizer, "unk_token", None),
            "padding_share": 1.0 - real / positions if positions else 0.0,
            "length_tokens": {"min": ordered[0], "median": ordered[len(ordered) // 2], "mean": tokens / len(ordered),
                              "max": ordered[-1]} if ordered else {},
            "truncated": truncated, "max_length": max_length}


def _text_batches(sentences: list[str], loaded: Any, batch_size: int, max_length: int, what: str,
                  force: bool) -> CalibrationBatches:
    """Tokenize ``sentences`` in batches and judge whether they fit the model (``text_stats``): a one-line
    refusal where they do not (unless ``force``), warnings in ``notes`` where they are thin."""
    out = CalibrationBatches(loaded.text_inputs(sentences[i:i + batch_size], max_length=max_length)
                             for i in range(0, len(sentences), batch_size))
    stats = text_stats(sentences, out, loaded.tokenizer, max_length)
    out.text_stats, out.notes = stats, []
    refusals: list[str] = []
    rate = stats["unknown_rate"]
    if rate is not None and rate > UNKNOWN_REFUSE:
        refusals.append(f"{100 * rate:.1f} % of its tokens are unknown to the model's tokenizer "
                        f"({stats['unknown_token']}): it is not in the model's language or script")
    elif rate is not None and rate > UNKNOWN_WARN:
        out.notes.append(f"{100 * rate:.1f} % of the calibration tokens are unknown to the tokenizer "
                         f"({stats['unknown_token']})")
    if stats["distinct"] < max(2, DISTINCT_REFUSE * stats["sentences"]) and stats["sentences"] > 1:
        refusals.append(f"only {stats['distinct']} distinct of its {stats['sentences']} lines")
    median = stats["length_tokens"].get("median", 0)
    if median < SHORT_REFUSE:
        refusals.append(f"its median line has {median} token(s), far below a sentence the model would serve")
    if refusals and not force:
        raise SurgeonError(f"{what} does not fit the model: {'; '.join(refusals)} (--force-calib uses it anyway)")
    out.notes += [f"calibration used although {r} (--force-calib)" for r in refusals]
    if stats["sentences"] < THIN_WARN:
        out.notes.append(f"the calibration text has {stats['sentences']} sentences: fewer than {THIN_WARN} leave a "
                         f"check set under {MIN_CHECK_SAMPLES} samples")
    return out



class _Tokenized:
    """What ``read_calibration`` needs of a loaded model, for a bare tokenizer (+ optional model)."""

    def __init__(self, tokenizer: Any, model: nn.Module | None) -> None:
        self.tokenizer, self.model = tokenizer, model
        self.is_text = True

    def text_inputs(self, sentences: list[str], max_length: int = TEXT_MAX_LENGTH) -> dict:
        from ..loaders.common import tokenize

        return tokenize(self.model, self.tokenizer, list(sentences), max_length) if self.model is not None else \
            dict(self.tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt"))


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
    return _text_batches(sentences, loaded, batch_size, max_length, "the calibration sentences", force)


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
        return _Tokenized(tok, model)
    if callable(model):
        return _Tokenized(model, None)  # a tokenizer
    raise SurgeonError(f"cannot tokenize with a {type(model).__name__}: give a model directory or a tokenizer")


def _text_model(loaded: Any) -> Any:
    if not loaded.is_text:
        raise SurgeonError(f"model '{loaded.source}' has no tokenizer: sentences need a Hugging Face text model")
    return loaded


# ------------------------------------------------------------------------------------------------
# --calib DIR: images (vision models) or audio files (audio models) through the model's processor
# ------------------------------------------------------------------------------------------------
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
AUDIO_SUFFIXES = (".wav", ".flac")
_SHOWN = 3  # other files a "no image files" refusal names


@dataclass(frozen=True)
class MediaModel:
    """What reading a directory of images or audio needs of a model: its Hugging Face directory (where
    the processor's ``preprocessor_config.json`` is; None when it did not come from one), the inputs
    a batch may hold, and how it is named in messages."""

    directory: Path | None
    inputs: frozenset[str]
    source: str

    @property
    def modality(self) -> str | None:
        """``"image"`` (takes ``pixel_values``), ``"audio"`` (``input_values``) or None."""
        if "pixel_values" in self.inputs:
            return "image"
        if "input_values" in self.inputs:
            return "audio"
        return None


def media_model(model: Any) -> MediaModel | None:
    """``model`` (a ``LoadedModel``, a Hugging Face ``nn.Module`` or a model directory) as a
    ``MediaModel``, or None when it is none of these. A loaded model's batches hold the keys of its
    example inputs (what the captured graph takes); a bare module's, the keys its forward takes."""
    from ..inputs import forward_params

    if hasattr(model, "example_inputs") and hasattr(model, "source"):  # a LoadedModel
        ex = model.example_inputs
        keys = frozenset(ex) if isinstance(ex, dict) else frozenset()
        hf = getattr(model, "kind", None) == "hf" and Path(str(model.source)).is_dir()
        return MediaModel(Path(str(model.source)) if hf else None, keys, str(model.source))
    if isinstance(model, nn.Module):
        path = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
        directory = Path(str(path)) if path and Path(str(path)).is_dir() else None
        return MediaModel(directory, frozenset(forward_params(model) or ()), str(path or type(model).__name__))
    return None


def read_media_dir(path: str, media: MediaModel, *, batch_size: int = TEXT_BATCH) -> list[Inputs]:
    """Calibration batches from a directory of images (``IMAGE_SUFFIXES``, through the model's
    ``AutoImageProcessor``) or audio files (``AUDIO_SUFFIXES``, through its ``AutoFeatureExtractor``,
    padded as it pads), ``batch_size`` files a batch in name order, each a dict of the inputs
    ``media`` takes. Files with other suffixes are skipped; an unreadable file, an empty directory
    and a model without its processor are one-line refusals."""
    kind = media.modality
    suffixes = IMAGE_SUFFIXES if kind == "image" else AUDIO_SUFFIXES
    files = _media_files(Path(path), path, suffixes, kind or "")
    processor = _processor(media, kind or "")
    batches: list[Inputs] = []
    for i in range(0, len(files), batch_size):
        chunk = [Path(path) / f.name for f in files[i:i + batch_size]]
        raw = _image_batch(chunk, processor) if kind == "image" else _audio_batch(chunk, processor)
        batches.append({k: _tensor(v) for k, v in raw.items() if k in media.inputs})
    return batches


def _media_files(p: Path, path: str, suffixes: tuple[str, ...], kind: str) -> list[Path]:
    """The files of ``p`` with one of ``suffixes``, sorted by name, or a one-line refusal."""
    try:
        entries = sorted((f for f in p.iterdir() if not f.name.startswith(".")), key=lambda f: f.name)
    except OSError as exc:
        raise SurgeonError(f"cannot read calibration directory '{path}': {exc.strerror or exc}") from None
    files = [f for f in entries if f.is_file() and f.suffix.lower() in suffixes]
    if not entries:
        raise SurgeonError(f"calibration directory '{path}' is empty")
    if not files:
        others = ", ".join(f.name for f in entries[:_SHOWN]) + (", …" if len(entries) > _SHOWN else "")
        raise SurgeonError(f"calibration directory '{path}' holds no {kind} files ({', '.join(suffixes)}); "
                           f"it holds {others}")
    return files


def _processor(media: MediaModel, kind: str) -> Any:
    """The model directory's image processor or feature extractor, or a one-line refusal: without it
    the files cannot be resized and normalised as the model was trained (guessing the mean and std
    would calibrate on inputs the model never sees)."""
    what = "image processor" if kind == "image" else "feature extractor"
    if media.directory is None:
        raise SurgeonError(f"a calibration directory of {kind} files needs a Hugging Face model directory with its "
                           f"{what} (preprocessor_config.json); '{media.source}' is not one: give a .pt file of "
                           "input batches")
    if not (media.directory / "preprocessor_config.json").is_file():
        raise SurgeonError(f"a calibration directory of {kind} files needs the model's {what}: '{media.source}' has "
                           f"no preprocessor_config.json (save it there with the {what}'s save_pretrained), or give "
                           "a .pt file of input batches")
    from ..loaders.hf import import_transformers, quiet_load_report

    transformers = import_transformers()
    auto = transformers.AutoImageProcessor if kind == "image" else transformers.AutoFeatureExtractor
    try:
        # quiet: without torchvision transformers logs that it falls back to the PIL image processor
        # (the one this reads with), which is not the user's concern
        with quiet_load_report(transformers):
            return auto.from_pretrained(str(media.directory), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001 - any failure is the same user error
        raise SurgeonError(f"cannot load the {what} of '{media.source}': {first_line(exc)}") from None


def _image_batch(files: list[Path], processor: Any) -> Mapping[str, Any]:
    """``files`` read with PIL (as RGB, or greyscale for a one-channel processor) through ``processor``."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:
        raise SurgeonError("a calibration directory of images needs Pillow: pip install 'surgeon[hf]'") from None
    mean = getattr(processor, "image_mean", None)
    mode = "L" if isinstance(mean, (list, tuple)) and len(mean) == 1 else "RGB"  # its normalisation's channels
    images = []
    for f in files:
        try:
            with Image.open(f) as img:
                images.append(img.convert(mode))  # convert() loads the pixels: a truncated file fails here
        except UnidentifiedImageError:
            raise SurgeonError(f"cannot read calibration image '{f}': not an image file PIL can read") from None
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise SurgeonError(f"cannot read calibration image '{f}': {first_line(exc)}") from None
    return _run_processor(processor, files, images=images, return_tensors="np")


def _audio_batch(files: list[Path], extractor: Any) -> Mapping[str, Any]:
    """``files`` read with soundfile (channels averaged to mono) through ``extractor``, padded as it
    pads; a file at another sampling rate is refused (surgeon does not resample)."""
    try:
        import soundfile
    except ImportError:
        raise SurgeonError("a calibration directory of audio files needs soundfile: pip install 'surgeon[hf]'") from None
    rate = int(getattr(extractor, "sampling_rate", 0) or 0)
    waves = []
    for f in files:
        try:
            data, file_rate = soundfile.read(str(f), dtype="float32", always_2d=True)
        except Exception as exc:  # noqa: BLE001 - soundfile raises LibsndfileError, RuntimeError, TypeError
            raise SurgeonError(f"cannot read calibration audio '{f}': {first_line(exc)}") from None
        if rate and file_rate != rate:
            raise SurgeonError(f"calibration audio '{f}' is sampled at {file_rate} Hz; the model's feature extractor "
                               f"takes {rate} Hz: resample the files first (surgeon does not resample)")
        if data.shape[0] == 0:
            raise SurgeonError(f"calibration audio '{f}' holds no samples")
        waves.append(data.mean(axis=1))
    return _run_processor(extractor, files, waves, sampling_rate=rate or None, padding=True, return_tensors="np")


def _run_processor(processor: Any, files: list[Path], *args: Any, **kwargs: Any) -> Mapping[str, Any]:
    """``processor(*args, **kwargs)``; its failure (a file it cannot handle) is one line naming the batch's files."""
    try:
        return processor(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - whatever the processor raises, the files are the user's input
        names = f"'{files[0]}'" + (f" … '{files[-1]}'" if len(files) > 1 else "")
        raise SurgeonError(f"the model's {type(processor).__name__} fails on calibration files {names}: "
                           f"{first_line(exc)}") from None


def _tensor(value: Any) -> Any:
    """A processor's numpy output as a tensor (floating values as float32, as the model computes)."""
    t = torch.as_tensor(value)
    return t.float() if t.is_floating_point() else t
