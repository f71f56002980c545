"""``OUTDIR/README.md`` for an OpenVINO IR: the file's inputs and outputs, and a snippet that runs it
with only ``openvino`` and ``numpy`` (and ``tokenizers`` for a text model), compiled with the deploy
config surgeon verified it with (``openvino_config.json``). tests/test_openvino.py runs the snippet in
a process without torch or surgeon."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._openvino_runtime import CONFIG_FILE, require_openvino

__all__ = ["io_spec", "readme", "write_readme"]

# tokenizers' Encoding field for each standard text input
_ENCODING = {"input_ids": "ids", "token_type_ids": "type_ids", "attention_mask": "attention_mask"}
_NP = {"i64": "int64", "i32": "int32", "f32": "float32", "f16": "float16", "u8": "uint8", "i8": "int8",
       "boolean": "bool", "f64": "float64"}


def io_spec(xml: str | Path) -> dict[str, Any]:
    """Inputs and outputs of an IR: ``{"inputs": [{"name", "dtype", "shape"}], "outputs": [...]}``
    (a dynamic dimension is ``"?"``)."""
    ov = require_openvino()
    model = ov.Core().read_model(str(xml))

    def describe(port: Any) -> dict[str, Any]:
        shape = [d.get_length() if d.is_static else "?" for d in port.get_partial_shape()]
        dtype = port.get_element_type().get_type_name()
        return {"name": port.get_any_name(), "dtype": _NP.get(dtype, dtype), "shape": shape}

    return {"inputs": [describe(p) for p in model.inputs], "outputs": [describe(p) for p in model.outputs]}


def readme(spec: dict[str, Any], *, filename: str, config: dict[str, str]) -> str:
    """The README text: inputs/outputs table and a snippet run from OUTDIR."""
    inputs = spec["inputs"]
    text = bool(inputs) and all(i["name"] in _ENCODING for i in inputs)
    lines = [f"# {filename} (OpenVINO IR)", "",
             f"`{filename}` + `{Path(filename).with_suffix('.bin').name}`: OpenVINO IR with INT8 layers, written and "
             "verified by surgeon in OpenVINO's CPU plugin (see `report.json`). Inputs and outputs:", "",
             "| | name | dtype | shape |", "|---|---|---|---|"]
    for key in ("inputs", "outputs"):
        for v in spec[key]:
            lines.append(f"| {key[:-1]} | `{v['name']}` | {v['dtype']} | [{', '.join(map(str, v['shape']))}] |")
    lines += ["", "`?` dimensions are dynamic (any size).", "",
              f"`{CONFIG_FILE}` holds the compile properties the file was verified with "
              f"({', '.join(f'`{k}={v}`' for k, v in config.items())}): compile it with the same, since a file "
              "verified in one inference precision and served in another is not verified.", "",
              "Run it from this directory with only " + ("openvino, numpy and tokenizers" if text else "openvino and numpy")
              + " installed (no torch, no surgeon):", "", "```python", "import json", "", "import numpy as np",
              "import openvino as ov"]
    if text:
        lines.append("from tokenizers import Tokenizer")
    lines += ["", f'config = json.load(open("{CONFIG_FILE}"))["compile_properties"]',
              f'compiled = ov.Core().compile_model("{filename}", "CPU", config)', ""]
    if text:
        lines += ['tokenizer = Tokenizer.from_file("tokenizer.json")',
                  "pad = tokenizer.padding or {}  # rows padded to the longest; attention_mask marks the padding",
                  'tokenizer.enable_padding(pad_id=pad.get("pad_id", 0), pad_token=pad.get("pad_token", "[PAD]"))',
                  'positions = json.load(open("config.json")).get("max_position_embeddings")  # the model\'s config',
                  "if positions:",
                  "    tokenizer.enable_truncation(max_length=positions)",
                  'batch = tokenizer.encode_batch(["The first sentence.", "A second, somewhat longer one."])',
                  "feeds = {"]
        lines += [f'    "{i["name"]}": np.array([e.{_ENCODING[i["name"]]} for e in batch], dtype=np.{i["dtype"]}),'
                  for i in inputs]
        lines.append("}")
    else:
        lines.append("feeds = {  # your data here: random tensors of the right dtype and shape (a dynamic dim: 2)")
        for i in inputs:
            shape = tuple(d if isinstance(d, int) else 2 for d in i["shape"])
            if i["dtype"].startswith("float"):
                lines.append(f'    "{i["name"]}": np.random.rand(*{shape}).astype(np.{i["dtype"]}),')
            else:
                lines.append(f'    "{i["name"]}": np.zeros({shape}, dtype=np.{i["dtype"]}),')
        lines.append("}")
    lines += ["result = compiled(feeds)",
              "outputs = {port.get_any_name(): result[port] for port in compiled.outputs}",
              "print({name: value.shape for name, value in outputs.items()})", "```", ""]
    if text and any(o["name"] == "last_hidden_state" for o in spec["outputs"]):
        lines += ["`last_hidden_state` at padded positions (`attention_mask` = 0) is not meaningful: pool with the "
                  "mask (report.json's cosines leave those positions out).", ""]
    return "\n".join(lines)


def write_readme(xml: Path, config: dict[str, str]) -> str:
    """Write ``README.md`` beside ``xml``; return its name."""
    (xml.parent / "README.md").write_text(readme(io_spec(xml), filename=xml.name, config=config), encoding="utf-8")
    return "README.md"
