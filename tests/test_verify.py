"""The verification guard's parts: tolerance parsing, streaming figures, taps, rollback order."""

from __future__ import annotations

import math

import pytest
import torch
from torch import fx, nn

from surgeon.capture import capture
from surgeon.errors import SurgeonError
from surgeon.metrics import PairStats, sqnr_db
from surgeon.pass_manager import SiteRecord
from surgeon.tap import flat_inputs, run_tapped
from surgeon.tolerance import Tolerance, parse_tolerance
from surgeon.verify import guard, measure_model


# --------------------------------------------------------------------------------------------------
# tolerance
# --------------------------------------------------------------------------------------------------
def test_parse_tolerance_forms() -> None:
    assert parse_tolerance(None) == Tolerance(cosine_mean=0.999)
    assert parse_tolerance("0.99") == Tolerance(cosine_mean=0.99)
    assert parse_tolerance(0.98) == Tolerance(cosine_mean=0.98)
    t = parse_tolerance("cosine_min=0.995, cosine_mean=0.999")
    assert (t.cosine_mean, t.cosine_min, t.max_rel_err, t.metric) == (0.999, 0.995, None, None)
    assert list(t.bounds()) == ["cosine_min", "cosine_mean"]  # min first: the stricter per-sample check
    assert parse_tolerance({"max_rel_err": "0.1"}) == Tolerance(cosine_mean=None, max_rel_err=0.1)
    assert parse_tolerance(0.7, has_metric=True) == Tolerance(cosine_mean=None, metric=0.7)
    assert parse_tolerance("metric=0.5,cosine_min=0.9", has_metric=True).bounds() == {"metric": 0.5, "cosine_min": 0.9}
    assert parse_tolerance("cosine_min=0.995,cosine_mean=0.999").describe() == "cosine_min ≥ 0.995, cosine_mean ≥ 0.999"


@pytest.mark.parametrize("spec, has_metric, message", [
    ("1.5", False, "tolerance cosine_mean=1.5 is not a cosine in [-1, 1]"),
    ("abc", False, "cannot parse tolerance 'abc': give a number (minimum mean cosine) or key=value pairs "
                   "(cosine_mean, cosine_min, max_rel_err, metric, agreement, margin)"),
    ("cosine_mean=x", False, "tolerance cosine_mean=x is not a number"),
    ("cosine_max=0.9", False,
     "unknown tolerance key 'cosine_max' (known: cosine_mean, cosine_min, max_rel_err, metric, agreement, margin)"),
    ("cosine-mean=0.99", False, "unknown tolerance key 'cosine-mean' (known: cosine_mean, cosine_min, max_rel_err, "
                                "metric, agreement, margin; did you mean cosine_mean?)"),
    ("agreement=1.5", False, "tolerance agreement=1.5 is not a fraction in [0, 1]"),
    ("margin=maybe", False, "tolerance margin=maybe must be 1 (the margin rule, default) or 0 (as measured)"),
    ("margin=0", False, "empty tolerance: name at least one criterion"),
    ("cosine_min 0.9", False, "cannot parse tolerance 'cosine_min 0.9': give a number"),
    ("cosine_min=0.9,oops", False, "cannot parse tolerance 'cosine_min=0.9,oops': 'oops' is not key=value"),
    ("max_rel_err=-1", False, "tolerance max_rel_err=-1 must be ≥ 0"),
    ("metric=0.5", False, "tolerance names 'metric' but no metric callable was given"),
    (None, True, "a user metric needs a tolerance: the minimum metric value to accept (e.g. tolerance=0.99)"),
    ({}, False, "empty tolerance: name at least one criterion (e.g. cosine_mean=0.999)"),
])
def test_parse_tolerance_errors(spec: object, has_metric: bool, message: str) -> None:
    with pytest.raises(SurgeonError) as info:
        parse_tolerance(spec, has_metric=has_metric)  # type: ignore[arg-type]
    assert str(info.value).startswith(message)


