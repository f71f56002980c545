"""The optimize pipeline: capture → passes → calibrate/fit → guard → rebuild → re-export → report.

One module per stage (read in this order): ``data`` (2), ``fit`` (3, 5), ``export`` (6), ``result``
(``Result``, ``save``), ``run`` (the ``optimize`` orchestrator that calls them), ``cli`` (``surgeon
optimize``), ``timing`` (the stage clock behind ``timings_s``). Capture is ``surgeon.capture``, the
guard ``surgeon.verify``, calibration ``surgeon.calibration``, the report ``surgeon.report``.
``variant`` picks the pipeline for the kind of model the target takes (``Target.model_kind``): this
one for an encoder-style ``module``, ``surgeon.decoder.pipeline`` for a ``decoder`` with its cache.

Python API::

    result = surgeon.optimize(model, example_inputs, calib=batches, passes="attention-fp8",
                              tolerance=0.999, metric=None)
    result.module          # the optimized GraphModule (kept sites only), same inputs/outputs as the model
    result.report          # the dict written to report.json (docs/report.md)
    result.save("out/")    # model.pt2 + report.json + report.html, atomically

Stages (each a plain function with a typed result; ``timings_s`` in the report names them):

1. ``capture`` the model (dynamic batch/sequence); the captured ``gm0`` is never modified.
2. ``prepare_batches``: materialise the calibration batches (inputs only) and validate them before any
   work: non-empty, finite, same structure/dtype/rank as the example inputs, and accepted by ``gm0``;
   ``split_batches``: a seeded split into fit and check parts (the check part is never used to fit).
3. ``apply_passes`` on a copy of ``gm0``; ``fit_passes``: ``calibrate`` then every pass's ``fit``, on
   the fit batches only.
4. ``surgeon.verify.guard`` on the check batches: per-site and end-to-end figures, rollback.
5. ``rebuild``: a fresh copy of ``gm0`` with only the kept sites substituted, calibrated state copied
   site by site; its end-to-end figures are the reported ones. Then each pass's ``check`` (tests the
   guard cannot make: a flow inverse's reconstruction error) and ``artifacts`` (modules delivered
   beside the model: ``Result.inverse``, ``inverse.pt2``).
6. ``reexport`` with ``torch.export`` (batch/sequence dynamic where the original accepted any size);
   ``Result.save`` writes ``OUTDIR`` atomically.
"""

from __future__ import annotations

from .calib_read import read_calibration
from .calib_text import TEXT_BATCH, TEXT_MAX_LENGTH
from .cli import fmt_cosine, print_summary, run_cli
from .data import DEFAULT_CHECK_FRACTION, Split, prepare_batches, split_batches
from .export import export_artifacts, export_info, plain_outputs, reexport
from .fit import Applied, apply_passes, fit_passes, rebuild, resolve_passes
from .result import Result, check_target
from .run import DEFAULT_PASSES, optimize

__all__ = ["DEFAULT_CHECK_FRACTION", "DEFAULT_PASSES", "TEXT_BATCH", "TEXT_MAX_LENGTH", "Applied", "Result", "Split",
           "apply_passes", "check_target", "export_artifacts", "export_info", "fit_passes", "fmt_cosine", "optimize",
           "plain_outputs", "prepare_batches", "print_summary", "read_calibration", "rebuild", "reexport",
           "resolve_passes", "run_cli", "split_batches"]
