"""The onnxruntime session options surgeon's files are verified with, and why: plain data that the
targets' sessions, a server (report.json ``deploy.session_config``, the OUTDIR README) and
``surgeon generate`` (which must not import torch) read from one place."""

from __future__ import annotations

__all__ = ["DENORMAL_AS_ZERO", "FP8_DISABLED_OPTIMIZERS", "FP8_SESSION_OPTION", "NBITS_ACCURACY_DEFAULT",
           "NBITS_ACCURACY_LEVEL"]

FP8_SESSION_OPTION = ("session.disable_quant_qdq", "1")
# ORT's (1.31, 1.32) level-2 rule ReluQuantRewrite drops a Relu feeding a QuantizeLinear whose zero point is
# the bottom of the quantized range; for FLOAT8E4M3FN (signed) that is false, Q(relu(x)) != Q(x) for
# x < 0, so FP8 files are opened with it off (docs/deploy.md, found by the fuzzer).
FP8_DISABLED_OPTIMIZERS = ("ReluQuantRewrite",)
# Flush-to-zero / denormals-are-zero on ORT's threads. A masked attention score (mask fill -inf or
# finfo.min) reaches MLAS's exp clamped at -103.97, whose result 7e-46 is a denormal: x86 handles
# denormals in microcode, and MiniLM's softmax over padded keys ran 4x slower (1.0 vs 4.3 ns an element,
# [4, 12, 512, 512], one thread), its P·V product likewise. With FTZ/DAZ those probabilities are 0, as
# torch computes them; every value that changes is below 1.2e-38.
DENORMAL_AS_ZERO = ("session.set_denormal_as_zero", "1")
# The compute type of the MatMulNBits kernels ORT makes of DequantizeLinear(4- or 8-bit, blocked /
# per axis) → MatMul (its DQ→MatMulNBits fusion). 4: activations quantized to int8 per block, int8
# products (VNNI). Measured (ORT 1.32, 2 threads, avx512_vnni, 8 layers 576x1536 at 1 token, quiet machine,
# bench/int4_kernels.py): int4-b32 0.12 ms at 4 vs 0.32 ms at 0 (fp32 MatMul 0.43 ms), int8 weights 0.19 ms
# at 4 vs 3.5 ms at 0 — level 0's 8-bit path is slower than fp32. ORT 1.32's default is 4 already; written explicitly so the
# file runs the same kernels whatever the default. The cost: the activation's int8 rounding (~0.5% of
# the output's range, docs/passes/linear-quant.md); level 0 computes the torch module's dequantized
# weights exactly (``session(nbits_accuracy=0)``, as the tests check the file with).
NBITS_ACCURACY_LEVEL = "session.qdq_matmulnbits_accuracy_level"
NBITS_ACCURACY_DEFAULT = 4
