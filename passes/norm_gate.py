"""Replace a norm (with its residual connection) by a calibrated pointwise gate.

Before:  pre-norm   y = x + F(norm(x))          post-norm   y = norm(x + F(x))
After:   pre-norm   y = x + F(g(x))             post-norm   y = g(x + F(x))
         g(x) = γ ⊙ tanh(α ⊙ x + δ) + β,   α, δ, γ, β ∈ ℝᵈ (one value per channel, no reduction:
         ONNX Mul/Add/Tanh only).
Fit, per site, on the fit batches only (``fit``): minimise the relative block-output error
‖y_gate − y‖² / ‖y‖² with Adam on (α, δ, γ, β) alone (``steps`` steps, cosine-decayed ``lr``,
seeded), from a closed-form start:
         per channel, the least-squares line norm(x)_c ≈ a_c x_c + b_c over the calibration tokens,
         written as a tanh whose linear range spans ``κ`` standard deviations of x_c:
         α = 1/(κ s), δ = −m/(κ s), γ = a κ s, β = b + a m  (m, s: mean, std of x_c),
         κ chosen on the data from {0.5, 1, 2, 4, 8}.
The residual add is kept (it is what makes the substitution viable in a pre-norm block: the gate
only feeds F); the block output (pre-norm: the add closing the branch; post-norm: the norm's output,
which *is* the residual stream) is the reconstruction target and the guard's per-site probe.

Why this form (measured on the calibration data, docs/passes/norm-gate.md): a norm divides each token
by its own scale; a pointwise map can only use one scale per channel. Where the per-token scale
varies little (coefficient of variation ``token_scale_cv`` small) the least-squares line alone
reproduces the norm (``linear_r2`` ≈ 1); where a few tokens carry far larger activations (BERT's
[CLS]/[SEP], massive-activation channels) the tanh saturates them instead of letting them through, which
is what a per-token division does to outliers — DyT's observation (Zhu et al. 2025). Per-channel α and
δ (not DyT's scalar α) because the residual stream's channels differ in scale and mean by orders of
magnitude in trained models. Both figures are stored per site (``NormGateUnit.fit_info``).

Bounded memory: per site, a seeded reservoir of at most ``reservoir`` fit batches of the site's local
inputs (the values entering the block between the norm and its target) is kept while the fit batches
stream by once; sites are fitted one after the other, so memory is one site's reservoir.

Skipped when: the norm cannot be read (eps/γ/β not constants, a reduction over other axes, mixed
precision — the reason is given); the site is not enabled (guard rebuild).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import Tensor, fx, nn

from surgeon.analysis import GraphView, analyze_graph
from surgeon.errors import SurgeonError
from surgeon.inputs import Inputs
from surgeon.pass_manager import Diagnostic, Pass, PassContext, PassResult, SiteRecord
from surgeon.passes._fx import copy_meta
from surgeon.passes._norm_math import constant_of, drop_unused, find_norms, reference_norm

__all__ = ["NormGate", "NormGateUnit", "KAPPAS"]

PREFIX = "surgeon_norm_gate_"
#: Widths of the tanh's linear range tried at initialisation, in standard deviations of x_c.
KAPPAS: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)


class NormGateUnit(nn.Module):
    """``g(x) = γ ⊙ tanh(α ⊙ x + δ) + β`` per channel; ``active=False`` computes the original norm.

    The original norm's eps, γ, β are kept as non-persistent buffers (the exact fallback the guard
    switches to); ``fit_info`` holds the fit figures (errors before/after, κ, data statistics)."""

    def __init__(self, dim: int, flavor: str, eps: float, weight: Tensor | None, bias: Tensor | None,
                 variant: str, target: str) -> None:
        super().__init__()
        self.dim, self.flavor, self.eps, self.variant, self.target = dim, flavor, eps, variant, target
        self.active: bool = True
        # A data-free start (DyT's α₀ = 0.5 with the norm's own γ, β) until ``NormGate.fit`` runs.
        w = weight.detach().float() if weight is not None else torch.ones(dim)
        b = bias.detach().float() if bias is not None else torch.zeros(dim)
        self.alpha = nn.Parameter(torch.full((dim,), 0.5))
        self.delta = nn.Parameter(torch.zeros(dim))
        self.gamma = nn.Parameter(w.clone())
        self.beta = nn.Parameter(b.clone())
        self.register_buffer("ref_weight", weight.detach().clone() if weight is not None else None, persistent=False)
        self.register_buffer("ref_bias", bias.detach().clone() if bias is not None else None, persistent=False)
        self.fit_info: dict[str, Any] = {}

    def reference(self, x: Tensor) -> Tensor:
        return reference_norm(x, self.flavor, self.eps, self.ref_weight, self.ref_bias)

    def forward(self, x: Tensor) -> Tensor:
        if not self.active:
            return self.reference(x)
        return self.gamma * torch.tanh(self.alpha * x + self.delta) + self.beta

    def extra_repr(self) -> str:
        return f"dim={self.dim}, replaces={self.flavor} ({self.variant}-norm)" + ("" if self.active else ", active=False")


# --------------------------------------------------------------------------------------------------
# local reconstruction
# --------------------------------------------------------------------------------------------------

def _closure(node: fx.Node, step: Callable[[fx.Node], Iterable[fx.Node]]) -> set[fx.Node]:
    """``node`` and everything reachable from it by ``step`` (users: descendants; inputs: ancestors)."""
    seen, todo = {node}, [node]
    while todo:
        for n in step(todo.pop()):
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen

def _local_module(gm: fx.GraphModule, start: fx.Node, target: fx.Node) -> tuple[fx.GraphModule, list[fx.Node]]:
    """A GraphModule computing ``target`` from ``start``'s inputs: the nodes on paths start → target.

    Every other value those nodes read (the residual x, masks, shapes) becomes a placeholder; its value
    comes from a run of the whole graph. Submodules and constants are shared with ``gm``."""
    desc = _closure(start, lambda n: n.users)
    anc = _closure(target, lambda n: n.all_input_nodes)
    inside = (desc & anc) | {start, target}
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    externals: list[fx.Node] = []
    for n in gm.graph.nodes:
        if n not in inside:
            continue
        for i in n.all_input_nodes:
            if i in env or i in inside:
                continue
            if i.op == "get_attr":
                env[i] = g.get_attr(str(i.target))
            else:
                env[i] = g.placeholder(i.name)
                externals.append(i)
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[target])
    return fx.GraphModule(gm, g), externals


def _collect(gm: fx.GraphModule, batches: Iterable[Inputs], names: list[str], k: int, seed: int) -> list[dict[str, Any]]:
    """A seeded reservoir of at most ``k`` batches' values of the named nodes (one pass, O(k) memory)."""
    from surgeon.tap import run_tapped

    gen = torch.Generator().manual_seed(seed)
    kept: list[dict[str, Any]] = []
    with torch.no_grad():
        for i, batch in enumerate(batches):
            slot = i if i < k else int(torch.randint(0, i + 1, (1,), generator=gen))
            if slot >= k:
                continue  # Algorithm R: the batch is not sampled, nothing is computed for it
            _, values = run_tapped(gm, batch, names)
            item = {n: (v.detach() if isinstance(v, Tensor) else v) for n, v in values.items()}
            if slot < len(kept):
                kept[slot] = item
            else:
                kept.append(item)
    return kept


