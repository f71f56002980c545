"""``surgeon generate OUTDIR``: the decoder file of an OUTDIR written by ``surgeon optimize --target
onnx-decoder`` (or ``surgeon export``), loaded in onnxruntime with the tokenizer beside it, prompts
continued by the generation loop of ``surgeon.decoder.generate``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from ..errors import SurgeonError
from .generate import OrtRunner, Sampling, generate, pad_and_eos

__all__ = ["load_outdir", "run_generate_cli"]


def load_outdir(outdir: str | os.PathLike, *, threads: int | None = None) -> tuple[OrtRunner, Any]:
    """The decoder file of ``outdir`` (written by ``surgeon optimize --target onnx-decoder``) in ORT, and
    the tokenizer beside it; anything else is refused in one line."""
    out = Path(outdir)
    path = out / "model.onnx"
    if not path.is_file():
        raise SurgeonError(f"'{outdir}' is not a decoder OUTDIR: it has no model.onnx (write one with "
                           "surgeon optimize LM_DIR --target onnx-decoder -o OUTDIR)")
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    if "past_key_values.0.key" not in {i.name for i in graph.input}:
        raise SurgeonError(f"'{outdir}' is not a decoder OUTDIR: its model.onnx has no past_key_values.<i>.key "
                           "inputs (write one with surgeon optimize LM_DIR --target onnx-decoder -o OUTDIR)")
    max_pos = None
    try:
        cfg = json.loads((out / "config.json").read_text(encoding="utf-8"))
        max_pos = next((cfg[k] for k in ("max_position_embeddings", "n_positions") if isinstance(cfg.get(k), int)), None)
    except (OSError, ValueError):
        pass
    from .. import targets  # type: ignore[attr-defined]

    session = targets.get_target("onnx-decoder").session(path, threads=threads)
    runner = OrtRunner(session, str(path), max_positions=max_pos)
    if not (out / "tokenizer.json").is_file() and not (out / "tokenizer_config.json").is_file():
        raise SurgeonError(f"'{outdir}' has no tokenizer files (tokenizer.json): surgeon generate needs them")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(out), local_files_only=True, trust_remote_code=False)
    return runner, tok


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
