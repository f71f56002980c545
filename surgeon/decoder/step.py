"""Decoder language models with an explicit key/value cache: the step module that is exported, the
cache formats (fp32, INT8, FP8 e4m3fn) and their calibration.

A :class:`DecoderStep` wraps a Hugging Face causal LM so one call is one step of generation with the
cache as plain tensors, in Hugging Face Optimum's convention::

    (input_ids [B, S], attention_mask [B, P+S], position_ids [B, S],
     past_key_values.<i>.key / .value [B, H_kv, P, D] for every layer i)
        → (logits [B, S, V], present.<i>.key / .value [B, H_kv, P+S, D])

The same module serves prefill (P = 0) and decode (S = 1). With a :class:`CacheFormat` the past and
present tensors are 8-bit codes (``torch.int8`` or ``torch.float8_e4m3fn``) and attention reads
``dequant(codes)`` of the whole concatenated cache, i.e. exactly what was stored: a prompt prefetched
in one step and fed token by token give the same cache and the same logits.

Quantization (match ONNX bit for bit, design §3): INT8 ``q = clamp(round_half_even(x / s), -127, 127)``
with ``s = amax / 127`` (symmetric); FP8 ``q = saturate_cast_e4m3fn(x / s)`` with ``s = amax / 448``;
dequantize ``float(q) · s``. Scales are per layer, per tensor or per kv-head.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import SurgeonError

__all__ = ["CACHE_DTYPES", "CacheFormat", "CacheGeometry", "CacheStats", "DecoderStep", "TorchStepRunner",
           "cache_geometry", "check_standard_cache", "collect_stats", "dequantize_cache", "input_names", "output_names",
           "quantize_cache"]

CACHE_DTYPES: dict[str, torch.dtype] = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
QMAX = {"int8": 127.0, "fp8": 448.0}


def input_names(layers: int) -> list[str]:
    """The step's input names (Optimum's decoder convention)."""
    names = ["input_ids", "attention_mask", "position_ids"]
    for i in range(layers):
        names += [f"past_key_values.{i}.key", f"past_key_values.{i}.value"]
    return names


def output_names(layers: int) -> list[str]:
    """The step's output names (Optimum's decoder convention)."""
    names = ["logits"]
    for i in range(layers):
        names += [f"present.{i}.key", f"present.{i}.value"]
    return names


@dataclass(frozen=True)
class CacheGeometry:
    """Shape of one sequence's cache: ``layers`` × (key, value) × [kv_heads, T, head_dim]."""

    layers: int
    kv_heads: int
    head_dim: int
    max_positions: int | None

    def bytes_per_token(self, dtype: str | None) -> int:
        """Cache bytes one token adds to one sequence, all layers (keys and values)."""
        return 2 * self.layers * self.kv_heads * self.head_dim * (4 if dtype is None else 1)


def check_standard_cache(model: nn.Module, source: str) -> CacheGeometry:
    """Run two tokens through ``model`` with ``use_cache=True`` and check the cache it builds is the
    standard one the capture expresses (a ``DynamicCache`` of plain ``DynamicLayer`` key/value
    tensors); return its geometry. Anything else (sliding-window layers, linear-attention / state-space
    caches, an encoder-decoder cache) is refused in one line naming the cache type."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    ids = torch.zeros(1, 2, dtype=torch.long)
    try:
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True)
    except Exception as exc:  # noqa: BLE001 - any failure here is the model's, named in one line
        from ..errors import first_line

        raise SurgeonError(f"the causal LM of '{source}' fails on a two-token input: {first_line(exc)}") from exc
    # transformers 5.24 names the output's cache ``cache`` (reading ``past_key_values`` warns)
    cache = out["cache"] if "cache" in out else getattr(out, "past_key_values", None)
    if cache is None:
        raise SurgeonError(f"'{source}' ({type(model).__name__}) returns no key/value cache with use_cache=True: "
                           "onnx-decoder needs one")
    layers = list(getattr(cache, "layers", []) or [])
    odd = sorted({type(layer).__name__ for layer in layers if type(layer) is not DynamicLayer})
    if type(cache) is not DynamicCache or odd or not layers:
        what = type(cache).__name__ + (f" with {', '.join(odd)} layers" if odd else "")
        raise SurgeonError(f"the cache of '{source}' ({type(model).__name__}) is a {what}: onnx-decoder captures only "
                           "the standard key/value cache (a DynamicCache of DynamicLayer tensors)")
    k = layers[0].keys
    config = model.config
    max_pos = next((getattr(config, a) for a in ("max_position_embeddings", "n_positions")
                    if isinstance(getattr(config, a, None), int)), None)
    return CacheGeometry(len(layers), int(k.shape[1]), int(k.shape[3]), max_pos)


def cache_geometry(model: nn.Module) -> CacheGeometry:
    """The geometry of ``model``'s cache (``check_standard_cache`` with no source name)."""
    return check_standard_cache(model, type(model).__name__)


