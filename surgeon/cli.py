"""``surgeon`` command line: analyze, optimize, export.

Every user error is a one-line message on stderr and a documented exit code (docs/errors.md):
0 success, 2 bad input, 3 tolerance not met (best model still written), 4 would not fit in memory
(refused before any work), 1 internal error, 130 interrupted.
``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

from . import __version__
from .errors import SurgeonError

Handler = Callable[[argparse.Namespace], int]


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a .pt2 file, a Hugging Face model directory, package.module:factory, "
                                 "or a pickled nn.Module (.pt/.pth, needs --trust-pickle)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow loading a pickled nn.Module (pickles can run arbitrary code)")
    p.add_argument("--text", default=None, help="sentence used as the example input of a text model")


def _cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import analyze
    from .load import load

    model, inputs = load(args.model, trust_pickle=args.trust_pickle, text=args.text)
    analysis = analyze(model, inputs)
    if args.json:
        print(json.dumps(analysis.to_json() if args.explain else
                         {k: v for k, v in analysis.to_json().items() if k != "near_misses"}, indent=2))
        return 0
    from ._console import print_analysis

    print_analysis(analysis, explain=args.explain)
    return 0


def _cmd_optimize(args: argparse.Namespace) -> int:
    from .optimize import run_cli

    return run_cli(args)


def _cmd_export(args: argparse.Namespace) -> int:
    from .export_cli import run_export_cli

    return run_export_cli(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="surgeon", description="Model-surgery compiler for PyTorch.")
    parser.add_argument("--version", action="version", version=f"surgeon {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("analyze", help="find attention, norm+residual and flow-coupling sites")
    _add_model_args(p)
    p.add_argument("--json", action="store_true", help="print Analysis.to_json() (keys: capture, sites, counts)")
    p.add_argument("--explain", action="store_true", help="also list near-misses and why they are not sites")
    p.set_defaults(handler=_cmd_analyze)

    p = sub.add_parser("optimize", help="substitute calibrated lightweight parts, verify, write OUTDIR")
    _add_model_args(p)
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output directory (must not exist)")
    p.add_argument("--passes", default="attention-fp8", metavar="SPEC",
                   help="pipeline, e.g. 'attention-fp8{p_bits=8,granularity=head}' (comma-separated)")
    p.add_argument("--calib", default=None, metavar="FILE",
                   help="calibration data: text file (one sentence per line) for HF text models, "
                        "else a .pt file holding a list of input tuples")
    p.add_argument("--tolerance", default=None, metavar="T",
                   help="end-to-end output cosine to keep (default 0.999, mean over the check set)")
    p.add_argument("--target", default="torch", help="torch (model.pt2), onnx, onnx-fp8, onnx-int8")
    p.add_argument("--force", action="store_true", help="replace an existing OUTDIR")
    p.add_argument("--seed", type=int, default=0, help="seed for fitting and data splits")
    p.add_argument("--dist-timeout", type=float, default=None, metavar="SECONDS",
                   help="under torchrun: give up when another rank does not answer within this time "
                        "(default 300; docs/distributed.md)")
    p.set_defaults(handler=_cmd_optimize)

    p = sub.add_parser("export", help="export a model with no pass (onnx, onnx-fp8, onnx-int8)")
    _add_model_args(p)
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR")
    p.add_argument("--target", default="onnx")
    p.add_argument("--force", action="store_true")
    p.set_defaults(handler=_cmd_export)
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
        msg = " ".join(str(exc).split())[:400]
        print(f"surgeon: internal error: {type(exc).__name__}: {msg} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
