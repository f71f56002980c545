"""The ``openvino-int8`` target (issue 28): OpenVINO IR with static INT8 linears, verified in OpenVINO.

* the file matches torch within the guard's figures at a batch and length it was not verified at;
* OpenVINO's CPU plugin runs every quantized linear as an int8 FullyConnected (the runtime model's
  execution precisions), and the rest in the deploy config's precision;
* the deploy config (the inference precision hint) is what the file was verified with;
* OUTDIR/README.md's snippet runs with openvino, numpy and tokenizers only (no torch, no surgeon), and
  ``surgeon bench`` re-times the OUTDIR;
* without openvino: one line naming the extra, exit 2, before any work.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from _cli import run_cli
from _models import save_bert_dir

from surgeon import cli

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = "cosine_mean=0.99"


def _have_openvino() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


needs_openvino = pytest.mark.skipif(not _have_openvino(), reason="openvino is not installed (pip install 'surgeon[openvino]')")


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory, hf_tokenizer: Any) -> Path:
    """A Hugging Face directory: a random 2-layer BertModel (hidden 64) and a BERT tokenizer."""
    return save_bert_dir(tmp_path_factory.mktemp("ov") / "bert", hf_tokenizer, hidden=64, layers=2)


@pytest.fixture(scope="module")
def ov_out(bert_dir: Path) -> Path:
    """``surgeon optimize BERT --calib s.txt --target openvino-int8 -o out`` (the target's default passes)."""
    sentences = (ROOT / "surgeon" / "data" / "calib_sentences.txt").read_text().splitlines()[:32]
    (bert_dir.parent / "s.txt").write_text("\n".join(sentences) + "\n")
    out = bert_dir.parent / "out"
    assert cli.main(["optimize", str(bert_dir), "--calib", str(bert_dir.parent / "s.txt"), "--target",
                     "openvino-int8", "--tolerance", TOLERANCE, "-o", str(out)]) == 0
    return out


@needs_openvino
def test_outdir_holds_the_ir_its_deploy_config_and_the_verdict_measured_with_it(ov_out: Path) -> None:
    from surgeon.targets._openvino_runtime import precision_hint

    rep = json.loads((ov_out / "report.json").read_text())
    for name in ("model.xml", "model.bin", "openvino_config.json", "README.md", "model.pt2", "tokenizer.json"):
        assert (ov_out / name).is_file(), name
    config = json.loads((ov_out / "openvino_config.json").read_text())["compile_properties"]
    assert config == {"INFERENCE_PRECISION_HINT": precision_hint()}  # bf16 where the CPU has it, else f32
    fig = rep["targets"]["openvino-int8"]
    assert fig["compile_properties"] == config  # the file was verified with the hint it is served with
    measured = rep["end_to_end"]["measured_on"]
    assert measured["file"] == "model.xml" and measured["runtime"] == "openvino-cpu"
    assert measured["session_config"] == config  # and so was the verdict
    assert rep["verdict"]["status"] == "met"
    assert rep["passes"][0].startswith("linear-quant{dtype=int8")
    assert fig["graph_requirements_met"] and fig["openvino_cpu"]["int8_linears_in_module"] >= 12
    assert rep["speed"]["target"] == "openvino-int8" and rep["speed"]["bytes"]["optimized"] < rep["speed"]["bytes"]["original"]


@needs_openvino
def test_the_plugin_runs_every_quantized_linear_in_int8(ov_out: Path) -> None:
    from surgeon.targets._openvino_runtime import compile_file, runtime_layers

    rep = json.loads((ov_out / "report.json").read_text())
    expected = rep["targets"]["openvino-int8"]["openvino_cpu"]["int8_linears_in_module"]
    layers = runtime_layers(compile_file(ov_out / "model.xml"))
    fc = [row for row in layers if row["type"] == "FullyConnected"]
    assert len([r for r in fc if r["precision"] in ("u8", "i8")]) == expected == len(fc), fc
    # the original, converted the same way, runs them in the float precision of the deploy config
    plain = runtime_layers(compile_file(ov_out / "bench" / "original.xml"))
    hint = json.loads((ov_out / "openvino_config.json").read_text())["compile_properties"]["INFERENCE_PRECISION_HINT"]
    assert {r["precision"] for r in plain if r["type"] == "FullyConnected"} == {hint}


@needs_openvino
def test_the_file_matches_torch_at_another_batch_and_length(ov_out: Path, bert_dir: Path, hf_tokenizer: Any) -> None:
    from transformers import BertModel

    from surgeon import targets
    from surgeon.metrics import cosine_per_sample

    rep = json.loads((ov_out / "report.json").read_text())
    sentences = (ROOT / "bench" / "data" / "heldout_sentences.txt").read_text().splitlines()[:3]
    batch = dict(hf_tokenizer(sentences, padding="max_length", max_length=40, truncation=True, return_tensors="pt"))
    assert batch["input_ids"].shape == (3, 40)  # verified at another shape: the calibration batches' is (8, n)
    run = targets.get_target("openvino-int8").open(ov_out / "model.xml")
    got = run(**batch)
    original = BertModel.from_pretrained(bert_dir).eval()
    with torch.no_grad():
        ref = original(**batch)
    cos = cosine_per_sample([got["last_hidden_state"], got["pooler_output"]],
                            [ref.last_hidden_state, ref.pooler_output], batch)
    # the guard's bound (cosine mean over the check set) holds here too, and the worst sample is no
    # further from the original than the check set's worst by more than 0.01
    assert float(cos.mean()) >= 0.99, cos
    assert float(cos.min()) >= rep["end_to_end"]["cosine_min"] - 0.01, (cos, rep["end_to_end"]["cosine_min"])


@needs_openvino
def test_readme_snippet_runs_with_openvino_alone(ov_out: Path) -> None:
    import numpy
    import openvino
    import tokenizers

    snippet = re.search(r"```python\n(.*?)```", (ov_out / "README.md").read_text(), re.S).group(1)  # type: ignore[union-attr]
    assert 'compile_model("model.xml", "CPU", config)' in snippet
    (ov_out / "README.snippet.py").write_text(snippet)
    sites = sorted({str(Path(m.__file__).resolve().parents[1]) for m in (numpy, openvino, tokenizers)})
    check = textwrap.dedent('''
        import sys
        outputs = None
        exec(compile(open("README.snippet.py").read(), "README.md", "exec"))
        assert "torch" not in sys.modules and "surgeon" not in sys.modules, sorted(sys.modules)
        print(outputs["last_hidden_state"].shape[0], outputs["last_hidden_state"].shape[2])
    ''')
    # -I -S: no site-packages, no .pth (so no editable surgeon), no PYTHONPATH; only these packages' dirs
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", f"import sys; sys.path[:0] = {sites!r}\n" + check],
                          cwd=ov_out, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].split() == ["2", "64"]


@needs_openvino
def test_surgeon_bench_retimes_the_outdir(ov_out: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = run_cli(["bench", str(ov_out), "--runs", "3", "--json"], capsys)
    assert code == 0, err
    figures = json.loads(out)
    assert figures["target"] == "openvino-int8" and figures["runtime"] == "openvino-cpu"
    assert set(figures["latency_ms"]) == {"original", "optimized"} and figures["latency_ratio"] > 0


def test_without_openvino_one_line_names_the_extra(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "ovfac.py").write_text("import torch\n\ndef mlp():\n"
                                       "    return torch.nn.Linear(8, 8), (torch.randn(2, 8),)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino → ImportError, as when not installed
    code, out, err = run_cli(["optimize", "ovfac:mlp", "--target", "openvino-int8", "-o", "out"], capsys)
    assert code == 2
    errors = [line for line in err.splitlines() if "error" in line]
    assert errors == ["surgeon: error: the openvino targets need OpenVINO, which is not installed: "
                      "pip install 'surgeon[openvino]'"], err
    assert not (tmp_path / "out").exists()  # refused before any work
