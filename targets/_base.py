"""The ``Target`` base: one deployable format on one runtime. Targets lower and verify; they never
run a pass or calibrate (the pipeline in surgeon/optimize.py does, before a target sees the module)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Literal

from surgeon.profile import Profile

__all__ = ["ModelKind", "Target", "batch_shapes", "quantized_dtypes"]

#: The kind of model a target takes, which picks the pipeline's variant (its capture, data and
#: metrics): ``"module"`` an encoder-style module (torch.export capture, batches, end-to-end cosines),
#: ``"decoder"`` a causal LM's decode step with its key/value cache (``surgeon.decoder``: texts,
#: perplexity and greedy agreement), ``"encoder-decoder"`` a seq2seq model written as encoder + decoder
#: + decoder-with-past files (``surgeon.seq2seq``: texts, greedy equality with transformers' generate).
ModelKind = Literal["module", "decoder", "encoder-decoder"]


@dataclass(frozen=True)
class Target:
    """A registered target. Subclasses implement ``lower``, ``verify`` and ``time``."""

    name: str  # the --target id
    format: str  # "pt2" or "onnx"
    runtime: str  # the runtime the file runs in (= profile.runtime)
    profile: Profile  # what the runtime runs (surgeon/profile.py)
    description: str  # one line for `surgeon targets`
    default_passes: str  # the pipeline `surgeon optimize --target NAME` uses when --passes is not given
    filename: str = "model.onnx"  # the file lower() writes into OUTDIR
    quantized: str | None = None  # "fp8" / "int8": the file is meant to compute with that quantization
    model_kind: ModelKind = "module"  # what the target takes: the pipeline variant the CLI runs for it

    @property
    def needs_passes(self) -> bool:
        """Whether the file only makes sense after passes (a quantized target): `surgeon export` refuses it."""
        return self.quantized is not None

    def unmet_promise(self, module: Any) -> str | None:
        """Why ``module`` (the graph after the passes) cannot give this target's file, or None.

        A quantized target promises that quantization: a module with no point of it (``--passes
        attention-fp8`` for ``onnx-int8``) would write a file that is neither small nor fast there."""
        if self.quantized is None:
            return None
        if quantized_dtypes(module).get(self.quantized, 0):
            return None
        return f"no {self.quantized} quantization"

    def require_runtime(self) -> None:
        """Raise a one-line ``SurgeonError`` naming what to install where the target's runtime is an
        optional dependency that is missing (called before any work; default: nothing is missing)."""

    def lower(self, module: Any, example_inputs: Any, outdir: str | os.PathLike, **kw: Any) -> dict[str, Any]:
        """Write ``OUTDIR/<filename>`` for ``module``, verified; return the figures (with ``path``)."""
        raise NotImplementedError

    def verify(self, path: str | os.PathLike, module: Any, inputs: Any, **kw: Any) -> dict[str, Any]:
        """Run the file in its runtime on ``inputs`` and compare with the torch ``module``."""
        raise NotImplementedError

    def compare(self, path: str | os.PathLike, baseline: str | os.PathLike) -> dict[str, Any]:
        """What must hold of the file against the original written the same way (``baseline``), e.g.
        the runtime's fusions kept; figures for ``report["targets"][name]`` (default: none)."""
        return {}

    def baseline(self, original: Any, example_inputs: Any, path: str | os.PathLike) -> None:
        """Write the *original* model to ``path`` exactly as ``lower`` writes a file (same exporter, same
        format): what the optimized file is timed against."""
        raise NotImplementedError

    def runner(self, path: str | os.PathLike, inputs: Any, *, threads: int = 2) -> Callable[[], Any]:
        """A prepared call of the written file in its runtime on ``inputs`` (loading is not timed)."""
        raise NotImplementedError

    def open(self, path: str | os.PathLike) -> Callable[..., Any]:
        """The written file loaded in its runtime, as a callable on the model's torch inputs (positional
        or keyword) that returns torch tensors: what the verdict measures (``surgeon.verify.measure_model``)."""
        raise NotImplementedError

    def peak_memory(self, path: str | os.PathLike, inputs: Any, *, threads: int = 2) -> dict[str, Any] | None:
        """Peak memory of one run of the file in its runtime, measured in a fresh process (None: this
        target does not measure it)."""
        return None

    def time(self, path: str | os.PathLike, inputs: Any, *, runs: int = 20, threads: int = 2) -> dict[str, Any]:
        """Median latency (ms) of the written file in its runtime on this machine (warm-up first)."""
        from surgeon.speed import side_by_side

        t = side_by_side({"file": self.runner(path, inputs, threads=threads)}, runs=runs)["file"]
        return {"target": self.name, "runtime": self.runtime, "median_ms": t["median_ms"], "min_ms": t["min_ms"],
                "runs": runs, "threads": threads, "batch": batch_shapes(inputs)}

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "format": self.format, "runtime": self.runtime, "file": self.filename,
                "description": self.description, "default_passes": self.default_passes,
                "quantized": self.quantized, "model_kind": self.model_kind, "profile": self.profile.to_json()}


def quantized_dtypes(module: Any) -> dict[str, int]:
    """How many quantize/dequantize points of each dtype the module computes with."""
    import torch
    from torch import fx

    from surgeon.quant import Quantizer

    counts = {"fp8": 0, "int8": 0}
    for _, m in module.named_modules():
        if isinstance(m, Quantizer) and getattr(m, "active", True):
            counts[m.dtype] = counts.get(m.dtype, 0) + 1
        q = getattr(m, "qweight", None)
        if isinstance(q, torch.Tensor) and getattr(m, "active", True):
            counts["fp8" if q.dtype == torch.float8_e4m3fn else "int8"] += 1
    if isinstance(module, fx.GraphModule):
        for node in module.graph.nodes:
            name = str(node.target)
            if "surgeon.quantize_fp8" in name or "surgeon::quantize_fp8" in name:
                counts["fp8"] += 1
            elif "surgeon.quantize_int8" in name or "surgeon::quantize_int8" in name:
                counts["int8"] += 1
    return counts


def max_abs_diff(a: list[Any], b: list[Any], what: str) -> float:
    """Largest |a − b| over paired outputs (numpy arrays), in float64; ``what`` names the file kind
    in the errors ("the ONNX file", "the .pt2 file") when counts or shapes differ."""
    import numpy as np

    from surgeon.errors import SurgeonError

    if len(a) != len(b):
        raise SurgeonError(f"{what} returns {len(a)} floating outputs, the torch module {len(b)}")
    worst = 0.0
    for x, y in zip(a, b):
        if tuple(x.shape) != tuple(y.shape):
            raise SurgeonError(f"{what}'s output shape {tuple(x.shape)} differs from the torch module's {tuple(y.shape)}")
        if x.size:
            worst = max(worst, float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))))
    return worst


def batch_shapes(inputs: Any) -> dict[str, list[int]]:
    """Shapes of the tensors of ``inputs`` by name (keyword names, else ``arg0``, ``arg1``, …)."""
    import torch

    from surgeon.inputs import as_args_kwargs

    args, kwargs = as_args_kwargs(inputs)
    named = [(f"arg{i}", v) for i, v in enumerate(args)] + list(kwargs.items())
    return {k: list(v.shape) for k, v in named if isinstance(v, torch.Tensor)}
