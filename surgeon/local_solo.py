"""Each site's solo error where it acts, for guards over many sites (issue 27 item 6).

The guard ranks its moves by each site's solo figures. Measured end to end, that is one whole-model
forward per site, rung and check batch: sites × model size, which grows as the square of depth (a
24-layer BERT has twice the sites of a 12-layer one, each forward twice the cost). Where the site
acts, it is one forward: the graph runs with every site off (the exact computation), and each site's
submodule, met on the way, is run again on the very inputs it received with its substitute on at
each rung; its relative output error is

    e(site, rung) = Σ_calls ‖y_rung − y‖² / Σ_calls ‖y‖²       (summed over the site's submodules)

the error a GPTQ-style sequential method measures on recorded block inputs. The guard then ranks by
e and confirms only configurations end to end (``descent.Stepper`` with ``gallop``: O(log moves)
whole-model measurements). The figure ranks; it is not the end-to-end error, and the report says so
(``sites[].solo_local_rel_err``).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import fx, nn

from . import distributed
from .descent import ladder
from .inputs import Inputs, call
from .pass_manager import SiteRecord

__all__ = ["LOCAL_SOLO_SITES", "local_solo_errors"]

#: More sites than this: the guard's solo figures are measured where each site acts (``local_solo_errors``)
#: and the descent gallops. Below it the whole-model solo figures are cheap enough and say more (they
#: see what a site does to the model's output).
LOCAL_SOLO_SITES = 48


def _switch(module: nn.Module, rung: str | None, ranked: bool) -> None:
    module.active = rung is not None  # type: ignore[assignment]
    if rung is not None and ranked and hasattr(module, "rung"):
        module.rung = rung  # type: ignore[assignment]


def local_solo_errors(gm: fx.GraphModule, records: Sequence[SiteRecord], check: Sequence[Inputs], *,
                      distributed_run: bool | None = None) -> dict[tuple[str, str], float] | None:
    """``e(site, rung)`` for every site of ``gm`` and every rung of its ladder but ``keep``, from one
    forward per check batch with every site off; None where a site cannot be measured so (a submodule
    that is no module, is never called, or returns no tensor): the caller measures end to end."""
    subs: dict[str, tuple[SiteRecord, nn.Module]] = {}
    for r in records:
        for name in r.submodules:
            try:
                module = gm.get_submodule(name)
            except AttributeError:
                return None
            if name in subs:  # shared by two sites: its error is not one site's
                return None
            subs[name] = (r, module)
    sums = {(name, rung): [0.0, 0.0] for name, (r, _) in subs.items() for rung in ladder(r)[:-1]}
    called: set[str] = set()
    busy = [False]

    def hook_for(name: str, r: SiteRecord) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if busy[0] or not isinstance(output, torch.Tensor) or not output.is_floating_point():
                return
            busy[0] = True
            try:
                ref = output.detach().double()
                norm = float((ref * ref).sum())
                for rung in ladder(r)[:-1]:
                    _switch(module, rung, bool(r.rungs))
                    diff = module(*args, **kwargs).detach().double() - ref
                    acc = sums[(name, rung)]
                    acc[0] += float((diff * diff).sum())
                    acc[1] += norm
                called.add(name)
            finally:
                _switch(module, None, bool(r.rungs))
                busy[0] = False
        return hook

    for _, module in subs.values():
        _switch(module, None, False)
    handles = [m.register_forward_hook(hook_for(n, r), with_kwargs=True) for n, (r, m) in subs.items()]
    try:
        with torch.no_grad():
            for batch in check:
                call(gm, batch)
    finally:
        for h in handles:
            h.remove()
    keys = list(sums)
    flat = torch.tensor([v for k in keys for v in sums[k]] + [float(len(called) != len(subs))], dtype=torch.float64)
    if distributed.active() if distributed_run is None else distributed_run:
        flat = distributed.all_reduce(flat, "sum", what="the sites' local errors")
    if float(flat[-1]) > 0:  # a submodule some rank never saw called
        return None
    out: dict[tuple[str, str], float] = {}
    for i, (name, rung) in enumerate(keys):
        err, norm = float(flat[2 * i]), float(flat[2 * i + 1])
        site = subs[name][0].site
        out[(site, rung)] = out.get((site, rung), 0.0) + (err / norm if norm > 0 else 0.0)
    return out
