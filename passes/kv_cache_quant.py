"""Store a decoder's key/value cache in 8 bits (INT8 or FP8 e4m3fn) with calibrated scales.

Before:  K_t = concat(K_past, k), V_t = concat(V_past, v)   (fp32 past / present tensors)
         o = softmax(q · K_tᵀ · scale + mask) · V_t
After:   K̂_t = concat(K̂_past, Q(k − c; s_K)), V̂_t = concat(V̂_past, Q(v; s_V))   (int8 / float8e4m3fn in the file)
         o = softmax(q · DQ(K̂_t)ᵀ · scale + mask) · DQ(V̂_t)
         INT8: Q(x; s) = clamp(round_half_even(x / s), −127, 127),  s = amax / 127
         FP8:  Q(x; s) = saturate_e4m3fn(x / s),                      s = amax / 448
         DQ(q; s) = float(q) · s;  s per layer and kv-head (granularity=head) or per layer (tensor);
         c = (min + max) / 2 per layer, kv-head and channel of the calibration keys (centre_keys).
Exact identity used: q · (k − c) = q · k − q · c, and q · c is the same for every key of a query, so
the softmax over keys (shift-invariant per row) is unchanged: centring costs nothing and shrinks the
keys' range (RoPE'd keys carry large per-channel offsets). Attention reads DQ of the whole stored
cache, so a prompt prefilled in one step and fed token by token store and read the same codes.
Skipped when: the module is not a decoder step with a standard key/value cache (an fx graph of
another target: the pass declines with that reason); a rung whose held-out perplexity rises more
than the decoder tolerance (default +1 %) or whose greedy next-token agreement with the fp32 cache
falls below it (default 95 %) is rolled back by the guard to the next rung of the profile's
``kv_cache`` ladder (int8-head → fp8-head → keep), and report.json says so with the figures.

The rewrite acts on the decoder step (``surgeon.decoder.step.DecoderStep``: its cache format), not on an
fx graph: the cache is the step's inputs and outputs, which a graph rewrite cannot retype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from torch import fx

from surgeon.decoder.step import CacheStats, DecoderStep
from surgeon.pass_manager import Diagnostic, Pass, PassContext, PassResult
from surgeon.profile import KEEP, Profile

__all__ = ["KVCacheQuant"]

_DTYPES = ("int8", "fp8")
_GRANULARITIES = ("tensor", "head")


@dataclass(frozen=True)
class KVCacheQuant(Pass):
    """Store the decoder's KV cache in INT8 or FP8 e4m3fn with calibrated per-layer scales (onnx-decoder).

    A ``surgeon.pass_manager.CachePass``: the decoder pipeline calls ``rungs`` and ``apply``."""

    name: ClassVar[str] = "kv-cache-quant"
    # contract (tests/test_pass_contract.py): no fx example, it rewrites a decoder step and declines graphs
    examples: ClassVar[tuple[str, ...]] = ()
    example_spec: ClassVar[str] = "kv-cache-quant{dtype=fp8,granularity=tensor}"  # a non-default option
    dtype: Literal["int8", "fp8"] = "int8"  # cache codes: int8 (s = amax/127) or fp8 e4m3fn (s = amax/448)
    granularity: Literal["tensor", "head"] = "head"  # one scale per layer (tensor) or per layer and kv-head
    centre_keys: bool = True  # subtract a calibrated per-channel key offset (exact: softmax is shift-invariant)

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.granularity not in _GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(_GRANULARITIES)}, got {self.granularity!r}")

    @property
    def rung(self) -> str:
        """This pass's own format, as a ladder rung (``int8-head``)."""
        return f"{self.dtype}-{self.granularity}"

    def rungs(self, profile: Profile | None = None) -> tuple[str, ...]:
        """The formats the guard tries, best first: this pass's own, then the profile's ``kv_cache``
        rungs after it (all of them when it is not on the ladder: none), then ``keep`` (fp32 cache)."""
        ladder = tuple(profile.formats("kv_cache")) if profile is not None else (KEEP,)
        after = ladder[ladder.index(self.rung) + 1:] if self.rung in ladder else ()
        return (self.rung, *(r for r in after if r != KEEP), KEEP)

    def apply(self, step: DecoderStep, stats: CacheStats, rung: str) -> DecoderStep:
        """A new step over the same LM whose cache takes ``rung`` (``dtype-granularity``; ``keep``: fp32),
        with scales (and key offsets) from the calibration statistics."""
        if rung == KEEP:
            return DecoderStep(step.lm, step.geometry)
        dtype, _, granularity = rung.partition("-")
        if dtype not in _DTYPES or granularity not in _GRANULARITIES:
            raise ValueError(f"unknown kv_cache rung {rung!r} (expected dtype-granularity, e.g. int8-head)")
        fmt = stats.cache_format(dtype, granularity, centre_keys=self.centre_keys)
        return DecoderStep(step.lm, step.geometry, fmt).eval()

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        """On an fx graph there is no cache to retype: decline, with the reason."""
        reason = ("no decoder key/value cache in this graph: kv-cache-quant rewrites a causal LM's decode step "
                  "(surgeon optimize LM_DIR --target onnx-decoder)")
        return PassResult(gm, False, [Diagnostic(self.name, None, "skipped", reason, "", "kv_cache")])
