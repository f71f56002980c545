"""Does integer attention pay on ONNX Runtime's CPU provider? One attention layer, three ways.

Run: ``.venv/bin/python bench/attention_kernels.py`` (``make bench``; ~1 min). Writes
bench/results/attention_kernels.md.

Rows, for MiniLM's attention shape (12 heads of 32) at batch 4 × 512 and 8 × 128, one layer:

* fused float: the opset-23 ``Attention`` op, 3-d inputs (what surgeon writes for every
  ``scaled_dot_product_attention``);
* decomposed float: MatMul → Softmax → MatMul on [b, h, t, d] (what files without the fused op run);
* integer (the SageAttention recipe in standard ONNX): Q, K, V quantized to uint8 at run time
  (``DynamicQuantizeLinear``, per tensor), Q·Kᵀ and P·V as ``MatMulInteger`` (ORT fuses them with the
  scale into ``MatMulIntegerToFloat``), P quantized with the static scale 1/255. Per-head scales would
  keep the products in float: ORT's integer kernels take one scale for the left operand.

Every graph is opened like surgeon's files (FTZ/DAZ, intra-op spinning off) with 1 and 2 threads;
times are medians of round-robin runs, so machine load hits the rows alike.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto as T
from onnx import helper as h

ROOT = Path(__file__).resolve().parents[1]
HEADS, HEAD = 12, 32


def _const(name: str, value: Any) -> Any:
    return h.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(np.asarray(value), name))


def _graph(kind: str, b: int, t: int) -> bytes:
    scale = HEAD ** -0.5
    if kind == "fused float":
        ins = [h.make_tensor_value_info(n, T.FLOAT, [b, t, HEADS * HEAD]) for n in "qkv"]
        nodes = [h.make_node("Attention", ["q", "k", "v"], ["y"], q_num_heads=HEADS, kv_num_heads=HEADS, scale=scale)]
    else:
        ins = [h.make_tensor_value_info(n, T.FLOAT, [b, HEADS, t, HEAD]) for n in "qkv"]
        nodes = [_const("c", np.float32(scale)), h.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2])]
        if kind == "decomposed float":
            nodes += [h.make_node("MatMul", ["q", "kt"], ["s0"]), h.make_node("Mul", ["s0", "c"], ["s"]),
                      h.make_node("Softmax", ["s"], ["p"], axis=-1), h.make_node("MatMul", ["p", "v"], ["y"])]
        else:
            nodes += [h.make_node("DynamicQuantizeLinear", [x], [x + "8", x + "s", x + "z"]) for x in ("q", "kt", "v")]
            nodes += [h.make_node("MatMulInteger", ["q8", "kt8", "qz", "ktz"], ["a"]),
                      h.make_node("Cast", ["a"], ["af"], to=T.FLOAT),
                      h.make_node("Mul", ["qs", "kts"], ["qk"]), h.make_node("Mul", ["qk", "c"], ["qkc"]),
                      h.make_node("Mul", ["af", "qkc"], ["s"]), h.make_node("Softmax", ["s"], ["p"], axis=-1),
                      _const("ps", np.float32(1 / 255)), _const("pz", np.uint8(0)),
                      h.make_node("QuantizeLinear", ["p", "ps", "pz"], ["p8"]),
                      h.make_node("MatMulInteger", ["p8", "v8", "pz", "vz"], ["a2"]),
                      h.make_node("Cast", ["a2"], ["a2f"], to=T.FLOAT),
                      h.make_node("Mul", ["ps", "vs"], ["pv"]), h.make_node("Mul", ["a2f", "pv"], ["y"])]
    g = h.make_graph(nodes, kind, ins, [h.make_tensor_value_info("y", T.FLOAT, None)])
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 23)])
    m.ir_version = 11
    return m.SerializeToString()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--out", default=str(ROOT / "bench/results/attention_kernels.md"))
    args = ap.parse_args(argv)
    import tempfile

    import onnxruntime

    from surgeon.speed import cpu, side_by_side
    from surgeon.targets.onnx import session

    info = cpu()
    kinds = ("fused float", "decomposed float", "integer")
    lines = ["| shape | threads | " + " | ".join(f"{k} ms" for k in kinds) + " | integer × fused | max rel err integer |",
             "|---|---:|" + "---:|" * (len(kinds) + 2)]
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        for b, t in ((4, 512), (8, 128)):
            x4 = {n: rng.standard_normal((b, HEADS, t, HEAD)).astype(np.float32) for n in "qkv"}
            x3 = {n: v.transpose(0, 2, 1, 3).reshape(b, t, HEADS * HEAD) for n, v in x4.items()}
            paths = {}
            for k in kinds:
                paths[k] = Path(tmp) / f"{k.replace(' ', '_')}_{b}_{t}.onnx"
                paths[k].write_bytes(_graph(k, b, t))
            for threads in (1, 2):
                sessions = {k: session(p, threads=threads, spinning=False) for k, p in paths.items()}
                feeds = {k: x3 if k == "fused float" else x4 for k in kinds}
                outs = {k: s.run(None, feeds[k])[0] for k, s in sessions.items()}
                ref = outs["fused float"].reshape(b, t, HEADS, HEAD).transpose(0, 2, 1, 3)
                err = float(np.abs(outs["integer"] - ref).max() / np.abs(ref).max())
                timed = side_by_side({k: (lambda s=s, f=feeds[k]: s.run(None, f)) for k, s in sessions.items()},
                                     runs=args.runs)
                ms = {k: timed[k]["median_ms"] for k in kinds}
                lines.append(f"| {b} × {t} | {threads} | " + " | ".join(f"{ms[k]:.1f}" for k in kinds)
                             + f" | {ms['integer'] / ms['fused float']:.2f} | {err:.3f} |")
    lines += ["", f"One attention layer, {HEADS} heads × {HEAD}, random N(0, 1) Q, K, V (the error column is "
              "quantization error on such inputs, not on a model). ONNX Runtime "
              f"{onnxruntime.__version__} CPU provider, median of {args.runs} round-robin runs.",
              f"CPU: {info['model']} ({info['class']}), {info['cores']} cores, flags {' '.join(info['flags'])}.", "",
              "Command: `.venv/bin/python bench/attention_kernels.py`."]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("# Attention kernels on ONNX Runtime CPU: fused float vs integer\n\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
