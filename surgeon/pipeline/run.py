"""The ``optimize`` orchestrator: capture → data → passes → calibrate/fit → verify → rebuild → export →
report (the stages are listed in ``surgeon.pipeline``'s docstring)."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import fx, nn

from ..errors import SurgeonError, stage
from ..inputs import Inputs, batch_size, call, describe
from ..metrics import Figures, Metric, logits_outputs
from ..pass_manager import Pass
from ..report import json_safe
from ..tolerance import AGREEMENT_NEEDS_LOGITS, FILE_ROUNDS, Tolerance, parse_tolerance, tighten
from ..verdict import decide
from ..verify import GuardResult, guard, measure_model
from ..version import __version__
from .data import DEFAULT_CHECK_FRACTION, prepare_batches, read_batches, split_batches
from .export import export_artifacts, export_info, reexport
from .fit import apply_passes, fit_passes, rebuild, resolve_passes
from .result import Result
from .timing import Timings

__all__ = ["DEFAULT_PASSES", "FILE_ROUNDS", "optimize"]

DEFAULT_PASSES = "attention-fp8"
MIN_CHECK_WARN = 32  # fewer check samples than this: a warning (docs/report.md, "the check set")


@dataclass
class _Built:
    """The model the guard chose, rebuilt and exported, with what the passes deliver beside it."""

    final: fx.GraphModule
    figures: Figures  # the rebuilt torch module against the original on this rank's check share
    checks: list[Any]
    artifacts: dict[str, nn.Module]
    artifact_inputs: dict[str, Any]
    artifact_exports: dict[str, Any]
    ep: Any
    export_notes: list[str]


def _build(gm0: fx.GraphModule, applied: Any, verdict: GuardResult, check_local: Sequence[Inputs],
           check: Sequence[Inputs], metric: Metric | None, example_inputs: Inputs, timings: Timings) -> _Built:
    """Stages 5 and 6: rebuild with the kept sites, measure it, the passes' checks and artifacts, export."""
    from .. import distributed

    with timings.stage("rebuild"):
        with stage("rebuild", model=applied.gm):
            final, rctx = rebuild(gm0, applied, verdict.kept, verdict.rungs)
            final.eval()
        with stage("measure", model=final):
            figures = measure_model(gm0, final, check_local, metric)
        checks: list[Any] = []
        artifacts: dict[str, nn.Module] = {}
        for p in applied.passes:
            with stage("check", pass_name=p.name, model=final), torch.no_grad():
                checks += p.check(final, rctx, check)
            with stage("artifacts", pass_name=p.name, model=final):
                artifacts.update(p.artifacts(final, rctx))  # detached: the model's export must not carry them
    with timings.stage("export"):
        # only rank 0 writes OUTDIR, so only it needs the exported program
        with stage("export", model=final):
            ep, export_notes = reexport(final, example_inputs) if distributed.is_writer() else (None, [])
        with stage("export"):
            artifact_inputs, artifact_exports = export_artifacts(artifacts, final, example_inputs)
    return _Built(final, figures, checks, artifacts, artifact_inputs, artifact_exports, ep, export_notes)


