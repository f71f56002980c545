"""surgeon: a model-surgery compiler for PyTorch.

Python API::

    import surgeon
    model, inputs = surgeon.load("path/to/hf-model-dir")
    analysis = surgeon.analyze(model, inputs)
    analysis.counts()   # {"attention": 6, "norm_residual": 12, "coupling": 0}
    batches = surgeon.calibration_batches("sentences.txt", "path/to/hf-model-dir")
    result = surgeon.optimize(model, inputs, calib=batches, target="onnx-int8")
    result.save("out/")

The names are imported on first use (PEP 562): ``import surgeon`` and ``surgeon --version`` do not
import torch (6.6 s on a busy 2-core machine), only what is used does.
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from typing import TYPE_CHECKING, Any

from .version import __version__

# torch 2.13's own GraphModule codegen holds pytree LeafSpecs; every deepcopy of a captured graph (the
# guard copies it per rung) re-creates them through the deprecated constructor and warns in the
# user's terminal about torch's code, not theirs.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)

if TYPE_CHECKING:  # the real names for type checkers; at run time __getattr__ imports them
    from .analysis import Analysis, NearMiss, Site, analyze
    from .capture import Captured, capture
    from .errors import CaptureError, SurgeonError, ToleranceNotMet
    from .load import load
    from .optimize import Result, optimize
    from .pipeline.calib_read import calibration_batches

# name → module that defines it. Function names shadow their modules on purpose (surgeon.load is the
# function); the modules stay reachable through sys.modules / ``from surgeon.load import ...``.
_LAZY = {
    "Analysis": ".analysis", "NearMiss": ".analysis", "Site": ".analysis", "analyze": ".analysis",
    "Captured": ".capture", "capture": ".capture",
    "CaptureError": ".errors", "SurgeonError": ".errors", "ToleranceNotMet": ".errors",
    "load": ".load", "Result": ".optimize", "optimize": ".optimize",
    "calibration_batches": ".pipeline.calib_read",
}

__all__ = ["Analysis", "Captured", "CaptureError", "NearMiss", "Result", "Site", "SurgeonError",
           "ToleranceNotMet", "__version__", "analyze", "calibration_batches", "capture", "load", "optimize"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'surgeon' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps ``surgeon.load``, ``surgeon.capture`` and ``surgeon.optimize`` the functions: importing the
    submodule of the same name later would otherwise bind the module over the lazy name."""

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, types.ModuleType) and _LAZY.get(name) == f".{name}":
            return  # the submodule stays reachable through sys.modules
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
