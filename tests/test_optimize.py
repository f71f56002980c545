"""The optimize pipeline, its CLI and saved outputs, on a toy model with a toy pass (and real MiniLM).

The toy pass ``toy-round`` puts a calibrated rounding module (``levels`` steps up to the calibrated
amax) after every ReLU; ``bad`` names one site rounded to a single level — a deliberately broken site
the guard must roll back. Its submodules are numbered by position among the substituted sites, so a
rebuild with a site left out renames the others (the rebuild must follow the records, not names).
"""

from __future__ import annotations

import json
import os
import re
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pytest
import torch
from _cli import run_cli
from torch import fx, nn

import surgeon.calibration as calibration_mod
import surgeon.report_html as report_html_mod
from surgeon.analysis._graph import GraphView
from surgeon.errors import SurgeonError
from surgeon.optimize import optimize, prepare_batches, split_batches
from surgeon.pass_manager import Diagnostic, Pass, PassContext, PassResult, SiteRecord
from surgeon.passes import REGISTRY
from surgeon.verify import measure_model

TOY_SOURCE = textwrap.dedent('''
    import torch
    from torch import nn

    class ToyNet(nn.Module):
        """Three ReLU sites; input [batch, seq, 8], batch and seq free."""

        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.l1, self.l2, self.l3, self.l4 = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 8)

        def forward(self, x):
            h = torch.relu(self.l1(x))
            h = torch.relu(self.l2(h))
            h = torch.relu(self.l3(h))
            return self.l4(h) + x

    def factory():
        return ToyNet().eval(), (torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1)),)
''')
_ns: dict[str, Any] = {}
exec(compile(TOY_SOURCE, "<toy>", "exec"), _ns)  # the same source serves the factory file of the CLI tests
ToyNet = _ns["ToyNet"]


class ToyRoundModule(nn.Module):
    """Calibratable: observe → running amax; quant → round to ``levels`` steps of amax/levels."""

    def __init__(self, levels: int) -> None:
        super().__init__()
        self.levels = levels
        self.mode, self.active = "observe", True
        self.amax = 0.0
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        if self.mode == "observe":
            self.amax = max(self.amax, float(x.detach().abs().max()))
            return x
        return torch.round(x / self.scale) * self.scale

    def finalize(self) -> None:
        self.scale = torch.tensor(max(self.amax, 1e-8) / self.levels)


FIT_SEEN: list[list[Any]] = []


@dataclass(frozen=True)
class ToyRound(Pass):
    name = "toy-round"
    levels: int = 255
    bad: int = -1  # index of the deliberately broken site (one level)
    op: str = "relu"
    perturb: float = 0.0  # also scale the last layer's weight: a change no rollback undoes

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        view = GraphView(gm)
        diags: list[Diagnostic] = []
        count = 0
        for i, node in enumerate(n for n in view.nodes if view.op(n) == self.op):
            module = view.module_path(node)
            site = f"toy:{module or '<root>'}:{node.name}"
            if not ctx.wants(site):
                continue
            name = f"toy_round_{count}"
            count += 1
            gm.add_submodule(name, ToyRoundModule(1 if i == self.bad else self.levels))
            with gm.graph.inserting_after(node):
                new = gm.graph.call_module(name, (node,))
            node.replace_all_uses_with(new, delete_user_cb=lambda u, new=new: u is not new)
            ctx.register(SiteRecord(site, "toy", module, self.name, [name], probe=new.name, reference=node.name))
            diags.append(Diagnostic(self.name, site, "applied", module=module, kind="toy"))
        if self.perturb:
            for name, p in gm.named_parameters():
                if name.startswith("l4."):
                    p.data.mul_(1.0 + self.perturb)
        diags.append(Diagnostic(self.name, "toy:<root>:never", "skipped", "no toy pattern here", "<root>", "toy"))
        gm.recompile()
        return PassResult(gm, bool(count), diags)

    def fit(self, gm: fx.GraphModule, ctx: PassContext, batches: Iterable[Any]) -> None:
        FIT_SEEN.append(list(batches))


def toy_batches(n: int, seed: int = 2, nan_at: int | None = None) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    out = [(torch.randn(3, 4 + i % 3, 8, generator=g),) for i in range(n)]
    if nan_at is not None:
        out[nan_at][0][0, 0, 0] = float("nan")
    return out


