"""``surgeon optimize LM --target onnx-decoder``: a causal LM's decode step with its key/value cache,
the cache format chosen by a guard, written and verified by generation and perplexity.

Stages: load (``AutoModelForCausalLM``, ``use_cache=True``) and check the cache is the standard one →
texts (``--calib`` lines split into fit and held-out parts as ``data.split_batches`` splits batches, or
the built-in ``DEFAULT_DECODER_TEXT``) → cache statistics on the fit part → guard: each rung of the
pass's ladder (the profile's ``kv_cache`` ladder, e.g. int8-head → fp8-head → keep) is measured on the
held-out part in torch (the same step module the file computes) against the fp32 cache: perplexity
within ``1 + ppl_increase`` and greedy next-token agreement ≥ ``agreement``, else rolled back →
lower with the target → verify the file in onnxruntime (per-step logits vs torch, greedy tokens vs
torch ``generate``, perplexity, cache bytes per token) → OUTDIR atomically (model.onnx, config.json,
tokenizer files, report.json, README.md).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import SurgeonError
from .data import DEFAULT_CHECK_FRACTION, split_batches

__all__ = ["DEFAULT_DECODER_TEXT", "DecoderTolerance", "optimize_decoder", "run_decoder_cli"]

REPORT_SCHEMA = "surgeon.decoder/1"
VERIFY_NEW_TOKENS = 16  # greedy steps the verification compares (per-step logits, tokens vs generate)
PROMPT_TOKENS = 8  # verification prompts: the first tokens of held-out texts

# Held-out / calibration text when no --calib is given (short, varied English).
DEFAULT_DECODER_TEXT = (
    "The quick brown fox jumps over the lazy dog.",
    "A decoder writes one token at a time and keeps the keys and values of every earlier token.",
    "Inference servers keep that cache in eight bits so that more sequences fit in memory.",
    "Perplexity measures how surprised a language model is by text it has not seen.",
    "Greedy decoding picks the most likely next token at each step of generation.",
    "The river was wide and slow, and the boats on it moved as if they had nowhere to be.",
    "She opened the window, and the smell of rain came into the quiet room.",
    "Numbers in a computer are stored with a limited number of bits, which limits their precision.",
)


@dataclass(frozen=True)
class DecoderTolerance:
    """What a cache rung must keep on held-out text, against the fp32 cache."""

    ppl_increase: float = 0.01  # perplexity at most (1 + ppl_increase) × the fp32 cache's
    agreement: float = 0.95  # greedy next-token agreement (teacher-forced) at least this

    @classmethod
    def parse(cls, spec: "str | DecoderTolerance | None") -> "DecoderTolerance":
        """``None`` → the defaults; ``"ppl_increase=0.02,agreement=0.9"`` → those keys (others default)."""
        if spec is None or isinstance(spec, DecoderTolerance):
            return spec or cls()
        values: dict[str, float] = {}
        for part in filter(None, (p.strip() for p in str(spec).split(","))):
            key, sep, raw = (s.strip() for s in part.partition("="))
            if not sep or key not in ("ppl_increase", "agreement"):
                raise SurgeonError(f"cannot parse decoder tolerance '{spec}': give ppl_increase=X and/or agreement=Y "
                                   "(e.g. ppl_increase=0.01,agreement=0.95)")
            try:
                values[key] = float(raw)
            except ValueError:
                raise SurgeonError(f"decoder tolerance {key}={raw} is not a number") from None
        tol = cls(**values)
        if not (tol.ppl_increase >= 0 and 0 <= tol.agreement <= 1):
            raise SurgeonError(f"decoder tolerance needs ppl_increase ≥ 0 and agreement in [0, 1], got '{spec}'")
        return tol

    def describe(self) -> str:
        return f"perplexity ≤ (1 + {self.ppl_increase:g}) × fp32, greedy next-token agreement ≥ {self.agreement:g}"


class _KeepCache:
    """Stands in for the pass when none runs: one rung, the fp32 cache."""

    def rungs(self, profile: Any = None) -> tuple[str, ...]:
        return ("keep",)

    def apply(self, step: Any, stats: Any, rung: str) -> Any:
        return step

    def spec(self) -> str:
        return "none (fp32 cache)"


# Calibration prompts shorter than this (tokens) get a warning with an 8-bit cache: the scales and key
# offsets see only early positions, and RoPE rotates a key's channel pairs by an angle that grows with
# position, so later keys can leave the calibrated ranges. On bench/data/tiny-decoder, INT8 per head
# calibrated on ~20-token lines cost +2.7 % perplexity on 512-token windows, on ~550-token prompts
# +0.01 % (docs/benchmarks.md, "Decoder KV cache"); the guard's held-out lines are as short as the
# calibration's, so it cannot see this itself.
SHORT_CALIBRATION = 256


def short_calibration_warning(longest: int) -> str:
    return (f"the calibration prompts are at most {longest} tokens: the cache's scales were fitted, and the "
            f"guard checked, on positions < {longest} only; keys at later positions (rotated by RoPE) can fall "
            f"outside those ranges. Calibrate on prompts as long as the contexts you serve (docs/decoder.md)")


def _read_lines(path: str) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise SurgeonError(f"cannot read calibration file '{path}': " + ("it is a directory" if p.is_dir()
                                                                         else "no such file"))
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SurgeonError(f"cannot read calibration file '{path}': not UTF-8 text") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise SurgeonError(f"calibration file '{path}' is empty")
    return lines


def _batches(token_lists: Sequence[Sequence[int]], pad_id: int, size: int = 8) -> list[dict[str, Any]]:
    import torch

    from ..generate import left_pad

    out = []
    for i in range(0, len(token_lists), size):
        ids, mask = left_pad(token_lists[i:i + size], pad_id)
        out.append({"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask)})
    return out


def _agreement(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    hits = sum(int((x == y).sum()) for x, y in zip(a, b))
    total = sum(len(x) for x in a)
    return hits / total if total else 1.0


def _guard(pass_: Any, profile: Any, step32: Any, stats: Any, held: list[list[int]], pad: int,
           tol: DecoderTolerance) -> tuple[Any, list[dict[str, Any]], Any]:
    """Try the pass's rungs best first on the held-out texts; the first that keeps ``tol`` wins."""
    from ..decoder import TorchStepRunner
    from ..generate import score

    ref = score(TorchStepRunner(step32), held, pad_id=pad)
    rungs: list[dict[str, Any]] = []
    chosen = None
    for rung in pass_.rungs(profile):
        step = pass_.apply(step32, stats, rung)
        if rung == "keep":
            rungs.append({"rung": rung, "status": "applied", "perplexity": ref.perplexity, "ppl_ratio": 1.0,
                          "agreement": 1.0, "reason": "fp32 cache (the ladder's last rung)"})
            chosen = step
            break
        s = score(TorchStepRunner(step), held, pad_id=pad)
        ratio = s.perplexity / ref.perplexity
        agree = _agreement(s.argmax, ref.argmax)
        broken = [f"perplexity ×{ratio:.4f} > {1 + tol.ppl_increase:g}"] if ratio > 1 + tol.ppl_increase else []
        if agree < tol.agreement:
            broken.append(f"greedy agreement {agree:.4f} < {tol.agreement:g}")
        entry = {"rung": rung, "status": "rolled_back" if broken else "applied", "perplexity": s.perplexity,
                 "ppl_ratio": ratio, "agreement": agree,
                 "reason": "; ".join(broken) if broken else "within tolerance"}
        if step.cache_format is not None:
            entry["cache_format"] = step.cache_format.to_json()
        rungs.append(entry)
        if not broken:
            chosen = step
            break
    return chosen, rungs, ref


