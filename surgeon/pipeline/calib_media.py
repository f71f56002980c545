"""``--calib DIR``: images (vision models) or audio files (audio models) read through the model's processor."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import SurgeonError, first_line
from ..inputs import Inputs
from .calib_text import TEXT_BATCH

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
    from ..loaders.hf_files import import_transformers, quiet_load_report

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