@pytest.fixture
def toy_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(REGISTRY, "toy-round", f"{__name__}:ToyRound")


@pytest.fixture(scope="module")
def bad_site_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One optimize run with site 1 broken, calibrate's inputs recorded, saved to a directory."""
    model, (x,) = ToyNet().eval(), (torch.randn(2, 5, 8),)
    batches = toy_batches(12)
    seen: list[list[Any]] = []
    real = calibration_mod.calibrate

    def recording(module: nn.Module, batches: Iterable[Any], **kw: Any) -> Any:
        batches = list(batches)
        seen.append(batches)
        return real(module, batches, **kw)

    FIT_SEEN.clear()
    mp = pytest.MonkeyPatch()
    mp.setattr(calibration_mod, "calibrate", recording)
    try:
        result = optimize(model, (x,), batches, passes=[ToyRound(bad=1)], seed=3)
    finally:
        mp.undo()
    out = tmp_path_factory.mktemp("run") / "out"
    result.save(out)
    return {"result": result, "batches": batches, "seen": seen, "fit_seen": list(FIT_SEEN), "out": out,
            "model": model}


# --------------------------------------------------------------------------------------------------
# the guard through the pipeline
# --------------------------------------------------------------------------------------------------
def test_bad_site_rolled_back_with_its_figure_others_applied(bad_site_run: dict) -> None:
    rep = bad_site_run["result"].report
    by_status = {s["id"]: s["status"] for s in rep["sites"]}
    measured = [s for s in rep["sites"] if s["status"] != "skipped"]
    assert [s["status"] for s in measured] == ["applied", "rolled_back", "applied"]
    bad = measured[1]
    # The figure that caused the rollback is the site's solo end-to-end cosine, and it is below 0.999.
    assert bad["rollback"]["criterion"] == "cosine_mean"
    assert bad["rollback"]["solo"] == bad["solo_end_to_end"]["cosine_mean"] < 0.999
    assert bad["rollback"]["end_to_end"] < 0.999 == bad["rollback"]["bound"]
    assert re.fullmatch(r"end-to-end cosine_mean (?:\(with the margin\) )?[0-9.]+ < 0\.999 with 3 site\(s\) on; with only this site on "
                        r"cosine_mean is [0-9.]+, the worst of those kept", bad["reason"])
    # The broken site's own output is far worse than the good sites' (one level vs 255).
    good = [s for s in measured if s["status"] == "applied"]
    assert all(g["metrics"]["sqnr_db"] > bad["metrics"]["sqnr_db"] + 20 for g in good)
    assert all(g["metrics"]["cosine"] > 0.9999 for g in good)
    assert rep["end_to_end"]["cosine_mean"] >= 0.999 and rep["tolerance"]["met"] is True
    assert rep["end_to_end_all_applied"]["cosine_mean"] < 0.999
    assert rep["counts"] == {"applied": 2, "rolled_back": 1, "skipped": 1}
    assert by_status["toy:<root>:never"] == "skipped"
    assert [s["reason"] for s in rep["sites"] if s["status"] == "skipped"] == ["no toy pattern here"]


def test_written_model_has_only_kept_sites_and_matches_guard(bad_site_run: dict) -> None:
    result = bad_site_run["result"]
    mods = [n.target for n in result.module.graph.nodes if n.op == "call_module" and "toy_round" in str(n.target)]
    assert len(mods) == 2  # the rolled-back site is the original op again
    # Rebuilt by records (positions shift): the kept sites' scales are the fitted ones, so the rebuilt
    # model reproduces the guard's figures for the kept configuration.
    assert result.report["end_to_end"]["cosine_mean"] == pytest.approx(result.guard.end_to_end.cosine_mean, abs=1e-12)
    assert result.report["end_to_end"]["cosine_min"] == pytest.approx(result.guard.end_to_end.cosine_min, abs=1e-12)


