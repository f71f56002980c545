"""Streaming figures: how far a candidate's outputs are from a reference's, one batch at a time.

Only running sums are kept (O(1) memory in the number of batches):

* ``PairStats`` compares two tensor streams: SQNR = 10·log10(Σ ref² / Σ (ref − out)²) dB, cosine =
  ⟨ref, out⟩ / (‖ref‖·‖out‖) over all elements, max_rel_err = max |ref − out| / max |ref|, and the
  per-sample cosines (first dimension = samples) with their mean, minimum and spread;
* ``EndToEnd`` compares model outputs: the task head's ``*logits`` outputs where the model names them
  (plus their argmax agreement), else the first floating output, or a user
  ``metric(ref_outputs, outputs) -> float`` (higher is better) averaged over the batches;
* ``Figures`` are the end-to-end figures one configuration reached.

Padded positions (the inputs' ``attention_mask`` = 0) count in no figure (``position_mask``).
``sample_rows`` / ``row_cosines`` / ``cosine_per_sample`` are the one set of per-sample cosine helpers,
for torch tensors and for the numpy arrays a runtime returns alike.

Under a ``torch.distributed`` process group (``surgeon.distributed``) each rank measures its share:
``combine_ranks`` SUM-reduces the running sums and counts, MAX-reduces the maxima and MIN-reduces the
minimum cosine before any figure is computed, so every rank derives the figures of one process that
measured all shares; they differ from it only by the order of float64 additions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from .errors import SurgeonError
from .inputs import tensors_of

Metric = Callable[[Any, Any], float]


def first_float(value: Any) -> torch.Tensor | None:
    """``value`` itself when it is a tensor (as a float tensor), else its first floating tensor."""
    if isinstance(value, torch.Tensor):
        return value if value.is_floating_point() else value.float()
    found = tensors_of(value)
    return found[0] if found else None


def position_mask(inputs: Any, like: torch.Tensor) -> torch.Tensor | None:
    """Which positions of the output ``like`` are real tokens: the inputs' ``attention_mask`` (a
    keyword input of shape [batch, seq]) as a float tensor that broadcasts over ``like`` (1 = real,
    0 = padding), or None when the inputs have no such mask or ``like`` is not [batch, seq, …].

    Padded positions carry whatever the model computes there; a user reads only the real ones, so
    the figures (cosines, errors) leave them out (docs/report.md: "what is measured")."""
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or like.dim() < 2 or tuple(like.shape[:2]) != tuple(mask.shape):
        return None
    return (mask != 0).to(torch.float64).reshape(*mask.shape, *([1] * (like.dim() - 2)))


def sqnr_db(signal: float, noise: float) -> float:
    """10·log10(signal / noise); +inf when there is no noise at all."""
    if noise == 0.0:
        return math.inf if signal > 0 or signal == 0 else math.nan
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def cosine(dot: float, a2: float, b2: float) -> float:
    """⟨a, b⟩ / (‖a‖·‖b‖) from ``dot`` = ⟨a, b⟩, ``a2`` = ‖a‖², ``b2`` = ‖b‖²; NaN stays NaN."""
    if a2 == 0.0 and b2 == 0.0:
        return 1.0  # two zero tensors agree
    if a2 == 0.0 or b2 == 0.0:
        return 0.0
    return dot / math.sqrt(a2 * b2)


class PairStats:
    """Running comparison of a reference tensor stream with a candidate stream (O(1) memory).

    ``update`` takes one batch; per-sample cosines use the first dimension as the sample axis for
    tensors of two or more dimensions (a lower-dimensional output counts as one sample).
    """

    def __init__(self) -> None:
        self.ref2 = self.out2 = self.dot = self.err2 = 0.0
        self.max_err = self.max_ref = 0.0
        self.cos_sum = self.dev_sum = self.dev_sq = 0.0  # dev = 1 − cosine: a spread without cancellation
        self.cos_min = math.inf
        self.cosines: list[float] = []  # this process's per-sample cosines (the spread in the report)
        self.samples = 0
        self.nonfinite = False
        self.mismatch: str | None = None

    def update(self, ref: torch.Tensor, out: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """``valid`` (``position_mask``): positions outside it count in no figure."""
        if tuple(ref.shape) != tuple(out.shape):
            self.mismatch = f"shape {tuple(out.shape)} differs from the reference's {tuple(ref.shape)}"
            return
        r = ref.detach().to(torch.float64)
        o = out.detach().to(torch.float64)
        if valid is not None:
            keep = valid.bool()
            r, o = torch.where(keep, r, 0.0), torch.where(keep, o, 0.0)  # a NaN at a padded position does not count
        if not bool(torch.isfinite(o).all()):
            self.nonfinite = True
        d = r - o
        self.ref2 += float((r * r).sum())
        self.out2 += float((o * o).sum())
        self.dot += float((r * o).sum())
        self.err2 += float((d * d).sum())
        if d.numel():
            self.max_err = max(self.max_err, float(d.abs().max()))
            self.max_ref = max(self.max_ref, float(r.abs().max()))
        rows_r = r.reshape(r.shape[0], -1) if r.dim() >= 2 else r.reshape(1, -1)
        for c in row_cosines(rows_r, o.reshape(rows_r.shape)).tolist():
            self.cos_sum += c
            self.dev_sum += 1.0 - c
            self.dev_sq += (1.0 - c) * (1.0 - c)
            self.cos_min = min(self.cos_min, c) if not math.isnan(c) else math.nan
            self.cosines.append(c)
            self.samples += 1

    def _pack(self) -> tuple[list[float], list[float], list[float]]:
        """(SUM, MAX, MIN) terms for a cross-rank reduction; NaN encoded as flags (MAX/MIN need not
        propagate it)."""
        cos_nan = isinstance(self.cos_min, float) and math.isnan(self.cos_min)
        sums = [self.ref2, self.out2, self.dot, self.err2, self.cos_sum, float(self.samples), float(self.nonfinite),
                float(self.mismatch is not None), float(cos_nan), self.dev_sum, self.dev_sq]
        maxes = [math.inf if math.isnan(v) else v for v in (self.max_err, self.max_ref)]
        return sums, maxes, [-math.inf if cos_nan else self.cos_min]

    def _unpack(self, sums: list[float], maxes: list[float], mins: list[float]) -> None:
        self.ref2, self.out2, self.dot, self.err2, self.cos_sum = sums[:5]
        self.samples, self.nonfinite = int(sums[5]), bool(sums[6])
        if sums[7] and self.mismatch is None:
            self.mismatch = "the output shape differs from the reference's on another rank"
        self.max_err, self.max_ref = maxes
        self.cos_min = math.nan if sums[8] else mins[0]
        self.dev_sum, self.dev_sq = sums[9], sums[10]

    def _rel(self) -> float:
        if self.max_ref == 0.0:
            return 0.0 if self.max_err == 0.0 else math.inf
        return self.max_err / self.max_ref

    def _bad(self) -> bool:
        return self.nonfinite or self.samples == 0

    def site_metrics(self) -> dict[str, float | None]:
        """``sqnr_db``, ``cosine`` (all elements), ``max_rel_err`` (NaN where outputs were non-finite)."""
        if self.mismatch is not None:
            return {"sqnr_db": None, "cosine": None, "max_rel_err": None}
        if self._bad():
            return {"sqnr_db": math.nan, "cosine": math.nan, "max_rel_err": math.nan}
        return {"sqnr_db": sqnr_db(self.ref2, self.err2), "cosine": cosine(self.dot, self.ref2, self.out2),
                "max_rel_err": self._rel()}

    def figures(self) -> "Figures":
        if self._bad() or self.mismatch is not None:
            return Figures(math.nan, math.nan, math.nan, math.nan, self.samples)
        mean = self.cos_sum / self.samples
        # sample standard deviation of the per-sample cosines, from reducible sums of 1 − cosine (cosines
        # sit near 1: Σc² − n·mean² would cancel to noise, the deviations from 1 do not)
        dev = self.dev_sum / self.samples
        var = (self.dev_sq - self.samples * dev * dev) / (self.samples - 1) if self.samples > 1 else 0.0
        return Figures(mean, self.cos_min, self._rel(), sqnr_db(self.ref2, self.err2), self.samples,
                       cosine_std=math.sqrt(max(var, 0.0)), cosines=list(self.cosines))


@dataclass
class Figures:
    """End-to-end figures of one configuration on the check set."""

    cosine_mean: float
    cosine_min: float
    max_rel_err: float
    sqnr_db: float
    samples: int
    metric: float | None = None
    cosine_std: float | None = None  # spread of the per-sample cosines (sample standard deviation)
    agreement: float | None = None  # argmax agreement of the *logits outputs (None: the model has none)
    agreement_count: int | None = None  # predictions compared (samples, or real token positions)
    cosines: list[float] | None = field(default=None, repr=False)  # per-sample cosines (this process)

    def get(self, name: str) -> float | None:
        return getattr(self, name)

    def spread(self) -> dict[str, Any]:
        """The per-sample cosine distribution: quantiles and a bootstrap 95 % interval of the mean
        (1000 resamples, seeded), from the samples this process measured."""
        cos = [c for c in (self.cosines or []) if not math.isnan(c)]
        if not cos:
            return {}
        t = torch.tensor(cos, dtype=torch.float64)
        qs = torch.quantile(t, torch.tensor([0.01, 0.05, 0.5], dtype=torch.float64)).tolist()
        gen = torch.Generator().manual_seed(0)
        means = t[torch.randint(len(cos), (1000, len(cos)), generator=gen)].mean(1)
        lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        return {"samples": len(cos), "cosine_std": self.cosine_std, "cosine_p01": qs[0], "cosine_p05": qs[1],
                "cosine_median": qs[2], "cosine_mean_ci95": [lo, hi]}

    def to_json(self) -> dict:
        out: dict[str, Any] = {"cosine_mean": self.cosine_mean, "cosine_min": self.cosine_min,
                               "max_rel_err": self.max_rel_err, "sqnr_db": self.sqnr_db, "samples": self.samples}
        if self.cosine_std is not None:
            out["cosine_std"] = self.cosine_std
        if self.metric is not None:
            out["metric"] = self.metric
        if self.agreement is not None:
            out["agreement"] = self.agreement
            out["agreement_count"] = self.agreement_count
        return out


def logits_outputs(output: Any) -> dict[str, torch.Tensor]:
    """The task head's outputs: floating tensors whose output name ends in ``logits`` (``logits``,
    ``start_logits`` / ``end_logits``), by name; empty for an output without names (a tensor, a tuple)."""
    if not isinstance(output, Mapping):
        return {}
    return {k: v for k, v in output.items()
            if isinstance(k, str) and k.endswith("logits") and isinstance(v, torch.Tensor) and v.is_floating_point()}


def sample_rows(outputs: Sequence[Any], inputs: Any = None) -> torch.Tensor:
    """Several outputs of one batch (torch tensors or numpy arrays) as float64 [batch, features], side
    by side, padded positions (``position_mask``) zeroed; a 0-d output is one sample of one feature."""
    rows = []
    for t in outputs:
        t = torch.as_tensor(t).detach().to(torch.float64)
        valid = position_mask(inputs, t)
        if valid is not None:
            t = torch.where(valid.bool(), t, 0.0)
        rows.append(t.reshape(t.shape[0], -1) if t.dim() >= 1 else t.reshape(1, 1))
    return torch.cat(rows, 1)


def row_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The cosine of each row of ``a`` with the same row of ``b`` (float64 [n, k] → [n]; ``cosine``)."""
    dots, a2, b2 = (a * b).sum(1), (a * a).sum(1), (b * b).sum(1)
    return torch.tensor([cosine(d, x, y) for d, x, y in zip(dots.tolist(), a2.tolist(), b2.tolist())],
                        dtype=torch.float64)


