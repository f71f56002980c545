"""Torch references for decoder files: Hugging Face's own model, cache and ``generate``, kept apart
from the generation loop that runs files (``surgeon.decoder.generate``).

* :class:`HfCacheRunner` runs the original LM with the ``DynamicCache`` transformers builds itself
  (the step protocol of ``surgeon.decoder.generate``, the cache an opaque object);
* :func:`replay` feeds the steps a file's loop recorded to another runner with its own cache and
  returns the max |Δlogits| per step;
* :func:`hf_generate` is ``model.generate`` (greedy) on a left-padded batch;
* :func:`hf_perplexity` is the LM's plain forward (no cache) on held-out texts.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["HfCacheRunner", "hf_generate", "hf_perplexity", "replay"]


class HfCacheRunner:
    """The original causal LM with its own ``transformers.DynamicCache`` (step protocol)."""

    def __init__(self, lm: Any) -> None:
        self.lm = lm.eval()
        self.layers = int(self.lm.config.num_hidden_layers)
        self.max_positions = None
        self._kw = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"

    def empty_past(self, batch: int) -> list[Any]:
        from transformers import DynamicCache

        return [DynamicCache()]

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             past: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
        cache = past[0]
        with torch.no_grad():
            out = self.lm(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask),
                          position_ids=torch.from_numpy(position_ids), use_cache=True, **{self._kw: cache})
        return out.logits.numpy(), [cache]

    @staticmethod
    def cache_nbytes(present: Sequence[Any]) -> int:
        return int(sum(t.numel() * t.element_size() for layer in present[0].layers for t in (layer.keys, layer.values)))


def replay(runner: Any, steps: Sequence[dict[str, np.ndarray]]) -> list[float]:
    """Run the recorded ``steps`` (inputs and logits of a generation loop) through ``runner`` with its own
    cache; the max |logits − recorded logits| of each step."""
    past = runner.empty_past(steps[0]["input_ids"].shape[0])
    diffs = []
    for s in steps:
        logits, past = runner.step(s["input_ids"], s["attention_mask"], s["position_ids"], past)
        diffs.append(float(np.abs(logits.astype(np.float64) - s["logits"].astype(np.float64)).max()))
    return diffs


def hf_generate(lm: Any, token_lists: Sequence[Sequence[int]], max_new_tokens: int, *, pad_id: int,
                eos_id: int | None) -> list[list[int]]:
    """``lm.generate`` greedy on the left-padded batch: the new tokens of each row."""
    t = max(len(x) for x in token_lists)
    ids = torch.full((len(token_lists), t), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, x in enumerate(token_lists):
        ids[r, t - len(x):] = torch.tensor(list(x))
        mask[r, t - len(x):] = 1
    with torch.no_grad():
        out = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                          pad_token_id=pad_id, eos_token_id=eos_id)
    return out[:, t:].tolist()


def hf_perplexity(lm: nn.Module, token_lists: Sequence[Sequence[int]]) -> float:
    """exp(mean NLL of tokens 1 … n−1) of each text, one text at a time, no cache (fp32 reference)."""
    nll, count = 0.0, 0
    for x in token_lists:
        if len(x) < 2:
            continue
        ids = torch.tensor([list(x)])
        with torch.no_grad():
            logits = lm(input_ids=ids, use_cache=False).logits[0, :-1].double()
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += len(x) - 1
    return float(np.exp(nll / max(count, 1)))
