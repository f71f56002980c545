"""Calibration text: sentences tokenized into batches, and whether they fit the model.

``text_batches`` tokenizes and judges the text by its ``text_stats`` (unknown tokens, repeated lines,
lines of a few tokens): a one-line refusal where it does not fit (``--force-calib`` overrides),
warnings in ``notes`` where it is thin. Both go to the report's ``calibration``.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..errors import SurgeonError
from .data import MIN_CHECK_SAMPLES

TEXT_BATCH = 8  # sentences per calibration batch for text models
TEXT_MAX_LENGTH = 128


class CalibrationBatches(list):
    """Calibration batches tokenized from text, with what the text was like (``text_stats``) and the
    warnings it earned (``notes``): both go to the report's ``calibration``."""

    text_stats: dict[str, Any]
    notes: list[str]


#: Text that does not fit the model is refused (``--force-calib`` overrides); thin text is warned about.
UNKNOWN_REFUSE = 0.05  # share of the content tokens the tokenizer does not know
UNKNOWN_WARN = 0.01
SHORT_REFUSE = 4  # median content tokens per sentence
DISTINCT_REFUSE = 0.5  # distinct sentences / sentences
THIN_WARN = 2 * MIN_CHECK_SAMPLES  # fewer sentences than this leave a check set under MIN_CHECK_SAMPLES


def text_stats(sentences: Sequence[str], batches: Sequence[Mapping[str, Any]], tokenizer: Any,
               max_length: int) -> dict[str, Any]:
    """What tokenized text is like for the model: sentences and distinct ones, content tokens (special
    tokens and padding left out), the share the tokenizer does not know (``unknown_rate``; None for a
    tokenizer without an unknown token, e.g. byte-level BPE), the padding share of the batches, the
    content length per sentence and how many were cut at ``max_length``."""
    unk = getattr(tokenizer, "unk_token_id", None)
    special = torch.tensor(sorted(set(getattr(tokenizer, "all_special_ids", []) or [])), dtype=torch.long)
    lengths: list[int] = []
    unknown = positions = real = truncated = 0
    for b in batches:
        ids = b["input_ids"]
        mask = b.get("attention_mask")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        content = mask & ~torch.isin(ids, special) if special.numel() else mask
        if unk is not None:
            content = content | (mask & (ids == unk))  # [UNK] is itself a special token: count it as content
            unknown += int((content & (ids == unk)).sum())
        lengths += content.sum(1).tolist()
        truncated += int((mask.sum(1) >= max_length).sum())
        positions += ids.numel()
        real += int(mask.sum())
    tokens = sum(lengths)
    ordered = sorted(lengths)
    return {"sentences": len(sentences), "distinct": len(set(sentences)), "content_tokens": tokens,
            "unknown_tokens": unknown if unk is not None else None,
            "unknown_rate": (unknown / tokens if tokens else 0.0) if unk is not None else None,
            "unknown_token": getattr(tokenizer, "unk_token", None),
            "padding_share": 1.0 - real / positions if positions else 0.0,
            "length_tokens": {"min": ordered[0], "median": ordered[len(ordered) // 2], "mean": tokens / len(ordered),
                              "max": ordered[-1]} if ordered else {},
            "truncated": truncated, "max_length": max_length}


def text_batches(sentences: list[str], loaded: Any, batch_size: int, max_length: int, what: str,
                  force: bool) -> CalibrationBatches:
    """Tokenize ``sentences`` in batches and judge whether they fit the model (``text_stats``): a one-line
    refusal where they do not (unless ``force``), warnings in ``notes`` where they are thin."""
    out = CalibrationBatches(loaded.text_inputs(sentences[i:i + batch_size], max_length=max_length)
                             for i in range(0, len(sentences), batch_size))
    stats = text_stats(sentences, out, loaded.tokenizer, max_length)
    out.text_stats, out.notes = stats, []
    refusals: list[str] = []
    rate = stats["unknown_rate"]
    if rate is not None and rate > UNKNOWN_REFUSE:
        refusals.append(f"{100 * rate:.1f} % of its tokens are unknown to the model's tokenizer "
                        f"({stats['unknown_token']}): it is not in the model's language or script")
    elif rate is not None and rate > UNKNOWN_WARN:
        out.notes.append(f"{100 * rate:.1f} % of the calibration tokens are unknown to the tokenizer "
                         f"({stats['unknown_token']})")
    if stats["distinct"] < max(2, DISTINCT_REFUSE * stats["sentences"]) and stats["sentences"] > 1:
        refusals.append(f"only {stats['distinct']} distinct of its {stats['sentences']} lines")
    median = stats["length_tokens"].get("median", 0)
    if median < SHORT_REFUSE:
        refusals.append(f"its median line has {median} token(s), far below a sentence the model would serve")
    if refusals and not force:
        raise SurgeonError(f"{what} does not fit the model: {'; '.join(refusals)} (--force-calib uses it anyway)")
    out.notes += [f"calibration used although {r} (--force-calib)" for r in refusals]
    if stats["sentences"] < THIN_WARN:
        out.notes.append(f"the calibration text has {stats['sentences']} sentences: fewer than {THIN_WARN} leave a "
                         f"check set under {MIN_CHECK_SAMPLES} samples")
    return out


class Tokenized:
    """What ``read_calibration`` needs of a loaded model, for a bare tokenizer (+ optional model)."""

    def __init__(self, tokenizer: Any, model: nn.Module | None) -> None:
        self.tokenizer, self.model = tokenizer, model
        self.is_text = True

    def text_inputs(self, sentences: list[str], max_length: int = TEXT_MAX_LENGTH) -> dict:
        from ..loaders.common import tokenize

        return tokenize(self.model, self.tokenizer, list(sentences), max_length) if self.model is not None else \
            dict(self.tokenizer(list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
