"""What INT8 buys on this CPU: one MiniLM-sized linear layer in ONNX Runtime, fp32 against INT8.

Run: ``.venv/bin/python bench/int8_gemm.py`` (``make bench``; about a minute).

The onnx-int8 target of the ONNX issue asks for ≤ 0.55× the fp32 model's latency. Before blaming
the graph around the matrix products, this measures the products alone: for each of MiniLM's four
linear shapes at batch 8 × 128 tokens (M = 1024 rows), one-node models

* fp32: ``MatMul(x, W) + b``;
* int8 static (what surgeon's onnx-int8 writes): ``Q(x; u8) → DQ → MatMul ← DQ(W_s8)`` then ``+ b``,
  which ORT fuses into ``MatMulIntegerToFloat`` (u8·s8 MLAS kernel);
* int8 dynamic (what ORT's ``quantize_dynamic`` writes): ``DynamicQuantizeMatMul``, made by
  ``quantize_dynamic`` from the fp32 file;

timed round robin in one process (ORT CPU provider, 2 intra-op threads, median of ``--runs``).
The MiniLM-weighted ratio weights each shape by how often the encoder runs it (per layer: 4 × 384→384,
1 × 384→1536, 1 × 1536→384). Writes bench/results/int8_gemm.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
THREADS = 2
BATCH, SEQ = 8, 128  # M = 1024 rows
# Inputs as the model's: 3-d with dynamic batch and sequence. With static shapes ORT first fuses
# MatMul + Add into a float Gemm, and the Q/DQ pair in front of it is never turned into an integer kernel.
M = BATCH * SEQ
SHAPES = {(384, 384): 4, (384, 1536): 1, (1536, 384): 1}  # (K, N): uses per encoder layer


def _model(nodes: list, inits: list, k: int, n: int) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "sequence", n])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    m.ir_version = 10
    return m


def _fp32(w: np.ndarray, b: np.ndarray) -> onnx.ModelProto:
    k, n = w.shape
    return _model([helper.make_node("MatMul", ["x", "W"], ["t"]), helper.make_node("Add", ["t", "b"], ["y"])],
                  [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b")], k, n)


def _int8_static(w: np.ndarray, b: np.ndarray, x_amax: float) -> onnx.ModelProto:
    k, n = w.shape
    sw = (np.abs(w).max(0) / 63.0).astype(np.float32)  # 7-bit weights, per output channel
    wq = np.clip(np.round(w / sw), -63, 63).astype(np.int8)
    inits = [numpy_helper.from_array(wq, "Wq"), numpy_helper.from_array(sw, "sw"),
             numpy_helper.from_array(np.zeros(n, np.int8), "zw"), numpy_helper.from_array(b, "b"),
             numpy_helper.from_array(np.array(2 * x_amax / 255, np.float32), "sx"),
             numpy_helper.from_array(np.array(128, np.uint8), "zx")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["Wq", "sw", "zw"], ["Wd"], axis=1),
             helper.make_node("MatMul", ["xd", "Wd"], ["t"]), helper.make_node("Add", ["t", "b"], ["y"])]
    return _model(nodes, inits, k, n)


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # Sessions are timed round robin: a finished session's intra-op threads would otherwise keep
    # spinning and take the cores from the next one (wall times were 2-3× the kernel times).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _kernel_ms(path: Path, x: np.ndarray, runs: int = 20, warmup: int = 5) -> float:
    """Mean per-run sum of ORT's node kernel times (its profiler) over the runs after warm-up: the
    kernels alone, without the session's dispatch and the machine's scheduling noise."""
    import json

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    # Sessions are timed round robin: a finished session's intra-op threads would otherwise keep
    # spinning and take the cores from the next one (wall times were 2-3× the kernel times).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.enable_profiling = True
    so.profile_file_prefix = str(path.with_suffix(""))
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(warmup + runs):
        s.run(None, {"x": x})
    events = json.loads(Path(s.end_profiling()).read_text())
    timed = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])[warmup:]
    t0 = timed[0]["ts"]
    us = sum(e["dur"] for e in events
             if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= t0)
    return us / len(timed) / 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--out", default=str(ROOT / "bench/results/int8_gemm.md"))
    args = ap.parse_args(argv)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="surgeon-gemm-"))
    rows = []
    for (k, n), uses in SHAPES.items():
        w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
        b = (rng.standard_normal(n) * 0.1).astype(np.float32)
        x = rng.standard_normal((BATCH, SEQ, k)).astype(np.float32)
        files = {"fp32": tmp / f"fp32_{k}_{n}.onnx", "int8 static (surgeon layout)": tmp / f"s8_{k}_{n}.onnx",
                 "int8 dynamic (ORT quantize_dynamic)": tmp / f"dyn_{k}_{n}.onnx"}
        onnx.save(_fp32(w, b), files["fp32"])
        onnx.save(_int8_static(w, b, float(np.abs(x).max())), files["int8 static (surgeon layout)"])
        quantize_dynamic(str(files["fp32"]), str(files["int8 dynamic (ORT quantize_dynamic)"]),
                         per_channel=True, weight_type=QuantType.QInt8)
        sess = {name: _session(p) for name, p in files.items()}
        times: dict[str, list[float]] = {name: [] for name in files}
        for s in sess.values():
            for _ in range(5):
                s.run(None, {"x": x})
        for _ in range(args.runs):
            for name, s in sess.items():
                t = time.perf_counter()
                s.run(None, {"x": x})
                times[name].append(time.perf_counter() - t)
        med = {name: float(np.median(t)) * 1e3 for name, t in times.items()}
        kern = {name: _kernel_ms(p, x) for name, p in files.items()}
        rows.append({"shape": (k, n), "uses": uses, "ms": med, "kernel": kern})

    names = list(rows[0]["ms"])
    lines = ["| K → N (M = 1024) | uses / layer | " + " | ".join(f"{n} ms" for n in names)
             + " | static / fp32 | dynamic / fp32 |", "|---|---:|" + "---:|" * (len(names) + 2)]
    for r in rows:
        ms = r["ms"]
        lines.append(f"| {r['shape'][0]} → {r['shape'][1]} | {r['uses']} | "
                     + " | ".join(f"{ms[n]:.2f}" for n in names)
                     + f" | {ms[names[1]] / ms[names[0]]:.2f} | {ms[names[2]] / ms[names[0]]:.2f} |")
    total = {n: sum(r["ms"][n] * r["uses"] for r in rows) for n in names}
    lines.append("| **per encoder layer** | | " + " | ".join(f"**{total[n]:.2f}**" for n in names)
                 + f" | **{total[names[1]] / total[names[0]]:.2f}** | **{total[names[2]] / total[names[0]]:.2f}** |")
    lines += ["", "Kernel time alone (ORT profiler, sum of node kernel times per run, mean of 20 runs):", "",
              "| K → N | " + " | ".join(f"{n} ms" for n in names) + " | static / fp32 | dynamic / fp32 |",
              "|---|" + "---:|" * (len(names) + 2)]
    for r in rows:
        kn = r["kernel"]
        lines.append(f"| {r['shape'][0]} → {r['shape'][1]} | " + " | ".join(f"{kn[n]:.2f}" for n in names)
                     + f" | {kn[names[1]] / kn[names[0]]:.2f} | {kn[names[2]] / kn[names[0]]:.2f} |")
    ktotal = {n: sum(r["kernel"][n] * r["uses"] for r in rows) for n in names}
    lines.append("| **per encoder layer** | " + " | ".join(f"**{ktotal[n]:.2f}**" for n in names)
                 + f" | **{ktotal[names[1]] / ktotal[names[0]]:.2f}** | **{ktotal[names[2]] / ktotal[names[0]]:.2f}** |")
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    import onnxruntime

    text = "\n".join(lines) + (
        f"\n\nORT {onnxruntime.__version__} CPU provider, {THREADS} threads, median of {args.runs} round-robin runs; "
        f"{platform.machine()}, {os.cpu_count()} cores, load average {load:.1f} at the end.\n\n"
        "Command: `.venv/bin/python bench/int8_gemm.py` (also run by `make bench`).\n")
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# One linear layer: fp32 against INT8 in ONNX Runtime\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
