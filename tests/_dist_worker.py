"""One rank of the gloo jobs in tests/test_distributed.py (also the single-process reference).

``python tests/_dist_worker.py OUT.json OUTDIR [die|hang]`` with torchrun's environment (RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT) runs ``surgeon.optimize`` inside a gloo group on a tiny
attention model and writes what the run decided (scales, kept sites, figures) to ``OUT.json.rank<r>``.
``die``: rank 1 calls ``os._exit(1)`` in the middle of verification; ``hang``: rank 1 sleeps while
rank 0 waits in a collective; ``badbatch``: a batch only rank 1 runs is refused by the model.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

torch.set_num_threads(1)

PASSES = "attention-fp8{p_bits=1},linear-quant{method=mse,smooth=0.5}"
TIMEOUT_S = float(os.environ.get("DIST_TEST_TIMEOUT", "30"))


class Block(nn.Module):
    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.h = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.o = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.up, self.down = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.h, c // self.h).transpose(1, 2) for z in self.qkv(self.ln1(x)).chunk(3, -1))
        x = x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, c))
        return x + self.down(F.gelu(self.up(self.ln2(x))))


class Net(nn.Module):
    """A pre-norm attention block on [batch, seq, 16]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.Sequential(Block())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def factory() -> tuple[nn.Module, tuple]:
    return Net().eval(), (torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1)),)


def batches(n: int = 11) -> list[tuple]:
    """Batches of varying batch/sequence sizes, with a few large values (histograms must widen)."""
    g = torch.Generator().manual_seed(2)
    out = []
    for i in range(n):
        x = torch.randn(2 + i % 2, 5 + i % 3, 16, generator=g)
        x[0, 0, i % 16] *= 1.0 + i  # a growing outlier: batch order changes the histogram's range history
        out.append((x,))
    return out


def summary(result: Any) -> dict:
    from surgeon.passes.attention_fp8 import BinaryP
    from surgeon.quant import Quantizer

    scales, binary = {}, {}
    for name, m in result.module.named_modules():
        if isinstance(m, Quantizer):
            scales[name] = m.scale.reshape(-1).tolist()
        elif isinstance(m, BinaryP):
            binary[name] = [m.tau.reshape(-1).tolist(), m.s.reshape(-1).tolist()]
    rep = result.report
    return {"scales": scales, "binary": binary, "kept": result.guard.kept,
            "sites": {s["id"] if "id" in s else s.get("site", str(i)): s["status"] for i, s in enumerate(rep["sites"])},
            "site_figures": {s.record.site: {"metrics": s.metrics, "solo": s.solo.to_json()} for s in result.guard.sites},
            "guard": result.guard.end_to_end.to_json(), "all_applied": result.guard.all_applied.to_json(),
            "final": rep["end_to_end"], "calibrate": {k: v for k, v in rep["calibration"]["calibrate"].items()
                                                      if k != "seconds"},
            "guard_batches": result.guard.batches, "guard_samples": result.guard.samples,
            "world_size": rep["calibration"]["world_size"]}


def run(out_json: Path, outdir: Path, mode: str = "") -> dict:
    from surgeon import distributed
    from surgeon.optimize import Result, optimize

    distributed.init_from_env(TIMEOUT_S)
    rank = distributed.rank()
    if mode == "hang":  # rank 1 stops answering before the first collective
        if rank == 1:
            time.sleep(3 * TIMEOUT_S)
        distributed.barrier("calibration")
        raise AssertionError("the barrier returned without rank 1")
    saves: list[str] = []
    original = Result._save

    def counted(self: Any, path: Any, **kw: Any) -> Any:
        saves.append(str(path))
        return original(self, path, **kw)

    Result._save = counted  # type: ignore[method-assign]
    calls = [0]

    def metric(ref: torch.Tensor, out: torch.Tensor) -> float:
        calls[0] += 1
        if rank == 1 and calls[0] == 2 and mode == "die":
            os._exit(1)
        return float(F.cosine_similarity(ref.flatten(1), out.flatten(1)).mean())

    model, example = factory()
    data = batches()
    if mode == "badbatch":  # batch 4 is rank 1's to run (0-based 3 → 3 % 2): only rank 1 sees the model refuse it
        data[3] = (torch.randn(2, 5, 15),)
    result = optimize(model, example, data, passes=PASSES, seed=0, threads=1,
                      metric=metric if mode else None, tolerance=0.5 if mode else None)
    result.save(outdir)
    info = summary(result)
    info["saves"] = saves
    info["rank"] = rank
    if out_json.name:
        Path(f"{out_json}.rank{rank}").write_text(json.dumps(info, allow_nan=True))
    return info


if __name__ == "__main__":
    from surgeon.errors import SurgeonError

    try:
        run(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "")
    except SurgeonError as exc:  # what the CLI does with it: one line (once when all ranks agree), its exit code
        if getattr(exc, "agreed_rank", 0) == 0:
            print(f"surgeon: error: {exc}", file=sys.stderr)
        from surgeon.distributed import PeerLost, exit_after_peer_loss

        if isinstance(exc, PeerLost):
            exit_after_peer_loss(exc.exit_code)
        sys.exit(exc.exit_code)