def _loss(local: fx.GraphModule, order: list[str], samples: list[dict[str, Any]], target: str) -> float:
    err = ref = 0.0
    with torch.no_grad():
        for s in samples:
            out = local(*[s[n] for n in order])
            r = s[target].to(torch.float64)
            err += float((out.to(torch.float64) - r).square().sum())
            ref += float(r.square().sum())
    return err / ref if ref > 0 else 0.0


def _statistics(unit: NormGateUnit, xs: list[Tensor]) -> dict[str, Tensor | float]:
    """Per-channel moments of x and of the norm's output over every token of the reservoir."""
    d = unit.dim
    n = 0
    sx = torch.zeros(d, dtype=torch.float64)
    sxx, sy, sxy, syy = sx.clone(), sx.clone(), sx.clone(), sx.clone()
    scales = []
    with torch.no_grad():
        for x in xs:
            x2 = x.reshape(-1, d).to(torch.float64)
            y2 = unit.reference(x).reshape(-1, d).to(torch.float64)
            n += x2.shape[0]
            sx += x2.sum(0)
            sxx += x2.square().sum(0)
            sy += y2.sum(0)
            sxy += (x2 * y2).sum(0)
            syy += y2.square().sum(0)
            scales.append(x2.std(1) if unit.flavor == "layernorm" else x2.square().mean(1).sqrt())
    m, my = sx / n, sy / n
    var = (sxx / n - m.square()).clamp_min(1e-12)
    cov = sxy / n - m * my
    a = cov / var
    b = my - a * m
    resid = (syy / n - my.square()) - cov.square() / var  # per-channel residual variance of the line
    total = (syy / n - my.square()).clamp_min(1e-30)
    sc = torch.cat(scales)
    return {"m": m, "s": var.sqrt(), "a": a, "b": b,
            "linear_r2": float(1 - resid.clamp_min(0).sum() / total.sum()),
            "token_scale_cv": float(sc.std() / sc.mean().clamp_min(1e-30)), "tokens": n}


