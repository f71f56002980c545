"""What a decoder's cache must keep and how it is checked: the decoder tolerance, the ladder guard of
``surgeon.verify`` fed the decoder's figures, and the written file's verification in onnxruntime.

The guard measures each rung of the cache pass's ladder (e.g. int8-head → fp8-head → keep) on the
held-out texts in torch (the step module the file computes) against the fp32 cache: perplexity
within ``1 + ppl_increase`` and teacher-forced greedy next-token agreement ≥ ``agreement``. Its
figures are ``surgeon.verify.Figures`` with the perplexity's relative increase (ratio − 1) as
``max_rel_err`` and the greedy agreement as ``agreement``, judged as measured (no margin): the same
descent, rollback and verdict as every other site.

The verdict is the written file's (``file_figures``): its perplexity and agreement measured in
onnxruntime on the held-out texts against the fp32 torch step, judged under the margin rule (the
perplexity ratio at the one-sided 95 % upper bound of a paired bootstrap over the held-out texts,
the agreement at its binomial lower bound; docs/report.md). Where the file misses what the torch
module met, the pipeline tightens the bounds by the gap (``surgeon.tolerance.tighten``) and the guard
steps further down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from torch import nn

from ..errors import SurgeonError
from ..pass_manager import CachePass, SiteRecord, set_site_active, set_site_rung
from ..profile import KEEP, Profile
from ..verify import Figures, GuardResult, Tolerance, ladder_guard
from .generate import OrtRunner, Score, generate, score
from .graph import GraphStep
from .reference import HfCacheRunner, hf_generate, hf_perplexity, replay
from .step import CacheGeometry, CacheStats, DecoderStep, TorchStepRunner

__all__ = ["SITE", "VERIFY_NEW_TOKENS", "CacheGuard", "DecoderTolerance", "Step", "file_figures", "guard_cache",
           "guard_sites", "local_error", "verify_file"]

Step = DecoderStep | GraphStep  # what the guard measures and the target lowers

SITE = "kv_cache"  # the decoder's one site: its key/value cache
VERIFY_NEW_TOKENS = 16  # greedy steps the verification compares (per-step logits, tokens vs generate)
BOOTSTRAP_RESAMPLES = 1000  # resamples of the held-out texts for the perplexity ratio's interval (seed 0)
MARGIN_Z = 1.645  # one-sided 95 %: the agreement's binomial lower bound (as surgeon.tolerance's)


@dataclass(frozen=True)
class DecoderTolerance:
    """What a cache rung must keep on held-out text, against the fp32 cache."""

    ppl_increase: float = 0.01  # perplexity at most (1 + ppl_increase) × the fp32 cache's
    agreement: float = 0.95  # greedy next-token agreement (teacher-forced) at least this
    margin: bool = True  # the file judged under the margin rule (``file_figures``); False: as measured

    @classmethod
    def parse(cls, spec: "str | DecoderTolerance | None") -> "DecoderTolerance":
        """``None`` → the defaults; ``"ppl_increase=0.02,agreement=0.9"`` → those keys (others default;
        ``margin=0`` judges the file's figures as measured)."""
        if spec is None or isinstance(spec, DecoderTolerance):
            return spec or cls()
        values: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in str(spec).split(","))):
            key, sep, raw = (s.strip() for s in part.partition("="))
            if not sep or key not in ("ppl_increase", "agreement", "margin"):
                raise SurgeonError(f"cannot parse decoder tolerance '{spec}': give ppl_increase=X and/or agreement=Y "
                                   "(e.g. ppl_increase=0.01,agreement=0.95; margin=0 judges as measured)")
            if key == "margin":
                if raw not in ("0", "1"):
                    raise SurgeonError(f"decoder tolerance margin={raw}: give margin=0 or margin=1")
                values[key] = raw == "1"
                continue
            try:
                values[key] = float(raw)
            except ValueError:
                raise SurgeonError(f"decoder tolerance {key}={raw} is not a number") from None
        tol = cls(**values)
        if not (tol.ppl_increase >= 0 and 0 <= tol.agreement <= 1):
            raise SurgeonError(f"decoder tolerance needs ppl_increase ≥ 0 and agreement in [0, 1], got '{spec}'")
        return tol

    def describe(self) -> str:
        return (f"perplexity ≤ (1 + {self.ppl_increase:g}) × fp32, greedy next-token agreement ≥ {self.agreement:g}"
                + ("" if self.margin else ", judged as measured"))

    def tightened(self, bounds: Tolerance) -> "DecoderTolerance":
        """This tolerance with the guard's bounds ``bounds`` (``surgeon.tolerance.tighten`` of ``bounds()``)."""
        return DecoderTolerance(ppl_increase=float(bounds.max_rel_err if bounds.max_rel_err is not None else self.ppl_increase),
                                agreement=float(bounds.agreement if bounds.agreement is not None else self.agreement),
                                margin=self.margin)

    def bounds(self) -> Tolerance:
        """The ladder guard's tolerance on ``figures``: as measured, there is no margin rule for perplexity."""
        return Tolerance(cosine_mean=None, max_rel_err=self.ppl_increase, agreement=self.agreement, margin=False)

    def broken(self, ratio: float, agreement: float) -> list[str]:
        """What a rung with perplexity ``ratio`` × fp32 and greedy ``agreement`` breaks, in words."""
        out = [f"perplexity ×{ratio:.4f} > {1 + self.ppl_increase:g}"] if not ratio <= 1 + self.ppl_increase else []
        if not agreement >= self.agreement:
            out.append(f"greedy agreement {agreement:.4f} < {self.agreement:g}")
        return out


