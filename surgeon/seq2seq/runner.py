"""The three files of a seq2seq OUTDIR in onnxruntime, and greedy decoding over them. Imports numpy and
onnxruntime only (``surgeon generate`` on a seq2seq OUTDIR starts without torch).

Greedy decoding as transformers' ``generate(do_sample=False, num_beams=1)`` does it: every row starts
from ``decoder_start_token_id``; the first step runs ``decoder_model.onnx`` (which also returns the
cross-attention keys/values), later steps ``decoder_with_past_model.onnx``; a row that emitted EOS gets
the pad token afterwards; ``forced_bos_token_id`` / ``forced_eos_token_id`` are honoured where the
generation config sets them. No other logits processor is applied (no repetition penalty, no n-gram
blocking, no minimum length)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["DECODER_FILE", "DECODER_WITH_PAST_FILE", "ENCODER_FILE", "GreedyConfig", "Seq2SeqRunner", "pad_right"]

ENCODER_FILE = "encoder_model.onnx"
DECODER_FILE = "decoder_model.onnx"
DECODER_WITH_PAST_FILE = "decoder_with_past_model.onnx"


@dataclass(frozen=True)
class GreedyConfig:
    """The token ids greedy decoding needs (from ``generation_config.json`` / ``config.json``)."""

    decoder_start_token_id: int
    eos_token_id: int | None
    pad_token_id: int
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None

    @staticmethod
    def from_dicts(*configs: dict[str, Any]) -> GreedyConfig:
        """The first config (generation config first) that states each id."""
        def get(key: str) -> Any:
            for c in configs:
                v = c.get(key)
                if isinstance(v, list):
                    v = v[0] if v else None
                if v is not None:
                    return int(v)
            return None

        start, eos, pad = get("decoder_start_token_id"), get("eos_token_id"), get("pad_token_id")
        if start is None:
            start = pad if pad is not None else 0
        return GreedyConfig(start, eos, pad if pad is not None else (eos if eos is not None else 0),
                            get("forced_bos_token_id"), get("forced_eos_token_id"))


def pad_right(token_lists: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` int64, padded on the right (the encoder's usual side)."""
    width = max(len(t) for t in token_lists)
    ids = np.full((len(token_lists), width), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, t in enumerate(token_lists):
        ids[i, :len(t)] = t
        mask[i, :len(t)] = 1
    return ids, mask


class Seq2SeqRunner:
    """The encoder, first-step decoder and with-past decoder files as ORT sessions (``sessions`` in
    that order; ``open`` builds them from an OUTDIR)."""

    def __init__(self, sessions: Sequence[Any]) -> None:
        self.encoder, self.decoder, self.decoder_with_past = sessions
        self.first_outputs = [o.name for o in self.decoder.get_outputs()]
        self.past_outputs = [o.name for o in self.decoder_with_past.get_outputs()]

    @staticmethod
    def open(outdir: str | os.PathLike, *, threads: int | None = None,
             config: dict[str, str] | None = None) -> Seq2SeqRunner:
        """Sessions on ORT's CPU provider for the three files of ``outdir`` (``config``: session config entries)."""
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        for key, value in (config or {}).items():
            so.add_session_config_entry(key, value)
        return Seq2SeqRunner([ort.InferenceSession(str(Path(outdir) / name), so, providers=["CPUExecutionProvider"])
                              for name in (ENCODER_FILE, DECODER_FILE, DECODER_WITH_PAST_FILE)])

    def encode(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """``last_hidden_state`` of the encoder."""
        return self.encoder.run(None, {"input_ids": ids, "attention_mask": mask})[0]

    def first(self, dec_ids: np.ndarray, hidden: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
        """Logits of the first step and the past (self- and cross-attention) for the next."""
        out = self.decoder.run(None, {"input_ids": dec_ids, "encoder_hidden_states": hidden,
                                      "encoder_attention_mask": mask})
        return out[0], {n.replace("present", "past_key_values", 1): v for n, v in zip(self.first_outputs[1:], out[1:])}

    def step(self, dec_ids: np.ndarray, mask: np.ndarray, past: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        """Logits of a later step and the past grown by ``dec_ids`` (the cross-attention part unchanged)."""
        out = self.decoder_with_past.run(None, {"input_ids": dec_ids, "encoder_attention_mask": mask, **past})
        new = dict(past)
        new.update({n.replace("present", "past_key_values", 1): v for n, v in zip(self.past_outputs[1:], out[1:])})
        return out[0], new

    def greedy(self, token_lists: Sequence[Sequence[int]], max_new_tokens: int, cfg: GreedyConfig) -> list[list[int]]:
        """The new tokens of each prompt (pad after an EOS; without the decoder start token)."""
        ids, mask = pad_right(token_lists, cfg.pad_token_id)
        hidden = self.encode(ids, mask)
        batch = ids.shape[0]
        cur = np.full((batch, 1), cfg.decoder_start_token_id, dtype=np.int64)
        done = np.zeros(batch, dtype=bool)
        out: list[np.ndarray] = []
        past: dict[str, Any] = {}
        for i in range(max_new_tokens):
            logits, past = self.first(cur, hidden, mask) if i == 0 else self.step(cur, mask, past)
            scores = logits[:, -1].astype(np.float64)
            forced = cfg.forced_bos_token_id if i == 0 else None
            if i == max_new_tokens - 1 and cfg.forced_eos_token_id is not None:
                forced = cfg.forced_eos_token_id
            nxt = np.full(batch, forced, dtype=np.int64) if forced is not None else scores.argmax(-1)
            nxt = np.where(done, cfg.pad_token_id, nxt)
            out.append(nxt)
            if cfg.eos_token_id is not None:
                done |= nxt == cfg.eos_token_id
            if done.all():
                break
            cur = nxt[:, None].astype(np.int64)
        return [list(map(int, row)) for row in np.stack(out, 1)]
