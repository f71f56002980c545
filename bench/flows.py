"""Normalizing flows on scikit-learn's digits (D = 64): flow-fold, flow-inverse, linear-quant, side by side.

Data: the 1797 8×8 digits shipped with scikit-learn (pixel levels 0…16), a seeded 80/20 split (1437
train, 360 test), dequantized (v = pixel + u, u ~ U[0, 1), fixed seed) and logit-transformed:
y = logit(α + (1 − 2α)·v/17), α = 0.05. Bits per dimension are reported in the 17-level pixel space
(the logit transform's log-Jacobian is accounted for): bpd = −(log p(y) + log|dy/dv|) / (64 ln 2).

Models (trained here, fixed seeds, Adam; bench/flow_models.py):
* RealNVP-style: ActNorm → masked affine coupling (alternating masks), invertible linear mixes.
* MAF: MADE layers, order reversed between them, ActNorm after each.
Both keep the state with the best bits/dim on the last 10 % of the training split (early stopping).

For each: test bpd of the trained flow; ``flow-fold`` (exact: outputs compared); ``flow-inverse``
distilled on the training images through ``surgeon.passes.flow_inverse.distill_inverse`` (the optimize
pipeline's fit/check split of the calibration batches, guard on the check part) and measured on the
held-out test images: median / p90 relative reconstruction error ‖g(f(x)) − x‖/‖x‖; time to draw 1000
samples (z ~ N(0, I) → x) with the exact inverse and with the auxiliary one; a sample-quality proxy
(the original flow's log-likelihood of the samples, in bpd — lower is more "typical" — and the mean
distance from a sample to its nearest held-out image, both for exact and auxiliary samples).
``linear-quant`` on the coupling networks is run through ``surgeon.optimize`` with the bits/dim
change as the guard's metric when that pass is available.

    python bench/flows.py                  # writes bench/results/flows.md
    python bench/flows.py --quick          # fewer training steps (a smoke run)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from flow_models import Flow, log_normal, maf, realnvp  # noqa: E402

ALPHA = 0.05
LEVELS = 17
D = 64


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_data(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y_train, y_test, ljac_train, ljac_test)``: logit-space data [N, 64] and per-sample log|dy/dv|."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pix = torch.tensor(digits.data, dtype=torch.float64)
    i_train, i_test = train_test_split(range(len(pix)), test_size=0.2, random_state=seed, stratify=digits.target)
    gen = torch.Generator().manual_seed(seed)
    v = pix + torch.rand(pix.shape, generator=gen, dtype=torch.float64)
    s = ALPHA + (1 - 2 * ALPHA) * v / LEVELS
    y = torch.log(s) - torch.log1p(-s)
    ljac = (math.log(1 - 2 * ALPHA) - math.log(LEVELS) - torch.log(s) - torch.log1p(-s)).sum(1)
    return y[i_train].float(), y[i_test].float(), ljac[i_train], ljac[i_test]


def bpd(flow: torch.nn.Module, y: Tensor, ljac: Tensor) -> float:
    """Bits per dimension in 17-level pixel space (exact, from the flow's forward)."""
    with torch.no_grad():
        z, ld = flow(y)
        lp = log_normal(z).double() + ld.double() + ljac
    return float(-lp.mean() / (D * math.log(2)))


def train(flow: Flow, y: Tensor, steps: int, lr: float = 1e-3, batch: int = 128, seed: int = 0,
          val: tuple[Tensor, Tensor] | None = None, every: int = 50) -> tuple[float, int]:
    """Maximum likelihood with Adam (cosine schedule): ``(seconds, steps of the kept state)``.

    With ``val = (y_val, ljac_val)`` the state with the best validation bits/dim (checked every
    ``every`` steps) is kept: 1437 images overfit a 200k-parameter flow within a few hundred steps."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(flow.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    best, best_state, best_step = math.inf, None, steps
    start = time.perf_counter()
    for step in range(1, steps + 1):
        flow.train()
        idx = torch.randint(0, y.shape[0], (batch,), generator=gen)
        loss = -flow.log_prob(y[idx]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), 10.0)
        opt.step()
        sched.step()
        if val is not None and (step % every == 0 or step == steps):
            flow.eval()
            score = bpd(flow, *val)
            if score < best:
                best, best_step = score, step
                best_state = {k: v.detach().clone() for k, v in flow.state_dict().items()}
    if best_state is not None:
        flow.load_state_dict(best_state)
    flow.eval()
    return time.perf_counter() - start, best_step


def timed(fn: Any, *args: Any, repeats: int = 3) -> tuple[float, Any]:
    """Best wall time of ``repeats`` calls (the machine is shared: the best is the least disturbed)."""
    best, out = math.inf, None
    for _ in range(repeats):
        t = time.perf_counter()
        with torch.no_grad():
            out = fn(*args)
        best = min(best, time.perf_counter() - t)
    return best, out


def nearest_distance(samples: Tensor, reference: Tensor) -> float:
    """Mean Euclidean distance from each sample to its nearest reference point (logit space)."""
    d = torch.cdist(samples.double(), reference.double())
    return float(d.min(1).values.mean())


def sample_bpd(flow: torch.nn.Module, x: Tensor) -> float:
    """The original flow's negative log-likelihood of samples, bits/dim in logit space (finite rows)."""
    with torch.no_grad():
        z, ld = flow(x)
        lp = log_normal(z).double() + ld.double()
    lp = lp[torch.isfinite(lp)]
    return float(-lp.mean() / (D * math.log(2)))


def rel_err(a: Tensor, b: Tensor) -> Tensor:
    return (a - b).double().norm(dim=1) / b.double().norm(dim=1).clamp_min(1e-12)


def evaluate(name: str, flow: Flow, data: tuple[Tensor, Tensor, Tensor, Tensor], *, inverse_opts: dict,
             calib_batch: int = 64, samples: int = 1000, seed: int = 0) -> dict:
    """Every figure of one trained flow (see the module docstring)."""
    import surgeon
    from surgeon.passes._flows import bpd_change, error_figures
    from surgeon.passes.flow_inverse import FlowInverse, distill_inverse

    ytr, yte, jtr, jte = data
    calib = [(ytr[i:i + calib_batch],) for i in range(0, ytr.shape[0], calib_batch)]
    example = (ytr[:calib_batch],)
    out: dict[str, Any] = {"model": name, "params": sum(p.numel() for p in flow.parameters())}
    out["test_bpd"] = bpd(flow, yte, jte)
    out["train_bpd"] = bpd(flow, ytr, jtr)

    # flow-fold, through the whole optimize pipeline (capture, guard, rebuild, re-export)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t = time.perf_counter()
        folded = surgeon.optimize(flow, example, calib, passes="flow-fold")
        out["fold_seconds"] = time.perf_counter() - t
    with torch.no_grad():
        z0, ld0 = flow(yte)
        z1, ld1 = folded.module(yte)
    out["fold_sites"] = folded.report["counts"]["applied"]
    out["fold_max_abs_diff"] = max(float((z0 - z1).abs().max()), float((ld0 - ld1).abs().max()))
    out["fold_test_bpd"] = bpd(folded.module, yte, jte)
    out["forward_ms"] = 1e3 * timed(flow, yte, repeats=5)[0]
    out["forward_folded_ms"] = 1e3 * timed(folded.module, yte, repeats=5)[0]

    # flow-inverse: distilled on the fit part of the training batches, guarded on their check part
    p = FlowInverse(**inverse_opts)
    t = time.perf_counter()
    res = distill_inverse(flow, example, calib, flow_inverse=p, seed=seed)
    out["distill_seconds"] = time.perf_counter() - t
    out["guard"] = res.check.to_json() if res.check else {"accepted": False, "reason": res.diagnostics[0].reason}
    inv = res.inverse if res.inverse is not None else res.fitted  # rejected: still measured, reported as such
    if inv is None:
        raise RuntimeError(f"flow-inverse did not apply: {res.diagnostics[0].reason}")
    with torch.no_grad():
        zt = flow(yte)[0]
        held = {}
        for k in sorted(set(range(inverse_opts.get("corrections", 2) + 1))):
            inv.corrections = k
            if k and inv.flow is None:
                continue
            held[k] = error_figures(rel_err(inv(zt), yte))
        inv.corrections = inverse_opts.get("corrections", 2)
    out["test_rel_err"] = held

    # sampling 1000 points: exact inverse vs auxiliary inverse, the same z
    z = torch.randn(samples, D, generator=torch.Generator().manual_seed(seed))
    t_exact, x_exact = timed(flow.inverse, z)
    t_aux, x_aux = timed(inv, z)
    out["sample_exact_s"], out["sample_aux_s"] = t_exact, t_aux
    out["speedup"] = t_exact / t_aux
    # the same inverse without the safeguard's extra forward pass (k forward passes instead of k + 1)
    inv.safeguard = False
    t_bare, _ = timed(inv, z)
    with torch.no_grad():
        out["test_rel_err_no_safeguard"] = error_figures(rel_err(inv(zt), yte))
    inv.safeguard = inverse_opts.get("safeguard", True)
    out["sample_aux_no_safeguard_s"], out["speedup_no_safeguard"] = t_bare, t_exact / t_bare
    out["sample_rel_err_vs_exact"] = error_figures(rel_err(x_aux, x_exact))
    out["sample_bpd_exact"] = sample_bpd(flow, x_exact)
    out["sample_bpd_aux"] = sample_bpd(flow, x_aux)
    out["nn_dist_exact"] = nearest_distance(x_exact, yte)
    out["nn_dist_aux"] = nearest_distance(x_aux, yte)
    out["nn_dist_test_to_train"] = nearest_distance(yte, ytr)  # scale: real held-out data

    # linear-quant on the coupling networks, guarded by the change in bits/dim (when available)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = surgeon.optimize(flow, example, calib, passes="linear-quant", metric=bpd_change, tolerance=-0.05)
        out["lq"] = {"applied": q.report["counts"]["applied"], "rolled_back": q.report["counts"]["rolled_back"],
                     "metric": q.report["end_to_end"].get("metric"), "test_bpd": bpd(q.module, yte, jte),
                     "met": q.met}
    except Exception as exc:  # noqa: BLE001 - report what happened instead of failing the whole bench
        out["lq"] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    return out


def _f(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def markdown(rows: list[dict], config: dict) -> str:
    """The side-by-side table (one column per flow)."""
    names = [r["model"] for r in rows]

    def line(label: str, fn: Any) -> str:
        return f"| {label} | " + " | ".join(fn(r) for r in rows) + " |"

    k = config["inverse"]["corrections"]
    lines = [
        "# Flows on scikit-learn digits (D = 64): flow-fold, flow-inverse, linear-quant",
        "",
        f"Produced by `python bench/flows.py` ({config['date']}, torch {torch.__version__}, "
        f"{config['threads']} CPU thread(s) on a shared machine; timings are the best of 3 runs).",
        f"Training: {config['train']}. flow-inverse options: `{config['inverse_spec']}`; fit on the "
        "training images (75 % of the calibration batches), guard on the other 25 %; errors below are on "
        "the 360 held-out test images unless said otherwise.",
        "",
        "| | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
        line("parameters", lambda r: f"{r['params']:,}"),
        line("train time (s)", lambda r: _f(r["train_seconds"])),
        line("test bits/dim (exact density)", lambda r: _f(r["test_bpd"], 4)),
        line("flow-fold: sites folded", lambda r: str(r["fold_sites"])),
        line("flow-fold: max abs diff (z, log_det)", lambda r: _f(r["fold_max_abs_diff"])),
        line("flow-fold: test bits/dim", lambda r: _f(r["fold_test_bpd"], 4)),
        line("forward, 360 images (ms): original / folded",
             lambda r: f"{_f(r['forward_ms'])} / {_f(r['forward_folded_ms'])}"),
        line("flow-inverse guard (check part of calibration)",
             lambda r: ("accepted" if r["guard"]["accepted"] else "REJECTED") +
             f", median {_f(r['guard']['figures'].get('rel_err_median'))}"),
        line("reconstruction ‖g(f(x))−x‖/‖x‖, median: g only (k=0)",
             lambda r: _f(r["test_rel_err"][0]["median"])),
        line("… median after j = 0, 1, … correction steps",
             lambda r: " → ".join(_f(r["test_rel_err"][j]["median"]) for j in sorted(r["test_rel_err"]))),
        line(f"… with k = {k} correction steps: median / p90",
             lambda r: f"{_f(r['test_rel_err'][k]['median'])} / {_f(r['test_rel_err'][k]['p90'])}"),
        line("sample 1000: exact inverse (s)", lambda r: _f(r["sample_exact_s"])),
        line("sample 1000: auxiliary inverse (s)", lambda r: _f(r["sample_aux_s"])),
        line("sampling speed-up", lambda r: f"{r['speedup']:.1f}×"),
        line("without the safeguard: sample time (s) / speed-up / median error",
             lambda r: f"{_f(r['sample_aux_no_safeguard_s'])} / {r['speedup_no_safeguard']:.1f}× / "
                       f"{_f(r['test_rel_err_no_safeguard']['median'])}"),
        line("aux vs exact samples (same z): median rel. diff", lambda r: _f(r["sample_rel_err_vs_exact"]["median"])),
        line("samples' bits/dim under the flow (logit space): exact / aux",
             lambda r: f"{_f(r['sample_bpd_exact'], 4)} / {_f(r['sample_bpd_aux'], 4)}"),
        line("mean distance to nearest test image: exact / aux samples",
             lambda r: f"{_f(r['nn_dist_exact'])} / {_f(r['nn_dist_aux'])}"),
        line("(scale: test image → nearest training image)", lambda r: _f(r["nn_dist_test_to_train"])),
        line("linear-quant (guard: Δ bits/dim ≤ 0.05)", lambda r: _lq(r["lq"])),
        "",
    ]
    return "\n".join(lines)


def _lq(lq: dict) -> str:
    if "error" in lq:
        return f"not run: {lq['error']}"
    return (f"{lq['applied']} applied, {lq['rolled_back']} rolled back, Δbpd {_f(-lq['metric'] if lq['metric'] is not None else None)}, "
            f"test bpd {_f(lq['test_bpd'], 4)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run: few training steps")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "flows.md"))
    ap.add_argument("--json", default=None, help="also write the figures as JSON")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    quick = args.quick
    steps = {"RealNVP": 100 if quick else 1200, "MAF": 150 if quick else 1500}
    inverse = dict(hidden=256, depth=2, steps=200 if quick else 3000, lr=2e-3, batch_size=256, noise=0.3,
                   corrections=3, safeguard=True, max_rel_err=1e-2)
    data = load_data()
    ytr, yte, jtr, jte = data
    # early stopping on the last 10 % of the training split (the test split is never looked at)
    n_val = ytr.shape[0] // 10
    val = (ytr[-n_val:], jtr[-n_val:])
    rows = []
    with _threads(args.threads):
        for name, make in (("RealNVP", lambda: realnvp(D, layers=6, hidden=128)),
                           ("MAF", lambda: maf(D, layers=5, hidden=128))):
            torch.manual_seed(0)
            flow = make()
            seconds, kept = train(flow, ytr[:-n_val], steps[name], val=val)
            print(f"{name}: trained {steps[name]} steps in {seconds:.1f} s, kept step {kept}", file=sys.stderr,
                  flush=True)
            row = evaluate(name, flow, data, inverse_opts=inverse)
            row["train_seconds"], row["kept_step"] = seconds, kept
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("guard",)}, default=str), file=sys.stderr,
                  flush=True)
    spec = "flow-inverse{" + ",".join(f"{k}={v}" for k, v in inverse.items()) + "}"
    config = {"date": time.strftime("%Y-%m-%d"), "threads": args.threads, "inverse": inverse, "inverse_spec": spec,
              "train": "; ".join(f"{n}: up to {s} Adam steps, batch 128, lr 1e-3 cosine, best validation state kept "
                                 f"(step {next(r['kept_step'] for r in rows if r['model'] == n)})"
                                 for n, s in steps.items())}
    text = markdown(rows, config)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + _notes(rows), encoding="utf-8")
    if args.json:
        Path(args.json).write_text(json.dumps({"config": config, "rows": rows}, indent=2, default=str), encoding="utf-8")
    print(text)
    return 0


