"""``surgeon export MODEL --target T -o OUTDIR``: write the model as it is, no pass (the module
variant; a decoder target's export is ``surgeon.decoder.cli``, chosen by ``surgeon.pipeline.variant``).

Load, capture, lower with the registered target (``surgeon.targets``), write OUTDIR atomically
(``report.json`` beside the file), print one line. A target whose file only makes sense after passes
(``onnx-fp8``, ``onnx-int8``: ``Target.needs_passes``) is refused before any work: its quantization
needs the verified pipeline (calibration on the user's data, the guard, per-layer rollback), which is
``surgeon optimize --target T``.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import SurgeonError
from .pipeline.timing import Timings
from .resources import publish_mode

__all__ = ["DEFAULT_EXPORT_TARGET", "export_model", "run_export_cli", "refuse_pipeline_target"]

DEFAULT_EXPORT_TARGET = "onnx"


def refuse_pipeline_target(target: Any) -> None:
    """One-line refusal for a target that needs passes (exit 2)."""
    if target.needs_passes:
        raise SurgeonError(f"surgeon export writes the model unchanged; target {target.name} needs the verified "
                           f"pipeline: surgeon optimize MODEL --target {target.name} --calib FILE -o OUTDIR")


def _write_json_atomic(data: dict, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".json.tmp", dir=str(path.parent))
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=str)
    publish_mode(tmp)  # mkstemp made it 0600
    os.replace(tmp, path)


def export_model(loaded: Any, target: str, outdir: str | os.PathLike) -> dict:
    """Export a loaded model (``surgeon.load.load_model``) with no pass to ``OUTDIR/<target file>``;
    returns the report written to ``OUTDIR/report.json``."""
    from . import targets  # type: ignore[attr-defined]
    from .capture import capture

    tgt = targets.get_target(target)
    refuse_pipeline_target(tgt)
    out = Path(outdir)
    clock = Timings()
    cap = capture(loaded.model, loaded.example_inputs)
    report: dict[str, Any] = {"schema": "surgeon.export/1", "command": "export", "source": str(loaded.source),
                              "target": target, "capture": cap.to_json(), "warnings": []}
    targets.write_target(target, cap.gm, out, example_inputs=loaded.example_inputs, original=loaded.model,
                         verify_inputs=loaded.example_inputs, report=report)
    from .deploy import write_deploy_files

    write_deploy_files(out, report, source=loaded.source, filename=tgt.filename if tgt.format == "onnx" else None,
                       fp8_option=report["targets"][target].get("fp8_session_option"))
    report["timings_s"] = {"total": round(clock.elapsed(), 3)}
    _write_json_atomic(report, out / "report.json")
    return report


def run_export_cli(args: Any) -> int:
    """``surgeon export MODEL [--target T] -o OUTDIR [--force]``."""
    from . import targets  # type: ignore[attr-defined]
    from .loaders import load_model
    from .memory import check_memory
    from .resources import atomic_dir, check_output_dir

    name = getattr(args, "target", None) or DEFAULT_EXPORT_TARGET
    tgt = targets.get_target(name)  # unknown target: refused before any work
    refuse_pipeline_target(tgt)
    out = Path(args.output)
    force = bool(getattr(args, "force", False))
    check_output_dir(out, force)
    loaded = load_model(args.model, trust_pickle=getattr(args, "trust_pickle", False), text=getattr(args, "text", None),
                        task=getattr(args, "task", None))
    check_memory(loaded.model, loaded.example_inputs)
    # Written into OUTDIR.partial-<pid> and renamed into place: OUTDIR is never half-written.
    with atomic_dir(out, force) as partial:
        report = export_model(loaded, name, partial)
    f = report["targets"][name]
    what = "ORT" if tgt.format == "onnx" else "torch.export.load"
    parts = [f"wrote {out / tgt.filename} ({f['bytes'] / 1e6:.2f} MB"]
    if f.get("size_ratio") is not None:
        parts.append(f", {f['size_ratio']:.2f}x fp32")
    parts.append(f"): {what} vs torch max abs diff {f['max_abs_diff']:.3g}")
    by_output = f.get("cosine_by_output") or {}
    if len(by_output) > 1:  # one figure per output: a pooled output and the hidden states differ
        masked = any(v["measured"].startswith("per sample, padded") for v in by_output.values())
        parts.append(", cosine to original min " + ", ".join(f"{k} {v['cosine_min']:.5f}" for k, v in by_output.items())
                     + (" (padded positions left out)" if masked else ""))
    elif f.get("cosine_min") is not None:
        masked = any(v["measured"].startswith("per sample, padded") for v in by_output.values())
        parts.append(f", cosine to original min {f['cosine_min']:.5f}" + (" (padded positions left out)" if masked else ""))
    if f.get("fp8_session_option"):
        parts.append(f"; run it with session option {f['fp8_session_option']}")
    print("".join(parts))
    return 0
