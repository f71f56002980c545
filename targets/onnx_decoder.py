"""The ``onnx-decoder`` target: a generation-ready decoder file with its key/value cache as inputs
and outputs (Hugging Face Optimum's names), for ONNX Runtime's CPU provider.

``lower(step, example_inputs, outdir)`` exports a ``surgeon.decoder.step.DecoderStep`` with
``torch.onnx.export(dynamo=True)`` at the profile's opset (``targets/onnx.export_onnx``: the same
exporter, optimizer and clean-up as the other ONNX targets), batch / past length / new length dynamic,
and checks the file before it is placed: ``onnx.checker`` (full), the cache element types, and
onnxruntime against the torch step at the shapes a server uses (prefill with an empty past, past length
0; decode, new length 1), since torch.export specialises sizes 0 and 1 and the file is exported at
past and new lengths ≥ 2. The pass (``kv-cache-quant``) decides the cache format; this module only
lowers what the step computes.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from surgeon import profile as _profile
from surgeon.errors import SurgeonError

from ._base import ModelKind, Target
from ._cleanup import all_nodes
from ._external_data import onnx_bytes

__all__ = ["DecoderTarget", "ONNX_DECODER", "CACHE_ELEM_TYPES"]

CACHE_ELEM_TYPES = {None: 1, "int8": 3, "fp8": 17}  # onnx TensorProto: FLOAT, INT8, FLOAT8E4M3FN


def _dims(step: Any) -> tuple[Any, ...]:
    d = torch.export.Dim.DYNAMIC
    n = step.geometry.layers
    return ({0: d, 1: d}, {0: d, 1: d}, {0: d, 1: d}, tuple({0: d, 2: d} for _ in range(2 * n)))


def example_step_inputs(step: Any, batch: int = 2, past: int = 3, new: int = 4, seed: int = 0) -> tuple[Any, ...]:
    """Inputs of ``step`` with ``past`` cached and ``new`` new tokens, row 0 left-padded by one.

    The past is the step's own cache of ``past`` random tokens (8-bit codes for a quantized cache)."""
    g = torch.Generator().manual_seed(seed)
    vocab = int(step.vocab_size)
    total = past + new
    mask = torch.ones(batch, total, dtype=torch.long)
    mask[0, 0] = 0
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    ids = torch.randint(0, vocab, (batch, total), generator=g)
    with torch.no_grad():
        outs = step(ids[:, :past], mask[:, :past], pos[:, :past], *step.empty_past(batch)) if past else None
    cache = list(outs[1:]) if outs is not None else step.empty_past(batch)
    return (ids[:, past:], mask, pos[:, past:], *cache)


def _name_dims(model: Any, layers: int) -> None:
    names = {"input_ids": ["batch", "sequence_length"], "attention_mask": ["batch", "total_length"],
             "position_ids": ["batch", "sequence_length"], "logits": ["batch", "sequence_length", "vocab"]}
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        want = names.get(vi.name) or (["batch", None, "past_length" if vi.name.startswith("past") else "total_length",
                                       None] if vi.name.startswith(("past", "present")) else [])
        for d, n in zip(dims, want):
            if n is not None and d.dim_param:
                d.dim_param = n


