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
    from surgeon.targets._openvino_runtime import compile_file, layer_kind, runtime_layers

    rep = json.loads((ov_out / "report.json").read_text())
    ov_cpu = rep["targets"]["openvino-int8"]["openvino_cpu"]
    layers = runtime_layers(compile_file(ov_out / "model.xml"))
    fc = [row for row in layers if row["type"] == "FullyConnected"]
    # static sites as int8 layers, weight-only sites with compressed int8 weights, as the report says
    rungs = [s["rung"] for s in rep["sites"] if s["kind"] == "linear" and s["status"] == "applied"]
    in_module = (ov_cpu["int8_linears_in_module"], ov_cpu["int8_weight_linears_in_module"])
    assert in_module == (rungs.count("int8-static"), rungs.count("int8-weight"))
    kinds = [layer_kind(r) for r in fc]
    assert (kinds.count("int8"), kinds.count("int8-weight")) == in_module
    assert len(rungs) == len(fc), fc
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


# -- the weight-only rung (int8-weight): static int8 → weight-only int8 → keep ------------------------
class OutlierBlock(torch.nn.Module):
    """Two linears; ``down``'s input is 1000× larger on the few tokens whose first feature is over 2 (a
    "massive activation", as on BERT's [SEP]), its output scaled back. The per-tensor int8 activation
    scale then leaves the other tokens under one level: static int8 misses there, and SmoothQuant, per
    channel, cannot move a per-token range into the weight."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = torch.nn.Linear(64, 256), torch.nn.Linear(256, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        massive = 1.0 + 999.0 * (x[..., :1] > 2.0).float()
        return self.down(torch.relu(self.up(x)) * massive) / massive


def _batches(n: int, seed: int, shape: tuple[int, int] = (4, 16)) -> list[tuple[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, 64, generator=g),) for _ in range(n)]


@pytest.fixture(scope="module")
def outlier_guarded() -> tuple:
    """OutlierBlock through linear-quant{dtype=int8} with the openvino-int8 profile, fitted and guarded."""
    import copy

    from surgeon.calibration import calibrate
    from surgeon.capture import capture
    from surgeon.pass_manager import PassContext, PassManager
    from surgeon.profile import OPENVINO_CPU_INT8
    from surgeon.tolerance import Tolerance
    from surgeon.verify import guard

    gm0 = capture(OutlierBlock().eval(), _batches(1, 0)[0]).gm
    manager = PassManager("linear-quant{dtype=int8}")
    gm, ctx, _ = manager.run(copy.deepcopy(gm0), PassContext(profile=OPENVINO_CPU_INT8))
    fit = _batches(8, 1)
    calibrate(gm, fit, progress=False)
    for p in manager.passes:
        p.fit(gm, ctx, fit)
    res = guard(gm0, gm, list(ctx.records.values()), _batches(4, 2), Tolerance(cosine_mean=0.999))
    return gm0, gm, res


def test_a_site_that_misses_on_static_int8_lands_on_weight_only_not_keep(outlier_guarded: tuple) -> None:
    _, gm, res = outlier_guarded
    by_module = {c.record.module: c for c in res.sites}
    assert by_module["up"].ladder == ("int8-static", "int8-weight", "keep")  # the profile's ladder
    assert res.met and res.rungs == {"linear:up:linear": "int8-static", "linear:down:linear_1": "int8-weight"}, res.rungs
    down = by_module["down"]
    assert down.status == "applied" and down.reason.startswith("int8-static → int8-weight")
    # the static rung alone breaks the tolerance; the weight-only rung alone does not
    assert down.solo_rungs["int8-static"].cosine_mean < 0.999 <= down.solo_rungs["int8-weight"].cosine_mean


def _ir(gm: torch.nn.Module, path: Path) -> Any:
    from surgeon.targets import get_target
    from surgeon.targets._openvino_runtime import compile_file, deploy_config
    from surgeon.targets.onnx import export_onnx
    from surgeon.targets.openvino_int8 import save_ir

    export_onnx(gm, _batches(1, 0)[0], path.with_suffix(".onnx"), opset=get_target("openvino-int8").opset)
    save_ir(path.with_suffix(".onnx"), path, deploy_config("f32"))
    return compile_file(path)


@needs_openvino
def test_a_weight_only_site_runs_compressed_and_matches_its_torch_simulation(outlier_guarded: tuple, tmp_path: Path) -> None:
    import copy

    import numpy as np

    from surgeon.targets._openvino_runtime import infer, int8_layers, runtime_layers

    _, gm, _ = outlier_guarded
    compiled = _ir(gm, tmp_path / "guarded.xml")
    # up: int8 activation × int8 weight; down: float activation × compressed i8 weight (no f32 copy)
    fc = [r for r in runtime_layers(compiled) if r["type"] == "FullyConnected"]
    assert sorted((r["precision"], r["inputs"][0], r["inputs"][1]) for r in fc) == [("i8", "f32", "i8"), ("i8", "i8", "i8")], fc
    assert (int8_layers(compiled)["int8"], int8_layers(compiled)["int8_weight"], int8_layers(compiled)["float"]) == (1, 1, 0)
    # the weight-only site alone (up kept exact): OpenVINO computes f32(q)·s and a float product, as
    # torch does, at a batch and length the export did not see; only the summation order differs
    alone = copy.deepcopy(gm)
    for m in alone.modules():
        if type(m).__name__ == "QuantLinear" and m.rung == "int8-static":
            m.active = False
    compiled = _ir(alone, tmp_path / "alone.xml")
    assert int8_layers(compiled)["int8_weight"] == 1 and int8_layers(compiled)["int8"] == 0
    x = _batches(1, 3, (3, 40))[0][0]
    got = infer(compiled, {compiled.inputs[0].get_any_name(): x.numpy()})[0]
    with torch.no_grad():
        want = alone(x).numpy()
    assert np.abs(got - want).max() <= 1e-5, np.abs(got - want).max()  # outputs ~1: float rounding only
