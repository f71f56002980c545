"""OUTDIR is a deployable package and what surgeon prints about it is true (issue 19).

* each target picks its passes: ``optimize --target onnx-int8`` (no ``--passes``) writes INT8 weights
  that ORT runs as integer kernels, ``onnx-fp8`` FP8, ``onnx``/``torch`` none; ``--passes`` that cannot
  give what the target promises is one line, exit 2, nothing written (``--force-passes`` writes it);
* OUTDIR of a Hugging Face model holds its config and tokenizer, report.json names the file's inputs,
  outputs and dynamic axes, and OUTDIR/README.md's snippet runs in a process with only onnxruntime,
  numpy and tokenizers (no torch, no surgeon);
* unmeetable tolerances: exit code, stdout, stderr and report.json say the same (docs/errors.md);
* a chunk-based coupling flow goes to ONNX and matches torch in ORT;
* ``surgeon.calibration_batches`` and ``calib=PATH``; the small CLI fixes.
"""

from __future__ import annotations

import json
import os
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

ort = pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]

FACTORY = textwrap.dedent('''
    import torch
    from torch import nn


    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))


    class Coupling(nn.Module):
        """One affine coupling written with chunk, as docs/analysis.md shows."""

        def __init__(self, d=8, h=16):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(d // 2, h), nn.ReLU(), nn.Linear(h, d))

        def forward(self, x):
            x1, x2 = x.chunk(2, -1)
            log_s, t = self.net(x1).chunk(2, -1)
            return torch.cat([x1, x2 * torch.exp(torch.tanh(log_s)) + t], -1)


    class Flow(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.layers = nn.ModuleList([Coupling(), Coupling()])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x).flip(-1)
            return x


    def mlp():
        return MLP().eval(), (torch.randn(4, 16),)


    def flow():
        return Flow().eval(), (torch.randn(4, 8),)
''')


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory holding ``deployfac.py`` (``deployfac:mlp``, ``deployfac:flow``) and ``calib.pt``."""
    (tmp_path / "deployfac.py").write_text(FACTORY)
    g = torch.Generator().manual_seed(1)
    torch.save([(torch.randn(8, 16, generator=g),) for _ in range(24)], tmp_path / "calib.pt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


_run = run_cli


def _initializer_types(path: Path) -> set[int]:
    import onnx

    return {t.data_type for t in onnx.load(str(path)).graph.initializer}


# --------------------------------------------------------------------------------------------------
# a target decides what it needs
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target, dtype", [("onnx-fp8", "fp8"), ("onnx", None), ("torch", None)])
def test_each_target_runs_its_default_passes(workdir: Path, capsys: pytest.CaptureFixture, target: str,
                                             dtype: str | None) -> None:
    import onnx

    # cosine 0.99: the subject is each target's file (FP8 activations need their session option), not
    # the default tolerance, at which the guard keeps this MLP's FP8 linears weight-only
    code, out, err = _run(["optimize", "deployfac:mlp", "--calib", "calib.pt", "--target", target, "-o", "out",
                           "--no-speed", "--tolerance", "0.99"], capsys)
    assert code == 0, err
    rep = json.loads((workdir / "out" / "report.json").read_text())
    from surgeon.targets import get_target

    assert rep["passes"] and rep["passes"][-1].split("{")[0] == get_target(target).default_passes.split(",")[-1].split("{")[0]
    if target == "torch":
        assert not (workdir / "out" / "model.onnx").exists() and not (workdir / "out" / "README.md").exists()
        return
    fig = rep["targets"][target]
    # every ONNX file is verified and timed with FTZ/DAZ, and its README's session does the same
    assert fig["session_config"]["session.set_denormal_as_zero"] == "1"
    assert 'so.add_session_config_entry("session.set_denormal_as_zero", "1")' in (workdir / "out" / "README.md").read_text()
    if dtype == "fp8":
        assert fig["quantized"]["fp8"] > 0 and fig["quantized"]["int8"] == 0
        assert onnx.TensorProto.FLOAT8E4M3FN in _initializer_types(workdir / "out" / "model.onnx")
        written = onnx.load(str(workdir / "out" / "model.onnx"))
        assert (fig["opset"], written.ir_version) == (21, 10)  # FP8 engines' parsers: the opset-21 file
        assert fig["fp8_session_option"] == "session.disable_quant_qdq=1"
        assert 'so.add_session_config_entry("session.disable_quant_qdq", "1")' in (workdir / "out" / "README.md").read_text()
    else:
        assert fig["opset"] == 23  # ORT targets: the fused Attention op's opset
        assert fig["quantized"] == {"fp8": 0, "int8": 0} and fig["fp8_session_option"] is None
        assert "session.disable_quant_qdq" not in (workdir / "out" / "README.md").read_text()


@pytest.mark.parametrize("target, passes, lacks", [
    ("onnx-int8", "attention-fp8", "int8"),
    ("onnx-fp8", "linear-quant{dtype=int8}", "fp8"),
])
def test_passes_that_contradict_the_target_are_one_line(workdir: Path, capsys: pytest.CaptureFixture, target: str,
                                                         passes: str, lacks: str) -> None:
    from surgeon.pass_manager import parse_pipeline
    from surgeon.targets import get_target

    code, out, err = _run(["optimize", "deployfac:mlp", "--calib", "calib.pt", "--target", target, "--passes", passes,
                           "-o", "out"], capsys)
    spec = ",".join(p.spec() for p in parse_pipeline(passes))
    assert code == 2 and out == ""
    assert err == (f"surgeon: error: --passes '{spec}' cannot produce what target {target} promises (no {lacks} "
                   f"quantization in the rewritten model); its default passes are "
                   f"'{get_target(target).default_passes}' (or give --force-passes to write it anyway)\n")
    assert not (workdir / "out").exists()


def test_force_passes_writes_what_was_asked(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = _run(["optimize", "deployfac:mlp", "--calib", "calib.pt", "--target", "onnx-fp8", "--passes",
                         "linear-quant{dtype=int8}", "--force-passes", "-o", "out", "--no-speed"], capsys)
    assert code == 0, err
    fig = json.loads((workdir / "out" / "report.json").read_text())["targets"]["onnx-fp8"]
    assert fig["quantized"]["int8"] > 0 and any("no fp8 quantization" in n for n in fig["notes"])


# --------------------------------------------------------------------------------------------------
# OUTDIR of a Hugging Face model: INT8 by default, its tokenizer, and a snippet that runs without torch
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory, hf_tokenizer: Any) -> Path:
    """A Hugging Face directory: a random 1-layer BertModel (hidden 16) and a BERT tokenizer."""
    return save_bert_dir(tmp_path_factory.mktemp("deploy") / "bert", hf_tokenizer, hidden=16, layers=1)


@pytest.fixture(scope="module")
def bert_out(bert_dir: Path) -> Path:
    """``surgeon optimize BERT --calib s.txt -o out`` (no --target, no --passes: onnx-int8's defaults)."""
    sentences = (ROOT / "surgeon" / "data" / "calib_sentences.txt").read_text().splitlines()[:24]
    (bert_dir.parent / "s.txt").write_text("\n".join(sentences) + "\n")
    out = bert_dir.parent / "out"
    assert cli.main(["optimize", str(bert_dir), "--calib", str(bert_dir.parent / "s.txt"), "-o", str(out),
                     "--no-speed"]) == 0
    return out


def test_default_target_writes_int8_and_a_deployable_outdir(bert_out: Path, bert_dir: Path) -> None:
    import onnx

    rep = json.loads((bert_out / "report.json").read_text())
    fig = rep["targets"]["onnx-int8"]
    assert rep["passes"][0].startswith("linear-quant{dtype=int8")
    assert fig["quantized"]["int8"] > 0 and fig["quantized"]["fp8"] == 0
    assert onnx.TensorProto.INT8 in _initializer_types(bert_out / "model.onnx")  # INT8 weights in the file
    assert fig["ort_cpu"]["integer_kernels"] > 0 and fig["size_ratio"] < 0.5
    # beside model.onnx: the model config and tokenizer, as the source directory has them
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (bert_out / name).read_bytes() == (bert_dir / name).read_bytes()
    deploy = rep["deploy"]
    assert [i["name"] for i in deploy["inputs"]] == ["input_ids", "token_type_ids", "attention_mask"]
    assert [o["name"] for o in deploy["outputs"]] == ["last_hidden_state", "pooler_output"]
    assert deploy["dynamic_axes"]["input_ids"] == {"0": "batch", "1": "sequence"}
    assert deploy["outputs"][0]["shape"] == ["batch", "sequence", 16]
    assert rep["outputs"]["readme"] == "README.md"
    # cosines leave padded positions out, and say so, per output
    by_output = fig["cosine_by_output"]
    assert by_output["last_hidden_state"]["measured"].startswith("per sample, padded positions")
    assert by_output["pooler_output"]["measured"] == "per sample, every element"


def test_outdir_snippet_runs_without_torch_or_surgeon(bert_out: Path) -> None:
    import numpy
    import onnxruntime
    import tokenizers

    readme = (bert_out / "README.md").read_text()
    snippet = re.search(r"```python\n(.*?)```", readme, re.S).group(1)  # type: ignore[union-attr]
    assert '"token_type_ids": np.array([e.type_ids for e in batch], dtype=np.int64)' in snippet
    sites = sorted({str(Path(m.__file__).resolve().parents[1]) for m in (numpy, onnxruntime, tokenizers)})
    check = textwrap.dedent('''
        import sys
        outputs = None
        exec(compile(open("README.snippet.py").read(), "README.md", "exec"))
        assert "torch" not in sys.modules and "surgeon" not in sys.modules, sorted(sys.modules)
        h = outputs["last_hidden_state"]
        print(h.shape[0], h.shape[2], outputs["pooler_output"].shape)
    ''')
    (bert_out / "README.snippet.py").write_text(snippet)
    # -I -S: no site-packages, no .pth (so no editable surgeon), no PYTHONPATH; only these packages' dirs
    code = f"import sys; sys.path[:0] = {sites!r}\n" + check
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code], cwd=bert_out, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].split() == ["2", "16", "(2,", "16)"]


