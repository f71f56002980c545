"""``OUTDIR/README.md`` of a seq2seq OUTDIR: the three files' inputs and outputs and a greedy loop with
onnxruntime, numpy and ``tokenizers`` only (tests/test_seq2seq_export.py runs the loop in a fresh
process)."""

from __future__ import annotations

from typing import Any

__all__ = ["GREEDY_SNIPPET", "seq2seq_readme"]

# The loop of surgeon.seq2seq.runner.Seq2SeqRunner.greedy for one prompt, written out (no surgeon import).
GREEDY_SNIPPET = '''import json
import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

PROMPT = "translate this"
MAX_NEW_TOKENS = 32
so = ort.SessionOptions()
enc, dec, dec_past = (ort.InferenceSession(f, so, providers=["CPUExecutionProvider"]) for f in
                      ("encoder_model.onnx", "decoder_model.onnx", "decoder_with_past_model.onnx"))
cfg = json.load(open("greedy_config.json"))
tok = Tokenizer.from_file("tokenizer.json")
ids = np.array([tok.encode(PROMPT).ids], dtype=np.int64)
mask = np.ones_like(ids)
hidden = enc.run(None, {"input_ids": ids, "attention_mask": mask})[0]
cur = np.array([[cfg["decoder_start_token_id"]]], dtype=np.int64)
out = dec.run(None, {"input_ids": cur, "encoder_hidden_states": hidden, "encoder_attention_mask": mask})
# the first step returns both caches; later steps grow the self-attention part (".decoder.") only
past = {o.name.replace("present", "past_key_values", 1): v for o, v in zip(dec.get_outputs()[1:], out[1:])}
tokens = []
for step in range(MAX_NEW_TOKENS):
    nxt = int(out[0][0, -1].argmax())
    if step == 0 and cfg.get("forced_bos_token_id") is not None:
        nxt = cfg["forced_bos_token_id"]
    if step == MAX_NEW_TOKENS - 1 and cfg.get("forced_eos_token_id") is not None:
        nxt = cfg["forced_eos_token_id"]  # as transformers' generate ends a sequence cut at the length limit
    tokens.append(nxt)
    if nxt == cfg.get("eos_token_id"):
        break
    cur = np.array([[nxt]], dtype=np.int64)
    out = dec_past.run(None, {"input_ids": cur, "encoder_attention_mask": mask, **past})
    past.update({o.name.replace("present", "past_key_values", 1): v for o, v in zip(dec_past.get_outputs()[1:], out[1:])})
print(tok.decode(tokens, skip_special_tokens=True))
'''


def seq2seq_readme(specs: dict[str, dict[str, Any]], *, layers: int, title: str) -> str:
    """OUTDIR/README.md: each file's inputs/outputs (the first layer's cache) and the greedy loop."""
    lines = [f"# {title}", "",
             "An encoder-decoder as the three files inference servers run (Hugging Face Optimum's layout and names), "
             "written and verified by surgeon (`report.json`): fp32 weights, no pass applied, no site guarded.", ""]
    for name, spec in specs.items():
        lines += [f"## `{name}`", "", "| | name | dtype | shape |", "|---|---|---|---|"]
        for key in ("inputs", "outputs"):
            for v in spec[key]:
                if ".0." in v["name"] or not v["name"].startswith(("past_key_values.", "present.")):
                    lines.append(f"| {key[:-1]} | `{v['name']}` | {v['dtype']} | [{', '.join(map(str, v['shape']))}] |")
        if layers > 1:
            lines.append(f"| … | (every layer 0 … {layers - 1}) | | |")
        lines.append("")
    lines += ["`surgeon generate OUTDIR --prompt \"…\"` runs them; greedy decoding with onnxruntime, numpy and "
              "tokenizers only (where `tokenizer.json` is written; `greedy_config.json` holds the ids transformers' "
              "generate uses):", "", "```python", GREEDY_SNIPPET.rstrip("\n"), "```", ""]
    return "\n".join(lines)
