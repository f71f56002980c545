"""What OUTDIR needs beside ``model.onnx`` to be deployed without the source model.

``write_deploy_files(outdir, report)`` (called by ``Result.save`` and ``surgeon export``, inside the
atomic OUTDIR):

* for a Hugging Face model directory: its model config and tokenizer / preprocessor files, copied as
  Optimum writes them (``config.json``, ``tokenizer.json``, ``tokenizer_config.json``, …);
* ``report["deploy"]``: the ONNX file's input and output names, element types and dynamic axes,
  and the files copied;
* ``OUTDIR/README.md``: how to run *this* file in onnxruntime — its real input names, the FP8
  session option where the file needs it, the model's own preprocessing beside it — a snippet that
  needs only ``onnxruntime``, ``numpy`` and the preprocessing's library: ``tokenizers`` (text
  models), transformers' image processor with Pillow (``pixel_values``) or its feature extractor with
  soundfile (``input_values``), run from OUTDIR (tests/test_deploy.py and tests/test_modalities.py
  run it in a process without torch or surgeon).

Reads the ONNX file's graph only (no onnxruntime session, no torch).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

__all__ = ["HF_FILES", "SAMPLE_AUDIO", "SAMPLE_IMAGE", "io_spec", "preprocessing_of", "readme",
           "write_deploy_files"]

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
           session_config: dict[str, str] | None = None, preprocessing: dict[str, Any] | None = None) -> str:
    """OUTDIR/README.md: the file's inputs and outputs and an ORT snippet for it (run from OUTDIR).
    The snippet feeds what the model's own preprocessing makes: the tokenizer's ids (text), the image
    processor's ``pixel_values`` or the feature extractor's ``input_values`` (``preprocessing``, from
    ``preprocessing_of``), else random tensors of the right dtype and shape."""
    inputs = spec["inputs"]
    text = tokenizer is not None and bool(inputs) and all(i["name"] in _ENCODING for i in inputs)
    kind = None if text or preprocessing is None else preprocessing["kind"]
    shapes = _display_shapes(spec, preprocessing)
    lines = [f"# {title}", "",
             f"`{filename}`: standard ONNX, written and verified by surgeon (see `report.json`). Inputs and outputs:", "",
             "| | name | dtype | shape |", "|---|---|---|---|"]
    for key in ("inputs", "outputs"):
        for v in spec[key]:
            shape = shapes.get((key, v["name"])) or [str(d) for d in v["shape"]]
            lines.append(f"| {key[:-1]} | `{v['name']}` | {v['dtype']} | [{', '.join(shape)}] |")
    lines += ["", "Named dimensions are dynamic (any size); numbers are fixed.", ""]
    if kind == "image":
        lines += [f"`pixel_values` is what the image processor (`preprocessor_config.json`) makes of an image: "
                  f"{_size_words(preprocessing)}; the model was verified at that size.", ""]
    elif kind == "audio":
        rate = preprocessing.get("sampling_rate") if preprocessing else None
        lines += ["`input_values` is what the feature extractor (`preprocessor_config.json`) makes of a recording"
                  + (f" sampled at {rate} Hz" if rate else "") + ": one value per sample, any length.", ""]
    if fp8_option:
        key, value = fp8_option.split("=", 1)
        lines += ["The file holds FP8 Q/DQ. ONNX Runtime's CPU provider has no FP8 kernels; without the session option "
                  f"`{fp8_option}` its Q/DQ fusions either refuse the file or silently compute something else "
                  "(ORT 1.32: the session opens and the outputs differ), so the snippet sets it.", ""]
    style = "text" if text else kind or ""  # which preprocessing the snippet runs
    need = {"": "onnxruntime, numpy", "text": "onnxruntime, numpy and tokenizers",
            "image": "onnxruntime, numpy, transformers (its image processor runs without torch) and Pillow",
            "audio": "onnxruntime, numpy, transformers (its feature extractor runs without torch) and soundfile"}
    lines += [f"Run it from this directory with only {need[style]} installed (no torch, no surgeon):",
              "", "```python", "import numpy as np", "import onnxruntime as ort"]
    lines += _IMPORTS.get(style, [])
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
        lines += _text_feeds(inputs, tokenizer, pad_token, max_length)
    elif kind == "image":
        lines += _image_feeds(inputs, preprocessing)
    elif kind == "audio":
        lines += _audio_feeds(inputs)
    else:
        lines += _random_feeds(inputs)
    lines += ["outputs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))",
              'print({name: value.shape for name, value in outputs.items()})', "```", ""]
    if any(o["name"] == "last_hidden_state" for o in spec["outputs"]) and text:
        lines += ["`last_hidden_state` at padded positions (`attention_mask` = 0) is not meaningful: pool with the "
                  "mask (report.json's cosines leave those positions out).", ""]
    return "\n".join(lines)


# What each kind of snippet imports beside numpy and onnxruntime.
_IMPORTS = {"text": ["from tokenizers import Tokenizer"],
            "image": ["from PIL import Image", "from transformers import AutoImageProcessor"],
            "audio": ["import soundfile as sf", "from transformers import AutoFeatureExtractor"]}


def _text_feeds(inputs: list[dict[str, Any]], tokenizer: str | None, pad_token: str | None,
                max_length: int | None) -> list[str]:
    """Snippet lines: two sentences through ``tokenizer.json`` as the file's inputs."""
    lines = [f'tokenizer = Tokenizer.from_file("{tokenizer}")']
    if pad_token:
        lines.append(f'tokenizer.enable_padding(pad_id=tokenizer.token_to_id("{pad_token}"), pad_token="{pad_token}")')
    if max_length:
        lines.append(f"tokenizer.enable_truncation(max_length={max_length})")
    lines.append('batch = tokenizer.encode_batch(["The first sentence.", "A second, somewhat longer one."])')
    lines.append("feeds = {")
    for i in inputs:
        lines.append(f'    "{i["name"]}": np.array([e.{_ENCODING[i["name"]]} for e in batch], dtype=np.{i["dtype"]}),')
    lines.append("}")
    return lines