def _verify(path: Path, step: Any, lm: Any, prompts: list[list[int]], held: list[list[int]], pad: int,
            eos: int | None, geometry: Any) -> dict[str, Any]:
    """The file in onnxruntime: per-step logits vs torch with its own cache, greedy tokens vs torch
    ``generate``, perplexity (file and fp32 torch), cache bytes per token (file and fp32)."""
    from ..decoder import TorchStepRunner
    from ..decoder_reference import HfCacheRunner, hf_generate, hf_perplexity, replay
    from ..generate import OrtRunner, generate, score

    runner = OrtRunner(path, max_positions=geometry.max_positions)
    gen = generate(runner, prompts, VERIFY_NEW_TOKENS, pad_id=pad, eos_id=eos, trace=True)
    # torch with its own cache: the original LM (fp32 file), the quantized step module (8-bit file)
    torch_ref = HfCacheRunner(lm) if step.cache_dtype is None else TorchStepRunner(step)
    per_step = replay(torch_ref, gen.steps)
    vs_fp32 = replay(HfCacheRunner(lm), gen.steps) if step.cache_dtype is not None else per_step
    ref_tokens = hf_generate(lm, prompts, VERIFY_NEW_TOKENS, pad_id=pad, eos_id=eos)
    pairs = [(a, b) for x, y in zip(gen.tokens, ref_tokens) for a, b in zip(x, y)]
    agreement = sum(a == b for a, b in pairs) / max(len(pairs), 1)
    file_ppl = score(runner, held, pad_id=pad).perplexity
    torch_ppl = hf_perplexity(lm, held)
    per_token = gen.cache_bytes / max(len(prompts) * gen.cache_tokens, 1)
    fp32_per_token = geometry.bytes_per_token(None)
    return {
        "prompts": len(prompts), "new_tokens": VERIFY_NEW_TOKENS,
        "logits_max_abs_diff_per_step": per_step,
        "logits_max_abs_diff": max(per_step),
        "logits_vs": "the original LM with its own DynamicCache" if step.cache_dtype is None
                     else "the torch module of the quantized decoder (surgeon.decoder.DecoderStep) with its own cache",
        "logits_max_abs_diff_vs_fp32_torch": max(vs_fp32),
        "greedy_agreement_vs_torch_generate": agreement,
        "greedy_identical_to_torch_generate": gen.tokens == ref_tokens,
        "perplexity": {"file": file_ppl, "fp32_torch": torch_ppl, "ratio": file_ppl / torch_ppl,
                       "texts": len(held), "tokens": int(sum(len(x) - 1 for x in held if len(x) >= 2))},
        "cache_bytes_per_token": {"file": per_token, "fp32": fp32_per_token, "ratio": per_token / fp32_per_token,
                                  "measured_on": "the present tensors ORT returned (all layers, keys and values, "
                                                 "per sequence and token)"},
    }


