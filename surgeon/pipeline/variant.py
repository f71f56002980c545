"""The pipeline's variants, chosen by the kind of model the target takes (``Target.model_kind``): the
command line asks the target for its kind and runs that variant's commands, never comparing target
names.

* ``module``: an encoder-style module — torch.export capture, calibration batches, end-to-end
  cosines (``surgeon.pipeline``; ``surgeon export``: ``surgeon.export_cli``);
* ``decoder``: a causal LM's decode step with its key/value cache — texts, perplexity and greedy
  agreement (``surgeon.decoder``);
* ``encoder-decoder``: a seq2seq model as encoder + decoder + decoder-with-past files — texts, greedy
  equality with transformers' ``generate`` (``surgeon.seq2seq``).

Each variant's modules are imported only when it runs (the decoder's need transformers).
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["model_kind", "run_export", "run_optimize", "speed_line"]


def model_kind(target: str) -> str:
    """The kind of model ``target`` takes (an unknown name is refused here, before any work)."""
    from .. import targets  # type: ignore[attr-defined]

    return targets.get_target(target).model_kind


def run_optimize(args: argparse.Namespace) -> int:
    """``surgeon optimize`` with ``args.target`` (already defaulted) through its variant."""
    kind = model_kind(args.target)
    if kind == "decoder":
        from ..decoder.cli import run_decoder_cli

        return run_decoder_cli(args)
    if kind == "encoder-decoder":
        from ..seq2seq.cli import run_seq2seq_cli

        return run_seq2seq_cli(args)
    from .cli import run_cli

    return run_cli(args)


def run_export(args: argparse.Namespace) -> int:
    """``surgeon export`` with ``args.target`` (already defaulted) through its variant."""
    kind = model_kind(args.target)
    if kind == "decoder":
        from ..decoder.cli import run_decoder_export_cli

        return run_decoder_export_cli(args)
    if kind == "encoder-decoder":
        from ..seq2seq.cli import run_seq2seq_export_cli

        return run_seq2seq_export_cli(args)
    from ..export_cli import run_export_cli

    return run_export_cli(args)


def speed_line(figures: dict[str, Any]) -> str:
    """``surgeon bench``'s line for the figures of ``speed.bench_outdir`` (its ``target`` says the kind)."""
    kind = model_kind(figures["target"])
    if kind == "decoder":
        from ..decoder.cli import speed_line as decoder_line

        return decoder_line(figures)
    if kind == "encoder-decoder":
        from ..seq2seq.cli import speed_line as seq2seq_line

        return seq2seq_line(figures)
    from .cli import speed_line as module_line

    return module_line(figures)
