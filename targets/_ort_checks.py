"""Checks of a written ONNX file in onnxruntime, before it replaces anything (``write_onnx``).

``verify_onnx``: ``onnx.checker`` (full check), an ORT CPU session (``targets/_ort_session.py``), the
outputs against the torch module exported (max and 99.9th-percentile abs diff; for a quantized file
also against the same file with ORT's graph optimizations off: the noise floor of its fusions and
integer kernels) and against the original model (per-sample cosines, ``surgeon.metrics``), the size
against fp32. ``shape_probes`` runs the file where it claims dynamic axes; ``static_axes`` is the
export spec that fixes the axes it cannot take.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from surgeon.capture import auto_dynamic_shapes
from surgeon.errors import SurgeonError, first_line
from surgeon.inputs import Inputs, as_args_kwargs, call, tensors_of
from surgeon.metrics import cosine_per_sample, position_mask

from ._cleanup import all_nodes
from ._external_data import onnx_bytes
from ._lowering import OPSET
from ._ort_session import FP8_DISABLED_OPTIMIZERS, FP8_SESSION_OPTION, needs_fp8_option, run_ort, session, session_config


def _torch_outputs(module: Any, inputs: Inputs) -> list[np.ndarray]:
    with torch.no_grad():
        out = call(module, inputs)
    return [t.detach().float().cpu().numpy() for t in tensors_of(out)]


def _float_outputs(outs: list[np.ndarray]) -> list[np.ndarray]:
    return [o.astype(np.float32) for o in outs if np.issubdtype(o.dtype, np.floating)]


def _max_abs(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    from ._base import max_abs_diff

    return max_abs_diff(a, b, "the ONNX file")


def _quantile_abs(a: list[np.ndarray], b: list[np.ndarray], q: float) -> float:
    """Quantile of |a − b| over all output elements. Quantized files differ from torch in isolated
    elements: a float difference of 1 ulp upstream (ORT and torch sum in different orders) moves a
    value across a rounding boundary of the next quantizer, which then differs by one quantization
    step; the quantile shows the bulk, the max shows those flips."""
    diffs = [np.abs(x.astype(np.float64) - y.astype(np.float64)).ravel() for x, y in zip(a, b) if x.size]
    return float(np.quantile(np.concatenate(diffs), q)) if diffs else 0.0


def cosine_by_output(names: list[str], a: list[np.ndarray], b: list[np.ndarray],
                     inputs: Inputs | None = None) -> dict[str, dict[str, Any]]:
    """Per named output: cosine min/mean over samples, and what was measured (padding left out or not)."""
    figures: dict[str, dict[str, Any]] = {}
    for name, x, y in zip(names, a, b):
        cos = cosine_per_sample([x], [y], inputs)
        masked = inputs is not None and position_mask(inputs, torch.as_tensor(x)) is not None
        figures[name] = {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()),
                         "measured": "per sample, padded positions (attention_mask = 0) left out" if masked
                         else "per sample, every element"}
    return figures


def _input_tensors(sess_inputs: Sequence[str], inputs: Inputs) -> list[tuple[Any, torch.Tensor]] | None:
    """(key in ``inputs``, tensor) for each file input, matched as ``feeds_for`` matches them; None when
    the inputs are nested (no tensor per key)."""
    args, kwargs = as_args_kwargs(inputs)
    if kwargs and not args and all(isinstance(kwargs.get(n), torch.Tensor) for n in sess_inputs):
        return [(n, kwargs[n]) for n in sess_inputs]
    keys = [i for i in range(len(args))] + list(kwargs)
    values = list(args) + list(kwargs.values())
    pairs = [(k, v) for k, v in zip(keys, values) if isinstance(v, torch.Tensor)]
    return pairs if len(pairs) == len(sess_inputs) else None


def _replaced(inputs: Inputs, new: dict[Any, torch.Tensor]) -> Inputs:
    args, kwargs = as_args_kwargs(inputs)
    if kwargs and not args:
        return {k: new.get(k, v) for k, v in kwargs.items()}
    return tuple(new.get(i, a) for i, a in enumerate(args))


def shape_probes(path: str | os.PathLike, module: Any, inputs: Inputs,
                 base_diff: float) -> tuple[list[dict[str, Any]], list[tuple[str, int]]]:
    """Run the file where it claims to be dynamic, at sizes it was not exported with, against ``module``.

    The batch axis (every input whose axis 0 is symbolic) at 1 and 3 (rows repeated cyclically), and
    each other symbolic size (inputs sharing the size change together) cut to three quarters. A probe
    the torch module refuses means the model fixes that axis; one the file cannot run, or runs with a
    difference from torch beyond ``max(1e-4, 10 × base_diff)`` (``base_diff``: at the verified shape;
    for a quantized file also at most 10 % of the output's largest magnitude),
    means the file claims an axis it cannot take. Returns ``(probes, axes)``: what each probe found
    and the (input, axis) pairs that must be static."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    init = {t.name for t in graph.initializer}
    dims = {vi.name: [d.dim_param for d in vi.type.tensor_type.shape.dim] for vi in graph.input if vi.name not in init}
    names = list(dims)
    pairs = _input_tensors(names, inputs)
    if pairs is None:
        return [{"skipped": "nested inputs"}], []
    sess = session(path, fp8=needs_fp8_option(path))
    quantized = any(n.op_type in ("QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger") for n in all_nodes(graph))
    batch_axes = [(n, 0) for n in names if dims[n] and dims[n][0]]
    sizes: dict[int, list[tuple[str, int]]] = {}
    for (n, (_key, t)) in zip(names, pairs):
        for axis, sym in enumerate(dims[n]):
            if axis and sym and t.dim() > axis and t.shape[axis] >= 2:
                sizes.setdefault(int(t.shape[axis]), []).append((n, axis))
    by_name = dict(zip(names, pairs))
    tries: list[tuple[str, list[tuple[str, int]], dict[str, Any], Inputs]] = []
    rows = {int(by_name[n][1].shape[0]) for n, _ in batch_axes}
    for b in (1, 3):
        if batch_axes and rows and b not in rows:
            new = {by_name[n][0]: by_name[n][1][torch.arange(b) % by_name[n][1].shape[0]] for n, _ in batch_axes}
            tries.append((f"batch {b}", batch_axes, {"batch": b}, _replaced(inputs, new)))
    for size, axes in sizes.items():
        cut = max(1, size * 3 // 4)
        new = {}
        for n, axis in axes:
            key, t = by_name[n]
            new[key] = (new.get(key, t)).narrow(axis, 0, cut)
        tries.append((f"{', '.join(f'{n}[{a}]' for n, a in axes)} {size} → {cut}", axes, {"length": cut}, _replaced(inputs, new)))
    probes: list[dict[str, Any]] = []
    static: list[tuple[str, int]] = []
    for label, axes, what, probe in tries:
        record: dict[str, Any] = {"probe": label, **what}
        try:
            ref = _torch_outputs(module, probe)
        except Exception as exc:  # noqa: BLE001 - the model itself fixes this axis
            record["error"] = f"the torch module refuses it: {first_line(exc)[:200]}"
            probes.append(record)
            static += axes
            continue
        try:
            got = _float_outputs(run_ort(sess, probe))
            diff = _max_abs(got, [r for r in ref if np.issubdtype(r.dtype, np.floating)])
        except Exception as exc:  # noqa: BLE001 - a file that claims an axis it cannot take
            record["error"] = " ".join(first_line(exc).split())[:200]
            probes.append(record)
            static += axes
            continue
        record["max_abs_diff"] = diff
        scale = max((float(np.abs(r).max()) for r in ref if r.size and np.issubdtype(r.dtype, np.floating)), default=0.0)
        # a quantized file moves isolated values by a quantization step wherever a float ulp crosses a
        # rounding boundary, and another batch has other such values: 10 % of the output's range is
        # far above those and far below what a file computing at the wrong shape gives
        bound = max(1e-4, 10 * base_diff, 0.1 * scale if quantized else 0.0)
        if not diff <= bound:
            record["error"] = f"differs from torch by {diff:.3g} (at the exported shape {base_diff:.3g})"
            static += axes
        probes.append(record)
    return probes, list(dict.fromkeys(static))


def static_axes(path: str | os.PathLike, module: Any, inputs: Inputs, static: list[tuple[str, int]]) -> Any:
    """``auto_dynamic_shapes`` with the ``static`` (file input, axis) pairs fixed; everything fixed (None)
    where the batch axis is among them or the file's inputs do not map one to one onto the spec."""
    import onnx

    if any(axis == 0 for _, axis in static):
        return None
    graph = onnx.load(str(path), load_external_data=False).graph
    init = {t.name for t in graph.initializer}
    names = [vi.name for vi in graph.input if vi.name not in init]
    pairs = _input_tensors(names, inputs)
    spec = auto_dynamic_shapes(module, inputs)
    args, kwargs = as_args_kwargs(inputs)
    spec_keys = list(spec) if isinstance(spec, dict) else list(range(len(spec)))
    if pairs is None or len(spec_keys) != len(args) + len(kwargs):
        return None
    # a key of ``inputs`` (argument position or keyword) → the spec's key (parameter name or position)
    to_spec = dict(zip([*range(len(args)), *kwargs], spec_keys))
    out = dict(spec) if isinstance(spec, dict) else list(spec)
    for name, (key, _t) in zip(names, pairs):
        fixed = {a for n, a in static if n == name}
        dims = out[to_spec[key]]
        if fixed and isinstance(dims, dict):
            out[to_spec[key]] = {i: d for i, d in dims.items() if i not in fixed} or None
    return out if isinstance(out, dict) else tuple(out)


def fp32_bytes(model: nn.Module) -> int:
    """Bytes the fp32 ONNX file stores for ``model``'s weights: unique float parameters and buffers × 4."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr() if t.numel() else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * (4 if t.is_floating_point() else t.element_size())
    return total


def verify_onnx(path: str | os.PathLike, module: Any, inputs: Inputs, *, original: nn.Module | None = None,
                original_inputs: Inputs | None = None, fp32_size: int | None = None,
                check_batch: bool = True) -> dict[str, Any]:
    """Check ``path`` and compare it in onnxruntime with ``module`` (and ``original``).

    Returns the figures: ``max_abs_diff`` (ORT vs the torch module), ``cosine_min`` / ``cosine_mean``
    (ORT vs the original, per sample), ``bytes``, ``fp32_bytes``, ``size_ratio``, ``fp8_session_option``
    and, with ``check_batch``, ``shape_check`` (``shape_probes``: the file run at batch 1 and 3 and at
    another size of each other dynamic axis against ``module``; the axes it claims but cannot take)
    with ``batch1_max_abs_diff``. Raises ``SurgeonError`` when the checker or onnxruntime rejects the
    file at the verified shape."""
    import onnx

    path = Path(path)
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # noqa: BLE001
        raise SurgeonError(f"onnx.checker rejected {path.name}: {' '.join(str(exc).split())[:300]}") from exc
    fp8 = needs_fp8_option(path)
    try:
        sess = session(path, fp8=fp8)
        ort_out = _float_outputs(run_ort(sess, inputs))
    except SurgeonError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise SurgeonError(f"onnxruntime cannot run {path.name}: {' '.join(str(exc).split())[:300]}") from exc
    ref = _torch_outputs(module, inputs)
    written = onnx.load(str(path), load_external_data=False)  # read once: its opset and its ops
    figures: dict[str, Any] = {
        "file": path.name,
        "bytes": onnx_bytes(path),  # with its external data file, when it has one
        "opset": next((int(o.version) for o in written.opset_import if o.domain in ("", "ai.onnx")), OPSET),
        "max_abs_diff": _max_abs(ort_out, ref),
        "p999_abs_diff": _quantile_abs(ort_out, ref, 0.999),
        "fp8_session_option": f"{FP8_SESSION_OPTION[0]}={FP8_SESSION_OPTION[1]}" if fp8 else None,
        "session_config": session_config(path, fp8=fp8),
        "ort_disabled_optimizers": list(FP8_DISABLED_OPTIMIZERS) if fp8 else [],
        "inputs": [{"name": i.name, "shape": [d if isinstance(d, int) else str(d) for d in i.shape]}
                   for i in sess.get_inputs()],
    }
    if any(n.op_type == "QuantizeLinear" for n in written.graph.node):
        # Noise floor: the same file under ORT with graph optimizations off. Quantizers turn ulp-level
        # float differences (fused vs unfused kernels, summation order) into whole quantization steps,
        # so deep quantized models differ from themselves across runtimes by as much as from torch.
        plain = session(path, fp8=fp8, optimize=False)
        figures["ort_unoptimized_max_abs_diff"] = _max_abs(_float_outputs(run_ort(plain, inputs)), ort_out)
    if original is not None:
        orig_out = _torch_outputs(original, original_inputs if original_inputs is not None else inputs)
        if len(orig_out) == len(ort_out):
            cos_inputs = original_inputs if original_inputs is not None else inputs
            cos = cosine_per_sample(ort_out, orig_out, cos_inputs)
            figures["cosine_min"] = float(cos.min())
            figures["cosine_mean"] = float(cos.mean())
            names = [o.name for o in sess.get_outputs() if o.type in ("tensor(float)", "tensor(double)",
                                                                       "tensor(float16)", "tensor(bfloat16)")]
            if len(names) == len(ort_out):
                figures["cosine_by_output"] = cosine_by_output(names, ort_out, orig_out, cos_inputs)
        if fp32_size is None:
            fp32_size = fp32_bytes(original)
    if fp32_size:
        figures["fp32_bytes"] = int(fp32_size)
        figures["size_ratio"] = round(figures["bytes"] / fp32_size, 4)
    if check_batch:
        # where the file claims dynamic axes: does it run there (write_onnx rewrites a file that does not;
        # here, for a file given to verify, the failures are figures)
        probes, failing = shape_probes(path, module, inputs, figures["max_abs_diff"])
        figures["shape_check"] = {"probes": probes, "claimed_dynamic_but_fail": [f"{n}:{a}" for n, a in failing]}
        one = next((p for p in probes if p.get("batch") == 1 and "max_abs_diff" in p), None)
        if one is not None:
            figures["batch1_max_abs_diff"] = one["max_abs_diff"]
    return figures