def test_check_batches_never_used_to_fit(bad_site_run: dict) -> None:
    batches, seen, fit_seen = bad_site_run["batches"], bad_site_run["seen"], bad_site_run["fit_seen"]
    cal = bad_site_run["result"].report["calibration"]
    check_idx = cal["check_index"]
    # 12 batches of 4: the check part grows towards 64 samples, up to half of the batches
    assert cal["batches"] == {"fit": 6, "check": 6, "total": 12} and len(check_idx) == 6
    expected_fit = [b for i, b in enumerate(batches) if i not in check_idx]
    assert len(seen) == 1 and len(fit_seen) == 1
    for used in (seen[0], fit_seen[0]):
        assert [id(b) for b in used] == [id(b) for b in expected_fit]
        assert not {id(batches[i]) for i in check_idx} & {id(b) for b in used}
    assert [id(b) for b in bad_site_run["result"].check_batches] == [id(batches[i]) for i in check_idx]
    assert cal["independent_check"] is True and cal["weak"] is False


def test_check_part_grows_to_64_samples_up_to_half_the_batches() -> None:
    batch = lambda n: (torch.zeros(n, 3),)  # noqa: E731
    many = split_batches([batch(8)] * 40, 0.25, 0)  # 25 % = 10 batches = 80 samples: enough
    assert len(many.check) == 10 and sum(b[0].shape[0] for b in many.check) == 80
    mid = split_batches([batch(8)] * 20, 0.25, 0)  # 5 batches = 40 samples: grows to 8 batches = 64
    assert len(mid.check) == 8 and len(mid.fit) == 12
    few = split_batches([batch(4)] * 10, 0.25, 0)  # 64 samples would take 16 batches: half of 10 it is
    assert len(few.check) == 5 and len(few.fit) == 5


def test_split_is_seeded_and_keeps_one_of_each() -> None:
    b = list(range(10))
    a1, a2, a3 = (split_batches(b, 0.25, 0, min_check_samples=0), split_batches(b, 0.25, 0, min_check_samples=0),
                  split_batches(b, 0.25, 1, min_check_samples=0))
    assert a1.check_index == a2.check_index and a1.check_index != a3.check_index
    assert len(a1.check) == 2 and sorted(a1.fit_index + a1.check_index) == b  # round(2.5) = 2
    two = split_batches([0, 1], 0.25, 0)
    assert len(two.fit) == len(two.check) == 1 and two.independent
    one = split_batches([7], 0.25, 0)
    assert one.fit == one.check == [7] and not one.independent


# --------------------------------------------------------------------------------------------------
# report files
# --------------------------------------------------------------------------------------------------
def test_report_json_keys(bad_site_run: dict) -> None:
    rep = json.loads((bad_site_run["out"] / "report.json").read_text())
    assert rep == json.loads(json.dumps(bad_site_run["result"].report))  # the same dict as Result.report
    for key in ("schema_version", "surgeon_version", "model", "passes", "capture", "calibration", "sites",
                "end_to_end", "tolerance", "timings_s"):
        assert key in rep
    assert rep["passes"] == ["toy-round{levels=255,bad=1,op=relu,perturb=0.0}"]
    for s in rep["sites"]:
        assert {"id", "kind", "module", "pass", "status", "metrics"} <= set(s)
        assert set(s["metrics"]) == {"sqnr_db", "cosine", "max_rel_err"}
        assert ("reason" in s) == (s["status"] != "applied")
    assert {"cosine_mean", "cosine_min", "max_rel_err"} <= set(rep["end_to_end"])
    assert rep["end_to_end"]["samples"] == 18  # 6 check batches of 3 samples
    # the verdict's figures are the written file's (model.pt2 run by torch), with their spread
    assert rep["end_to_end"]["measured_on"] == {"file": "model.pt2", "target": "torch",
                                                "runtime": "torch"}
    assert rep["end_to_end"]["spread"]["samples"] == 18
    lo, hi = rep["end_to_end"]["spread"]["cosine_mean_ci95"]
    assert lo <= rep["end_to_end"]["cosine_mean"] <= hi
    assert rep["end_to_end"]["judged"]["cosine_mean"] == pytest.approx(
        rep["end_to_end"]["cosine_mean"] - 1.645 * rep["end_to_end"]["cosine_std"] / 18 ** 0.5)
    assert rep["end_to_end_torch"]["samples"] == 18
    assert {"capture", "passes", "calibrate", "verify", "rebuild", "export", "save"} <= set(rep["timings_s"])
    assert all(v >= 0 for v in rep["timings_s"].values())
    assert rep["outputs"]["model"] == "model.pt2"


