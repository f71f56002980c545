"""What OUTDIR needs beside ``model.onnx`` to be deployed without the source model.

``write_deploy_files(outdir, report)`` (called by ``Result.save`` and ``surgeon export``, inside the
atomic OUTDIR):

* for a Hugging Face model directory: its model config and tokenizer / preprocessor files, copied as
  Optimum writes them (``config.json``, ``tokenizer.json``, ``tokenizer_config.json``, …);
* ``report["deploy"]``: the ONNX file's input and output names, element types and dynamic axes,
  and the files copied;
* ``decoder_readme``: the same for a decoder file (``--target onnx-decoder``): its cache inputs and
  outputs and a greedy loop with the cache kept as ``OrtValue``s;
* ``OUTDIR/README.md``: how to run *this* file in onnxruntime — its real input names, the FP8
  session option where the file needs it, the tokenizer beside it — a snippet that needs only
  ``onnxruntime``, ``numpy`` and (text models) ``tokenizers``, run from OUTDIR
  (tests/test_deploy.py runs it in a process without torch or surgeon).

Reads the ONNX file's graph only (no onnxruntime session, no torch).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

__all__ = ["HF_FILES", "decoder_readme", "io_spec", "readme", "write_deploy_files"]

# The files Optimum's ORT export copies beside model.onnx (model config, tokenizer, preprocessor).
HF_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
            "spiece.model", "sentencepiece.bpe.model", "tokenizer.model", "preprocessor_config.json",
            "processor_config.json", "chat_template.jinja")

# onnx TensorProto element types → numpy dtype names (the ones a model input can have).
_NP = {1: "float32", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 11: "float64",
       16: "bfloat16"}
# tokenizers' Encoding field for each standard text input
_ENCODING = {"input_ids": "ids", "token_type_ids": "type_ids", "attention_mask": "attention_mask"}


def io_spec(path: str | Path) -> dict[str, Any]:
    """Inputs and outputs of an ONNX file: ``{"inputs": [{"name", "dtype", "shape"}], "outputs": […],
    "dynamic_axes": {name: {axis: dim name}}}`` (a shape lists an int where static, the dim's name
    where dynamic)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    spec: dict[str, Any] = {"inputs": [], "outputs": [], "dynamic_axes": {}}
    init = {i.name for i in graph.initializer}
    for key, values in (("inputs", [v for v in graph.input if v.name not in init]), ("outputs", graph.output)):
        for v in values:
            t = v.type.tensor_type
            shape: list[Any] = []
            for axis, d in enumerate(t.shape.dim):
                if d.HasField("dim_value"):
                    shape.append(int(d.dim_value))
                else:
                    name = d.dim_param or "?"
                    shape.append(name)
                    spec["dynamic_axes"].setdefault(v.name, {})[str(axis)] = name
            spec[key].append({"name": v.name, "dtype": _NP.get(t.elem_type, str(t.elem_type)), "shape": shape})
    return spec


def _hf_dir(source: Any) -> Path | None:
    p = Path(str(source)) if source else None
    return p if p is not None and p.is_dir() and (p / "config.json").is_file() else None


