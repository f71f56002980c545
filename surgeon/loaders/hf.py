"""A Hugging Face model directory (``config.json`` + weights + tokenizer), loaded as the class its config's
``architectures[0]`` names where transformers has it, task heads included (``ViTForImageClassification``,
``BertForSequenceClassification``; a generative head, ``...ForCausalLM`` or ``...ForConditionalGeneration``,
loads as its ``AutoModel`` base), else with ``AutoModel``; ``--task`` (``TASKS``, Optimum's names) picks
another head on purpose. Always ``local_files_only=True, trust_remote_code=False``, ``use_cache=False``. A
weight the class needs that the checkpoint lacks is refused in one line, never initialised at random.
Example inputs from the tokenizer (text) or the config (``pixel_values`` of the configured image size).
A causal LM with its KV cache (the onnx-decoder target) loads through ``load_hf_causal_lm``. Which class
loads is ``hf_heads``; the weights file, tokenizer and a quiet transformers are ``hf_files``."""

from __future__ import annotations

import contextlib
import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import SurgeonError, first_line
from ..inputs import forward_params
from .common import BATCH, SEED, LoadedModel, max_positions, refuse_text, tokenize
from .hf_files import PICKLED_WEIGHTS, hf_weights, import_transformers, load_tokenizer, no_progress_bars, quiet_load_report
from .hf_heads import TASKS, check_task, check_weights, model_class, pooler_optional

__all__ = ["DEFAULT_TEXT", "OTHER_TEXTS", "LoadedDecoder", "example_text", "is_hf", "load_hf", "load_hf_causal_lm",
           "refuse_encoder_decoder"]

DEFAULT_TEXT = "The quick brown fox jumps over the lazy dog."
# Second sentence of the example batch; two candidates of different length so one always differs in
# length from the user's sentence (padding, and a mask with zeros, are then part of the example).
OTHER_TEXTS = (
    "Surgeon swaps the standard parts of a network for lighter ones and checks every change on real data.",
    "Lighter parts, same answers.",
)
_CHOICES = 4  # choices of a multiple-choice model's example inputs (not 2: the batch is 2)


def is_hf(source: str, path: Path) -> bool:
    return path.is_dir()


def example_text(model: nn.Module, tokenizer: Any, text: str) -> dict:
    """The example batch: ``text`` and one of ``OTHER_TEXTS`` of another length, padded."""
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


def _waveform(path: Path) -> torch.Tensor:
    """One second of noise per example at the feature extractor's sampling rate (audio models' ``input_values``)."""
    rate = 16000  # what speech models (wav2vec2, HuBERT) are trained on; the preprocessor's own rate wins
    with contextlib.suppress(OSError, ValueError, TypeError):
        rate = int(json.loads((path / "preprocessor_config.json").read_text()).get("sampling_rate", rate))
    gen = torch.Generator().manual_seed(SEED)
    return torch.randn(BATCH, rate, generator=gen)


