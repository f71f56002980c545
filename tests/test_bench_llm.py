"""``bench/llm.py``'s own logic, without SmolLM2 or any runtime but numpy: the perplexity windows, the
NLL formula llama.cpp's scores go through (it must equal ``surgeon.decoder.generate.score``'s on the same
logits, or the runtimes' perplexities would not be comparable), the decode prompts, the verdict on issue
27's targets, and the held-out text's independence from surgeon's built-in decoder text."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest

from surgeon.decoder.generate import score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
text = importlib.import_module("_llm_text")
report = importlib.import_module("_llm_report")


class _Bigram:
    """A decoder runner whose next-token logits depend on the current token only (a table)."""

    layers, max_positions = 1, None

    def __init__(self, vocab: int, seed: int = 0) -> None:
        self.table = np.random.default_rng(seed).normal(0, 3, (vocab, vocab)).astype(np.float32)

    def empty_past(self, batch: int) -> list[Any]:
        return [np.zeros((batch, 1, 0, 1), np.float32)]

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             past: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
        return self.table[input_ids], list(past)

    def cache_nbytes(self, present: Sequence[Any]) -> int:
        return 0


def test_windows_score_every_token_once_in_full_windows() -> None:
    ids = list(range(100, 137))  # 37 ids: 4 full windows of 8 inputs, 4 ids left over
    wins = text.windows(ids, 8)
    assert [len(w) for w in wins] == [9, 9, 9, 9]
    targets = [t for w in wins for t in w[1:]]
    assert targets == ids[1:33]  # each scored once, in order; the tail that fills no window is left out
    assert all(a[-1] == b[0] for a, b in zip(wins, wins[1:]))  # a window's last target opens the next
    assert text.windows(ids[:8], 8) == []
    with pytest.raises(ValueError, match="window size must be at least 1, got 0"):
        text.windows(ids, 0)


def test_nll_of_logits_equals_surgeons_score() -> None:
    runner = _Bigram(vocab=50)
    rng = np.random.default_rng(1)
    wins = [list(rng.integers(0, 50, 17)) for _ in range(3)]
    s = score(runner, wins, pad_id=0, batch_size=1)
    ours = sum(text.nll_of_logits(runner.table[np.asarray(w[:-1])], w) for w in wins)
    assert s.tokens == 3 * 16
    assert ours == pytest.approx(s.nll, rel=1e-12)
    # and both are the textbook log-softmax: -log p(next | current)
    t = runner.table.astype(np.float64)
    logp = t - np.log(np.exp(t).sum(-1, keepdims=True))
    direct = -sum(logp[a, b] for w in wins for a, b in zip(w[:-1], w[1:]))
    assert ours == pytest.approx(direct, rel=1e-9)


def test_nll_of_logits_refuses_misaligned_logits() -> None:
    with pytest.raises(ValueError, match=r"^5 rows of logits for a window of 5 ids \(want 4\)$"):
        text.nll_of_logits(np.zeros((5, 10)), [1, 2, 3, 4, 5])


def test_decode_prompts_are_full_length_and_spread() -> None:
    ids = list(range(1000))
    prompts = text.decode_prompts(ids, 4, 128)
    assert [len(p) for p in prompts] == [128] * 4
    assert len({p[0] for p in prompts}) == 4
    assert all(p == ids[p[0]:p[0] + 128] for p in prompts)  # contiguous text, no padding
    with pytest.raises(ValueError, match="the text has 100 tokens, fewer than one prompt of 128"):
        text.decode_prompts(ids[:100], 1, 128)


def _out(b1: dict[str, float], ppl: dict[str, float]) -> dict[str, Any]:
    return {"subjects": {n: {"decode_tok_s_b1": {"median": b1[n]}, "perplexity": ppl[n]} for n in b1}}


def test_targets_met_and_missed_with_the_measured_numbers() -> None:
    names = [report.DEFAULT, report.FP32, report.GENAI4, report.LLAMA]
    met = report.targets_met(_out(dict(zip(names, [33.0, 10.0, 30.0, 20.0])), dict(zip(names, [15.4, 15.0, 16.0, 17.0]))))
    assert [t["met"] for t in met] == [True, True, True, True]
    assert met[0]["measured"] == "33.00 vs 30.00 tok/s (1.100×)"
    missed = report.targets_met(_out(dict(zip(names, [32.0, 10.0, 30.0, 40.0])), dict(zip(names, [15.5, 15.0, 15.4, 17.0]))))
    assert [t["met"] for t in missed] == [False, False, False, False]
    partial = report.targets_met(_out({report.DEFAULT: 30.0, report.FP32: 9.0}, {report.DEFAULT: 15.0, report.FP32: 15.0}))
    assert [t["met"] for t in partial] == [None, None, None, True]
    assert partial[0]["measured"] == "not measured (a subject was skipped)"


def test_heldout_text_is_not_surgeons_decoder_text() -> None:
    held = (ROOT / "bench" / "data" / "llm_heldout.txt").read_text(encoding="utf-8")
    builtin = " ".join((ROOT / "surgeon" / "data" / "decoder_text.txt").read_text(encoding="utf-8").split())
    assert len(held.split()) >= 2500  # ≥ 2,500 SmolLM2 tokens (3,638 measured; ~1.3 tokens per word)
    sentences = [s.strip() for s in re.split(r"(?<=[.!?;])\s+", held) if len(s.strip()) >= 40]
    assert len(sentences) > 100
    assert [s for s in sentences if s in builtin] == []
