"""Verification of a seq2seq OUTDIR's files against the torch model they were exported from.

* each file in ORT against its torch part (``surgeon.seq2seq.parts``) at a batch size and lengths the
  export did not see (batch 3; encoder length 11 with a padded row; the first step at one token; the
  with-past step at past 5, one new token): max |Δ| of every output, within ``ATOL``;
* greedy tokens of the ORT files (``Seq2SeqRunner.greedy``) equal to
  ``model.generate(do_sample=False, num_beams=1)`` for held-out prompts in one padded batch."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import SurgeonError, first_line
from .parts import DecoderFirst, DecoderWithPast, EncoderPart
from .runner import GreedyConfig, Seq2SeqRunner, pad_right

__all__ = ["ATOL", "VERIFY_NEW_TOKENS", "reference_greedy", "verify_files"]

ATOL = 1e-3  # max |Δ| of any output (logits, hidden states, keys/values) of an fp32 file vs torch
VERIFY_NEW_TOKENS = 12


def _diff(a: Sequence[np.ndarray], b: Sequence[torch.Tensor]) -> float:
    return max(float(np.abs(np.asarray(x, np.float64) - y.double().numpy()).max()) for x, y in zip(a, b))


def reference_greedy(model: nn.Module, token_lists: Sequence[Sequence[int]], max_new_tokens: int,
                     cfg: GreedyConfig) -> list[list[int]]:
    """transformers' greedy ``generate`` on the same padded batch, without the decoder start token; the
    logits processors the ORT loop does not apply are switched off (``surgeon.seq2seq.runner``)."""
    ids, mask = pad_right(token_lists, cfg.pad_token_id)
    try:
        with torch.no_grad():
            out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),  # type: ignore[operator]
                                 do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, min_length=0,
                                 min_new_tokens=None, no_repeat_ngram_size=0, repetition_penalty=1.0,
                                 encoder_no_repeat_ngram_size=0, bad_words_ids=None, suppress_tokens=None,
                                 begin_suppress_tokens=None, forced_bos_token_id=cfg.forced_bos_token_id,
                                 forced_eos_token_id=cfg.forced_eos_token_id, decoder_start_token_id=cfg.decoder_start_token_id,
                                 pad_token_id=cfg.pad_token_id, eos_token_id=cfg.eos_token_id)
    except Exception as exc:  # noqa: BLE001 - the reference is transformers' own code; its failure is named
        raise SurgeonError(f"transformers' generate failed on {type(model).__name__} ({first_line(exc)}): the greedy "
                           "reference the files are verified against cannot be computed") from exc
    rows = [list(map(int, r[1:])) for r in out]
    # generate stops when every row is done; pad to the ORT loop's width the same way
    width = max(len(r) for r in rows)
    return [r + [cfg.pad_token_id] * (width - len(r)) for r in rows]


def _files_vs_torch(runner: Seq2SeqRunner, model: nn.Module, layers: int, vocab: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    dec = torch.randint(0, vocab, (3, 1), generator=g)
    prefix = torch.randint(0, vocab, (3, 5), generator=g)
    enc, first, with_past = EncoderPart(model), DecoderFirst(model, layers), DecoderWithPast(model, layers)
    with torch.no_grad():
        hidden = enc(ids, mask)
        ref_first = first(dec, hidden, mask)
        past = first(prefix, hidden, mask)[1:]
        ref_past = with_past(dec, mask, *past)
    h = runner.encode(ids.numpy(), mask.numpy())
    out_first = runner.decoder.run(None, {"input_ids": dec.numpy(), "encoder_hidden_states": hidden.numpy(),
                                          "encoder_attention_mask": mask.numpy()})
    feeds = {n.replace("present", "past_key_values", 1): t.numpy() for n, t in zip(runner.first_outputs[1:], past)}
    out_past = runner.decoder_with_past.run(None, {"input_ids": dec.numpy(), "encoder_attention_mask": mask.numpy(),
                                                   **feeds})
    return {"encoder_last_hidden_state": _diff([h], [hidden]),
            "decoder_logits": _diff(out_first[:1], ref_first[:1]),
            "decoder_present": _diff(out_first[1:], ref_first[1:]),
            "decoder_with_past_logits": _diff(out_past[:1], ref_past[:1]),
            "decoder_with_past_present": _diff(out_past[1:], ref_past[1:])}


def verify_files(runner: Seq2SeqRunner, model: nn.Module, layers: int, vocab: int, prompts: Sequence[Sequence[int]],
                 cfg: GreedyConfig, new_tokens: int = VERIFY_NEW_TOKENS) -> dict[str, Any]:
    """report.json's ``verification``: per-output max |Δ| vs torch, greedy tokens vs transformers, ``ok``."""
    diffs = _files_vs_torch(runner, model, layers, vocab)
    ours = runner.greedy(prompts, new_tokens, cfg)
    ref = reference_greedy(model, prompts, new_tokens, cfg)
    width = max(max(map(len, ours)), max(map(len, ref)))
    same = [a + [cfg.pad_token_id] * (width - len(a)) == b + [cfg.pad_token_id] * (width - len(b))
            for a, b in zip(ours, ref)]
    worst = max(diffs.values())
    return {"max_abs_diff": diffs, "logits_max_abs_diff": max(diffs["decoder_logits"], diffs["decoder_with_past_logits"]),
            "atol": ATOL, "within_atol": worst <= ATOL,
            "shapes": "batch 3 (exported at 2), encoder length 11 with a padded row (exported at 7), first step "
                      "1 token (exported at 4), with-past step past 5 + 1 new (exported at 4 + 2)",
            "greedy": {"prompts": len(prompts), "new_tokens": new_tokens, "batch": len(prompts),
                       "identical_to_transformers_generate": all(same), "rows_identical": sum(same),
                       "ort_tokens": ours, "torch_tokens": ref,
                       "reference": "model.generate(do_sample=False, num_beams=1), no other logits processor"},
            "ok": worst <= ATOL and all(same)}
