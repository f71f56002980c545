"""The pipeline's decoder variant (``Target.model_kind == "decoder"``, ``--target onnx-decoder``): a
causal LM's decode step with its key/value cache, the cache format chosen by the ladder guard,
written and verified by generation and perplexity.

Stages (each timed by ``surgeon.pipeline.timing``): load (``AutoModelForCausalLM``, ``use_cache=True``)
and check the cache is the standard one → texts (``--calib`` lines split into fit and held-out parts as
``surgeon.pipeline.data.split_batches`` splits batches, or the built-in ``DEFAULT_DECODER_TEXT``) →
cache statistics on the fit part → graph passes, if any (the step captured, ``surgeon/decoder/graph.py``;
the passes run, fitted and their sites guarded as ``surgeon.pipeline.fit`` and ``check.guard_sites`` do)
→ guard (``surgeon.decoder.check``: the cache pass's ladder, e.g. int8-head → fp8-head → keep, with the
kept graph sites on, measured on the held-out part in torch against the fp32 cache) → lower
with the target → verify the file in onnxruntime (per-step logits vs torch, greedy tokens vs torch
``generate``, perplexity, cache bytes per token) → OUTDIR atomically (model.onnx, config.json,
tokenizer files, report.json with the verdict of ``surgeon.verdict.decide``, report.html, README.md).
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any, Sequence

from .. import targets  # type: ignore[attr-defined]
from ..deploy import io_spec
from ..errors import SurgeonError
from ..loaders import load_decoder
from ..pass_manager import CachePass, Pass, parse_pipeline
from ..pipeline.calib_read import read_lines
from ..pipeline.data import DEFAULT_CHECK_FRACTION, split_batches
from ..pipeline.fit import Applied, apply_passes, fit_passes, rebuild
from ..pipeline.timing import Timings
from ..profile import KEEP
from ..report import DECODER_SCHEMA, write_json
from ..report_html import write_html
from ..resources import atomic_dir, check_output_dir, publish_mode
from ..speed import DECODE_PAST, measure_decode_step
from ..targets import Target
from ..tolerance import FILE_ROUNDS, tighten
from ..verdict import decide
from ..verify import GuardResult
from ..version import __version__
from .check import SITE, VERIFY_NEW_TOKENS, CacheGuard, DecoderTolerance, Step, guard_cache, guard_sites, local_error, verify_file
from .check import figures as check_figures
from .generate import OrtRunner, left_pad, pad_and_eos, score
from .graph import GraphStep, capture_step, step_batches
from .readme import decoder_readme
from .step import DecoderStep, TorchStepRunner, check_standard_cache, collect_stats

__all__ = ["DEFAULT_DECODER_TEXT", "MIN_HELD_OUT_TOKENS", "optimize_decoder", "split_texts"]

PROMPT_TOKENS = 8  # verification prompts: the first tokens of held-out texts

# Held-out / calibration text when no --calib is given: public-domain English prose and verse (one
# paragraph a line, ~10,000 words), long enough that the seeded quarter held out is > 2,000 tokens for a
# 50k-vocabulary tokenizer: perplexity on a few dozen tokens says nothing (design §9: ×0.945 on 24 tokens).
DECODER_TEXT_FILE = "decoder_text.txt"
DEFAULT_DECODER_TEXT = tuple(line for line in (files("surgeon.data") / DECODER_TEXT_FILE).read_text(encoding="utf-8")
                             .splitlines() if line.strip())
# Fewer held-out tokens than this: a warning naming the number (the figures say little about other text).
MIN_HELD_OUT_TOKENS = 512


# Calibration prompts shorter than this (tokens) get a warning with an 8-bit cache: the scales and key
# offsets see only early positions, and RoPE rotates a key's channel pairs by an angle that grows with
# position, so later keys can leave the calibrated ranges. On bench/data/tiny-decoder, INT8 per head
# calibrated on ~20-token lines cost +2.7 % perplexity on 512-token windows, on ~550-token prompts
# +0.01 % (docs/benchmarks.md, "Decoder KV cache"); the guard's held-out lines are as short as the
# calibration's, so it cannot see this itself.
SHORT_CALIBRATION = 256


def short_calibration_warning(longest: int) -> str:
    return (f"the calibration prompts are at most {longest} tokens: the cache's scales were fitted, and the "
            f"guard checked, on positions < {longest} only; keys at later positions (rotated by RoPE) can fall "
            f"outside those ranges. Calibrate on prompts as long as the contexts you serve (docs/decoder.md)")


def _read_lines(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise SurgeonError(f"cannot read calibration file '{path}': " + ("it is a directory" if p.is_dir()
                                                                         else "no such file"))
    return read_lines(path)


def _batches(token_lists: Sequence[Sequence[int]], pad_id: int, size: int = 8) -> list[dict[str, Any]]:
    import torch

    out = []
    token_lists = sorted(token_lists, key=len)  # batches of similar lengths: less padding to run
    for i in range(0, len(token_lists), size):
        ids, mask = left_pad(token_lists[i:i + size], pad_id)
        out.append({"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)})
    return out


def split_texts(tok: Any, lines: list[str], limit: int, seed: int) -> tuple[list[list[int]], list[list[int]], Any]:
    """Token lists of the fit and held-out parts of ``lines`` and the split itself."""
    token_lists = [list(tok(s, truncation=True, max_length=limit)["input_ids"]) for s in lines]
    # lines, not sample batches: the held-out part keeps the plain fraction (its perplexity counts tokens)
    split = split_batches(token_lists, DEFAULT_CHECK_FRACTION, seed, min_check_samples=0)  # type: ignore[arg-type]
    return [list(x) for x in split.fit], [list(x) for x in split.check], split


def _split_passes(passes: str | Sequence[Pass] | None,
                  tgt: Target) -> tuple[list[Pass], list[Pass], CachePass | None]:
    """The passes (default: the target's), the graph passes among them (run on the captured step, in
    order) and the cache pass (at most one: the cache is one site)."""
    spec = tgt.default_passes if passes is None else passes
    pass_list = parse_pipeline(spec) if isinstance(spec, str) else list(spec)
    cache = [p for p in pass_list if isinstance(p, CachePass)]
    if len(cache) > 1:
        raise SurgeonError(f"target {tgt.name} runs one cache pass (the cache is the decoder's one cache site); "
                           f"got {', '.join(p.name for p in cache)}")
    return pass_list, [p for p in pass_list if not isinstance(p, CachePass)], cache[0] if cache else None


@dataclass
class _GraphSites:
    """The graph passes' sites on the captured fp32-cache step: fitted, and the guard's verdict on them."""

    gm0: Any  # the captured step, untouched (the fp32 cache's graph)
    applied: Applied
    verdict: GuardResult

    def build(self, step: DecoderStep) -> Step:
        """``step`` (any cache format) with the kept sites on their rungs, their fitted state copied in."""
        if not self.verdict.kept:
            return step
        gm0 = self.gm0 if step.cache_format is None else capture_step(step)
        gm, _ = rebuild(gm0, self.applied, self.verdict.kept, self.verdict.rungs)
        return GraphStep(gm, step)

    def report(self) -> list[dict[str, Any]]:
        """report.json's ``sites`` entries. Solo figures: the relative output error where the site acts
        on each rung measured (``local_rel_err``, what the guard ranked by), or the whole-model perplexity
        ratio and agreement with only that site on (sites without a local figure)."""
        out = []
        for c in self.verdict.sites:
            r, solo = c.record, c.solo
            local = {rung: local_error(self.applied.gm, r, rung) for rung in c.ladder if rung != KEEP}
            figures = ({"local_rel_err": local} if all(v is not None for v in local.values()) else
                       {"ppl_ratio": 1.0 + solo.max_rel_err, "agreement": solo.agreement})
            out.append({"site": r.site, "kind": r.kind, "module": r.module, "pass": r.pass_name, "status": c.status,
                        "rung": c.rung, "ladder": list(c.ladder), "reason": c.reason, "solo": figures})
        return out


def _guard_graph(step32: DecoderStep, passes: list[Pass], tgt: Target, fit: list[list[int]], held: list[list[int]],
                 pad: int, tol: DecoderTolerance, seed: int, timings: Timings) -> _GraphSites:
    """Capture the step, run the graph passes (``surgeon.pipeline.fit``), fit them on the fit texts and
    step their sites down the ladders on the held-out texts (``check.guard_sites``)."""
    with timings.stage("capture"):
        gm0 = capture_step(step32)
    with timings.stage("passes"):
        applied = apply_passes(gm0, passes, seed, profile=tgt.profile)
    if not applied.ctx.records:
        spec = ",".join(p.spec() for p in passes)
        why = "; ".join(sorted({d.reason for d in applied.diagnostics if d.reason}))[:300]
        raise SurgeonError(f"--passes '{spec}' substituted nothing in the decoder step" + (f" ({why})" if why else ""))
    with timings.stage("fit"):
        fit_passes(applied, step_batches(step32, fit, pad))
    with timings.stage("guard_sites"):
        ref = score(TorchStepRunner(step32), held, pad_id=pad)
        timings.say(f"guard: {len(applied.ctx.records)} site(s), {sum(map(len, held))} held-out tokens")
        verdict = guard_sites(applied.gm, list(applied.ctx.records.values()), step32, ref, held, pad, tol,
                              progress=timings.say)
    return _GraphSites(gm0, applied, verdict)


def optimize_decoder(model: str | os.PathLike, outdir: str | os.PathLike, *,
                     passes: str | Sequence[Pass] | None = None, calib: str | None = None,
                     tolerance: str | DecoderTolerance | None = None, target: str = "onnx-decoder", seed: int = 0,
                     force: bool = False, speed: bool = True, progress: bool = False) -> dict[str, Any]:
    """Write a verified decoder OUTDIR for the causal LM ``model`` (a Hugging Face directory or
    ``package.module:factory``); return the report (what ``report.json`` holds).

    ``passes``: a pipeline spec or list of passes (graph passes such as ``linear-quant{...}``, run on the
    captured step, and at most one cache pass, ``kv-cache-quant{...}``; default the target's default
    passes; ``[]``: the fp32 cache, as ``surgeon export`` writes it); ``calib``: a text file of
    lines (calibration prompts; a seeded quarter of them is held out for perplexity and agreement),
    else ``DEFAULT_DECODER_TEXT``; ``tolerance``: a ``DecoderTolerance`` or its spec string; ``speed``:
    with an 8-bit cache or kept graph sites, also write the fp32-cache file to ``bench/original.onnx``
    and time the decode step and prefill of each (``report["speed"]``); ``progress``: each stage and
    each guard measurement as a line on stderr, with the seconds since the start."""
    timings = Timings()
    if progress:
        timings.announce = lambda text: print(f"[{timings.elapsed():6.0f} s] {text}", file=sys.stderr, flush=True)
    out = Path(outdir)
    check_output_dir(out, force)
    tgt = targets.get_target(target)
    pass_list, graph_passes, kvq = _split_passes(passes, tgt)
    tol = DecoderTolerance.parse(tolerance)
    lines = _read_lines(calib) if calib else list(DEFAULT_DECODER_TEXT)
    with timings.stage("load"):
        loaded = load_decoder(model)
        lm: Any = loaded.model  # a transformers PreTrainedModel: config, generation_config
        tok = loaded.tokenizer
        geometry = check_standard_cache(lm, loaded.source)
    pad, eos = pad_and_eos(tok)
    limit = geometry.max_positions or 512
    fit, held, split = split_texts(tok, lines, limit, seed)
    warnings = list(loaded.notes)
    if not split.independent:
        warnings.append("a single calibration line: it is used for both calibrating and checking, so the check is "
                        "not independent")
    with timings.stage("calibrate"):
        step32 = DecoderStep(lm, geometry)
        stats = collect_stats(lm, geometry, _batches(fit, pad))
    graph = _guard_graph(step32, graph_passes, tgt, fit, held, pad, tol, seed, timings) if graph_passes else None
    with timings.stage("guard"):
        cg = guard_cache(kvq, tgt.profile, step32, stats, held, pad, tol, build=graph.build if graph else None)
    met = cg.met and (graph is None or graph.verdict.met)
    prompts = [x[:PROMPT_TOKENS] for x in (held + fit)[:2]]
    if len(prompts) == 2 and len(prompts[0]) == len(prompts[1]):
        prompts[1] = prompts[1][:-1] or prompts[1]  # different lengths: the batch is left-padded
    if any(len(p) + VERIFY_NEW_TOKENS > limit for p in prompts):
        raise SurgeonError(f"the model has {limit} positions, too few to verify {VERIFY_NEW_TOKENS} generated tokens")

    report: dict[str, Any] = {
        "schema": DECODER_SCHEMA, "surgeon_version": __version__,
        "model": {"source": loaded.source, "class": type(lm).__name__, "layers": geometry.layers,
                  "kv_heads": geometry.kv_heads, "head_dim": geometry.head_dim,
                  "max_positions": geometry.max_positions, "load_notes": list(loaded.notes)},
        "target": {"name": tgt.name, "profile": tgt.profile.to_json()},
        "passes": [p.spec() for p in pass_list],
        "calibration": {"source": calib or f"built-in text (surgeon/data/{DECODER_TEXT_FILE})",
                        "lines": len(lines), "fit_lines": len(fit), "held_out_lines": len(held),
                        "fit_tokens": int(sum(map(len, fit))), "held_out_tokens": int(sum(map(len, held))),
                        "held_out_index": split.check_index, "independent": split.independent, "seed": seed,
                        "stats_tokens": stats.tokens, "longest_fit_tokens": max(map(len, fit), default=0)},
        "warnings": warnings,
    }
    held_tokens = report["calibration"]["held_out_tokens"]
    if held_tokens < MIN_HELD_OUT_TOKENS:
        warnings.append(f"the guard's held-out text is {held_tokens} tokens (fewer than {MIN_HELD_OUT_TOKENS}): its "
                        "perplexity and agreement say little about other text; give a longer --calib")
    with atomic_dir(out, force) as partial:
        # Write the chosen step's file and judge it (the verdict is the file's); where the file misses what
        # the torch module met, the guard steps further down under bounds moved by the gap, at most
        # FILE_ROUNDS files (docs/report.md, "the file round").
        rounds: list[dict[str, Any]] = []
        run_tol = tol
        while True:
            final = cg.step
            with timings.stage("export"):
                figures = tgt.lower(final, None, partial)
                figures.pop("path", None)
            with timings.stage("verify"):
                runner = OrtRunner(tgt.session(partial / tgt.filename), tgt.filename,
                                   max_positions=geometry.max_positions)
                verification, e2e = verify_file(runner, final, lm, prompts, held, pad, eos, geometry, cg.reference, tol)
            chosen = cg.rungs[-1]
            torch_fig = check_figures(chosen["ppl_ratio"], chosen["agreement"], e2e["tokens"])
            judged = e2e.pop("_figures")
            rounds.append({"file": tgt.filename, "graph_sites_kept": len(graph.verdict.kept) if graph else 0,
                           "cache": cg.chosen, "end_to_end_torch": {"ppl_ratio": chosen["ppl_ratio"],
                                                                     "agreement": chosen["agreement"]},
                           "end_to_end_file": {k: e2e[k] for k in ("ppl_ratio", "agreement", "judged")},
                           "violations": e2e["violations"], "guard_tolerance": run_tol.describe()})
            can_step = cg.chosen != KEEP or (graph is not None and bool(graph.verdict.kept))
            if not e2e["violations"] or not can_step or len(rounds) >= FILE_ROUNDS:
                break
            run_tol = run_tol.tightened(tighten(run_tol.bounds(), torch_fig, judged))
            warnings.append(f"the written file missed the tolerance the torch module met ({'; '.join(e2e['violations'])}); "
                            f"the guard stepped further down under {run_tol.describe()}")
            timings.say(warnings[-1])
            before = _configuration(graph, cg)
            with timings.stage("guard"):
                if graph is not None and graph.verdict.kept and graph.verdict.resume is not None:
                    graph.verdict = graph.verdict.resume(run_tol.bounds())
                cg = guard_cache(kvq, tgt.profile, step32, stats, held, pad, run_tol,
                                 build=graph.build if graph else None)
            if _configuration(graph, cg) == before:
                # the torch module shows no error the tighter bounds can act on (e.g. agreement 1.0 in torch,
                # tokens flipped only by the runtime): the same file again would be judged the same
                warnings.append("the guard found no configuration to step down to under the tighter bounds; the file "
                                "written is the one judged")
                break
        file_met = not e2e["violations"]
        report["tolerance"] = {**asdict(tol), "description": tol.describe(), "met": file_met,
                               "met_in_torch": met, "judged_on": tgt.filename}
        report["guard"] = {"ladder": list(cg.ladder), "measured_in": "torch (the step module the file computes)",
                           "fp32_perplexity": cg.reference.perplexity, "rungs": cg.rungs, "chosen": cg.chosen}
        report["sites"] = (graph.report() if graph else []) + _sites(kvq, cg)
        report["cache"] = final.cache_format.to_json() if final.cache_format is not None else {"dtype": "float32"}
        report["end_to_end"] = {**e2e, "measured_on": {"file": tgt.filename, "runtime": "onnxruntime",
                                                       "session_config": figures["session_config"]},
                                "file_rounds": rounds}
        report["end_to_end_torch"] = {"ppl_ratio": cg.rungs[-1]["ppl_ratio"], "agreement": cg.rungs[-1]["agreement"],
                                      "measured_in": "torch"}
        report["verification"] = verification
        longest = report["calibration"]["longest_fit_tokens"]
        if final.cache_format is not None and longest < min(SHORT_CALIBRATION, limit):
            warnings.append(short_calibration_warning(longest))
        rolled = [r for r in cg.rungs if r["status"] == "rolled_back"]
        if rolled:
            warnings.append(f"rolled back {', '.join(r['rung'] for r in rolled)} ("
                            + "; ".join(f"{r['rung']}: {r['reason']}" for r in rolled) + ")")
        if not file_met:
            warnings.append(f"the written file misses the tolerance ({'; '.join(e2e['violations'])})"
                            + ("" if met else "; no configuration met it in torch either: the best one measured was kept"))
        # the one verdict (surgeon.verdict): what stdout, stderr, report.json and the exit code all say
        report["verdict"] = decide(report).to_json()
        report["targets"] = {tgt.name: figures}
        _write_model_files(partial, lm, tok, tgt, final, figures, report, title=Path(loaded.source).name)
        if speed and (final.cache_format is not None or isinstance(final, GraphStep)):
            with timings.stage("speed"):
                _time_decode_step(partial, tgt, step32, report, vocab=int(lm.config.vocab_size), limit=limit)
        timings["total"] = timings.elapsed()
        report["timings_s"] = timings.rounded()
        write_json(report, partial / "report.json")
        write_html(report, partial / "report.html")
        for p in partial.rglob("*"):
            if p.is_file():
                publish_mode(p)
    return report


def _configuration(graph: _GraphSites | None, cg: CacheGuard) -> tuple:
    """What a file is written from: the graph sites kept on their rungs and the cache's rung."""
    return (tuple(sorted(graph.verdict.rungs.items())) if graph else (), tuple(graph.verdict.kept) if graph else (),
            cg.chosen)


