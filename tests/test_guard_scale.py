"""The guard at scale: a decoder's hundreds of weight sites are ranked by their error where they act
(no model run per site) and stepped down galloping (1, 2, 4, ... sites a measurement), so the guard's
cost is O(log sites) whole-model measurements, not sites × rungs.

* ``WeightOnlyLinear.output_error`` is E‖xΔW‖² / E‖xW‖² on the inputs whose moments it was given
  (checked against the layer's outputs computed directly);
* the fit sets it for every rung, with GPTQ rounding and with nearest rounding;
* on a tiny Llama with 15 weight sites, a tolerance that every int4 rung breaks costs the guard at
  most 2 + 2⌈log2(15 × rungs)⌉ measurements (a prefix search over the ranked moves; the old descent
  measured 15 solo figures first), and what it keeps meets the tolerance.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _decoder_models import LINES, save_lm
from torch import nn

from surgeon.capture import capture
from surgeon.pass_manager import PassContext, PassManager
from surgeon.passes._quant_weight import WeightOnlyLinear
from surgeon.profile import ORT_CPU


@pytest.mark.parametrize("out,rel", [(48, 1e-5), (6000, 0.1)])  # 6000 > ERROR_COLUMNS: a column subset
def test_output_error_is_the_relative_output_error_on_those_inputs(out: int, rel: float) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, out)
    layer = WeightOnlyLinear("linear", lin.weight, lin.bias, ("int4-b32", "int8w"))
    x = torch.randn(500, 64, dtype=torch.float64) * torch.linspace(0.1, 3.0, 64, dtype=torch.float64)
    h = x.t() @ x / x.shape[0]
    w = lin.weight.detach().double().t()
    for rung in layer.rungs:
        dw = layer.dequantized_weight(rung).double() - w
        direct = float((x @ dw).pow(2).sum() / (x @ w).pow(2).sum())
        assert layer.output_error(h, rung) == pytest.approx(direct, rel=rel)
    # int8 per channel is finer than int4 in blocks of 32
    assert layer.output_error(h, "int8w") < layer.output_error(h, "int4-b32") / 10


def test_a_copy_does_not_carry_the_dequantized_weights() -> None:
    import copy

    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    layer = WeightOnlyLinear("linear", lin.weight, lin.bias, ("int4-b32", "int8w"))
    x = torch.randn(3, 64)
    y = layer(x)
    assert set(layer._dq_cache) == {"int4-b32"}
    twin = copy.deepcopy(layer)
    assert twin._dq_cache == {} and layer._dq_cache
    assert torch.equal(twin(x), y)


@pytest.mark.parametrize("rounding", ["gptq", "nearest"])
def test_the_fit_sets_each_rungs_local_error(rounding: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.SiLU(), nn.Linear(256, 128)).eval()
    example = (torch.randn(2, 8, 128),)
    manager = PassManager(f"linear-quant{{dtype=int4,rounding={rounding}}}")
    gm, ctx, _ = manager.run(capture(model, example).gm, PassContext(profile=ORT_CPU))
    manager.passes[0].fit(gm, ctx, [(torch.randn(2, 8, 128),) for _ in range(4)])
    layers = [m for m in gm.modules() if isinstance(m, WeightOnlyLinear)]
    assert len(layers) == 2
    for m in layers:
        assert set(m.local_error) == set(m.rungs)
        assert all(0 < e < 0.1 for e in m.local_error.values())
        assert m.local_error["int8w"] < m.local_error[m.rungs[0]]


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_lm("llama", tmp_path_factory.mktemp("lm") / "llama")


def test_the_decoder_guard_costs_log_sites_measurements(llama: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from surgeon.decoder import check, pipeline
    from surgeon.decoder.pipeline import optimize_decoder

    calls: list[int] = []
    inside: list[bool] = [False]
    real_score, real_guard = check.score, check.guard_sites

    def counting(runner, texts, **kw):  # type: ignore[no-untyped-def]
        calls.extend([1] if inside[0] else [])
        return real_score(runner, texts, **kw)

    def guard(*args, **kw):  # type: ignore[no-untyped-def]
        inside[0] = True
        try:
            return real_guard(*args, **kw)
        finally:
            inside[0] = False

    monkeypatch.setattr(check, "score", counting)
    monkeypatch.setattr(pipeline, "guard_sites", guard)
    calib = tmp_path / "prompts.txt"
    calib.write_text("\n".join(LINES + [s.lower() for s in LINES]) + "\n")
    # agreement 1.0 exactly: no int4 rung keeps every greedy token, so the guard must step sites down
    report = optimize_decoder(llama, tmp_path / "out", passes="linear-quant{dtype=int4}", calib=str(calib),
                              tolerance="ppl_increase=0.5,agreement=1.0", speed=False)
    sites = [s for s in report["sites"] if s["kind"] == "linear"]
    assert len(sites) == 15
    assert all("local_rel_err" in s["solo"] for s in sites)
    moved = [s for s in sites if s["rung"] != s["ladder"][0]]
    assert moved, "the tolerance was meant to make the guard step down"
    # guard_sites' measurements: every site on, then the prefix search over the ranked moves (at most 15
    # sites × 3 rungs): 1, 2, 4, ... moves, then a bisection — ≤ 2⌈log2(45)⌉ + 2 (one site a step with
    # whole-model solo figures: 15 solo runs + one per move)
    rungs = len(sites[0]["ladder"]) - 1
    assert len(calls) <= 2 + 2 * math.ceil(math.log2(15 * rungs)), len(calls)
    # the guard's own figures (torch) met it; the file's (MatMulNBits quantizes activations) may flip a token
    assert report["tolerance"]["met_in_torch"] is True


class _Deep(nn.Module):
    """60 residual Linear blocks on [batch, 32]: more sites than ``LOCAL_SOLO_SITES``."""

    def __init__(self, n: int = 60, d: int = 32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + 0.2 * torch.tanh(layer(x))
        return x


def test_many_site_module_guard_ranks_where_sites_act_and_gallops(monkeypatch: pytest.MonkeyPatch) -> None:
    """The module guard over 60 Linear sites: the solo figures are each site's relative output error
    where it acts (one forward with every site off), and the whole-model measurements are every site
    on plus O(log moves) configurations — not 60 × rungs solo forwards."""
    import surgeon
    from surgeon import verify
    from surgeon.local_solo import LOCAL_SOLO_SITES

    calls: list[int] = []
    real = verify.measure_config
    monkeypatch.setattr(verify, "measure_config", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(1)
    calib = [(torch.randn(4, 32, generator=g),) for _ in range(40)]
    model = _Deep().eval()
    result = surgeon.optimize(model, (torch.randn(4, 32),), calib, passes="linear-quant",
                              tolerance="cosine_mean=0.9999,margin=0", threads=1)
    sites = result.report["sites"]
    assert len(sites) == 60 > LOCAL_SOLO_SITES
    assert all("solo_local_rel_err" in s and "solo_end_to_end" not in s for s in sites)
    rungs = len(sites[0]["ladder"]) - 1
    moved = [s for s in sites if s["rung"] != s["ladder"][0]]
    assert moved, "the tolerance was meant to make the guard step down"
    assert len(calls) <= 2 * math.ceil(math.log2(60 * rungs)) + 2, len(calls)
    assert result.report["tolerance"]["met"] and result.report["end_to_end"]["cosine_mean"] >= 0.9999
    # the ranking figure is the layer's relative output error on the check inputs (as the original model
    # feeds them), measured directly on a layer written at its first rung
    gm = result.module
    check = [b for i, b in enumerate(calib) if i in set(result.report["calibration"]["check_index"])]
    site = next(s for s in sites if s["status"] == "applied" and s["rung"] == s["ladder"][0])
    k = int(site["module"].rsplit(".", 1)[-1])
    sub = next(c for c in result.guard.sites if c.record.site == site["id"]).record.submodules[0]
    x = torch.cat([b[0] for b in check])
    with torch.no_grad():
        for layer in model.layers[:k]:
            x = x + 0.2 * torch.tanh(layer(x))
        ref, out = model.layers[k](x).double(), gm.get_submodule(sub)(x).double()
    direct = float((out - ref).pow(2).sum() / ref.pow(2).sum())
    assert site["solo_local_rel_err"][site["rung"]] == pytest.approx(direct, rel=1e-6)
