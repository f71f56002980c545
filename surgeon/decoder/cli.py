"""The decoder variant on the command line: ``surgeon optimize LM --target onnx-decoder`` and
``surgeon export LM --target onnx-decoder`` (the fp32 cache, no pass), and ``surgeon bench``'s line
for a decoder OUTDIR."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .. import targets  # type: ignore[attr-defined]
from ..errors import SurgeonError, ToleranceNotMet
from .pipeline import optimize_decoder

__all__ = ["run_decoder_cli", "run_decoder_export_cli", "speed_line"]


def _refuse_task(args: argparse.Namespace) -> None:
    # a decoder target loads the causal LM head (AutoModelForCausalLM) whatever the architecture says
    if getattr(args, "task", None) is not None:
        raise SurgeonError(f"--task does not apply to --target {args.target}: it loads the causal LM head "
                           "(AutoModelForCausalLM)")


def run_decoder_cli(args: argparse.Namespace) -> int:
    """``surgeon optimize LM -o OUTDIR --target onnx-decoder [--passes …] [--calib FILE] [--tolerance …]``."""
    _refuse_task(args)
    report = optimize_decoder(args.model, args.output, passes=args.passes, calib=args.calib,
                              tolerance=args.tolerance, target=args.target, seed=getattr(args, "seed", 0),
                              force=getattr(args, "force", False), speed=getattr(args, "speed", True),
                              progress=sys.stderr.isatty())  # stage lines on a terminal (the module variant's bars too)
    g, v = report["guard"], report["verification"]
    for r in g["rungs"]:
        print(f"kv cache {r['rung']}: {r['status']} — perplexity ×{r['ppl_ratio']:.4f}, greedy agreement "
              f"{r['agreement']:.4f} ({r['reason']})")
    sites = [s for s in report["sites"] if s["site"] != "kv_cache"]
    if sites:
        kept = [s for s in sites if s["status"] == "applied"]
        rungs = sorted({s["rung"] for s in kept})
        print(f"graph sites: {len(kept)} of {len(sites)} kept" + (f" ({', '.join(rungs)})" if rungs else "")
              + (f", {len(sites) - len(kept)} rolled back (report.json sites: why)" if len(kept) < len(sites) else ""))
    for w in report["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    c = v["cache_bytes_per_token"]
    print(f"file: cache {g['chosen']}, {c['file']:.0f} bytes/token ({c['ratio']:.2f}× fp32); perplexity "
          f"{v['perplexity']['file']:.4g} (fp32 torch {v['perplexity']['fp32_torch']:.4g}); greedy tokens vs torch "
          f"generate {v['greedy_agreement_vs_torch_generate']:.3f}; logits max |Δ| {v['logits_max_abs_diff']:.3g}")
    e = report["end_to_end"]
    lo, hi = e["spread"]["ppl_ratio_ci95"]
    print(f"tolerance ({report['tolerance']['description']}) {report['verdict']['summary']} on {e['measured_on']['file']} "
          f"in onnxruntime: perplexity ×{e['ppl_ratio']:.4f} (95 % interval {lo:.4f}–{hi:.4f} over {e['texts']} held-out "
          f"texts, judged ×{e['judged']['ppl_ratio']:.4f}), agreement {e['agreement']:.4f} on {e['tokens']} tokens")
    sp = report.get("speed")
    if sp:
        print(f"bought: cache {sp['cache_ratio']:.2f}× the fp32 cache's bytes; decode step {sp['latency_ratio']:.2f}× "
              f"the fp32-cache file's ({sp['decode_step_ms']['optimized']:.2f} vs {sp['decode_step_ms']['original']:.2f} ms "
              f"at past {sp['past_length']}, batch {sp['batch']}, this machine; surgeon bench OUTDIR times it again); "
              f"batch 1: {sp['decode_tokens_per_s_batch1']['optimized']:.1f} vs "
              f"{sp['decode_tokens_per_s_batch1']['original']:.1f} tokens/s, prefill of {sp['prefill_tokens']} tokens "
              f"{sp['prefill_ms']['optimized']:.1f} vs {sp['prefill_ms']['original']:.1f} ms")
    out = Path(args.output)
    print(f"written: {out / 'model.onnx'} ({out / 'report.json'}, {out / 'report.html'})")
    verdict = report["verdict"]
    if verdict["exit_code"]:  # one rule everywhere (surgeon.verdict): met only by rolling back everything is 3
        raise ToleranceNotMet(f"{verdict['message']}; written to {out}")
    return 0


def run_decoder_export_cli(args: argparse.Namespace) -> int:
    """``surgeon export LM -o OUTDIR --target onnx-decoder``: the causal LM with its cache, unchanged
    (the fp32 cache, no pass)."""
    _refuse_task(args)
    tgt = targets.get_target(args.target)
    report = optimize_decoder(args.model, args.output, passes=[], target=args.target,
                              force=bool(getattr(args, "force", False)))
    v = report["verification"]
    print(f"wrote {Path(args.output) / tgt.filename} (fp32 cache): ORT vs torch logits max abs diff "
          f"{v['logits_max_abs_diff']:.3g} over {v['new_tokens']} steps, greedy tokens identical to torch generate: "
          f"{'yes' if v['greedy_identical_to_torch_generate'] else 'no'}")
    return 0


def speed_line(sp: dict[str, Any]) -> str:
    """One line: what a decoder OUTDIR's file bought on this machine (one decode step, and its cache)."""
    lat = sp["decode_step_ms"]
    return (f"speed on this machine ({sp['cpu']['class']}; {sp['runtime']}, {sp['threads']} threads, one decode "
            f"step at past {sp['past_length']}, batch {sp['batch']}): latency {sp['latency_ratio']:.2f}× the "
            f"fp32-cache file ({lat['optimized']:.2f} ms vs {lat['original']:.2f} ms, median of {sp['runs']}), "
            f"cache {sp['cache_ratio']:.2f}× ({sp['cache_bytes']['optimized'] / 1e6:.1f} MB vs "
            f"{sp['cache_bytes']['original'] / 1e6:.1f} MB); batch 1: {sp['decode_tokens_per_s_batch1']['optimized']:.1f} "
            f"vs {sp['decode_tokens_per_s_batch1']['original']:.1f} tokens/s; prefill of {sp['prefill_tokens']} tokens "
            f"{sp['prefill_ms']['optimized']:.1f} vs {sp['prefill_ms']['original']:.1f} ms")