def _sites(kvq: CachePass | None, cg: CacheGuard) -> list[dict[str, Any]]:
    """The decoder's one site, its cache, as report.json's ``sites`` (none without a cache pass)."""
    if kvq is None:
        return []
    status = "rolled_back" if cg.chosen == KEEP else "applied"
    reason = "; ".join(f"{r['rung']}: {r['reason']}" for r in cg.rungs if r["status"] == "rolled_back")
    return [{"site": SITE, "kind": SITE, "module": "", "pass": kvq.name, "status": status, "rung": cg.chosen,
             "reason": reason}]


def _write_model_files(partial: Path, lm: Any, tok: Any, tgt: Target, final: Step, figures: dict[str, Any],
                       report: dict[str, Any], *, title: str) -> None:
    """config.json, generation_config.json, the tokenizer files and README.md beside the file."""
    lm.config.to_json_file(str(partial / "config.json"))
    gen_cfg = getattr(lm, "generation_config", None)
    if gen_cfg is not None:
        gen_cfg.to_json_file(str(partial / "generation_config.json"))
    tok.save_pretrained(str(partial))
    spec = io_spec(partial / tgt.filename)
    fmt = final.cache_format
    cache_name = "fp32" if fmt is None else f"{fmt.dtype} ({fmt.granularity} scales)"
    report["deploy"] = {"file": tgt.filename, **spec, "session_config": figures["session_config"], "readme": "README.md"}
    (partial / "README.md").write_text(decoder_readme(spec, cache=cache_name, session_config=figures["session_config"],
                                                      layers=final.geometry.layers, title=f"model.onnx ({title})"),
                                       encoding="utf-8")


def _time_decode_step(partial: Path, tgt: Target, step32: DecoderStep, report: dict[str, Any], *, vocab: int,
                      limit: int) -> None:
    """What the file buys on this machine: its decode step and prefill against the fp32-cache file's."""
    (partial / "bench").mkdir()
    tgt.baseline(step32, None, partial / "bench" / "original.onnx")
    report["speed"] = {**measure_decode_step(tgt, partial / tgt.filename, partial / "bench" / "original.onnx",
                                             vocab=vocab, past=min(DECODE_PAST, limit - 1)),
                       "vocab": vocab, "files": {"optimized": tgt.filename, "original": "bench/original.onnx"}}
