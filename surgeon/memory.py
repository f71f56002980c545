"""The memory check made before any work.

``check_memory(model, example_inputs, batches)`` estimates the run's peak and refuses with
``InsufficientMemory`` (exit code 4) when it exceeds what is available, instead of being OOM-killed
half way. The estimate is

    peak ≈ parameters × PARAM_COPIES + activations(largest batch) × ACTIVATION_COPIES + calibration data

* parameters: unique parameter and buffer storages of the model;
* ``PARAM_COPIES = 5``: the original (shared with the captured graph), the fitted copy, the rebuilt
  copy, the serialized ``model.pt2`` and, for ONNX targets, the exporter's model proto;
* activations: the peak of live tensor bytes during one forward on the example inputs (counted op by
  op under a dispatch mode), scaled to the largest calibration batch by its number of input elements
  and once more by the growth of its longest non-batch dimension (attention scores grow with the
  square of the sequence length);
* ``ACTIVATION_COPIES = 3``: the verifier runs the original and the candidate side by side while the
  calibration statistics are held;
* calibration data: the batches themselves (they are held in memory for the fit/check split).

Available memory is the smallest of ``MemAvailable`` (``/proc/meminfo``), the cgroup limit minus
current usage (``/sys/fs/cgroup/memory.max`` − ``memory.current``, or cgroup v1's
``memory.limit_in_bytes`` − ``memory.usage_in_bytes``), and ``SURGEON_MEMORY_LIMIT`` (bytes, or with a
K/M/G suffix: ``SURGEON_MEMORY_LIMIT=2G``), which a pipeline can set to keep surgeon within a budget.
Where none can be read (not Linux), the check is skipped.
"""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InsufficientMemory, SurgeonError

__all__ = ["ACTIVATION_COPIES", "PARAM_COPIES", "MemoryEstimate", "available_memory", "check_memory", "estimate_memory",
           "parse_bytes"]

