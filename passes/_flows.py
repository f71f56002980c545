"""Private helpers of the flow passes (``flow-fold``, ``flow-inverse``) and the flow benchmark.

* Graph side: a flow's outputs (``z`` first, log-dets after it), the *parameter-only* nodes (values
  computed from parameters, buffers and literals alone) and their evaluation.
* Inverse side: ``AuxInverse`` (the distilled z → x network with optional correction steps), its
  training loop and the reconstruction figures the guard reads.
* Density side: bits per dimension of a ``(z, log_det)`` output under a standard-normal base.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor, fx, nn
from torch.utils import _pytree as pytree

from surgeon.inputs import Inputs, as_args_kwargs, tensors_of

# --------------------------------------------------------------------------------------------------
# graph side
# --------------------------------------------------------------------------------------------------


def output_leaves(gm: fx.GraphModule) -> list[Any]:
    """The flat list of what the graph returns (fx nodes, or literals), in pytree order."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    return pytree.tree_leaves(out.args[0], is_leaf=lambda v: isinstance(v, fx.Node))


def tensor_placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    """Placeholders that carry tensors (user inputs; an fx graph may also have non-tensor ones)."""
    out = []
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        val = n.meta.get("val", n.meta.get("tensor_meta"))
        if val is None or isinstance(val, torch.Tensor) or hasattr(val, "shape"):
            out.append(n)
    return out


def _is_random(n: fx.Node) -> bool:
    target = n.target
    if isinstance(target, torch._ops.OpOverload):
        return torch.Tag.nondeterministic_seeded in target.tags
    name = getattr(target, "__name__", str(target))
    return name.startswith(("rand", "normal", "bernoulli", "multinomial", "dropout"))


def _is_mutating(n: fx.Node) -> bool:
    target = n.target
    if target is operator.setitem:
        return True
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable
    name = n.target if n.op == "call_method" else getattr(target, "__name__", "")
    return isinstance(name, str) and name.endswith("_") and not name.endswith("__")


