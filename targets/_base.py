"""The ``Target`` base: one deployable format on one runtime. Targets lower and verify; they never
run a pass or calibrate (the pipeline in surgeon/optimize.py does, before a target sees the module)."""

from __future__ import annotations

import os
import statistics
import time as _time
from dataclasses import dataclass
from typing import Any, Callable

from surgeon.profile import Profile

__all__ = ["Target", "median_ms", "batch_shapes"]


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

    @property
    def needs_passes(self) -> bool:
        """Whether the file only makes sense after passes (a quantized target): `surgeon export` refuses it."""
        return self.quantized is not None

    def lower(self, module: Any, example_inputs: Any, outdir: str | os.PathLike, **kw: Any) -> dict[str, Any]:
        """Write ``OUTDIR/<filename>`` for ``module``, verified; return the figures (with ``path``)."""
        raise NotImplementedError

    def verify(self, path: str | os.PathLike, module: Any, inputs: Any, **kw: Any) -> dict[str, Any]:
        """Run the file in its runtime on ``inputs`` and compare with the torch ``module``."""
        raise NotImplementedError

    def time(self, path: str | os.PathLike, inputs: Any, *, runs: int = 20, threads: int = 2) -> dict[str, Any]:
        """Median latency (ms) of the written file in its runtime on this machine."""
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "format": self.format, "runtime": self.runtime, "file": self.filename,
                "description": self.description, "default_passes": self.default_passes,
                "quantized": self.quantized, "profile": self.profile.to_json()}


def batch_shapes(inputs: Any) -> dict[str, list[int]]:
    """Shapes of the tensors of ``inputs`` by name (keyword names, else ``arg0``, ``arg1``, …)."""
    import torch

    from surgeon._inputs import as_args_kwargs

    args, kwargs = as_args_kwargs(inputs)
    named = [(f"arg{i}", v) for i, v in enumerate(args)] + list(kwargs.items())
    return {k: list(v.shape) for k, v in named if isinstance(v, torch.Tensor)}


def median_ms(fn: Callable[[], Any], runs: int, warmup: int | None = None) -> tuple[float, list[float]]:
    """Call ``fn`` ``warmup`` times (default: min(3, runs)), then ``runs`` times; median and all times in ms."""
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    for _ in range(min(3, runs) if warmup is None else warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = _time.perf_counter()
        fn()
        times.append((_time.perf_counter() - t0) * 1e3)
    return statistics.median(times), times
