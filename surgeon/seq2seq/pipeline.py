"""The pipeline's encoder-decoder variant (``Target.model_kind == "encoder-decoder"``, ``--target
onnx-seq2seq``): check the directory (config, tokenizer: refusals in the first seconds) → load → prompts
(held-out ``--calib`` lines, or lines of the built-in text) → export the three files → verify them in
onnxruntime (``surgeon.seq2seq.check``) → OUTDIR atomically (the files, config.json,
generation_config.json, greedy_config.json, tokenizer files, report.json, README.md).

No pass runs: the files hold the model's fp32 weights and no site is guarded (report.json says so);
``--passes`` other than none is refused before any work."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .. import targets  # type: ignore[attr-defined]
from ..deploy import io_spec
from ..errors import SurgeonError
from ..pipeline.calib_read import read_lines
from ..pipeline.timing import Timings
from ..report import write_json
from ..resources import atomic_dir, check_output_dir, publish_mode
from ..version import __version__
from .check import VERIFY_NEW_TOKENS, verify_files
from .export import FILES
from .load import check_seq2seq_dir, load_seq2seq
from .readme import seq2seq_readme
from .runner import GreedyConfig, Seq2SeqRunner

__all__ = ["SEQ2SEQ_SCHEMA", "optimize_seq2seq", "seq2seq_verdict"]

SEQ2SEQ_SCHEMA = "surgeon.seq2seq/1"
PROMPT_TOKENS = (12, 9, 6)  # three held-out prompts of different lengths: one padded batch of 3
NOT_GUARDED = ("onnx-seq2seq writes the model's fp32 weights: no pass is applied and no site is guarded yet "
               "(quantizing the encoder and decoder Linear layers is not implemented)")


def _refuse_passes(passes: str | Sequence[Any] | None, target: str) -> None:
    spec = passes if isinstance(passes, str) else ",".join(getattr(p, "name", str(p)) for p in passes or [])
    if spec and spec != "none":  # "none": the target's stated default
        raise SurgeonError(f"--target {target} runs no pass yet (it writes fp32 weights and guards no site): "
                           f"drop --passes '{spec}'")


def _prompt_lines(calib: str | None) -> list[str]:
    if calib is None:
        from ..decoder.pipeline import DEFAULT_DECODER_TEXT

        return list(DEFAULT_DECODER_TEXT[:len(PROMPT_TOKENS)])
    p = Path(calib)
    if not p.is_file():
        raise SurgeonError(f"cannot read calibration file '{calib}': " + ("it is a directory" if p.is_dir()
                                                                         else "no such file"))
    lines = read_lines(calib)
    if not lines:
        raise SurgeonError(f"calibration file '{calib}' has no text lines: onnx-seq2seq verifies on its lines")
    return lines[-len(PROMPT_TOKENS):]  # the held-out end of the file


def greedy_config(model: Any) -> GreedyConfig:
    """The ids the greedy loop needs, from the model's generation config then its config."""
    gen = getattr(model, "generation_config", None)
    return GreedyConfig.from_dicts(gen.to_dict() if gen is not None else {}, model.config.to_dict())


