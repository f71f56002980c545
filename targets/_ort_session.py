"""ONNX Runtime sessions the way surgeon opens its files, and a server should too.

``session`` is a CPU session with ``session_config``: flush-to-zero / denormals-are-zero always, and
for a file with FP8 Q/DQ ``session.disable_quant_qdq = 1`` with ORT's ``ReluQuantRewrite`` off
(``needs_fp8_option``). ``feeds_for`` / ``file_feeds`` turn torch inputs into a run's feeds,
``run_ort`` runs them, ``peak_memory`` measures one run's resident-memory peak in a fresh process.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch

from surgeon.errors import SurgeonError
from surgeon.inputs import Inputs, as_args_kwargs
from surgeon.ort_options import (
    DENORMAL_AS_ZERO,
    FP8_DISABLED_OPTIMIZERS,
    FP8_SESSION_OPTION,
    NBITS_ACCURACY_DEFAULT,
    NBITS_ACCURACY_LEVEL,
)

from ._external_data import data_file


def needs_fp8_option(model_or_path: Any) -> bool:
    """Whether ORT must run the file with ``session.disable_quant_qdq = 1``: some QuantizeLinear
    produces FP8 (its zero point is a float8 tensor). ORT's CPU QDQ fusion turns FP8 Q/DQ around a
    MatMul into an integer kernel that rejects float8; weight-only FP8 (DequantizeLinear of an FP8
    initializer, e.g. an embedding table) is not fused and needs no flag — which matters, since the
    flag also switches off the INT8 fusion."""
    import onnx

    model = onnx.load(str(model_or_path), load_external_data=False) if isinstance(model_or_path, (str, os.PathLike)) else model_or_path
    fp8 = {onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E4M3FNUZ, onnx.TensorProto.FLOAT8E5M2,
           onnx.TensorProto.FLOAT8E5M2FNUZ}
    fp8_values = {t.name for t in model.graph.initializer if t.data_type in fp8}
    for node in model.graph.node:
        if node.op_type == "Constant" and any(a.type == onnx.AttributeProto.TENSOR and a.t.data_type in fp8
                                              for a in node.attribute):
            fp8_values.update(node.output)
    return any(n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in fp8_values
               for n in model.graph.node)


def session_config(path: str | os.PathLike, *, fp8: bool | None = None,
                   nbits_accuracy: int = NBITS_ACCURACY_DEFAULT) -> dict[str, str]:
    """The ORT session config entries surgeon runs ``path`` with, and a server should too: FTZ/DAZ
    (``DENORMAL_AS_ZERO``) always, the MatMulNBits compute type (``NBITS_ACCURACY_LEVEL``),
    ``session.disable_quant_qdq=1`` for a file with FP8 Q/DQ."""
    config = dict([DENORMAL_AS_ZERO, (NBITS_ACCURACY_LEVEL, str(int(nbits_accuracy)))])
    if fp8 if fp8 is not None else needs_fp8_option(path):
        config.update([FP8_SESSION_OPTION])
    return config


def session(path: str | os.PathLike, *, threads: int | None = None, fp8: bool | None = None,
            optimized_path: str | os.PathLike | None = None, optimize: bool = True,
            spinning: bool | None = None, nbits_accuracy: int = NBITS_ACCURACY_DEFAULT) -> Any:
    """An onnxruntime CPU session for ``path`` with ``session_config(path)`` (FTZ/DAZ; the FP8 option
    when the file needs it).

    ``spinning=False`` turns intra-op thread spinning off (``session.intra_op.allow_spinning=0``), as
    the targets' ``time()`` measures; ``None`` leaves ORT's default. ``nbits_accuracy``: the compute
    type of the 4/8-bit weight kernels (``NBITS_ACCURACY_LEVEL``; 0 = fp32, exact)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if spinning is not None:
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    use_fp8 = fp8 if fp8 is not None else needs_fp8_option(path)
    for key, value in session_config(path, fp8=use_fp8, nbits_accuracy=nbits_accuracy).items():
        so.add_session_config_entry(key, value)
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
        if data_file(path).exists():  # past 2 GB ORT must write the optimized weights beside it too
            so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                        data_file(optimized_path).name)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(FP8_DISABLED_OPTIMIZERS) if use_fp8 else None)


def feeds_for(sess: Any, inputs: Inputs) -> dict[str, np.ndarray]:
    args, kwargs = as_args_kwargs(inputs)
    names = [i.name for i in sess.get_inputs()]
    if kwargs and not args and all(isinstance(kwargs.get(n), torch.Tensor) for n in names):
        # keyword inputs by name: a tokenizer's dict need not list them in the forward's order
        return {n: kwargs[n].detach().cpu().numpy() for n in names}
    values = [v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor)]
    if len(names) != len(values):
        raise SurgeonError(f"the ONNX file has {len(names)} inputs but {len(values)} tensors were given")
    return {n: v.detach().cpu().numpy() for n, v in zip(names, values)}


def file_feeds(path: str | os.PathLike, inputs: Inputs) -> dict[str, np.ndarray]:
    """``feeds_for`` without a session: the file's graph inputs (those not initializers), in order."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {t.name for t in graph.initializer}
    names = [i.name for i in graph.input if i.name not in initializers]
    args, kwargs = as_args_kwargs(inputs)
    values = [v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor)]
    if len(names) != len(values):
        raise SurgeonError(f"the ONNX file has {len(names)} inputs but {len(values)} tensors were given")
    return {n: v.detach().cpu().numpy() for n, v in zip(names, values)}


def peak_memory(path: str | os.PathLike, inputs: Inputs, *, threads: int = 2) -> dict[str, Any]:
    """Peak resident memory of one ORT run of ``path`` on ``inputs``, in a fresh process, with the
    session options surgeon runs it with (``targets/_ort_memory.py``)."""
    from ._ort_memory import peak_run_memory

    fp8 = needs_fp8_option(path)
    return peak_run_memory(path, file_feeds(path, inputs), threads=threads, config=session_config(path, fp8=fp8),
                           disabled_optimizers=FP8_DISABLED_OPTIMIZERS if fp8 else ())


def run_ort(sess: Any, inputs: Inputs) -> list[np.ndarray]:
    """Run ``sess`` on torch inputs (positional order = ONNX input order)."""
    return sess.run(None, feeds_for(sess, inputs))