def cosine_per_sample(a: Sequence[Any], b: Sequence[Any], inputs: Any = None) -> torch.Tensor:
    """Cosine of each sample's outputs (all of ``a`` against all of ``b``, torch tensors or numpy
    arrays, flattened per batch row), padded positions left out."""
    return row_cosines(sample_rows(a, inputs), sample_rows(b, inputs))


class EndToEnd:
    """What the end-to-end figures compare: the task head's ``*logits`` outputs where the model names
    them (all of them, side by side per sample; plus their argmax agreement), else the first floating
    output; padded positions left out (``position_mask``); plus the user metric's batch average."""

    def __init__(self, metric: Metric | None) -> None:
        self.stats = PairStats()
        self.metric = metric
        self.metric_sum = 0.0
        self.batches = 0
        self.agree = 0.0
        self.agree_n = 0

    def update(self, ref_out: Any, out: Any, inputs: Any = None) -> None:
        ref_heads, heads = logits_outputs(ref_out), logits_outputs(out)
        if ref_heads and set(ref_heads) <= set(heads):
            r_list, o_list = list(ref_heads.values()), [heads[k] for k in ref_heads]
            if len(r_list) == 1:
                self.stats.update(r_list[0], o_list[0], position_mask(inputs, r_list[0]))
            elif all(a.shape == b.shape for a, b in zip(r_list, o_list)):
                self.stats.update(sample_rows(r_list, inputs), sample_rows(o_list, inputs))
            else:
                self.stats.mismatch = "the logits outputs' shapes differ from the reference's"
            for a, b in zip(r_list, o_list):
                if a.shape != b.shape or a.dim() == 0:
                    continue
                same = (a.argmax(-1) == b.argmax(-1)).to(torch.float64)
                valid = position_mask(inputs, same) if same.dim() >= 2 else None
                w = valid if valid is not None else torch.ones_like(same)
                self.agree += float((same * w).sum())
                self.agree_n += int(w.sum())
        else:
            r, o = first_float(ref_out), first_float(out)
            if r is None or o is None:
                raise SurgeonError("the model output holds no floating tensor to compare; pass a metric callable")
            self.stats.update(r, o, position_mask(inputs, r))
        if self.metric is not None:
            self.metric_sum += float(self.metric(ref_out, out))
        self.batches += 1

    def _pack(self) -> tuple[list[float], list[float], list[float]]:
        sums, maxes, mins = self.stats._pack()
        return sums + [self.agree, float(self.agree_n), self.metric_sum, float(self.batches)], maxes, mins

    def _unpack(self, sums: list[float], maxes: list[float], mins: list[float]) -> None:
        self.stats._unpack(sums[:-4], maxes, mins)
        self.agree, self.agree_n = sums[-4], int(sums[-3])
        self.metric_sum, self.batches = sums[-2], int(sums[-1])

    def figures(self) -> Figures:
        fig = self.stats.figures()
        if self.metric is not None:
            fig.metric = self.metric_sum / max(self.batches, 1)
        if self.agree_n:
            fig.agreement, fig.agreement_count = self.agree / self.agree_n, self.agree_n
        return fig


