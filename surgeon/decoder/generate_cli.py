"""``surgeon generate OUTDIR``: the decoder file of an OUTDIR written by ``surgeon optimize --target
onnx-decoder`` (or ``surgeon export``), loaded in onnxruntime with the tokenizer beside it, prompts
continued by the generation loop of ``surgeon.decoder.generate``. Its path imports onnxruntime, numpy and
``tokenizers`` only (no torch, no transformers): it starts in about a second, not the several that importing
torch costs."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import SurgeonError
from ..ort_options import FP8_DISABLED_OPTIMIZERS, FP8_SESSION_OPTION
from .generate import OrtRunner, Sampling, generate, pad_and_eos
from .light_tokenizer import light_tokenizer

__all__ = ["FP8_DISABLED_OPTIMIZERS", "load_outdir", "load_tokenizer", "run_generate_cli"]


_NOT_DECODER = ("'{outdir}' is not a decoder OUTDIR: its model.onnx has no past_key_values.<i>.key inputs (write one "
                "with surgeon optimize LM_DIR --target onnx-decoder -o OUTDIR)")


def _session_config(out: Path) -> dict[str, str] | None:
    """The session config the file was verified with, as ``report.json`` states it for servers
    (``deploy.session_config``); ``None`` when the OUTDIR does not say."""
    try:
        config = json.loads((out / "report.json").read_text(encoding="utf-8"))["deploy"]["session_config"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {str(k): str(v) for k, v in config.items()} if isinstance(config, dict) else None


def _session(out: Path, path: Path, threads: int | None) -> Any:
    """An ORT CPU session as the target opens it (``DecoderTarget.session``), built from the OUTDIR's
    stated session config with onnxruntime alone; an OUTDIR without one goes through the target."""
    config = _session_config(out)
    if config is None:
        from .. import targets  # type: ignore[attr-defined]

        return targets.get_target("onnx-decoder").session(path, threads=threads)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    for key, value in config.items():
        so.add_session_config_entry(key, value)
    fp8 = config.get(FP8_SESSION_OPTION[0]) == FP8_SESSION_OPTION[1]
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(FP8_DISABLED_OPTIMIZERS) if fp8 else None)


def load_tokenizer(out: Path) -> Any:
    """``tokenizers`` alone where the OUTDIR's files allow it (``light_tokenizer``), else transformers'."""
    tok = light_tokenizer(out)
    if tok is not None:
        return tok
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True, trust_remote_code=False)


def load_outdir(outdir: str | os.PathLike, *, threads: int | None = None) -> tuple[OrtRunner, Any]:
    """The decoder file of ``outdir`` (written by ``surgeon optimize --target onnx-decoder``) in ORT, and
    the tokenizer beside it; anything else is refused in one line. Neither imports torch when the
    OUTDIR has its ``report.json`` and a ``tokenizer.json``, as surgeon writes them."""
    out = Path(outdir)
    path = out / "model.onnx"
    if not path.is_file():
        raise SurgeonError(f"'{outdir}' is not a decoder OUTDIR: it has no model.onnx (write one with "
                           "surgeon optimize LM_DIR --target onnx-decoder -o OUTDIR)")
    max_pos = None
    try:
        cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
        max_pos = next((cfg[k] for k in ("max_position_embeddings", "n_positions") if isinstance(cfg.get(k), int)), None)
    except (OSError, ValueError):
        pass
    session = _session(out, path, threads)
    # the session's inputs, not onnx.load: reading a large file's proto again costs seconds and its size in memory
    if "past_key_values.0.key" not in {i.name for i in session.get_inputs()}:
        raise SurgeonError(_NOT_DECODER.format(outdir=outdir))
    if not (out / "tokenizer.json").is_file() and not (out / "tokenizer_config.json").is_file():
        raise SurgeonError(f"'{outdir}' has no tokenizer files (tokenizer.json): surgeon generate needs them")
    return OrtRunner(session, str(path), max_positions=max_pos), load_tokenizer(out)


def run_generate_cli(args: Any) -> int:
    """``surgeon generate OUTDIR --prompt … [--prompt …] --max-new-tokens N [--sample --seed S
    --temperature T --top-k K] [--json]``: prints each prompt with its continuation."""
    runner, tok = load_outdir(args.outdir)
    prompts = list(args.prompt or [])
    if not prompts:
        raise SurgeonError("give at least one --prompt")
    token_lists = [tok(p)["input_ids"] for p in prompts]
    sampling = Sampling(args.seed, args.temperature, args.top_k) if args.sample else None
    pad, eos = pad_and_eos(tok)
    gen = generate(runner, token_lists, args.max_new_tokens, pad_id=pad, eos_id=eos, sampling=sampling)
    texts = []
    for ids in gen.tokens:
        cut = ids[:ids.index(eos) + 1] if eos is not None and eos in ids else ids
        texts.append(tok.decode(cut, skip_special_tokens=True))
    if getattr(args, "json", False):
        print(json.dumps({"results": [{"prompt": p, "completion": t, "tokens": ids}
                                      for p, t, ids in zip(prompts, texts, gen.tokens)]}, indent=2))
    else:
        for p, t in zip(prompts, texts):
            sys.stdout.write(" ".join((p + t).split("\n")) + "\n")
    return 0
