"""``surgeon`` command line: analyze, optimize, export, generate, passes, targets.

Every user error is a one-line message on stderr and a documented exit code (docs/errors.md):
0 success, 2 bad input, 3 tolerance not met (best model still written), 4 would not fit in memory
(refused before any work), 5 under torchrun: another rank died or did not answer (a lost
distributed rank), 1 internal error, 130 interrupted.
``--debug`` shows tracebacks.

``surgeon passes`` / ``surgeon targets`` list the registries (``--json`` for machines) through
``surgeon.cli_listing``; docs/cli.md does not copy the listing, so a new pass or target needs no doc regenerated.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from . import cli_listing
from .errors import SurgeonError, strip_ansi
from .version import __version__


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a .pt2 file, a Hugging Face model directory, a .gguf file, package.module:factory, "
                                 "or a pickled nn.Module (.pt/.pth, needs --trust-pickle)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a pickled nn.Module (pickles can run arbitrary code)")
    p.add_argument("--text", default=None, help="sentence used as the example input of a text model")
    p.add_argument("--task", default=None, metavar="NAME",
                   help="load a Hugging Face directory with this task's head instead of its config's architecture "
                        "(Optimum's names: feature-extraction (no head), fill-mask, text-classification, "
                        "token-classification, question-answering, multiple-choice, image-classification, "
                        "audio-classification, sentence-similarity)")


def _cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import analyze
    from .loaders import load

    model, inputs = load(args.model, trust_pickle=args.trust_pickle, text=args.text, task=args.task)
    analysis = analyze(model, inputs)
    if args.json:
        print(json.dumps(analysis.to_json() if args.explain else
                         {k: v for k, v in analysis.to_json().items() if k != "near_misses"}, indent=2))
        return 0
    from ._console import print_analysis

    print_analysis(analysis, explain=args.explain)
    return 0


def _cmd_optimize(args: argparse.Namespace) -> int:
    from .pipeline.variant import run_optimize

    args.target_given = args.target is not None  # the messages say when the target is the default one
    args.target = args.target or DEFAULT_TARGET
    return run_optimize(args)  # the variant for the kind of model the target takes


def _cmd_generate(args: argparse.Namespace) -> int:
    from .seq2seq.cli import is_seq2seq_outdir, run_seq2seq_generate_cli

    if is_seq2seq_outdir(args.outdir):  # an onnx-seq2seq OUTDIR (encoder + decoder files)
        return run_seq2seq_generate_cli(args)
    from .decoder.generate_cli import run_generate_cli

    return run_generate_cli(args)


def _cmd_export(args: argparse.Namespace) -> int:
    from .export_cli import DEFAULT_EXPORT_TARGET
    from .pipeline.variant import run_export

    args.target = args.target or DEFAULT_EXPORT_TARGET
    return run_export(args)  # the variant for the kind of model the target takes



def _passes_help() -> str:
    return ("pipeline, e.g. 'attention-fp8{p_bits=8,granularity=head}' (comma-separated; default: the "
            f"target's default passes); passes: {', '.join(cli_listing.pass_names())} (`surgeon passes` lists their options)")


# A user who deploys to a CPU server wants a file that is smaller *and* faster there: INT8 for ONNX
# Runtime on x86 (portable 7-bit weights). FP8 files are dequantized on CPUs (slower than fp32).
DEFAULT_TARGET = "onnx-int8"


def _targets_help() -> str:
    return (f"one of {', '.join(cli_listing.target_names())} (default {DEFAULT_TARGET}): torch writes model.pt2 only, "
            "the others a file beside it "
            "(`surgeon targets` describes them)")



def _cmd_passes(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(cli_listing.passes_json(), indent=2, default=str))
    else:
        cli_listing.print_markdown(cli_listing.passes_markdown())
    return 0


def _cmd_targets(args: argparse.Namespace) -> int:
    if args.json:
        print(json.dumps(cli_listing.targets_json(), indent=2, default=str))
    else:
        cli_listing.print_markdown(cli_listing.targets_markdown())
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .pipeline.variant import speed_line
    from .speed import bench_outdir

    if args.runs < 1 or args.threads < 1:
        raise SurgeonError(f"--runs and --threads must be at least 1, got {args.runs} and {args.threads}")
    figures = bench_outdir(args.outdir, runs=args.runs, threads=args.threads)
    if args.json:
        print(json.dumps(figures, indent=2, default=str))
        return 0
    print(speed_line(figures))
    rep = figures["reported"]
    if rep.get("latency_ratio") is not None:
        where = (figures.get("optimized_on") or {}).get("class", "the optimizing machine")
        other = (f"cache {rep['cache_ratio']:.2f}×" if rep.get("cache_ratio") is not None
                 else f"size {rep['size_ratio']:.2f}×")
        print(f"report.json (measured on {where}): latency {rep['latency_ratio']:.2f}×, {other}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="surgeon", description="Model-surgery compiler for PyTorch.")
    parser.add_argument("--version", action="version", version=f"surgeon {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_parser = sub.add_parser

    def sub_parser(*a: Any, **kw: Any) -> argparse.ArgumentParser:
        # ``--debug`` is accepted after the command too (``surgeon optimize M -o D --debug``, as
        # docs/cli.md writes it); SUPPRESS keeps a top-level ``surgeon --debug CMD`` from being reset.
        p = add_parser(*a, **kw)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
        return p

    sub.add_parser = sub_parser  # type: ignore[method-assign]

    p = sub.add_parser("analyze", help="find attention, norm+residual and flow-coupling sites")
    _add_model_args(p)
    p.add_argument("--json", action="store_true", help="print Analysis.to_json() (keys: capture, sites, counts)")
    p.add_argument("--explain", action="store_true", help="also list near-misses and why they are not sites")
    p.set_defaults(handler=_cmd_analyze)

    p = sub.add_parser("optimize", help="substitute calibrated lightweight parts, verify, write OUTDIR")
    _add_model_args(p)
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output directory (must not exist)")
    p.add_argument("--passes", default=None, metavar="SPEC", help=_passes_help())
    p.add_argument("--calib", default=None, metavar="FILE|DIR",
                   help="calibration data: text file (one sentence per line) for HF text models, a directory "
                        "of images (HF vision models) or WAV/FLAC files (HF audio models) read through the "
                        "model's preprocessor_config.json, else a .pt file holding a list of input tuples")
    p.add_argument("--force-calib", action="store_true",
                   help="use calibration text that does not fit the model (unknown tokens, a repeated line, "
                        "lines of a few tokens) instead of refusing it")
    p.add_argument("--tolerance", default=None, metavar="T",
                   help="end-to-end output cosine to keep (default 0.999, mean over the check set); for "
                        "--target onnx-decoder: ppl_increase=0.01,agreement=0.95 (the defaults)")
    p.add_argument("--target", default=None, help=_targets_help())
    p.add_argument("--force", action="store_true", help="replace an existing OUTDIR")
    p.add_argument("--force-passes", action="store_true",
                   help="run --passes even when they cannot produce what --target promises (e.g. no INT8 "
                        "for onnx-int8); without it that is refused (exit 2)")
    p.add_argument("--seed", type=int, default=0, help="seed for fitting and data splits")
    p.add_argument("--no-speed", dest="speed", action="store_false",
                   help="do not time the written file against the original (report.json's speed)")
    p.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                   help="under torchrun: give up when another rank does not answer within this time "
                        "(default 300; docs/distributed.md)")
    p.set_defaults(handler=_cmd_optimize)

    p = sub.add_parser("export", help="write the model unchanged, no pass (onnx, torch; quantized targets: optimize)")
    _add_model_args(p)
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output directory (must not exist)")
    p.add_argument("--target", default="onnx",
                   help=f"{_targets_help()}; targets that need passes (onnx-fp8, onnx-int8) are refused")
    p.add_argument("--force", action="store_true", help="replace an existing OUTDIR")
    p.set_defaults(handler=_cmd_export)

    p = sub.add_parser("generate", help="generate text with a decoder (onnx-decoder) or seq2seq (onnx-seq2seq) OUTDIR in onnxruntime")
    p.add_argument("outdir", metavar="OUTDIR", help="a directory written by surgeon optimize --target onnx-decoder or onnx-seq2seq")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for a batch, left-padded)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate per prompt (default 32)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding (seeded)")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample (default 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="temperature of --sample (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="keep the K most likely tokens in --sample (0: all)")
    p.add_argument("--json", action="store_true", help="print prompts, completions and token ids as JSON")
    p.set_defaults(handler=_cmd_generate)

    p = sub.add_parser("passes", help="list the registered passes and their options")
    p.add_argument("--json", action="store_true", help="machine-readable: name, summary, requires, options")
    p.set_defaults(handler=_cmd_passes)

    p = sub.add_parser("bench", help="time an OUTDIR's file against its original again, on this machine")
    p.add_argument("outdir", metavar="OUTDIR", help="a directory written by surgeon optimize")
    p.add_argument("--runs", type=int, default=20, help="timed runs of each file, round robin (default 20)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads of the runtime (default 2)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(handler=_cmd_bench)

    p = sub.add_parser("targets", help="list the registered targets and their runtime profiles")
    p.add_argument("--json", action="store_true", help="machine-readable: name, format, runtime, profile, …")
    p.set_defaults(handler=_cmd_targets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        return int(args.handler(args) or 0)
    except SurgeonError as exc:
        if args.debug:
            raise
        if getattr(exc, "agreed_rank", 0) == 0:  # an error every rank raised (distributed.agree) prints once
            if exc.exit_code == 1:  # PipelineError: an internal error, named where it happened
                print(f"surgeon: {exc} (rerun with --debug for the traceback)", file=sys.stderr)
            else:
                print(f"surgeon: error: {exc}", file=sys.stderr)
        from .distributed import PeerLost, exit_after_peer_loss

        if isinstance(exc, PeerLost):
            exit_after_peer_loss(exc.exit_code)
        return exc.exit_code
    except KeyboardInterrupt:
        print("surgeon: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - an internal error still gets one line without --debug
        if args.debug:
            raise
        msg = " ".join(strip_ansi(str(exc)).split())[:400]
        print(f"surgeon: internal error: {type(exc).__name__}: {msg} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
