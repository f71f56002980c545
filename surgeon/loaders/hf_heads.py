"""Which class a Hugging Face directory loads as (its config's architecture, or the head ``--task``
names), and the checkpoint weights that class must hold."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import SurgeonError
from .hf_files import import_transformers

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
_LISTED = 4  # weight names a refusal spells out before "and N more"


def check_task(task: str | None) -> None:
    """Refuse a ``--task`` name that is not one of ``TASKS`` in one line listing the known ones."""
    if task is not None and task not in TASKS:
        raise SurgeonError(f"unknown task '{task}' (known: {', '.join(TASKS)})")


@dataclass(frozen=True)
class Choice:
    cls: Any  # what from_pretrained is called on: a model class or an auto class
    note: str  # what was loaded and why; ``{loaded}`` is the class that came out
    drops_head: bool  # checkpoint weights the class has no place for are dropped on purpose


def _generates(cls: type, arch: str) -> bool:
    can_generate = getattr(cls, "can_generate", None)
    return arch.endswith(_GENERATIVE_SUFFIXES) or bool(callable(can_generate) and can_generate())


def model_class(transformers: Any, config: Any, task: str | None) -> Choice:
    """The class a directory with ``config`` loads as: ``task``'s auto class, else the config's
    architecture where transformers has it (task heads included), else ``AutoModel``."""
    if task is not None:
        return Choice(getattr(transformers, TASKS[task]), f"loaded as {{loaded}} (--task {task}: {TASKS[task]})", True)
    arch = (getattr(config, "architectures", None) or [""])[0] or ""
    cls = getattr(transformers, arch, None) if arch else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        why = f"its config's architecture {arch} is not a transformers model class" if arch \
            else "its config names no architecture"
        return Choice(transformers.AutoModel, f"loaded as {{loaded}} (AutoModel): {why}", False)
    if arch.endswith("EncoderModel"):
        # T5EncoderModel & co.: AutoModel would build the whole encoder-decoder, with a decoder the
        # weights do not have (initialized at random) and decoder inputs the model never takes.
        return Choice(cls, f"loaded as {arch} (its config's architecture: an encoder without the decoder)", False)
    if _generates(cls, arch):
        # optimize and export capture one forward of an encoder-style model; a generative head's
        # logits over the vocabulary at every step are the onnx-decoder target's business.
        return Choice(transformers.AutoModel,
                       f"loaded as {{loaded}} (AutoModel) without the generative head of its config's architecture "
                       f"{arch}: optimize and export take encoder-style models (--target onnx-decoder exports a "
                       "causal LM with its cache; --task picks another head)", True)
    return Choice(cls, f"loaded as {arch} (its config's architecture)", False)


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_LISTED])
    return shown + (f" and {len(keys) - _LISTED} more" if len(keys) > _LISTED else "")


def _shape(size: Any) -> str:
    return "x".join(str(d) for d in size) or "scalar"


def check_weights(model: nn.Module, info: dict, source: str, task: str | None, *, allow_unexpected: bool,
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


def pooler_optional(model: nn.Module) -> bool:
    """Whether ``model`` is a base model whose class can be built without its pooler."""
    return getattr(model, "base_model", None) is model and \
        "add_pooling_layer" in inspect.signature(type(model).__init__).parameters


def refuse_encoder_decoder_optimize(source: str, path: Path, task: str | None = None) -> None:
    """Refuse, in one line and before any weight is read, a directory ``surgeon optimize`` would load as
    an encoder-decoder (BART, T5, Marian, Whisper ``…ForConditionalGeneration``, or its base model).

    Such a model runs both stacks in one forward: its example and calibration inputs need
    ``decoder_input_ids`` (a ``--calib`` text file gives none, so the run failed at reading the data),
    and one file of it is no deployable seq2seq model (that is an encoder file plus
    decoder-with-cache files: ``--target onnx-seq2seq``, which the CLI dispatches before this check).
    ``…EncoderModel`` directories (T5EncoderModel) load as the encoder alone and pass. ``surgeon analyze``
    and the Python API do not call this."""
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
    cls = getattr(transformers, arch, None)
    if getattr(cls, "main_input_name", "input_ids") != "input_ids":  # Whisper: onnx-seq2seq refuses it too
        raise SurgeonError(f"'{source}' is an encoder-decoder ({arch}): this target writes one encoder-style file; "
                           f"export its encoder alone (a factory returning model.get_encoder()); --target onnx-seq2seq "
                           f"takes text encoder-decoders only (its encoder takes {cls.main_input_name})")
    raise SurgeonError(f"'{source}' is an encoder-decoder ({arch}): this target writes one encoder-style file; "
                       f"--target onnx-seq2seq writes encoder + decoder-with-cache files (or export the encoder "
                       f"alone: a T5EncoderModel directory / a factory returning model.get_encoder())")
