"""ORT's CPU kernels for the weight formats linear-quant writes (docs/passes/linear-quant.md, "Speed"):
8 chained layers 576x1536 / 1536x576 (SmolLM2's MLP) written by hand as fp32 MatMul, DequantizeLinear
(uint4, block 32 / 128) -> MatMul and DequantizeLinear (int8, per column) -> MatMul, timed at 1 and 128
tokens, 2 threads, accuracy level 0 and 4, interleaved rounds. A probe of the runtime behind the
profile's relative speeds (random weights: the kernels' speed does not depend on the values), not a
measurement of a file surgeon wrote.

    .venv/bin/python bench/int4_kernels.py
"""

import os
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

WORK = tempfile.mkdtemp(prefix="surgeon-int4-kernels-")
rng = np.random.default_rng(0)
L = 8
D, F = 576, 1536


def build(kind):
    nodes = []
    inits = []
    cur = "x"
    for i in range(L):
        K, N = (D, F) if i % 2 == 0 else (F, D)
        if kind == "fp32":
            inits.append(nh.from_array((rng.standard_normal((K, N)) * 0.03).astype(np.float32), f"w{i}"))
        elif kind.startswith("int4"):
            B = int(kind.split("b")[1])
            inits += [
                h.make_tensor(f"q{i}", T.UINT4, [K, N], rng.integers(0, 16, K * N).tolist()),
                nh.from_array((rng.random((-(-K // B), N)) * 0.01).astype(np.float32), f"s{i}"),
                h.make_tensor(f"z{i}", T.UINT4, [-(-K // B), N], [8] * (-(-K // B) * N)),
            ]
            nodes.append(h.make_node("DequantizeLinear", [f"q{i}", f"s{i}", f"z{i}"], [f"w{i}"], axis=0, block_size=B))
        else:
            inits += [
                nh.from_array(rng.integers(-127, 128, (K, N)).astype(np.int8), f"q{i}"),
                nh.from_array((rng.random(N) * 0.001).astype(np.float32), f"s{i}"),
                nh.from_array(np.zeros(N, np.int8), f"z{i}"),
            ]
            nodes.append(h.make_node("DequantizeLinear", [f"q{i}", f"s{i}", f"z{i}"], [f"w{i}"], axis=1))
        nodes.append(h.make_node("MatMul", [cur, f"w{i}"], [f"y{i}"]))
        cur = f"y{i}"
    g = h.make_graph(
        nodes, "g", [h.make_tensor_value_info("x", T.FLOAT, [1, None, D])], [h.make_tensor_value_info(cur, T.FLOAT, [1, None, D])], inits
    )
    p = os.path.join(WORK, f"stack_{kind}.onnx")
    onnx.save(h.make_model(g, opset_imports=[h.make_opsetid("", 23)], ir_version=11), p)
    return p


sess = {}
for kind in ["fp32", "int4b32", "int4b128", "int8w"]:
    p = build(kind)
    for lvl in ["-"] if kind == "fp32" else ["0", "4"]:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 2
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        if lvl != "-":
            so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", lvl)
        sess[(kind, lvl)] = (ort.InferenceSession(p, so, providers=["CPUExecutionProvider"]), os.path.getsize(p))
res = {k: {1: [], 128: []} for k in sess}
for _round in range(5):  # interleaved
    for T_ in (1, 128):
        x = rng.standard_normal((1, T_, D)).astype(np.float32)
        for k, (s, _) in sess.items():
            n = 200 if T_ == 1 else 20
            s.run(None, {"x": x})
            t = time.perf_counter()
            for _ in range(n):
                s.run(None, {"x": x})
            res[k][T_].append((time.perf_counter() - t) / n * 1e3)
for k, (_s, sz) in sess.items():
    one, many = res[k][1], res[k][128]
    print(f"{k[0]:9s} acc={k[1]}  {sz / 1e6:6.2f} MB  1 token: {np.median(one):.3f} ms (min {min(one):.3f})  "
          f"128 tokens: {np.median(many):.2f} ms (min {min(many):.2f})")
so = ort.SessionOptions()
so.optimized_model_filepath = os.path.join(WORK, "b128.opt.onnx")
ort.InferenceSession(os.path.join(WORK, "stack_int4b128.onnx"), so, providers=["CPUExecutionProvider"])
print("int4b128 optimized:", sorted({n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node}))
