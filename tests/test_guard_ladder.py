"""The guard's ladder and benefit: step a site down before rolling it back, keep what pays most per error."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx, nn

from surgeon.capture import capture
from surgeon.pass_manager import SiteRecord
from surgeon.tolerance import Tolerance
from surgeon.verify import guard, measure_model


class Noise(nn.Module):
    """A switchable site with rungs: adds ``amps[rung]``·(a fixed pattern) while active."""

    def __init__(self, amps: dict[str, float], phase: float = 0.0) -> None:
        super().__init__()
        self.amps, self.active, self.phase = amps, True, phase
        self.rung = next(iter(amps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        pattern = torch.cos(torch.arange(x.shape[-1], dtype=x.dtype) * 1.7 + len(self.rung) + self.phase)
        return x + self.amps[self.rung] * pattern * x.abs().mean()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


@pytest.fixture(scope="module")
def gm0() -> fx.GraphModule:
    return capture(Net().eval(), (torch.randn(3, 4, 6),)).gm


CHECK = [(torch.randn(2, 5, 6, generator=torch.Generator().manual_seed(i)),) for i in range(3)]


def _rewrite(gm0: fx.GraphModule, sites: list[tuple[dict[str, float], dict[str, dict[str, float]]]]
             ) -> tuple[fx.GraphModule, list[SiteRecord]]:
    """One Noise site after each tanh: ``(amps by rung, benefit by rung)``; a single "on" rung with
    no benefit gives a plain on/off site."""
    gm = copy.deepcopy(gm0)
    records = []
    tanhs = [n for n in gm.graph.nodes if "tanh" in str(n.target)]
    for i, (node, (amps, benefit)) in enumerate(zip(tanhs, sites)):
        gm.add_submodule(f"noise{i}", Noise(amps, phase=2.3 * i))
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(f"noise{i}", (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)
        rungs = tuple(amps) if len(amps) > 1 or benefit else ()
        records.append(SiteRecord(f"s{i}", "toy", f"m{i}", "noise", [f"noise{i}"], probe=new.name,
                                  reference=node.name, rungs=rungs, benefit=benefit))
    gm.recompile()
    return gm, records


def _solo(gm0: fx.GraphModule, sites: list, which: int) -> float:
    gm, records = _rewrite(gm0, sites)
    for i, r in enumerate(records):
        gm.get_submodule(r.submodules[0]).active = i == which
    return measure_model(gm0, gm, CHECK).cosine_mean


def test_benefit_keeps_the_high_benefit_site_although_its_error_is_larger(gm0: fx.GraphModule) -> None:
    # s0: a big layer (100× the bytes and multiply-adds of s1) with the larger error; removing
    # either site meets the bound. By error alone s0 would go (test_verify's worst-first case);
    # per unit of benefit, s1 costs far more error for what it buys, so s1 goes and s0 stays.
    big = {"on": {"weight_bytes": 100.0, "macs": 100.0}}
    small = {"on": {"weight_bytes": 1.0, "macs": 1.0}}
    sites = [({"on": 0.05}, big), ({"on": 0.02}, small)]
    solo0, solo1 = _solo(gm0, sites, 0), _solo(gm0, sites, 1)
    assert solo0 < solo1 < 1.0  # s0 is the worse site on its own
    gm, records = _rewrite(gm0, sites)
    everything = measure_model(gm0, gm, CHECK).cosine_mean
    assert everything < solo0  # the errors add up
    bound = (everything + solo0) / 2  # all on misses it; s0 alone (s1 rolled back) meets it
    res = guard(gm0, gm, records, CHECK, Tolerance(cosine_mean=bound))
    s0, s1 = res.sites
    assert res.met and res.kept == ["s0"]
    assert (s0.status, s1.status) == ("applied", "rolled_back")
    assert "rolled back before worse sites" in s1.reason and "per benefit given up" in s1.reason
    # the same two sites without benefits: the worst (s0) goes first, as the error-only guard did
    gm, records = _rewrite(gm0, [({"on": 0.05}, {}), ({"on": 0.02}, {})])
    res = guard(gm0, gm, records, CHECK, Tolerance(cosine_mean=bound))
    assert [st["rolled_back"] for st in res.steps][:2] == [None, "s0"]


def test_a_site_steps_down_its_ladder_before_it_is_rolled_back(gm0: fx.GraphModule) -> None:
    same = {"weight_bytes": 10.0, "macs": 10.0}
    # s0's first rung is noisy, its second nearly exact at the same benefit: stepping costs nothing
    sites = [({"static": 0.3, "dynamic": 0.001}, {"static": same, "dynamic": same}),
             ({"static": 0.001}, {"static": same})]
    gm, records = _rewrite(gm0, sites)
    res = guard(gm0, gm, records, CHECK, Tolerance(cosine_mean=0.99999))
    s0, s1 = res.sites
    assert res.met and res.kept == ["s0", "s1"]
    assert res.rungs == {"s0": "dynamic", "s1": "static"}
    assert (s0.status, s0.rung, s0.ladder) == ("applied", "dynamic", ("static", "dynamic", "keep"))
    assert s0.reason.startswith("static → dynamic: end-to-end cosine_mean ")
    assert set(s0.solo_rungs) == {"static", "dynamic"}
    assert s0.solo_rungs["dynamic"].cosine_mean > s0.solo_rungs["static"].cosine_mean
    assert res.steps[1]["stepped"] == {"site": "s0", "to": "dynamic"} and res.steps[1]["rolled_back"] is None
    # gm is left on the chosen rungs, and its figures are the reported ones
    assert (gm.noise0.rung, gm.noise0.active, gm.noise1.active) == ("dynamic", True, True)
    assert measure_model(gm0, gm, CHECK).cosine_mean == pytest.approx(res.end_to_end.cosine_mean, abs=1e-12)


def test_a_site_whose_lower_rung_is_worse_goes_straight_to_keep(gm0: fx.GraphModule) -> None:
    same = {"weight_bytes": 10.0, "macs": 10.0}
    sites = [({"static": 0.2, "dynamic": 0.4}, {"static": same, "dynamic": same})]
    gm, records = _rewrite(gm0, sites)
    res = guard(gm0, gm, records, CHECK, Tolerance(cosine_mean=0.99999))
    (s0,) = res.sites
    assert res.met and res.kept == [] and s0.rung == "keep" and s0.status == "rolled_back"
    assert [st["rolled_back"] for st in res.steps] == [None, "s0"]  # one step: dynamic is never tried
