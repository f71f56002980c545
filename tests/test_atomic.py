"""Atomic outputs: ``surgeon optimize`` killed with SIGKILL at random points never leaves a partial OUTDIR.

Each run is a real ``python -m surgeon optimize`` subprocess on a tiny factory transformer. Kills land
at seeded-random moments: during loading/calibration/verification (OUTDIR must not exist), and after
the save has started (its ``OUTDIR.partial-<pid>`` exists; OUTDIR must be absent or complete), both
for a fresh OUTDIR and for a ``--force`` replacement (OUTDIR must be the old or the new output, both
complete). What a killed run leaves beside OUTDIR (``OUTDIR.partial-<pid>``) is removed by the next
run writing the same OUTDIR, which the test checks too.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

FACTORY = '''
import torch
from tests._models import TinyTransformer

def make():
    torch.manual_seed(0)
    return TinyTransformer(layers=2, dim=16).eval(), (torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1)),)
'''


def _start(d: Path, *extra: str, seed: int = 0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(d), str(ROOT)])}
    return subprocess.Popen([sys.executable, "-m", "surgeon", "optimize", "fac:make", "-o", "out", "--calib", "calib.pt",
                             "--seed", str(seed), "--no-speed", *extra], cwd=d, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


def _partials(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("out.") and p.name != "out")


def _kill_after_save_starts(proc: subprocess.Popen, d: Path, delay: float) -> bool:
    """SIGKILL ``delay`` s after ``out.partial-<pid>`` appears; False if the run ended first."""
    want = f"out.partial-{proc.pid}"
    deadline = time.monotonic() + 120
    while not (d / want).exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def _complete(out: Path) -> dict:
    """OUTDIR is a whole output: every file the report lists is there, model.pt2 loads and runs."""
    import surgeon.quant  # noqa: F401 - registers the custom ops model.pt2 calls

    report = json.loads((out / "report.json").read_text())
    for name in report["outputs"].values():
        assert (out / name).is_file(), name
    assert (out / "report.html").read_text().rstrip().endswith("</html>")
    module = torch.export.load(str(out / "model.pt2")).module()
    assert module(torch.randint(0, 50, (3, 5))).shape == (3, 5, 16)
    return report


@pytest.mark.slow
def test_sigkill_never_leaves_a_partial_outdir(tmp_path: Path) -> None:
    rng = random.Random(1234)
    (tmp_path / "fac.py").write_text(FACTORY)
    g = torch.Generator().manual_seed(3)
    torch.save([(torch.randint(0, 50, (4, 9), generator=g),) for _ in range(8)], tmp_path / "calib.pt")
    out = tmp_path / "out"

    # 1. killed early (loading, capture, calibration): nothing at all.
    proc = _start(tmp_path)
    time.sleep(rng.uniform(0.5, 3.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()

    # 2. killed while saving a fresh OUTDIR: absent or complete, never partial.
    for _ in range(2):
        proc = _start(tmp_path)
        assert _kill_after_save_starts(proc, tmp_path, rng.uniform(0.0, 0.4))
        assert not out.exists() or _complete(out)
        if out.exists():
            break

    # 3. a full run (with --force, in case a killed one got through) cleans what killed runs left.
    proc = _start(tmp_path, "--force", seed=0)
    assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
    assert _partials(tmp_path) == []
    old = _complete(out)

    # 4. killed while replacing OUTDIR (--force, another seed): the old output or the new one, whole.
    outcomes = []
    for _ in range(2):
        proc = _start(tmp_path, "--force", seed=1)
        killed = _kill_after_save_starts(proc, tmp_path, rng.uniform(0.0, 0.6))
        assert out.is_dir(), "OUTDIR vanished during a --force replacement"
        report = _complete(out)
        outcomes.append(("killed" if killed else "finished", report["calibration"]["seed"]))
        if not killed:
            break
    assert old["calibration"]["seed"] == 0 and all(seed in (0, 1) for _, seed in outcomes), outcomes
    assert outcomes[0][0] == "killed", outcomes  # the save takes ~1 s: the kill lands inside it
    assert _partials(tmp_path) == [f"out.partial-{proc.pid}"]  # SIGKILL runs no cleanup: left for the next run

    # 5. the next run removes the stale OUTDIR.partial-<pid> of the killed ones.
    proc = _start(tmp_path, "--force", seed=2)
    assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
    assert _partials(tmp_path) == []
    assert _complete(out)["calibration"]["seed"] == 2
