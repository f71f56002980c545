"""The optimize pipeline: capture → passes → calibrate/fit → guard → rebuild → re-export → report.

Python API::

    result = surgeon.optimize(model, example_inputs, calib=batches, passes="attention-fp8",
                              tolerance=0.999, metric=None)
    result.module          # the optimized GraphModule (kept sites only), same inputs/outputs as the model
    result.report          # the dict written to report.json (docs/report.md)
    result.save("out/")    # model.pt2 + report.json + report.html, atomically

Stages (each a plain function with a typed result; ``timings_s`` in the report names them):

1. ``capture`` the model (dynamic batch/sequence); the captured ``gm0`` is never modified.
2. ``prepare_batches``: materialise the calibration batches (inputs only) and validate them before any
   work: non-empty, finite, same structure/dtype/rank as the example inputs, and accepted by ``gm0``;
   ``split_batches``: a seeded split into fit and check parts (the check part is never used to fit).
3. ``apply_passes`` on a copy of ``gm0``; ``fit_passes``: ``calibrate`` then every pass's ``fit``, on
   the fit batches only.
4. ``surgeon.verify.guard`` on the check batches: per-site and end-to-end figures, rollback.
5. ``rebuild``: a fresh copy of ``gm0`` with only the kept sites substituted, calibrated state copied
   site by site; its end-to-end figures are the reported ones. Then each pass's ``check`` (tests the
   guard cannot make: a flow inverse's reconstruction error) and ``artifacts`` (modules delivered
   beside the model: ``Result.inverse``, ``inverse.pt2``).
6. ``reexport`` with ``torch.export`` (batch/sequence dynamic where the original accepted any size);
   ``Result.save`` writes ``OUTDIR`` atomically.
"""

from __future__ import annotations

import copy
import math
import os
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from . import __version__
from ._inputs import Inputs, as_args_kwargs, call, describe
from .capture import auto_dynamic_shapes
from .errors import SurgeonError, ToleranceNotMet
from .pass_manager import (Diagnostic, Pass, PassContext, PassManager, parse_pipeline, set_site_active,
                           set_site_rung)
from .verify import GuardResult, Metric, guard, measure_model, parse_tolerance

DEFAULT_PASSES = "attention-fp8"
DEFAULT_CHECK_FRACTION = 0.25
TEXT_BATCH = 8  # sentences per calibration batch for text models
TEXT_MAX_LENGTH = 128


# --------------------------------------------------------------------------------------------------
# calibration data
# --------------------------------------------------------------------------------------------------
def _items(inputs: Inputs) -> list[tuple[str, Any]]:
    args, kwargs = as_args_kwargs(inputs)
    return [(f"arg{i}", a) for i, a in enumerate(args)] + list(kwargs.items())


def _normalise(batch: Any, example: Inputs) -> Inputs:
    if isinstance(batch, torch.Tensor):
        return (batch,)
    if isinstance(batch, list):
        return tuple(batch)
    if isinstance(batch, Mapping) and not isinstance(batch, dict):
        return dict(batch)  # e.g. a tokenizer's BatchEncoding
    return batch


def _mismatch(batch: Any, example: Inputs) -> str | None:
    """Why ``batch`` cannot stand in for ``example`` (structure, dtype, rank), or None."""
    if not isinstance(batch, (tuple, dict)):
        return f"expected a tuple or dict of inputs, got {type(batch).__name__}"
    if isinstance(example, dict) != isinstance(batch, dict):
        want = f"keyword inputs ({', '.join(example)})" if isinstance(example, dict) else f"a tuple of {len(example)} input(s)"
        got = f"keyword inputs ({', '.join(batch)})" if isinstance(batch, dict) else f"a tuple of {len(batch)} input(s)"
        return f"expected {want}, got {got}"
    if isinstance(example, dict) and set(example) != set(batch):
        return f"expected inputs {', '.join(example)}, got {', '.join(map(str, batch)) or 'none'}"
    if isinstance(example, tuple) and len(example) != len(batch):
        return f"expected {len(example)} input(s), got {len(batch)}"
    ex = dict(_items(example))
    for name, value in _items(batch):
        want = ex[name]
        if isinstance(want, torch.Tensor):
            if not isinstance(value, torch.Tensor):
                return f"input '{name}' is a {type(value).__name__}, expected a tensor"
            if value.dtype != want.dtype:
                return (f"input '{name}' has dtype {str(value.dtype).replace('torch.', '')}, expected "
                        f"{str(want.dtype).replace('torch.', '')}")
            if value.dim() != want.dim():
                return f"input '{name}' has {value.dim()} dimension(s), expected {want.dim()}"
        elif type(value) is not type(want) and not (want is None and value is None):
            return f"input '{name}' is a {type(value).__name__}, expected {type(want).__name__}"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _signature(batch: Inputs) -> tuple:
    return tuple((n, tuple(v.shape), v.dtype) if isinstance(v, torch.Tensor) else (n, repr(v)) for n, v in _items(batch))


