"""The bad-input catalogue (docs/errors.md): every class gives one line, its exit code, no traceback and
no partial files.

Each case runs the real CLI (``surgeon.cli.main``; a few in a subprocess, which proves nothing else —
a library log, a traceback — reaches stderr) in a fresh working directory holding a tiny factory
model, and compares every file in that directory (by SHA-256) before and after: only the exit-3 case
(tolerance not met) may add files, and then exactly a complete OUTDIR.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from surgeon import cli

ROOT = Path(__file__).resolve().parents[1]

FACTORY = '''
import torch
from torch import nn
from tests._models import TinyTransformer

def make():
    torch.manual_seed(0)
    return TinyTransformer(layers=1, dim=16).eval(), (torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1)),)

def boom():
    raise RuntimeError("weights not found")

def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval(), (torch.randn(2, 8),)

def wrong_shape():
    return nn.Linear(4, 3), (torch.randn(2, 5),)

def ansi():
    # as torch's ONNX ConversionError colours its text for a terminal
    raise RuntimeError("\\x1b[1;31mConversionError\\x1b[0m: cannot convert \\x1b[4maten::foo\\x1b[24m")
'''


class _WritesFile:
    """A pickle payload whose unpickling creates a file (stands in for arbitrary code)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def _tokens(n: int, shape: tuple[int, int] = (4, 9), seed: int = 3) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 50, shape, generator=g),) for _ in range(n)]


def _pt2(path: Path) -> None:
    model = torch.nn.Linear(4, 3)
    torch.export.save(torch.export.export(model, (torch.randn(2, 4),)), str(path))


def _evil_pt2(path: Path, marker: Path) -> None:
    """A valid .pt2 whose example-inputs pickle creates ``marker`` when fully unpickled."""
    _pt2(path.with_name("clean.pt2"))
    payload = io.BytesIO()
    torch.save(_WritesFile(str(marker)), payload)
    with zipfile.ZipFile(path.with_name("clean.pt2")) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, payload.getvalue() if "sample_inputs" in info.filename else data)
    path.with_name("clean.pt2").unlink()


@dataclass
class Case:
    id: str
    argv: list[str]
    message: str  # the whole line after "surgeon: error: ", or its stable prefix when it ends with "…"
    code: int = 2
    setup: Callable[[Path], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    subprocess: bool = False
    writes: tuple[str, ...] = ()  # files the command may add (exit 3 only)
    marker: bool = False  # a file that would appear if code from an input ran


def _setup_calib(kind: str) -> Callable[[Path], None]:
    def setup(d: Path) -> None:
        if kind == "empty":
            torch.save([], d / "calib.pt")
        elif kind == "nan":
            batches = [(torch.randn(4, 8),), (torch.randn(4, 8),)]
            batches[1][0][2, 3] = float("inf")
            torch.save(batches, d / "calib.pt")
        elif kind == "shape":
            torch.save([(torch.randint(0, 50, (4,)),)], d / "calib.pt")
        elif kind == "dtype":
            torch.save([(torch.rand(4, 9),)], d / "calib.pt")
        elif kind == "garbage":
            (d / "calib.pt").write_bytes(b"\x00not a torch file")
        else:
            torch.save(_tokens(4), d / "calib.pt")
    return setup


def _hf_without_weights(d: Path) -> None:
    (d / "hf").mkdir()
    (d / "hf" / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))