def test_report_html_is_self_contained(bad_site_run: dict) -> None:
    page = (bad_site_run["out"] / "report.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    srcs = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]*)""", page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<script" not in page and "<link" not in page and "http://" not in page and "https://" not in page
    assert "rolled back" in page and "toy:&lt;root&gt;:never" not in page  # ids are not shown, modules are
    assert sorted(os.listdir(bad_site_run["out"])) == ["bench", "model.pt2", "report.html", "report.json"]


# --------------------------------------------------------------------------------------------------
# model.pt2
# --------------------------------------------------------------------------------------------------
def test_pt2_reload_reproduces_figures_and_is_dynamic(bad_site_run: dict) -> None:
    result, model = bad_site_run["result"], bad_site_run["model"]
    loaded = torch.export.load(str(bad_site_run["out"] / "model.pt2")).module()
    fig = measure_model(model, loaded, result.check_batches)
    e2e = result.report["end_to_end"]
    assert fig.cosine_mean == pytest.approx(e2e["cosine_mean"], abs=1e-12)
    assert fig.cosine_min == pytest.approx(e2e["cosine_min"], abs=1e-12)
    assert fig.max_rel_err == pytest.approx(e2e["max_rel_err"], rel=1e-9)
    for shape in [(1, 1, 8), (7, 13, 8), (1, 40, 8)]:
        x = torch.randn(*shape)
        torch.testing.assert_close(loaded(x), result.module(x), rtol=0, atol=0)
    assert result.report["export"]["inputs"] == {"x": ["dynamic", "dynamic", 8]}


# --------------------------------------------------------------------------------------------------
# atomic save
# --------------------------------------------------------------------------------------------------
def test_error_mid_save_leaves_nothing(bad_site_run: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = bad_site_run["result"]

    def boom(report: dict, path: Any) -> None:
        Path(path).write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(report_html_mod, "write_html", boom)
    out = tmp_path / "out"
    # what escapes Result.save is a SurgeonError naming the stage, the OSError chained as its cause
    with pytest.raises(SurgeonError, match=r"^internal error in stage 'save': OSError: disk full") as info:
        result.save(out)
    assert isinstance(info.value.__cause__, OSError)
    assert os.listdir(tmp_path) == []
    # With --force, the existing directory survives a failed save untouched.
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(SurgeonError, match="disk full"):
        result.save(out, force=True)
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == ["keep.txt"]
    monkeypatch.undo()
    result.save(out, force=True)
    assert sorted(os.listdir(out)) == ["bench", "model.pt2", "report.html", "report.json"]  # bench/: timing files
    assert os.listdir(tmp_path) == ["out"]
    with pytest.raises(SurgeonError, match=r"^output directory '.*out' already exists \(use --force to replace it\)$"):
        result.save(out)


# --------------------------------------------------------------------------------------------------
# tolerance / metric through the API
# --------------------------------------------------------------------------------------------------
def test_user_metric_and_best_model_when_nothing_meets() -> None:
    model, ex = ToyNet().eval(), (torch.randn(2, 5, 8),)
    calls: list[int] = []

    def metric(ref: torch.Tensor, out: torch.Tensor) -> float:
        calls.append(1)
        return -float((ref - out).abs().max())  # higher is better

    # A change outside the sites (perturb) and an unreachable bound: nothing meets it, the best
    # configuration measured is kept and reported as not meeting the tolerance.
    with pytest.warns(UserWarning, match="no configuration met the tolerance"):
        res = optimize(model, ex, toy_batches(8), passes=[ToyRound(bad=0, perturb=1e-3)], tolerance=-1e-9,
                       metric=metric)
    assert res.met is False and res.report["tolerance"]["metric"] == -1e-9
    steps = res.report["rollback_steps"]
    assert [len(s["kept"]) for s in steps] == [3, 2, 1, 0]
    best = max(steps, key=lambda s: s["end_to_end"]["metric"])
    applied = sorted(s["id"] for s in res.report["sites"] if s["status"] == "applied")
    assert applied == sorted(best["kept"])
    assert res.report["end_to_end"]["metric"] == pytest.approx(best["end_to_end"]["metric"], rel=1e-6)
    assert calls
    with pytest.raises(SurgeonError, match="^a user metric needs a tolerance"):
        optimize(model, ex, toy_batches(4), passes=[ToyRound()], metric=metric)


def test_no_site_found_keeps_the_model(capsys: pytest.CaptureFixture) -> None:
    model, ex = ToyNet().eval(), (torch.randn(2, 5, 8),)
    res = optimize(model, ex, toy_batches(4), passes=[ToyRound(op="gelu")], progress=True)
    assert res.report["counts"] == {"applied": 0, "rolled_back": 0, "skipped": 1} and res.met
    assert res.report["end_to_end"]["cosine_min"] == pytest.approx(1.0, abs=1e-12)
    assert res.report["end_to_end"]["max_rel_err"] == 0.0
    x = torch.randn(4, 3, 8)
    torch.testing.assert_close(res.module(x), model(x), rtol=0, atol=0)


def test_no_calibration_is_weak_and_warned() -> None:
    model, ex = ToyNet().eval(), (torch.randn(2, 5, 8),)
    with pytest.warns(UserWarning, match="calibration is weak"):
        res = optimize(model, ex, None, passes=[ToyRound()])
    cal = res.report["calibration"]
    assert cal["weak"] is True and cal["independent_check"] is False
    assert cal["batches"] == {"fit": 1, "check": 1, "total": 1}


# --------------------------------------------------------------------------------------------------
# bad calibration data (API level)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batches, message", [
    ([], "calibration data is empty"),
    (toy_batches(4, nan_at=2), "calibration data contains NaN/Inf (batch 3, input 'arg0')"),
    ([(torch.randn(3, 4, 8),), (torch.randn(3, 8),)],
     "calibration batch 2 does not match the model's inputs: input 'arg0' has 2 dimension(s), expected 3"),
    ([(torch.randn(3, 4, 8, dtype=torch.float64),)],
     "calibration batch 1 does not match the model's inputs: input 'arg0' has dtype float64, expected float32"),
    ([(torch.randn(3, 4, 8), torch.randn(3))],
     "calibration batch 1 does not match the model's inputs: expected 1 input(s), got 2"),
    ([{"x": torch.randn(3, 4, 8)}],
     "calibration batch 1 does not match the model's inputs: expected a tuple of 1 input(s), got keyword inputs (x)"),
    ([(torch.randn(3, 4, 8),), (torch.randn(3, 4, 5),)],
     "calibration batch 2 does not match the model's inputs: AssertionError: Guard failed: x.size()[2] == 8"),
])
def test_bad_calibration_batches(batches: list, message: str) -> None:
    model, ex = ToyNet().eval(), (torch.randn(2, 5, 8),)
    from surgeon.capture import capture

    gm0 = capture(model, ex).gm
    with pytest.raises(SurgeonError) as info:
        prepare_batches(batches, ex, gm0)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def toy_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toy_registry: None) -> Path:
    """A factory module ``toyfactory:factory`` importable from the working directory."""
    (tmp_path / "toyfactory.py").write_text(TOY_SOURCE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


_run = run_cli


def test_cli_optimize_toy(toy_cli: Path, capsys: pytest.CaptureFixture) -> None:
    torch.save(toy_batches(8), toy_cli / "calib.pt")
    code, out, err = _run(["optimize", "toyfactory:factory", "-o", "out", "--passes", "toy-round{bad=2}",
                           "--calib", "calib.pt", "--target", "torch"], capsys)
    assert code == 0, err
    rep = json.loads((toy_cli / "out" / "report.json").read_text())
    assert [s["status"] for s in rep["sites"] if s["status"] != "skipped"] == ["applied", "applied", "rolled_back"]
    assert rep["model"]["source"] == "toyfactory:factory" and "load" in rep["timings_s"]
    assert "sites: 2 applied, 1 rolled back, 1 skipped" in out
    assert f"report: {Path('out') / 'report.html'}" in out
    assert re.search(r"end to end on model\.pt2 in torch \(12 check samples\): cosine mean (0\.99\d{4}|1\.0{6}) "
                     r"\(95 % interval [0-9.]+–[0-9.]+\), min (0\.99\d{4}|1\.0{6}), "
                     r"max rel err [0-9.e-]+ — tolerance \(cosine_mean ≥ 0\.999\) met", out), out
    assert sorted(os.listdir(toy_cli)) == ["calib.pt", "out", "toyfactory.py"]


def test_cli_onnx_target_written_inside_the_atomic_save(toy_cli: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("onnxruntime")
    torch.save(toy_batches(4), toy_cli / "calib.pt")
    code, out, err = _run(["optimize", "toyfactory:factory", "-o", "out", "--passes", "toy-round",
                           "--calib", "calib.pt", "--target", "onnx"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(toy_cli / "out")) == ["README.md", "bench", "model.onnx", "model.pt2", "report.html", "report.json"]
    rep = json.loads((toy_cli / "out" / "report.json").read_text())
    assert rep["outputs"]["target"] == "model.onnx" and "onnx" in rep["targets"]
    assert rep["targets"]["onnx"]["cosine_min"] >= 0.999
    assert f"model: {Path('out') / 'model.pt2'}, {Path('out') / 'model.onnx'}" in out


def test_cli_tolerance_not_met_exit_3_after_writing(toy_cli: Path, capsys: pytest.CaptureFixture) -> None:
    torch.save(toy_batches(4), toy_cli / "calib.pt")
    code, out, err = _run(["optimize", "toyfactory:factory", "-o", "out", "--passes", "toy-round{perturb=0.01}",
                           "--calib", "calib.pt", "--tolerance", "cosine_mean=1.0", "--target", "torch"], capsys)
    assert code == 3
    assert re.fullmatch(r"surgeon: error: tolerance not met \(cosine_mean ≥ 1\): best model kept \d site\(s\), "
                        r"cosine mean 0\.9\d{5}; written to out\n", err.splitlines(keepends=True)[-1])
    assert json.loads((toy_cli / "out" / "report.json").read_text())["tolerance"]["met"] is False


def test_cli_without_calib_warns(toy_cli: Path, capsys: pytest.CaptureFixture) -> None:
    code, out, err = _run(["optimize", "toyfactory:factory", "-o", "out", "--passes", "toy-round", "--target", "torch"], capsys)
    assert code == 0
    assert "surgeon: warning: no --calib given: the example inputs calibrate and check the model, so the " \
           "calibration is weak (give a calibration file)" in err


def _bad_pt(path: Path, kind: str) -> None:
    if kind == "empty":
        torch.save([], path)
    elif kind == "nan":
        torch.save(toy_batches(3, nan_at=1), path)
    elif kind == "shape":
        torch.save([(torch.randn(2, 8),)], path)
    elif kind == "dtype":
        torch.save([(torch.randint(0, 5, (2, 3, 8)),)], path)
    elif kind == "garbage":
        path.write_bytes(b"not a torch file at all")
    elif kind == "notlist":
        torch.save({"x": torch.randn(2, 3, 8)}, path)


@pytest.mark.parametrize("kind, args, message", [
    ("empty", [], "calibration file 'calib.pt' is empty"),
    ("nan", [], "calibration data contains NaN/Inf (batch 2, input 'arg0')"),
    ("shape", [], "calibration batch 1 does not match the model's inputs: input 'arg0' has 2 dimension(s), expected 3"),
    ("dtype", [], "calibration batch 1 does not match the model's inputs: input 'arg0' has dtype int64, expected float32"),
    ("garbage", [], "cannot read calibration file 'calib.pt': not a torch.save file of input tuples"),
    ("notlist", [], "calibration file 'calib.pt' must hold a list of input tuples (or dicts), one per batch; it holds a dict"),
    (None, [], "cannot read calibration file 'calib.pt': no such file"),
    ("txt", [], "calibration file 'calib.txt' is not a .pt file: a model without a tokenizer needs a .pt file holding "
                "a list of input tuples (text files need a Hugging Face text model)"),
    ("ok", ["--passes", "no-such-pass"], "unknown pass 'no-such-pass' (known: "),
    ("ok", ["--passes", "toy-round{levels=3,colour=red}"],
     "unknown option 'colour' for pass 'toy-round' (options: levels, bad, op, perturb)"),
    ("ok", ["--tolerance", "cosine_max=0.9"],
     "unknown tolerance key 'cosine_max' (known: cosine_mean, cosine_min, max_rel_err, metric, agreement, margin)"),
    ("ok", ["--target", "tflite"], "unknown target 'tflite'"),
    ("exists", [], "output directory 'out' already exists (use --force to replace it)"),
])
def test_cli_bad_input_one_line_exit_2_nothing_written(toy_cli: Path, capsys: pytest.CaptureFixture, kind: str | None,
                                                       args: list[str], message: str) -> None:
    calib = "calib.txt" if kind == "txt" else "calib.pt"
    if kind == "txt":
        (toy_cli / calib).write_text("a sentence\n")
    elif kind == "ok":
        torch.save(toy_batches(2), toy_cli / calib)
    elif kind == "exists":
        torch.save(toy_batches(2), toy_cli / calib)
        (toy_cli / "out").mkdir()
        (toy_cli / "out" / "mine.txt").write_text("precious")
    elif kind is not None:
        _bad_pt(toy_cli / calib, kind)
    before = sorted(os.listdir(toy_cli))
    code, out, err = _run(["optimize", "toyfactory:factory", "-o", "out", "--passes", "toy-round",
                           "--target", "torch", "--calib", calib, *args], capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith(f"surgeon: error: {message}"), err
    assert all(line.startswith("surgeon: ") for line in lines)
    assert sorted(os.listdir(toy_cli)) == before  # nothing written (no OUTDIR, no partial)
    if kind == "exists":
        assert os.listdir(toy_cli / "out") == ["mine.txt"]


def test_cli_text_model(tiny_bert_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, toy_registry: None,
                        capsys: pytest.CaptureFixture) -> None:
    """A Hugging Face text model: sentences → batches of 8; model.pt2 takes any batch and length."""
    sentences = Path(__file__).resolve().parents[1] / "surgeon" / "data" / "calib_sentences.txt"
    lines = sentences.read_text().splitlines()[:32]
    (tmp_path / "s.txt").write_text("\n".join(lines) + "\n\n")
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    monkeypatch.chdir(tmp_path)
    for name, message in [("empty.txt", "calibration file 'empty.txt' is empty"),
                          ("latin1.txt", "cannot read calibration file 'latin1.txt': not UTF-8 text")]:
        code, _, err = _run(["optimize", str(tiny_bert_dir), "-o", "o", "--passes", "toy-round{op=gelu}",
                             "--target", "torch", "--calib", name], capsys)
        assert (code, err.strip().splitlines()[-1]) == (2, f"surgeon: error: {message}")
        assert not (tmp_path / "o").exists()
    code, out, err = _run(["optimize", str(tiny_bert_dir), "-o", "o", "--passes", "toy-round{op=gelu}",
                           "--target", "torch", "--calib", "s.txt"], capsys)
    assert code == 0, err
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    assert rep["calibration"]["batches"] == {"fit": 2, "check": 2, "total": 4}  # the check part grows to half
    assert rep["calibration"]["samples"] == {"fit": 16, "check": 16}
    assert rep["counts"]["applied"] == 2 and rep["tolerance"]["met"]
    assert rep["export"]["inputs"]["input_ids"] == ["dynamic", "dynamic"]
    m = torch.export.load(str(tmp_path / "o" / "model.pt2")).module()
    for b, s in [(1, 1), (1, 9), (5, 30)]:
        ids = torch.randint(5, 100, (b, s))
        kw = {k: (ids if k == "input_ids" else torch.ones_like(ids) if k == "attention_mask" else torch.zeros_like(ids))
              for k in rep["export"]["inputs"]}
        assert m(**kw)["last_hidden_state"].shape == (b, s, 32)


# --------------------------------------------------------------------------------------------------
# real MiniLM
# --------------------------------------------------------------------------------------------------
@pytest.mark.minilm
def test_minilm_attention_fp8(minilm_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """All 6 attention sites kept; held-out embedding cosine ≥ 0.999 mean, ≥ 0.995 min; model.pt2 agrees."""
    pytest.importorskip("surgeon.passes.attention_fp8")
    sentences = Path(__file__).resolve().parents[1] / "surgeon" / "data" / "calib_sentences.txt"
    code, out, err = _run(["optimize", str(minilm_dir), "-o", str(tmp_path / "o"), "--passes", "attention-fp8",
                           "--target", "torch", "--calib", str(sentences)], capsys)
    assert code == 0, err
    rep = json.loads((tmp_path / "o" / "report.json").read_text())
    sites = [s for s in rep["sites"] if s["kind"] == "attention"]
    assert len(sites) == 6 and all(s["status"] == "applied" for s in sites), sites
    assert rep["calibration"]["samples"]["fit"] >= 64
    assert rep["end_to_end"]["cosine_mean"] >= 0.999 and rep["end_to_end"]["cosine_min"] >= 0.995
    # Reload model.pt2 in this process and recompute the figures on the same held-out sentences.
    from surgeon.load import load_model

    loaded = load_model(str(minilm_dir))
    lines = [ln.strip() for ln in sentences.read_text().splitlines() if ln.strip()]
    batches = [loaded.text_inputs(lines[i:i + 8], max_length=128) for i in range(0, len(lines), 8)]
    check = [batches[i] for i in rep["calibration"]["check_index"]]
    m = torch.export.load(str(tmp_path / "o" / "model.pt2")).module()
    fig = measure_model(loaded.model, m, check)
    assert fig.cosine_mean == pytest.approx(rep["end_to_end"]["cosine_mean"], abs=1e-6)
    assert fig.cosine_min == pytest.approx(rep["end_to_end"]["cosine_min"], abs=1e-6)
    one = loaded.text_inputs(["Short."], max_length=128)
    assert m(**one)["last_hidden_state"].shape[0] == 1


@pytest.mark.parametrize("width", [80, 120, 200])
def test_summary_never_truncates_module_paths(width: int) -> None:
    """The module path names the site: whatever the terminal width, it is printed whole, and so is the reason."""
    import io

    from rich.console import Console

    from surgeon.optimize import print_summary

    long_module = "encoder.layer.10.attention.self.some_long_submodule_name"
    reason = "end-to-end cosine mean 0.99812 < 0.999 with this site and the earlier ones"
    report = {"sites": [{"kind": "attention", "module": long_module, "status": "rolled_back", "reason": reason,
                         "metrics": {"sqnr_db": 30.1, "cosine": 0.9999}, "solo_end_to_end": {"cosine_mean": 0.9991}},
                        {"kind": "norm_residual", "module": "encoder.layer.0.output.LayerNorm", "status": "applied",
                         "exact": True, "reason": "folded"}],
              "counts": {"applied": 1, "rolled_back": 1, "skipped": 0},
              "end_to_end": {"samples": 8, "cosine_mean": 0.9991, "cosine_min": 0.998, "max_rel_err": 0.2},
              "tolerance": {"description": "cosine_mean ≥ 0.999", "met": True}, "outputs": {}}

    class R:
        pass

    res = R()
    res.report = report
    buf = io.StringIO()
    print_summary(res, Path("out"), Console(file=buf, width=width, color_system=None))
    text = buf.getvalue()
    assert long_module in text and "…" not in text
    assert " ".join(text.replace("│", " ").split()).count(reason) == 1  # whole, wherever it wrapped
    assert "applied (exact)" in text


def test_api_runs_on_the_clis_threads_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """``surgeon.optimize`` runs with one intra-op thread like the CLI (unless OMP_NUM_THREADS is set),
    and gives the caller's setting back; ``threads=None`` leaves it alone."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    seen: list[int] = []

    def metric(ref: torch.Tensor, out: torch.Tensor) -> float:
        seen.append(torch.get_num_threads())
        return 1.0

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        optimize(ToyNet().eval(), (torch.randn(2, 5, 8),), toy_batches(4), passes=ToyRound(), tolerance=0.5, metric=metric)
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
        seen.clear()
        optimize(ToyNet().eval(), (torch.randn(2, 5, 8),), toy_batches(4), passes=ToyRound(), tolerance=0.5, metric=metric,
                 threads=None)
        assert set(seen) == {2}
        with pytest.raises(SurgeonError, match=r"^threads must be a positive number, None or 'auto', got 0$"):
            optimize(ToyNet().eval(), (torch.randn(2, 5, 8),), toy_batches(4), passes=ToyRound(), threads=0)
    finally:
        torch.set_num_threads(before)
