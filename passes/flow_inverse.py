"""Distil a single-pass auxiliary inverse of a normalizing flow (approximate; the density path is exact).

Before:  sampling runs the exact inverse x = f⁻¹(z): for masked autoregressive transforms one network
         pass per dimension (D sequential passes per transform), for couplings one pass per transform.
After:   x ≈ g(z) = A·z + c + MLP(z), one pass, then k correction steps x ← x + g(z) − g(f(x)), each one
         pass of the exact forward f (a single pass, even for autoregressive transforms) and one of g.
         The forward graph — the density path, z and log_det — is not touched (bit-identical).
Fitting: A, c by ridge least squares, then Adam on ‖(g(z) − x)/σ_x‖² over pairs (x̃, f(x̃)),
x̃ = x + noise·σ_x·ε with x from the fit batches, pushed through the exact forward at every step
(never the check batches). Safeguard (default): per sample, the iterate with the smallest latent
residual ‖f(x) − z‖ is returned (one more forward pass), so a diverging step falls back.
Guard: per-sample ‖inv(f(x)) − x‖ / ‖x‖ on the check batches; the inverse is rejected (not delivered)
when the median exceeds ``max_rel_err``.

The inverse lives beside the graph as the submodule ``surgeon_flow_inverse`` (never called by the
forward graph); ``FlowInverse.artifacts`` detaches it: it becomes ``Result.inverse`` / ``inverse.pt2``.

Skipped when: the graph has no coupling site (no affine/additive coupling, no masked autoregressive
transform); a transform looks like a coupling but has no analytic inverse (the analyzer's near-miss);
the model does not take exactly one floating tensor; z does not have as many values per sample as x
(not a bijection); quantizers were inserted before this pass (it must see the exact forward).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Sequence

import torch
from torch import fx, nn

from surgeon.analysis import analyze_graph, site_id
from surgeon.errors import SurgeonError
from surgeon.inputs import Inputs
from surgeon.pass_manager import Diagnostic, Pass, PassContext, PassManager, PassResult, SiteRecord
from surgeon.passes._flows import (
    AuxInverse,
    error_figures,
    first_float,
    output_leaves,
    reconstruction_errors,
    single_input,
    tensor_placeholders,
    train_inverse,
)

__all__ = ["ATTR", "FlowInverse", "InverseCheck", "Distilled", "distill_inverse", "split_indices"]

ATTR = "surgeon_flow_inverse"
KIND = "flow"


@dataclass
class InverseCheck:
    """The guard's figures for one distilled inverse (relative reconstruction errors on check data)."""

    site: str
    accepted: bool
    figures: dict[str, Any]
    reason: str = ""

    def to_json(self) -> dict:
        return {"site": self.site, "accepted": self.accepted, "figures": dict(self.figures), "reason": self.reason}


