"""surgeon: a model-surgery compiler for PyTorch.

Python API::

    import surgeon
    model, inputs = surgeon.load("path/to/hf-model-dir")
    analysis = surgeon.analyze(model, inputs)
    analysis.counts()   # {"attention": 6, "norm_residual": 12, "coupling": 0}
    result = surgeon.optimize(model, inputs, calib=batches, passes="attention-fp8")
    result.save("out/")
"""

from __future__ import annotations

from .analysis import Analysis, NearMiss, Site, analyze  # noqa: E402
from .capture import Captured, capture  # noqa: E402
from .errors import CaptureError, SurgeonError, ToleranceNotMet  # noqa: E402

# Function names shadow their modules on purpose (surgeon.load is the function); the modules stay
# reachable through sys.modules / ``from surgeon.load import ...``.
from .load import load  # noqa: E402
from .optimize import Result, optimize  # noqa: E402
from .version import __version__  # noqa: E402

__all__ = ["Analysis", "Captured", "CaptureError", "NearMiss", "Result", "Site", "SurgeonError",
           "ToleranceNotMet", "__version__", "analyze", "capture", "load", "optimize"]