def _image_feeds(inputs: list[dict[str, Any]], preprocessing: dict[str, Any] | None) -> list[str]:
    """Snippet lines: an image file through the image processor beside the file."""
    mode = "L" if (preprocessing or {}).get("channels") == 1 else "RGB"
    dtype = inputs[0]["dtype"]
    return ['processor = AutoImageProcessor.from_pretrained(".")  # preprocessor_config.json, beside the file',
            f'image = Image.open("{SAMPLE_IMAGE}").convert("{mode}")  # your image here',
            f'feeds = {{"pixel_values": processor(images=[image], return_tensors="np")["pixel_values"].astype(np.{dtype})}}']


def _audio_feeds(inputs: list[dict[str, Any]]) -> list[str]:
    """Snippet lines: a sound file (mono, at the extractor's rate) through the feature extractor."""
    mask = any(i["name"] == "attention_mask" for i in inputs)
    lines = ['extractor = AutoFeatureExtractor.from_pretrained(".")  # preprocessor_config.json, beside the file',
             f'audio, rate = sf.read("{SAMPLE_AUDIO}", dtype="float32", always_2d=True)  # your recording here',
             "if rate != extractor.sampling_rate:  # the model hears only its own rate: resample first",
             '    raise SystemExit(f"the recording is at {rate} Hz; the model takes {extractor.sampling_rate} Hz")',
             "values = extractor([audio.mean(axis=1)], sampling_rate=rate, return_tensors=\"np\""
             + (", return_attention_mask=True)" if mask else ")"),
             "feeds = {"]
    for i in inputs:
        lines.append(f'    "{i["name"]}": values["{i["name"]}"].astype(np.{i["dtype"]}),')
    return lines + ["}"]


def _random_feeds(inputs: list[dict[str, Any]]) -> list[str]:
    """Snippet lines: random tensors of each input's dtype and shape (a dynamic dimension: 2)."""
    lines = ["feeds = {  # your data here: these are random tensors of the right dtype and shape"]
    for i in inputs:
        shape = tuple(d if isinstance(d, int) else 2 for d in i["shape"])
        if i["dtype"].startswith("float"):
            lines.append(f'    "{i["name"]}": np.random.rand{shape}.astype(np.{i["dtype"]}),'
                         if shape else f'    "{i["name"]}": np.array(0.5, dtype=np.{i["dtype"]}),')
        else:
            lines.append(f'    "{i["name"]}": np.zeros({shape}, dtype=np.{i["dtype"]}),')
    return lines + ["}"]


