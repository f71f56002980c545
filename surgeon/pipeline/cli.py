"""``surgeon optimize`` on the command line: read the model and ``--calib``, run ``optimize``, save,
print the per-site table and headline figures."""

from __future__ import annotations

import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from ..errors import SurgeonError, ToleranceNotMet
from ..pass_manager import parse_pipeline
from ..tolerance import parse_tolerance
from ..verdict import decide
from .calib_read import read_calibration
from .result import Result, check_target
from .run import optimize
from .timing import Timings

__all__ = ["fmt_cosine", "print_summary", "run_cli"]


def _fmt(v: Any, digits: int = 6) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}g}"


def fmt_cosine(v: Any) -> str:
    """Cosines with six decimals: 0.9999996 must not print as 1."""
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6f}"


def _sites_table(sites: list[dict], with_reason: bool) -> tuple[Any, list[str]]:
    """The per-site table; without ``with_reason`` the reasons come back as numbered notes."""
    from rich.table import Table

    table = Table(title="surgeon optimize — sites")
    table.add_column("kind", no_wrap=True)
    table.add_column("module", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for col in ("SQNR dB", "cosine", "solo e2e"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("reason" if with_reason else "note", overflow="fold", min_width=30 if with_reason else None)
    style = {"applied": "green", "rolled_back": "red", "skipped": "dim"}
    notes: list[str] = []
    for s in sites:
        m = s.get("metrics") or {}
        status = s["status"] + (" (exact)" if s.get("exact") else "")
        reason = s.get("reason", "")
        if reason and not with_reason:
            notes.append(reason)
            reason = f"[{len(notes)}]"
        table.add_row(s["kind"], s["module"] or "<root>", f"[{style.get(s['status'], '')}]{status}[/]",
                      _fmt(m.get("sqnr_db"), 4), fmt_cosine(m.get("cosine")),
                      fmt_cosine((s.get("solo_end_to_end") or {}).get("cosine_mean")), reason)
    return table, notes


def print_summary(result: Result, outdir: Path, console: Any = None) -> None:
    """Per-site table and the headline figures."""
    from rich.console import Console

    from .._console import table_fits

    console = console or Console()
    r = result.report
    # The module path identifies the site: never truncate it. Pick the richest layout whose
    # narrowest rendering fits: the table with reasons, the table with numbered notes under it, or
    # (narrow terminals) one line per site.
    layout: tuple[Any, list[str]] | None = None
    for with_reason in (True, False):
        table, notes = _sites_table(r["sites"], with_reason)
        if table_fits(table, console.width):
            layout = (table, notes)
            break
    if r["sites"] and layout is None:
        for s in r["sites"]:
            m = s.get("metrics") or {}
            console.print(f"{s['kind']} {s['module'] or '<root>'}: {s['status']}" + (" (exact)" if s.get("exact") else "")
                          + (f", SQNR {_fmt(m.get('sqnr_db'), 4)} dB, cosine {fmt_cosine(m.get('cosine'))}"
                             if m.get("cosine") is not None else "") + (f" — {s['reason']}" if s.get("reason") else ""),
                          soft_wrap=True, markup=False, highlight=False)
    elif r["sites"] and layout is not None:
        console.print(layout[0])
        for i, note in enumerate(layout[1], 1):
            console.print(f"  [{i}] {note}", soft_wrap=True, markup=False, highlight=False)
    c, e = r["counts"], r["end_to_end"]
    console.print(f"sites: {c['applied']} applied, {c['rolled_back']} rolled back, {c['skipped']} skipped",
                  soft_wrap=True)
    on = e.get("measured_on") or {}
    where = f" on {on['file']} in {on['runtime']}" if on.get("file") else ""
    ci = (e.get("spread") or {}).get("cosine_mean_ci95")
    line = (f"end to end{where} ({e['samples']} check samples): cosine mean {fmt_cosine(e['cosine_mean'])}"
            + (f" (95 % interval {fmt_cosine(ci[0])}–{fmt_cosine(ci[1])})" if ci else "")
            + f", min {fmt_cosine(e['cosine_min'])}, max rel err {_fmt(e['max_rel_err'], 4)}")
    if e.get("agreement") is not None:
        line += f", argmax agreement {e['agreement']:.4f}"
    if e.get("metric") is not None:
        line += f", metric {_fmt(e['metric'])}"
    console.print(line + f" — tolerance ({r['tolerance']['description']}) {decide(r).summary}", soft_wrap=True)
    written = r.get("outputs", {}).get("target")
    extra = f", {outdir / written}" if written else ""
    console.print(f"report: {outdir / 'report.html'} ({outdir / 'report.json'}); model: {outdir / 'model.pt2'}{extra}",
                  soft_wrap=True, markup=False, highlight=False)
    sp = r.get("speed")
    if sp:
        line = speed_line(sp) if "latency_ratio" in sp else f"speed: not measured ({sp.get('error', 'no timing')})"
        console.print(line, soft_wrap=True, markup=False, highlight=False)


def speed_line(sp: dict) -> str:
    """One line: what the written file bought on this machine (report.json's ``speed``; a decoder
    OUTDIR's is ``surgeon.decoder.cli.speed_line``)."""
    shapes = ", ".join(f"{k} {'×'.join(map(str, v))}" for k, v in sp.get("inputs", {}).items()) or "example inputs"
    lat = sp["latency_ms"]
    return (f"speed on this machine ({sp['cpu']['class']}; {sp['runtime']}, {sp['threads']} threads, {shapes}): "
            f"latency {sp['latency_ratio']:.2f}× the original ({lat['optimized']:.1f} ms vs {lat['original']:.1f} ms, "
            f"median of {sp['runs']}), size {sp['size_ratio']:.2f}× ({sp['bytes']['optimized'] / 1e6:.1f} MB vs "
            f"{sp['bytes']['original'] / 1e6:.1f} MB)")


def run_cli(args: Any) -> int:
    """``surgeon optimize`` (argparse namespace from ``surgeon.cli``).

    Under ``torchrun`` (WORLD_SIZE > 1) it joins a gloo process group first (``--dist-timeout``):
    every rank loads the model and data, calibration and verification are shared
    (``surgeon.distributed``), and only rank 0 writes OUTDIR and prints."""
    import torch.distributed as tdist

    from .. import distributed

    created = not (tdist.is_available() and tdist.is_initialized())
    joined = distributed.init_from_env(getattr(args, "dist_timeout", None))
    try:
        code = _run_cli(args, distributed.is_writer())
    except BaseException:
        if joined and created:
            tdist.destroy_process_group()
        raise
    if joined and created:
        distributed.leave()
    return code


def _run_cli(args: Any, writer: bool) -> int:
    from .. import distributed
    from ..loaders import load_model
    from ..loaders.hf_heads import refuse_encoder_decoder_optimize
    from ..resources import check_output_dir

    out = Path(args.output)
    force = bool(getattr(args, "force", False))
    error: SurgeonError | None = None
    timings = Timings()
    try:  # every rank checks the options and reads the inputs; any rank's error stops all of them
        if writer:
            check_output_dir(out, force)
        target = getattr(args, "target", None) or "torch"
        check_target(target)
        pass_list = parse_pipeline(args.passes) if args.passes else None  # None: the target's default passes
        tol = parse_tolerance(args.tolerance)

        with timings.stage("load"):
            # an encoder-decoder directory is refused before its weights are read and before any calibration
            refuse_encoder_decoder_optimize(args.model, Path(args.model), getattr(args, "task", None))
            loaded = load_model(args.model, trust_pickle=getattr(args, "trust_pickle", False),
                                text=getattr(args, "text", None), task=getattr(args, "task", None))
        calib = read_calibration(args.calib, loaded, force=getattr(args, "force_calib", False)) if args.calib else None
    except SurgeonError as exc:
        error = exc
    distributed.agree(error, "reading the model and calibration data")
    if not args.calib and writer:
        print("surgeon: warning: no --calib given: the example inputs calibrate and check the model, so the "
              "calibration is weak (give a calibration file)", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CLI prints its own warnings from the report
        # One intra-op thread unless the user chose (OMP_NUM_THREADS): calibration batches are small,
        # and on a busy CPU spinning OpenMP workers made the whole run 3.4x slower (89 s vs 26 s for
        # MiniLM on this 2-core machine under load, bench/optimize_minilm.py).
        threads = None if os.environ.get("OMP_NUM_THREADS") else 1
        try:
            result = optimize(loaded.model, loaded.example_inputs, calib, passes=pass_list, tolerance=tol,
                              seed=getattr(args, "seed", 0), progress=sys.stderr.isatty() or sys.stdout.isatty(),
                              source=str(args.model), threads=threads, target=target,
                              force_passes=getattr(args, "force_passes", False), _timings=timings)
        except SurgeonError as exc:
            if getattr(args, "target_given", True) or not str(exc).startswith("--passes '"):
                raise
            raise SurgeonError(f"{exc}; {target} is the default target: --target onnx or --target torch writes the "
                               "model as these passes compute it") from None
    # what loading decided on the user's behalf (the class a checkpoint loaded as, a head dropped on purpose)
    result.report["model"]["load_notes"] = list(loaded.notes)
    for note in result.report["warnings"] if writer else []:
        if (args.calib or "weak" not in note) and note != result.verdict.message:  # the error line says it
            print(f"surgeon: warning: {note}", file=sys.stderr)
    result.save(out, force=force, target=target, speed=getattr(args, "speed", True))
    verdict = result.verdict  # stdout's summary line, this error, report.json's verdict: one decision
    if not writer:
        return verdict.exit_code
    print_summary(result, out)
    if verdict.exit_code:
        raise ToleranceNotMet(f"{verdict.message}; written to {out}")
    return 0