def prepare_batches(calib: Iterable[Any] | None, example_inputs: Inputs, gm0: nn.Module) -> tuple[list[Inputs], bool]:
    """Materialise and validate the calibration batches: ``(batches, weak)``.

    ``calib=None`` → the example inputs as the only batch (``weak=True``). Batches are numbered from 1
    in messages. Each distinct shape signature is run once through ``gm0`` (the captured graph's shape
    guards are what decide whether the model accepts it). Under a process group each rank runs only
    the batches of its share and the ranks agree on the first bad batch (``surgeon.distributed``)."""
    from . import distributed

    error: SurgeonError | None = None
    prepared: tuple[list[Inputs], bool] = ([], False)
    try:
        prepared = _prepare_batches(calib, example_inputs, gm0, distributed.rank(), distributed.world_size())
    except SurgeonError as exc:
        error = exc
    distributed.agree(error, "checking the calibration batches", getattr(error, "batch", 0))
    return prepared


def _prepare_batches(calib: Iterable[Any] | None, example_inputs: Inputs, gm0: nn.Module, rank: int,
                     world: int) -> tuple[list[Inputs], bool]:
    example = _normalise(example_inputs, example_inputs)
    if calib is None:
        return [example], True
    if isinstance(calib, (torch.Tensor, dict)) or (isinstance(calib, tuple) and calib and isinstance(calib[0], torch.Tensor)):
        raise SurgeonError("calib must be an iterable of input tuples (or dicts), one per batch — "
                           "wrap a single batch in a list")
    batches = [_normalise(b, example) for b in calib]
    if not batches:
        raise SurgeonError("calibration data is empty")
    seen: set[tuple] = set()
    for i, batch in enumerate(batches, 1):
        why = _mismatch(batch, example)
        if why:
            raise _at(i, SurgeonError(f"calibration batch {i} does not match the model's inputs: {why}"))
        for name, value in _items(batch):
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                raise _at(i, SurgeonError(f"calibration data contains NaN/Inf (batch {i}, input '{name}')"))
        sig = _signature(batch)
        if sig in seen or (i - 1) % world != rank:  # another rank runs this one
            continue
        try:
            with torch.no_grad():
                call(gm0, batch)
        except SurgeonError as exc:
            raise _at(i, exc)
        except Exception as exc:  # noqa: BLE001 - any failure here means the model refuses the batch
            raise _at(i, SurgeonError(f"calibration batch {i} does not match the model's inputs: "
                                      f"{_first_line(exc)}")) from exc
        seen.add(sig)
    return batches, False


def _at(batch: int, exc: SurgeonError) -> SurgeonError:
    exc.batch = batch  # type: ignore[attr-defined]  # which error ranks agree on: the first bad batch
    return exc


@dataclass
class Split:
    """Fit and check batches (indices into the materialised calibration batches, 0-based)."""

    fit: list[Inputs]
    check: list[Inputs]
    fit_index: list[int]
    check_index: list[int]
    independent: bool  # False when a single batch serves as both


