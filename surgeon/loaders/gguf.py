"""A GGUF file (llama.cpp's format: ``model.gguf``, or a directory holding one GGUF and no safetensors /
``pytorch_model.bin``), loaded through transformers' GGUF support (``from_pretrained(dir, gguf_file=name)``,
which needs the ``gguf`` and ``accelerate`` packages: ``pip install 'surgeon[gguf]'``).

transformers dequantizes every tensor to dense fp32 (every Linear an ``nn.Linear``) and builds the
tokenizer from the file's metadata, but leaves a GGUF quantizer marker on the model that makes
``save_pretrained`` refuse ("quantized with gguf and is not serializable"); the marker is cleared here,
so the model is an ordinary fp32 transformers model for the rest of the pipeline. The file's own
quantization (Q4_1, Q8_0, ...) is stated in the load notes: accuracy figures of a re-quantized model
are on weights that were already quantized once.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from ..errors import SurgeonError, first_line
from .common import LoadedModel
from .hf import DEFAULT_TEXT, LoadedDecoder, example_text, refuse_encoder_decoder
from .hf_files import PICKLED_WEIGHTS, import_transformers, no_progress_bars, pad_token, quiet_load_report

__all__ = ["gguf_file", "is_gguf", "load_gguf", "load_gguf_causal_lm"]

SUFFIX = ".gguf"
_NEEDS = ("gguf", "accelerate")  # transformers' GGUF reader and its empty-weights model construction
_DENSE = ("F32", "F16", "BF16", "F64")  # tensor types that are not quantized


def _dir_gguf(path: Path) -> list[Path]:
    """The GGUF files of directory ``path`` when it holds no other weights (safetensors win: a Hugging
    Face directory that also ships a GGUF loads as the directory)."""
    if any(path.glob("*.safetensors")) or any((path / name).is_file() for name in PICKLED_WEIGHTS):
        return []
    return sorted(p for p in path.iterdir() if p.suffix.lower() == SUFFIX and p.is_file())


def is_gguf(source: str, path: Path) -> bool:
    if path.is_file():
        return path.suffix.lower() == SUFFIX
    return path.is_dir() and bool(_dir_gguf(path))


def gguf_file(source: str, path: Path) -> Path:
    """The GGUF file ``path`` names: itself, or the only one in its directory (several are refused)."""
    if path.is_file():
        return path
    found = _dir_gguf(path)
    if len(found) != 1:
        raise SurgeonError(f"directory '{source}' holds {len(found)} GGUF files ({', '.join(p.name for p in found)}): "
                           "give the path of the one to load")
    return found[0]


def _weight_types(file: Path, source: str) -> tuple[str, Counter[str]]:
    """The file's architecture and how many tensors it stores in each type (Q4_1, F32, ...), read
    from its header (memory-mapped: no weights are dequantized here), or a one-line refusal."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(file))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode("utf-8")
        types = Counter(t.tensor_type.name for t in reader.tensors)
    except KeyError as exc:
        raise SurgeonError(f"GGUF file '{source}' names no architecture (general.architecture)") from exc
    except Exception as exc:  # noqa: BLE001 - any failure to parse is a corrupt or truncated file
        raise SurgeonError(f"'{source}' is not a readable GGUF file: {first_line(exc)}") from exc
    if not types:
        raise SurgeonError(f"GGUF file '{source}' holds no tensors")
    return arch, types


def _import(source: str) -> Any:
    missing = [name for name in _NEEDS if importlib.util.find_spec(name) is None]
    if missing:
        raise SurgeonError(f"loading the GGUF file '{source}' needs the {' and '.join(missing)} package"
                           f"{'s' if len(missing) > 1 else ''}: pip install 'surgeon[gguf]'")
    return import_transformers()


def _quantization_note(file: Path, types: Counter[str]) -> str:
    quantized = {k: n for k, n in types.items() if k not in _DENSE}
    total = sum(types.values())
    if not quantized:
        return f"read from the GGUF file {file.name}: its weights are not quantized ({', '.join(sorted(types))})"
    listed = ", ".join(f"{k} {n}" for k, n in sorted(quantized.items(), key=lambda kv: -kv[1]))
    return (f"read from the GGUF file {file.name}: its weights were quantized there ({listed} of {total} tensors) and "
            "are dequantized to float32; accuracy figures of a re-quantized model are on weights quantized once before")


def _load(source: str, path: Path, auto_class: str, *, use_cache: bool) -> tuple[Any, Any, Path, list[str]]:
    """``(model, tokenizer, file, notes)``: the model as ``auto_class`` from the GGUF ``path`` names,
    dequantized fp32 with the quantizer marker cleared, and the tokenizer the file's metadata describes."""
    file = gguf_file(source, path)
    transformers = _import(source)
    arch, types = _weight_types(file, source)
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise SurgeonError(f"GGUF file '{source}' holds a '{arch}' model, which transformers' GGUF loader does not "
                           f"read (it reads {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})")
    where = {"gguf_file": file.name, "local_files_only": True, "trust_remote_code": False}
    try:
        # transformers' GGUF reader draws its own tqdm bar (not behind its progress-bar switch) on stderr.
        with no_progress_bars(transformers), quiet_load_report(transformers), contextlib.redirect_stderr(io.StringIO()):
            config = transformers.AutoConfig.from_pretrained(str(file.parent), **where)
            refuse_encoder_decoder(config, source)
            config.use_cache = use_cache
            model = getattr(transformers, auto_class).from_pretrained(str(file.parent), config=config, **where)
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(file.parent), **where)
    except SurgeonError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise SurgeonError(f"could not load the GGUF file '{source}' through transformers: {first_line(exc)}") from exc
    # Every tensor is already dense: the marker only stops save_pretrained (and config.json would
    # claim a quantization the weights no longer have).
    model.hf_quantizer = None
    model.is_quantized = False
    for cfg in (model.config, config):
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
    notes = [_quantization_note(file, types)]
    model.eval()
    if any(p.dtype != torch.float32 for p in model.parameters() if p.is_floating_point()):
        model.float()
        notes.append("weights converted to float32")
    pad_token(tokenizer, source, notes)
    return model, tokenizer, file, notes


def load_gguf_causal_lm(source: str, path: Path) -> LoadedDecoder:
    """The GGUF ``path`` names as ``AutoModelForCausalLM`` with ``use_cache=True`` and its tokenizer,
    for the onnx-decoder target (config and tokenizer files are written from the loaded objects)."""
    model, tokenizer, _, notes = _load(source, path, "AutoModelForCausalLM", use_cache=True)
    return LoadedDecoder(model, tokenizer, source, None, notes)


def load_gguf(source: str, path: Path, *, trust_pickle: bool = False, text: str | None = None) -> LoadedModel:
    """The GGUF ``path`` names as its base model (``AutoModel``, no cache), with example text inputs,
    as ``load_hf`` loads a causal LM's directory: analyze, optimize and export take encoder-style
    forwards; ``--target onnx-decoder`` loads the causal LM through ``load_gguf_causal_lm``."""
    model, tokenizer, _, notes = _load(source, path, "AutoModel", use_cache=False)
    notes.append(f"loaded as {type(model).__name__} (AutoModel) without the generative head: optimize and export take "
                 "encoder-style models (--target onnx-decoder exports the causal LM with its cache)")
    inputs = example_text(model, tokenizer, DEFAULT_TEXT if text is None else text)
    return LoadedModel(model, inputs, "gguf", source, tokenizer=tokenizer, notes=notes)
