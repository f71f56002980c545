"""``surgeon.optimize``: the optimize pipeline, kept importable under its old module name.

The code lives in ``surgeon.pipeline`` (one module per stage). ``import surgeon; surgeon.optimize(...)``
is the function: ``surgeon/__init__.py`` imports this module first, then binds the name to the function.
"""

from __future__ import annotations

from .pipeline import *  # noqa: F401,F403
from .pipeline import (  # noqa: F401
                       DEFAULT_CHECK_FRACTION,
                       DEFAULT_PASSES,
                       TEXT_BATCH,
                       TEXT_MAX_LENGTH,
                       Applied,
                       Result,
                       Split,
                       __all__,  # noqa: F401
                       apply_passes,
                       check_target,
                       export_artifacts,
                       export_info,
                       fit_passes,
                       fmt_cosine,
                       optimize,
                       plain_outputs,
                       prepare_batches,
                       print_summary,
                       read_calibration,
                       rebuild,
                       reexport,
                       resolve_passes,
                       run_cli,
                       split_batches,
)