def split_batches(batches: Sequence[Inputs], check_fraction: float = DEFAULT_CHECK_FRACTION, seed: int = 0) -> Split:
    """Seeded split: ``round(n·check_fraction)`` check batches, at least one of each when n ≥ 2."""
    n = len(batches)
    if not 0.0 < check_fraction < 1.0:
        raise SurgeonError(f"check fraction must be in (0, 1), got {check_fraction}")
    if n == 1:
        return Split([batches[0]], [batches[0]], [0], [0], False)
    n_check = min(max(1, round(n * check_fraction)), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    check_index = sorted(perm[:n_check])
    fit_index = sorted(perm[n_check:])
    return Split([batches[i] for i in fit_index], [batches[i] for i in check_index], fit_index, check_index, True)


def _batch_size(batch: Inputs) -> int:
    for _, v in _items(batch):
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    return 1


# --------------------------------------------------------------------------------------------------
# passes, fitting, rebuild
# --------------------------------------------------------------------------------------------------
@dataclass
class Applied:
    """A rewritten copy of the captured graph and what the passes recorded."""

    gm: fx.GraphModule
    ctx: PassContext
    diagnostics: list[Diagnostic]
    passes: list[Pass]


def resolve_passes(passes: str | Pass | Sequence[Pass]) -> list[Pass]:
    if isinstance(passes, str):
        return parse_pipeline(passes)
    if isinstance(passes, Pass):
        return [passes]
    out = list(passes)
    if not out:
        raise SurgeonError("empty pass pipeline: name at least one pass (e.g. attention-fp8)")
    return out


def apply_passes(gm0: fx.GraphModule, passes: Sequence[Pass], seed: int = 0) -> Applied:
    """Run the pipeline on a deep copy of ``gm0`` (which stays untouched)."""
    manager = PassManager(list(passes))
    gm, ctx, diags = manager.run(copy.deepcopy(gm0), PassContext(options={"seed": seed}))
    return Applied(gm, ctx, diags, manager.passes)


def fit_passes(applied: Applied, fit: Sequence[Inputs], *, progress: bool = False) -> dict:
    """Calibrate every calibratable on the fit batches, then run each pass's ``fit``.

    Under a process group (``surgeon.distributed``) ``fit`` is the full fit list on every rank: each
    rank calibrates on its share and the statistics are all-reduced (when every calibratable can;
    otherwise every rank calibrates on all of them); each pass's ``fit`` runs on every fit batch on
    every rank with the same seed, and rank 0's fitted site state is broadcast so all ranks verify the
    same model."""
    from . import distributed
    from .calibration import calibratables, calibrate, can_all_reduce

    info: dict[str, Any] = {"calibrated": 0}
    with torch.random.fork_rng(devices=[]):  # seeded fitting without touching the caller's RNG state
        torch.manual_seed(int(applied.ctx.options.get("seed", 0)))
        found = calibratables(applied.gm)
        if found:
            sharded = can_all_reduce(found)
            stats = calibrate(applied.gm, distributed.shard(fit) if sharded else list(fit), desc="calibrating",
                              progress=progress, distributed=sharded)
            info = stats.to_json()
        for p in applied.passes:
            p.fit(applied.gm, applied.ctx, list(fit))
        if distributed.active() and any(type(p).fit is not Pass.fit for p in applied.passes):
            distributed.broadcast_module_state(_fitted_modules(applied))
    return info


def _fitted_modules(applied: Applied) -> list[nn.Module]:
    """What a fit may change: every site's submodules and every calibratable (what ``rebuild`` copies)."""
    from .calibration import calibratables

    names = {s for r in applied.ctx.records.values() for s in r.submodules} | {n for n, _ in calibratables(applied.gm)}
    top = sorted(n for n in names if not any(n != o and (o == "" or n.startswith(o + ".")) for o in names))
    return [applied.gm.get_submodule(n) for n in top]


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, leaf, module)


def rebuild(gm0: fx.GraphModule, applied: Applied, kept: Sequence[str],
            rungs: Mapping[str, str] | None = None) -> tuple[fx.GraphModule, PassContext]:
    """A fresh copy of ``gm0`` with only the ``kept`` sites substituted, carrying their fitted state,
    each on the rung the guard chose (``rungs``: site → rung; absent → its first rung).

    State is copied site by site through the ``SiteRecord``s (the i-th submodule of a site's record in
    the fitted graph → the i-th of the same site in the rebuilt one): a pass may number its submodules
    by position, so equal names need not mean the same site once some are left out."""
    from .calibration import calibratables

    ctx = PassContext(enabled_sites=set(kept), options=dict(applied.ctx.options))
    final, ctx, _ = PassManager(applied.passes).run(copy.deepcopy(gm0), ctx)
    if set(ctx.records) != set(kept):
        raise RuntimeError(f"rebuilding with the kept sites registered {sorted(ctx.records)} instead of "
                           f"{sorted(kept)}: a pass ignores PassContext.enabled_sites")
    covered: set[str] = set()
    for site in kept:
        src, dst = applied.ctx.records[site], ctx.records[site]
        if len(src.submodules) != len(dst.submodules):
            raise RuntimeError(f"site {site}: the pass added {len(dst.submodules)} submodule(s) on rebuild, "
                               f"{len(src.submodules)} before")
        for s, d in zip(src.submodules, dst.submodules):
            _set_submodule(final, d, copy.deepcopy(applied.gm.get_submodule(s)))
            covered.add(d)
    for name, module in calibratables(final):
        if any(name == c or name.startswith(c + ".") for c in covered):
            continue
        try:
            source = applied.gm.get_submodule(name)
        except AttributeError:
            source = None
        if source is None or type(source) is not type(module):
            raise RuntimeError(f"calibratable '{name}' of the rebuilt model has no fitted counterpart")
        _set_submodule(final, name, copy.deepcopy(source))
    for record in ctx.records.values():
        if record.rungs:
            set_site_rung(final, record, (rungs or {}).get(record.site, record.rungs[0]))
        else:
            set_site_active(final, record, True)
    for _, module in calibratables(final):
        module.mode = "quant"
    final.recompile()
    return final, ctx


