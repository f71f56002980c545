"""Generation with a decoder file's key/value cache: the one loop (greedy or seeded sampling, a batch
with left padding) that ``surgeon generate``, the decoder verification and the guard all use.

The loop talks to a *runner*: ``empty_past(batch)`` gives the empty cache (past length 0) and
``step(input_ids, attention_mask, position_ids, past) → (logits, present)`` runs one step; the cache
objects are opaque to the loop (ONNX Runtime ``OrtValue``s here, torch tensors for
``surgeon.decoder.step.TorchStepRunner``) and are fed back as they came. :class:`OrtRunner` runs
``OUTDIR/model.onnx`` in onnxruntime with surgeon's session config.

Positions follow Hugging Face ``generate``: ``position_ids = cumsum(attention_mask) − 1`` (1 at padded
positions), so a left-padded row sees the positions it would see alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence

import numpy as np

from ..errors import SurgeonError

__all__ = ["Generation", "OrtRunner", "Runner", "Sampling", "Score", "generate", "left_pad", "pad_and_eos", "score"]

# onnxruntime's type strings of the cache tensors → (numpy dtype of the bytes, ONNX element type)
_ORT_TYPES = {"tensor(float)": (np.float32, 1), "tensor(int8)": (np.int8, 3), "tensor(float8e4m3fn)": (np.uint8, 17)}


class Runner(Protocol):
    layers: int
    max_positions: int | None

    def empty_past(self, batch: int) -> list[Any]: ...

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             past: Sequence[Any]) -> tuple[np.ndarray, list[Any]]: ...

    def cache_nbytes(self, present: Sequence[Any]) -> int: ...


class OrtRunner:
    """A decoder ONNX file's onnxruntime session (the target's: ``DecoderTarget.session``), the cache
    kept as ``OrtValue``s between steps (FP8 codes have no numpy dtype; they travel as the session
    returned them). ``name`` names the file in errors."""

    def __init__(self, session: Any, name: str, *, max_positions: int | None = None) -> None:
        import onnxruntime as ort

        self._ort = ort
        self.name = name
        self.session = session
        ins = self.session.get_inputs()
        self.past_inputs = [i for i in ins if i.name.startswith("past_key_values.")]
        if not self.past_inputs or [i.name for i in ins[:3]] != ["input_ids", "attention_mask", "position_ids"]:
            raise SurgeonError(f"'{self.name}' is not a decoder file: it has no input_ids, attention_mask, "
                               "position_ids and past_key_values.<i>.key inputs")
        self.layers = len(self.past_inputs) // 2
        self.input_names = [i.name for i in ins]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.max_positions = max_positions
        self.cache_type = self.past_inputs[0].type

    def empty_past(self, batch: int) -> list[Any]:
        out = []
        for i in self.past_inputs:
            np_dtype, elem = _ORT_TYPES[i.type]
            heads, dim = i.shape[1], i.shape[3]
            zeros = np.zeros((batch, heads, 0, dim), dtype=np_dtype)
            out.append(self._ort.OrtValue.ortvalue_from_numpy_with_onnx_type(zeros, elem))
        return out

    def step(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
             past: Sequence[Any]) -> tuple[np.ndarray, list[Any]]:
        ov = self._ort.OrtValue.ortvalue_from_numpy
        feeds = dict(zip(self.input_names, [ov(input_ids), ov(attention_mask), ov(position_ids), *past]))
        outs = self.session.run_with_ort_values(self.output_names, feeds)
        return outs[0].numpy(), list(outs[1:])

    @staticmethod
    def cache_nbytes(present: Sequence[Any]) -> int:
        return int(sum(v.numpy().nbytes for v in present))


@dataclass(frozen=True)
class Sampling:
    """Seeded sampling: ``logits / temperature``, the ``top_k`` largest kept (0: all), numpy's PCG64."""

    seed: int = 0
    temperature: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise SurgeonError(f"--temperature must be positive, got {self.temperature}")
        if self.top_k < 0:
            raise SurgeonError(f"--top-k must be 0 (all tokens) or positive, got {self.top_k}")


@dataclass
class Generation:
    """What ``generate`` produced: the new tokens of each prompt (pad after an EOS, as Hugging Face
    pads finished rows) and, with ``trace``, each step's inputs and logits."""

    tokens: list[list[int]]
    steps: list[dict[str, np.ndarray]] = field(default_factory=list)
    cache_bytes: int = 0  # bytes of the last present cache (all rows, all layers)
    cache_tokens: int = 0  # its length