def _hf_classifier(d: Path, *, drop: str | None = None, labels: int | None = None, architectures: bool = True) -> None:
    """A tiny BertForSequenceClassification directory 'hf' (2 labels), without the weight ``drop``,
    with ``labels`` labels in its config, or without the config's architectures."""
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32)
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bar is not the command's stderr
        transformers.BertForSequenceClassification(cfg).save_pretrained(d / "hf")
    if drop:
        state = load_file(d / "hf" / "model.safetensors")
        del state[drop]
        save_file(state, d / "hf" / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((d / "hf" / "config.json").read_text())
    if labels:
        config["id2label"] = {str(i): f"L{i}" for i in range(labels)}
        config["label2id"] = {f"L{i}": i for i in range(labels)}
    if not architectures:
        del config["architectures"]
    (d / "hf" / "config.json").write_text(json.dumps(config))


def _outdir_exists(d: Path) -> None:
    _setup_calib("ok")(d)
    (d / "out").mkdir()
    (d / "out" / "mine.txt").write_text("precious")


def _outdir_parent_is_file(d: Path) -> None:
    _setup_calib("ok")(d)
    (d / "plain.txt").write_text("a file, not a directory")


def _truncated_pt2(d: Path) -> None:
    _pt2(d / "m.pt2")
    data = (d / "m.pt2").read_bytes()
    (d / "m.pt2").unlink()
    (d / "bad.pt2").write_bytes(data[: len(data) // 2])


def _damaged_pt2(d: Path) -> None:
    """A complete .pt2 with 4 KB of its first weight zeroed: still a valid zip, but that entry fails its CRC."""
    model = torch.nn.Linear(64, 64)  # a 16 KB weight
    torch.export.save(torch.export.export(model, (torch.randn(2, 64),)), str(d / "m.pt2"))
    with zipfile.ZipFile(d / "m.pt2") as archive:
        info = archive.getinfo("m/data/weights/weight_0")
    data = bytearray((d / "m.pt2").read_bytes())
    head = info.header_offset
    start = head + 30 + int.from_bytes(data[head + 26:head + 28], "little") + int.from_bytes(data[head + 28:head + 30], "little")
    assert info.compress_type == zipfile.ZIP_STORED and info.file_size >= 8192
    data[start + 4096:start + 8192] = bytes(4096)
    (d / "m.pt2").write_bytes(bytes(data))


OPT = ["optimize", "errfac:make", "-o", "out", "--calib", "calib.pt"]

CASES = [
    Case("missing-path", ["analyze", "missing.pt2"], "model path 'missing.pt2' does not exist", subprocess=True),
    Case("missing-path-export", ["export", "no/such/dir", "-o", "out"], "model path 'no/such/dir' does not exist"),
    Case("unknown-format", ["analyze", "model.xyz"],
         "unknown model format 'model.xyz': expected a .pt2 file, a Hugging Face model directory, "
         "package.module:factory, or a pickle (.pt/.pth/.pkl/.bin)",
         setup=lambda d: (d / "model.xyz").write_bytes(b"???")),
    Case("onnx-input", ["export", "model.onnx", "-o", "out"],
         "unknown model format 'model.onnx': an ONNX file is already an export, and surgeon rewrites PyTorch "
         "models; give the .pt2 file, Hugging Face model directory or package.module:factory it was exported from",
         setup=lambda d: (d / "model.onnx").write_bytes(b"\x08\x0a")),
    Case("corrupt-pt2", ["optimize", "bad.pt2", "-o", "out"],
         "could not read .pt2 file 'bad.pt2': BadZipFile: File is not a zip file", setup=_truncated_pt2),
    Case("damaged-pt2", ["optimize", "m.pt2", "-o", "out"],
         "could not read .pt2 file 'm.pt2': the archive is corrupt (CRC check failed for 'm/data/weights/weight_0')",
         setup=_damaged_pt2),
    Case("pt2-runs-code", ["analyze", "evil.pt2"],
         "refusing to load .pt2 file 'evil.pt2': it holds pickled objects beyond tensors (loading them would run "
         "code from the file); re-export it with torch.export.save from plain tensors",
         setup=lambda d: _evil_pt2(d / "evil.pt2", d / "pwned"), marker=True, subprocess=True),
    Case("pickle-refused", ["optimize", "model.pt", "-o", "out"],
         "refusing to load pickle 'model.pt': unpickling can run arbitrary code; pass --trust-pickle only if you "
         "trust its source, or save the model with torch.export.save (.pt2)",
         setup=lambda d: torch.save(_WritesFile(str(d / "pwned")), d / "model.pt"), marker=True),
    Case("hf-missing-weights", ["analyze", "hf"],
         "Hugging Face model directory 'hf' has no weights: expected model.safetensors (or pytorch_model.bin)",
         setup=_hf_without_weights),
    Case("hf-missing-head-weight", ["optimize", "hf", "-o", "out"],
         "Hugging Face model directory 'hf' does not hold the weights its class BertForSequenceClassification needs: "
         "missing classifier.weight (they would be initialised at random); give the full checkpoint, or --task "
         "feature-extraction to load without the head",
         setup=lambda d: _hf_classifier(d, drop="classifier.weight"), subprocess=True),  # no transformers report
    Case("hf-mismatched-weights", ["analyze", "hf"],
         "Hugging Face model directory 'hf' does not hold the weights its class BertForSequenceClassification needs: "
         "mismatched classifier.weight (checkpoint 2x32, model 5x32), classifier.bias (checkpoint 2, model 5) (they "
         "would be initialised at random); make config.json match the checkpoint, or --task feature-extraction to "
         "load without the head", setup=lambda d: _hf_classifier(d, labels=5)),
    Case("hf-unexpected-weights", ["export", "hf", "-o", "out"],
         "Hugging Face model directory 'hf' holds weights its class BertModel does not use: unexpected "
         "classifier.bias, classifier.weight (they would be dropped); name the class that uses them in config.json's "
         "architectures, or give --task to drop them on purpose",
         setup=lambda d: _hf_classifier(d, architectures=False)),
    Case("unknown-task", ["analyze", "errfac:make", "--task", "sentiment"],
         "unknown task 'sentiment' (known: feature-extraction, fill-mask, text-classification, token-classification, "
         "question-answering, multiple-choice, image-classification, audio-classification, sentence-similarity)"),
    Case("factory-raises", ["optimize", "errfac:boom", "-o", "out"],
         "factory 'errfac:boom' raised RuntimeError: weights not found"),
    Case("factory-raises-colour", ["optimize", "errfac:ansi", "-o", "out"],
         "factory 'errfac:ansi' raised RuntimeError: ConversionError: cannot convert aten::foo"),
    Case("factory-missing", ["analyze", "errfac_nope:make"],
         "cannot import module 'errfac_nope' of factory 'errfac_nope:make': ModuleNotFoundError: No module named "
         "'errfac_nope'"),
    Case("model-rejects-its-inputs", ["export", "errfac:wrong_shape", "-o", "out"],
         "the model of factory 'errfac:wrong_shape' fails on its example inputs (arg0[2x5] float32): RuntimeError: "
         "mat1 and mat2 shapes cannot be multiplied (2x5 and 4x3)"),
    Case("calib-shape", OPT, "calibration batch 1 does not match the model's inputs: input 'arg0' has 1 dimension(s), "
                             "expected 2", setup=_setup_calib("shape")),
    Case("calib-dtype", OPT, "calibration batch 1 does not match the model's inputs: input 'arg0' has dtype float32, "
                             "expected int64", setup=_setup_calib("dtype")),
    Case("calib-empty", OPT, "calibration file 'calib.pt' is empty", setup=_setup_calib("empty")),
    Case("calib-nan", ["optimize", "errfac:mlp", "-o", "out", "--calib", "calib.pt", "--passes", "linear-quant"],
         "calibration data contains NaN/Inf (batch 2, input 'arg0')", setup=_setup_calib("nan")),
    Case("calib-unreadable", OPT, "cannot read calibration file 'calib.pt': not a torch.save file of input tuples …",
         setup=_setup_calib("garbage")),
    Case("calib-missing", OPT, "cannot read calibration file 'calib.pt': no such file"),
    Case("unknown-pass", OPT + ["--passes", "attn-fp8"], "unknown pass 'attn-fp8' (known: …",
         setup=_setup_calib("ok")),
    Case("unknown-option", OPT + ["--passes", "attention-fp8{bits=8}"],
         "unknown option 'bits' for pass 'attention-fp8' (options: …", setup=_setup_calib("ok")),
    Case("pipeline-syntax", OPT + ["--passes", "linear-quant{dtype=int8"],
         "cannot parse pass pipeline at the end (character 24): '}' expected to close the options of 'linear-quant' "
         "opened at character 13: 'linear-quant{dtype=int8▸'", setup=_setup_calib("ok")),
    Case("option-value", OPT + ["--passes", "linear-quant{dtype=int2}"],
         "option linear-quant.dtype=int2 is not one of fp8, int8, int4, int8w", setup=_setup_calib("ok")),
    Case("option-out-of-range", OPT + ["--passes", "attention-fp8{p_bits=3}"],
         "pass 'attention-fp8': p_bits must be 8 (FP8 P) or 1 (binary P fitted per head), got 3",
         setup=_setup_calib("ok")),
    Case("tolerance-out-of-range", OPT + ["--tolerance", "1.5"], "tolerance cosine_mean=1.5 is not a cosine in [-1, 1]",
         setup=_setup_calib("ok")),
    Case("unknown-target", ["export", "errfac:make", "-o", "out", "--target", "tflite"],
         "unknown target 'tflite' (known: torch, onnx, onnx-fp8, onnx-int8, onnx-int8-vnni, onnx-decoder, onnx-seq2seq, openvino-int8)"),
    Case("export-needs-pipeline", ["export", "errfac:make", "-o", "out", "--target", "onnx-int8"],
         "surgeon export writes the model unchanged; target onnx-int8 needs the verified pipeline: "
         "surgeon optimize MODEL --target onnx-int8 --calib FILE -o OUTDIR"),
    Case("outdir-exists", OPT, "output directory 'out' already exists (use --force to replace it)",
         setup=_outdir_exists),
    Case("outdir-not-writable", OPT[:3] + ["plain.txt/out"] + OPT[4:],
         "cannot write output directory 'plain.txt/out': '{tmp}/plain.txt' is not a directory",
         setup=_outdir_parent_is_file),
    # /proc refuses new entries even to root: the probe (a directory really made there) is what catches it
    Case("outdir-under-proc", OPT[:3] + ["/proc/out"] + OPT[4:],
         "cannot write output directory '/proc/out': '/proc' is not writable (…", setup=_setup_calib("ok")),
    Case("memory", OPT, "would not fit in memory: estimated peak …", code=4, setup=_setup_calib("ok"),
         env={"SURGEON_MEMORY_LIMIT": "64K"}, subprocess=True),
    Case("memory-limit-value", OPT, "SURGEON_MEMORY_LIMIT='lots' is not a size (bytes, or a number with K, M, G or T)",
         setup=_setup_calib("ok"), env={"SURGEON_MEMORY_LIMIT": "lots"}),
    Case("tolerance-not-met", OPT + ["--passes", "norm-fold", "--target", "onnx", "--tolerance", "max_rel_err=0"],
         "tolerance not met (max_rel_err ≤ 0): best model kept …", code=3, setup=_setup_calib("ok"),
         # the onnx target writes its file, its README.md and the timing files beside model.pt2
         writes=("out/model.pt2", "out/report.html", "out/report.json", "out/model.onnx", "out/README.md", "out/bench",
                 "out/bench/original.onnx", "out/bench/inputs.pt")),
]


def _snapshot(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(d.rglob("*")) if "__pycache__" not in p.parts}


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "errfac.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    sys.modules.pop("errfac", None)


def _run(case: Case, d: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    if case.subprocess:
        env = {**os.environ, **case.env, "PYTHONPATH": os.pathsep.join([str(d), str(ROOT)])}
        proc = subprocess.run([sys.executable, "-m", "surgeon", *case.argv], cwd=d, env=env, capture_output=True,
                              text=True, timeout=120, check=False)
        return proc.returncode, proc.stderr
    for k, v in case.env.items():
        monkeypatch.setenv(k, v)
    code = cli.main(case.argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, workdir: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    if case.setup:
        case.setup(workdir)
    before = _snapshot(workdir)
    code, err = _run(case, workdir, capsys, monkeypatch)
    assert code == case.code, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if not line.startswith("surgeon: warning: ")]
    assert len(errors) == 1, err  # one line, and nothing but surgeon's own lines
    expected = "surgeon: error: " + case.message.replace("{tmp}", str(workdir.resolve()))
    if expected.endswith("…"):
        assert errors[0].startswith(expected[:-1]), errors[0]
    else:
        assert errors[0] == expected
    after = _snapshot(workdir)
    added = set(case.writes) | ({"out"} if case.writes else set())
    assert {k: v for k, v in after.items() if k not in added} == before  # nothing else written, inputs unchanged
    assert not [p for p in workdir.iterdir() if ".partial-" in p.name or ".old-" in p.name or ".probe-" in p.name]
    if case.writes:
        assert set(case.writes) <= set(after)
        assert json.loads((workdir / "out" / "report.json").read_text())["tolerance"]["met"] is False
    if case.marker:
        assert not (workdir / "pwned").exists()


def test_no_terminal_codes_in_messages() -> None:
    """ANSI colour/cursor sequences in a quoted exception never reach the one-line message."""
    from surgeon.errors import PipelineError, SurgeonError, first_line, strip_ansi

    coloured = "\x1b[1;31mConversionError\x1b[0m: op \x1b[4maten::foo\x1b[24m\x1b[K is not supported\x1b[0m"
    assert strip_ansi(coloured) == "ConversionError: op aten::foo is not supported"
    assert first_line(RuntimeError(coloured + "\nsecond line")) == "RuntimeError: ConversionError: op aten::foo is not supported"
    assert str(SurgeonError(f"cannot export to ONNX: {coloured}")) == (
        "cannot export to ONNX: ConversionError: op aten::foo is not supported")
    assert "\x1b" not in str(PipelineError(coloured))


def test_debug_shows_the_traceback(workdir: Path) -> None:
    with pytest.raises(Exception, match="model path 'missing.pt2' does not exist"):
        cli.main(["--debug", "analyze", "missing.pt2"])


def _without_dac(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run the CLI as root without the capabilities that bypass file modes (so chmod 000 means it)."""
    return subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search", sys.executable, "-m",
                           "surgeon", *argv], cwd=cwd, capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), str(ROOT)])})


@pytest.mark.skipif(not hasattr(os, "geteuid"), reason="POSIX file modes")
def test_unreadable_model_and_read_only_outdir(workdir: Path, capsys: pytest.CaptureFixture) -> None:
    """File modes that deny reading the model / writing OUTDIR's parent: one line, exit 2, nothing written."""
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("root ignores file modes and setpriv is not available to drop that")
    _pt2(workdir / "m.pt2")
    (workdir / "ro").mkdir()
    os.chmod(workdir / "m.pt2", 0)
    os.chmod(workdir / "ro", 0o555)
    try:
        before = _snapshot(workdir) if os.geteuid() == 0 else None
        for argv, message in (
            (["analyze", "m.pt2"], ("surgeon: error: could not read .pt2 file 'm.pt2': PermissionError: [Errno 13] "
                                    "Permission denied: 'm.pt2'")),
            (["optimize", "errfac:make", "-o", "ro/out"],
             (f"surgeon: error: cannot write output directory 'ro/out': '{workdir.resolve() / 'ro'}' is not writable "
              "(Permission denied)")),
        ):
            if os.geteuid() == 0:
                proc = _without_dac(argv, workdir)
                code, err = proc.returncode, proc.stderr
            else:
                code, err = cli.main(argv), capsys.readouterr().err
            assert code == 2 and err.splitlines() == [message], err
        assert os.listdir(workdir / "ro") == []
        if before is not None:
            assert _snapshot(workdir) == before
    finally:
        os.chmod(workdir / "m.pt2", 0o644)
        os.chmod(workdir / "ro", 0o755)


@pytest.fixture
def tmpfs(workdir: Path) -> Path:
    """``workdir/mnt``, a fresh tmpfs mount (root with mount rights only); unmounted afterwards."""
    mnt = workdir / "mnt"
    mnt.mkdir()
    if shutil.which("mount") is None or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "surgeon-test",
                                                        str(mnt)], capture_output=True, check=False).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root and mount rights)")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def _refused_before_work(argv: list[str], message: str, workdir: Path, capsys: pytest.CaptureFixture,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    def must_not_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded: the OUTDIR check came after the work")

    monkeypatch.setattr(importlib.import_module("surgeon.load"), "load_model", must_not_load)
    before = _snapshot(workdir)
    code = cli.main(argv)
    assert (code, capsys.readouterr().err.splitlines()) == (2, [f"surgeon: error: {message}"])
    assert _snapshot(workdir) == before


def test_outdir_on_a_read_only_mount(tmpfs: Path, workdir: Path, capsys: pytest.CaptureFixture,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only file system refuses OUTDIR before any work, even for root (file modes do not)."""
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    _refused_before_work(["optimize", "errfac:mlp", "-o", "mnt/out"],
                         f"cannot write output directory 'mnt/out': '{tmpfs.resolve()}' is not writable "
                         "(Read-only file system)", workdir, capsys, monkeypatch)


@pytest.mark.parametrize("command", ["optimize", "export"])
def test_outdir_that_is_a_mount_point(command: str, tmpfs: Path, workdir: Path, capsys: pytest.CaptureFixture,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """--force on a mount point (a container volume) cannot replace it (rename gives EBUSY after all the
    work, exit 1): refused first; a directory inside the mount is fine."""
    _refused_before_work([command, "errfac:mlp", "-o", "mnt", "--force", "--target", "torch"],
                         "cannot replace output directory 'mnt': it is a mount point, and --force replaces OUTDIR "
                         "as a whole; give a directory inside it (e.g. 'mnt/out')", workdir, capsys, monkeypatch)
    monkeypatch.undo()
    monkeypatch.chdir(workdir)
    monkeypatch.syspath_prepend(str(workdir))
    assert cli.main([command, "errfac:mlp", "-o", "mnt/out", "--force", "--target", "torch", "--no-speed"]
                    if command == "optimize" else [command, "errfac:mlp", "-o", "mnt/out", "--target", "torch"]) == 0
    assert (tmpfs / "out" / "model.pt2").is_file()


def test_python_api_refuses_a_run_that_would_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    # The memory check lives in surgeon.optimize, so pipelines calling the API get it too (not only
    # the CLI), and a generator of batches is read once for both the estimate and the run.
    import surgeon
    from surgeon.errors import InsufficientMemory
    from tests._models import TinyTransformer

    torch.manual_seed(0)
    model = TinyTransformer(layers=1, dim=16).eval()
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    monkeypatch.setenv("SURGEON_MEMORY_LIMIT", "64K")
    with pytest.raises(InsufficientMemory, match=r"^would not fit in memory: estimated peak .* exceeds the 64.0 KB "
                                                 r"available \(SURGEON_MEMORY_LIMIT\); "):
        surgeon.optimize(model, (ids,), ((ids,) for _ in range(3)), passes="norm-fold")
    monkeypatch.delenv("SURGEON_MEMORY_LIMIT")
    result = surgeon.optimize(model, (ids,), ((ids,) for _ in range(3)), passes="norm-fold")
    assert result.report["calibration"]["batches"]["fit"] + result.report["calibration"]["batches"]["check"] == 3