def _notes(rows: list[dict]) -> str:
    by = {r["model"]: r for r in rows}
    out = ["", "## Reading the table", ""]
    m = by.get("MAF")
    if m:
        k = max(m["test_rel_err"])
        for label, speed, err in (("with the safeguard", m["speedup"], m["test_rel_err"][k]["median"]),
                                  ("without the safeguard", m["speedup_no_safeguard"],
                                   m["test_rel_err_no_safeguard"]["median"])):
            out.append(f"* MAF target (≥ 10× faster sampling at ≤ 1e-2 median relative reconstruction error on "
                       f"held-out data), k = {k} {label}: speed-up {speed:.1f}× "
                       f"({'met' if speed >= 10 else 'NOT met'}), median error {_f(err)} "
                       f"({'met' if err <= 1e-2 else 'NOT met'}).")
        out.append(f"* The guard {'accepted' if m['guard']['accepted'] else 'rejected'} the MAF inverse "
                   f"(check-part median {_f(m['guard']['figures'].get('rel_err_median'))}). Timings move by "
                   "±30 % between runs on this shared machine; the ratio is what to read.")
    r = by.get("RealNVP")
    if r:
        out.append(f"* RealNVP: couplings already invert in one pass per layer, so the auxiliary inverse samples at "
                   f"{r['speedup']:.2f}× the exact inverse's speed — "
                   + ("nothing worth its approximation error." if r["speedup"] < 1.5 else "a modest saving.")
                   + " flow-fold removes the ActNorm and invertible-linear log-det work from every forward call.")
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