def left_pad(token_lists: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(input_ids, attention_mask)`` [B, T] int64, rows padded on the left."""
    t = max(len(x) for x in token_lists)
    ids = np.full((len(token_lists), t), pad_id, dtype=np.int64)
    mask = np.zeros((len(token_lists), t), dtype=np.int64)
    for r, x in enumerate(token_lists):
        if x:
            ids[r, t - len(x):] = x
            mask[r, t - len(x):] = 1
    return ids, mask


def _positions(mask: np.ndarray) -> np.ndarray:
    pos = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, pos).astype(np.int64)


def _check_positions(runner: Runner, token_lists: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    n = runner.max_positions
    if n is None:
        return
    for i, x in enumerate(token_lists, 1):
        if len(x) > n:
            raise SurgeonError(f"prompt {i} has {len(x)} tokens, more than the model's {n} positions")
        if len(x) + max_new_tokens > n:
            raise SurgeonError(f"prompt {i} has {len(x)} tokens: with --max-new-tokens {max_new_tokens} that is "
                               f"{len(x) + max_new_tokens} positions, more than the model's {n}")


def _pick(last: np.ndarray, sampling: Sampling | None, rng: np.random.Generator | None) -> np.ndarray:
    if sampling is None or rng is None:
        return np.argmax(last, axis=-1)
    z = last.astype(np.float64) / sampling.temperature
    if sampling.top_k and sampling.top_k < z.shape[-1]:
        kth = np.partition(z, -sampling.top_k, axis=-1)[:, -sampling.top_k][:, None]
        z = np.where(z < kth, -np.inf, z)
    p = np.exp(z - z.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p], dtype=np.int64)


def generate(runner: Runner, token_lists: Sequence[Sequence[int]], max_new_tokens: int, *, pad_id: int,
             eos_id: int | None = None, sampling: Sampling | None = None, trace: bool = False) -> Generation:
    """Generate up to ``max_new_tokens`` after each prompt (a batch, left-padded): one prefill step
    with the empty past, then one step per token. Greedy unless ``sampling``; a row stops at
    ``eos_id`` (later tokens are ``pad_id``), the loop when every row has."""
    if max_new_tokens < 1:
        raise SurgeonError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not token_lists or any(len(x) == 0 for x in token_lists):
        raise SurgeonError("every prompt must have at least one token")
    _check_positions(runner, token_lists, max_new_tokens)
    ids, mask = left_pad(token_lists, pad_id)
    pos = _positions(mask)
    past = runner.empty_past(len(token_lists))
    rng = np.random.default_rng(sampling.seed) if sampling is not None else None
    finished = np.zeros(len(token_lists), dtype=bool)
    out: list[list[int]] = [[] for _ in token_lists]
    result = Generation(out)
    for _ in range(max_new_tokens):
        logits, past = runner.step(ids, mask, pos, past)
        if trace:
            result.steps.append({"input_ids": ids, "attention_mask": mask, "position_ids": pos, "logits": logits})
        nxt = _pick(logits[:, -1, :], sampling, rng)
        nxt = np.where(finished, pad_id, nxt).astype(np.int64)
        for r, t in enumerate(nxt.tolist()):
            out[r].append(int(t))
        if eos_id is not None:
            finished |= nxt == eos_id
        mask = np.concatenate([mask, np.ones((len(out), 1), dtype=np.int64)], axis=1)
        pos = (mask.sum(axis=1, keepdims=True) - 1).astype(np.int64)
        ids = nxt[:, None]
        if finished.all():
            break
    result.cache_bytes = runner.cache_nbytes(past)
    result.cache_tokens = int(mask.shape[1] - 1)
    return result


@dataclass
class Score:
    """Teacher-forced next-token figures of texts: summed negative log-likelihood (nats), token count,
    each text's argmax predictions (for agreement between two decoders) and each text's summed NLL
    (``text_nll``, in the order of ``argmax``: what a bootstrap over texts resamples)."""

    nll: float
    tokens: int
    argmax: list[np.ndarray]
    text_nll: list[float] = field(default_factory=list)

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll / max(self.tokens, 1)))


def score(runner: Runner, token_lists: Sequence[Sequence[int]], *, pad_id: int, batch_size: int = 8) -> Score:
    """Perplexity and argmax predictions of ``token_lists`` in one prefill step per batch (left-padded;
    the texts batched by length, so little padding is run; ``argmax`` in the order of ``token_lists``)."""
    nll, count = 0.0, 0
    order = [i for i in sorted(range(len(token_lists)), key=lambda i: len(token_lists[i])) if len(token_lists[i]) >= 2]
    found: dict[int, np.ndarray] = {}
    per_text: dict[int, float] = {}
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        chunk = [list(token_lists[i]) for i in idx]
        ids, mask = left_pad(chunk, pad_id)
        logits, _ = runner.step(ids, mask, _positions(mask), runner.empty_past(len(chunk)))
        t = ids.shape[1]
        for r, (i, x) in enumerate(zip(idx, chunk)):
            lg = logits[r, t - len(x):-1].astype(np.float64)  # predictions of tokens 1 … n−1
            lg = lg - lg.max(axis=-1, keepdims=True)
            logp = lg - np.log(np.exp(lg).sum(axis=-1, keepdims=True))
            text = -float(logp[np.arange(len(x) - 1), x[1:]].sum())
            nll += text
            count += len(x) - 1
            found[i] = np.argmax(lg, axis=-1)
            per_text[i] = text
    return Score(nll, count, [found[i] for i in sorted(found)], [per_text[i] for i in sorted(per_text)])


def pad_and_eos(tokenizer: Any) -> tuple[int, int | None]:
    """The pad id (the EOS id when the tokenizer has no pad token, as causal LMs ship) and the EOS id."""
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if pad is None:
        pad = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0
    return int(pad), None if eos is None else int(eos)
