"""The three modules an encoder-decoder is exported as (Hugging Face Optimum's layout and names):

* :class:`EncoderPart` — ``encoder_model.onnx``: ``(input_ids [B, S], attention_mask [B, S]) →
  last_hidden_state [B, S, D]``;
* :class:`DecoderFirst` — ``decoder_model.onnx``, the first step: ``(input_ids [B, T],
  encoder_hidden_states [B, S, D], encoder_attention_mask [B, S]) → (logits [B, T, V],
  present.<i>.decoder.key / .value [B, H, T, Dh], present.<i>.encoder.key / .value [B, H, S, Dh])``;
* :class:`DecoderWithPast` — ``decoder_with_past_model.onnx``, later steps: ``(input_ids [B, T],
  encoder_attention_mask [B, S], past_key_values.<i>.decoder.key / .value [B, H, P, Dh],
  past_key_values.<i>.encoder.key / .value [B, H, S, Dh]) → (logits, present.<i>.decoder.key / .value
  [B, H, P+T, Dh])`` — the cross-attention keys/values are computed once, by the first step.

Each wraps the Hugging Face ``…ForConditionalGeneration`` model itself (``model.get_encoder()`` and the
model's forward with ``encoder_outputs`` and an ``EncoderDecoderCache``), so the files compute what
``model.generate`` computes.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

__all__ = ["DecoderFirst", "DecoderWithPast", "EncoderPart", "decoder_input_names", "decoder_output_names",
           "past_names"]


def past_names(layers: int, prefix: str, parts: tuple[str, ...] = ("decoder", "encoder")) -> list[str]:
    """``{prefix}.{i}.{part}.key / .value`` for every layer (Optimum's seq2seq cache names)."""
    return [f"{prefix}.{i}.{part}.{kv}" for i in range(layers) for part in parts for kv in ("key", "value")]


def decoder_input_names(layers: int, with_past: bool) -> list[str]:
    """The inputs of ``decoder_model.onnx`` / ``decoder_with_past_model.onnx``."""
    if with_past:
        return ["input_ids", "encoder_attention_mask", *past_names(layers, "past_key_values")]
    return ["input_ids", "encoder_hidden_states", "encoder_attention_mask"]


def decoder_output_names(layers: int, with_past: bool) -> list[str]:
    """The outputs: the first step gives both caches, later steps the self-attention one only."""
    return ["logits", *past_names(layers, "present", ("decoder",) if with_past else ("decoder", "encoder"))]


def _cache_kw(model: nn.Module) -> str:
    # transformers 5.24 renames the forward's past_key_values to cache (the old name warns)
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class PastLayer(DynamicLayer):
        """A cache layer holding given past keys/values. The new keys/values are reshaped to the past's
        head count before they are appended: the attention's ``view(b, t, -1, d)`` leaves the head count
        symbolic after capture, and the exporter's attention lowering refuses keys whose head count it
        cannot prove equal to the queries'."""

        def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
            super().__init__()
            self.keys, self.values = keys, values
            self.k, self.v = keys, values  # typed copies (DynamicLayer's may be None)
            self.heads = int(keys.shape[1])
            self.is_initialized = True
            self.dtype, self.device = keys.dtype, keys.device

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            def fix(t: torch.Tensor) -> torch.Tensor:
                return t.reshape(t.shape[0], self.heads, t.shape[2], t.shape[3])

            keys, values = torch.cat([self.k, fix(key_states)], dim=-2), torch.cat([self.v, fix(value_states)], dim=-2)
            self.k, self.v = keys, values
            self.keys, self.values = keys, values
            return keys, values

        def get_seq_length(self) -> int:
            return self.k.shape[-2]  # no int(): a SymInt keeps the past length dynamic when captured

    return PastLayer


def _cache(self_kv: list[torch.Tensor], cross_kv: list[torch.Tensor], layers: int) -> Any:
    from transformers import DynamicCache, EncoderDecoderCache

    def dynamic(kv: list[torch.Tensor]) -> Any:
        cache = DynamicCache()
        if kv:
            cls = _layer_class()
            cache.layers = [cls(kv[2 * i], kv[2 * i + 1]) for i in range(layers)]
            cache.layer_class_to_replicate = None
        return cache

    cache = EncoderDecoderCache(dynamic(self_kv), dynamic(cross_kv))
    if cross_kv:  # the cross-attention keys/values are given: no layer recomputes them
        cache.is_updated = {i: True for i in range(layers)}
    return cache


class EncoderPart(nn.Module):
    """The encoder stack alone (``model.get_encoder()``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.encoder = model.get_encoder()  # type: ignore[operator]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class DecoderFirst(nn.Module):
    """The decoder's first step: no past; returns both caches (see the module docstring)."""

    def __init__(self, model: nn.Module, layers: int) -> None:
        super().__init__()
        self.model = model
        self.layers = layers
        self._kw = _cache_kw(model)

    def forward(self, input_ids: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = _cache([], [], self.layers)
        out = self.model(attention_mask=encoder_attention_mask, decoder_input_ids=input_ids,
                         encoder_outputs=(encoder_hidden_states,), use_cache=True, **{self._kw: cache})
        present: list[torch.Tensor] = []
        for s, c in zip(cache.self_attention_cache.layers, cache.cross_attention_cache.layers):
            present += [s.keys, s.values, c.keys, c.values]
        return (out.logits, *present)


class DecoderWithPast(nn.Module):
    """A later decoder step: the past self- and cross-attention keys/values given; returns the
    self-attention cache grown by the new tokens."""

    def __init__(self, model: nn.Module, layers: int) -> None:
        super().__init__()
        self.model = model
        self.layers = layers
        self._kw = _cache_kw(model)
        config: Any = model.config
        self.hidden_size = int(config.d_model)

    def forward(self, input_ids: torch.Tensor, encoder_attention_mask: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self_kv = [t for i in range(self.layers) for t in past[4 * i:4 * i + 2]]
        cross_kv = [t for i in range(self.layers) for t in past[4 * i + 2:4 * i + 4]]
        cache = _cache(self_kv, cross_kv, self.layers)
        # the encoder's output is not read (the cross keys/values are cached), only its shape (masks)
        hidden = past[2].new_zeros(input_ids.shape[0], encoder_attention_mask.shape[1], self.hidden_size)
        out = self.model(attention_mask=encoder_attention_mask, decoder_input_ids=input_ids,
                         encoder_outputs=(hidden,), use_cache=True, **{self._kw: cache})
        present: list[torch.Tensor] = []
        for s in cache.self_attention_cache.layers:
            present += [s.keys, s.values]
        return (out.logits, *present)
