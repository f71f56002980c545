"""The builds of ``bench/llm.py``, each a subprocess as its users run it, timed (wall) and measured
(peak resident set of the process tree's largest process, from ``/usr/bin/time -v`` where the machine
has it, else ``getrusage(RUSAGE_CHILDREN)`` read in a one-command wrapper process):

* the Hugging Face directory genai's builder needs, written from the GGUF by surgeon's loader
  (``surgeon.loaders.gguf.load_gguf_causal_lm`` then ``save_pretrained``);
* ``surgeon export GGUF -o D --target onnx-decoder`` (the fp32-cache file);
* ``surgeon optimize GGUF -o D --target onnx-decoder [--passes SPEC]`` (the target's default passes
  unless SPEC);
* ``python -m onnxruntime_genai.models.builder -m HF -i HF -o D -p fp32|int4 -e cpu`` (int4 with
  ``--extra_options accuracy_level=4``: int8 compute on the activations, MatMulNBits' fast CPU path).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["genai_build", "surgeon_export", "surgeon_optimize", "timed", "to_hf"]

ROOT = Path(__file__).resolve().parents[1]
_GNU_TIME = "/usr/bin/time"
# Runs argv[1:] and prints the child's peak RSS (KiB on Linux) on stderr's last line.
_WRAP = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
         "print(f'peak_rss_kib={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}', file=sys.stderr); "
         "sys.exit(rc)")
_TO_HF = ("import sys; from pathlib import Path; from surgeon.loaders.gguf import load_gguf_causal_lm; "
          "p = Path(sys.argv[1]); d = load_gguf_causal_lm(str(p), p); "
          "d.model.save_pretrained(sys.argv[2]); d.tokenizer.save_pretrained(sys.argv[2])")


def timed(cmd: list[str], log: Path, ok: tuple[int, ...] = (0,)) -> dict[str, Any]:
    """Run ``cmd`` (its output to ``log``); its wall seconds, peak RSS (MB) and exit code. An exit code not
    in ``ok`` ends the bench with the log's tail."""
    gnu = Path(_GNU_TIME).is_file()
    full = [_GNU_TIME, "-v", *cmd] if gnu else [sys.executable, "-c", _WRAP, *cmd]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    t = time.perf_counter()
    with log.open("w", encoding="utf-8") as fh:
        rc = subprocess.call(full, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    wall = time.perf_counter() - t
    text = log.read_text(encoding="utf-8", errors="replace")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text) or re.search(r"peak_rss_kib=(\d+)", text)
    if rc not in ok:
        raise SystemExit(f"llm: {' '.join(cmd)} failed (exit {rc}); the end of {log}:\n{text[-3000:]}")
    shown = " ".join(cmd).replace(sys.executable, "python").replace(str(ROOT) + os.sep, "")
    return {"command": shown, "exit": rc, "wall_s": round(wall, 1),
            "peak_rss_mb": round(int(m[1]) / 1024, 0) if m else None}


def _fresh(out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)


def to_hf(gguf: Path, out: Path, logs: Path) -> dict[str, Any]:
    """The GGUF dequantized into a Hugging Face directory by surgeon's loader (for genai's builder)."""
    _fresh(out)
    run = timed([sys.executable, "-c", _TO_HF, str(gguf), str(out)], logs / "to_hf.log")
    run["command"] = f"python -c '<load_gguf_causal_lm, save_pretrained>' {gguf} {out}"
    return run


def surgeon_export(gguf: Path, out: Path, logs: Path) -> dict[str, Any]:
    _fresh(out)
    return timed([sys.executable, "-m", "surgeon", "export", str(gguf), "-o", str(out), "--target", "onnx-decoder"],
                 logs / "surgeon_export.log")


def surgeon_optimize(gguf: Path, out: Path, logs: Path, passes: str | None) -> dict[str, Any]:
    """``surgeon optimize`` with the target's default passes (or ``passes``); exit 3 (written, some site
    rolled back) still writes the file users get. Adds what its report.json says it did."""
    _fresh(out)
    cmd = [sys.executable, "-m", "surgeon", "optimize", str(gguf), "-o", str(out), "--target", "onnx-decoder"]
    if passes:
        cmd += ["--passes", passes]
    run = timed(cmd, logs / "surgeon_optimize.log", ok=(0, 3))
    run["summary"] = _report_summary(out / "report.json")
    run["stdout_tail"] = [ln for ln in (logs / "surgeon_optimize.log").read_text(errors="replace").splitlines()
                          if ln and not ln.startswith(("\t", "Command being timed"))][-12:]
    return run


def _report_summary(path: Path) -> dict[str, Any]:
    """What the OUTDIR's report says it chose: passes, sites kept per rung, the guard's held-out figures."""
    try:
        r = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return {"error": f"no readable report.json: {e}"}
    sites = [s for s in r.get("sites", []) if s.get("site") != "kv_cache"]
    rungs: dict[str, int] = {}
    for s in sites:
        key = s.get("rung") if s.get("status") == "applied" else f"rolled back ({s.get('status')})"
        rungs[str(key)] = rungs.get(str(key), 0) + 1
    g, v = r.get("guard", {}), r.get("verification", {})
    return {"passes": r.get("passes"), "sites": len(sites), "rungs": rungs, "kv_cache": g.get("chosen"),
            "verdict": " ".join(str(x) for x in ((r.get("verdict") or {}).get("status"),
                                                 (r.get("verdict") or {}).get("message")) if x),
            "warnings": r.get("warnings", []), "verification_perplexity": v.get("perplexity"),
            "logits_max_abs_diff": v.get("logits_max_abs_diff"), "speed": r.get("speed")}


def genai_build(hf: Path, out: Path, logs: Path, precision: str) -> dict[str, Any]:
    _fresh(out)
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-m", str(hf), "-i", str(hf), "-o", str(out),
           "-p", precision, "-e", "cpu", "-c", str(out.parent / "genai_cache")]
    if precision == "int4":
        cmd += ["--extra_options", "accuracy_level=4"]
    return timed(cmd, logs / f"genai_{precision}.log")