# --------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    """Outputs as built-in containers: a ModelOutput (a Mapping) or namedtuple becomes a dict."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return {k: _plain(v) for k, v in value._asdict().items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


@contextmanager
def plain_outputs(gm: fx.GraphModule, example_inputs: Inputs) -> Iterator[bool]:
    """Temporarily make an exported GraphModule return built-in containers (dict for a ModelOutput).

    A ``.pt2`` whose output spec names a library class (transformers' ModelOutput) only loads in a
    process that imported that class first; with dicts it loads with torch alone."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is None or info.out_spec is None:
        yield False
        return
    with torch.no_grad():
        out = call(gm, example_inputs)
    _, spec = pytree.tree_flatten(_plain(out))
    if spec == info.out_spec or spec.num_leaves != info.out_spec.num_leaves:
        yield False
        return
    old_attr = getattr(gm, "_out_spec", None)
    gm.graph._codegen.pytree_info = info._replace(out_spec=spec)
    gm._out_spec = spec
    gm.recompile()
    try:
        yield True
    finally:
        gm.graph._codegen.pytree_info = info
        gm._out_spec = old_attr
        gm.recompile()


def reexport(final: fx.GraphModule, example_inputs: Inputs) -> tuple[Any, list[str]]:
    """``torch.export`` the final model, every input dimension ``Dim.AUTO``: ``(program, notes)``.

    Dimensions the model fixes (a feature width) come out static, the others (batch, sequence)
    dynamic; if the dynamic export fails, a static one is written and the note says why."""
    args, kwargs = as_args_kwargs(example_inputs)
    notes: list[str] = []
    attempts = [auto_dynamic_shapes(final, example_inputs), None]
    last: Exception | None = None
    with plain_outputs(final, example_inputs) as changed:
        if changed:
            notes.append("model.pt2 returns the model's output as a plain dict (no library class is needed to load it)")
        for ds in attempts:
            try:
                ep = torch.export.export(final, tuple(args), kwargs or None, dynamic_shapes=ds, strict=False)
                if ds is None:
                    notes.append("model.pt2 has static shapes: the dynamic export failed "
                                 f"({_first_line(last) if last else 'not attempted'})")
                return ep, notes
            except Exception as exc:  # noqa: BLE001 - the next attempt is static; the note keeps the cause
                last = exc
    raise SurgeonError(f"cannot export the optimized model with torch.export: {_first_line(last)}")  # type: ignore[arg-type]


def export_artifacts(artifacts: Mapping[str, nn.Module], final: fx.GraphModule,
                     example_inputs: Inputs) -> tuple[dict[str, Inputs], dict[str, Any]]:
    """Export each artifact (batch dimension dynamic): ``(example inputs, programs)`` by name.

    An artifact maps the model's output back (a flow inverse: z → x), so its example input is the
    model's first floating output on the example inputs."""
    inputs: dict[str, Inputs] = {}
    programs: dict[str, Any] = {}
    for name, module in artifacts.items():
        with torch.no_grad():
            leaves = [t for t in pytree.tree_leaves(_plain(call(final, example_inputs)))
                      if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not leaves:
            raise SurgeonError(f"cannot export the {name}: the model has no floating output to feed it")
        z = (leaves[0].detach(),)
        ds = ({0: torch.export.Dim.AUTO},) if z[0].dim() else None
        try:
            programs[name] = torch.export.export(module.eval(), z, dynamic_shapes=ds, strict=False)
        except Exception as exc:  # noqa: BLE001
            raise SurgeonError(f"cannot export the {name} with torch.export: {_first_line(exc)}") from exc
        inputs[name] = z
    return inputs, programs


def export_info(ep: Any) -> dict:
    """Input dimensions of an exported program: an int where static, "dynamic" where symbolic."""
    from torch.fx.experimental.symbolic_shapes import is_concrete_int

    inputs: dict[str, list] = {}
    user_inputs = set(ep.graph_signature.user_inputs)
    for node in ep.graph.nodes:
        if node.op != "placeholder" or node.name not in user_inputs:
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            inputs[node.name] = [int(d) if is_concrete_int(d) else "dynamic" for d in val.shape]
    return {"inputs": inputs, "format": "torch.export (.pt2)"}


# --------------------------------------------------------------------------------------------------
# the result
# --------------------------------------------------------------------------------------------------
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

    @property
    def inverse(self) -> nn.Module | None:
        """The distilled inverse (``flow-inverse``: z → x) when it passed its check, else None."""
        return self.artifacts.get("inverse")

    @property
    def met(self) -> bool:
        """Whether the written model meets the tolerance."""
        return bool(self.report["tolerance"]["met"])

    def save(self, outdir: str | os.PathLike, *, force: bool = False, target: str = "torch") -> Path:
        """Write ``model.pt2``, target files, ``report.json`` and ``report.html`` into ``outdir``, atomically.

        Everything is written into ``OUTDIR.partial-<pid>`` and renamed into place at the end; with
        ``force`` an existing ``outdir`` is exchanged with it atomically and deleted only once the new
        one is in place (``surgeon._resources.atomic_dir``). On any error, or a SIGKILL, ``outdir`` is
        absent, the old one or the new one, never partial; leftovers of a killed run are removed by
        the next save to the same ``outdir``. Under a process
        group only rank 0 writes; the others wait for it and raise its error if it fails."""
        from . import distributed

        if not distributed.active():
            return self._save(outdir, force=force, target=target)
        error: Exception | None = None
        if distributed.is_writer():
            try:
                return_path = self._save(outdir, force=force, target=target)
            except Exception as exc:  # noqa: BLE001 - every rank raises it (distributed.agree)
                error = exc
        distributed.agree(error, "writing OUTDIR")
        return return_path if distributed.is_writer() else Path(outdir)

    def _save(self, outdir: str | os.PathLike, *, force: bool = False, target: str = "torch") -> Path:
        from . import report as rep
        from ._resources import atomic_dir

        out = Path(outdir)
        check_target(target)
        start = time.perf_counter()
        with atomic_dir(out, force) as partial:
            outputs: dict[str, Any] = {}
            if self.exported is None:
                raise SurgeonError("the optimized model could not be exported with torch.export; model.pt2 "
                                   "cannot be written")
            torch.export.save(self.exported, str(partial / "model.pt2"))
            outputs["model"] = "model.pt2"
            for name, ep in self.artifact_exports.items():
                torch.export.save(ep, str(partial / f"{name}.pt2"))
                outputs[name] = f"{name}.pt2"
            if target != "torch":
                from . import targets  # type: ignore[attr-defined]

                written = targets.write_target(target, self, partial)
                if isinstance(written, (list, tuple)):
                    outputs["target"] = [os.path.basename(str(p)) for p in written]
                elif written:
                    outputs["target"] = os.path.basename(str(written))
                for extra in self.artifacts:
                    if (partial / f"{extra}.onnx").exists():
                        outputs[f"{extra}_target"] = f"{extra}.onnx"
            outputs["report_json"] = "report.json"
            outputs["report_html"] = "report.html"
            self.report["outputs"] = outputs
            self.report["timings_s"]["save"] = round(time.perf_counter() - start, 4)
            rep.write_json(self.report, partial / "report.json")
            rep.write_html(self.report, partial / "report.html")
        return out


def check_target(name: str) -> None:
    """Refuse an unknown target before any work."""
    if name == "torch":
        return
    try:
        from . import targets  # type: ignore[attr-defined]
    except ImportError:
        targets = None  # type: ignore[assignment]
    if targets is None or not hasattr(targets, "write_target"):
        raise SurgeonError(f"unknown target '{name}' (known: torch)")
    known = getattr(targets, "TARGETS", None)
    if known is not None and name not in known:
        raise SurgeonError(f"unknown target '{name}' (known: {', '.join(['torch', *known])})")


# --------------------------------------------------------------------------------------------------
# the pipeline
# --------------------------------------------------------------------------------------------------
def _variants(gm0: fx.GraphModule) -> dict[str, str]:
    try:
        from .analysis import analyze_graph

        return {s.id: s.variant for s in analyze_graph(gm0).sites}
    except Exception:  # noqa: BLE001 - variants only decorate the report
        return {}


def optimize(model: nn.Module, example_inputs: Inputs, calib: Iterable[Any] | None = None, *,
             passes: str | Pass | Sequence[Pass] = DEFAULT_PASSES, tolerance: Any = None,
             metric: Metric | None = None, seed: int = 0, check_fraction: float = DEFAULT_CHECK_FRACTION,
             progress: bool = False, source: str | None = None, threads: int | None = None,
             _timings: dict[str, float] | None = None) -> Result:
    """Substitute, calibrate, verify and re-export ``model``; see the module docstring.

    ``calib``: an iterable of batches (each a tuple of positional inputs or a dict of keyword inputs,
    shaped like ``example_inputs``); None → the example inputs (weak calibration, warned).
    ``tolerance``: a number (minimum mean end-to-end cosine; with ``metric``, the minimum metric), a
    string ``"cosine_min=0.995,cosine_mean=0.999"``, a dict, or a ``Tolerance``; default cosine mean
    ≥ 0.999. ``metric(ref_outputs, outputs) -> float`` (higher is better) replaces the cosine criterion
    and is averaged over the check batches. Raises ``SurgeonError`` on bad input; a configuration
    that does not meet the tolerance is still returned (``Result.met`` is False).
    ``threads``: torch intra-op threads for the run (restored after); None leaves them as they are."""
    if threads is not None:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return optimize(model, example_inputs, calib, passes=passes, tolerance=tolerance, metric=metric,
                            seed=seed, check_fraction=check_fraction, progress=progress, source=source,
                            _timings=_timings)
        finally:
            torch.set_num_threads(previous)
    from . import distributed
    from ._resources import check_memory
    from .capture import capture

    timings: dict[str, float] = dict(_timings or {})
    notes: list[str] = []
    pass_list = resolve_passes(passes)
    tol = parse_tolerance(tolerance, has_metric=metric is not None)
    if calib is not None and not isinstance(calib, (list, tuple)):
        calib = list(calib)  # read once: the memory estimate and the run both need the batches
    check_memory(model, example_inputs, calib)  # InsufficientMemory (exit 4) before the work, not an OOM kill

    t = time.perf_counter()
    cap = capture(model, example_inputs)
    gm0 = cap.gm
    timings["capture"] = time.perf_counter() - t

    t = time.perf_counter()
    batches, weak = prepare_batches(calib, example_inputs, gm0)
    split = split_batches(batches, check_fraction, seed)
    # under torchrun: the split is the single-process one, then each rank checks its strided share
    check_local = distributed.shard(split.check)
    timings["data"] = time.perf_counter() - t
    if weak:
        notes.append("no calibration data: the example inputs calibrate and check the model, so the calibration "
                     "is weak and the check is not independent")
    elif not split.independent:
        notes.append("a single calibration batch: it is used for both fitting and checking, so the check is "
                     "not independent")

    t = time.perf_counter()
    applied = apply_passes(gm0, pass_list, seed)
    timings["passes"] = time.perf_counter() - t

    t = time.perf_counter()
    cal_info = fit_passes(applied, split.fit, progress=progress)
    timings["calibrate"] = time.perf_counter() - t

    t = time.perf_counter()
    records = list(applied.ctx.records.values())
    verdict = guard(gm0, applied.gm, records, check_local, tol, metric, progress=progress)
    timings["verify"] = time.perf_counter() - t

    t = time.perf_counter()
    final, rctx = rebuild(gm0, applied, verdict.kept, verdict.rungs)
    final.eval()
    figures = measure_model(gm0, final, check_local, metric)
    with torch.no_grad():
        checks = [c for p in applied.passes for c in p.check(final, rctx, split.check)]
    artifacts: dict[str, nn.Module] = {}
    for p in applied.passes:
        artifacts.update(p.artifacts(final, rctx))  # detached: the model's export must not carry them
    timings["rebuild"] = time.perf_counter() - t
    del applied.gm  # the fitted copy is no longer needed (memory)

    t = time.perf_counter()
    # only rank 0 writes OUTDIR, so only it needs the exported program
    ep, export_notes = reexport(final, example_inputs) if distributed.is_writer() else (None, [])
    notes += [n for n in export_notes if "static shapes" in n]
    artifact_inputs, artifact_exports = export_artifacts(artifacts, final, example_inputs)
    timings["export"] = time.perf_counter() - t

    if not verdict.met:
        notes.append(f"no configuration met the tolerance ({tol.describe()}); the best one measured was kept")
    elif tol.violations(figures):
        notes.append("the rebuilt model misses the tolerance by a margin the guard's measurement did not show "
                     f"({', '.join(tol.violations(figures))})")
    from .report import make_report

    calibration = {
        "batches": {"fit": len(split.fit), "check": len(split.check), "total": len(batches)},
        "samples": {"fit": sum(map(_batch_size, split.fit)), "check": sum(map(_batch_size, split.check))},
        "check_index": split.check_index,
        "independent_check": split.independent and not weak,
        "weak": weak,
        "seed": seed,
        "check_fraction": check_fraction,
        "calibrate": cal_info,
        "world_size": distributed.world_size(),
    }
    report = make_report(
        surgeon_version=__version__,
        model={"source": source or type(model).__name__, "class": type(model).__name__,
               "inputs": describe(example_inputs)},
        passes=[p.spec() for p in pass_list],
        capture=cap.to_json(),
        calibration=calibration,
        guard=verdict,
        final=figures,
        diagnostics=applied.diagnostics,
        checks=checks,
        variants=_variants(gm0),
        timings=timings,
        export={**(export_info(ep) if ep is not None else {}), "notes": export_notes},
        warnings=notes,
    )
    for n in notes if distributed.is_writer() else []:
        if "weak" in n or "not independent" in n or "tolerance" in n:
            warnings.warn(n, stacklevel=2)
    return Result(final, report, ep, model, example_inputs, list(split.check), verdict, artifacts,
                  artifact_inputs, artifact_exports)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
def read_calibration(path: str, loaded: Any) -> list[Inputs]:
    """Calibration batches from ``--calib FILE``: sentences (text models) or a ``.pt`` list of inputs."""
    p = Path(path)
    if not p.exists():
        raise SurgeonError(f"cannot read calibration file '{path}': no such file")
    if p.is_dir():
        raise SurgeonError(f"cannot read calibration file '{path}': it is a directory")
    if p.suffix.lower() in (".pt", ".pth"):
        try:
            data = torch.load(p, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
            raise SurgeonError(f"cannot read calibration file '{path}': not a torch.save file of input tuples "
                               f"({_first_line(exc)})") from None
        if isinstance(data, (tuple, dict, torch.Tensor)) or not isinstance(data, list):
            raise SurgeonError(f"calibration file '{path}' must hold a list of input tuples (or dicts), one per "
                               f"batch; it holds a {type(data).__name__}")
        if not data:
            raise SurgeonError(f"calibration file '{path}' is empty")
        return data
    if not loaded.is_text:
        raise SurgeonError(f"calibration file '{path}' is not a .pt file: a model without a tokenizer needs a .pt "
                           "file holding a list of input tuples (text files need a Hugging Face text model)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise SurgeonError(f"cannot read calibration file '{path}': not UTF-8 text") from None
    except OSError as exc:
        raise SurgeonError(f"cannot read calibration file '{path}': {exc.strerror or exc}") from None
    sentences = [line.strip() for line in text.splitlines() if line.strip()]
    if not sentences:
        raise SurgeonError(f"calibration file '{path}' is empty")
    return [loaded.text_inputs(sentences[i:i + TEXT_BATCH], max_length=TEXT_MAX_LENGTH)
            for i in range(0, len(sentences), TEXT_BATCH)]


def _fmt(v: Any, digits: int = 6) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}g}"


def _cos(v: Any) -> str:
    """Cosines with six decimals: 0.9999996 must not print as 1."""
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6f}"