# The placeholder files the image and audio snippets read (tests substitute real ones).
SAMPLE_IMAGE = "image.jpg"
SAMPLE_AUDIO = "audio.wav"


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _hw(value: Any) -> tuple[int, int] | None:
    """(height, width) from a processor's ``size`` / ``crop_size`` or a config's ``image_size``."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) >= 2 and all(isinstance(v, int) for v in value[-2:]):
        return value[-2], value[-1]
    if isinstance(value, dict) and isinstance(value.get("height"), int) and isinstance(value.get("width"), int):
        return value["height"], value["width"]
    return None  # e.g. {"shortest_edge": 224}: the aspect ratio is the image's


def preprocessing_of(outdir: str | Path, spec: dict[str, Any]) -> dict[str, Any] | None:
    """What feeds the file, where OUTDIR has a ``preprocessor_config.json``: ``{"kind": "image",
    "channels", "height", "width"}`` (sizes the processor makes, else the config's; None where
    unknown) for a file taking ``pixel_values`` only, ``{"kind": "audio", "sampling_rate"}`` for one
    taking ``input_values`` (and ``attention_mask``), else None."""
    out = Path(outdir)
    if not (out / "preprocessor_config.json").is_file():
        return None
    names = {i["name"] for i in spec["inputs"]}
    pre, cfg = _json(out / "preprocessor_config.json"), _json(out / "config.json")
    if names == {"pixel_values"}:
        vision: dict[str, Any] = cfg["vision_config"] if isinstance(cfg.get("vision_config"), dict) else {}
        size = (_hw(pre.get("crop_size")) if pre.get("do_center_crop") else None) or _hw(pre.get("size")) \
            or _hw(cfg.get("image_size")) or _hw(vision.get("image_size"))
        mean = pre.get("image_mean")
        channels = cfg.get("num_channels") or vision.get("num_channels") or (len(mean) if isinstance(mean, list) else 3)
        return {"kind": "image", "channels": channels, "height": size[0] if size else None,
                "width": size[1] if size else None}
    if "input_values" in names and names <= {"input_values", "attention_mask"}:
        rate = pre.get("sampling_rate")
        return {"kind": "audio", "sampling_rate": rate if isinstance(rate, int) else None}
    return None


def _display_shapes(spec: dict[str, Any], preprocessing: dict[str, Any] | None) -> dict[tuple[str, str], list[str]]:
    """The README's shape of ``pixel_values`` / ``input_values``: an image's dynamic dims named
    channels, height and width with the sizes the processor makes, an audio input's ``samples``."""
    shapes: dict[tuple[str, str], list[str]] = {}
    for v in spec["inputs"]:
        dims = list(v["shape"])
        if preprocessing and preprocessing["kind"] == "image" and v["name"] == "pixel_values" and len(dims) == 4:
            shapes[("inputs", v["name"])] = [str(dims[0])] + [
                f"{d} ({n})" if isinstance(d, int) else f"{preprocessing[n]} ({n})" if preprocessing.get(n) else n
                for d, n in zip(dims[1:], ("channels", "height", "width"))]
        elif preprocessing and preprocessing["kind"] == "audio" and v["name"] in ("input_values", "attention_mask") \
                and len(dims) == 2:
            shapes[("inputs", v["name"])] = [str(dims[0]), str(dims[1]) if isinstance(dims[1], int) else "samples"]
    return shapes


def _size_words(preprocessing: dict[str, Any] | None) -> str:
    p = preprocessing or {}
    hw = f"{p['height']}×{p['width']} pixels" if p.get("height") and p.get("width") else "the size it resizes to"
    return f"{p.get('channels') or 3} channel(s), {hw}"


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
        preprocessing = preprocessing_of(out, spec) if "preprocessor_config.json" in copied else None
        if preprocessing is not None:
            deploy["preprocessing"] = preprocessing
        title = f"{filename} ({Path(str(source)).name or source})" if source else filename
        (out / "README.md").write_text(readme(spec, filename=filename, fp8_option=fp8_option, tokenizer=tokenizer,
                                              pad_token=_pad_token(out) if tokenizer else None,
                                              max_length=_max_length(out) if tokenizer else None, title=title,
                                              session_config=config, preprocessing=preprocessing),
                                       encoding="utf-8")
    report["deploy"] = deploy