# --------------------------------------------------------------------------------------------------
# streaming figures
# --------------------------------------------------------------------------------------------------
def test_pair_stats_match_closed_forms_and_do_not_depend_on_batching() -> None:
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(12, 5, 7, generator=g)
    out = ref + 0.05 * torch.randn(12, 5, 7, generator=g)
    out[3] = -ref[3]  # one sample pointing the other way: cosine -1
    whole, split = PairStats(), PairStats()
    whole.update(ref, out)
    for a, b in zip(ref.split(5), out.split(5)):
        split.update(a, b)
    r, o = ref.double(), out.double()
    cos = torch.nn.functional.cosine_similarity(r.flatten(1), o.flatten(1), dim=1)
    fig = whole.figures()
    assert fig.samples == 12
    assert fig.cosine_mean == pytest.approx(float(cos.mean()), abs=1e-12)
    assert fig.cosine_min == pytest.approx(-1.0, abs=1e-12)
    assert fig.max_rel_err == pytest.approx(float((r - o).abs().max() / r.abs().max()), rel=1e-12)
    assert fig.sqnr_db == pytest.approx(10 * math.log10(float((r * r).sum() / ((r - o) ** 2).sum())), rel=1e-12)
    site = whole.site_metrics()
    assert site["cosine"] == pytest.approx(float(torch.nn.functional.cosine_similarity(r.flatten(), o.flatten(), dim=0)))
    f2 = split.figures()
    for k in ("cosine_mean", "cosine_min", "max_rel_err", "sqnr_db"):
        assert getattr(f2, k) == pytest.approx(getattr(fig, k), rel=1e-12, abs=1e-15)


def test_pair_stats_edge_cases() -> None:
    s = PairStats()
    x = torch.randn(2, 3)
    s.update(x, x.clone())
    assert s.figures().cosine_min == pytest.approx(1.0) and s.site_metrics()["sqnr_db"] == math.inf
    bad = PairStats()
    y = x.clone()
    y[0, 0] = float("nan")
    bad.update(x, y)
    assert math.isnan(bad.figures().cosine_mean) and math.isnan(bad.site_metrics()["sqnr_db"])
    assert Tolerance().violations(bad.figures()) == ["cosine_mean"]  # NaN never passes
    mism = PairStats()
    mism.update(torch.zeros(2, 3), torch.zeros(3, 2))
    assert mism.site_metrics() == {"sqnr_db": None, "cosine": None, "max_rel_err": None}
    zero = PairStats()
    zero.update(torch.zeros(2, 3), torch.zeros(2, 3))
    assert zero.figures().cosine_mean == 1.0 and zero.figures().max_rel_err == 0.0
    assert sqnr_db(1.0, 0.1) == pytest.approx(10.0)


# --------------------------------------------------------------------------------------------------
# taps and the guard on a hand-built rewrite
# --------------------------------------------------------------------------------------------------
class Noise(nn.Module):
    """A switchable site: adds ``amp``·(a fixed pattern) when active."""

    def __init__(self, amp: float) -> None:
        super().__init__()
        self.amp, self.active = amp, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        return x + self.amp * torch.cos(torch.arange(x.shape[-1], dtype=x.dtype) * 1.7) * x.abs().mean()


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 6)

    def forward(self, x: torch.Tensor, *, scale: torch.Tensor) -> dict:
        h = torch.tanh(self.a(x))
        h = torch.tanh(self.b(h))
        return {"y": self.c(h) * scale, "ids": torch.ones(2, dtype=torch.long)}


def _rewrite(gm0: fx.GraphModule, amps: list[float]) -> tuple[fx.GraphModule, list[SiteRecord]]:
    import copy

    gm = copy.deepcopy(gm0)
    records = []
    tanhs = [n for n in gm.graph.nodes if "tanh" in str(n.target)]
    for i, (node, amp) in enumerate(zip(tanhs, amps)):
        gm.add_submodule(f"noise{i}", Noise(amp))
        with gm.graph.inserting_after(node):
            new = gm.graph.call_module(f"noise{i}", (node,))
        node.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)
        records.append(SiteRecord(f"s{i}", "toy", f"m{i}", "noise", [f"noise{i}"], probe=new.name, reference=node.name))
    gm.recompile()
    return gm, records