def combine_ranks(accs: Sequence[Any], distributed: bool | None, what: str = "verification") -> None:
    """Reduce ``PairStats`` / ``EndToEnd`` accumulators over the process group: three collectives
    (SUM, MAX, MIN) for all of them together. A no-op without a group or with ``distributed=False``."""
    from . import distributed as dist

    if not accs or not (dist.active() if distributed is None else (distributed and dist.active())):
        return
    packed = [a._pack() for a in accs]
    flat = [torch.tensor([v for p in packed for v in p[i]], dtype=torch.float64) for i in range(3)]
    red = [dist.all_reduce(t, op, what).tolist() for t, op in zip(flat, ("sum", "max", "min"))]
    pos = [0, 0, 0]
    for a, p in zip(accs, packed):
        parts = []
        for i in range(3):
            parts.append(red[i][pos[i]:pos[i] + len(p[i])])
            pos[i] += len(p[i])
        a._unpack(*parts)


def total_over_ranks(n: int, distributed: bool | None, what: str = "verification") -> int:
    """``n`` summed over the process group (``n`` itself without one or with ``distributed=False``)."""
    from . import distributed as dist

    if not (dist.active() if distributed is None else (distributed and dist.active())):
        return n
    return int(dist.all_reduce(torch.tensor([n], dtype=torch.int64), "sum", what)[0])

