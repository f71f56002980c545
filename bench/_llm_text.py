"""The held-out text of ``bench/llm.py`` as token ids, and the figures every runtime is judged by on it:
the perplexity windows, the teacher-forced NLL of a window's logits, and the decode / prefill prompts.

One tokenization (the model's ``tokenizer.json`` through ``tokenizers``) feeds every runtime the same ids,
so llama.cpp's own tokenizer (which may add a BOS token) never changes what is scored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["decode_prompts", "encode", "nll_of_logits", "windows"]


def encode(text_path: Path, tokenizer_json: Path) -> list[int]:
    """The ids of the whole text, no special tokens added (none is in the middle of prose either)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.no_truncation()
    tok.no_padding()
    return list(tok.encode(text_path.read_text(encoding="utf-8"), add_special_tokens=False).ids)


def windows(ids: Sequence[int], size: int) -> list[list[int]]:
    """Consecutive non-overlapping windows of ``size + 1`` ids (``size`` inputs, each predicting the next),
    full windows only: every runtime scores the same ``len(result) * size`` tokens, each window from an
    empty cache."""
    if size < 1:
        raise ValueError(f"window size must be at least 1, got {size}")
    return [list(ids[s:s + size + 1]) for s in range(0, len(ids) - size, size)]


def nll_of_logits(logits: np.ndarray, window: Sequence[int]) -> float:
    """Summed negative log-likelihood (nats) of ``window[1:]`` under ``logits`` [len(window) − 1, vocab],
    the predictions at ``window[:-1]`` (float64 log-softmax, as ``surgeon.decoder.generate.score``)."""
    x = np.asarray(logits, dtype=np.float64)
    if x.shape[0] != len(window) - 1:
        raise ValueError(f"{x.shape[0]} rows of logits for a window of {len(window)} ids (want {len(window) - 1})")
    x = x - x.max(axis=-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(axis=-1, keepdims=True))
    return float(-logp[np.arange(len(window) - 1), list(window[1:])].sum())


def decode_prompts(ids: Sequence[int], batch: int, length: int) -> list[list[int]]:
    """``batch`` prompts of exactly ``length`` ids (no padding), from spread-out places of the text."""
    if len(ids) < length:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one prompt of {length}")
    step = max((len(ids) - length) // max(batch, 1), 1)
    return [list(ids[(r * step) % (len(ids) - length + 1):][:length]) for r in range(batch)]
