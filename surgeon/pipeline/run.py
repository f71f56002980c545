"""The ``optimize`` orchestrator: capture → data → passes → calibrate/fit → verify → rebuild → export →
report (the stages are listed in ``surgeon.pipeline``'s docstring)."""

from __future__ import annotations

import os
import time
import warnings
from typing import Any, Iterable, Sequence

import torch
from torch import fx, nn

from ..errors import SurgeonError, stage
from ..inputs import Inputs, batch_size, describe
from ..pass_manager import Pass
from ..verdict import decide
from ..verify import Metric, guard, measure_model, parse_tolerance
from ..version import __version__
from .data import DEFAULT_CHECK_FRACTION, prepare_batches, read_batches, split_batches
from .export import export_artifacts, export_info, reexport
from .fit import apply_passes, fit_passes, rebuild, resolve_passes
from .result import Result

__all__ = ["DEFAULT_PASSES", "optimize"]

DEFAULT_PASSES = "attention-fp8"


def _variants(gm0: fx.GraphModule) -> dict[str, str]:
    try:
        from ..analysis import analyze_graph

        return {s.id: s.variant for s in analyze_graph(gm0).sites}
    except Exception:  # noqa: BLE001 - variants only decorate the report
        return {}


def optimize(model: nn.Module, example_inputs: Inputs, calib: Iterable[Any] | None = None, *,
             passes: str | Pass | Sequence[Pass] | None = None, tolerance: Any = None,
             metric: Metric | None = None, seed: int = 0, check_fraction: float = DEFAULT_CHECK_FRACTION,
             progress: bool = False, source: str | None = None, threads: int | None = None,
             target: str | None = None, force_passes: bool = False,
             _timings: dict[str, float] | None = None) -> Result:
    """Substitute, calibrate, verify and re-export ``model``; see the module docstring.

    ``calib``: an iterable of batches (each a tuple of positional inputs or a dict of keyword inputs,
    shaped like ``example_inputs``), or a path read by the CLI's ``--calib`` rules (a ``.pt`` list of
    batches; a text file of sentences for a Hugging Face model, tokenized with its directory's
    tokenizer: ``surgeon.calibration_batches``); None → the example inputs (weak calibration, warned).
    ``tolerance``: a number (minimum mean end-to-end cosine; with ``metric``, the minimum metric), a
    string ``"cosine_min=0.995,cosine_mean=0.999"``, a dict, or a ``Tolerance``; default cosine mean
    ≥ 0.999. ``metric(ref_outputs, outputs) -> float`` (higher is better) replaces the cosine criterion
    and is averaged over the check batches. Raises ``SurgeonError`` on bad input; a configuration
    that does not meet the tolerance is still returned (``Result.met`` is False).
    ``threads``: torch intra-op threads for the run (restored after); None leaves them as they are.
    ``target``: the deploy target (``surgeon targets``): its runtime profile tells the passes which
    substitutes the runtime runs (and how fast), ``passes`` defaults to its ``default_passes``, and
    ``Result.save`` writes its file. None: no profile, passes ``attention-fp8``, ``save`` writes
    ``model.pt2`` (or the target named there). ``passes`` that cannot produce what ``target``
    promises (``attention-fp8`` alone for ``onnx-int8``: no INT8 anywhere) raise ``SurgeonError``
    after the passes ran, before calibration, unless ``force_passes``."""
    if threads is not None:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return optimize(model, example_inputs, calib, passes=passes, tolerance=tolerance, metric=metric,
                            seed=seed, check_fraction=check_fraction, progress=progress, source=source,
                            target=target, force_passes=force_passes, _timings=_timings)
        finally:
            torch.set_num_threads(previous)
    from .. import distributed
    from ..capture import capture
    from ..resources import check_memory

    timings: dict[str, float] = dict(_timings or {})
    notes: list[str] = []
    deploy = None
    if target is not None:
        from .. import targets  # type: ignore[attr-defined]

        deploy = targets.get_target(target)  # an unknown name fails here, before any work
    pass_list = resolve_passes(passes if passes is not None else
                               (deploy.default_passes if deploy is not None else DEFAULT_PASSES))
    tol = parse_tolerance(tolerance, has_metric=metric is not None)
    if isinstance(calib, (str, os.PathLike)):  # a file, by the CLI's --calib rules
        from .data import calibration_batches

        calib = calibration_batches(calib, model)
    if calib is not None:
        calib = read_batches(calib)  # read once: the memory estimate and the run both need the batches
    check_memory(model, example_inputs, calib)  # InsufficientMemory (exit 4) before the work, not an OOM kill

    t = time.perf_counter()
    cap = capture(model, example_inputs)
    gm0 = cap.gm
    timings["capture"] = time.perf_counter() - t

    t = time.perf_counter()
    batches, weak = prepare_batches(calib, example_inputs, gm0)
    split = split_batches(batches, check_fraction, seed)
    # under torchrun: the split is the single-process one, then each rank checks its strided share
    check_local = distributed.shard(split.check)
    timings["data"] = time.perf_counter() - t
    if weak:
        notes.append("no calibration data: the example inputs calibrate and check the model, so the calibration "
                     "is weak and the check is not independent")
    elif not split.independent:
        notes.append("a single calibration batch: it is used for both fitting and checking, so the check is "
                     "not independent")

    t = time.perf_counter()
    applied = apply_passes(gm0, pass_list, seed, profile=deploy.profile if deploy is not None else None)
    timings["passes"] = time.perf_counter() - t
    unmet = deploy.unmet_promise(applied.gm) if deploy is not None and passes is not None else None
    if unmet and not force_passes:
        spec = ",".join(p.spec() for p in pass_list)
        raise SurgeonError(f"--passes '{spec}' cannot produce what target {deploy.name} promises ({unmet} in the "  # type: ignore[union-attr]
                           f"rewritten model); its default passes are '{deploy.default_passes}' "  # type: ignore[union-attr]
                           "(or give --force-passes to write it anyway)")

    t = time.perf_counter()
    cal_info = fit_passes(applied, split.fit, progress=progress)
    timings["calibrate"] = time.perf_counter() - t

    t = time.perf_counter()
    records = list(applied.ctx.records.values())
    # every stage from here on turns a failure other than a SurgeonError into a one-line PipelineError
    # naming the stage and the module found in the traceback, the cause chained (surgeon.errors.stage);
    # apply_passes and fit_passes do so per pass
    with stage("verify", model=applied.gm):
        verdict = guard(gm0, applied.gm, records, check_local, tol, metric, progress=progress)
    timings["verify"] = time.perf_counter() - t

    t = time.perf_counter()
    with stage("rebuild", model=applied.gm):
        final, rctx = rebuild(gm0, applied, verdict.kept, verdict.rungs)
        final.eval()
    with stage("measure", model=final):
        figures = measure_model(gm0, final, check_local, metric)
    checks: list[Any] = []
    artifacts: dict[str, nn.Module] = {}
    for p in applied.passes:
        with stage("check", pass_name=p.name, model=final), torch.no_grad():
            checks += p.check(final, rctx, split.check)
        with stage("artifacts", pass_name=p.name, model=final):
            artifacts.update(p.artifacts(final, rctx))  # detached: the model's export must not carry them
    timings["rebuild"] = time.perf_counter() - t
    del applied.gm  # the fitted copy is no longer needed (memory)

    t = time.perf_counter()
    # only rank 0 writes OUTDIR, so only it needs the exported program
    with stage("export", model=final):
        ep, export_notes = reexport(final, example_inputs) if distributed.is_writer() else (None, [])
    notes += [n for n in export_notes if "static shapes" in n]
    with stage("export"):
        artifact_inputs, artifact_exports = export_artifacts(artifacts, final, example_inputs)
    timings["export"] = time.perf_counter() - t

    if not verdict.met and tol.violations(figures):
        notes.append(f"no configuration met the tolerance ({tol.describe()}); the best one measured was kept")
    elif tol.violations(figures):
        notes.append("the rebuilt model misses the tolerance by a margin the guard's measurement did not show "
                     f"({', '.join(tol.violations(figures))})")
    from ..report import make_report

    calibration = {
        "batches": {"fit": len(split.fit), "check": len(split.check), "total": len(batches)},
        "samples": {"fit": sum(map(batch_size, split.fit)), "check": sum(map(batch_size, split.check))},
        "check_index": split.check_index,
        "independent_check": split.independent and not weak,
        "weak": weak,
        "seed": seed,
        "check_fraction": check_fraction,
        "calibrate": cal_info,
        "world_size": distributed.world_size(),
    }
    with stage("report"):
        report = make_report(
            surgeon_version=__version__,
            model={"source": source or type(model).__name__, "class": type(model).__name__,
                   "inputs": describe(example_inputs)},
            passes=[p.spec() for p in pass_list],
            target=None if deploy is None else {"name": deploy.name, "profile": deploy.profile.to_json()},
            capture=cap.to_json(),
            calibration=calibration,
            guard=verdict,
            final=figures,
            diagnostics=applied.diagnostics,
            checks=checks,
            variants=_variants(gm0),
            timings=timings,
            export={**(export_info(ep) if ep is not None else {}), "notes": export_notes},
            warnings=notes,
        )
    # The one verdict (surgeon.verdict): what stdout, stderr, report.json and the exit code all say.
    outcome = decide(report)
    report["verdict"] = outcome.to_json()
    if outcome.status == "met_by_rollback":
        report["warnings"].append(outcome.message)
        notes.append(outcome.message)
    for n in notes if distributed.is_writer() else []:
        if "weak" in n or "not independent" in n or "tolerance" in n:
            warnings.warn(n, stacklevel=2)
    return Result(final, report, ep, model, example_inputs, list(split.check), verdict, artifacts,
                  artifact_inputs, artifact_exports, target=target)
