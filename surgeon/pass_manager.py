"""Pass infrastructure: frozen-dataclass passes, pipeline specs, ordering (the registry: ``surgeon.passes``).

A pass is a frozen dataclass whose fields are its options; ``name`` is its CLI id. ``call(gm, ctx)``
rewrites ``gm`` in place (or returns a new module) and returns ``PassResult(gm, modified,
diagnostics)``. Every site a pass touches is *registered* in the context with the submodules it added,
so the verification guard can switch a site off (``set_site_active``) and the pipeline can rebuild
the model with only the kept sites (``PassContext.enabled_sites``).

Passes are found by name only through ``surgeon.passes`` (``pass_class``, ``register``); a pass never
imports another pass. What a pass wants later passes to know about its rewrite it records on the nodes
it creates, under ``node.meta["surgeon"]`` (a dict of plain facts, e.g. norm-fold's
``{"residual_centred": True}``): the graph carries it to every later pass, and the pipeline's rebuild
reruns the same passes on a fresh copy of the captured graph, so the facts are recorded again.

A pass whose site is a decoder's key/value cache (``kv-cache-quant``) is a :class:`CachePass`: the cache
is the decode step's inputs and outputs, which no graph rewrite can retype, so the decoder variant of
the pipeline (``surgeon.decoder.pipeline``) asks it for its ``rungs`` and builds each rung's step with
``apply``; on an fx graph its ``call`` declines.

Pipeline spec grammar: ``name{opt=value,opt=value},name2`` — e.g.
``attention-fp8{p_bits=8,granularity=head},linear-quant{dtype=int8}``.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Protocol, Sequence, runtime_checkable

import networkx as nx
from torch import fx, nn

from .errors import PipelineError, SurgeonError, first_line, module_of_failure

if TYPE_CHECKING:  # types only: the decoder step needs transformers, the pass manager does not
    from .decoder.step import CacheStats, DecoderStep
    from .profile import Profile


@dataclass
class Diagnostic:
    """What a pass decided about one site (or about the graph, when ``site`` is None)."""

    pass_name: str
    site: str | None
    status: str  # "applied" | "skipped"
    reason: str = ""
    module: str = ""
    kind: str = ""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PassResult:
    gm: fx.GraphModule
    modified: bool
    diagnostics: list[Diagnostic] = field(default_factory=list)


@dataclass
class SiteRecord:
    """A substituted site: the submodules that implement it (switchable for verification)."""

    site: str
    kind: str
    module: str
    pass_name: str
    submodules: list[str]
    probe: str | None = None  # name of the node whose value is the site's output (for per-site error)
    reference: str | None = None  # name of the corresponding node in the original graph
    # The substitutes the site can take, best first (its ladder without the final "keep"); the
    # guard steps a site down it before rolling it back. Empty: one substitute, on or off.
    rungs: tuple[str, ...] = ()
    # What each rung buys, by rung: {"weight_bytes": fp32 bytes not stored, "macs": multiply-adds per
    # sample moved to 8 bits}. The guard keeps what pays most per unit of error.
    benefit: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class PassContext:
    """State shared by the passes of one pipeline run.

    ``enabled_sites``: when not None, passes act only on these site ids (the guard rebuilds the
    model with the sites it kept). ``records`` collects what each pass substituted.
    An exact pass (``norm-fold``) may register no record and ignore ``enabled_sites``: there is
    nothing for the guard to switch off, so it rewrites the same way on every run; its
    ``applied`` diagnostics are what the report lists for it.
    """

    enabled_sites: set[str] | None = None
    records: dict[str, SiteRecord] = field(default_factory=dict)
    history: list[str] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)  # pipeline-wide: seed, calibration data...
    profile: Any = None
    """the deploy target's runtime profile (surgeon.profile.Profile), set by the pipeline; passes read
    runtime facts from it instead of hard-coding one runtime"""

    def wants(self, site_id: str) -> bool:
        return self.enabled_sites is None or site_id in self.enabled_sites

    def register(self, record: SiteRecord) -> None:
        self.records[record.site] = record


@dataclass(frozen=True)
class Pass:
    """Base of every pass. Subclasses are frozen dataclasses; their fields are the options."""

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()  # passes that must run before this one when both run

    def call(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def fit(self, gm: fx.GraphModule, ctx: PassContext, batches: Iterable[Any]) -> None:
        """Optional: fit parameters on the fit batches after calibration (default: nothing)."""

    def check(self, gm: fx.GraphModule, ctx: PassContext, batches: Sequence[Any]) -> list[Any]:
        """Optional: a pass-specific acceptance test of the *final* model on the check batches, for
        what the end-to-end guard cannot see (an auxiliary module the forward never calls). Returns
        objects with ``site``, ``accepted``, ``figures``, ``reason`` and ``to_json()`` (default: none)."""
        return []

    def artifacts(self, gm: fx.GraphModule, ctx: PassContext) -> dict[str, nn.Module]:
        """Optional: detach and return extra modules the pipeline delivers beside the model, by name
        (``{"inverse": module}`` → ``Result.inverse`` and ``OUTDIR/inverse.pt2``). Default: none."""
        return {}

    def spec(self) -> str:
        """The pipeline spec that recreates this pass with its options."""
        opts = ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))
        return f"{self.name}{{{opts}}}" if opts else self.name

    def __str__(self) -> str:
        return self.spec()


@runtime_checkable
class CachePass(Protocol):
    """What a pass on a decoder's key/value cache adds to ``Pass`` (the decoder variant of the
    pipeline runs it): the guard tries its ``rungs`` best first, each built by ``apply``, and keeps the
    first that holds."""

    name: ClassVar[str]

    def rungs(self, profile: "Profile | None" = None) -> tuple[str, ...]:
        """The cache formats to try, best first, ending in ``keep`` (the fp32 cache)."""

    def apply(self, step: "DecoderStep", stats: "CacheStats", rung: str) -> "DecoderStep":
        """A step over the same LM whose cache takes ``rung``, from the calibration ``stats``."""

    def spec(self) -> str:
        """The pipeline spec that recreates the pass."""


def pass_class(name: str) -> type[Pass]:
    """Resolve a registered pass name to its class (``surgeon.passes.pass_class``: imports its module
    on first use)."""
    passes = importlib.import_module("surgeon.passes")  # lazy: the pass modules import this one
    return passes.pass_class(name)


def _coerce(cls: type[Pass], f: dataclasses.Field, raw: str) -> Any:
    hints = typing.get_type_hints(cls)
    typ = hints.get(f.name, str)
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == raw:
                return choice
        raise SurgeonError(f"option {cls.name}.{f.name}={raw} is not one of {', '.join(map(str, args))}")
    if origin is typing.Union:  # Optional[X]
        if raw.lower() in ("none", "null"):
            return None
        typ = next(a for a in args if a is not type(None))
    try:
        if typ is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if typ in (int, float):
            return typ(raw)
    except ValueError:
        raise SurgeonError(f"option {cls.name}.{f.name}={raw} is not a valid {typ.__name__}") from None
    return raw


_NAME = re.compile(r"[A-Za-z0-9_-]+")


def _spec_error(spec: str, at: int, reason: str) -> SurgeonError:
    """One line naming the 1-based character of ``spec`` at ``at`` and showing the spec with a ``▸``
    marker in front of it (after its end when ``at == len(spec)``)."""
    where = f"character {at + 1}" if at < len(spec) else f"the end (character {at + 1})"
    return SurgeonError(f"cannot parse pass pipeline at {where}: {reason}: '{spec[:at]}▸{spec[at:]}'")


def _split_spec(spec: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """``name{key=value,...},name2`` → ``[(name, [(key, value), ...]), ...]``; any other text is refused
    at the character where it stops being a pipeline. Empty entries (``a,,b``, ``{x=1,}``) are errors."""
    n = len(spec)

    def skip(i: int) -> int:
        while i < n and spec[i].isspace():
            i += 1
        return i

    items: list[tuple[str, list[tuple[str, str]]]] = []
    i = skip(0)
    while True:
        m = _NAME.match(spec, i)
        if not m:
            found = "the end" if i == n else f"'{spec[i]}'"
            raise _spec_error(spec, i, f"a pass name expected, found {found}")
        name = m.group()
        i = skip(m.end())
        options: list[tuple[str, str]] = []
        braces = i < n and spec[i] == "{"
        if braces:
            opened, close = i, spec.find("}", i)
            inner = spec.find("{", i + 1)
            if 0 <= inner and (close < 0 or inner < close):
                raise _spec_error(spec, inner, f"'{{' inside the options of '{name}' (opened at character {opened + 1})")
            if close < 0:
                raise _spec_error(spec, n, f"'}}' expected to close the options of '{name}' opened at "
                                           f"character {opened + 1}")
            body, at = spec[opened + 1:close], opened + 1
            if body.strip():  # '{}' is no options
                for part in body.split(","):
                    item_at = at + len(part) - len(part.lstrip())
                    at += len(part) + 1
                    item = part.strip()
                    if not item:
                        raise _spec_error(spec, item_at, f"empty option in the options of '{name}'")
                    if "=" not in item:
                        raise _spec_error(spec, item_at, f"option '{item}' of pass '{name}' must be written key=value")
                    key, raw = (x.strip() for x in item.split("=", 1))
                    if not key:
                        raise _spec_error(spec, item_at, f"an option name expected before '=' in the options of "
                                                         f"'{name}'")
                    options.append((key, raw))
            i = skip(close + 1)
        items.append((name, options))
        if i == n:
            return items
        if spec[i] != ",":
            reason = ("'}' without a matching '{'" if spec[i] == "}" else
                      f"one {{...}} per pass ('{name}' already has its options)" if spec[i] == "{" and braces else
                      f"',' expected between passes, found '{spec[i]}'")
            raise _spec_error(spec, i, reason)
        i = skip(i + 1)


def parse_pipeline(spec: str) -> list[Pass]:
    """Parse ``name{opt=value,...},name2`` into pass instances (options validated)."""
    if not spec or not spec.strip():
        raise SurgeonError("empty pass pipeline: name at least one pass (e.g. attention-fp8)")
    passes: list[Pass] = []
    for name, options in _split_spec(spec):
        cls = pass_class(name)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, raw in options:
            if key not in fields:
                raise SurgeonError(f"unknown option '{key}' for pass '{name}' (options: {', '.join(fields) or 'none'})")
            kwargs[key] = _coerce(cls, fields[key], raw)
        try:
            passes.append(cls(**kwargs))
        except (ValueError, TypeError) as exc:  # __post_init__ range checks raise ValueError
            raise SurgeonError(f"pass '{name}': {exc}") from None
    return passes


def order_passes(passes: list[Pass]) -> list[Pass]:
    """Order by declared requirements (topological), keeping the user's order where free."""
    g = nx.DiGraph()
    index = {id(p): i for i, p in enumerate(passes)}
    by_name: dict[str, list[Pass]] = {}
    for p in passes:
        g.add_node(id(p))
        by_name.setdefault(p.name, []).append(p)
    for p in passes:
        for req in p.requires:
            for q in by_name.get(req, []):
                g.add_edge(id(q), id(p))
    try:
        order = list(nx.lexicographical_topological_sort(g, key=lambda n: index[n]))
    except nx.NetworkXUnfeasible:
        raise SurgeonError("pass requirements form a cycle: " + ", ".join(p.name for p in passes)) from None
    lookup = {id(p): p for p in passes}
    return [lookup[n] for n in order]


