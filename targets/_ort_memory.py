"""Peak memory of one onnxruntime run of a file, measured in a fresh process.

Run as a script (``python _ort_memory.py SPEC.json``), not imported by the child: the child imports only
numpy and onnxruntime, so what it measures is the runtime's, not torch's or surgeon's. SPEC holds the
file, the feeds (an ``.npz``), the session options surgeon runs the file with (threads, config
entries, disabled optimizers). The child creates the session, runs once to warm nothing (the first
run is the one a server pays at least once per shape: ORT's arena grows to the run's peak then), and
reports the resident-set high-water mark of that run above the resident set before it, the kernel's
own figure (``VmHWM`` after resetting it through ``/proc/self/clear_refs``). Linux only; elsewhere the
parent reports why not.

In a process that has run other sessions, freed pages would be reused without raising the resident
set, so the figure would undercount: hence a fresh process per file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["peak_run_memory"]


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field}")


def _child(spec_path: str) -> None:
    import numpy as np
    import onnxruntime as ort

    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = int(spec["threads"])
    so.inter_op_num_threads = 1
    for key, value in spec["config"].items():
        so.add_session_config_entry(key, value)
    sess = ort.InferenceSession(spec["path"], so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=spec["disabled_optimizers"] or None)
    with np.load(spec["feeds"]) as data:
        feeds = {k: data[k] for k in data.files}
    before = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")  # resets VmHWM to the current resident set (Linux ≥ 4.0)
    sess.run(None, feeds)
    peak = _status_kb("VmHWM")
    print(json.dumps({"rss_before_bytes": before * 1024, "peak_bytes": peak * 1024,
                      "run_peak_bytes": max(peak - before, 0) * 1024}))


def peak_run_memory(path: str | os.PathLike, feeds: Mapping[str, Any], *, threads: int, config: Mapping[str, str],
                    disabled_optimizers: Sequence[str] = (), timeout: float = 600.0) -> dict[str, Any]:
    """``{"run_peak_bytes": …, "peak_bytes": …, "rss_before_bytes": …, "how": …}`` for one run of ``path``
    on ``feeds`` (numpy arrays by input name) in a fresh process, or ``{"error": why}``."""
    import numpy as np

    if not Path("/proc/self/clear_refs").exists():
        return {"error": "needs Linux's /proc/self/clear_refs (peak resident set of one run)"}
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(Path(tmp) / "feeds.npz", **dict(feeds))
        spec = {"path": str(Path(path).resolve()), "feeds": str(Path(tmp) / "feeds.npz"), "threads": threads,
                "config": dict(config), "disabled_optimizers": list(disabled_optimizers)}
        (Path(tmp) / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
        try:
            done = subprocess.run([sys.executable, __file__, str(Path(tmp) / "spec.json")], capture_output=True,
                                  text=True, timeout=timeout, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return {"error": f"the measuring process failed: {exc}"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"the measuring process failed: {tail}"}
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    figures["how"] = "VmHWM − VmRSS of one run in a fresh process (onnxruntime and numpy only)"
    return figures


if __name__ == "__main__":
    _child(sys.argv[1])
