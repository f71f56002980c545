"""docs/architecture.md's recipes hold: a new pass and a new target are one new file each.

A copy of the package's sources (surgeon/, passes/, targets/, pyproject.toml) gets the two example
modules of docs/architecture.md ("Adding a pass": ``passes/relu_clamp.py``, "Adding a target":
``targets/torchscript.py``) and nothing else. A fresh process importing that copy (laid out as
installed: ``surgeon.passes`` and ``surgeon.targets`` inside ``surgeon``) finds both, lists them,
optimizes a tiny model with the pass for the target (which writes its file), and the pass contract
test, unchanged, accepts the pass. Then the copy differs from the original by those two files.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
SOURCES = ("surgeon", "passes", "targets", "pyproject.toml")
NEW = {"passes/relu_clamp.py": "Adding a pass", "targets/torchscript.py": "Adding a target"}

SCRIPT = r"""
import io, sys
from contextlib import redirect_stdout
from pathlib import Path

import torch
from torch import nn

import surgeon
import surgeon.passes, surgeon.targets
from surgeon import cli

site = Path(sys.argv[1])
for package in (surgeon, surgeon.passes, surgeon.targets):  # the copy, not the checkout
    assert Path(package.__file__).is_relative_to(site), package.__file__
assert "relu-clamp" in surgeon.passes.registered(), surgeon.passes.registered()
assert surgeon.targets.registered()[0] == "torch" and "torchscript" in surgeon.targets.registered()
for command, name in (("passes", "relu-clamp"), ("targets", "torchscript")):
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main([command]) == 0
    assert name in out.getvalue(), out.getvalue()

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
calib = [(torch.randn(4, 8),) for _ in range(8)]
result = surgeon.optimize(model, calib[0], calib=calib, passes="relu-clamp", target="torchscript")
outdir = result.save(sys.argv[2])
assert result.report["counts"]["applied"] == 1, result.report["sites"]  # the one ReLU, kept by the guard
figures = result.report["targets"]["torchscript"]
assert figures["file"] == "model.ts" and figures["max_abs_diff"] == 0.0, figures
x = torch.randn(4, 8)
assert torch.equal(torch.jit.load(str(Path(outdir) / "model.ts"))(x), model(x))  # relu -> clamp(min=0): exact

# the contract test as it is in the checkout, run against the copy: it needs no case for the new pass
import pytest

sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", sys.argv[3], "-k", "relu-clamp"]))
"""


def _example(section: str) -> str:
    text = DOC.read_text(encoding="utf-8")
    body = re.search(rf"^## {section}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert body, f"docs/architecture.md has no '## {section}' section"
    block = re.search(r"^```python\n(.*?)^```", body.group(1), flags=re.S | re.M)
    assert block, f"the '{section}' section has no ```python block"
    return block.group(1)


def _digests(tree: Path) -> dict[str, str]:
    return {p.relative_to(tree).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(tree.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def _installed_layout(tree: Path, site: Path) -> None:
    """``site/surgeon`` as pyproject's package-dir installs it: surgeon/'s entries, passes/ and
    targets/ inside (symlinks into the copy, so the copy is what runs and what is compared)."""
    package = site / "surgeon"
    package.mkdir(parents=True)
    for entry in (tree / "surgeon").iterdir():
        (package / entry.name).symlink_to(entry)
    for name in ("passes", "targets"):
        (package / name).symlink_to(tree / name, target_is_directory=True)


def test_a_pass_and_a_target_are_one_file_each(tmp_path: Path) -> None:
    tree, site, work = tmp_path / "tree", tmp_path / "site", tmp_path / "work"
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, tree / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, tree / name)
    before = _digests(tree)
    for path, section in NEW.items():
        assert not (tree / path).exists(), path
        (tree / path).write_text(_example(section), encoding="utf-8")
    _installed_layout(tree, site)
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1"}

    run = subprocess.run([sys.executable, "-c", SCRIPT, str(site), str(work / "out"),
                          str(ROOT / "tests" / "test_pass_contract.py")],
                         cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (work / "out" / "model.ts").is_file() and (work / "out" / "model.pt2").is_file()
    assert re.search(r"\b2 passed\b", run.stdout), run.stdout[-1000:]  # its round trip and its sites

    after = _digests(tree)
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    assert changed == sorted(NEW), changed
