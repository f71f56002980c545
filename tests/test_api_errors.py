"""The Python API's error contract (docs/errors.md): every bad input of the catalogue, given to
``surgeon.load``, ``surgeon.optimize`` or ``Result.save`` (and, for the rows only a command has, the
function that command calls), raises a ``SurgeonError`` — never another type — whose message is one
line: the catalogue's message exactly, or its stable prefix.

``tests/test_errors.py`` runs the same catalogue through the CLI (exit codes, stderr, untouched files);
this file shows a pipeline calling the library gets the same one-line errors, not the exceptions of
torch / zipfile / pickle underneath.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

import surgeon
from surgeon.errors import CaptureError, InsufficientMemory, SurgeonError
from tests.test_errors import FACTORY, _damaged_pt2, _evil_pt2, _pt2, _truncated_pt2, _WritesFile

ROOT = Path(__file__).resolve().parents[1]


def _raises(fn: Callable[[], Any], message: str, cls: type[SurgeonError] = SurgeonError) -> SurgeonError:
    """``fn()`` raises ``cls`` (a SurgeonError) with the one-line ``message`` (a prefix when it ends with …)."""
    with pytest.raises(Exception) as info:
        fn()
    exc = info.value
    assert isinstance(exc, cls), f"{type(exc).__name__} escaped, not a {cls.__name__}: {exc}"
    text = str(exc)
    assert "\n" not in text, text
    if message.endswith("…"):
        assert text.startswith(message[:-1]), text
    else:
        assert text == message
    return exc


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "errfac.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("errfac", None)


@pytest.fixture(scope="module")
def mlp() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval(), (torch.randn(2, 8),)


@pytest.fixture(scope="module")
def result(mlp: tuple[nn.Module, tuple[torch.Tensor]]) -> surgeon.Result:
    model, inputs = mlp
    g = torch.Generator().manual_seed(2)
    # row 21: a tolerance nothing meets is no error in the API: the best model comes back (met False)
    with pytest.warns(UserWarning, match="no configuration met the tolerance"):
        result = surgeon.optimize(model, inputs, [(torch.randn(4, 8, generator=g),) for _ in range(4)],
                                  passes="linear-quant", metric=lambda ref, out: 0.0, tolerance=1.0)
    assert result.met is False
    return result


# --- surgeon.load: rows 1-10, 26 ------------------------------------------------------------------

def test_load_refuses_every_bad_model_in_one_line(workdir: Path) -> None:
    _raises(lambda: surgeon.load("missing.pt2"), "model path 'missing.pt2' does not exist")  # 1
    (workdir / "model.xyz").write_bytes(b"???")
    _raises(lambda: surgeon.load("model.xyz"),  # 3
            "unknown model format 'model.xyz': expected a .pt2 file, a Hugging Face model directory, "
            "package.module:factory, or a pickle (.pt/.pth/.pkl/.bin)")
    (workdir / "model.onnx").write_bytes(b"\x08\x0a")
    _raises(lambda: surgeon.load("model.onnx"), "unknown model format 'model.onnx': an ONNX file is already an "
                                                "export, and surgeon rewrites PyTorch models; …")  # 4
    _truncated_pt2(workdir)
    _raises(lambda: surgeon.load("bad.pt2"), "could not read .pt2 file 'bad.pt2': BadZipFile: File is not a zip file")  # 5
    _damaged_pt2(workdir)
    _raises(lambda: surgeon.load("m.pt2"),  # 5b
            "could not read .pt2 file 'm.pt2': the archive is corrupt (CRC check failed for 'm/data/weights/weight_0')")
    (workdir / "m.pt2").unlink()
    _evil_pt2(workdir / "evil.pt2", workdir / "pwned")
    _raises(lambda: surgeon.load("evil.pt2"),  # 6
            "refusing to load .pt2 file 'evil.pt2': it holds pickled objects beyond tensors (loading them would run "
            "code from the file); re-export it with torch.export.save from plain tensors")
    torch.save(_WritesFile(str(workdir / "pwned")), workdir / "model.pt")
    _raises(lambda: surgeon.load("model.pt"),  # 7
            "refusing to load pickle 'model.pt': unpickling can run arbitrary code; pass --trust-pickle only if you "
            "trust its source, or save the model with torch.export.save (.pt2)")
    assert not (workdir / "pwned").exists()
    (workdir / "hf").mkdir()
    (workdir / "hf" / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    _raises(lambda: surgeon.load("hf"),  # 8
            "Hugging Face model directory 'hf' has no weights: expected model.safetensors (or pytorch_model.bin)")
    _raises(lambda: surgeon.load("errfac:boom"), "factory 'errfac:boom' raised RuntimeError: weights not found")  # 9
    _raises(lambda: surgeon.load("errfac_nope:make"),
            "cannot import module 'errfac_nope' of factory 'errfac_nope:make': ModuleNotFoundError: No module named "
            "'errfac_nope'")
    (workdir / "errfac2.py").write_text("def single():\n    return 3\n")
    _raises(lambda: surgeon.load("errfac2:single"), "factory 'errfac2:single' must return (nn.Module, example_inputs)…")
    _raises(lambda: surgeon.load("errfac:wrong_shape"),  # 10
            "the model of factory 'errfac:wrong_shape' fails on its example inputs (arg0[2x5] float32): RuntimeError: "
            "mat1 and mat2 shapes cannot be multiplied (2x5 and 4x3)")
    sys.modules.pop("errfac2", None)


def test_load_refuses_an_unreadable_file_in_one_line(workdir: Path) -> None:  # row 2
    _pt2(workdir / "m.pt2")
    os.chmod(workdir / "m.pt2", 0)
    message = "could not read .pt2 file 'm.pt2': PermissionError: [Errno 13] Permission denied: 'm.pt2'"
    try:
        if os.geteuid() != 0:
            _raises(lambda: surgeon.load("m.pt2"), message)
            return
        if shutil.which("setpriv") is None:
            pytest.skip("root ignores file modes and setpriv is not available to drop that")
        # root reads any file: drop the capabilities that bypass file modes, in a child that calls the API
        code = ("import surgeon\ntry:\n    surgeon.load('m.pt2')\nexcept surgeon.SurgeonError as e:\n    print(repr(e))\n")
        proc = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search", sys.executable, "-c",
                               code], cwd=workdir, capture_output=True, text=True, timeout=120, check=False,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.stdout.strip() == f"SurgeonError({message!r})", proc.stderr[-2000:]
    finally:
        os.chmod(workdir / "m.pt2", 0o644)


def test_load_names_an_unknown_pytree_class_in_one_line(workdir: Path) -> None:  # row 26
    class Out(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"y": x * 2}

    torch.export.save(torch.export.export(Out(), (torch.randn(2, 3),)), "dict.pt2")
    import zipfile

    with zipfile.ZipFile("dict.pt2") as zin, zipfile.ZipFile("odd.pt2", "w") as zout:
        for item in zin.infolist():
            data = zin.read(item)
            zout.writestr(item, data.replace(b"builtins.dict", b"mylib.outputs.Out")
                          if item.filename.endswith("models/model.json") else data)
    _raises(lambda: surgeon.load("odd.pt2"),
            ".pt2 file 'odd.pt2' names the class mylib.outputs.Out in its pytree spec, which surgeon does not import "
            "(it imports only transformers, diffusers's own output classes); export the model with tuple or dict "
            "outputs")
    assert "mylib" not in sys.modules


# --- surgeon.optimize: rows 10-16, 19-21 --------------------------------------------------------------

def test_optimize_refuses_bad_calibration_in_one_line(mlp: tuple[nn.Module, tuple[torch.Tensor]]) -> None:
    model, inputs = mlp
    ok = [(torch.randn(4, 8),), (torch.randn(4, 8),)]

    def run(calib: Any) -> Callable[[], Any]:
        return lambda: surgeon.optimize(model, inputs, calib, passes="linear-quant")

    _raises(run([(torch.randn(4),)]),  # 11
            "calibration batch 1 does not match the model's inputs: input 'arg0' has 1 dimension(s), expected 2")
    _raises(run([(torch.randint(0, 5, (4, 8)),)]),
            "calibration batch 1 does not match the model's inputs: input 'arg0' has dtype int64, expected float32")
    _raises(run([ok[0], (ok[1][0], ok[1][0])]), "calibration batch 2 does not match the model's inputs: …")
    _raises(run([(torch.randn(4, 5),)]),  # accepted by the checks of structure, refused by the graph
            "calibration batch 1 does not match the model's inputs: AssertionError: Guard failed: input.size()[1] == 8")
    _raises(run([]), "calibration data is empty")  # 12
    _raises(run(3), "calib must be an iterable of input tuples (or dicts), one per batch, got int")
    _raises(run(ok[0]), "calib must be an iterable of input tuples (or dicts), one per batch — wrap a single batch "
                        "in a list")


def test_optimize_refuses_non_finite_calibration(mlp: tuple[nn.Module, tuple[torch.Tensor]]) -> None:  # 13
    model, inputs = mlp
    batches = [(torch.randn(4, 8),), (torch.randn(4, 8),)]
    batches[1][0][2, 3] = float("inf")
    _raises(lambda: surgeon.optimize(model, inputs, batches, passes="linear-quant"),
            "calibration data contains NaN/Inf (batch 2, input 'arg0')")


def test_optimize_refuses_bad_options_in_one_line(mlp: tuple[nn.Module, tuple[torch.Tensor]],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    model, inputs = mlp

    def run(**kw: Any) -> Callable[[], Any]:
        return lambda: surgeon.optimize(model, inputs, [inputs], **kw)

    _raises(run(passes="attn-fp8"), "unknown pass 'attn-fp8' (known: …")  # 14
    _raises(run(passes="attention-fp8{bits=8}"), "unknown option 'bits' for pass 'attention-fp8' (options: …")
    _raises(run(passes="linear-quant{dtype=int2}"), "option linear-quant.dtype=int2 is not one of fp8, int8, int4, int8w")  # 15
    _raises(run(passes="attention-fp8{p_bits=3}"),
            "pass 'attention-fp8': p_bits must be 8 (FP8 P) or 1 (binary P fitted per head), got 3")
    _raises(run(passes="linear-quant", tolerance=1.5), "tolerance cosine_mean=1.5 is not a cosine in [-1, 1]")
    _raises(run(passes="linear-quant", target="tflite"),  # 16
            "unknown target 'tflite' (known: torch, onnx, onnx-fp8, onnx-int8, onnx-int8-vnni, onnx-decoder, onnx-seq2seq, openvino-int8)")
    monkeypatch.setenv("SURGEON_MEMORY_LIMIT", "lots")  # 20
    _raises(run(passes="linear-quant"), "SURGEON_MEMORY_LIMIT='lots' is not a size (bytes, or a number with K, M, G or T)")
    monkeypatch.setenv("SURGEON_MEMORY_LIMIT", "1K")  # 19
    _raises(run(passes="linear-quant"), "would not fit in memory: estimated peak …", InsufficientMemory)


def test_optimize_refuses_a_model_that_fails_on_its_inputs() -> None:  # row 10, through the API
    # export fails, and an fx trace would have let the RuntimeError escape from the first forward
    _raises(lambda: surgeon.optimize(nn.Linear(4, 3), (torch.randn(2, 5),), passes="linear-quant"),
            "the model fails on its example inputs (arg0[2x5] float32): RuntimeError: mat1 and mat2 shapes cannot be "
            "multiplied (2x5 and 4x3)", CaptureError)
    seq = nn.Sequential(nn.Linear(5, 5), nn.Linear(4, 3))
    _raises(lambda: surgeon.capture(seq, (torch.randn(2, 5),)),
            "the model fails on its example inputs (arg0[2x5] float32) in module '1': RuntimeError: …", CaptureError)


def test_capture_names_a_returned_kv_cache_and_the_fix() -> None:  # row 31, through the API
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2Model(transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1,
                                                           n_head=2)).eval()  # use_cache defaults to on
    ids = {"input_ids": torch.randint(0, 50, (2, 6))}
    _raises(lambda: surgeon.optimize(model, ids, calib=[ids], passes="linear-quant"),
            "cannot capture GPT2Model: it returns its key/value cache (DynamicCache) because config.use_cache is on; "
            "set model.config.use_cache = False before optimizing (surgeon's loader does so for a model directory), "
            "or use --target onnx-decoder for generation with a cache", CaptureError)
    assert model.config.use_cache is True  # the input is not modified
    model.config.use_cache = False
    assert surgeon.capture(model, ids).method == "export"  # the fix the message names


# --- Result.save: rows 16-18, 21 ----------------------------------------------------------------------

def test_save_refuses_bad_outdirs_in_one_line(result: surgeon.Result, workdir: Path) -> None:
    (workdir / "out").mkdir()
    (workdir / "out" / "mine.txt").write_text("precious")
    _raises(lambda: result.save("out", speed=False), "output directory 'out' already exists (use --force to replace it)")  # 17
    assert os.listdir(workdir / "out") == ["mine.txt"]
    (workdir / "plain.txt").write_text("a file")
    _raises(lambda: result.save("plain.txt/out", speed=False),  # 18
            f"cannot write output directory 'plain.txt/out': '{workdir.resolve() / 'plain.txt'}' is not a directory")
    _raises(lambda: result.save("new", target="tflite", speed=False),  # 16
            "unknown target 'tflite' (known: torch, onnx, onnx-fp8, onnx-int8, onnx-int8-vnni, onnx-decoder, onnx-seq2seq, openvino-int8)")
    assert not (workdir / "new").exists()


def test_rows_only_a_command_has_raise_surgeon_errors(result: surgeon.Result, workdir: Path) -> None:
    """Rows 12, 22, 23: the functions ``--calib FILE``, ``surgeon export`` and ``surgeon bench`` call."""
    from surgeon.export_cli import export_model
    from surgeon.load import load_model
    from surgeon.optimize import read_calibration
    from surgeon.speed import bench_outdir

    loaded = load_model("errfac:mlp")
    _raises(lambda: read_calibration("calib.pt", loaded), "cannot read calibration file 'calib.pt': no such file")  # 12
    (workdir / "calib.pt").write_bytes(b"\x00not a torch file")
    _raises(lambda: read_calibration("calib.pt", loaded),
            "cannot read calibration file 'calib.pt': not a torch.save file of input tuples …")
    torch.save([], "calib.pt")
    _raises(lambda: read_calibration("calib.pt", loaded), "calibration file 'calib.pt' is empty")
    _raises(lambda: export_model(loaded, "onnx-int8", "exported"),  # 22
            "surgeon export writes the model unchanged; target onnx-int8 needs the verified pipeline: "
            "surgeon optimize MODEL --target onnx-int8 --calib FILE -o OUTDIR")
    assert not (workdir / "exported").exists()
    _raises(lambda: bench_outdir("nowhere"), "'nowhere' is not an OUTDIR written by surgeon optimize: no report.json")  # 23
    result.save("plain", speed=False)
    # a Sequential's input is named 'input', which the saved program's graph renames (targets/pt2.py):
    # the file loads and runs bit-exact to Result.module
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(4))
    assert torch.equal(torch.export.load("plain/model.pt2").module()(x), result.module(x))
    _raises(lambda: bench_outdir("plain"), "'plain' has no timing files (bench/): it was written with --no-speed or by "
                                           "an older surgeon; run surgeon optimize again")


# --- failures inside the pipeline: one line naming the stage, the pass, the module ----------------------

def test_internal_failures_name_stage_pass_and_module(mlp: tuple[nn.Module, tuple[torch.Tensor]],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug inside a stage (here injected) escapes as a PipelineError (a SurgeonError, exit code 1) naming
    where it happened, the original exception chained as the cause (what --debug shows)."""
    from surgeon.errors import PipelineError
    from surgeon.passes.linear_quant import LinearQuant, QuantLinear

    model, inputs = mlp
    calib = [(torch.randn(4, 8),) for _ in range(3)]

    def broken_fit(self: Any, gm: Any, ctx: Any, batches: Any) -> None:
        gm.get_submodule(next(n for n, m in gm.named_modules() if isinstance(m, QuantLinear)))(torch.randn(3, 3))

    monkeypatch.setattr(LinearQuant, "fit", broken_fit)
    exc = _raises(lambda: surgeon.optimize(model, inputs, calib, passes="linear-quant"),
                  "internal error in stage 'fit', pass 'linear-quant', module 'surgeon_linear_quant_0': "
                  "RuntimeError: mat1 and mat2 shapes cannot be multiplied (3x3 and 8x8)", PipelineError)
    assert exc.exit_code == 1 and isinstance(exc.__cause__, RuntimeError)
    monkeypatch.undo()

    def broken_call(self: Any, gm: Any, ctx: Any) -> Any:
        raise KeyError("no such node")

    monkeypatch.setattr(LinearQuant, "call", broken_call)
    _raises(lambda: surgeon.optimize(model, inputs, calib, passes="linear-quant"),
            "internal error in stage 'passes', pass 'linear-quant' (passes run before it: none): KeyError: 'no such node'",
            PipelineError)


