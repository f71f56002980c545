"""A Hugging Face model directory (``config.json`` + weights + tokenizer), loaded with
``AutoModel.from_pretrained(dir, local_files_only=True, trust_remote_code=False)`` (or the config's
``…EncoderModel`` architecture, e.g. ``T5EncoderModel``, whose checkpoint has no decoder), ``use_cache=False``;
example inputs from the tokenizer (text) or the config (``pixel_values`` of the configured image size)."""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import SurgeonError, first_line
from ..inputs import forward_params
from .common import BATCH, SEED, LoadedModel, max_positions, refuse_text, tokenize

__all__ = ["DEFAULT_TEXT", "OTHER_TEXTS", "LoadedDecoder", "is_hf", "load_hf", "load_hf_causal_lm",
           "refuse_encoder_decoder"]

DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog."
# Second sentence of the example batch; two candidates of different length so one always differs in
# length from the user's sentence (padding, and a mask with zeros, are then part of the example).
OTHER_TEXTS = (
    "Surgeon swaps the standard parts of a network for lighter ones and checks every change on real data.",
    "Lighter parts, same answers.",
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                    "sentencepiece.bpe.model", "tokenizer.model")
_SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
_PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def is_hf(source: str, path: Path) -> bool:
    return path.is_dir()


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


def _load_tokenizer(transformers: Any, path: Path, source: str, notes: list[str]) -> Any:
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise SurgeonError(f"Hugging Face model directory '{source}' has no tokenizer files (tokenizer.json, "
                           "vocab.txt, ...): a text model needs its tokenizer for example inputs")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                               trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        raise SurgeonError(f"could not load the tokenizer of '{source}': {first_line(exc)}") from exc
    if tokenizer.pad_token is None:
        # Causal LMs (GPT-2) ship without a pad token; any existing token works since the mask hides it.
        fallback = tokenizer.eos_token or tokenizer.unk_token or tokenizer.sep_token
        if fallback is None:
            raise SurgeonError(f"the tokenizer of '{source}' has no pad, eos or unk token to pad a batch with")
        tokenizer.pad_token = fallback
        notes.append(f"tokenizer has no pad token: padding with {fallback!r}")
    return tokenizer


def _example_text(model: nn.Module, tokenizer: Any, text: str) -> dict:
    n = len(tokenizer(text, truncation=True, max_length=max_positions(model, tokenizer, None))["input_ids"])
    other = next(s for s in OTHER_TEXTS
                 if len(tokenizer(s, truncation=True, max_length=max_positions(model, tokenizer, None))["input_ids"]) != n)
    return tokenize(model, tokenizer, [text, other], None)


def _pixel_values(config: Any) -> torch.Tensor | None:
    for cfg in (config, getattr(config, "vision_config", None)):
        size = getattr(cfg, "image_size", None)
        if size is None:
            continue
        h, w = (size, size) if isinstance(size, int) else tuple(size)[-2:]
        channels = getattr(cfg, "num_channels", 3)
        gen = torch.Generator().manual_seed(SEED)
        return torch.randn(BATCH, channels, h, w, generator=gen)
    return None


def load_hf(source: str, path: Path, *, trust_pickle: bool = False, text: str | None = None) -> LoadedModel:
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
            arch = (getattr(config, "architectures", None) or [""])[0]
            encoder_only = getattr(transformers, arch, None) if arch.endswith("EncoderModel") else None
            if encoder_only is not None:
                # T5EncoderModel & co.: AutoModel would build the whole encoder-decoder, with a decoder the
                # weights do not have (initialized at random) and decoder inputs the model never takes.
                model = encoder_only.from_pretrained(str(path), config=config, **kwargs)
                notes.append(f"loaded as {arch} (its config's architecture: an encoder without the decoder)")
            else:
                model = transformers.AutoModel.from_pretrained(str(path), config=config, **kwargs)
    except SurgeonError:
        raise
    except Exception as exc:  # noqa: BLE001
        hint = ""
        if '"auto_map"' in (path / "config.json").read_text(errors="replace"):
            hint = " (the model needs its own code, and surgeon never uses trust_remote_code: " \
                   "load it in a package.module:factory instead)"
        raise SurgeonError(f"could not load Hugging Face model from '{source}': {first_line(exc)}{hint}") from exc
    model.eval()
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes - {torch.float32}:
        # Calibration statistics and error measurements are taken against an fp32 reference.
        model.float()
        notes.append(f"weights converted from {', '.join(sorted(str(d) for d in dtypes))} to float32")

    params = forward_params(model) or set()
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
        refuse_text(text, source, f"a {type(model).__name__} (no input_ids)")
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


# ------------------------------------------------------------------------------------------------
# causal LMs with their cache (the onnx-decoder target); the loader above keeps use_cache=False
# ------------------------------------------------------------------------------------------------
@dataclass
class LoadedDecoder:
    """A causal LM in eval mode (fp32, ``use_cache=True``) with its tokenizer and where it came from."""

    model: nn.Module
    tokenizer: Any
    source: str
    path: Path | None  # the Hugging Face directory (its config and tokenizer files go to OUTDIR)
    notes: list[str] = field(default_factory=list)


def refuse_encoder_decoder(config: Any, source: str) -> None:
    """One line for a model whose cache the decoder capture cannot express: an encoder-decoder."""
    if getattr(config, "is_encoder_decoder", False):
        arch = ", ".join(getattr(config, "architectures", None) or [type(config).__name__])
        raise SurgeonError(f"'{source}' is an encoder-decoder ({arch}): onnx-decoder captures decoder-only causal LMs "
                           "(their self-attention key/value cache); an encoder-decoder's cross-attention cache is "
                           "not expressed")


def load_hf_causal_lm(source: str, path: Path) -> LoadedDecoder:
    """``AutoModelForCausalLM.from_pretrained(dir, local_files_only=True)`` with ``use_cache=True`` and
    its tokenizer; an encoder-decoder or a directory without a causal-LM head is refused in one line."""
    if not (path / "config.json").is_file():
        raise SurgeonError(f"directory '{source}' is not a Hugging Face model directory: no config.json")
    weights = _hf_weights(path, source)
    transformers = _import_transformers()
    notes: list[str] = []
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        raise SurgeonError(f"could not read the config of '{source}': {first_line(exc)}") from exc
    refuse_encoder_decoder(config, source)
    config.use_cache = True
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False, "config": config}
    if weights in _PICKLED_WEIGHTS:
        kwargs["weights_only"] = True
    else:
        kwargs["use_safetensors"] = True
    try:
        with _no_progress_bars(transformers):
            model = transformers.AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise SurgeonError(f"'{source}' ({type(config).__name__}) has no causal-LM head "
                               "(AutoModelForCausalLM does not know it): onnx-decoder needs a decoder LM") from exc
        raise SurgeonError(f"could not load causal LM from '{source}': {first_line(exc)}") from exc
    except Exception as exc:  # noqa: BLE001
        raise SurgeonError(f"could not load causal LM from '{source}': {first_line(exc)}") from exc
    model.eval()
    if any(p.dtype != torch.float32 for p in model.parameters() if p.is_floating_point()):
        model.float()
        notes.append("weights converted to float32")
    tokenizer = _load_tokenizer(transformers, path, source, notes)
    return LoadedDecoder(model, tokenizer, source, path, notes)
