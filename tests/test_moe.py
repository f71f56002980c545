"""Mixtral-style MoE (transformers 5, from a config): ``optimize --target onnx-int8`` writes a file that
runs in onnxruntime at other batch sizes and sequence lengths. transformers dispatches the experts
through its ``grouped_mm_fallback`` op, lowered by targets/_lowering.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import surgeon

transformers = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")


def test_mixtral_moe_onnx_int8_runs_in_ort_at_other_shapes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64, use_cache=False)
    model = transformers.MixtralModel(cfg).eval()
    ex = {"input_ids": torch.randint(0, 64, (2, 8))}
    calib = [{"input_ids": torch.randint(0, 64, (2, 8))} for _ in range(2)]
    res = surgeon.optimize(model, ex, calib, target="onnx-int8")
    # the target file Result.save writes (targets.write_target), without the model.pt2 beside it (CI time:
    # its re-decomposition is tested in test_pt2_portable.py)
    from surgeon import targets  # type: ignore[attr-defined]

    targets.write_target("onnx-int8", res, tmp_path / "out")
    report = res.report
    assert report["targets"]["onnx-int8"]["quantized"]["int8"] > 0
    experts = [s for s in report["sites"] if s["status"] == "skipped" and "stacked expert matrices" in s["reason"]]
    assert {s["module"] for s in experts} == {"layers.0.mlp.experts"} and len(experts) == 2  # gate_up, down
    sess = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch, seq in [(3, 11), (1, 5)]:  # neither is the export's 2 x 8
        ids = torch.randint(0, 64, (batch, seq))
        got = sess.run(None, {"input_ids": ids.numpy()})[0].reshape(batch, -1).astype(np.float64)
        with torch.no_grad():
            want = res.module(input_ids=ids)
        want = (want["last_hidden_state"] if isinstance(want, dict) else want[0]).reshape(batch, -1).double().numpy()
        cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
        assert cos.min() >= 0.999, (batch, seq, cos)