def _pad_token(outdir: Path) -> str | None:
    try:
        cfg = json.loads((outdir / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    pad = cfg.get("pad_token")
    return pad.get("content") if isinstance(pad, dict) else pad


def _max_length(outdir: Path) -> int | None:
    try:
        cfg = json.loads((outdir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    n = cfg.get("max_position_embeddings")
    return int(n) if isinstance(n, int) and n > 0 else None


# Why each ORT session entry surgeon verifies and times with is in the snippet (docs/deploy.md).
_CONFIG_WHY = {
    "session.set_denormal_as_zero": "masked attention scores make denormals, which x86 runs slowly",
    "session.disable_quant_qdq": "FP8 file: see above",
}


def readme(spec: dict[str, Any], *, filename: str, fp8_option: str | None, tokenizer: str | None,
           pad_token: str | None, max_length: int | None, title: str,
           session_config: dict[str, str] | None = None) -> str:
    """OUTDIR/README.md: the file's inputs and outputs and an ORT snippet for it (run from OUTDIR)."""
    inputs = spec["inputs"]
    text = tokenizer is not None and bool(inputs) and all(i["name"] in _ENCODING for i in inputs)
    lines = [f"# {title}", "",
             f"`{filename}`: standard ONNX, written and verified by surgeon (see `report.json`). Inputs and outputs:", "",
             "| | name | dtype | shape |", "|---|---|---|---|"]
    for key in ("inputs", "outputs"):
        for v in spec[key]:
            lines.append(f"| {key[:-1]} | `{v['name']}` | {v['dtype']} | [{', '.join(map(str, v['shape']))}] |")
    lines += ["", "Named dimensions are dynamic (any size); numbers are fixed.", ""]
    if fp8_option:
        key, value = fp8_option.split("=", 1)
        lines += ["The file holds FP8 Q/DQ. ONNX Runtime's CPU provider has no FP8 kernels; without the session option "
                  f"`{fp8_option}` its Q/DQ fusions either refuse the file or silently compute something else "
                  "(ORT 1.32: the session opens and the outputs differ), so the snippet sets it.", ""]
    need = "onnxruntime, numpy" + (" and tokenizers" if text else "")
    lines += [f"Run it from this directory with only {need} installed (no torch, no surgeon):", "", "```python",
              "import numpy as np", "import onnxruntime as ort"]
    if text:
        lines.append("from tokenizers import Tokenizer")
    lines += ["", "so = ort.SessionOptions()"]
    entries = dict(session_config or {})
    if fp8_option:
        key, value = fp8_option.split("=", 1)
        entries.setdefault(key, value)
    for key, value in entries.items():
        why = _CONFIG_WHY.get(key, "as surgeon verified and timed the file (report.json)")
        lines.append(f'so.add_session_config_entry("{key}", "{value}")  # {why}')
    lines.append(f'sess = ort.InferenceSession("{filename}", so, providers=["CPUExecutionProvider"])')
    lines.append("")
    if text:
        lines.append(f'tokenizer = Tokenizer.from_file("{tokenizer}")')
        if pad_token:
            lines.append(f'tokenizer.enable_padding(pad_id=tokenizer.token_to_id("{pad_token}"), pad_token="{pad_token}")')
        if max_length:
            lines.append(f"tokenizer.enable_truncation(max_length={max_length})")
        lines.append('batch = tokenizer.encode_batch(["The first sentence.", "A second, somewhat longer one."])')
        lines.append("feeds = {")
        for i in inputs:
            lines.append(f'    "{i["name"]}": np.array([e.{_ENCODING[i["name"]]} for e in batch], dtype=np.{i["dtype"]}),')
        lines.append("}")
    else:
        lines.append("feeds = {  # your data here: these are random tensors of the right dtype and shape")
        for i in inputs:
            shape = tuple(d if isinstance(d, int) else 2 for d in i["shape"])
            if i["dtype"].startswith("float"):
                lines.append(f'    "{i["name"]}": np.random.rand{shape}.astype(np.{i["dtype"]}),'
                             if shape else f'    "{i["name"]}": np.array(0.5, dtype=np.{i["dtype"]}),')
            else:
                lines.append(f'    "{i["name"]}": np.zeros({shape}, dtype=np.{i["dtype"]}),')
        lines.append("}")
    lines += ["outputs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))",
              'print({name: value.shape for name, value in outputs.items()})', "```", ""]
    if any(o["name"] == "last_hidden_state" for o in spec["outputs"]) and text:
        lines += ["`last_hidden_state` at padded positions (`attention_mask` = 0) is not meaningful: pool with the "
                  "mask (report.json's cosines leave those positions out).", ""]
    return "\n".join(lines)


def write_deploy_files(outdir: str | Path, report: dict[str, Any], *, source: Any, filename: str | None,
                       fp8_option: str | None = None) -> None:
    """Copy the HF config / tokenizer files of ``source`` into ``outdir``, record ``report["deploy"]``
    and write ``outdir/README.md`` for the ONNX file ``filename`` (nothing for a ``.pt2``-only OUTDIR
    but the copied files)."""
    out = Path(outdir)
    copied: list[str] = []
    hf = _hf_dir(source)
    if hf is not None:
        for name in HF_FILES:
            if (hf / name).is_file():
                shutil.copyfile(hf / name, out / name)  # contents only: OUTDIR's files keep its own modes
                copied.append(name)
    deploy: dict[str, Any] = {"copied_from_source": copied}
    if filename and filename.endswith(".onnx") and (out / filename).is_file():
        spec = io_spec(out / filename)
        config = next((v["session_config"] for v in report.get("targets", {}).values()
                       if isinstance(v, dict) and v.get("session_config")), None)
        deploy.update({"file": filename, **spec, "fp8_session_option": fp8_option, "session_config": config,
                       "readme": "README.md"})
        tokenizer = "tokenizer.json" if "tokenizer.json" in copied else None
        title = f"{filename} ({Path(str(source)).name or source})" if source else filename
        (out / "README.md").write_text(readme(spec, filename=filename, fp8_option=fp8_option, tokenizer=tokenizer,
                                              pad_token=_pad_token(out) if tokenizer else None,
                                              max_length=_max_length(out) if tokenizer else None, title=title,
                                              session_config=config),
                                       encoding="utf-8")
    report["deploy"] = deploy


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