def optimize_seq2seq(source: str, out: str | os.PathLike, *, passes: str | Sequence[Any] | None = None,
                     calib: str | None = None, target: str = "onnx-seq2seq", force: bool = False,
                     progress: bool = False) -> dict[str, Any]:
    """Write and verify OUTDIR for the encoder-decoder directory ``source``; return the report (its
    ``verification["ok"]`` says whether every figure is within its tolerance)."""
    import torch

    timings = Timings()
    if progress:
        timings.announce = lambda text: print(f"[{timings.elapsed():6.0f} s] {text}", file=sys.stderr, flush=True)
    out = Path(out)
    tgt = targets.get_target(target)
    _refuse_passes(passes, target)
    check_output_dir(out, force)
    with timings.stage("load"):
        check_seq2seq_dir(source)  # config only: the refusals come before any weight is read
        loaded = load_seq2seq(source)
    model: Any = loaded.model  # a transformers PreTrainedModel
    tok = loaded.tokenizer
    cfg = greedy_config(model)
    lines = _prompt_lines(calib)
    # cut by hand, keeping the closing special token: truncation=True would set a fast tokenizer's truncation
    # state, which save_pretrained writes into OUTDIR/tokenizer.json
    prompts = [(ids[:n - 1] + ids[-1:]) if len(ids) > n else ids
               for ids, n in ((list(tok(s)["input_ids"]), n) for s, n in zip(lines, PROMPT_TOKENS))]
    vocab = int(model.config.vocab_size)
    with torch.no_grad():  # the decoder's layer count as its cache sees it (configs name it differently)
        ids = torch.tensor([[cfg.decoder_start_token_id, cfg.decoder_start_token_id]])
        out_ = model(input_ids=ids, decoder_input_ids=ids, use_cache=True)
        cache = out_["cache"] if "cache" in out_ else out_["past_key_values"]  # (transformers 5.24 renamed it)
        layers = len(cache.self_attention_cache.layers)
    report: dict[str, Any] = {
        "schema": SEQ2SEQ_SCHEMA, "surgeon_version": __version__,
        "model": {"source": loaded.source, "class": type(model).__name__, "decoder_layers": layers, "vocab": vocab,
                  "load_notes": list(loaded.notes)},
        "target": {"name": tgt.name, "model_kind": tgt.model_kind, "profile": tgt.profile.to_json()},
        "passes": [], "sites": [], "guarded": False, "note": NOT_GUARDED,
        "prompts": {"source": calib or "built-in text (surgeon/data/decoder_text.txt)", "count": len(prompts),
                    "tokens": [len(p) for p in prompts]},
        "greedy_config": cfg.__dict__,
    }
    with atomic_dir(out, force) as partial:
        with timings.stage("export"):
            report["targets"] = {tgt.name: tgt.lower(model, None, partial, layers=layers, vocab=vocab)}
            report["targets"][tgt.name].pop("path", None)
        with timings.stage("verify"):
            runner = Seq2SeqRunner.open(partial)
            report["verification"] = verify_files(runner, model, layers, vocab, prompts, cfg, VERIFY_NEW_TOKENS)
        _write_files(partial, model, tok, report, layers, title=Path(loaded.source).name)
        report["verdict"] = seq2seq_verdict(report["verification"])
        timings["total"] = timings.elapsed()
        report["timings_s"] = timings.rounded()
        write_json(report, partial / "report.json")
        for p in partial.rglob("*"):
            if p.is_file():
                publish_mode(p)
    return report


def seq2seq_verdict(v: dict[str, Any]) -> dict[str, Any]:
    """report.json's ``verdict`` from ``verification``: exit 0 when every figure holds, else 3 (the files
    are still written, as for every target) with what missed."""
    if v["ok"]:
        return {"status": "met", "exit_code": 0, "message": "every file within its tolerance, greedy tokens identical"}
    why = []
    if not v["within_atol"]:
        why.append(f"max |Δ| {max(v['max_abs_diff'].values()):.3g} > {v['atol']:g}")
    if not v["greedy"]["identical_to_transformers_generate"]:
        why.append(f"greedy tokens differ from transformers' generate in "
                   f"{v['greedy']['prompts'] - v['greedy']['rows_identical']} of {v['greedy']['prompts']} prompts")
    return {"status": "not_met", "exit_code": 3, "message": "verification missed: " + "; ".join(why)}


def _write_files(partial: Path, model: Any, tok: Any, report: dict[str, Any], layers: int, *, title: str) -> None:
    model.config.to_json_file(str(partial / "config.json"))
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.to_json_file(str(partial / "generation_config.json"))
    (partial / "greedy_config.json").write_text(json.dumps(report["greedy_config"], indent=2) + "\n", encoding="utf-8")
    tok.save_pretrained(str(partial))
    specs = {name: io_spec(partial / name) for name in FILES}
    report["deploy"] = {"files": specs, "readme": "README.md"}
    (partial / "README.md").write_text(seq2seq_readme(specs, layers=layers, title=f"{title}: encoder + decoder files"),
                                       encoding="utf-8")
