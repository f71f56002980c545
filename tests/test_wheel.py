"""The built wheel installs passes/ and targets/ inside surgeon, and imports on its own.

The repo keeps ``passes/`` and ``targets/`` at the top level while the distribution must ship them as
``surgeon.passes`` / ``surgeon.targets`` (pyproject ``package-dir``). An editable install hides mistakes
there, so this builds the real wheel from a copy of the tree (no build/ or egg-info left in the repo) and
imports it in a fresh interpreter that cannot see the editable install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Top-level things a wheel build never needs: VCS, environments, caches, previous build outputs.
_SKIP = shutil.ignore_patterns(".git", ".venv", "venv", "__pycache__", "*.pyc", ".pytest_cache", ".hypothesis",
                               "build", "dist", "out", "*.egg-info", ".stamp-*")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("build")
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    shutil.copytree(ROOT, src, ignore=_SKIP, symlinks=True)
    # --skip-dependency-check: setuptools >= 70.1 builds wheels itself; the "wheel" named in
    # build-system.requires is only needed by older setuptools (and is absent from the venv).
    cmd = [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--skip-dependency-check",
           "-o", str(base / "dist"), str(src)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=base)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (base / "build.log").write_text(done.stdout + done.stderr)
    (whl,) = (base / "dist").glob("surgeon-*.whl")
    return whl


def test_build_prints_no_packaging_warning(wheel: Path) -> None:
    """Every importable folder of surgeon/ is in pyproject's ``packages`` (surgeon/data included: setuptools
    warned 'Package would be ignored' on every install)."""
    log = (wheel.parents[1] / "build.log").read_text()
    assert "absent from the `packages` configuration" not in log and "Package would be ignored" not in log, log[-3000:]


def _sources(folder: Path, prefix: str) -> set[str]:
    return {f"{prefix}/{p.relative_to(folder).as_posix()}" for p in folder.rglob("*.py")
            if "__pycache__" not in p.parts}


def test_wheel_ships_passes_and_targets_inside_surgeon(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("surgeon/__init__.py", "surgeon/load.py", "surgeon/passes/__init__.py",
                     "surgeon/targets/__init__.py", "surgeon/analysis/__init__.py", "surgeon/py.typed"):
        assert required in names
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {"surgeon", wheel.name.split("-py3")[0] + ".dist-info"}, tops
    # Every module of the three source folders is in the wheel (a new subpackage missing from
    # pyproject's package list would otherwise only fail for users).
    expected = (_sources(ROOT / "surgeon", "surgeon") | _sources(ROOT / "passes", "surgeon/passes")
                | _sources(ROOT / "targets", "surgeon/targets"))
    expected |= {f"surgeon/data/{p.name}" for p in (ROOT / "surgeon" / "data").glob("*.txt")}  # package data
    assert expected - names == set()
    entry_points = zipfile.ZipFile(wheel).read(f"{wheel.name.split('-py3')[0]}.dist-info/entry_points.txt")
    assert b"surgeon = surgeon.cli:main" in entry_points


def test_unpacked_wheel_imports_without_the_editable_install(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    # -S skips site-packages and their .pth files, so the editable finder never loads; the venv's
    # site-packages is then appended by hand (for torch), after the unpacked wheel on PYTHONPATH.
    site_dirs = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    code = (
        "import sys, importlib.util\n"
        f"sys.path.extend({site_dirs!r})\n"
        "import surgeon, surgeon.passes, surgeon.targets, surgeon.analysis\n"
        "from surgeon.load import load_model\n"
        "print(surgeon.__file__)\n"
        "print(surgeon.passes.__file__)\n"
        "print(importlib.util.find_spec('passes'), importlib.util.find_spec('targets'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env["PYTHONPATH"] = str(target)
    done = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    init, passes_init, specs = done.stdout.strip().splitlines()
    assert Path(init) == target / "surgeon" / "__init__.py"
    assert Path(passes_init) == target / "surgeon" / "passes" / "__init__.py"
    assert specs == "None None"
