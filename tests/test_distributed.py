"""Calibration and verification on torch.distributed (gloo, CPU): 2 ranks against 1 process.

The 2-rank jobs run ``tests/_dist_worker.py`` (the Python API inside a gloo group) or the CLI under
``torchrun``; the reference is the same worker code run in this process without a group. Scales and
kept sites must be equal; figures built from float64 sums may differ by the order of additions
(tolerance ``REL``), maxima and minima not at all.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import _dist_worker as worker  # noqa: E402

from surgeon import distributed  # noqa: E402
from surgeon.calibration import Histogram, RunningAmax  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

REL = 1e-12  # float64 sums over ≤ 11 batches added in another order
WORKER = Path(__file__).parent / "_dist_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(rank: int, world: int, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env


def _spawn(args: list[str], world: int = 2, timeout: float = worker.TIMEOUT_S) -> list[subprocess.Popen]:
    port = _free_port()
    return [subprocess.Popen([sys.executable, str(WORKER), *args], env={**_env(r, world, port),
                             "DIST_TEST_TIMEOUT": str(timeout)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for r in range(world)]


def _close(a: Any, b: Any, rel: float = 0.0) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b) or math.isinf(a) or math.isinf(b):
            return (math.isnan(a) and math.isnan(b)) or a == b
        return abs(a - b) <= rel * max(abs(a), abs(b))
    return a == b


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same optimize run with 2 gloo ranks (subprocesses) and in this process (1 rank)."""
    tmp = tmp_path_factory.mktemp("dist")
    procs = _spawn([str(tmp / "run.json"), str(tmp / "out")])
    single = worker.run(Path(""), tmp / "single")  # overlaps the subprocesses' start-up
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    ranks = [json.loads((tmp / f"run.json.rank{r}").read_text()) for r in range(2)]
    return {"single": single, "ranks": ranks, "tmp": tmp, "stderr": [e for _, e in outs]}


def test_two_ranks_equal_one_process(two_ranks: dict) -> None:
    one, (r0, r1) = two_ranks["single"], two_ranks["ranks"]
    assert r0["world_size"] == 2 and one["world_size"] == 1
    # histogram counts and maxima reduce exactly: the calibrated scales are bit-equal
    assert one["scales"] and r0["scales"] == one["scales"] == r1["scales"]
    assert r0["kept"] == one["kept"] == r1["kept"]
    assert r0["sites"] == one["sites"] == r1["sites"]
    assert set(one["sites"].values()) == {"applied", "rolled_back"}  # the rollback path was exercised
    # 11 batches of 2-3 samples: the check part grows towards 64 samples, up to half of them
    assert r0["calibrate"] == one["calibrate"] and one["calibrate"]["batches"] == 6
    assert (r0["guard_batches"], r0["guard_samples"]) == (one["guard_batches"], one["guard_samples"]) == (5, 12)
    for key in ("site_figures", "guard", "all_applied", "final"):
        assert _close(r0[key], one[key], REL), (key, r0[key], one[key])
        assert r0[key] == r1[key]  # every rank derives the very same figures
        # min cosine and max error are per-sample/per-element values, reduced without rounding
        for fig in ([r0[key]] if key != "site_figures" else [v["solo"] for v in r0[key].values()]):
            ref = one[key] if key != "site_figures" else None
            if ref is not None:
                assert fig["cosine_min"] == ref["cosine_min"] and fig["max_rel_err"] == ref["max_rel_err"]


def test_outdir_written_once_by_rank_0(two_ranks: dict) -> None:
    (r0, r1), tmp = two_ranks["ranks"], two_ranks["tmp"]
    assert r0["saves"] == [str(tmp / "out")] and r1["saves"] == []
    assert sorted(os.listdir(tmp)) == ["out", "run.json.rank0", "run.json.rank1", "single"]  # no .partial-*
    assert sorted(os.listdir(tmp / "out")) == ["bench", "model.pt2", "report.html", "report.json"]  # bench/: the timing files
    # torch's own LeafSpec deprecation (the guard deep-copies captured graphs) is not the user's to read
    assert not any("FutureWarning" in err for err in two_ranks["stderr"]), two_ranks["stderr"]
    assert json.loads((tmp / "out" / "report.json").read_text())["calibration"]["world_size"] == 2


@pytest.mark.parametrize("mode", ["die", "hang"])
def test_lost_rank_stops_the_others_with_one_line(tmp_path: Path, mode: str) -> None:
    """die: rank 1 exits (``os._exit``) inside the user metric, in the middle of verification; hang:
    rank 1 sleeps (3 × timeout) while rank 0 waits in a collective."""
    timeout = 8.0 if mode == "die" else 3.0
    procs = _spawn(["", str(tmp_path / "out"), mode], timeout=timeout)
    _, err0 = procs[0].communicate(timeout=120)
    still_sleeping = procs[1].poll() is None
    procs[1].kill()
    procs[1].communicate()
    assert procs[0].returncode == distributed.PeerLost.exit_code, err0
    lines = [ln for ln in err0.splitlines() if ln.startswith("surgeon:")]
    assert len(lines) == 1, err0
    stage = "verification" if mode == "die" else "calibration"
    assert lines[0].startswith(f"surgeon: error: rank 0 of 2: another rank stopped responding during {stage} "
                               f"(timeout {timeout:g} s): "), lines[0]
    if mode == "hang":  # rank 0 gave up after the timeout, while rank 1 still sleeps (3 × timeout)
        assert still_sleeping
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # two more subprocesses with a capture each (~10 s)
def test_bad_batch_seen_by_one_rank_stops_all_with_its_message(tmp_path: Path) -> None:
    procs = _spawn(["", str(tmp_path / "out"), "badbatch"])
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [2, 2], errs
    lines = [[ln for ln in e.splitlines() if ln.startswith("surgeon:")] for e in errs]
    assert len(lines[0]) == 1 and lines[1] == [], errs  # printed once, by rank 0, which never ran the batch
    assert lines[0][0].startswith("surgeon: error: calibration batch 4 does not match the model's inputs: "), lines
    assert not (tmp_path / "out").exists()


def test_cli_under_torchrun(tmp_path: Path) -> None:
    """``torchrun --nproc-per-node 2 -m surgeon optimize``: one summary, OUTDIR from rank 0."""
    (tmp_path / "distfactory.py").write_text(WORKER.read_text())
    torch.save(worker.batches(), tmp_path / "calib.pt")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(tmp_path), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "surgeon", "optimize", "distfactory:factory", "--calib", "calib.pt", "-o", "out",
           "--passes", "linear-quant{method=mse}", "--target", "onnx", "--dist-timeout", "60"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("surgeon optimize — sites") == 1
    assert len(re.findall(r"end to end on model\.onnx in onnxruntime-cpu \(\d+ check samples\)", done.stdout)) == 1
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert rep["calibration"]["world_size"] == 2 and rep["counts"]["applied"] == 4
    assert sorted(os.listdir(tmp_path)) == ["calib.pt", "distfactory.py", "out"]


def test_statistics_reduce_to_their_single_process_values() -> None:
    """Without a group the reductions are identities; the merge they mirror is exact (histogram)."""
    assert not distributed.active() and distributed.shard([1, 2, 3]) == [1, 2, 3]
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce(t, "max") is t
    a, h = RunningAmax(), Histogram(64)
    a.update(t), h.update(t)
    a.all_reduce(), h.all_reduce()
    assert float(a.value) == 2.0 and int(h.counts.sum()) == 2
    with pytest.raises(ValueError, match="unknown reduction 'mean'"):
        distributed.all_reduce(t, "mean")