def test_internal_failure_in_save_is_one_line(result: surgeon.Result, workdir: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from surgeon import targets  # type: ignore[attr-defined]
    from surgeon.errors import PipelineError

    def broken_write(*a: Any, **k: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(targets, "write_target", broken_write)
    _raises(lambda: result.save("out", target="onnx", speed=False),
            "internal error in stage 'save: target onnx': OSError: [Errno 28] No space left on device", PipelineError)
    assert not (workdir / "out").exists() and not list(workdir.glob("out.partial-*"))


def test_cli_prints_an_internal_failure_on_one_line(workdir: Path, capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from surgeon import cli
    from surgeon.passes.linear_quant import LinearQuant

    def broken_call(self: Any, gm: Any, ctx: Any) -> Any:
        raise KeyError("no such node")

    monkeypatch.setattr(LinearQuant, "call", broken_call)
    assert cli.main(["optimize", "errfac:mlp", "-o", "out", "--passes", "linear-quant", "--no-speed"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if not line.startswith("surgeon: warning: ")] == [
        "surgeon: internal error in stage 'passes', pass 'linear-quant' (passes run before it: none): KeyError: "
        "'no such node' (rerun with --debug for the traceback)"]
    assert not (workdir / "out").exists()


class _BatchFixed(nn.Module):
    """A model whose own code fixes the batch at 4: its capture refuses any other batch size."""

    def __init__(self) -> None:
        super().__init__()
        from tests._models import TinyTransformer

        self.m = TinyTransformer(layers=1, dim=16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.m(ids.reshape(4, ids.shape[1]))


def test_calibration_and_norm_gate_run_a_batch_fixed_capture_at_its_batch() -> None:
    """Calibration and norm-gate's fit run the captured graph on the fit batches as given (each
    signature checked against the capture by prepare_batches), never on batches of another size they
    make up; so a capture that fixed the batch works with batches of that size (sequence lengths still
    vary), and a batch of another size is refused in one line before any work. (flow-inverse, the
    one pass that makes minibatches of its own, is tests/test_thirdparty_flows_pipeline.py.)"""
    torch.manual_seed(0)
    model = _BatchFixed().eval()
    g = torch.Generator().manual_seed(1)
    example = (torch.randint(0, 50, (4, 7), generator=g),)
    cap = surgeon.capture(model, example)
    with pytest.raises(Exception, match="Guard failed"):
        cap.gm(torch.randint(0, 50, (2, 7)))
    calib = [(torch.randint(0, 50, (4, n), generator=g),) for n in (5, 9, 6)]
    result = surgeon.optimize(model, example, calib, passes="attention-fp8,norm-gate{steps=20}")
    assert result.report["calibration"]["calibrate"]["calibrated"] > 0
    assert {s["id"].split(":")[0] for s in result.report["sites"] if s["status"] == "applied"} == {"attention",
                                                                                                  "norm_residual"}
    assert result.met
    _raises(lambda: surgeon.optimize(model, example, calib[:2] + [(torch.randint(0, 50, (2, 7)),)],
                                     passes="attention-fp8,norm-gate{steps=20}"),
            "calibration batch 3 does not match the model's inputs: AssertionError: Guard failed: …")