def parameter_only(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value depends on parameters, buffers and literals only — not on any input, not
    even on an input's shape (``sum(log s)·H·W`` is not parameter-only, ``sum(log s)`` is).

    Random and in-place ops are never parameter-only (folding them would change what runs)."""
    out: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            out.add(n)
        elif n.op in ("call_function", "call_method") and not _is_random(n) and not _is_mutating(n):
            if all(i in out for i in n.all_input_nodes):
                out.add(n)
    return out


_VIEWISH = {"view", "reshape", "_unsafe_view", "expand", "permute", "transpose", "t", "unsqueeze", "squeeze",
            "alias", "detach", "clone", "contiguous", "getitem", "lift_fresh_copy", "to", "_to_copy"}


def op_name(n: fx.Node) -> str:
    if isinstance(n.target, torch._ops.OpOverload):
        return n.target.overloadpacket.__name__
    if n.target is operator.getitem:
        return "getitem"
    return n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))


def computes(n: fx.Node, params: set[fx.Node]) -> bool:
    """True when the parameter-only value ``n`` costs arithmetic (not only views of a parameter)."""
    todo, seen = [n], set()
    while todo:
        cur = todo.pop()
        if cur in seen or cur.op == "get_attr":
            continue
        seen.add(cur)
        if op_name(cur) not in _VIEWISH:
            return True
        todo += [i for i in cur.all_input_nodes if i in params]
    return False


def ancestors(nodes: Iterable[fx.Node]) -> set[fx.Node]:
    """Every node some of ``nodes`` reads (through arguments, shape arguments included), and themselves."""
    out: set[fx.Node] = set()
    todo = [n for n in nodes if isinstance(n, fx.Node)]
    while todo:
        cur = todo.pop()
        if cur in out:
            continue
        out.add(cur)
        todo += cur.all_input_nodes
    return out


def evaluate(gm: fx.GraphModule, nodes: Iterable[fx.Node], params: set[fx.Node]) -> dict[fx.Node, Any]:
    """Values of parameter-only ``nodes`` (and of what they read), computed with the graph's own ops
    and dtypes — so a folded value is bit-identical to what the graph computed."""
    need = ancestors(nodes)
    values: dict[fx.Node, Any] = {}
    with torch.no_grad():
        for n in gm.graph.nodes:
            if n not in need:
                continue
            if n not in params:
                raise ValueError(f"node {n.name} is not parameter-only")
            if n.op == "get_attr":
                obj: Any = gm
                for part in str(n.target).split("."):
                    obj = getattr(obj, part)
                values[n] = obj
                continue
            args = fx.node.map_arg(n.args, lambda a: values[a])
            kwargs = fx.node.map_arg(n.kwargs, lambda a: values[a])
            if n.op == "call_function":
                values[n] = n.target(*args, **kwargs)
            else:
                values[n] = getattr(args[0], str(n.target))(*args[1:], **kwargs)
    return values


def module_of(n: fx.Node) -> str:
    """The module path a node was traced in (``transforms.3``), '' at the root."""
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # torch.export writes paths as L['self'].transforms[3] in some versions; normalise to dots.
    for junk in ("L['self'].", "L['self']"):
        path = path.replace(junk, "")
    return path.replace("[", ".").replace("]", "").replace("'", "").strip(".")


# --------------------------------------------------------------------------------------------------
# the distilled inverse
# --------------------------------------------------------------------------------------------------


def first_float(value: Any) -> Tensor:
    """The first floating tensor of a model output (``z`` of ``(z, log_det)``)."""
    if isinstance(value, Tensor):
        return value
    found = tensors_of(value)
    if not found:
        raise ValueError("the model output holds no floating tensor")
    return found[0]


def single_input(batch: Inputs) -> Tensor:
    """The one tensor input of a flow batch."""
    args, kwargs = as_args_kwargs(batch)
    leaves = [v for v in list(args) + list(kwargs.values()) if isinstance(v, Tensor)]
    if len(leaves) != 1:
        raise ValueError(f"a flow takes one tensor input, this batch has {len(leaves)}")
    return leaves[0]


class AuxInverse(nn.Module):
    """A distilled inverse of a flow: ``forward(z) → x``.

    ``x₀ = g(z)`` with ``g(z) = A·z + c + MLP(z)`` on flattened samples (A, c: a ridge least-squares
    fit of x on z; the MLP learns the rest). With ``corrections = k > 0`` and the exact forward ``f``:
    ``x_{j+1} = x_j + g(z) − g(f(x_j))``. If g's Jacobian G approximates (∂f/∂x)⁻¹ the error contracts
    as ``e_{j+1} ≈ (I − G·J_f)·e_j``; the step costs one forward (density) pass — a single pass even
    for autoregressive flows — and one pass of g, against D sequential passes for the exact inverse.

    ``safeguard``: evaluate f once more after the last step and return, per sample, the iterate with the
    smallest latent residual ‖f(x) − z‖ (k + 1 forward passes instead of k); without it a diverging
    step is returned as is.

    ``active`` is the verification guard's switch; it does not touch the flow's forward graph (this
    module is never called by it)."""

    def __init__(self, shape: Sequence[int], hidden: int, depth: int, corrections: int = 0,
                 flow: nn.Module | None = None, safeguard: bool = True) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)  # one sample's shape, without the batch dimension
        n = math.prod(self.shape)
        self.linear = nn.Linear(n, n)
        layers: list[nn.Module] = []
        d = n
        for _ in range(depth):
            layers += [nn.Linear(d, hidden), nn.SiLU()]
            d = hidden
        layers.append(nn.Linear(d, n))
        self.mlp = nn.Sequential(*layers)
        self.corrections = int(corrections)
        self.safeguard = bool(safeguard)
        self.flow = flow  # the exact forward (pairs for fitting; the correction steps)
        self.active: bool = True
        self.trained: bool = False

    def g(self, z: Tensor) -> Tensor:
        flat = z.reshape(z.shape[0], -1)
        return (self.linear(flat) + self.mlp(flat)).reshape(z.shape[0], *self.shape)

    def forward(self, z: Tensor) -> Tensor:
        gz = self.g(z)
        if self.corrections == 0:
            return gz
        x, best, best_r = gz, gz, None
        for j in range(self.corrections + (1 if self.safeguard else 0)):
            fx = first_float(self.flow(x))
            if self.safeguard:
                # Keep, per sample, the iterate whose latent residual ‖f(x) − z‖ is smallest: a step
                # that diverges (g far from f⁻¹ there) then falls back instead of blowing up.
                r = (fx - z).reshape(z.shape[0], -1).square().sum(1)
                if best_r is None:
                    best_r = r
                else:
                    better = r < best_r
                    best = torch.where(better.reshape(-1, *([1] * (x.dim() - 1))), x, best)
                    best_r = torch.where(better, r, best_r)
            if j == self.corrections:
                break
            x = x + gz - self.g(fx)
        return best if self.safeguard else x

    def extra_repr(self) -> str:
        return f"shape={self.shape}, corrections={self.corrections}, safeguard={self.safeguard}, trained={self.trained}"


@dataclass
class TrainStats:
    steps: int
    seconds: float
    samples: int
    fit_rel_err_median: float  # of g alone on the training pairs


def _rel_errors(x_hat: Tensor, x: Tensor) -> Tensor:
    a, b = x_hat.reshape(x.shape[0], -1).double(), x.reshape(x.shape[0], -1).double()
    return (a - b).norm(dim=1) / b.norm(dim=1).clamp_min(1e-12)


def train_inverse(inv: AuxInverse, xs: Tensor, zs: Tensor, *, steps: int, lr: float, batch_size: int,
                  accepted_batch: int | None = None,
                  noise: float = 0.0, flow: nn.Module | None = None, ridge: float = 1e-4,
                  seed: int = 0) -> TrainStats:
    """Fit ``inv.g`` to map ``zs`` to ``xs`` (pairs from the exact forward): closed-form ridge
    regression for the linear part, then Adam on the normalised squared error with a cosine schedule.

    ``noise > 0`` (needs ``flow``): each step's x are jittered by ``noise·σ_x·ε`` and pushed through
    the exact forward again — still exact pairs, but covering a neighbourhood of the data, which
    teaches g the local inverse Jacobian the correction steps rely on (and keeps g from memorising
    the few fit points). ``accepted_batch``: a batch size the captured ``flow`` runs at (the fit
    batches'); the minibatches take it when the capture refuses ``batch_size`` (a graph whose export
    fixed the batch dimension)."""
    import time

    start = time.perf_counter()
    n = xs.shape[0]
    X = xs.reshape(n, -1).double()
    Z = zs.reshape(n, -1).double()
    with torch.no_grad():
        # Ridge least squares on centred data: the best affine map z → x, the MLP's starting point.
        zm, xm = Z.mean(0), X.mean(0)
        Zc, Xc = Z - zm, X - xm
        reg = ridge * Zc.pow(2).sum(0).mean().clamp_min(1e-12) * torch.eye(Z.shape[1], dtype=Z.dtype)
        A = torch.linalg.solve(Zc.T @ Zc + reg, Zc.T @ Xc).T  # x ≈ A z + c
        inv.linear.weight.copy_(A.float())
        inv.linear.bias.copy_((xm - A @ zm).float())
        last = inv.mlp[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    # Train in a normalised output space: dimensions of x with a large spread would otherwise own
    # the loss; the per-sample relative error the guard reads weighs all of them.
    xs_f, zs_f = X.float(), Z.float()
    scale = xs_f.std(0).clamp_min(1e-6)
    gen = torch.Generator().manual_seed(seed)
    params = list(inv.linear.parameters()) + list(inv.mlp.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    bs = min(batch_size, n)
    if noise > 0 and flow is not None and accepted_batch is not None and bs != accepted_batch:
        try:
            with torch.no_grad():
                flow(xs_f[:bs].reshape(bs, *inv.shape))
        except Exception:  # noqa: BLE001 - a capture that fixed the batch size (a guard on it) refuses others
            # the noisy minibatches pushed through the flow take the size the fit batches have
            bs = min(accepted_batch, n)
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(0, n, (bs,), generator=gen)
            zb, xb = zs_f[idx], xs_f[idx]
            if noise > 0 and flow is not None:
                xb = xb + noise * scale * torch.randn(xb.shape, generator=gen)
                with torch.no_grad():
                    zb = first_float(flow(xb.reshape(bs, *inv.shape))).reshape(bs, -1).float()
            pred = inv.linear(zb) + inv.mlp(zb)
            loss = ((pred - xb) / scale).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    inv.trained = True
    with torch.no_grad():
        err = _rel_errors(inv.g(zs_f.reshape(zs.shape)), xs)
    return TrainStats(steps, time.perf_counter() - start, n, float(err.median()))


def reconstruction_errors(inv: nn.Module, flow: nn.Module, batches: Iterable[Inputs],
                          corrections: int | None = None) -> Tensor:
    """Per-sample ‖inv(f(x)) − x‖ / ‖x‖ over ``batches`` (one float per sample: memory O(samples)).

    ``corrections`` overrides the module's own number of correction steps for this measurement."""
    errs = []
    saved = getattr(inv, "corrections", None)
    try:
        if corrections is not None:
            if corrections > 0 and getattr(inv, "flow", None) is None:
                raise ValueError("correction steps need the inverse's copy of the exact forward")
            inv.corrections = corrections
        with torch.no_grad():
            for batch in batches:
                x = single_input(batch)
                z = first_float(flow(x))
                errs.append(_rel_errors(inv(z), x))
    finally:
        if saved is not None:
            inv.corrections = saved
    return torch.cat(errs) if errs else torch.zeros(0, dtype=torch.float64)


def error_figures(errs: Tensor) -> dict[str, float]:
    """Median / 90th percentile / max of per-sample relative errors."""
    if errs.numel() == 0:
        return {"median": math.nan, "p90": math.nan, "max": math.nan, "samples": 0}
    e = errs.double()
    return {"median": float(e.median()), "p90": float(torch.quantile(e, 0.9)), "max": float(e.max()),
            "samples": int(e.numel())}


# --------------------------------------------------------------------------------------------------
# density side
# --------------------------------------------------------------------------------------------------


def log_prob(output: Any) -> Tensor:
    """log p(x) per sample from a flow output ``(z, log_det)`` under a standard-normal base."""
    if not (isinstance(output, (tuple, list)) and len(output) >= 2):
        raise ValueError("a flow output (z, log_det) is needed to compute a log-likelihood")
    z, ld = output[0], output[1]
    flat = z.reshape(z.shape[0], -1).double()
    return -0.5 * flat.pow(2).sum(1) - 0.5 * flat.shape[1] * math.log(2 * math.pi) + ld.double()


def bits_per_dim(output: Any) -> float:
    """Mean negative log-likelihood in bits per dimension (of the flow's own input space)."""
    z = output[0]
    dims = math.prod(z.shape[1:])
    return float(-log_prob(output).mean()) / (dims * math.log(2))


def bpd_change(ref_outputs: Any, outputs: Any) -> float:
    """A guard metric (higher is better): −|Δ bits/dim| between the original and the rewritten flow.

    Use with ``surgeon.optimize(..., metric=bpd_change, tolerance=-0.01)`` to accept at most
    0.01 bit/dim of change (e.g. with ``linear-quant`` on the coupling networks)."""
    return -abs(bits_per_dim(outputs) - bits_per_dim(ref_outputs))