class PassManager:
    """Runs passes in dependency order; a failure names the passes that ran before it."""

    def __init__(self, passes: list[Pass] | str) -> None:
        self.passes = order_passes(parse_pipeline(passes) if isinstance(passes, str) else list(passes))

    def run(self, gm: fx.GraphModule, ctx: PassContext | None = None) -> tuple[fx.GraphModule, PassContext, list[Diagnostic]]:
        ctx = ctx or PassContext()
        diags: list[Diagnostic] = []
        for p in self.passes:
            try:
                result = p.call(gm, ctx)
            except SurgeonError:
                raise
            except Exception as exc:
                before = ", ".join(ctx.history) or "none"
                where = module_of_failure(exc, gm)
                raise PipelineError(f"internal error in stage 'passes', pass '{p.name}'"
                                    + (f", module '{where}'" if where else "")
                                    + f" (passes run before it: {before}): {first_line(exc)}") from exc
            gm = result.gm
            gm.graph.lint()
            gm.recompile()
            diags += result.diagnostics
            ctx.history.append(p.name)
        return gm, ctx, diags


def set_site_rung(gm: nn.Module, record: SiteRecord, rung: str | None) -> None:
    """Put a site on one of its rungs (``None`` or ``"keep"``: the exact computation)."""
    keep = rung is None or rung == "keep"
    for name in record.submodules:
        module = gm.get_submodule(name)
        setattr(module, "active", not keep)  # noqa: B010 - a submodule's attribute, not a tensor
        if not keep and hasattr(module, "rung"):
            setattr(module, "rung", rung)  # noqa: B010


def set_site_active(gm: nn.Module, record: SiteRecord, active: bool) -> None:
    """Switch a substituted site between its substitute (True) and the exact computation (False).

    Every submodule a pass adds honours an ``active`` attribute; inactive means "compute exactly what
    the original computed" (a quantizer becomes the identity)."""
    for name in record.submodules:
        setattr(gm.get_submodule(name), "active", active)  # noqa: B010 - a submodule's attribute, not a tensor
