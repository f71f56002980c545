"""What every Hugging Face loader needs: ``transformers`` imported offline and kept quiet, and a model
directory's weights file and tokenizer."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import SurgeonError, first_line

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
                    "sentencepiece.bpe.model", "tokenizer.model")
_SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def hf_weights(path: Path, source: str) -> str:
    for name in _SAFETENSORS + PICKLED_WEIGHTS:
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
def _while(enter: Callable[[], None], leave: Callable[[], None]) -> Iterator[None]:
    """``enter()`` for the block, ``leave()`` after it, also when it raises."""
    enter()
    try:
        yield
    finally:
        leave()


def no_progress_bars(transformers: Any) -> contextlib.AbstractContextManager[None]:
    """Within the block transformers shows no progress bars (as they were after it)."""
    logging_ = transformers.utils.logging
    enabled = logging_.is_progress_bar_enabled()
    return _while(logging_.disable_progress_bar, logging_.enable_progress_bar if enabled else lambda: None)


def load_tokenizer(transformers: Any, path: Path, source: str, notes: list[str]) -> Any:
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise SurgeonError(f"Hugging Face model directory '{source}' has no tokenizer files (tokenizer.json, "
                           "vocab.txt, ...): a text model needs its tokenizer for example inputs")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                                               trust_remote_code=False)
    except Exception as exc:  # noqa: BLE001
        raise SurgeonError(f"could not load the tokenizer of '{source}': {first_line(exc)}") from exc
    return pad_token(tokenizer, source, notes)


def pad_token(tokenizer: Any, source: str, notes: list[str]) -> Any:
    """``tokenizer`` with a pad token: its own, else its EOS (or UNK, SEP), said in ``notes``."""
    if tokenizer.pad_token is None:
        # Causal LMs (GPT-2) ship without a pad token; any existing token works since the mask hides it.
        fallback = tokenizer.eos_token or tokenizer.unk_token or tokenizer.sep_token
        if fallback is None:
            raise SurgeonError(f"the tokenizer of '{source}' has no pad, eos or unk token to pad a batch with")
        tokenizer.pad_token = fallback
        notes.append(f"tokenizer has no pad token: padding with {fallback!r}")
    return tokenizer


def quiet_load_report(transformers: Any) -> contextlib.AbstractContextManager[None]:
    """Within the block transformers' own load report (and progress output) is silenced."""
    # transformers logs a multi-line load report of missing/unexpected weights; surgeon refuses them
    # in one line of its own (``hf_heads.check_weights``), or says in a note what it dropped on purpose.
    logging_ = transformers.utils.logging
    verbosity = logging_.get_verbosity()
    return _while(logging_.set_verbosity_error, lambda: logging_.set_verbosity(verbosity))