def optimize_decoder(model: str | os.PathLike, outdir: str | os.PathLike, *, passes: Any = None,
                     calib: str | None = None, tolerance: Any = None, target: str = "onnx-decoder",
                     seed: int = 0, force: bool = False, speed: bool = True) -> dict[str, Any]:
    """Write a verified decoder OUTDIR for the causal LM ``model`` (a Hugging Face directory or
    ``package.module:factory``); return the report (what ``report.json`` holds).

    ``passes``: a pipeline spec or list of passes (``kv-cache-quant{...}`` only; default the target's
    default passes); ``calib``: a text file of lines (calibration prompts; a seeded quarter of them is
    held out for perplexity and agreement), else ``DEFAULT_DECODER_TEXT``; ``tolerance``: a
    ``DecoderTolerance`` or its spec string; ``speed``: with an 8-bit cache, also write the fp32-cache
    file to ``bench/original.onnx`` and time one decode step of each (``report["speed"]``)."""
    from .. import __version__, deploy, targets  # type: ignore[attr-defined]
    from ..decoder import DecoderStep, check_standard_cache, collect_stats
    from ..deploy import io_spec
    from ..generate import pad_and_eos
    from ..loaders import load_decoder
    from ..pass_manager import parse_pipeline
    from ..resources import atomic_dir, check_output_dir

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    out = Path(outdir)
    check_output_dir(out, force)
    tgt = targets.get_target(target)
    if passes is None:
        passes = tgt.default_passes
    pass_list = parse_pipeline(passes) if isinstance(passes, str) else list(passes)
    if [p.name for p in pass_list if p.name != "kv-cache-quant"] or len(pass_list) > 1:
        raise SurgeonError(f"target {target} runs one kv-cache-quant pass (the cache is the decoder's site); "
                           f"got {', '.join(p.name for p in pass_list)}")
    # no pass (surgeon export): the fp32 cache, i.e. a ladder of "keep" only
    kvq: Any = pass_list[0] if pass_list else _KeepCache()  # KVCacheQuant, found through the registry
    tol = DecoderTolerance.parse(tolerance)
    lines = _read_lines(calib) if calib else list(DEFAULT_DECODER_TEXT)
    loaded = load_decoder(model)
    lm: Any = loaded.model
    tok = loaded.tokenizer
    geometry = check_standard_cache(lm, loaded.source)
    timings["load"] = time.perf_counter() - t0

    pad, eos = pad_and_eos(tok)
    limit = geometry.max_positions or 512
    token_lists = [list(tok(s)["input_ids"])[:limit] for s in lines]
    # lines, not sample batches: the held-out part keeps the plain fraction (its perplexity counts tokens)
    split = split_batches(token_lists, DEFAULT_CHECK_FRACTION, seed, min_check_samples=0)  # type: ignore[arg-type]
    fit, held = [list(x) for x in split.fit], [list(x) for x in split.check]
    warnings = list(loaded.notes)
    if not split.independent:
        warnings.append("a single calibration line: it is used for both calibrating and checking, so the check is "
                        "not independent")
    t = time.perf_counter()
    step32 = DecoderStep(lm, geometry)
    stats = collect_stats(lm, geometry, _batches(fit, pad))
    timings["calibrate"] = time.perf_counter() - t
    t = time.perf_counter()
    final, rungs, ref = _guard(kvq, tgt.profile, step32, stats, held, pad, tol)
    timings["guard"] = time.perf_counter() - t
    prompts = [x[:PROMPT_TOKENS] for x in (held + fit)[:2]]
    if len(prompts) == 2 and len(prompts[0]) == len(prompts[1]):
        prompts[1] = prompts[1][:-1] or prompts[1]  # different lengths: the batch is left-padded
    if any(len(p) + VERIFY_NEW_TOKENS > limit for p in prompts):
        raise SurgeonError(f"the model has {limit} positions, too few to verify {VERIFY_NEW_TOKENS} generated tokens")

    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA, "surgeon_version": __version__,
        "model": {"source": loaded.source, "class": type(lm).__name__, "layers": geometry.layers,
                  "kv_heads": geometry.kv_heads, "head_dim": geometry.head_dim,
                  "max_positions": geometry.max_positions},
        "target": {"name": tgt.name, "profile": tgt.profile.to_json()},
        "passes": [p.spec() for p in pass_list],
        "tolerance": {**asdict(tol), "description": tol.describe()},
        "calibration": {"source": calib or "built-in text (surgeon.pipeline.decoder.DEFAULT_DECODER_TEXT)",
                        "lines": len(lines), "fit_lines": len(fit), "held_out_lines": len(held),
                        "fit_tokens": int(sum(map(len, fit))), "held_out_tokens": int(sum(map(len, held))),
                        "held_out_index": split.check_index, "independent": split.independent, "seed": seed,
                        "stats_tokens": stats.tokens},
        "guard": {"ladder": list(kvq.rungs(tgt.profile)), "measured_in": "torch (the step module the file computes)",
                  "fp32_perplexity": ref.perplexity, "rungs": rungs, "chosen": rungs[-1]["rung"]},
        "cache": final.cache_format.to_json() if final.cache_format is not None else {"dtype": "float32"},
        "warnings": warnings,
    }
    longest = max(map(len, fit), default=0)
    report["calibration"]["longest_fit_tokens"] = longest
    if final.cache_format is not None and longest < min(SHORT_CALIBRATION, limit):
        report["warnings"].append(short_calibration_warning(longest))
    rolled = [r["rung"] for r in rungs if r["status"] == "rolled_back"]
    if rolled:
        why = "; ".join(f"{r['rung']}: {r['reason']}" for r in rungs if r["status"] == "rolled_back")
        report["warnings"].append(f"rolled back {', '.join(rolled)} ({why})")

    with atomic_dir(out, force) as partial:
        t = time.perf_counter()
        figures = tgt.lower(final, None, partial)
        figures.pop("path", None)
        timings["export"] = time.perf_counter() - t
        t = time.perf_counter()
        report["verification"] = _verify(partial / tgt.filename, final, lm, prompts, held, pad, eos, geometry)
        timings["verify"] = time.perf_counter() - t
        report["targets"] = {tgt.name: figures}
        lm.config.to_json_file(str(partial / "config.json"))
        gen_cfg = getattr(lm, "generation_config", None)
        if gen_cfg is not None:
            gen_cfg.to_json_file(str(partial / "generation_config.json"))
        tok.save_pretrained(str(partial))
        spec = io_spec(partial / tgt.filename)
        cache_name = "fp32" if final.cache_dtype is None else f"{final.cache_format.dtype} ({final.cache_format.granularity} scales)"
        report["deploy"] = {"file": tgt.filename, **spec, "session_config": figures["session_config"],
                            "readme": "README.md"}
        (partial / "README.md").write_text(deploy.decoder_readme(spec, cache=cache_name, session_config=figures["session_config"],
                                                          layers=geometry.layers, title=f"model.onnx ({Path(loaded.source).name})"),
                                           encoding="utf-8")
        if speed and final.cache_format is not None:
            # what the 8-bit cache buys, on this machine: its decode step against the fp32-cache file's
            from ..speed import DECODE_PAST, measure_decode_step

            t = time.perf_counter()
            (partial / "bench").mkdir()
            tgt.baseline(step32, None, partial / "bench" / "original.onnx")
            vocab = int(lm.config.vocab_size)
            report["speed"] = {**measure_decode_step(partial / tgt.filename, partial / "bench" / "original.onnx",
                                                     vocab=vocab, past=min(DECODE_PAST, limit - 1)),
                               "vocab": vocab, "files": {"optimized": tgt.filename, "original": "bench/original.onnx"}}
            timings["speed"] = time.perf_counter() - t
        timings["total"] = time.perf_counter() - t0
        report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        report["verdict"] = {"status": "met" if not rolled else "met_by_rollback", "exit_code": 0,
                             "message": f"cache {rungs[-1]['rung']}" + (f" (rolled back {', '.join(rolled)})" if rolled else "")}
        (partial / "report.json").write_text(json.dumps(report, indent=2, default=_json_default), encoding="utf-8")
        from ..resources import publish_mode

        for p in partial.rglob("*"):
            if p.is_file():
                publish_mode(p)
    return report