def _sites_table(sites: list[dict], with_reason: bool) -> tuple[Any, list[str]]:
    """The per-site table; without ``with_reason`` the reasons come back as numbered notes."""
    from rich.table import Table

    table = Table(title="surgeon optimize — sites")
    table.add_column("kind", no_wrap=True)
    table.add_column("module", no_wrap=True)
    table.add_column("status", no_wrap=True)
    for col in ("SQNR dB", "cosine", "solo e2e"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("reason" if with_reason else "note", overflow="fold", min_width=30 if with_reason else None)
    style = {"applied": "green", "rolled_back": "red", "skipped": "dim"}
    notes: list[str] = []
    for s in sites:
        m = s.get("metrics") or {}
        status = s["status"] + (" (exact)" if s.get("exact") else "")
        reason = s.get("reason", "")
        if reason and not with_reason:
            notes.append(reason)
            reason = f"[{len(notes)}]"
        table.add_row(s["kind"], s["module"] or "<root>", f"[{style.get(s['status'], '')}]{status}[/]",
                      _fmt(m.get("sqnr_db"), 4), _cos(m.get("cosine")),
                      _cos((s.get("solo_end_to_end") or {}).get("cosine_mean")), reason)
    return table, notes


def print_summary(result: Result, outdir: Path, console: Any = None) -> None:
    """Per-site table and the headline figures."""
    from rich.console import Console

    from ._console import table_fits

    console = console or Console()
    r = result.report
    # The module path identifies the site: never truncate it. Pick the richest layout whose
    # narrowest rendering fits: the table with reasons, the table with numbered notes under it, or
    # (narrow terminals) one line per site.
    layout = None
    for with_reason in (True, False):
        table, notes = _sites_table(r["sites"], with_reason)
        if table_fits(table, console.width):
            layout = (table, notes)
            break
    if r["sites"] and layout is None:
        for s in r["sites"]:
            m = s.get("metrics") or {}
            console.print(f"{s['kind']} {s['module'] or '<root>'}: {s['status']}" + (" (exact)" if s.get("exact") else "")
                          + (f", SQNR {_fmt(m.get('sqnr_db'), 4)} dB, cosine {_cos(m.get('cosine'))}"
                             if m.get("cosine") is not None else "") + (f" — {s['reason']}" if s.get("reason") else ""),
                          soft_wrap=True, markup=False, highlight=False)
    elif r["sites"]:
        console.print(layout[0])
        for i, note in enumerate(layout[1], 1):
            console.print(f"  [{i}] {note}", soft_wrap=True, markup=False, highlight=False)
    c, e = r["counts"], r["end_to_end"]
    console.print(f"sites: {c['applied']} applied, {c['rolled_back']} rolled back, {c['skipped']} skipped",
                  soft_wrap=True)
    line = (f"end to end ({e['samples']} check samples): cosine mean {_cos(e['cosine_mean'])}, "
            f"min {_cos(e['cosine_min'])}, max rel err {_fmt(e['max_rel_err'], 4)}")
    if e.get("metric") is not None:
        line += f", metric {_fmt(e['metric'])}"
    console.print(line + f" — tolerance ({r['tolerance']['description']}) "
                  + ("met" if r["tolerance"]["met"] else "NOT met"), soft_wrap=True)
    written = r.get("outputs", {}).get("target")
    extra = "".join(f", {outdir / f}" for f in ([written] if isinstance(written, str) else written or []))
    console.print(f"report: {outdir / 'report.html'} ({outdir / 'report.json'}); model: {outdir / 'model.pt2'}{extra}",
                  soft_wrap=True, markup=False, highlight=False)


def run_cli(args: Any) -> int:
    """``surgeon optimize`` (argparse namespace from ``surgeon.cli``).

    Under ``torchrun`` (WORLD_SIZE > 1) it joins a gloo process group first (``--dist-timeout``):
    every rank loads the model and data, calibration and verification are shared
    (``surgeon.distributed``), and only rank 0 writes OUTDIR and prints."""
    import torch.distributed as tdist

    from . import distributed

    created = not (tdist.is_available() and tdist.is_initialized())
    joined = distributed.init_from_env(getattr(args, "dist_timeout", None))
    try:
        return _run_cli(args, distributed.is_writer())
    finally:
        if joined and created:
            tdist.destroy_process_group()


def _run_cli(args: Any, writer: bool) -> int:
    from . import distributed
    from ._resources import check_output_dir
    from .load import load_model

    out = Path(args.output)
    force = bool(getattr(args, "force", False))
    error: SurgeonError | None = None
    timings: dict[str, float] = {}
    try:  # every rank checks the options and reads the inputs; any rank's error stops all of them
        if writer:
            check_output_dir(out, force)
        target = getattr(args, "target", "torch") or "torch"
        check_target(target)
        pass_list = parse_pipeline(args.passes or DEFAULT_PASSES)
        tol = parse_tolerance(args.tolerance)

        t = time.perf_counter()
        loaded = load_model(args.model, trust_pickle=getattr(args, "trust_pickle", False),
                            text=getattr(args, "text", None))
        timings["load"] = time.perf_counter() - t
        calib = read_calibration(args.calib, loaded) if args.calib else None
    except SurgeonError as exc:
        error = exc
    distributed.agree(error, "reading the model and calibration data")
    if not args.calib and writer:
        print("surgeon: warning: no --calib given: the example inputs calibrate and check the model, so the "
              "calibration is weak (give a calibration file)", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CLI prints its own warnings from the report
        # One intra-op thread unless the user chose (OMP_NUM_THREADS): calibration batches are small,
        # and on a busy CPU spinning OpenMP workers made the whole run 3.4x slower (89 s vs 26 s for
        # MiniLM on this 2-core machine under load, bench/optimize_minilm.py).
        threads = None if os.environ.get("OMP_NUM_THREADS") else 1
        result = optimize(loaded.model, loaded.example_inputs, calib, passes=pass_list, tolerance=tol,
                          seed=getattr(args, "seed", 0), progress=sys.stderr.isatty() or sys.stdout.isatty(),
                          source=str(args.model), threads=threads, _timings=timings)
    for note in result.report["warnings"] if writer else []:
        if args.calib or "weak" not in note:
            print(f"surgeon: warning: {note}", file=sys.stderr)
    result.save(out, force=force, target=target)
    if not writer:
        return 0 if result.met else ToleranceNotMet.exit_code
    print_summary(result, out)
    if not result.met:
        e = result.report["end_to_end"]
        raise ToleranceNotMet(f"tolerance not met ({result.report['tolerance']['description']}): best model kept "
                              f"{result.report['counts']['applied']} site(s), cosine mean {_cos(e['cosine_mean'])}; "
                              f"written to {out}")
    return 0
