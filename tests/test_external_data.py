"""ONNX files past the external-data threshold (protobuf's 2 GB limit): ``model.onnx`` with its weights
in ``model.onnx.data`` beside it. The threshold is patched to 0 so tiny models take the path a
TinyLlama-sized one takes.

* ``write_onnx`` (every ONNX target): the pair loads in onnxruntime in a fresh process where surgeon is
  not imported, with the outputs of the one-file version; ``bytes`` counts both files; a failure midway
  leaves nothing (no pair, no temporary directory) and an earlier pair intact.
* ``optimize --target onnx-decoder``: the staged pair is what OUTDIR holds (and the speed step's
  fp32-cache baseline is a pair too), report.json's ``bytes`` count both files, ``surgeon bench``
  times the pair again, and the file runs without surgeon.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _decoder_models import save_lm
from torch import nn

import surgeon.targets._external_data as external
from surgeon.errors import SurgeonError
from surgeon.targets.onnx import write_onnx

# run by a fresh interpreter: onnxruntime alone, and proof that surgeon was never imported
_RUN_WITHOUT_SURGEON = """
import sys, numpy as np, onnxruntime as ort
path, inputs, out = sys.argv[1:4]
sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
feeds = dict(np.load(inputs))
np.save(out, sess.run(None, feeds)[0])
assert not any(m.split(".")[0] == "surgeon" for m in sys.modules), "surgeon was imported"
"""


def _run_fresh(path: Path, feeds: dict[str, np.ndarray], tmp: Path) -> np.ndarray:
    np.savez(tmp / "feeds.npz", **feeds)
    subprocess.run([sys.executable, "-c", _RUN_WITHOUT_SURGEON, str(path), str(tmp / "feeds.npz"), str(tmp / "out.npy")],
                   check=True, cwd=tmp, capture_output=True)
    return np.load(tmp / "out.npy")


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(64, 128), nn.Linear(128, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@pytest.fixture()
def mlp() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return _Mlp().eval(), (torch.randn(2, 64),)


def test_write_onnx_pair_loads_without_surgeon_and_equals_one_file(mlp, tmp_path, monkeypatch) -> None:
    module, inputs = mlp
    single = write_onnx(module, inputs, tmp_path / "single")
    assert sorted(p.name for p in (tmp_path / "single").iterdir()) == ["model.onnx"]
    monkeypatch.setattr(external, "EXTERNAL_DATA_THRESHOLD", 0)
    pair = write_onnx(module, inputs, tmp_path / "pair")
    files = {p.name: p.stat().st_size for p in (tmp_path / "pair").iterdir()}
    assert sorted(files) == ["model.onnx", "model.onnx.data"]  # no temporary directory left
    assert files["model.onnx.data"] > 64 * 128 * 4  # the weights moved out of the graph
    assert pair["bytes"] == files["model.onnx"] + files["model.onnx.data"]
    assert abs(pair["bytes"] - single["bytes"]) < 0.2 * single["bytes"]  # the same weights, laid out apart
    assert pair["max_abs_diff"] <= 1e-5
    feeds = {"x": inputs[0].numpy()}
    (tmp_path / "run").mkdir()
    one = _run_fresh(tmp_path / "single" / "model.onnx", feeds, tmp_path / "run")
    two = _run_fresh(tmp_path / "pair" / "model.onnx", feeds, tmp_path / "run")
    np.testing.assert_array_equal(one, two)


def test_a_failure_midway_leaves_nothing_and_keeps_the_earlier_pair(mlp, tmp_path, monkeypatch) -> None:
    import surgeon.targets.onnx as onnx_target

    module, inputs = mlp
    monkeypatch.setattr(external, "EXTERNAL_DATA_THRESHOLD", 0)
    fresh, kept = tmp_path / "fresh", tmp_path / "kept"
    write_onnx(module, inputs, kept)
    before = {p.name: p.read_bytes() for p in kept.iterdir()}

    def fail(*args, **kwargs):
        raise SurgeonError("verification failed (injected)")

    monkeypatch.setattr(onnx_target, "verify_onnx", fail)
    torch.manual_seed(1)
    other = _Mlp().eval()  # different weights: a partial write would show
    for out in (fresh, kept):
        with pytest.raises(SurgeonError, match="injected"):
            write_onnx(other, inputs, out)
    assert list(fresh.iterdir()) == []
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == before


def test_one_file_replaces_a_pair_and_drops_its_data(mlp, tmp_path, monkeypatch) -> None:
    module, inputs = mlp
    monkeypatch.setattr(external, "EXTERNAL_DATA_THRESHOLD", 0)
    write_onnx(module, inputs, tmp_path)
    monkeypatch.setattr(external, "EXTERNAL_DATA_THRESHOLD", 1 << 40)
    figures = write_onnx(module, inputs, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]
    assert figures["bytes"] == (tmp_path / "model.onnx").stat().st_size


def test_decoder_outdir_with_external_data(tmp_path, monkeypatch, capsys) -> None:
    from surgeon import cli

    monkeypatch.setattr(external, "EXTERNAL_DATA_THRESHOLD", 0)
    lm = save_lm("llama", tmp_path / "lm")
    out = tmp_path / "out"
    assert cli.main(["optimize", str(lm), "-o", str(out), "--target", "onnx-decoder",
                     "--passes", "kv-cache-quant{dtype=int8}", "--tolerance", "ppl_increase=1"]) == 0
    size = {p.name: p.stat().st_size for p in out.iterdir() if p.is_file()}
    assert "model.onnx.data" in size and not [n for n in size if "tmp" in n or "partial" in n]
    report = json.loads((out / "report.json").read_text())
    both = size["model.onnx"] + size["model.onnx.data"]
    assert report["targets"]["onnx-decoder"]["bytes"] == both
    assert report["targets"]["onnx-decoder"]["cache_elem_type"] == "int8"
    speed = report["speed"]
    assert speed["bytes"]["optimized"] == both
    original = out / speed["files"]["original"]
    assert original.with_name(original.name + ".data").is_file()
    assert speed["bytes"]["original"] == original.stat().st_size + original.with_name(original.name + ".data").stat().st_size
    capsys.readouterr()
    assert cli.main(["bench", str(out), "--runs", "3"]) == 0
    ids = np.array([[5, 6, 7]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(3)[None]}
    heads, dim = 2, 8  # the tiny llama's kv heads and head size
    for i in range(2):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((1, heads, 0, dim), dtype=np.int8)
    (tmp_path / "run").mkdir()
    logits = _run_fresh(out / "model.onnx", feeds, tmp_path / "run")
    assert logits.shape[:2] == (1, 3) and np.isfinite(logits).all()
