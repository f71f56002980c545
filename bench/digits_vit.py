"""A tiny Vision Transformer on scikit-learn's digits, to measure what ``attention-fp8`` and
``attention-int8`` cost in top-1.

The data are real (1797 handwritten 8×8 digits shipped with scikit-learn, no download): a stratified
80/20 split with a fixed seed gives 1437 training and 360 held-out images. The model cuts an image
into 2×2 patches (16 tokens + a class token), dim 48, 2 pre-norm blocks, 4 heads; it trains in a few
seconds on one CPU thread with a fixed seed.

Protocol: train in fp32 → capture → the pass on every attention site (``attention-fp8``,
``attention-fp8{p_bits=1}``, ``attention-int8``) → calibrate on training images only → top-1 on the
held-out split, compared with the fp32 model on the same split. No guard: every site stays
substituted. The integer-attention model is also exported to ONNX (surgeon's writer) and its top-1
measured in ONNX Runtime (CPU), which runs both products as ``MatMulInteger``.

    python bench/digits_vit.py                 # prints the table, fp32 / FP8 / binary-P / INT8
    python bench/digits_vit.py --seeds 0 1 2   # three seeds (three trained models and splits)
    python bench/digits_vit.py --json out.json # also writes the figures

Importable: ``load_split``, ``TinyViT``, ``train``, ``accuracy``, ``evaluate_attention_fp8`` (any
pipeline spec), ``onnxruntime_top1``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from typing import Iterator, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Attn = Literal["sdpa", "manual"]


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    # One thread: reproducible summation order (so the same accuracy on every run) and polite on a
    # shared CPU; the model is too small to gain from more.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_split(seed: int = 0, test_fraction: float = 0.2) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(x_train, y_train, x_test, y_test)``: images [N, 1, 8, 8] in [0, 1], labels int64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    i_train, i_test = train_test_split(range(len(y)), test_size=test_fraction, random_state=seed,
                                       stratify=digits.target)
    return x[i_train], y[i_train], x[i_test], y[i_test]


class Attention(nn.Module):
    """Multi-head self-attention, as SDPA or written by hand (both are ``attention`` sites)."""

    def __init__(self, dim: int, heads: int, attn: Attn) -> None:
        super().__init__()
        self.heads, self.head_dim, self.attn = heads, dim // heads, attn
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.attn == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = torch.softmax(q @ k.transpose(-2, -1) * self.head_dim ** -0.5, dim=-1) @ v
        return self.proj(o.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int, attn: Attn) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, attn)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    """ViT for 8×8 single-channel images: patch embedding, class token, pre-norm blocks, linear head."""

    def __init__(self, patch: int = 2, dim: int = 48, depth: int = 2, heads: int = 4, mlp: int = 96,
                 classes: int = 10, attn: Attn = "sdpa") -> None:
        super().__init__()
        n = (8 // patch) ** 2
        self.embed = nn.Conv2d(1, dim, kernel_size=patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp, attn) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, images: Tensor) -> Tensor:
        x = self.embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch: int = 256) -> float:
    """Top-1 accuracy in percent."""
    correct = 0
    for i in range(0, len(y), batch):
        correct += int((model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum())
    return 100.0 * correct / len(y)


def train(seed: int = 0, epochs: int = 30, attn: Attn = "sdpa", lr: float = 3e-3, batch: int = 64,
          data: tuple[Tensor, Tensor, Tensor, Tensor] | None = None) -> tuple[TinyViT, float]:
    """Train a ``TinyViT`` on the training split; return it (eval mode) and its held-out top-1 (%)."""
    x_train, y_train, x_test, y_test = data or load_split(seed)
    with _one_thread():
        torch.manual_seed(seed)
        model = TinyViT(attn=attn)
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
        steps = epochs * ((len(y_train) + batch - 1) // batch)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
        g = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(y_train), generator=g)
            for i in range(0, len(y_train), batch):
                idx = order[i:i + batch]
                loss = F.cross_entropy(model(x_train[idx]), y_train[idx], label_smoothing=0.1)
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
        return model, accuracy(model, x_test, y_test)


def evaluate_attention_fp8(model: nn.Module, x_fit: Tensor, x_test: Tensor, y_test: Tensor,
                           spec: str = "attention-fp8", calib_batch: int = 64) -> dict:
    """Capture ``model``, apply the pipeline ``spec``, calibrate on ``x_fit``, measure held-out top-1."""
    from surgeon.calibration import calibrate
    from surgeon.capture import capture
    from surgeon.pass_manager import PassManager

    with _one_thread():
        cap = capture(model, (x_fit[:calib_batch],))
        gm, ctx, diags = PassManager(spec).run(cap.gm)
        batches = [(x_fit[i:i + calib_batch],) for i in range(0, len(x_fit), calib_batch)]
        start = time.perf_counter()
        calibrate(gm, batches, progress=False)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            acc = accuracy(gm, x_test, y_test)
            ref = model(x_test)
            agree = float((gm(x_test).argmax(-1) == ref.argmax(-1)).float().mean()) * 100.0
    return {"spec": spec, "top1": acc, "agreement_with_fp32": agree, "sites": len(ctx.records),
            "applied": sum(d.status == "applied" for d in diags), "calibration_seconds": round(seconds, 3),
            "model": gm}


def onnxruntime_top1(gm: nn.Module, x_test: Tensor, y_test: Tensor, batch: int = 256) -> float:
    """Top-1 (%) of ``gm`` exported by surgeon's ONNX writer and run in ONNX Runtime's CPU provider."""
    import tempfile
    from pathlib import Path

    import numpy as np

    from surgeon.targets.onnx import export_onnx, session

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(gm, (x_test[:batch],), Path(tmp) / "model.onnx")
        sess = session(path, threads=1)
        name = sess.get_inputs()[0].name
        correct = 0
        for i in range(0, len(y_test), batch):
            logits = sess.run(None, {name: x_test[i:i + batch].numpy()})[0]
            correct += int((np.argmax(logits, -1) == y_test[i:i + batch].numpy()).sum())
    return 100.0 * correct / len(y_test)


SPECS = ("attention-fp8", "attention-fp8{p_bits=1}", "attention-int8")


def run_seed(seed: int, epochs: int, attn: Attn) -> dict:
    data = load_split(seed)
    x_train, _, x_test, y_test = data
    start = time.perf_counter()
    model, fp32 = train(seed, epochs, attn, data=data)
    train_s = time.perf_counter() - start
    rows: dict = {"fp32": {"top1": fp32, "train_seconds": round(train_s, 2)}}
    print(f"digits ViT ({attn} attention), seed {seed}: {len(x_train)} train / {len(y_test)} held-out images")
    print(f"  fp32                          top-1 {fp32:6.2f} %   (trained in {train_s:.1f} s)")
    for spec in SPECS:
        r = evaluate_attention_fp8(model, x_train, x_test, y_test, spec)
        gm = r.pop("model")
        r["drop_points"] = round(fp32 - r["top1"], 2)
        line = (f"  {spec:<29} top-1 {r['top1']:6.2f} %   drop {r['drop_points']:+.2f} points, "
                f"agrees with fp32 on {r['agreement_with_fp32']:.1f} % ({r['applied']} sites)")
        if spec == "attention-int8":
            r["top1_onnxruntime"] = onnxruntime_top1(gm, x_test, y_test)
            line += f"; in ONNX Runtime {r['top1_onnxruntime']:.2f} %"
        rows[spec] = r
        print(line)
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", help="several seeds (overrides --seed)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--attn", choices=["sdpa", "manual"], default="sdpa")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args(argv)

    seeds = args.seeds or [args.seed]
    start = time.perf_counter()
    runs = {}
    for i, seed in enumerate(seeds):
        if i:
            print()
        runs[seed] = run_seed(seed, args.epochs, args.attn)
    if len(seeds) > 1:
        print(f"\n{len(seeds)} seeds in {time.perf_counter() - start:.0f} s; top-1 drop (points) per seed:")
        for spec in SPECS:
            drops = ", ".join(f"{runs[s][spec]['drop_points']:+.2f}" for s in seeds)
            print(f"  {spec:<29} {drops}")
    if args.json:
        with open(args.json, "w") as f:
            payload = {"seed": seeds[0], "attn": args.attn, "epochs": args.epochs, "results": runs[seeds[0]]}
            if len(seeds) > 1:
                payload["seeds"] = {str(s): runs[s] for s in seeds}
            json.dump(payload, f, indent=2)
    return runs[seeds[0]] if len(seeds) == 1 else runs


if __name__ == "__main__":
    main()
