"""The encoder-decoder variant on the command line: ``surgeon optimize DIR --target onnx-seq2seq`` and
``surgeon export DIR --target onnx-seq2seq`` (the same files: no pass runs yet), ``surgeon generate``
on a seq2seq OUTDIR, and ``surgeon bench``'s refusal of one."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..errors import SurgeonError, ToleranceNotMet

__all__ = ["is_seq2seq_outdir", "run_seq2seq_cli", "run_seq2seq_export_cli", "run_seq2seq_generate_cli",
           "speed_line"]


def _refuse_options(args: argparse.Namespace) -> None:
    if getattr(args, "task", None) is not None:
        raise SurgeonError(f"--task does not apply to --target {args.target}: it loads the config's "
                           "…ForConditionalGeneration class")
    # what this variant would silently ignore: no pass runs, so there is no tolerance to guard sites with
    if getattr(args, "tolerance", None) is not None:
        raise SurgeonError(f"--tolerance does not apply to --target {args.target} yet: no pass runs, and the files "
                           "are verified against fixed figures (max |Δ| ≤ 1e-3, greedy tokens identical)")


def _run(args: argparse.Namespace, passes: Any) -> int:
    from .pipeline import optimize_seq2seq

    _refuse_options(args)
    report = optimize_seq2seq(args.model, args.output, passes=passes, calib=getattr(args, "calib", None),
                              target=args.target, force=bool(getattr(args, "force", False)),
                              progress=sys.stderr.isatty())
    v, out = report["verification"], Path(args.output)
    g = v["greedy"]
    print(f"files: {', '.join(report['targets'][args.target]['files'])} (fp32, no pass: no site guarded)")
    print(f"verified in onnxruntime at batch 3: max |Δ| vs torch {max(v['max_abs_diff'].values()):.3g} "
          f"(tolerance {v['atol']:g}; logits {v['logits_max_abs_diff']:.3g}); greedy tokens identical to transformers' "
          f"generate: {g['rows_identical']} of {g['prompts']} prompts ({g['new_tokens']} new tokens)")
    print(f"written: {out} (report.json, README.md)")
    verdict = report["verdict"]
    if verdict["exit_code"]:
        raise ToleranceNotMet(f"{verdict['message']}; written to {out}")
    return 0


def run_seq2seq_cli(args: argparse.Namespace) -> int:
    """``surgeon optimize DIR -o OUTDIR --target onnx-seq2seq [--calib FILE]``."""
    return _run(args, args.passes)


def run_seq2seq_export_cli(args: argparse.Namespace) -> int:
    """``surgeon export DIR -o OUTDIR --target onnx-seq2seq``: the same files (no pass runs)."""
    return _run(args, None)


def speed_line(figures: dict[str, Any]) -> str:
    """``surgeon bench`` does not time a seq2seq OUTDIR yet: refused in one line."""
    raise SurgeonError("surgeon bench does not time an onnx-seq2seq OUTDIR yet")


def is_seq2seq_outdir(outdir: str) -> bool:
    """Whether ``outdir`` holds an encoder file (surgeon generate dispatches on it)."""
    return (Path(outdir) / "encoder_model.onnx").is_file()


def _check_positions(out: Path, token_lists: list[Any], max_new_tokens: int) -> None:
    """Refuse what would index past learned position embeddings (BART, Marian: ``max_position_embeddings``;
    T5's relative positions have no such limit) in one line, not in an ORT Gather error."""
    try:
        limit = json.loads((out / "config.json").read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError):
        return
    if not isinstance(limit, int):
        return
    for i, ids in enumerate(token_lists, 1):
        if len(ids) > limit:
            raise SurgeonError(f"prompt {i} has {len(ids)} tokens, more than the model's {limit} positions")
    if max_new_tokens + 1 > limit:
        raise SurgeonError(f"--max-new-tokens {max_new_tokens} leaves no room in the model's {limit} positions "
                           "(the decoder start token takes one)")


def run_seq2seq_generate_cli(args: Any) -> int:
    """``surgeon generate OUTDIR --prompt … [--max-new-tokens N] [--json]`` on a seq2seq OUTDIR (greedy;
    onnxruntime, numpy and the tokenizer only)."""
    from ..decoder.generate_cli import load_tokenizer
    from .runner import DECODER_FILE, DECODER_WITH_PAST_FILE, GreedyConfig, Seq2SeqRunner

    out = Path(args.outdir)
    missing = [n for n in (DECODER_FILE, DECODER_WITH_PAST_FILE, "greedy_config.json") if not (out / n).is_file()]
    if missing:
        raise SurgeonError(f"'{args.outdir}' is not a complete seq2seq OUTDIR: no {', '.join(missing)} (write one with "
                           "surgeon optimize DIR --target onnx-seq2seq -o OUTDIR)")
    if getattr(args, "sample", False):
        raise SurgeonError("--sample is not supported on a seq2seq OUTDIR yet (greedy decoding only)")
    prompts = list(args.prompt or [])
    if not prompts:
        raise SurgeonError("give at least one --prompt")
    cfg = GreedyConfig(**json.loads((out / "greedy_config.json").read_text(encoding="utf-8")))
    tok = load_tokenizer(out)
    token_lists = [tok(p)["input_ids"] for p in prompts]
    _check_positions(out, token_lists, args.max_new_tokens)
    runner = Seq2SeqRunner.open(out)
    tokens = runner.greedy(token_lists, args.max_new_tokens, cfg)
    texts = [tok.decode([t for t in row if t != cfg.pad_token_id], skip_special_tokens=True) for row in tokens]
    if getattr(args, "json", False):
        print(json.dumps({"results": [{"prompt": p, "output": t, "tokens": ids}
                                      for p, t, ids in zip(prompts, texts, tokens)]}, indent=2))
    else:
        for t in texts:
            sys.stdout.write(" ".join(t.split("\n")) + "\n")
    return 0
