"""`surgeon analyze`: output formats and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from surgeon.cli import main
from tests._models import TinyTransformer


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def factory(tmp_path, monkeypatch):
    (tmp_path / "tiny_factory.py").write_text(textwrap.dedent("""
        import torch
        from tests._models import TinyTransformer, AffineCoupling, ManualAttention

        def transformer():
            torch.manual_seed(0)
            return TinyTransformer(2, placement="pre"), (torch.randint(0, 50, (2, 7)),)

        def flow():
            return AffineCoupling(two_sided=True), (torch.randn(3, 8),)

        def wrong():
            return "not a model"

        class Uncapturable(torch.nn.Module):
            def forward(self, x):
                if x.sum() > 0:          # data-dependent control flow: export and fx both fail
                    return x * 2
                return torch.nonzero(x).float().sum() * x

        def uncapturable():
            return Uncapturable(), (torch.randn(2, 3),)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return "tiny_factory"


def test_json_is_analysis_to_json(capsys, factory):
    code, out, _ = _run(capsys, "analyze", f"{factory}:transformer", "--json")
    assert code == 0
    data = json.loads(out)
    assert set(data) == {"capture", "sites", "counts"}
    assert data["counts"] == {"attention": 2, "norm_residual": 4, "coupling": 0}
    assert all({"kind", "module", "variant"} <= set(s) for s in data["sites"])


def test_table_and_explain(capsys, factory):
    code, out, _ = _run(capsys, "analyze", f"{factory}:flow", "--explain")
    assert code == 0
    assert "coupling 2" in out and "attention 0" in out
    code, out, _ = _run(capsys, "analyze", f"{factory}:transformer", "--explain")
    assert "near-misses" in out and "final norm" in " ".join(out.split())


def test_explain_json_has_near_misses(capsys, factory):
    code, out, _ = _run(capsys, "analyze", f"{factory}:transformer", "--json", "--explain")
    data = json.loads(out)
    assert [m["module"] for m in data["near_misses"]] == ["final"]


@pytest.mark.parametrize("spec,message", [
    ("missing.pt2", "surgeon: error: model path 'missing.pt2' does not exist"),
    ("tiny_factory:nothing", "surgeon: error: module 'tiny_factory' has no attribute 'nothing' (factory 'tiny_factory:nothing')"),
])
def test_bad_input_one_line_exit_2(capsys, factory, spec, message):
    code, out, err = _run(capsys, "analyze", spec)
    assert code == 2 and out == ""
    assert err.strip() == message


def test_unknown_format_and_dir_without_config(capsys, factory, tmp_path):
    (tmp_path / "model.xyz").write_text("x")
    code, _, err = _run(capsys, "analyze", "model.xyz")
    assert code == 2 and err.startswith("surgeon: error: unknown model format 'model.xyz'") and err.count("\n") == 1
    (tmp_path / "emptydir").mkdir()
    code, _, err = _run(capsys, "analyze", "emptydir")
    assert code == 2
    assert err.strip() == "surgeon: error: directory 'emptydir' is not a Hugging Face model directory: no config.json"


def test_factory_returning_wrong_thing(capsys, factory):
    code, _, err = _run(capsys, "analyze", f"{factory}:wrong")
    assert code == 2 and err.startswith("surgeon: error: factory 'tiny_factory:wrong' must return (nn.Module, ")


def test_pickle_refused_without_trust(capsys, tmp_path, factory):
    torch.save(TinyTransformer(1), tmp_path / "model.pt")
    code, _, err = _run(capsys, "analyze", "model.pt")
    assert code == 2
    assert "unpickling can run arbitrary code" in err and "--trust-pickle" in err and err.count("\n") == 1


def test_uncapturable_model_names_the_reason(capsys, factory):
    code, _, err = _run(capsys, "analyze", f"{factory}:uncapturable")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("surgeon: error: cannot capture the model as a graph: torch.export and torch.fx both failed")
    assert "in module '<root>'" in err


def test_python_dash_m_entry_point(factory, tmp_path):
    import os
    from pathlib import Path
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{Path(__file__).parents[1]}"}
    out = subprocess.run([sys.executable, "-m", "surgeon", "analyze", f"{factory}:flow", "--json"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["counts"]["coupling"] == 2


@pytest.mark.parametrize("width", [60, 80, 200])
def test_table_never_truncates_module_paths(width, factory):
    # Deep module paths (encoder.layer.3.attention.self…) were cut to "encoder.layer.3.attenti…" at 80
    # columns: the module names the site, so it is printed whole whatever the terminal width.
    import io

    from rich.console import Console

    from surgeon._console import print_analysis
    from surgeon.analysis import analyze

    class Deep(torch.nn.Module):  # module paths as long as a Hugging Face model's
        def __init__(self):
            super().__init__()
            self.sentence_encoder_backbone = TinyTransformer(2, placement="pre")

        def forward(self, ids):
            return self.sentence_encoder_backbone(ids)

    torch.manual_seed(0)
    analysis = analyze(Deep(), (torch.randint(0, 50, (2, 7)),))
    buf = io.StringIO()
    print_analysis(analysis, explain=True, console=Console(file=buf, width=width, color_system=None))
    text = buf.getvalue()
    assert "…" not in text
    for s in analysis.sites:
        assert s.module in text
