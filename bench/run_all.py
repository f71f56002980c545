"""``make bench``: every benchmark of docs/benchmarks.md, one after the other, each in its own process.

Each script writes its own table under ``bench/results/`` (the ones that only print get their output
saved as ``bench/results/<name>.txt``). A failing benchmark does not stop the others; the exit code is
non-zero if any failed. Wall times and the machine's load average are printed at the end: figures taken
on a busy machine are not comparable with quiet ones.

    python bench/run_all.py                 # all (about an hour on 2 cores)
    python bench/run_all.py analyze_bert flows   # a selection
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"

# name → (arguments, whether the script writes its own results file)
BENCHMARKS: dict[str, tuple[list[str], bool]] = {
    "analyze_bert": ([], False),          # issue 2: analyze a 12×768 BERT
    "optimize_minilm": ([], False),       # issue 3: optimize MiniLM, memory 8 vs 128 batches, p_bits=1
    "digits_vit": (["--seeds", "0", "1", "2"], False),  # issues 3, 16: attention-fp8 / -int8 top-1 drop, digits ViT
    "onnx_minilm": ([], True),            # issue 4: ORT latency/size/cosine, surgeon vs ORT's quantizers
    "int8_gemm": ([], True),              # issue 4: one linear layer, fp32 vs INT8 kernels in ORT (the floor)
    "attention_kernels": ([], True),      # issue 16: one attention layer, fused float vs integer kernels in ORT
    "norm_gate": ([], True),              # issue 5: norm-fold exactness, norm-gate kept sites, ORT latency
    "flows": ([], True),                  # issue 6: RealNVP / MAF, exact vs distilled inverse
    "fuzz": (["--examples", "200"], True),  # issue 7: the whole pipeline on 200 random models
    "distributed": ([], True),            # issue 8: calibration wall time, 1 vs 2 processes
    "decoder_kv": ([], True),             # issue 17: onnx-decoder files, fp32 vs INT8 vs FP8 KV cache
    "heldout_minilm": ([], True),         # issue 25: the demo's model.onnx on sentences neither calibration nor check saw
    "guard_scale": ([], True),            # issue 27: the module guard at BERT-base vs BERT-large size
    "llm": ([], True),                    # issue 27: SmolLM2-135M, surgeon vs onnxruntime-genai vs llama.cpp (skips what is absent)
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help=f"benchmarks to run (default: all): {', '.join(BENCHMARKS)}")
    args = ap.parse_args(argv)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        print(f"run_all: unknown benchmark(s) {', '.join(unknown)} (known: {', '.join(BENCHMARKS)})", file=sys.stderr)
        return 2
    RESULTS.mkdir(exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    summary = []
    for name in args.names or list(BENCHMARKS):
        extra, writes_own = BENCHMARKS[name]
        script = BENCH / f"{name}.py"
        if not script.exists():
            summary.append((name, "missing", 0.0))
            continue
        print(f"== {name}: {sys.executable} {script.relative_to(BENCH.parent)} {' '.join(extra)}", flush=True)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(script), *extra], env=env, cwd=BENCH.parent,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        took = time.perf_counter() - start
        print(proc.stdout, flush=True)
        if not writes_own:
            # Atomic: a killed run never leaves half a results file.
            tmp = RESULTS / f".{name}.txt.tmp"
            tmp.write_text(f"$ python bench/{name}.py {' '.join(extra)}\n\n{proc.stdout}", encoding="utf-8")
            tmp.replace(RESULTS / f"{name}.txt")
        summary.append((name, "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})", took))
    load = os.getloadavg()
    print(f"\n{'benchmark':<18} {'status':<20} wall s")
    for name, status, took in summary:
        print(f"{name:<18} {status:<20} {took:8.1f}")
    print(f"load average at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} ({os.cpu_count()} cores)")
    return 0 if all(s == "ok" for _, s, _ in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
