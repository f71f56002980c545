"""OpenVINO's CPU plugin the way surgeon compiles its files, and a server should too.

``require_openvino`` imports ``openvino`` lazily (it is the optional extra ``surgeon[openvino]``;
without it every OpenVINO entry point fails with one line naming the extra). ``precision_hint`` is
the inference precision the file is served with — ``bf16`` where the CPU has bf16 arithmetic
(AVX512-BF16, AMX), else ``f32`` — and ``deploy_config`` the compile properties that go beside the
file (``openvino_config.json``): the file is verified, timed and served with the same ones, since a
file verified in f32 and served in bf16 is not verified. ``compile_file`` compiles with them,
``infer`` runs torch inputs, ``runtime_layers`` reads what the plugin runs (layer type and execution
precision per node of ``get_runtime_model()``). This module imports neither torch nor surgeon's
exporters at import time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from surgeon.errors import SurgeonError

__all__ = ["CONFIG_FILE", "EXTRA_HINT", "require_openvino", "precision_hint", "deploy_config", "read_config",
           "compile_file", "feeds_for", "infer", "runtime_layers", "layer_kind", "int8_layers"]

EXTRA_HINT = "pip install 'surgeon[openvino]'"
CONFIG_FILE = "openvino_config.json"  # the compile properties beside model.xml (deploy config)
HINT_KEY = "INFERENCE_PRECISION_HINT"


def require_openvino() -> Any:
    """The ``openvino`` module, or a one-line ``SurgeonError`` naming the extra that installs it."""
    try:
        import openvino
    except ImportError:
        raise SurgeonError(f"the openvino targets need OpenVINO, which is not installed: {EXTRA_HINT}") from None
    return openvino


def _core() -> Any:
    ov = require_openvino()
    return ov.Core()


def precision_hint() -> str:
    """``bf16`` where OpenVINO's CPU plugin computes in bf16 on this CPU (its ``BF16`` capability:
    AVX512-BF16 or AMX), else ``f32``. It is OpenVINO's own default there; stated explicitly so that
    the verified file and the served one compute alike on whatever machine serves it."""
    caps = _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "bf16" if "BF16" in [str(c) for c in caps] else "f32"


def deploy_config(hint: str | None = None) -> dict[str, str]:
    """The compile properties the file is verified, timed and served with."""
    return {HINT_KEY: hint or precision_hint()}


def read_config(path: str | os.PathLike) -> dict[str, str]:
    """The deploy config beside ``path`` (``openvino_config.json``), else this CPU's ``deploy_config``."""
    cfg = Path(path).with_name(CONFIG_FILE)
    if cfg.is_file():
        try:
            data = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SurgeonError(f"cannot read '{cfg}': {exc}") from None
        props = data.get("compile_properties") if isinstance(data, dict) else None
        if isinstance(props, dict):
            return {str(k): str(v) for k, v in props.items()}
    return deploy_config()


def compile_file(path: str | os.PathLike, *, config: dict[str, str] | None = None, threads: int | None = None) -> Any:
    """``path`` (IR ``.xml`` or ONNX) compiled for the CPU plugin with ``config`` (default: the deploy
    config beside it); ``threads`` caps the inference threads (one stream, latency mode)."""
    p = Path(path)
    if not p.is_file():
        raise SurgeonError(f"'{p}' does not exist")
    props: dict[str, Any] = dict(config if config is not None else read_config(p))
    if threads:
        props.update({"INFERENCE_NUM_THREADS": int(threads), "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"})
    core = _core()
    try:
        return core.compile_model(core.read_model(str(p)), "CPU", props)
    except RuntimeError as exc:
        line = str(exc).strip().splitlines()
        raise SurgeonError(f"OpenVINO cannot compile '{p.name}': {line[0] if line else exc}") from None


def feeds_for(compiled: Any, inputs: Any) -> dict[str, Any]:
    """Torch (or numpy) inputs as the compiled model's feeds, by name (keywords) or in order."""
    import numpy as np

    from surgeon.inputs import as_args_kwargs

    names = [i.get_any_name() for i in compiled.inputs]
    args, kwargs = as_args_kwargs(inputs)

    def arr(v: Any) -> Any:
        return v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)

    if kwargs and not args and all(n in kwargs for n in names):
        return {n: arr(kwargs[n]) for n in names}
    values = [v for v in list(args) + list(kwargs.values()) if hasattr(v, "shape")]
    if len(names) != len(values):
        raise SurgeonError(f"the OpenVINO model has {len(names)} inputs but {len(values)} tensors were given")
    return {n: arr(v) for n, v in zip(names, values)}


def infer(compiled: Any, feeds: dict[str, Any], request: Any = None) -> list[Any]:
    """One run: the outputs as numpy arrays, in the model's output order."""
    req = request if request is not None else compiled.create_infer_request()
    req.infer(feeds)
    return [req.get_output_tensor(i).data.copy() for i in range(len(compiled.outputs))]


def runtime_layers(compiled: Any) -> list[dict[str, str]]:
    """What the CPU plugin runs: per node of the runtime model its name, layer type, execution
    precision (``rt_info`` ``layerType`` / ``runtimePrecision``) and its inputs' element types."""
    def get(info: Any, key: str) -> str:
        return str(info[key].astype(str)) if key in info else ""

    rows = []
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        rows.append({"name": op.get_friendly_name(), "type": get(info, "layerType"),
                     "precision": get(info, "runtimePrecision"),
                     "inputs": [i.get_element_type().get_type_name() for i in op.inputs()]})
    return rows


def layer_kind(row: dict[str, Any]) -> str:
    """``int8`` (an int8 activation times an int8 weight), ``int8-weight`` (a float activation times a
    compressed u8/i8 weight, dequantized in the kernel) or the float precision a layer runs in. The
    plugin reports ``i8`` as the precision of both int8 kinds; the activation's type tells them apart."""
    inputs = row.get("inputs") or []
    if row["precision"] not in ("u8", "i8"):
        return row["precision"] or "?"
    return "int8-weight" if inputs and inputs[0] not in ("u8", "i8") else "int8"


def int8_layers(compiled: Any) -> dict[str, Any]:
    """How many FullyConnected / MatMul / Convolution layers run in int8 (u8/i8 activation and weight),
    how many with compressed int8 weights and a float activation, and how many in float."""
    counts: dict[str, dict[str, int]] = {}
    for row in runtime_layers(compiled):
        if row["type"] in ("FullyConnected", "MatMul", "Convolution"):
            kind = layer_kind(row)
            counts.setdefault(row["type"], {}).setdefault(kind, 0)
            counts[row["type"]][kind] += 1
    int8 = sum(c.get("int8", 0) for c in counts.values())
    weight = sum(c.get("int8-weight", 0) for c in counts.values())
    return {"layers": counts, "int8": int8, "int8_weight": weight,
            "float": sum(sum(c.values()) for c in counts.values()) - int8 - weight}