# --------------------------------------------------------------------------------------------------
# every verdict agrees
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tolerance", ["max_rel_err=0", "cosine_min=1", "cosine_mean=1"])
def test_unmeetable_tolerances_agree_everywhere(workdir: Path, capsys: pytest.CaptureFixture, tolerance: str) -> None:
    code, out, err = _run(["optimize", "deployfac:mlp", "--calib", "calib.pt", "--tolerance", tolerance, "-o", "out",
                           "--no-speed"], capsys)
    rep = json.loads((workdir / "out" / "report.json").read_text())
    verdict = rep["verdict"]
    assert verdict["status"] in ("met_by_rollback", "not_met") and code == verdict["exit_code"] == 3
    summary = [line for line in out.splitlines() if line.startswith("end to end")]
    assert summary and summary[0].endswith(f"— tolerance ({rep['tolerance']['description']}) {verdict['summary']}")
    assert err.splitlines()[-1] == f"surgeon: error: {verdict['message']}; written to out"
    assert rep["tolerance"]["met"] == (verdict["status"] == "met_by_rollback")
    if verdict["status"] == "met_by_rollback":
        assert rep["counts"]["applied"] == 0 and verdict["message"].startswith(
            f"tolerance ({rep['tolerance']['description']}) met only by rolling back all")
    else:
        assert verdict["message"].startswith(f"tolerance not met ({rep['tolerance']['description']})")
    assert sum(verdict["message"] in line for line in err.splitlines()) == 1  # said once, not also as a warning
    errors_md = (ROOT / "docs" / "errors.md").read_text()
    template = re.sub(r"\d+ substitution", "N substitution", verdict["message"])
    if verdict["status"] == "met_by_rollback":
        assert "met only by rolling back all N substitution(s): the written model computes as the original" in errors_md
        assert template.split(": ", 1)[1] in errors_md
    assert f"`--tolerance {tolerance}`" in errors_md