def load_hf(source: str, path: Path, *, trust_pickle: bool = False, text: str | None = None,
            task: str | None = None) -> LoadedModel:
    """Load the Hugging Face directory ``path`` as the class its config's architecture names (``task``,
    one of ``TASKS``, picks another head on purpose) and build its example inputs; a weight the class
    needs and the checkpoint lacks (or holds in another shape) is refused in one line, never
    initialised at random."""
    if not (path / "config.json").is_file():
        raise SurgeonError(f"directory '{source}' is not a Hugging Face model directory: no config.json")
    check_task(task)
    weights = hf_weights(path, source)
    transformers = import_transformers()
    notes: list[str] = []
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False,
                              # Mismatched shapes come back in the loading info (and are refused below)
                              # instead of as transformers' multi-line RuntimeError.
                              "ignore_mismatched_sizes": True, "output_loading_info": True}
    if weights in PICKLED_WEIGHTS:
        # pytorch_model.bin is a pickle: load it only with the tensor-only unpickler.
        if "weights_only" in inspect.signature(transformers.PreTrainedModel.from_pretrained).parameters:
            kwargs["weights_only"] = True
        notes.append(f"weights read from {weights} (a pickle) with weights_only=True")
    else:
        kwargs["use_safetensors"] = True
    try:
        with no_progress_bars(transformers), quiet_load_report(transformers):
            config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True,
                                                             trust_remote_code=False)
            if getattr(config, "use_cache", None) is not None:
                # A KV cache output is not a tensor graph export can return; we never decode step by step.
                config.use_cache = False
                notes.append("use_cache=False")
            choice = model_class(transformers, config, task)
            model, info = choice.cls.from_pretrained(str(path), config=config, **kwargs)
            pooler_note = None
            missing = set(info.get("missing_keys") or ())
            if missing and all(k.startswith("pooler.") for k in missing) and pooler_optional(model):
                # A head's checkpoint (ViTForImageClassification, RobertaForTokenClassification) holds its
                # base model without the pooler: built without one, nothing is left at random.
                model, info = choice.cls.from_pretrained(str(path), config=config, add_pooling_layer=False, **kwargs)
                pooler_note = "built without the pooler its checkpoint does not hold (add_pooling_layer=False: " \
                              "no pooler_output)"
    except SurgeonError:
        raise
    except Exception as exc:  # noqa: BLE001
        hint = ""
        if '"auto_map"' in (path / "config.json").read_text(errors="replace"):
            hint = " (the model needs its own code, and surgeon never uses trust_remote_code: " \
                   "load it in a package.module:factory instead)"
        elif task is not None and "Unrecognized configuration class" in str(exc):
            raise SurgeonError(f"--task {task} has no head for '{source}' ({type(config).__name__}): transformers' "
                               f"{TASKS[task]} does not know this model type") from exc
        raise SurgeonError(f"could not load Hugging Face model from '{source}': {first_line(exc)}{hint}") from exc
    notes.append(choice.note.format(loaded=type(model).__name__))
    if pooler_note:
        notes.append(pooler_note)
    check_weights(model, info, source, task, allow_unexpected=choice.drops_head, notes=notes)
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
        tokenizer = load_tokenizer(transformers, path, source, notes)
        inputs.update(example_text(model, tokenizer, DEFAULT_TEXT if text is None else text))
        if getattr(model.config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
            # AutoModel of an encoder-decoder (T5, BART) runs both stacks; teacher-forcing the same ids
            # through the decoder gives it a realistic input of the same shape.
            inputs["decoder_input_ids"] = inputs["input_ids"].clone()
            if "decoder_attention_mask" in params and "attention_mask" in inputs:
                inputs["decoder_attention_mask"] = inputs["attention_mask"].clone()
        if type(model).__name__.endswith("ForMultipleChoice"):
            # (batch, choices, sequence): each sentence of the batch offered as every choice.
            inputs = {k: v.unsqueeze(1).expand(-1, _CHOICES, -1).contiguous() if isinstance(v, torch.Tensor) else v
                      for k, v in inputs.items()}
            notes.append(f"multiple-choice example inputs: each sentence repeated as {_CHOICES} choices")
    elif text is not None:
        refuse_text(text, source, f"a {type(model).__name__} (no input_ids)")
    if "pixel_values" in params:
        pixels = _pixel_values(model.config)
        if pixels is None:
            raise SurgeonError(f"cannot build pixel_values for '{source}': its config has no image_size; "
                               "use package.module:factory")
        inputs["pixel_values"] = pixels
    if not inputs and "input_values" in params:
        inputs["input_values"] = _waveform(path)
        notes.append(f"example input_values: 1 s of noise at {inputs['input_values'].shape[1]} Hz")
    if not inputs:
        raise SurgeonError(f"cannot build example inputs for '{source}' ({type(model).__name__}): its forward "
                           "takes neither input_ids, pixel_values nor input_values; use package.module:factory")
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
    weights = hf_weights(path, source)
    transformers = import_transformers()
    notes: list[str] = []
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        raise SurgeonError(f"could not read the config of '{source}': {first_line(exc)}") from exc
    refuse_encoder_decoder(config, source)
    config.use_cache = True
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False, "config": config}
    if weights in PICKLED_WEIGHTS:
        kwargs["weights_only"] = True
    else:
        kwargs["use_safetensors"] = True
    try:
        with no_progress_bars(transformers):
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
    tokenizer = load_tokenizer(transformers, path, source, notes)
    return LoadedDecoder(model, tokenizer, source, path, notes)