@dataclass(frozen=True)
class DecoderTarget(Target):
    """``OUTDIR/model.onnx``: one decode step with the cache explicit (prefill = past length 0)."""

    model_kind: ModelKind = "decoder"

    @property
    def opset(self) -> int:
        from ._lowering import OPSET

        return self.profile.onnx_opset or OPSET

    def unmet_promise(self, module: Any) -> str | None:
        return None  # an fp32 cache is a valid decoder file (the ladder's last rung)

    def session(self, path: str | os.PathLike, *, threads: int | None = None, spinning: bool | None = None) -> Any:
        """An ORT CPU session with surgeon's session config (``targets/onnx.session``)."""
        from ._ort_session import session

        return session(path, threads=threads, spinning=spinning)

    def session_config(self, path: str | os.PathLike) -> dict[str, str]:
        from ._ort_session import session_config

        return session_config(path)

    def export(self, step: Any, path: str | os.PathLike, cleanups: dict[str, int] | None = None) -> Path:
        """Export ``step`` to ``path`` (no check; ``lower`` checks and places it); ``cleanups`` receives
        how often each clean-up rule applied."""
        import onnx

        from surgeon.decoder.step import input_names, output_names

        from .onnx import export_onnx

        n = step.geometry.layers
        step.eval()
        with torch.no_grad():
            export_onnx(step, example_step_inputs(step), path, dynamic_shapes=_dims(step),
                        input_names=input_names(n), output_names=output_names(n), opset=self.opset,
                        cleanups=cleanups)
        # the graph alone: external data (a model past ~1.8 GB) stays where export_onnx wrote it
        model = onnx.load(str(path), load_external_data=False)
        _name_dims(model, n)
        onnx.save_model(model, str(path))
        return Path(path)

    def lower(self, module: Any, example_inputs: Any, outdir: str | os.PathLike, **kw: Any) -> dict[str, Any]:
        """Export, verify and atomically place ``OUTDIR/model.onnx``; return the figures (with ``path``)."""
        from ._external_data import placed_onnx

        cleanups: dict[str, int] = {}
        with placed_onnx(outdir, self.filename) as tmp:
            self.export(module, tmp, cleanups)
            figures = self.verify(tmp, module, example_inputs)
        figures["cleanups"] = cleanups
        final = Path(outdir) / self.filename
        figures["file"], figures["path"] = final.name, str(final)
        return figures

    def verify(self, path: str | os.PathLike, module: Any, inputs: Any, **kw: Any) -> dict[str, Any]:
        """Checker, cache element types, and ORT vs the torch step at (past, new) = (0, 5), (3, 4), (5, 1)."""
        import onnx

        from surgeon.decoder.generate import OrtRunner
        from surgeon.decoder.step import TorchStepRunner

        path = Path(path)
        try:
            onnx.checker.check_model(str(path), full_check=True)
        except Exception as exc:  # noqa: BLE001
            raise SurgeonError(f"onnx.checker rejected {path.name}: {' '.join(str(exc).split())[:300]}") from exc
        model = onnx.load(str(path), load_external_data=False)
        want = CACHE_ELEM_TYPES[module.cache_dtype]
        cache_io = [v for v in list(model.graph.input) + list(model.graph.output)
                    if v.name.startswith(("past_key_values.", "present."))]
        wrong = [v.name for v in cache_io if v.type.tensor_type.elem_type != want]
        if wrong:
            raise SurgeonError(f"{path.name}: cache tensors {', '.join(wrong[:4])} are not of element type {want}")
        ort_runner, torch_runner = OrtRunner(self.session(path), path.name), TorchStepRunner(module)
        diffs = {}
        for past, new in ((0, 5), (3, 4), (5, 1)):
            ids, mask, pos, *cache = example_step_inputs(module, past=past, new=new, seed=past + new)
            ort_past = ort_runner.empty_past(2) if past == 0 else _ort_values(ort_runner, cache)
            a, pa = ort_runner.step(ids.numpy(), mask.numpy(), pos.numpy(), ort_past)
            b, pb = torch_runner.step(ids.numpy(), mask.numpy(), pos.numpy(), cache)
            # 8-bit caches: the codes ORT stores must be the very codes torch stores; where they do not,
            # how many differ and from which layer on (a code at a rounding boundary flips on fp32
            # noise, and the later layers read it: docs/decoder.md)
            flipped = [int((x.numpy() != _bytes_of(y)).sum()) for x, y in zip(pa, pb)] if module.cache_dtype else []
            diffs[f"past{past}_new{new}"] = {
                "logits_max_abs_diff": float(np.abs(a - b).max()),
                "present_bytes_equal": not any(flipped) if module.cache_dtype else None,
                **({"present_codes_differing": sum(flipped),
                    "first_layer_differing": next(i // 2 for i, n in enumerate(flipped) if n)} if any(flipped) else {})}
        return {"target": self.name, "file": path.name, "bytes": onnx_bytes(path), "opset": self.opset,
                "cache_elem_type": {1: "float", 3: "int8", 17: "float8e4m3fn"}[want],
                "ops": sorted({n.op_type for n in all_nodes(model.graph)}), "ort_ops": self.ort_ops(path),
                "session_config": self.session_config(path), "ort_vs_torch": diffs,
                "max_abs_diff": max(d["logits_max_abs_diff"] for d in diffs.values())}

    def ort_ops(self, path: str | os.PathLike) -> dict[str, int]:
        """Op types (with counts) of the graph ORT's CPU provider runs, after its graph optimizations."""
        import onnx

        from ._ort_session import session

        with tempfile.TemporaryDirectory() as tmp:
            optimized = Path(tmp) / "optimized.onnx"
            session(path, optimized_path=optimized)
            counts: dict[str, int] = {}
            for node in onnx.load(str(optimized), load_external_data=False).graph.node:
                counts[node.op_type] = counts.get(node.op_type, 0) + 1
        return dict(sorted(counts.items()))

    def baseline(self, original: Any, example_inputs: Any, path: str | os.PathLike) -> None:
        self.export(original, path)

    def runner(self, path: str | os.PathLike, inputs: Any, *, threads: int = 2) -> Callable[[], Any]:
        sess = self.session(path, threads=threads)
        feeds = dict(zip([i.name for i in sess.get_inputs()], [t.numpy() for t in inputs]))
        return lambda: sess.run(None, feeds)


def _bytes_of(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.uint8).numpy() if t.dtype == torch.float8_e4m3fn else t.numpy()


def _ort_values(runner: Any, tensors: list[torch.Tensor]) -> list[Any]:
    import onnxruntime as ort

    out = []
    for t in tensors:
        if t.dtype == torch.float8_e4m3fn:
            out.append(ort.OrtValue.ortvalue_from_numpy_with_onnx_type(_bytes_of(t), 17))
        else:
            out.append(ort.OrtValue.ortvalue_from_numpy(t.numpy()))
    return out


ONNX_DECODER = DecoderTarget(
    name="onnx-decoder", format="onnx", runtime=_profile.ORT_CPU_DECODER.runtime, profile=_profile.ORT_CPU_DECODER,
    description="a causal LM's decode step with its KV cache as inputs/outputs (Optimum names; "
                "INT8/FP8 cache), for inference servers; surgeon generate runs it",
    default_passes="linear-quant{dtype=int4},kv-cache-quant")
