""".pt2 files whose pytree specs name library classes (transformers' ModelOutput family) load
without unpickling anything; an unknown class is one line naming it (surgeon/loaders/pt2.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import surgeon
from surgeon.errors import SurgeonError

transformers = pytest.importorskip("transformers")


def _hf_models() -> dict[str, tuple[torch.nn.Module, dict]]:
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32)).eval()
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32, use_cache=False)).eval()
    vit = transformers.ViTModel(transformers.ViTConfig(
        image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64)).eval()
    ids = {"input_ids": torch.randint(0, 64, (2, 8))}
    return {"bert": (bert, ids), "gpt2": (gpt2, ids), "vit": (vit, {"pixel_values": torch.randn(2, 3, 16, 16)})}


@pytest.fixture(scope="module")
def hf_pt2(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hfpt2")
    paths = {}
    for name, (model, inputs) in _hf_models().items():
        ep = torch.export.export(model, (), inputs, strict=False)  # what a user writes, output class and all
        assert "transformers" in str(ep.call_spec.out_spec.type)
        torch.export.save(ep, str(root / f"{name}.pt2"))
        paths[name] = root / f"{name}.pt2"
    return paths


def test_hf_pt2_analyze_and_optimize_in_a_fresh_process(hf_pt2: dict[str, Path], tmp_path: Path) -> None:
    # a fresh interpreter: nothing has imported transformers.modeling_outputs (this test process has)
    script = textwrap.dedent(f"""
        import sys
        from surgeon.cli import main
        paths = {[str(p) for p in hf_pt2.values()]!r}
        assert "transformers.modeling_outputs" not in sys.modules
        for p in paths:
            assert main(["analyze", p, "--json"]) == 0, p
        sys.exit(main(["optimize", paths[0], "-o", {str(tmp_path / 'out')!r}, "--target", "torch", "--no-speed"]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-1500:]
    decoder, text, reports = json.JSONDecoder(), proc.stdout, []
    for start in [m.start() for m in re.finditer(r"(?m)^\{$", text)]:
        reports.append(decoder.raw_decode(text, start)[0])
    assert [r["counts"]["attention"] for r in reports] == [1, 1, 1], proc.stdout[-500:]
    assert (tmp_path / "out" / "model.pt2").exists()


def _rename_output_class(src: Path, dst: Path, new: str) -> None:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            if item.filename.endswith("models/model.json"):
                data = re.sub(rb"transformers\.modeling_outputs\.[A-Za-z]+", new.encode(), data)
            zout.writestr(item, data)


@pytest.mark.parametrize("cls, message", [
    ("mylib.outputs.Out", "names the class mylib.outputs.Out in its pytree spec, which surgeon does not import "
                          "(it imports only transformers, diffusers's own output classes); export the model with "
                          "tuple or dict outputs"),
    ("diffusers.utils.Out", "names the class diffusers.utils.Out in its pytree spec: install diffusers to load it "
                            "(pip install diffusers)"),
])
def test_pt2_naming_an_unknown_class_is_one_line(hf_pt2: dict[str, Path], tmp_path: Path, cls: str,
                                                 message: str) -> None:
    if cls.startswith("diffusers") and __import__("importlib.util").util.find_spec("diffusers"):
        pytest.skip("diffusers is installed")
    bad = tmp_path / "odd.pt2"
    _rename_output_class(hf_pt2["bert"], bad, cls)
    with pytest.raises(SurgeonError, match="^" + re.escape(f".pt2 file '{bad}' {message}") + "$"):
        surgeon.load(bad)
    assert cls.split(".")[0] not in sys.modules
