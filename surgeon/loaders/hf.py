"""A Hugging Face model directory (``config.json`` + weights + tokenizer), loaded as the class its config's
``architectures[0]`` names where transformers has it, task heads included (``ViTForImageClassification``,
``BertForSequenceClassification``; a generative head, ``...ForCausalLM`` or ``...ForConditionalGeneration``,
loads as its ``AutoModel`` base), else with ``AutoModel``; ``--task`` (``TASKS``, Optimum's names) picks
another head on purpose. Always ``local_files_only=True, trust_remote_code=False``, ``use_cache=False``. A
weight the class needs that the checkpoint lacks is refused in one line, never initialised at random.
Example inputs from the tokenizer (text) or the config (``pixel_values`` of the configured image size)."""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..errors import SurgeonError, first_line
from ..inputs import forward_params
from .common import BATCH, SEED, LoadedModel, max_positions, refuse_text, tokenize

__all__ = ["DEFAULT_TEXT", "OTHER_TEXTS", "TASKS", "LoadedDecoder", "check_task", "import_transformers", "is_hf",
           "load_hf", "load_hf_causal_lm", "quiet_load_report", "refuse_encoder_decoder"]

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


def import_transformers() -> Any:
    """``transformers``, offline (the hub's offline switches set first), or a one-line install hint."""
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


# ------------------------------------------------------------------------------------------------
# which class a directory loads as, and the weights it must hold
# ------------------------------------------------------------------------------------------------
# Optimum's task names → the transformers auto class that builds that head (``--task``).
TASKS: dict[str, str] = {
    "feature-extraction": "AutoModel",
    "fill-mask": "AutoModelForMaskedLM",
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "multiple-choice": "AutoModelForMultipleChoice",
    "image-classification": "AutoModelForImageClassification",
    "audio-classification": "AutoModelForAudioClassification",
    "sentence-similarity": "AutoModel",
}
# Names a generative head's class ends with (besides what ``can_generate()`` says).
_GENERATIVE_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration", "ForSpeechSeq2Seq",
                        "ForVision2Seq")
_CHOICES = 4  # choices of a multiple-choice model's example inputs (not 2: the batch is 2)
_LISTED = 4  # weight names a refusal spells out before "and N more"


def check_task(task: str | None) -> None:
    """Refuse a ``--task`` name that is not one of ``TASKS`` in one line listing the known ones."""
    if task is not None and task not in TASKS:
        raise SurgeonError(f"unknown task '{task}' (known: {', '.join(TASKS)})")


@dataclass(frozen=True)
class _Choice:
    cls: Any  # what from_pretrained is called on: a model class or an auto class
    note: str  # what was loaded and why; ``{loaded}`` is the class that came out
    drops_head: bool  # checkpoint weights the class has no place for are dropped on purpose


def _generates(cls: type, arch: str) -> bool:
    can_generate = getattr(cls, "can_generate", None)
    return arch.endswith(_GENERATIVE_SUFFIXES) or bool(callable(can_generate) and can_generate())


def _model_class(transformers: Any, config: Any, task: str | None) -> _Choice:
    """The class a directory with ``config`` loads as: ``task``'s auto class, else the config's
    architecture where transformers has it (task heads included), else ``AutoModel``."""
    if task is not None:
        return _Choice(getattr(transformers, TASKS[task]), f"loaded as {{loaded}} (--task {task}: {TASKS[task]})", True)
    arch = (getattr(config, "architectures", None) or [""])[0] or ""
    cls = getattr(transformers, arch, None) if arch else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        why = f"its config's architecture {arch} is not a transformers model class" if arch \
            else "its config names no architecture"
        return _Choice(transformers.AutoModel, f"loaded as {{loaded}} (AutoModel): {why}", False)
    if arch.endswith("EncoderModel"):
        # T5EncoderModel & co.: AutoModel would build the whole encoder-decoder, with a decoder the
        # weights do not have (initialized at random) and decoder inputs the model never takes.
        return _Choice(cls, f"loaded as {arch} (its config's architecture: an encoder without the decoder)", False)
    if _generates(cls, arch):
        # optimize and export capture one forward of an encoder-style model; a generative head's
        # logits over the vocabulary at every step are the onnx-decoder target's business.
        return _Choice(transformers.AutoModel,
                       f"loaded as {{loaded}} (AutoModel) without the generative head of its config's architecture "
                       f"{arch}: optimize and export take encoder-style models (--target onnx-decoder exports a "
                       "causal LM with its cache; --task picks another head)", True)
    return _Choice(cls, f"loaded as {arch} (its config's architecture)", False)


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LISTED])
    return shown + (f" and {len(keys) - _LISTED} more" if len(keys) > _LISTED else "")


def _shape(size: Any) -> str:
    return "x".join(str(d) for d in size) or "scalar"


