"""What ``optimize`` returns, and ``Result.save``: ``OUTDIR`` written atomically (``model.pt2``, target
files, ``report.json``, ``report.html``)."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from ..errors import SurgeonError, first_line, stage
from ..inputs import Inputs
from ..speed import DEFAULT_RUNS
from ..verdict import Verdict, decide
from ..verify import GuardResult
from .timing import Timings

__all__ = ["Result", "check_target"]


@dataclass
class Result:
    """What ``optimize`` returns. ``report`` is the dict ``save`` writes as ``report.json``."""

    module: fx.GraphModule
    report: dict
    exported: Any  # torch.export.ExportedProgram of ``module`` (plain-container outputs)
    original: nn.Module
    example_inputs: Inputs
    check_batches: list[Inputs] = field(repr=False, default_factory=list)
    guard: GuardResult | None = field(repr=False, default=None)
    # Modules delivered beside the model, by name (``inverse``: z → x of flow-inverse), each with the
    # inputs it was exported with.
    artifacts: dict[str, nn.Module] = field(repr=False, default_factory=dict)
    artifact_inputs: dict[str, Inputs] = field(repr=False, default_factory=dict)
    artifact_exports: dict[str, Any] = field(repr=False, default_factory=dict)
    target: str | None = None  # the deploy target optimize ran for (its profile steered the passes)
    # The files optimize wrote and measured (``stage``): their directory, the target they are for and
    # what they are (OUTDIR-relative names); ``save`` places these very files.
    staged: Path | None = field(repr=False, default=None)
    staged_target: str | None = field(repr=False, default=None)
    staged_outputs: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def inverse(self) -> nn.Module | None:
        """The distilled inverse (``flow-inverse``: z → x) when it passed its check, else None."""
        return self.artifacts.get("inverse")

    @property
    def met(self) -> bool:
        """Whether the written model's figures are within the tolerance (``report["tolerance"]["met"]``);
        ``verdict`` also says whether that took rolling back every substitution."""
        return bool(self.report["tolerance"]["met"])

    @property
    def verdict(self) -> Verdict:
        """The run's one verdict (``surgeon.verdict``): met / met only by rolling everything back / not
        met, with the exit code the CLI uses and its one-line message."""
        return decide(self.report)

    def save(self, outdir: str | os.PathLike, *, force: bool = False, target: str | None = None,
             speed: bool = True, speed_runs: int = DEFAULT_RUNS) -> Path:
        """Write ``model.pt2``, target files, ``report.json`` and ``report.html`` into ``outdir``, atomically.

        ``target``: default the one ``optimize`` ran for, else ``torch``. With ``speed`` the written
        file is timed against the original exported the same way, side by side on this machine
        (``surgeon.speed``; ``report["speed"]``), and both lie in ``OUTDIR/bench/`` with the timing
        inputs so that ``surgeon bench OUTDIR`` can measure again on another machine.

        Everything is written into ``OUTDIR.partial-<pid>`` and renamed into place at the end; with
        ``force`` an existing ``outdir`` is exchanged with it atomically and deleted only once the new
        one is in place (``surgeon.resources.atomic_dir``). On any error, or a SIGKILL, ``outdir`` is
        absent, the old one or the new one, never partial; leftovers of a killed run are removed by
        the next save to the same ``outdir``. Under a process
        group only rank 0 writes; the others wait for it and raise its error if it fails."""
        from .. import distributed

        target = target or self.target or "torch"
        if not distributed.active():
            with stage("save", model=self.module):
                return self._save(outdir, force=force, target=target, speed=speed, speed_runs=speed_runs)
        error: Exception | None = None
        if distributed.is_writer():
            try:
                with stage("save", model=self.module):
                    return_path = self._save(outdir, force=force, target=target, speed=speed, speed_runs=speed_runs)
            except Exception as exc:  # noqa: BLE001 - every rank raises it (distributed.agree)
                error = exc
        distributed.agree(error, "writing OUTDIR")
        return return_path if distributed.is_writer() else Path(outdir)

    def _save(self, outdir: str | os.PathLike, *, force: bool, target: str, speed: bool, speed_runs: int) -> Path:
        from .. import report as rep
        from .. import report_html
        from ..resources import atomic_dir

        out = Path(outdir)
        check_target(target)
        clock = Timings()  # report.json holds the save's seconds, so they are read before it is written
        with atomic_dir(out, force) as partial:
            if self.staged is not None and self.staged_target == target and self.staged.is_dir():
                # the files the verdict was measured on, not a second export of the module (an ONNX
                # file's external data too); linked where they share a file system: past 2 GB a copy
                # costs seconds and doubles the disk used
                for f in self.staged.iterdir():
                    _place_copy(f, partial / f.name)
                outputs = dict(self.staged_outputs)
            else:
                outputs = self._write_files(partial, target)
                measured = (self.report.get("end_to_end") or {}).get("measured_on") or {}
                if measured.get("file") and measured.get("target") != target:
                    self.report["warnings"].append(
                        f"the verdict was measured on {measured['file']} for target {measured.get('target')}; "
                        f"the {target} file written here was verified against the torch module only")
            if speed:
                try:
                    self.report["speed"] = self._speed(target, partial, outputs, speed_runs)
                except Exception as exc:  # noqa: BLE001 - timing is a figure about the file, not the file
                    shutil.rmtree(partial / "bench", ignore_errors=True)
                    for key in ("bench_original", "bench_inputs"):
                        outputs.pop(key, None)
                    self.report["speed"] = {"target": target, "error": first_line(exc)}
                    self.report["warnings"].append(f"could not time the written file against the original: "
                                                   f"{first_line(exc)}")
            self._deploy_files(partial, target, outputs)
            outputs["report_json"] = "report.json"
            outputs["report_html"] = "report.html"
            self.report["outputs"] = outputs
            self.report["timings_s"]["save"] = round(clock.elapsed(), 4)
            rep.write_json(self.report, partial / "report.json")
            report_html.write_html(self.report, partial / "report.html")
        return out


    def _write_files(self, directory: Path, target: str) -> dict[str, Any]:
        """``model.pt2`` (and artifacts' ``.pt2``) and the target's file(s) into ``directory``: what
        they are, by OUTDIR key (``report["outputs"]``); the target's figures go to ``report["targets"]``."""
        if self.exported is None:
            raise SurgeonError("the optimized model could not be exported with torch.export; model.pt2 "
                               "cannot be written")
        from .. import targets  # type: ignore[attr-defined]

        outputs: dict[str, Any] = {}
        # surgeon's custom ops decomposed to aten and unused fp32 copies dropped: the file loads
        # with torch alone and stores quantized weights only (targets/pt2.py)
        pt2 = targets.get_target("torch")
        self.report.setdefault("export", {})["pt2"] = pt2.save_program(self.exported, directory / "model.pt2")
        outputs["model"] = "model.pt2"
        for name, ep in self.artifact_exports.items():
            pt2.save_program(ep, directory / f"{name}.pt2")
            outputs[name] = f"{name}.pt2"
        if target != "torch":
            with stage(f"save: target {target}", model=self.module):
                written = targets.write_target(target, self, directory)
            outputs["target"] = written.name
            for extra in self.artifacts:
                if (directory / f"{extra}.onnx").exists():
                    outputs[f"{extra}_target"] = f"{extra}.onnx"
        return outputs

    def stage(self, target: str) -> Path:
        """Write the files ``save`` would write for ``target`` into a private temporary directory
        (removed with this object) and return the deployed file's path: the file the verdict is
        measured on. ``save(target=target)`` then places these files as they are."""
        import tempfile
        import weakref

        if self.staged is not None:
            shutil.rmtree(self.staged, ignore_errors=True)
        directory = Path(tempfile.mkdtemp(prefix="surgeon-staged-"))
        weakref.finalize(self, shutil.rmtree, str(directory), True)
        self.staged, self.staged_target = directory, target
        self.staged_outputs = self._write_files(directory, target)
        name = self.staged_outputs.get("target", "model.pt2")
        return directory / (name if isinstance(name, str) else name[0])

    def _deploy_files(self, partial: Path, target: str, outputs: dict[str, Any]) -> None:
        """The source's config and tokenizer files, report["deploy"] and README.md (``surgeon.deploy``)."""
        from ..deploy import write_deploy_files

        name = outputs.get("target")
        fp8 = (self.report.get("targets", {}).get(target) or {}).get("fp8_session_option")
        write_deploy_files(partial, self.report, source=self.report["model"].get("source"),
                           filename=name if isinstance(name, str) else None, fp8_option=fp8)
        if "readme" in self.report["deploy"]:
            outputs["readme"] = "README.md"
        outputs.update({f"source_{n}": n for n in self.report["deploy"]["copied_from_source"]})

    def _speed(self, target: str, partial: Path, outputs: dict[str, Any], runs: int) -> dict[str, Any]:
        """Time the written file against the original exported the same way (``OUTDIR/bench/``)."""
        from .. import targets  # type: ignore[attr-defined]
        from ..speed import measure

        t = targets.get_target(target)
        name = outputs.get("target")
        written = partial / (name if isinstance(name, str) else "model.pt2")
        bench = partial / "bench"
        bench.mkdir()
        original = bench / f"original{written.suffix}"
        inputs = self.check_batches[0] if self.check_batches else self.example_inputs
        t.baseline(self.original, self.example_inputs, original)
        torch.save(inputs, bench / "inputs.pt")
        figures = measure(t, written, original, inputs, runs=runs)
        compared = t.compare(written, original)
        if compared and target in self.report.get("targets", {}):
            self.report["targets"][target].update(compared)
        figures["files"] = {"optimized": written.name, "original": f"bench/{original.name}", "inputs": "bench/inputs.pt"}
        outputs["bench_original"], outputs["bench_inputs"] = f"bench/{original.name}", "bench/inputs.pt"
        return figures


def _place_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # nobody writes a staged file again: sharing its inode is safe
    except OSError:
        shutil.copy2(src, dst)


def check_target(name: str) -> None:
    """Refuse an unknown target before any work."""
    from .. import targets  # type: ignore[attr-defined]

    targets.check_target(name)