def _json_default(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, float) and math.isnan(v):
        return None
    return str(v)


def run_decoder_cli(args: Any) -> int:
    """``surgeon optimize LM -o OUTDIR --target onnx-decoder [--passes …] [--calib FILE] [--tolerance …]``."""
    report = optimize_decoder(args.model, args.output, passes=args.passes, calib=args.calib,
                              tolerance=args.tolerance, target=args.target, seed=getattr(args, "seed", 0),
                              force=getattr(args, "force", False), speed=getattr(args, "speed", True))
    g, v = report["guard"], report["verification"]
    for r in g["rungs"]:
        print(f"kv cache {r['rung']}: {r['status']} — perplexity ×{r['ppl_ratio']:.4f}, greedy agreement "
              f"{r['agreement']:.4f} ({r['reason']})")
    for w in report["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    c = v["cache_bytes_per_token"]
    print(f"file: cache {g['chosen']}, {c['file']:.0f} bytes/token ({c['ratio']:.2f}× fp32); perplexity "
          f"{v['perplexity']['file']:.4g} (fp32 torch {v['perplexity']['fp32_torch']:.4g}); greedy tokens vs torch "
          f"generate {v['greedy_agreement_vs_torch_generate']:.3f}; logits max |Δ| {v['logits_max_abs_diff']:.3g}")
    sp = report.get("speed")
    if sp:
        print(f"bought: cache {sp['cache_ratio']:.2f}× the fp32 cache's bytes; decode step {sp['latency_ratio']:.2f}× "
              f"the fp32-cache file's ({sp['decode_step_ms']['optimized']:.2f} vs {sp['decode_step_ms']['original']:.2f} ms "
              f"at past {sp['past_length']}, batch {sp['batch']}, this machine; surgeon bench OUTDIR times it again)")
    print(f"written: {Path(args.output) / 'model.onnx'} ({Path(args.output) / 'report.json'})")
    return 0