def _refusing(runner: Any, name: str, result: Result) -> Any:
    """``runner`` whose failure on a check batch is one line naming the file, the batch's shapes and
    the axes the target fixed (``shape_check.static_axes``): a file that cannot run on data the model
    accepts is a fact about the file the user must hear, not an internal error."""

    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return runner(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any runtime failure on a check batch
            from ..errors import first_line

            fixed = [str(a) for t in (result.report.get("targets") or {}).values() if isinstance(t, dict)
                     for a in ((t.get("shape_check") or {}).get("static_axes") or [])]
            why = f" (its axes {', '.join(fixed)} are static)" if fixed else ""
            raise SurgeonError(f"the written file {name} cannot run a check batch of {describe(kwargs or args)}"
                               f"{why}: {first_line(exc)}; give calibration batches of the shape it was exported "
                               "at") from exc

    return run


def _measured_on(file_fig: Figures | None, result: Result, tol: Tolerance, rounds: list[dict]) -> dict[str, Any]:
    """What ``report["end_to_end"]`` was measured on, its spread, the margined figures and the rounds."""
    if file_fig is None:
        return {"measured_on": {"what": "the rebuilt torch module"}}
    from .. import targets  # type: ignore[attr-defined]

    name = result.staged_outputs.get("target", "model.pt2")
    target = result.staged_target or "torch"
    info: dict[str, Any] = {"file": name, "target": target, "runtime": targets.get_target(target).runtime}
    config = ((result.report.get("targets") or {}).get(target) or {}).get("session_config")
    if config is not None:
        info["session_config"] = config
    return {"measured_on": info, "spread": file_fig.spread(),
            "judged": {k: tol.judged(file_fig, k) for k in tol.bounds()},
            "margin": tol.margin, "file_rounds": rounds}


def _variants(gm0: fx.GraphModule) -> dict[str, str]:
    try:
        from ..analysis import analyze_graph

        return {s.id: s.variant for s in analyze_graph(gm0).sites}
    except Exception:  # noqa: BLE001 - variants only decorate the report
        return {}


def optimize(model: nn.Module, example_inputs: Inputs, calib: Iterable[Any] | None = None, *,
             passes: str | Pass | Sequence[Pass] | None = None, tolerance: Any = None,
             metric: Metric | None = None, seed: int = 0, check_fraction: float = DEFAULT_CHECK_FRACTION,
             progress: bool = False, source: str | None = None, threads: int | str | None = "auto",
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
    ``threads``: torch intra-op threads for the run (restored after); None leaves them as they are;
    ``"auto"`` (default) is what the CLI runs with: one thread unless ``OMP_NUM_THREADS`` is set
    (calibration batches are small, and spinning OpenMP workers on a busy CPU made a MiniLM run 3.4×
    slower, bench/optimize_minilm.py).
    ``target``: the deploy target (``surgeon targets``): its runtime profile tells the passes which
    substitutes the runtime runs (and how fast), ``passes`` defaults to its ``default_passes``, and
    ``Result.save`` writes its file. None: no profile, passes ``attention-fp8``, ``save`` writes
    ``model.pt2`` (or the target named there). ``passes`` that cannot produce what ``target``
    promises (``attention-fp8`` alone for ``onnx-int8``: no INT8 anywhere) raise ``SurgeonError``
    after the passes ran, before calibration, unless ``force_passes``."""
    if threads == "auto":
        threads = None if os.environ.get("OMP_NUM_THREADS") else 1
    if threads is not None:
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise SurgeonError(f"threads must be a positive number, None or 'auto', got {threads!r}")
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return optimize(model, example_inputs, calib, passes=passes, tolerance=tolerance, metric=metric,
                            seed=seed, check_fraction=check_fraction, progress=progress, source=source,
                            threads=None, target=target, force_passes=force_passes, _timings=_timings)
        finally:
            torch.set_num_threads(previous)
    from .. import distributed
    from ..capture import capture
    from ..memory import check_memory

    timings = Timings(_timings or {})
    notes: list[str] = []
    deploy = None
    if target is not None:
        from .. import targets  # type: ignore[attr-defined]

        deploy = targets.get_target(target)  # an unknown name fails here, before any work
        deploy.require_runtime()  # so does a runtime that is not installed (an optional extra)
    pass_list = resolve_passes(passes if passes is not None else
                               (deploy.default_passes if deploy is not None else DEFAULT_PASSES))
    tol = parse_tolerance(tolerance, has_metric=metric is not None)
    if isinstance(calib, (str, os.PathLike)):  # a file, by the CLI's --calib rules
        from .calib_read import calibration as calibration_of

        calib = calibration_of(calib, model)
    text_stats = getattr(calib, "text_stats", None)  # calibration tokenized from text: what it was like
    notes += list(getattr(calib, "notes", None) or [])
    if calib is not None:
        calib = read_batches(calib)  # read once: the memory estimate and the run both need the batches
    check_memory(model, example_inputs, calib)  # InsufficientMemory (exit 4) before the work, not an OOM kill

    with timings.stage("capture"):
        cap = capture(model, example_inputs)
    gm0 = cap.gm

    if tol.agreement is not None:
        with torch.no_grad():
            has_logits = bool(logits_outputs(call(gm0, example_inputs)))
        if not has_logits:  # before calibration, not after it
            raise SurgeonError(AGREEMENT_NEEDS_LOGITS)

    with timings.stage("data"):
        batches, weak = prepare_batches(calib, example_inputs, gm0)
        split = split_batches(batches, check_fraction, seed)
        # under torchrun: the split is the single-process one, then each rank checks its strided share
        check_local = distributed.shard(split.check)
    if weak:
        notes.append("no calibration data: the example inputs calibrate and check the model, so the calibration "
                     "is weak and the check is not independent")
    elif not split.independent:
        notes.append("a single calibration batch: it is used for both fitting and checking, so the check is "
                     "not independent")

    with timings.stage("passes"):
        applied = apply_passes(gm0, pass_list, seed, profile=deploy.profile if deploy is not None else None)
    unmet = deploy.unmet_promise(applied.gm) if deploy is not None and passes is not None else None
    if unmet and not force_passes:
        spec = ",".join(p.spec() for p in pass_list)
        raise SurgeonError(f"--passes '{spec}' cannot produce what target {deploy.name} promises ({unmet} in the "  # type: ignore[union-attr]
                           f"rewritten model); its default passes are '{deploy.default_passes}' "  # type: ignore[union-attr]
                           "(or give --force-passes to write it anyway)")

    with timings.stage("calibrate"):
        cal_info = fit_passes(applied, split.fit, progress=progress)

    records = list(applied.ctx.records.values())
    # every stage from here on turns a failure other than a SurgeonError into a one-line PipelineError
    # naming the stage and the module found in the traceback, the cause chained (surgeon.errors.stage);
    # apply_passes and fit_passes do so per pass
    with timings.stage("verify"), stage("verify", model=applied.gm):
        verdict = guard(gm0, applied.gm, records, check_local, tol, metric, progress=progress)

    # Build the model the guard chose, write its file and measure that file on the check set; where
    # the file misses a tolerance the torch module met (the runtime computes what torch emulated in
    # another order, or rounds otherwise), the guard steps further down under bounds tightened by the
    # file's error ratio (tighten), and the file is written again (at most FILE_ROUNDS times).
    file_target = (deploy.name if deploy is not None else "torch") if distributed.is_writer() else None
    rounds: list[dict[str, Any]] = []
    while True:
        built = _build(gm0, applied, verdict, check_local, split.check, metric, example_inputs, timings)
        final, figures = built.final, built.figures
        result = Result(final, {"warnings": [], "model": {"source": source}}, built.ep, model, example_inputs,
                        list(split.check), verdict, built.artifacts, built.artifact_inputs, built.artifact_exports,
                        target=target)
        file_fig: Figures | None = None
        if file_target is not None:
            with timings.stage("verify_file"):
                with stage(f"save: target {file_target}", model=final):
                    path = result.stage(file_target)
                    from .. import targets  # type: ignore[attr-defined]

                    runner = _refusing(targets.get_target(file_target).open(path), path.name, result)
                with stage(f"verify: {path.name}", model=final):
                    file_fig = measure_model(gm0, runner, split.check, metric, distributed=False)
        fname = path.name if file_target is not None else None
        if distributed.active():  # every rank takes the same decision (the descent's measurements are collective)
            file_fig, fname = distributed.broadcast_object((file_fig, fname), what="the written file's figures")
        if file_fig is None:
            break
        missed = tol.violations(file_fig)
        rounds.append({"file": fname, "kept": len(verdict.kept),
                       "end_to_end_torch": figures.to_json(), "end_to_end_file": file_fig.to_json(),
                       "violations": missed, "guard_tolerance": verdict.tolerance.to_json()})
        if not missed or not verdict.kept or verdict.resume is None or len(rounds) >= FILE_ROUNDS:
            break
        tighter = tighten(verdict.tolerance, figures, file_fig)
        notes.append(f"the written file missed the tolerance the torch module met ({', '.join(missed)}); the guard "
                     f"stepped further down under {tighter.describe()}")
        with timings.stage("verify"), stage("verify", model=applied.gm):
            verdict = verdict.resume(tighter, progress=progress)
    verdict.tolerance = tol  # the report states the user's tolerance; the tightened ones are in file_rounds
    del applied.gm  # the fitted copy is no longer needed (memory)
    checks, ep, export_notes = built.checks, built.ep, built.export_notes
    notes += [n for n in export_notes if "static shapes" in n]
    torch_figures = figures
    if file_fig is not None:
        figures = file_fig
    if file_fig is not None and split.check and sum(map(batch_size, split.check)) < MIN_CHECK_WARN:
        notes.append(f"the check set has {sum(map(batch_size, split.check))} samples: its figures say little about "
                     f"data it did not see (give at least {4 * MIN_CHECK_WARN} calibration samples)")

    if not verdict.met and tol.violations(figures):
        notes.append(f"no configuration met the tolerance ({tol.describe()}); the best one measured was kept")
    elif tol.violations(figures):
        notes.append("the written model misses the tolerance by a margin the guard's measurement did not show "
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
    if text_stats is not None:
        calibration["text"] = text_stats
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
        report["end_to_end"].update(_measured_on(file_fig, result, tol, rounds))
        report["end_to_end_torch"] = {**json_safe(torch_figures.to_json()),
                                      "measured_on": "the rebuilt torch module (GraphModule), the same check set"}
        report["targets"] = result.report.get("targets", {})
        report["export"]["pt2"] = result.report.get("export", {}).get("pt2")
    # The one verdict (surgeon.verdict): what stdout, stderr, report.json and the exit code all say.
    outcome = decide(report)
    report["verdict"] = outcome.to_json()
    if outcome.status == "met_by_rollback":
        report["warnings"].append(outcome.message)
        notes.append(outcome.message)
    for n in notes if distributed.is_writer() else []:
        if "weak" in n or "not independent" in n or "tolerance" in n:
            warnings.warn(n, stacklevel=2)
    result.report = report
    return result