PARAM_COPIES = 5
ACTIVATION_COPIES = 3
ENV_LIMIT = "SURGEON_MEMORY_LIMIT"
_UNITS = {"": 1, "B": 1, "K": 2**10, "KB": 2**10, "KIB": 2**10, "M": 2**20, "MB": 2**20, "MIB": 2**20,
          "G": 2**30, "GB": 2**30, "GIB": 2**30, "T": 2**40, "TB": 2**40, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """``"2G"`` → 2147483648; plain numbers are bytes; K/M/G/T are powers of 1024."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise SurgeonError(f"{ENV_LIMIT}={text!r} is not a size (bytes, or a number with K, M, G or T)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _fmt(n: float) -> str:
    for unit, size in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _read_int(path: str) -> int | None:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) → None


def available_memory() -> tuple[int, str] | None:
    """``(bytes, where the figure comes from)``: the tightest of the env limit, the cgroup and the host."""
    found: list[tuple[int, str]] = []
    if os.environ.get(ENV_LIMIT):
        found.append((parse_bytes(os.environ[ENV_LIMIT]), ENV_LIMIT))
    for limit, usage, what in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "cgroup memory.max"),
                               ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                "/sys/fs/cgroup/memory/memory.usage_in_bytes", "cgroup memory.limit_in_bytes")):
        cap = _read_int(limit)
        if cap is not None and cap < 2**60:  # cgroup v1 writes a huge number for "no limit"
            found.append((max(0, cap - (_read_int(usage) or 0)), what))
            break
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append((int(line.split()[1]) * 1024, "MemAvailable"))
    except (OSError, ValueError, IndexError):
        pass
    return min(found) if found else None


@dataclass
class MemoryEstimate:
    """The parts of the estimated peak, in bytes."""

    parameters: int
    activations: int  # one forward at the largest batch, before ACTIVATION_COPIES
    data: int
    batch_scale: float

    @property
    def total(self) -> int:
        return self.parameters * PARAM_COPIES + self.activations * ACTIVATION_COPIES + self.data

    def describe(self) -> str:
        return (f"parameters {_fmt(self.parameters)} × {PARAM_COPIES} copies + activations {_fmt(self.activations)} "
                f"× {ACTIVATION_COPIES} + calibration data {_fmt(self.data)}")


def _tensors(value: Any) -> Iterator[Any]:
    import torch
    from torch.utils import _pytree as pytree

    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, torch.Tensor):
            yield leaf


def _storage_key(t: Any) -> tuple[int, int] | None:
    try:
        st = t.untyped_storage()
        return st.data_ptr(), st.nbytes()
    except Exception:  # noqa: BLE001 - tensors without storage (meta, sparse) take no memory we can count
        return None


def _parameter_bytes(model: Any) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = _storage_key(t)
        if key is None or key[0] in seen:
            continue
        seen.add(key[0])
        total += key[1]
    return total


def _activation_peak(model: Any, inputs: Any) -> int | None:
    """Peak bytes of tensors alive at once during one no-grad forward (None if the forward fails).

    Every op's outputs are registered by storage; a storage stops counting when the last tensor seen
    holding it is garbage (weakref), so in-place ops and views do not count twice."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from .inputs import call

    inputs_keys = {k[0] for k in map(_storage_key, _tensors(inputs)) if k}
    param_keys = {k[0] for k in map(_storage_key, list(model.parameters()) + list(model.buffers())) if k}
    state = {"live": 0, "peak": 0}
    refs: dict[int, list] = {}  # data_ptr -> [live tensor count, bytes]

    def release(ptr: int) -> None:
        entry = refs.get(ptr)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] <= 0:
            state["live"] -= entry[1]
            del refs[ptr]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            for t in _tensors(out):
                key = _storage_key(t)
                if key is None or key[0] == 0 or key[0] in inputs_keys or key[0] in param_keys:
                    continue
                entry = refs.get(key[0])
                if entry is None:
                    refs[key[0]] = entry = [0, key[1]]
                    state["live"] += key[1]
                    state["peak"] = max(state["peak"], state["live"])
                entry[0] += 1
                weakref.finalize(t, release, key[0])
            return out

    try:
        with torch.no_grad(), Count():
            out = call(model, inputs)
        del out
    except Exception:  # noqa: BLE001 - a model that fails here fails again in capture, with a better message
        return None
    return state["peak"]


def _numel(inputs: Any) -> int:
    return sum(int(t.numel()) for t in _tensors(inputs))


def _longest(inputs: Any) -> int:
    return max((max(t.shape[1:], default=1) for t in _tensors(inputs) if t.dim() > 1), default=1)


def estimate_memory(model: Any, example_inputs: Any, batches: Iterable[Any] | None = None) -> MemoryEstimate:
    """Estimate the run's peak memory (see the module docstring)."""
    batches = list(batches) if batches is not None else []
    params = _parameter_bytes(model)
    peak = _activation_peak(model, example_inputs) or 0
    base_numel, base_long = max(1, _numel(example_inputs)), max(1, _longest(example_inputs))
    scale = 1.0
    data = 0
    for b in batches:
        data += sum(int(t.numel()) * t.element_size() for t in _tensors(b))
        s = _numel(b) / base_numel * max(1.0, _longest(b) / base_long)
        scale = max(scale, s)
    return MemoryEstimate(params, int(peak * scale), data, scale)


def check_memory(model: Any, example_inputs: Any, batches: Iterable[Any] | None = None) -> MemoryEstimate | None:
    """Refuse (``InsufficientMemory``, exit code 4) a run whose estimated peak exceeds available memory."""
    avail = available_memory()
    if avail is None:
        return None
    est = estimate_memory(model, example_inputs, batches)
    if est.total > avail[0]:
        hint = ("use smaller calibration batches (fewer sentences or samples per batch)" if est.batch_scale > 1
                else "run on a machine with more memory")
        raise InsufficientMemory(f"would not fit in memory: estimated peak {_fmt(est.total)} ({est.describe()}) "
                                 f"exceeds the {_fmt(avail[0])} available ({avail[1]}); {hint}")
    return est