@dataclass(frozen=True)
class FlowInverse(Pass):
    """Distil g ≈ f⁻¹ (z → x) with ``corrections`` fixed-point steps; guard on reconstruction error."""

    name: ClassVar[str] = "flow-inverse"
    requires: ClassVar[tuple[str, ...]] = ("flow-fold",)  # the copied forward then has folded log-dets
    # its contract examples (tests/test_pass_contract.py): a model with its sites, then near-misses
    examples: ClassVar[tuple[str, ...]] = ("_pass_examples:flow", "_pass_examples:mlp")
    example_spec: ClassVar[str] = "flow-inverse{corrections=1,steps=10}"  # a non-default option

    hidden: int = 256          # width of g's MLP
    depth: int = 2             # hidden layers of g's MLP (0: g is the ridge-fitted affine map only)
    steps: int = 2000          # Adam steps
    lr: float = 2e-3
    batch_size: int = 256
    noise: float = 0.3         # jitter of the fit x (× per-dimension std), re-pushed through f each step
    corrections: int = 3       # k: x ← x + g(z) − g(f(x)), each one forward pass of f and one of g
    safeguard: bool = True     # per sample, keep the iterate with the smallest ‖f(x) − z‖ (one more pass)
    max_rel_err: float = 1e-2  # guard: median ‖inv(f(x)) − x‖/‖x‖ on the check data must not exceed it

    def __post_init__(self) -> None:
        for name in ("hidden", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("depth", "corrections"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        if not self.noise >= 0:
            raise ValueError(f"noise must be ≥ 0, got {self.noise}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.max_rel_err > 0:
            raise ValueError(f"max_rel_err must be > 0, got {self.max_rel_err}")

    # -- rewrite (adds the untrained inverse beside the graph) ---------------------------------------
    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        def skip(reason: str, site: str | None = None) -> PassResult:
            return PassResult(gm, False, [Diagnostic(self.name, site, "skipped", reason, "", KIND if site else "")])

        analysis = analyze_graph(gm)
        couplings = analysis.by_kind("coupling")
        if not couplings:
            return skip("no coupling site: flow-inverse needs a flow made of affine/additive couplings or masked "
                        "autoregressive transforms")
        misses = [m for m in analysis.near_misses if m.kind == "coupling"]
        if misses:
            m = misses[0]
            return skip(f"transform at {m.module or '<root>'} ({m.node}) has no analytic inverse: {m.reason}")
        inputs = tensor_placeholders(gm)
        if len(inputs) != 1:
            return skip(f"a flow takes one tensor input; this model takes {len(inputs)}")
        x_val = inputs[0].meta.get("val")
        leaves = [n for n in output_leaves(gm) if isinstance(n, fx.Node)]
        z_val = leaves[0].meta.get("val") if leaves else None
        if not isinstance(x_val, torch.Tensor) or not isinstance(z_val, torch.Tensor):
            return skip("the graph carries no shapes for its input and output (capture with torch.export)")
        if not x_val.is_floating_point():
            return skip(f"the input is {str(x_val.dtype).replace('torch.', '')}, not floating point: not a flow over "
                        "continuous data")
        x_shape, z_shape = _static(x_val.shape[1:]), _static(z_val.shape[1:])
        if x_shape is None or z_shape is None:
            return skip("the per-sample shape of x or z is dynamic; the inverse network needs it fixed")
        if math.prod(x_shape) != math.prod(z_shape):
            return skip(f"z has {math.prod(z_shape)} values per sample and x {math.prod(x_shape)}: the forward is not "
                        "a bijection of x")
        site = site_id(KIND, "", leaves[0].name)
        if not ctx.wants(site):
            return PassResult(gm, False, [])
        from surgeon.calibration import calibratables

        if calibratables(gm):
            return skip("quantizers were inserted before flow-inverse: run flow-inverse first in the pipeline so the "
                        "inverse is distilled from the exact forward", site)
        variants: dict[str, int] = {}
        for s in couplings:
            variants[s.variant] = variants.get(s.variant, 0) + 1
        inv = AuxInverse(x_shape, self.hidden, self.depth, self.corrections, flow=copy.deepcopy(gm),
                         safeguard=self.safeguard)
        gm.add_submodule(ATTR, inv)
        ctx.register(SiteRecord(site, KIND, "", self.name, [ATTR]))
        found = ", ".join(f"{n} {v}" for v, n in sorted(variants.items()))
        n = math.prod(x_shape)
        return PassResult(gm, True, [Diagnostic(
            self.name, site, "applied", f"auxiliary inverse over {found} transform(s): g = affine + MLP "
            f"{n}→{self.hidden}×{self.depth}→{n}, {self.corrections} correction step(s); the forward graph is unchanged",
            "", KIND)])

    # -- distillation on the fit batches ------------------------------------------------------------
    def fit(self, gm: fx.GraphModule, ctx: PassContext, batches: Iterable[Any]) -> None:
        batches = list(batches)
        for inv in _inverses(gm, ctx, self.name):
            xs, zs = [], []
            with torch.no_grad():
                for b in batches:
                    x = single_input(b)
                    xs.append(x)
                    zs.append(first_float(inv.flow(x)))
            x_all, z_all = torch.cat(xs).float(), torch.cat(zs).float()
            stats = train_inverse(inv, x_all, z_all, steps=self.steps, lr=self.lr, batch_size=self.batch_size,
                                  accepted_batch=int(xs[0].shape[0]) if xs and xs[0].dim() else None,
                                  noise=self.noise, flow=inv.flow, seed=int(ctx.options.get("seed", 0)))
            inv.fit_stats = {"fit_samples": stats.samples, "fit_steps": stats.steps, "fit_seconds": round(stats.seconds, 3),
                             "fit_rel_err_median_g": stats.fit_rel_err_median}

    # -- the reconstruction guard (check batches only) ----------------------------------------------
    def check(self, gm: fx.GraphModule, ctx: PassContext, batches: Sequence[Inputs]) -> list[InverseCheck]:
        """Measure each distilled inverse on the check batches; reject (``active=False``) above tolerance."""
        out = []
        for record, inv in _records(gm, ctx, self.name):
            if not inv.trained:
                inv.active = False
                out.append(InverseCheck(record.site, False, {}, "the inverse was never fitted (no fit batches)"))
                continue
            errs = reconstruction_errors(inv, inv.flow, batches)
            figures = {f"rel_err_{k}" if k != "samples" else k: v for k, v in error_figures(errs).items()}
            if inv.corrections:
                g_only = error_figures(reconstruction_errors(inv, inv.flow, batches, corrections=0))
                figures["rel_err_median_g_only"] = g_only["median"]
            figures.update({"corrections": inv.corrections, "max_rel_err": self.max_rel_err,
                            **getattr(inv, "fit_stats", {})})
            med = figures["rel_err_median"]
            accepted = bool(med <= self.max_rel_err)
            reason = ("" if accepted else
                      f"median relative reconstruction error {med:.4g} > {self.max_rel_err:g} on the check data "
                      f"(with {inv.corrections} correction step(s))")
            inv.active = accepted
            out.append(InverseCheck(record.site, accepted, figures, reason))
        return out

    # -- what the pipeline delivers -----------------------------------------------------------------
    def artifacts(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, nn.Module]:
        """Detach the distilled inverse from ``gm`` (so the model's export does not carry it) and return
        ``{"inverse": module}`` when it was fitted and accepted; ``{}`` otherwise."""
        found: dict[str, nn.Module] = {}
        for _, inv in _records(gm, ctx, self.name):
            delattr(gm, ATTR)
            if inv.trained and inv.active:
                if inv.corrections == 0:
                    inv.flow = None  # g alone: do not ship an unused copy of the forward
                found["inverse"] = inv.eval()
        return found


def _static(shape: Sequence[Any]) -> tuple[int, ...] | None:
    try:
        return tuple(int(s) for s in shape)
    except (TypeError, ValueError):
        return None


def _records(gm: fx.GraphModule, ctx: PassContext, pass_name: str) -> list[tuple[SiteRecord, AuxInverse]]:
    out = []
    for r in ctx.records.values():
        if r.pass_name == pass_name and hasattr(gm, ATTR):
            out.append((r, gm.get_submodule(r.submodules[0])))
    return out


def _inverses(gm: fx.GraphModule, ctx: PassContext, pass_name: str) -> list[AuxInverse]:
    return [inv for _, inv in _records(gm, ctx, pass_name)]


# --------------------------------------------------------------------------------------------------
# standalone use (the optimize pipeline's steps for this one pass, without the orchestrator)
# --------------------------------------------------------------------------------------------------
@dataclass
class Distilled:
    """``distill_inverse``'s result: the inverse (None when rejected or skipped) and its figures.

    ``fitted`` is the fitted module whatever the guard decided (to report a rejected one's figures)."""

    inverse: nn.Module | None
    check: InverseCheck | None
    diagnostics: list[Diagnostic]
    forward: fx.GraphModule  # the captured forward graph (unchanged)
    fit_index: list[int] = field(default_factory=list)
    check_index: list[int] = field(default_factory=list)
    fitted: nn.Module | None = None


def split_indices(n: int, check_fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """``(fit_index, check_index)`` of ``n`` one-sample batches by the optimize pipeline's rule
    (``surgeon.pipeline.data.split_batches``, which it calls)."""
    from surgeon.pipeline.data import split_batches

    split = split_batches(list(range(n)), check_fraction, seed)
    return split.fit_index, split.check_index


def distill_inverse(model: nn.Module, example_inputs: Inputs, calib: Iterable[Any], *,
                    flow_inverse: FlowInverse | None = None, check_fraction: float = 0.25, seed: int = 0) -> Distilled:
    """Capture ``model``, distil its inverse on the fit part of ``calib`` and guard it on the check part.

    The steps ``surgeon.optimize`` takes for this pass, through the pass API only: the same seeded
    fit/check split (``split_batches``), the pass run by a ``PassManager`` on a copy of the captured
    graph with ``options={"seed": seed}``, ``fit`` under that seed, then ``check`` and ``artifacts``.
    (flow-inverse inserts no calibratable, so there is nothing to calibrate.)"""
    from surgeon.capture import capture

    p = flow_inverse or FlowInverse()
    cap = capture(model, example_inputs)
    batches = [(b,) if isinstance(b, torch.Tensor) else tuple(b) if isinstance(b, list) else b for b in calib]
    if not batches:
        raise SurgeonError("calibration data is empty")
    from surgeon.pipeline.data import split_batches

    split = split_batches(batches, check_fraction, seed)  # the pipeline's own split, on the same batches
    fit, check, fit_index, check_index = split.fit, split.check, split.fit_index, split.check_index
    gm, ctx, diagnostics = PassManager([p]).run(copy.deepcopy(cap.gm), PassContext(options={"seed": seed}))
    with torch.random.fork_rng(devices=[]):  # seeded fitting without touching the caller's RNG state
        torch.manual_seed(seed)
        p.fit(gm, ctx, fit)
    checks = p.check(gm, ctx, check)
    fitted = gm.get_submodule(ATTR) if hasattr(gm, ATTR) else None
    inverse = p.artifacts(gm, ctx).get("inverse")
    return Distilled(inverse, checks[0] if checks else None, diagnostics, cap.gm, fit_index, check_index, fitted)
