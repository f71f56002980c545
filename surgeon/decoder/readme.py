"""``OUTDIR/README.md`` of a decoder file: its inputs and outputs (the cache's among them, from
``surgeon.deploy.io_spec``) and a greedy loop with onnxruntime, numpy and tokenizers only, the cache
kept as ``OrtValue``s (FP8 codes have no numpy dtype)."""

from __future__ import annotations

from typing import Any

__all__ = ["decoder_readme"]


def decoder_readme(spec: dict[str, Any], *, cache: str, session_config: dict[str, str], layers: int,
                   title: str) -> str:
    """OUTDIR/README.md for a decoder file: inputs/outputs and a greedy loop with onnxruntime only."""
    lines = [f"# {title}", "", "`model.onnx`: one decode step with the key/value cache as inputs and outputs "
             "(Hugging Face Optimum's names), written and verified by surgeon (see `report.json`). "
             f"Cache: {cache}. The first step takes an empty past (length 0).", "",
             "| | name | dtype | shape |", "|---|---|---|---|"]
    for key in ("inputs", "outputs"):
        for v in spec[key][:7] if key == "inputs" else spec[key][:3]:
            lines.append(f"| {key[:-1]} | `{v['name']}` | {v['dtype']} | [{', '.join(map(str, v['shape']))}] |")
    lines += [f"| … | (every layer 0 … {layers - 1}) | | |", "",
              "`surgeon generate OUTDIR --prompt \"…\"` runs it; with onnxruntime, numpy and tokenizers only:", "",
              "```python", "import numpy as np", "import onnxruntime as ort", "from tokenizers import Tokenizer", "",
              "so = ort.SessionOptions()"]
    for key, value in session_config.items():
        lines.append(f'so.add_session_config_entry("{key}", "{value}")')
    lines += ['sess = ort.InferenceSession("model.onnx", so, providers=["CPUExecutionProvider"])',
              'tok = Tokenizer.from_file("tokenizer.json")',
              'ids = np.array([tok.encode("The quick brown fox").ids], dtype=np.int64)',
              "mask = np.ones_like(ids)",
              "past = {}",
              "for i in sess.get_inputs()[3:]:  # an empty cache of the file's element type",
              "    zeros = np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=np.uint8 if 'float8' in i.type else "
              "np.int8 if 'int8' in i.type else np.float32)",
              "    past[i.name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(zeros, 17) if 'float8' in i.type "
              "else ort.OrtValue.ortvalue_from_numpy(zeros)",
              "names = [o.name for o in sess.get_outputs()]",
              "pos = np.arange(ids.shape[1], dtype=np.int64)[None]",
              "out = []",
              "for _ in range(8):",
              "    feeds = {'input_ids': ort.OrtValue.ortvalue_from_numpy(ids),",
              "             'attention_mask': ort.OrtValue.ortvalue_from_numpy(mask),",
              "             'position_ids': ort.OrtValue.ortvalue_from_numpy(pos), **past}",
              "    res = sess.run_with_ort_values(names, feeds)",
              "    nxt = int(res[0].numpy()[0, -1].argmax())",
              "    out.append(nxt)",
              "    past = {n.replace('present', 'past_key_values'): v for n, v in zip(names[1:], res[1:])}",
              "    ids = np.array([[nxt]], dtype=np.int64)",
              "    mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)",
              "    pos = np.array([[mask.shape[1] - 1]], dtype=np.int64)",
              "print(tok.decode(out))", "```", ""]
    return "\n".join(lines)
