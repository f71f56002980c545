"""What every loader shares: the ``LoadedModel`` it returns and the helpers that shape example inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import SurgeonError
from ..inputs import Inputs, forward_params

__all__ = ["BATCH", "SEED", "TOKENIZER_INPUTS", "LoadedModel", "as_inputs", "max_positions", "refuse_text",
           "size_one_notes", "tokenize", "type_names"]

TOKENIZER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
SEED = 0
BATCH = 2


@dataclass
class LoadedModel:
    """A loaded model, example inputs it runs on, and where they came from."""

    model: nn.Module
    example_inputs: Inputs  # tuple (positional) or dict (keyword), see surgeon.inputs
    kind: str  # "pt2" | "hf" | "gguf" | "factory" | "pickle"
    source: str  # the spec as given
    tokenizer: Any = None  # HF tokenizer for text models, else None
    notes: list[str] = field(default_factory=list)  # what loading decided on the user's behalf

    @property
    def is_text(self) -> bool:
        """True for a Hugging Face text model (one that came with a tokenizer)."""
        return self.tokenizer is not None

    def text_inputs(self, sentences: list[str], max_length: int = 128) -> dict:
        """Tokenize ``sentences`` into one padded batch of the keyword inputs the model's forward takes.

        Sentences longer than ``max_length`` tokens (or the model's position limit) are truncated.
        """
        if self.tokenizer is None:
            raise SurgeonError(f"model '{self.source}' has no tokenizer: text inputs need a Hugging Face "
                               "text model directory")
        if isinstance(sentences, str):
            sentences = [sentences]
        if not sentences:
            raise SurgeonError("no sentences to tokenize")
        return tokenize(self.model, self.tokenizer, list(sentences), max_length)


def refuse_text(text: str | None, source: str, what: str) -> None:
    if text is not None:
        raise SurgeonError(f"a sentence (--text) applies only to Hugging Face text models; '{source}' is {what}")


def as_inputs(value: Any) -> Inputs | None:
    """``value`` as Inputs (a lone tensor becomes a 1-tuple, a list a tuple), or None if it cannot be."""
    if isinstance(value, torch.Tensor):
        return (value,)
    if isinstance(value, (tuple, list)):
        return tuple(value)
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return dict(value)
    return None


def type_names(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        inner = ", ".join(type(v).__name__ for v in value[:4]) + (", ..." if len(value) > 4 else "")
        return f"{type(value).__name__} ({inner})"
    return type(value).__name__


def size_one_notes(inputs: Inputs) -> list[str]:
    items = inputs.items() if isinstance(inputs, dict) else ((f"arg{i}", v) for i, v in enumerate(inputs))
    notes = []
    for name, v in items:
        if isinstance(v, torch.Tensor) and 1 in tuple(v.shape):
            notes.append(f"example input {name} has shape {tuple(v.shape)}: torch.export specialises "
                         "dimensions of size 1, so the captured graph will only accept that size there")
    return notes


def max_positions(model: nn.Module, tokenizer: Any, requested: int | None) -> int:
    limits = [n for n in (requested, getattr(getattr(model, "config", None), "max_position_embeddings", None),
                          getattr(tokenizer, "model_max_length", None)) if isinstance(n, int) and n > 0]
    return min(limits) if limits else 512


def tokenize(model: nn.Module, tokenizer: Any, sentences: list[str], max_length: int | None) -> dict:
    batch = tokenizer(sentences, padding=True, truncation=True,
                      max_length=max_positions(model, tokenizer, max_length), return_tensors="pt")
    params = forward_params(model)
    return {k: v for k, v in batch.items()
            if k in TOKENIZER_INPUTS and (params is None or k in params)}

