"""Stages 3 and 5 of ``optimize``: run the passes on a copy of the captured graph, fit them on the fit
batches (``calibrate``, then each pass's ``fit``), and ``rebuild`` a fresh copy with only the sites the
guard kept, their fitted state copied site by site."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import fx, nn

from ..errors import SurgeonError, stage
from ..inputs import Inputs
from ..pass_manager import Diagnostic, Pass, PassContext, PassManager, parse_pipeline, set_site_active, set_site_rung

__all__ = ["Applied", "apply_passes", "fit_passes", "rebuild", "resolve_passes"]


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


def apply_passes(gm0: fx.GraphModule, passes: Sequence[Pass], seed: int = 0, profile: Any = None) -> Applied:
    """Run the pipeline on a deep copy of ``gm0`` (which stays untouched); ``profile``: the deploy
    target's runtime profile the passes read (``surgeon.profile.Profile``), None for none."""
    manager = PassManager(list(passes))
    gm, ctx, diags = manager.run(copy.deepcopy(gm0), PassContext(options={"seed": seed}, profile=profile))
    return Applied(gm, ctx, diags, manager.passes)


def fit_passes(applied: Applied, fit: Sequence[Inputs], *, progress: bool = False) -> dict:
    """Calibrate every calibratable on the fit batches, then run each pass's ``fit``.

    Under a process group (``surgeon.distributed``) ``fit`` is the full fit list on every rank: each
    rank calibrates on its share and the statistics are all-reduced (when every calibratable can;
    otherwise every rank calibrates on all of them); each pass's ``fit`` runs on every fit batch on
    every rank with the same seed, and rank 0's fitted site state is broadcast so all ranks verify the
    same model."""
    from .. import distributed
    from ..calibration import calibratables, calibrate, can_all_reduce

    info: dict[str, Any] = {"calibrated": 0}
    with torch.random.fork_rng(devices=[]):  # seeded fitting without touching the caller's RNG state
        torch.manual_seed(int(applied.ctx.options.get("seed", 0)))
        found = calibratables(applied.gm)
        if found:
            sharded = can_all_reduce(found)
            with stage("calibrate", model=applied.gm):
                stats = calibrate(applied.gm, distributed.shard(fit) if sharded else list(fit), desc="calibrating",
                                  progress=progress, distributed=sharded)
            info = stats.to_json()
        for p in applied.passes:
            with stage("fit", pass_name=p.name, model=applied.gm):
                p.fit(applied.gm, applied.ctx, list(fit))
        if distributed.active() and any(type(p).fit is not Pass.fit for p in applied.passes):
            distributed.broadcast_module_state(_fitted_modules(applied))
    return info


def _fitted_modules(applied: Applied) -> list[nn.Module]:
    """What a fit may change: every site's submodules and every calibratable (what ``rebuild`` copies)."""
    from ..calibration import calibratables

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
    from ..calibration import calibratables

    ctx = PassContext(enabled_sites=set(kept), options=dict(applied.ctx.options), profile=applied.ctx.profile)
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
        setattr(module, "mode", "quant")  # noqa: B010 - a calibratable's mode, not a tensor
    final.recompile()
    return final, ctx