# --------------------------------------------------------------------------------------------------
# the chunk-based coupling flow in ONNX
# --------------------------------------------------------------------------------------------------
def test_chunk_coupling_flow_optimizes_to_onnx_and_matches_torch(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = _run(["optimize", "deployfac:flow", "--target", "onnx", "-o", "out", "--no-speed"], capsys)
    assert code == 0, err
    import deployfac  # type: ignore[import-not-found]

    model, _ = deployfac.flow()
    sess = ort.InferenceSession(str(workdir / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    x = torch.randn(7, 8, generator=torch.Generator().manual_seed(3))  # another batch size than exported
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = model(x).numpy()
    assert abs(got - want).max() <= 1e-5


# --------------------------------------------------------------------------------------------------
# Python API calibration helpers
# --------------------------------------------------------------------------------------------------
def test_calibration_batches_and_calib_path(bert_dir: Path, workdir: Path, hf_tokenizer: Any) -> None:
    import surgeon

    (workdir / "s.txt").write_text("one sentence here.\n\nand another one.\nthree.\n")
    batches = surgeon.calibration_batches("s.txt", bert_dir, batch_size=2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 1]
    assert set(batches[0]) == {"input_ids", "token_type_ids", "attention_mask"}
    same = surgeon.calibration_batches(["one sentence here.", "and another one.", "three."], hf_tokenizer, batch_size=2)
    assert torch.equal(same[0]["input_ids"], batches[0]["input_ids"])
    with pytest.raises(surgeon.SurgeonError, match="^calibration file 'nope.txt'|^cannot read calibration file 'nope.txt'"):
        surgeon.calibration_batches("nope.txt", bert_dir)
    model, inputs = surgeon.load("deployfac:mlp")
    res = surgeon.optimize(model, inputs, calib="calib.pt", target="torch")  # a path, by --calib's rules
    assert res.report["calibration"]["batches"]["total"] == 24


# --------------------------------------------------------------------------------------------------
# the small ones
# --------------------------------------------------------------------------------------------------
def test_version_does_not_import_torch() -> None:
    code = "import sys; from surgeon.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n    pass\n" \
           "assert 'torch' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and proc.stdout.startswith("surgeon "), proc.stderr


def test_debug_after_the_command(tmp_path: Path) -> None:
    from surgeon.errors import SurgeonError

    assert cli.main(["analyze", str(tmp_path / "missing.pt2")]) == 2
    with pytest.raises(SurgeonError):
        cli.main(["analyze", str(tmp_path / "missing.pt2"), "--debug"])
    with pytest.raises(SurgeonError):
        cli.main(["--debug", "analyze", str(tmp_path / "missing.pt2")])


def test_analyze_prints_readable_dims() -> None:
    from surgeon._console import _shape, dim_names

    shapes = [["s18", 2, "s41", 16], ["s18", "s41", 32]]
    names = dim_names(shapes)
    assert [_shape(s, names) for s in shapes] == ["batch×2×seq×16", "batch×seq×32"]
    assert dim_names([["s1", "s2", "s3"]]) == {"s1": "batch", "s2": "?", "s3": "?"}


def test_no_pointer_to_warnings_nobody_sees() -> None:
    from surgeon.errors import first_line

    exc = RuntimeError("We ran into an error when deserializing the saved file. Please check the warnings above "
                       "for possible errors. ")
    assert first_line(exc) == "RuntimeError: We ran into an error when deserializing the saved file."


# --------------------------------------------------------------------------------------------------
# headline figures: padded positions left out
# --------------------------------------------------------------------------------------------------
def test_padded_positions_do_not_count_in_the_figures() -> None:
    import numpy as np

    from surgeon.metrics import PairStats, cosine_per_sample, position_mask

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 5, 4, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    out = ref.clone()
    out[0, 3:] = -ref[0, 3:] + 7.0  # garbage at the padded positions of sample 0 only
    inputs = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": mask}
    masked, plain = PairStats(), PairStats()
    masked.update(ref, out, position_mask(inputs, ref))
    plain.update(ref, out)
    assert masked.figures().cosine_min == pytest.approx(1.0, abs=1e-12) and masked.figures().max_rel_err == 0.0
    assert plain.figures().cosine_min < 0.9
    cos = cosine_per_sample([out.numpy()], [ref.numpy()], inputs)
    assert np.allclose(cos, 1.0, atol=1e-12)
    assert cosine_per_sample([out.numpy()], [ref.numpy()]).min() < 0.9
    assert position_mask(inputs, torch.zeros(2, 4)) is None  # a pooled [batch, hidden] output: every element counts