@pytest.fixture(scope="module")
def captured() -> tuple[fx.GraphModule, dict]:
    ex = {"x": torch.randn(3, 4, 6), "scale": torch.tensor(2.0)}
    return capture(Net().eval(), ex).gm, ex


def test_flat_inputs_and_taps(captured: tuple) -> None:
    gm0, ex = captured
    swapped = {"scale": ex["scale"], "x": ex["x"]}  # keyword order differs from the captured one
    leaves = flat_inputs(gm0, swapped)
    assert [t.shape for t in leaves] == [torch.Size([3, 4, 6]), torch.Size([])]  # placeholders: x, scale
    tanh = [n.name for n in gm0.graph.nodes if "tanh" in str(n.target)]
    out, vals = run_tapped(gm0, ex, tanh)
    assert set(vals) == set(tanh)
    direct = gm0(**ex)
    torch.testing.assert_close(out["y"], direct["y"], rtol=0, atol=0)
    expected = torch.tanh(Net().eval().a(ex["x"]))
    torch.testing.assert_close(vals[tanh[0]], expected)


def test_guard_rolls_back_the_worst_site_first(captured: tuple) -> None:
    gm0, ex = captured
    gm, records = _rewrite(gm0, [0.001, 0.5])
    check = [{"x": torch.randn(2, 5, 6), "scale": torch.tensor(1.5)} for _ in range(3)]
    res = guard(gm0, gm, records, check, Tolerance(cosine_mean=0.9999))
    s0, s1 = res.sites
    assert (s0.status, s1.status) == ("applied", "rolled_back")
    assert s1.cause["criterion"] == "cosine_mean" and s1.cause["solo"] == s1.solo.cosine_mean < 0.9999
    assert s0.metrics["sqnr_db"] > s1.metrics["sqnr_db"] + 40  # 500× the amplitude → ~54 dB apart
    assert res.kept == ["s0"] and res.met
    assert [st["rolled_back"] for st in res.steps] == [None, "s1"]
    # gm is left in the kept configuration, and its figures are the reported ones.
    assert (gm.noise0.active, gm.noise1.active) == (True, False)
    again = measure_model(gm0, gm, check)
    assert again.cosine_mean == pytest.approx(res.end_to_end.cosine_mean, abs=1e-12)
    assert res.samples == 6 and res.batches == 3


def test_guard_ranks_by_the_violated_criterion(captured: tuple) -> None:
    gm0, ex = captured
    gm, records = _rewrite(gm0, [0.2, 0.02])
    check = [{"x": torch.randn(4, 3, 6), "scale": torch.tensor(1.0)}]
    res = guard(gm0, gm, records, check, parse_tolerance("max_rel_err=1e-9"))
    # Every site violates an exact bound: both rolled back, the bigger one first.
    assert [st["rolled_back"] for st in res.steps] == [None, "s0", "s1"]
    assert res.kept == [] and res.met and res.end_to_end.max_rel_err == 0.0
    assert all(s.status == "rolled_back" and s.cause["criterion"] == "max_rel_err" for s in res.sites)


def test_guard_with_metric_keeps_the_best_configuration(captured: tuple) -> None:
    gm0, ex = captured
    gm, records = _rewrite(gm0, [0.01, 0.3])
    check = [{"x": torch.randn(2, 3, 6), "scale": torch.tensor(1.0)}]
    seen = []

    def metric(ref: dict, out: dict) -> float:
        seen.append((type(ref), type(out)))
        return 0.5  # never reaches the bound, whatever is kept

    res = guard(gm0, gm, records, check, parse_tolerance(0.9, has_metric=True), metric)
    assert not res.met and res.end_to_end.metric == 0.5
    assert res.kept == ["s0", "s1"]  # all configurations tie: the one with most sites is kept
    assert all(s.status == "applied" for s in res.sites)
    assert seen and all(t == (dict, dict) for t in seen)  # the metric sees the model's own outputs


def test_guard_without_check_data_refuses(captured: tuple) -> None:
    gm0, _ = captured
    gm, records = _rewrite(gm0, [0.1])
    with pytest.raises(SurgeonError, match="^no check batches to verify on$"):
        guard(gm0, gm, records, [], Tolerance())