def _init_from(unit: NormGateUnit, st: dict, kappa: float) -> None:
    m, s, a, b = st["m"], st["s"], st["a"], st["b"]
    with torch.no_grad():
        unit.alpha.copy_((1.0 / (kappa * s)).float())
        unit.delta.copy_((-m / (kappa * s)).float())
        unit.gamma.copy_((a * kappa * s).float())
        unit.beta.copy_((b + a * m).float())


# --------------------------------------------------------------------------------------------------
# the pass
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NormGate(Pass):
    """Norm (+ residual) → calibrated per-channel tanh gate, fitted by local reconstruction."""

    name: ClassVar[str] = "norm-gate"
    requires: ClassVar[tuple[str, ...]] = ("norm-fold",)  # gate what the exact folds leave
    # its contract examples (tests/test_pass_contract.py): a model with its sites, then near-misses
    examples: ClassVar[tuple[str, ...]] = ("_pass_examples:transformer_pre",)
    example_spec: ClassVar[str] = "norm-gate{steps=7}"  # a non-default option
    steps: int = 500  # Adam steps per site
    lr: float = 0.03  # relative step size (scaled by each parameter group's magnitude)
    reservoir: int = 8  # fit batches kept per site (memory bound)

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be ≥ 0, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.reservoir < 1:
            raise ValueError(f"reservoir must be ≥ 1, got {self.reservoir}")

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        view = GraphView(gm)
        parts_of = {nm.node: parts for nm, parts in find_norms(gm, view)}
        diags: list[Diagnostic] = []
        modified = False
        i = sum(1 for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith(PREFIX))
        # norm-fold centres the residual stream (it marks the norms it rewrote so, node.meta["surgeon"]):
        # the block output then differs from the original's by its mean, so there is no original value
        # to compare with.
        centred = any(n.meta.get("surgeon", {}).get("residual_centred") for n in gm.graph.nodes)
        for site in analyze_graph(gm).by_kind("norm_residual"):
            if not ctx.wants(site.id):
                continue
            parts = parts_of.get(site.nodes["norm"])
            if parts is None or isinstance(parts, str):
                why = parts or "the norm could not be read"
                diags.append(Diagnostic(self.name, site.id, "skipped", f"{site.details.get('norm', 'norm')}: {why}",
                                        site.module, site.kind))
                continue
            if parts.node.op == "call_module" or parts.x.op == "call_module" and \
                    str(parts.x.target).startswith(PREFIX):
                diags.append(Diagnostic(self.name, site.id, "skipped", "already rewritten", site.module, site.kind))
                continue
            name = f"{PREFIX}{i}"
            i += 1
            post = site.variant == "post"
            old_name = parts.node.name
            unit = NormGateUnit(parts.dim, parts.flavor, parts.eps, constant_of(gm, parts.weight),
                                constant_of(gm, parts.bias), site.variant, "")
            gm.add_submodule(name, unit)
            with gm.graph.inserting_before(parts.node):
                new = gm.graph.call_module(name, (parts.x,))
            copy_meta(new, parts.node)
            parts.node.replace_all_uses_with(new)
            drop_unused(gm, parts.core)
            probe = new.name if post else site.nodes["add"].name
            unit.target = probe
            reference = old_name if post else (None if centred else probe)
            ctx.register(SiteRecord(site.id, "norm_residual", site.module, self.name, [name], probe=probe,
                                    reference=reference))
            label = "LayerNorm" if parts.flavor == "layernorm" else "RMSNorm"
            diags.append(Diagnostic(self.name, site.id, "applied",
                                    f"{label} ({site.variant}-norm) → γ⊙tanh(α⊙x+δ)+β, fitted on the "
                                    f"{'norm output' if post else 'block output'}"
                                    + ("" if reference else "; per-site error not measured: the residual stream "
                                       "was centred by norm-fold, the original has no equal value to compare"),
                                    site.module, site.kind))
            modified = True
        gm.recompile()
        return PassResult(gm, modified, diags)

    # -- fitting --------------------------------------------------------------------------------------
    def fit(self, gm: fx.GraphModule, ctx: PassContext, batches: Iterable[Any]) -> None:
        """Fit every gate of this pass on ``batches`` (see the module docstring); sites one at a time."""
        records = [r for r in ctx.records.values() if r.pass_name == self.name]
        if not records:
            return
        batches = list(batches)
        if not batches:
            raise SurgeonError("norm-gate: no fit batches to fit the gates on")
        seed = int(ctx.options.get("seed", 0))
        switches = [(m, m.active) for _, m in gm.named_modules() if isinstance(m, NormGateUnit)]
        frozen = [(p, p.requires_grad) for p in gm.parameters()]
        try:
            for _, m in gm.named_modules():
                if isinstance(m, NormGateUnit):
                    m.active = False  # every site sees the original model's values
            for p, _ in frozen:
                p.requires_grad_(False)
            for k, r in enumerate(records):
                self._fit_site(gm, r, batches, seed + k)
        finally:
            for m, a in switches:
                m.active = a
            for p, g in frozen:
                p.requires_grad_(g)

    def _fit_site(self, gm: fx.GraphModule, record: SiteRecord, batches: list[Inputs], seed: int) -> None:
        name = record.submodules[0]
        unit: NormGateUnit = gm.get_submodule(name)
        nodes = {n.name: n for n in gm.graph.nodes}
        start = next(n for n in gm.graph.nodes if n.op == "call_module" and str(n.target) == name)
        target = nodes[unit.target]
        local, externals = _local_module(gm, start, target)
        order = [e.name for e in externals]
        x_name = start.args[0].name
        samples = _collect(gm, batches, order + [target.name], self.reservoir, seed)
        samples = [s for s in samples if all(n in s for n in order + [target.name])]
        if not samples:
            raise SurgeonError(f"norm-gate: the fit batches never reached '{record.module or record.site}'")
        st = _statistics(unit, [s[x_name] for s in samples])

        unit.active = True
        errors = {}
        for kappa in KAPPAS:
            _init_from(unit, st, kappa)
            errors[kappa] = _loss(local, order, samples, target.name)
        kappa = min(KAPPAS, key=lambda k: (errors[k], k))
        _init_from(unit, st, kappa)
        init_error = errors[kappa]
        start_state = {k: v.detach().clone() for k, v in unit.named_parameters()}

        params = [unit.alpha, unit.delta, unit.gamma, unit.beta]
        for p in params:
            p.requires_grad_(True)
        rms = lambda t: float(t.detach().square().mean().sqrt()) or 1.0  # noqa: E731
        # Adam's step is ~lr in each parameter's own units: scale it to each group's magnitude.
        groups = [{"params": [unit.alpha], "lr": self.lr * rms(unit.alpha)},
                  {"params": [unit.delta], "lr": self.lr},
                  {"params": [unit.gamma, unit.beta], "lr": self.lr * rms(unit.gamma)}]
        opt = torch.optim.Adam(groups)
        base = [g["lr"] for g in groups]
        torch.manual_seed(seed)
        with torch.enable_grad():
            for step in range(self.steps):
                for g, lr0 in zip(opt.param_groups, base):
                    g["lr"] = lr0 * 0.5 * (1 + math.cos(math.pi * step / max(self.steps, 1)))
                s = samples[step % len(samples)]
                ref = s[target.name]
                out = local(*[s[n] for n in order])
                loss = (out - ref).square().sum() / ref.square().sum().clamp_min(1e-30)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        for p in params:
            p.requires_grad_(False)
        fit_error = _loss(local, order, samples, target.name)
        if not fit_error <= init_error:  # never leave a site worse than its closed-form start
            with torch.no_grad():
                for k, v in unit.named_parameters():
                    v.copy_(start_state[k])
            fit_error = init_error
        unit.fit_info = {"init_error": init_error, "fit_error": fit_error, "kappa": kappa,
                         "kappa_errors": {str(k): v for k, v in errors.items()},
                         "linear_r2": st["linear_r2"], "token_scale_cv": st["token_scale_cv"],
                         "tokens": st["tokens"], "reservoir_batches": len(samples), "steps": self.steps}
        unit.active = False
