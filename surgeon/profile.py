"""Runtime profiles: what a deployment runtime can run, as data a pass can read.

A :class:`Profile` says, for one runtime on one machine class, which substitute formats each kind of
site may take (best first, always ending in ``"keep"``: leave the site as it is), how the runtime
wants weights laid out and quantized, and what must hold in the graph the runtime actually runs.
It lives in core (not in ``surgeon.targets``) so a pass can consult a target's profile without
importing the exporters; ``surgeon.targets`` attaches one to every registered target.

The built-in profiles are the module constants below (``TORCH``, ``ORT_CPU``, ``ORT_CPU_FP8``,
``ORT_CPU_INT8``); ``surgeon targets`` prints them.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["Profile", "TORCH", "ORT_CPU", "ORT_CPU_DECODER", "ORT_CPU_FP8", "ORT_CPU_INT8", "ORT_CPU_INT8_VNNI", "OPENVINO_CPU_INT8",
           "KEEP"]

KEEP = "keep"  # the last rung of every ladder: the site stays as it is, computing what the original computed


def _freeze_ladders(ladders: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    items = ladders.items() if isinstance(ladders, Mapping) else ladders
    return tuple((str(kind), tuple(str(f) for f in formats)) for kind, formats in items)


@dataclass(frozen=True)
class Profile:
    """What one runtime runs, on one machine class (frozen and hashable)."""

    runtime: str  # the runtime the file runs in: "torch", "onnxruntime-cpu"
    machine: str  # the machine class on which the figures are exact, e.g. "x86-64 (AVX2 or later)"
    # site kind → substitute formats the runtime runs, best first, ending in "keep" (stored as pairs)
    ladders: tuple[tuple[str, tuple[str, ...]], ...] = field(default=())
    weight_layout: str = "native"  # "transposed" = [in, out] as ONNX MatMul wants; "native" = [out, in] as torch stores
    int8_weight_bits: int = 8  # 7 where u8·s8 vpmaddubsw saturates (AVX2), 8 where the kernels are exact (VNNI)
    uint8_activations: bool = False  # int8 activations written as uint8 with zero point + 128 (ORT x86 MLAS)
    fuses_attention: bool = False  # whether the runtime runs attention as one fused kernel
    graph_requirements: tuple[str, ...] = ()  # what must hold in the runtime's optimized graph (human-readable)
    # format → how fast the runtime runs it relative to its fastest format of that kind (1.0); the
    # guard weighs a rung's benefit (bytes, multiply-adds) by it (stored as pairs; absent: 1.0)
    speed: tuple[tuple[str, float], ...] = field(default=())
    onnx_opset: int | None = None  # the opset ONNX files for this runtime are written at (None: the exporter's, 23)

    def __post_init__(self) -> None:
        ladders = _freeze_ladders(self.ladders)
        for kind, formats in ladders:
            if not formats or formats[-1] != KEEP:
                raise ValueError(f"profile {self.runtime}: the ladder of '{kind}' must end in '{KEEP}', got {formats}")
        object.__setattr__(self, "ladders", ladders)
        object.__setattr__(self, "graph_requirements", tuple(str(r) for r in self.graph_requirements))
        speed = self.speed.items() if isinstance(self.speed, Mapping) else self.speed
        object.__setattr__(self, "speed", tuple((str(k), float(v)) for k, v in speed))

    @property
    def ladder_map(self) -> Mapping[str, tuple[str, ...]]:
        """The ladders as a read-only mapping (site kind → formats)."""
        return types.MappingProxyType(dict(self.ladders))

    def kinds(self) -> tuple[str, ...]:
        """The site kinds the profile has a ladder for."""
        return tuple(kind for kind, _ in self.ladders)

    def formats(self, kind: str) -> tuple[str, ...]:
        """Substitute formats for sites of ``kind``, best first; ``("keep",)`` for a kind not listed."""
        return dict(self.ladders).get(kind, (KEEP,))

    def speed_of(self, fmt: str) -> float:
        """Relative speed of ``fmt`` on this runtime (1.0 when the profile does not say)."""
        return dict(self.speed).get(fmt, 1.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "machine": self.machine,
            "ladders": {kind: list(formats) for kind, formats in self.ladders},
            "weight_layout": self.weight_layout,
            "int8_weight_bits": self.int8_weight_bits,
            "uint8_activations": self.uint8_activations,
            "fuses_attention": self.fuses_attention,
            "graph_requirements": list(self.graph_requirements),
            "speed": dict(self.speed),
            "onnx_opset": self.onnx_opset,
        }


# Weight-only linears on ORT CPU (``linear-quant{dtype=int4 | int8w}``; a ladder of its own, keyed
# "linear-weight", since the activation-quantizing "linear" ladder is another pass option's): each
# rung is DequantizeLinear(4 / 8 bit) → MatMul, which ORT fuses into MatMulNBits. Each step down is
# more accurate and slower: asymmetric INT4 (GPTQ) in blocks of 128, of 32 (4× the scales), INT8 per
# channel, float. Speed (ORT 1.32, 2 threads, avx512_vnni, accuracy level 4, 8 layers 576x1536 at 1
# token, one interleaved run at load ~12): int4-b128 0.53 ms, int4-b32 0.84 ms, int8w 1.13 ms, fp32
# MatMul 5.45 ms (docs/passes/linear-quant.md).
_WEIGHT_ONLY_LINEAR = ("int4-b128", "int4-b32", "int8w", KEEP)
_WEIGHT_ONLY_SPEED = {"int4-b128": 1.0, "int4-b32": 0.63, "int8w": 0.47}

# ------------------------------------------------------------------------------------------------
# built-in profiles
# ------------------------------------------------------------------------------------------------
TORCH = Profile(
    runtime="torch",
    machine="any CPU or GPU torch runs on (surgeon's custom ops compute the quantization exactly)",
    ladders=_freeze_ladders({"attention": ("fp8", "binary", KEEP), "linear": ("fp8", "int8-static", KEEP),
             "embedding": ("fp8", "int8", KEEP)}),
    weight_layout="native",
    int8_weight_bits=8,
    uint8_activations=False,
    fuses_attention=True,  # scaled_dot_product_attention stays one op in model.pt2
)

ORT_CPU = Profile(
    runtime="onnxruntime-cpu",
    machine="x86-64 (AVX2 or later)",
    ladders=_freeze_ladders({"attention": ("fp8", KEEP), "linear": ("int8-static", "fp8", KEEP), "embedding": ("int8", "fp8", KEEP),
                             "linear-weight": _WEIGHT_ONLY_LINEAR}),
    weight_layout="transposed",
    int8_weight_bits=7,
    uint8_activations=True,
    fuses_attention=True,  # scaled_dot_product_attention → the opset-23 Attention op (ORT ≥ 1.23 CPU kernel)
    speed=tuple(_WEIGHT_ONLY_SPEED.items()),
)

ORT_CPU_FP8 = Profile(
    runtime="onnxruntime-cpu",
    machine="x86-64 (AVX2 or later)",
    # fp8-weight: weight-only FP8 (the activation stays float) before keep: the bytes stay saved
    ladders=_freeze_ladders({"attention": ("fp8", KEEP), "linear": ("fp8", "fp8-weight", KEEP),
                             "embedding": ("fp8", KEEP)}),
    weight_layout="transposed",
    int8_weight_bits=7,
    uint8_activations=True,
    # FP8 files are for FP8 engines too, whose ONNX parsers lag ONNX Runtime's opsets: they stay at opset 21
    # (IR 10), as written before the fused Attention op; attention stays MatMul / Softmax / MatMul there.
    fuses_attention=False,
    onnx_opset=21,
    graph_requirements=(
        "a file with an FP8 QuantizeLinear runs with session.disable_quant_qdq=1 (else ORT fuses it into "
        "an integer kernel that rejects float8)",
        "ReluQuantRewrite is disabled for FP8 files (Q(relu(x)) != Q(x) for signed FP8)",
    ),
)

# The requirement texts are what targets/onnx_targets.py checks on ORT's optimized graph.
INT8_FUSED = "every MatMul with an INT8 weight runs as an integer kernel (MatMulIntegerToFloat / QLinearMatMul / …)"
INT8_NO_FLOAT_AFTER_DQ = "no float MatMul fed by a DequantizeLinear"

# INT8 on ORT CPU: dynamic activation ranges first. DynamicQuantizeLinear + MatMulInteger is one fused
# kernel (DynamicQuantizeMatMul); a static scale costs a separate QuantizeLinear and the SmoothQuant
# Mul; the outlier rung a Mul, a Gather and a small float MatMul. Relative speeds: estimates from
# MiniLM in ORT 1.32 on 2 cores (docs/benchmarks.md, "INT8 rungs"): the outlier rung on every layer
# that has outlier channels made the whole model 1.2× slower than all-dynamic; the static rung adds
# a QuantizeLinear and a Mul pass per layer.
_INT8_LINEAR = ("int8-dynamic", "int8-dynamic-outliers", "int8-static", KEEP)
_INT8_SPEED = {"int8-dynamic": 1.0, "int8-dynamic-outliers": 0.85, "int8-static": 0.75}

ORT_CPU_INT8 = Profile(
    runtime="onnxruntime-cpu",
    machine="x86-64 (AVX2 or later): 7-bit weights, exact where u8·s8 vpmaddubsw saturates",
    # attention: int8 (attention-int8: integer Q·Kᵀ and P·V, MatMulInteger) before fp8 (dequantized on ORT CPU)
    ladders=_freeze_ladders({"linear": _INT8_LINEAR, "embedding": ("int8", KEEP), "attention": ("int8", "fp8", KEEP),
                             "linear-weight": _WEIGHT_ONLY_LINEAR}),
    weight_layout="transposed",
    int8_weight_bits=7,
    uint8_activations=True,
    fuses_attention=True,  # scaled_dot_product_attention → the opset-23 Attention op (ORT ≥ 1.23 CPU kernel)
    graph_requirements=(INT8_FUSED, INT8_NO_FLOAT_AFTER_DQ),
    speed=tuple((_INT8_SPEED | _WEIGHT_ONLY_SPEED).items()),
)

# The same with 8-bit weights: exact only where the u8·s8 product is computed without int16
# saturation (VNNI vpdpbusd, AMX); on an AVX2-only CPU ORT's kernel may saturate and differ.
ORT_CPU_INT8_VNNI = dataclasses.replace(
    ORT_CPU_INT8, machine="x86-64 with AVX512-VNNI or AVX-VNNI: 8-bit weights (not exact on AVX2-only CPUs)",
    int8_weight_bits=8)

# Decoder files for inference servers (targets/onnx_decoder.py): the key/value cache is the site. INT8
# per kv-head first (ORT's GroupQueryAttention and servers keep INT8/FP8 caches with per-tensor or
# per-head scales), FP8 e4m3fn per head next, else the fp32 cache ("keep"). On ORT CPU both 8-bit
# caches are Cast + Mul in front of attention: they buy memory (0.25x cache bytes), not speed.
ORT_CPU_DECODER = Profile(
    runtime="onnxruntime-cpu",
    machine="x86-64 (AVX2 or later)",
    ladders=_freeze_ladders({"kv_cache": ("int8-head", "fp8-head", KEEP), "linear-weight": _WEIGHT_ONLY_LINEAR}),
    weight_layout="transposed",
    int8_weight_bits=7,
    uint8_activations=True,
    fuses_attention=True,  # scaled_dot_product_attention -> the opset-23 Attention op
    speed=tuple(_WEIGHT_ONLY_SPEED.items()),
    graph_requirements=("past_key_values.<i>.key/.value inputs and present.<i>.key/.value outputs in the "
                        "cache's element type (float, int8 or float8e4m3fn)",),
)

# OpenVINO's CPU plugin (targets/openvino_int8.py): static INT8, then weight-only INT8. Its low-precision
# transformations turn an activation FakeQuantize (QuantizeLinear → DequantizeLinear with a constant
# scale) and an int8 weight into an int8 FullyConnected (brgemm with VNNI / AMX, the bias folded in);
# a dynamic quantization (DynamicQuantizeLinear + MatMulInteger) stays fp32 there (issue 28: 42 of
# 44 layers of onnx-int8's MiniLM file ran fp32), so the ladder has no dynamic rung. Weights symmetric
# per channel in 8 bits (VNNI / AMX multiply u8·s8 without the int16 saturation ORT's 7-bit weights
# avoid on AVX2; an AVX2-only CPU was not measured). What stays float runs
# in bf16 where the CPU has it (the deploy config's inference precision hint, verified with it).
# Opset 21: attention as MatMul → Softmax → MatMul, which the plugin fuses into its attention
# subgraph; the opset-23 Attention op with the mask-elided If (ORT's form) reached it as six If
# bodies that the plugin compiled apart and did not fuse (MiniLM, OpenVINO 2026.4).
# int8-weight (a layer whose activation range breaks the tolerance in 8 bits): the int8 weight alone,
# DequantizeLinear(W_q) → MatMul, which the plugin runs as its weight-compressed FullyConnected (i8
# weight decompressed in the kernel, the activation float); it keeps the 4× smaller weight where
# rolling back would keep fp32. Speed relative to int8-static: bench/openvino_rungs.py, one
# FullyConnected of MiniLM's shapes (384→1536, 1536→384 at 8×128 and 4×512 tokens) on each rung,
# OpenVINO 2026.4, 2 threads, hint f32, AMD EPYC with AVX2 only (no VNNI / bf16): the median of the
# four shapes' ratios (docs/openvino.md has the table).
OPENVINO_INT8_FC = "every linear with an INT8 weight runs as an int8 FullyConnected in OpenVINO's runtime model"
OPENVINO_INT8_WEIGHT_FC = ("every weight-only INT8 linear runs as a FullyConnected with its int8 weight compressed "
                           "(a float activation) in OpenVINO's runtime model")
_OPENVINO_SPEED = {"int8-static": 1.0, "int8-weight": 0.96}

OPENVINO_CPU_INT8 = Profile(
    runtime="openvino-cpu",
    machine="x86-64 with AVX512-VNNI, AVX-VNNI or AMX (int8 brgemm); bf16 where AVX512-BF16 / AMX",
    ladders=_freeze_ladders({"linear": ("int8-static", "int8-weight", KEEP), "embedding": ("int8", KEEP)}),
    weight_layout="transposed",
    int8_weight_bits=8,
    uint8_activations=False,
    fuses_attention=True,  # the plugin fuses MatMul → Softmax → MatMul into its own attention subgraph
    onnx_opset=21,
    graph_requirements=(OPENVINO_INT8_FC, OPENVINO_INT8_WEIGHT_FC),
    speed=tuple(_OPENVINO_SPEED.items()),
)
