"""Loading an encoder-decoder for ``--target onnx-seq2seq``: the directory is checked from its config
and tokenizer first (what cannot be handled is refused in one line before any weight is read), then
the ``…ForConditionalGeneration`` model is loaded in fp32, eval mode, with its weights checked."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import SurgeonError, first_line
from ..loaders.hf_files import PICKLED_WEIGHTS, hf_weights, import_transformers, load_tokenizer, no_progress_bars
from ..loaders.hf_heads import check_weights

__all__ = ["LoadedSeq2Seq", "check_seq2seq_dir", "load_seq2seq"]

_HOW = "--target onnx-seq2seq exports text encoder-decoders (BART, T5, Marian …ForConditionalGeneration)"


@dataclass
class LoadedSeq2Seq:
    """An encoder-decoder with a language-model head (fp32, eval), its tokenizer and where it came from."""

    model: nn.Module
    tokenizer: Any
    source: str
    path: Path
    notes: list[str] = field(default_factory=list)


def check_seq2seq_dir(source: str) -> tuple[Any, Any]:
    """The config and model class of ``source`` if ``onnx-seq2seq`` can handle it; else a one-line
    ``SurgeonError`` naming what is missing. Reads config.json only (no weight, no tokenizer)."""
    path = Path(source)
    if not path.is_dir():
        raise SurgeonError(f"'{source}' is not a directory: {_HOW} from a Hugging Face model directory")
    if not (path / "config.json").is_file():
        raise SurgeonError(f"directory '{source}' is not a Hugging Face model directory: no config.json")
    transformers = import_transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        raise SurgeonError(f"could not read the config of '{source}': {first_line(exc)}") from exc
    arch = (getattr(config, "architectures", None) or [""])[0] or type(config).__name__
    if not getattr(config, "is_encoder_decoder", False):
        raise SurgeonError(f"'{source}' is not an encoder-decoder ({arch}): {_HOW}; a causal LM takes "
                           "--target onnx-decoder, an encoder-only model the module targets (onnx, onnx-int8, …)")
    found = getattr(transformers, arch, None)
    cls: Any = found if isinstance(found, type) and issubclass(found, transformers.PreTrainedModel) else None
    if cls is None or not cls.can_generate():
        raise SurgeonError(f"'{source}' is an encoder-decoder without a generative head ({arch}): {_HOW}, whose "
                           "decoder ends in logits over the vocabulary")
    if cls.main_input_name != "input_ids":
        raise SurgeonError(f"'{source}' is an encoder-decoder whose encoder takes {cls.main_input_name} ({arch}): "
                           f"{_HOW} whose encoder takes input_ids; an audio or image encoder-decoder is not supported "
                           "yet (export its encoder alone: a factory returning model.get_encoder())")
    return config, cls


def load_seq2seq(source: str) -> LoadedSeq2Seq:
    """Check ``source`` (``check_seq2seq_dir``), load its tokenizer, then its weights (fp32, eval)."""
    config, cls = check_seq2seq_dir(source)
    path = Path(source)
    transformers = import_transformers()
    notes: list[str] = []
    tokenizer = load_tokenizer(transformers, path, source, notes)  # before the weights: a refusal costs no load
    weights = hf_weights(path, source)
    kwargs: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False, "config": config,
                              "output_loading_info": True}
    kwargs["weights_only" if weights in PICKLED_WEIGHTS else "use_safetensors"] = True
    try:
        with no_progress_bars(transformers):
            model, info = cls.from_pretrained(str(path), **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise SurgeonError(f"could not load the encoder-decoder from '{source}': {first_line(exc)}") from exc
    check_weights(model, info, source, None, allow_unexpected=False, notes=notes)
    model.float().eval()
    return LoadedSeq2Seq(model, tokenizer, source, path, notes)
