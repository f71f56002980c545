"""Kernel probe for the ``openvino-int8`` profile's rung speeds (issue 28): one linear of MiniLM's shapes
on each rung of the ladder, lowered the way the target lowers it, timed in OpenVINO's CPU plugin.

Run: ``.venv/bin/python bench/openvino_rungs.py [--runs 30] [--threads 2]``. For each shape (384→1536,
the FFN up-projection, and 1536→384, the down-projection, at 8×128 and 4×512 tokens) a ``QuantLinear``
on ``int8-static`` (a calibrated per-tensor activation scale: FakeQuantize → int8 FullyConnected),
``int8-weight`` (weight-only int8: the weight-compressed FullyConnected) and the float layer (``keep``)
is exported with the target's exporter (ONNX opset 21), read by ``openvino.convert_model`` and
compiled with this CPU's deploy config, 2 threads, one stream. All files are timed round robin in one
process (median of ``--runs``), and the runtime model's execution precision of each FullyConnected is
printed beside it, so the figures are of the kernels the file really runs. ``speed`` is the static
rung's time over the rung's (the profile's ``speed`` entry: relative to the fastest rung, 1.0).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from surgeon.passes._quant_layers import INT8_WEIGHT, QuantLinear
from surgeon.quant import Quantizer
from surgeon.targets._openvino_runtime import compile_file, deploy_config, runtime_layers
from surgeon.targets.onnx import export_onnx
from surgeon.targets.openvino_int8 import save_ir

RUNGS = ("int8-static", INT8_WEIGHT, "keep")
SHAPES = ((384, 1536), (1536, 384))
TOKENS = ((8, 128), (4, 512))


class _One(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _layer(k: int, n: int, rung: str, x: torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    w, b = torch.randn(n, k) / k ** 0.5, torch.randn(n) * 0.01
    q = QuantLinear("linear", w, b, dtype="int8", reduce_range=False, rungs=("int8-static", INT8_WEIGHT))
    q.act = Quantizer.from_scale(x.abs().amax() / 127.0, dtype="int8")
    q.rung = rung if rung != "keep" else q.rung
    q.active = rung != "keep"
    return q


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="write the figures here too")
    args = ap.parse_args(argv)
    config = deploy_config()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for k, n in SHAPES:
            for batch, length in TOKENS:
                x = torch.randn(batch, length, k)
                for rung in RUNGS:
                    name = f"{k}x{n}-{batch}x{length}-{rung}"
                    onnx_path = Path(tmp) / f"{name}.onnx"
                    export_onnx(_One(_layer(k, n, rung, x)).eval(), (x,), onnx_path, opset=21)
                    save_ir(onnx_path, Path(tmp) / f"{name}.xml", config)
                    compiled = compile_file(Path(tmp) / f"{name}.xml", config=config, threads=args.threads)
                    fc = [r for r in runtime_layers(compiled) if r["type"] == "FullyConnected"]
                    request = compiled.create_infer_request()
                    feed = {compiled.inputs[0].get_any_name(): x.numpy()}
                    for _ in range(3):
                        request.infer(feed)
                    row = {"shape": f"{k}->{n}", "tokens": f"{batch}x{length}", "rung": rung, "fc": fc, "ms": []}
                    rows.append(row)
                    runs.append((row, request, feed))
        for i in range(args.runs):  # round robin, the order rotating: load hits every file alike
            for row, request, feed in runs[i % len(runs):] + runs[:i % len(runs)]:
                t0 = time.perf_counter()
                request.infer(feed)
                row["ms"].append((time.perf_counter() - t0) * 1e3)
    static = {(r["shape"], r["tokens"]): statistics.median(r["ms"]) for r in rows if r["rung"] == "int8-static"}
    print(f"OpenVINO CPU, {args.threads} threads, {config}, median of {args.runs}")
    print(f"{'shape':>10} {'tokens':>7} {'rung':>12} {'ms':>8} {'speed':>6}  FullyConnected (precision, input types)")
    for r in rows:
        r["median_ms"] = statistics.median(r.pop("ms"))
        r["speed"] = static[(r["shape"], r["tokens"])] / r["median_ms"]
        fc = "; ".join(f"{f['precision']} {','.join(f['inputs'])}" for f in r["fc"])
        print(f"{r['shape']:>10} {r['tokens']:>7} {r['rung']:>12} {r['median_ms']:8.3f} {r['speed']:6.2f}  {fc}")
    if args.json:
        args.json.write_text(json.dumps({"config": config, "threads": args.threads, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