def figures(ratio: float, agreement: float, tokens: int) -> Figures:
    """A rung's figures for the ladder guard (the module docstring says which field holds what)."""
    nan = float("nan")
    return Figures(nan, nan, ratio - 1.0, nan, tokens, agreement=agreement, agreement_count=tokens)


def file_figures(file: Score, ref: Score, tol: DecoderTolerance, seed: int = 0) -> dict[str, Any]:
    """The written file's held-out figures (``file``, scored in its runtime) against the fp32 torch step
    (``ref``, the same texts), with their spread and the values the tolerance judges.

    The held-out texts are a sample of what the file will read, so under ``tol.margin`` the perplexity
    ratio is judged at the one-sided 95 % upper bound of a paired bootstrap over the texts (each
    resample: exp((ΣNLL_file − ΣNLL_fp32) / Σtokens) over the texts drawn; ``BOOTSTRAP_RESAMPLES``,
    seeded) and the agreement p at p − 1.645·√(p(1−p)/n) over its n tokens."""
    ratio = file.perplexity / ref.perplexity
    agree = _agreement(file.argmax, ref.argmax)
    n_tok = sum(len(x) for x in ref.argmax)
    gap = np.asarray(file.text_nll, dtype=np.float64) - np.asarray(ref.text_nll, dtype=np.float64)
    counts = np.asarray([len(x) for x in ref.argmax], dtype=np.float64)
    if len(gap) > 1:
        idx = np.random.default_rng(seed).integers(0, len(gap), size=(BOOTSTRAP_RESAMPLES, len(gap)))
        ratios = np.exp(gap[idx].sum(axis=1) / np.maximum(counts[idx].sum(axis=1), 1.0))
        lo, hi, upper = (float(v) for v in np.quantile(ratios, [0.025, 0.975, 0.95]))
    else:  # one text: nothing to resample, the figure as measured
        lo = hi = upper = ratio
    per_text = np.exp(gap / np.maximum(counts, 1.0)) if len(gap) else np.asarray([ratio])
    judged_ratio = max(ratio, upper) if tol.margin else ratio
    judged_agree = (agree - MARGIN_Z * float(np.sqrt(max(agree * (1.0 - agree), 0.0) / n_tok))
                    if tol.margin and n_tok else agree)
    judged = figures(judged_ratio, judged_agree, n_tok)
    return {"ppl_ratio": ratio, "agreement": agree, "perplexity": file.perplexity, "fp32_perplexity": ref.perplexity,
            "texts": len(ref.argmax), "tokens": n_tok,
            "spread": {"ppl_ratio_ci95": [lo, hi], "resamples": BOOTSTRAP_RESAMPLES if len(gap) > 1 else 0, "seed": seed,
                       "per_text_ppl_ratio": {"p05": float(np.quantile(per_text, 0.05)),
                                              "median": float(np.median(per_text)),
                                              "p95": float(np.quantile(per_text, 0.95))}},
            "judged": {"ppl_ratio": judged_ratio, "agreement": judged_agree}, "margin": tol.margin,
            "violations": tol.broken(judged_ratio, judged_agree), "_figures": judged}