# ------------------------------------------------------------------------------------------------
# cache formats
# ------------------------------------------------------------------------------------------------
def quantize_cache(x: torch.Tensor, scale: torch.Tensor, dtype: str) -> torch.Tensor:
    """8-bit codes of ``x`` (``scale`` broadcasts over [B, H, T, D]). INT8: round half to even, as
    ONNX ``Round`` and ``QuantizeLinear`` do; FP8: clamp first, since the e4m3fn cast would otherwise
    give NaN for |x/s| > 448 (ONNX's saturating Cast clamps the same way)."""
    y = x / scale
    if dtype == "int8":
        return y.round().clamp(-127.0, 127.0).to(torch.int8)
    return y.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)


def dequantize_cache(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``float(q) · scale`` (exact for every code, then one rounding of the product). INT8 goes through
    surgeon's ``dequantize_int8`` op, which the exporter writes as one ``DequantizeLinear`` (per kv-head
    axis 1, or per tensor): the same value, one pass over the cache where ``Cast`` + ``Mul`` take two
    (a Llama decode step at past length 1024, batch 4: 2.95 → 2.43 ms on ORT's CPU provider)."""
    if q.dtype == torch.int8 and (scale.numel() == 1 or scale.numel() == scale.shape[1]):
        from ..quant import dequantize

        flat = scale.reshape(()) if scale.numel() == 1 else scale.reshape(-1)
        return dequantize(q, flat.to(torch.float32), axis=1)
    return q.to(torch.float32) * scale


def _cat_codes(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes of ``concat(a, b)``, their dequantized values ``float(codes) · scale``)."""
    if a.dtype == torch.float8_e4m3fn:
        # ONNX Runtime's CPU Concat has no float8 kernel: concatenate the codes as float32 (every e4m3fn
        # value is exact in float32) and cast back (exact: the values are e4m3fn already). The float32
        # concatenation *is* float(codes), so dequantizing reads it instead of casting the stored codes
        # back again: one float8 → float32 pass over the whole cache per step instead of two.
        codes_f32 = torch.cat([a.to(torch.float32), b.to(torch.float32)], dim=-2)
        return codes_f32.to(torch.float8_e4m3fn), codes_f32 * scale
    codes = torch.cat([a, b], dim=-2)
    return codes, dequantize_cache(codes, scale)


@dataclass
class CacheFormat:
    """An 8-bit cache: ``dtype`` codes with per-layer scales ([L, H] for ``granularity="head"``, [L, 1]
    for ``"tensor"``) and the per-channel key offsets ([L, H, D]; zeros when not centred)."""

    dtype: str  # "int8" | "fp8"
    granularity: str  # "head" | "tensor"
    key_scale: torch.Tensor
    value_scale: torch.Tensor
    key_offset: torch.Tensor

    @property
    def rung(self) -> str:
        return f"{self.dtype}-{self.granularity}"

    def to_json(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "granularity": self.granularity,
                "onnx_elem_type": "int8" if self.dtype == "int8" else "float8e4m3fn",
                "key_scale": self.key_scale.tolist(), "value_scale": self.value_scale.tolist(),
                "key_offset_absmax_per_layer": self.key_offset.abs().amax(dim=(1, 2)).tolist()}


class CacheStats:
    """Bounded running statistics of the fp32 cache on calibration prompts (per layer, kv-head and
    channel: key min / max, value |max|), independent of how many prompts stream through."""

    def __init__(self, geometry: CacheGeometry) -> None:
        shape = (geometry.layers, geometry.kv_heads, geometry.head_dim)
        self.kmin = torch.full(shape, float("inf"))
        self.kmax = torch.full(shape, float("-inf"))
        self.vmax = torch.zeros(shape)
        self.tokens = 0

    def update(self, layer: int, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> None:
        """Add one layer's cache [B, H, T, D] of a batch; ``mask`` [B, T] marks the real tokens."""
        m = mask.bool()[:, None, :, None]
        k = keys.float()
        self.kmin[layer] = torch.minimum(self.kmin[layer], torch.where(m, k, torch.inf).amin(dim=(0, 2)))
        self.kmax[layer] = torch.maximum(self.kmax[layer], torch.where(m, k, -torch.inf).amax(dim=(0, 2)))
        self.vmax[layer] = torch.maximum(self.vmax[layer], torch.where(m, values.float().abs(), 0.0).amax(dim=(0, 2)))
        if layer == 0:
            self.tokens += int(mask.sum())

    def cache_format(self, dtype: str, granularity: str, centre_keys: bool = True) -> CacheFormat:
        """Scales (and key offsets) for ``dtype`` at ``granularity`` from the statistics.

        The key offset ``c`` is the per-channel midrange ``(min + max) / 2``: the offset that makes the
        largest |k − c| (which sets the scale) smallest."""
        if self.tokens == 0:
            raise SurgeonError("no calibration tokens reached the cache: give calibration prompts with text")
        finite = torch.isfinite(self.kmin) & torch.isfinite(self.kmax)
        kmin = torch.where(finite, self.kmin, 0.0)
        kmax = torch.where(finite, self.kmax, 0.0)
        offset = (kmin + kmax) / 2 if centre_keys else torch.zeros_like(kmin)
        kamax = torch.maximum(kmax - offset, offset - kmin).amax(dim=2)  # [L, H]
        vamax = self.vmax.amax(dim=2)
        if granularity == "tensor":
            kamax, vamax = kamax.amax(dim=1, keepdim=True), vamax.amax(dim=1, keepdim=True)
        qmax = QMAX[dtype]
        # an all-zero channel group would give scale 0 (division by zero): any positive scale is exact there
        ks = torch.where(kamax > 0, kamax / qmax, 1.0)
        vs = torch.where(vamax > 0, vamax / qmax, 1.0)
        return CacheFormat(dtype, granularity, ks, vs, offset)


# ------------------------------------------------------------------------------------------------
# the step module
# ------------------------------------------------------------------------------------------------
def _step_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class StepLayer(DynamicLayer):
        """A cache layer initialised from the step's past tensors (fp32, or 8-bit codes with their
        format); ``update`` appends the new keys/values (quantized) and returns what attention reads."""

        def __init__(self, past_k: torch.Tensor, past_v: torch.Tensor, fmt: tuple[Any, ...] | None) -> None:
            super().__init__()
            self.fmt = fmt
            self.codes_k, self.codes_v = past_k, past_v
            self.keys, self.values = self._read(past_k, past_v)
            self.is_initialized = True
            self.dtype, self.device = torch.float32, past_k.device

        def _read(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if self.fmt is None:
                return k, v
            _, ks, vs, _ = self.fmt
            return dequantize_cache(k, ks), dequantize_cache(v, vs)

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            if self.fmt is None:
                self.codes_k = torch.cat([self.codes_k, key_states], dim=-2)
                self.codes_v = torch.cat([self.codes_v, value_states], dim=-2)
            else:
                dtype, ks, vs, kc = self.fmt
                # Keys are stored centred, k − c, and never shifted back: for a query q,
                # q·(k − c) = q·k − q·c, and q·c is the same for every key of that query, so the softmax
                # over keys (shift-invariant per row) is unchanged — exact for softmax attention, which is
                # all the cached keys feed. Values are not centred (P·(v − c) = P·v − c would need an
                # add after attention).
                # attention reads dequant of the whole stored cache: exactly what later steps will read
                self.codes_k, self.keys = _cat_codes(self.codes_k, quantize_cache(key_states - kc, ks, dtype), ks)
                self.codes_v, self.values = _cat_codes(self.codes_v, quantize_cache(value_states, vs, dtype), vs)
                return self.keys, self.values
            self.keys, self.values = self.codes_k, self.codes_v
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.codes_k.shape[-2]  # no int(): a SymInt keeps the past length dynamic when captured

    return StepLayer


class DecoderStep(nn.Module):
    """One generation step of a Hugging Face causal LM with the cache as explicit tensors (see the
    module docstring); ``cache_format=None`` keeps an fp32 cache."""

    key_scale: torch.Tensor  # buffers of an 8-bit cache: [L, 1, H or 1, 1, 1]
    value_scale: torch.Tensor
    key_offset: torch.Tensor  # [L, 1, H, 1, D]

    def __init__(self, lm: nn.Module, geometry: CacheGeometry, cache_format: CacheFormat | None = None) -> None:
        super().__init__()
        self.lm = lm
        self.geometry = geometry
        self.cache_dtype = None if cache_format is None else cache_format.dtype
        self.cache_format = cache_format
        self._layer_cls = _step_layer_class()
        params = inspect.signature(lm.forward).parameters
        # transformers 5.24 renames the forward's past_key_values to cache (the old name warns)
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        if cache_format is not None:
            n, h = geometry.layers, geometry.kv_heads
            self.register_buffer("key_scale", cache_format.key_scale.reshape(n, 1, -1, 1, 1).clone())
            self.register_buffer("value_scale", cache_format.value_scale.reshape(n, 1, -1, 1, 1).clone())
            self.register_buffer("key_offset", cache_format.key_offset.reshape(n, 1, h, 1, -1).clone())

    @property
    def vocab_size(self) -> int:
        lm: Any = self.lm  # a transformers PreTrainedModel
        return int(lm.config.vocab_size)

    @property
    def cache_torch_dtype(self) -> torch.dtype:
        return torch.float32 if self.cache_dtype is None else CACHE_DTYPES[self.cache_dtype]

    def empty_past(self, batch: int) -> list[torch.Tensor]:
        g = self.geometry
        return [torch.zeros(batch, g.kv_heads, 0, g.head_dim, dtype=self.cache_torch_dtype)
                for _ in range(2 * g.layers)]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        layers = []
        for i in range(self.geometry.layers):
            fmt = None if self.cache_dtype is None else (
                self.cache_dtype, self.key_scale[i], self.value_scale[i], self.key_offset[i])
            layers.append(self._layer_cls(past[2 * i], past[2 * i + 1], fmt))
        cache = DynamicCache()
        cache.layers = layers
        cache.layer_class_to_replicate = None
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=True, **{self._cache_kw: cache})
        present: list[torch.Tensor] = []
        for layer in layers:
            present += [layer.codes_k, layer.codes_v]
        return (out.logits, *present)


class TorchStepRunner:
    """The step protocol of ``surgeon.decoder.generate`` (``step(ids, mask, pos, past) → (logits, present)``,
    ``empty_past(batch)``) for a :class:`DecoderStep` run in torch: the torch module of the same decoder
    the ONNX file computes, for the guard and for per-step comparison."""

    def __init__(self, step: DecoderStep) -> None:
        self.module = step.eval()
        self.layers = step.geometry.layers
        self.max_positions = step.geometry.max_positions

    def empty_past(self, batch: int) -> list[torch.Tensor]:
        return self.module.empty_past(batch)

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             past: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
        with torch.no_grad():
            outs = self.module(torch.from_numpy(input_ids), torch.from_numpy(attention_mask),
                               torch.from_numpy(position_ids), *past)
        return outs[0].numpy(), list(outs[1:])

    @staticmethod
    def cache_nbytes(present: Sequence[Any]) -> int:
        return int(sum(t.numel() * t.element_size() for t in present))


def collect_stats(lm: nn.Module, geometry: CacheGeometry, batches: Iterable[dict[str, torch.Tensor]]) -> CacheStats:
    """Stream calibration batches (``input_ids``, ``attention_mask``) through the fp32 LM with its own
    cache and keep :class:`CacheStats` of the cache it builds (post-RoPE keys, as cached)."""
    from transformers import DynamicCache

    stats = CacheStats(geometry)
    params = inspect.signature(lm.forward).parameters
    # only the cache is read: the LM head's logits at one position, not at every one (8 × 512 positions
    # × a 49k vocabulary is 0.8 GB of logits and most of the run's time on a 135M model)
    head = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    for batch in batches:
        mask = batch["attention_mask"]
        pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        with torch.no_grad():
            lm(input_ids=batch["input_ids"], attention_mask=mask, position_ids=pos, use_cache=True, **head,
               **{"cache" if "cache" in params else "past_key_values": cache})
        for i, layer in enumerate(cache.layers):  # DynamicLayer (check_standard_cache refused anything else)
            stats.update(i, layer.keys, layer.values, mask)  # type: ignore[union-attr,arg-type]
    return stats