def _check_weights(model: nn.Module, info: dict, source: str, task: str | None, *, allow_unexpected: bool,
                   notes: list[str]) -> None:
    """Refuse, in one line, a loaded model some of whose weights transformers did not take from the
    checkpoint (missing, or of another shape: it initialised them at random), or, unless the head is
    dropped on purpose (``allow_unexpected``), a checkpoint holding weights the class does not use."""
    order = {name: i for i, name in enumerate(model.state_dict())}  # the model's order: weight before bias
    missing = sorted(info.get("missing_keys") or (), key=lambda k: (order.get(k, len(order)), k))
    unexpected = sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda m: (order.get(m[0], len(order)), m[0]))
    cls = type(model).__name__
    if missing or mismatched:
        parts = []
        if missing:
            parts.append(f"missing {_names(missing)}")
        if mismatched:
            parts.append("mismatched " + _names([f"{k} (checkpoint {_shape(a)}, model {_shape(b)})"
                                                 for k, a, b in mismatched]))
        head = getattr(model, "base_model", model) is not model
        fix = "give the full checkpoint" if missing else "make config.json match the checkpoint"
        if not head:
            hint = fix
        elif task is None:
            hint = f"{fix}, or --task feature-extraction to load without the head"
        else:  # the user asked for a head this checkpoint was not trained with
            hint = f"the checkpoint has no {task} head: give one that has, or --task feature-extraction to load " \
                   "without a head"
        raise SurgeonError(f"Hugging Face model directory '{source}' does not hold the weights its class {cls} needs: "
                           f"{'; '.join(parts)} (they would be initialised at random); {hint}")
    if unexpected and not allow_unexpected:
        raise SurgeonError(f"Hugging Face model directory '{source}' holds weights its class {cls} does not use: "
                           f"unexpected {_names(unexpected)} (they would be dropped); name the class that uses them "
                           f"in config.json's architectures, or give --task to drop them on purpose")
    if unexpected:
        why = f"--task {task} drops them" if task is not None else "the generative head is left out"
        notes.append(f"checkpoint weights {cls} does not use: {_names(unexpected)} ({why})")


def _pooler_optional(model: nn.Module) -> bool:
    """Whether ``model`` is a base model whose class can be built without its pooler."""
    return getattr(model, "base_model", None) is model and \
        "add_pooling_layer" in inspect.signature(type(model).__init__).parameters


@contextlib.contextmanager
def quiet_load_report(transformers: Any) -> Iterator[None]:
    """Within the block transformers' own load report (and progress output) is silenced."""
    # transformers logs a multi-line load report of missing/unexpected weights; surgeon refuses them
    # in one line of its own (_check_weights), or says in a note what it dropped on purpose.
    logging_ = transformers.utils.logging
    verbosity = logging_.get_verbosity()
    logging_.set_verbosity_error()
    try:
        yield
    finally:
        logging_.set_verbosity(verbosity)


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
    weights = _hf_weights(path, source)
    transformers = import_transformers()
    notes: list[str] = []
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False,
                              # Mismatched shapes come back in the loading info (and are refused below)
                              # instead of as transformers' multi-line RuntimeError.
                              "ignore_mismatched_sizes": True, "output_loading_info": True}
    if weights in _PICKLED_WEIGHTS:
        # pytorch_model.bin is a pickle: load it only with the tensor-only unpickler.
        if "weights_only" in inspect.signature(transformers.PreTrainedModel.from_pretrained).parameters:
            kwargs["weights_only"] = True
        notes.append(f"weights read from {weights} (a pickle) with weights_only=True")
    else:
        kwargs["use_safetensors"] = True
    try:
        with _no_progress_bars(transformers), quiet_load_report(transformers):
            config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True,
                                                             trust_remote_code=False)
            if getattr(config, "use_cache", None) is not None:
                # A KV cache output is not a tensor graph export can return; we never decode step by step.
                config.use_cache = False
                notes.append("use_cache=False")
            choice = _model_class(transformers, config, task)
            model, info = choice.cls.from_pretrained(str(path), config=config, **kwargs)
            pooler_note = None
            missing = set(info.get("missing_keys") or ())
            if missing and all(k.startswith("pooler.") for k in missing) and _pooler_optional(model):
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
    _check_weights(model, info, source, task, allow_unexpected=choice.drops_head, notes=notes)
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


def refuse_encoder_decoder_optimize(source: str, path: Path, task: str | None = None) -> None:
    """Refuse, in one line and before any weight is read, a directory ``surgeon optimize`` would load as
    an encoder-decoder (BART, T5, Marian, Whisper ``…ForConditionalGeneration``, or its base model).

    Such a model runs both stacks in one forward: its example and calibration inputs need
    ``decoder_input_ids`` (a ``--calib`` text file gives none, so the run failed at reading the data),
    and one file of it is no deployable seq2seq model (that is an encoder file plus a
    decoder-with-cache file, not supported yet). ``…EncoderModel`` directories (T5EncoderModel) load
    as the encoder alone and pass. ``surgeon analyze`` and the Python API do not call this."""
    if not (path.is_dir() and (path / "config.json").is_file()):
        return
    transformers = import_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception:  # noqa: BLE001 - load_hf reports an unreadable config in its own words
        return
    if not getattr(config, "is_encoder_decoder", False):
        return
    arch = (getattr(config, "architectures", None) or [""])[0] or type(config).__name__
    if task is None and arch.endswith("EncoderModel"):
        return
    raise SurgeonError(f"'{source}' is an encoder-decoder ({arch}): surgeon optimize writes one encoder-style file; "
                       f"export its encoder alone (a T5EncoderModel directory / a factory returning "
                       f"model.get_encoder()) — encoder + decoder-with-cache files are not supported yet")


def load_hf_causal_lm(source: str, path: Path) -> LoadedDecoder:
    """``AutoModelForCausalLM.from_pretrained(dir, local_files_only=True)`` with ``use_cache=True`` and
    its tokenizer; an encoder-decoder or a directory without a causal-LM head is refused in one line."""
    if not (path / "config.json").is_file():
        raise SurgeonError(f"directory '{source}' is not a Hugging Face model directory: no config.json")
    weights = _hf_weights(path, source)
    transformers = import_transformers()
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