def _agreement(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    hits = sum(int((x == y).sum()) for x, y in zip(a, b))
    total = sum(len(x) for x in a)
    return hits / total if total else 1.0


@dataclass
class CacheGuard:
    """What the guard decided: the chosen step, each rung tried (report.json's ``guard.rungs``), the
    fp32 cache's score, whether the tolerance held, and the ladder."""

    step: Step
    rungs: list[dict[str, Any]]
    reference: Score
    met: bool
    ladder: tuple[str, ...]

    @property
    def chosen(self) -> str:
        return self.rungs[-1]["rung"]


def _keep_entry(ref: Score, step: Step | None = None, held: list[list[int]] | None = None,
                pad: int = 0) -> dict[str, Any]:
    """The fp32 cache's entry; with ``step`` (other sites substituted) its figures are measured."""
    s = ref if step is None else score(TorchStepRunner(step), held or [], pad_id=pad)  # type: ignore[arg-type]
    return {"rung": KEEP, "status": "applied", "perplexity": s.perplexity, "ppl_ratio": s.perplexity / ref.perplexity,
            "agreement": _agreement(s.argmax, ref.argmax), "reason": "fp32 cache (the ladder's last rung)"}


def _vs(s: Score, ref: Score) -> Figures:
    return figures(s.perplexity / ref.perplexity, _agreement(s.argmax, ref.argmax), s.tokens)


def local_error(gm: Any, record: SiteRecord, rung: str) -> float | None:
    """The site's relative output error on ``rung`` where it acts (summed over its submodules' fitted
    ``local_error``, e.g. a weight-only Linear's E‖xΔW‖² / E‖xW‖² on the fit inputs); None where a
    submodule has none."""
    errs = [getattr(gm.get_submodule(n), "local_error", {}).get(rung) for n in record.submodules]
    known = [float(e) for e in errs if e is not None]
    return sum(known) if errs and len(known) == len(errs) else None


def guard_sites(gm: Any, records: Sequence[SiteRecord], base: DecoderStep, ref: Score, held: list[list[int]],
                pad: int, tol: DecoderTolerance, progress: Callable[[str], None] | None = None) -> GuardResult:
    """The graph passes' sites of a captured step (``gm``, every site fitted) down their ladders
    (``verify.ladder_guard`` with ``gallop``: a prefix search over the ranked moves), each configuration scored on the
    held-out texts against the fp32 step's ``ref``.

    Solo figures: a site whose submodules know their error where they act (``local_error``) is ranked
    by it — no model run, so the cost does not grow as sites × whole-model forwards (a 30-layer
    decoder has 211 Linear sites); the figure stands in for both the perplexity increase and the
    agreement loss (1 − error), for ranking only. Other sites: whole-model perplexity and agreement
    with only that site on. Only configurations are judged, end to end."""
    runner = TorchStepRunner(GraphStep(gm, base))  # type: ignore[arg-type]
    by_site = {r.site: r for r in records}

    def measure(config: dict[str, str]) -> Figures:
        for r in records:
            rung = config.get(r.site, KEEP)
            if r.rungs:
                set_site_rung(gm, r, rung)
            else:
                set_site_active(gm, r, rung != KEEP)
        fig = _vs(score(runner, held, pad_id=pad), ref)
        if progress is not None:
            progress(f"{len(config)} of {len(records)} site(s) on: perplexity ×{1 + fig.max_rel_err:.4f}, "
                     f"agreement {fig.agreement:.4f}")
        return fig

    def solo(site: str, rung: str) -> Figures:
        err = local_error(gm, by_site[site], rung)
        return measure({site: rung}) if err is None else figures(1.0 + err, 1.0 - err, ref.tokens)

    return ladder_guard(records, solo, measure, figures(1.0, 1.0, ref.tokens), tol.bounds(), gallop=True)


def guard_cache(pass_: CachePass | None, profile: Profile | None, step32: DecoderStep, stats: CacheStats,
                held: list[list[int]], pad: int, tol: DecoderTolerance,
                build: Callable[[DecoderStep], Step] | None = None) -> CacheGuard:
    """Step the cache down ``pass_``'s ladder (``verify.ladder_guard``) on the held-out texts; no pass
    (``surgeon export``): the fp32 cache, measured for the report. ``build``: the step each cache rung
    is measured and written as (the graph passes' kept sites on it), against the fp32 step all the same."""
    ref = score(TorchStepRunner(step32), held, pad_id=pad)
    make: Callable[[DecoderStep], Step] = build or (lambda step: step)
    if pass_ is None:
        only = make(step32)
        return CacheGuard(only, [_keep_entry(ref, None if build is None else only, held, pad)], ref, True, (KEEP,))
    ladder = pass_.rungs(profile)
    measured: dict[str, tuple[Step, Score]] = {}

    def measure(rung: str) -> Figures:
        if rung not in measured:
            step = make(pass_.apply(step32, stats, rung))
            measured[rung] = (step, score(TorchStepRunner(step), held, pad_id=pad))  # type: ignore[arg-type]
        return _vs(measured[rung][1], ref)

    exact = figures(1.0, 1.0, ref.tokens)
    record = SiteRecord(SITE, SITE, "", pass_.name, [], rungs=tuple(r for r in ladder if r != KEEP))
    result = ladder_guard([record], lambda site, rung: measure(rung),
                          lambda config: measure(config.get(SITE, KEEP)) if SITE in config or build else exact,
                          exact, tol.bounds())
    chosen = result.rungs.get(SITE, KEEP)
    rungs = []
    for rung in ladder[:ladder.index(chosen)]:
        if rung in measured:
            rungs.append(_entry(rung, *measured[rung], ref, tol, "rolled_back"))
    if chosen == KEEP:
        kept = measured[KEEP][0] if KEEP in measured else make(pass_.apply(step32, stats, KEEP))
        rungs.append(_keep_entry(ref, None if build is None else kept, held, pad))
        return CacheGuard(kept, rungs, ref, result.met, ladder)
    rungs.append(_entry(chosen, *measured[chosen], ref, tol, "applied"))
    return CacheGuard(measured[chosen][0], rungs, ref, result.met, ladder)


def _entry(rung: str, step: Step, s: Score, ref: Score, tol: DecoderTolerance, status: str) -> dict[str, Any]:
    ratio, agree = s.perplexity / ref.perplexity, _agreement(s.argmax, ref.argmax)
    broken = tol.broken(ratio, agree)
    entry = {"rung": rung, "status": status, "perplexity": s.perplexity, "ppl_ratio": ratio, "agreement": agree,
             "reason": "; ".join(broken) if broken else "within tolerance"}
    if step.cache_format is not None:
        entry["cache_format"] = step.cache_format.to_json()
    return entry


def verify_file(runner: OrtRunner, step: Step, lm: nn.Module, prompts: list[list[int]], held: list[list[int]],
                pad: int, eos: int | None, geometry: CacheGeometry, ref: Score,
                tol: DecoderTolerance) -> tuple[dict[str, Any], dict[str, Any]]:
    """The file in onnxruntime (``runner``): per-step logits vs torch with its own cache, greedy tokens
    vs torch ``generate``, perplexity (file and fp32 torch), cache bytes per token (file and fp32); and
    the file's held-out figures against the fp32 torch step's score ``ref`` (``file_figures``)."""
    gen = generate(runner, prompts, VERIFY_NEW_TOKENS, pad_id=pad, eos_id=eos, trace=True)
    # torch with its own cache: the original LM (a file of it as it is), else the torch module of the file
    original = isinstance(step, DecoderStep) and step.cache_dtype is None
    torch_ref = HfCacheRunner(lm) if original else TorchStepRunner(step)  # type: ignore[arg-type]
    per_step = replay(torch_ref, gen.steps)
    vs_fp32 = per_step if original else replay(HfCacheRunner(lm), gen.steps)
    ref_tokens = hf_generate(lm, prompts, VERIFY_NEW_TOKENS, pad_id=pad, eos_id=eos)
    # the file's own torch module greedy (its substitutes move the tokens away from the original's legitimately)
    module_tokens = ref_tokens if original else generate(TorchStepRunner(step), prompts,  # type: ignore[arg-type]
                                                         VERIFY_NEW_TOKENS, pad_id=pad, eos_id=eos).tokens
    pairs = [(a, b) for x, y in zip(gen.tokens, ref_tokens) for a, b in zip(x, y)]
    agreement = sum(a == b for a, b in pairs) / max(len(pairs), 1)
    file_score = score(runner, held, pad_id=pad)
    file_ppl = file_score.perplexity
    torch_ppl = hf_perplexity(lm, held)
    per_token = gen.cache_bytes / max(len(prompts) * gen.cache_tokens, 1)
    fp32_per_token = geometry.bytes_per_token(None)
    return {
        "prompts": len(prompts), "new_tokens": VERIFY_NEW_TOKENS,
        "logits_max_abs_diff_per_step": per_step,
        "logits_max_abs_diff": max(per_step),
        "logits_vs": "the original LM with its own DynamicCache" if original
                     else ("the torch module of the quantized decoder (surgeon.decoder.step.DecoderStep, or its "
                           "captured graph with the passes' sites) with its own cache"),
        "logits_max_abs_diff_vs_fp32_torch": max(vs_fp32),
        "greedy_agreement_vs_torch_generate": agreement,
        "greedy_identical_to_torch_generate": gen.tokens == ref_tokens,
        "greedy_identical_to_torch_module": gen.tokens == module_tokens,
        "perplexity": {"file": file_ppl, "fp32_torch": torch_ppl, "ratio": file_ppl / torch_ppl,
                       "texts": len(held), "tokens": int(sum(len(x) - 1 for x in held if len(x) >= 2))},
        "cache_bytes_per_token": {"file": per_token, "fp32": fp32_per_token, "ratio": per_token / fp32_per_token,
                                  "measured_on": "the present tensors ORT returned (all layers, keys and values, "
                                                 "per sequence and token)"},
    }, file_figures(file_score, ref, tol)
