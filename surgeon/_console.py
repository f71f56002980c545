"""Rich rendering of analyses and reports for the terminal."""

from __future__ import annotations

from rich.cells import cell_len
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .analysis import Analysis


def _shape(s: object, names: dict[str, str] | None = None) -> str:
    names = names or {}
    return "×".join(names.get(str(d), str(d)) for d in s) if isinstance(s, list) else str(s)


def dim_names(shapes: list[object]) -> dict[str, str]:
    """Readable names for torch's symbolic sizes (``s18`` → ``batch``): a symbol that leads a shape is
    the batch, the one other symbol is the sequence; any further symbols print as ``?``. The names
    only read the site shapes (the JSON keeps torch's symbols)."""
    symbols: list[str] = []
    leading: set[str] = set()
    for shape in shapes:
        if not isinstance(shape, list):
            continue
        for i, d in enumerate(shape):
            if isinstance(d, str):
                symbols += [d] if d not in symbols else []
                if i == 0:
                    leading.add(d)
    names: dict[str, str] = {}
    batch = [d for d in symbols if d in leading]
    rest = [d for d in symbols if d not in leading]
    if len(batch) == 1:
        names[batch[0]] = "batch"
    if len(rest) == 1:
        names[rest[0]] = "seq"
    return {d: names.get(d, "?") for d in symbols}


def table_fits(table: Table, width: int) -> bool:
    """Whether ``table`` renders within ``width`` cells without shortening a ``no_wrap`` column.

    Rich shrinks (and ellipsises) no_wrap columns to fit, so the full cells are measured here: each
    cell plus one space of padding a side, and one border character per column and edge; ``fold``
    columns count at their ``min_width`` (they wrap)."""
    need = 1
    for col in table.columns:
        cells = [col.header, *col._cells]
        widest = max(cell_len(Text.from_markup(c).plain if isinstance(c, str) else str(c)) for c in cells)
        need += 3 + (min(widest, col.min_width or widest) if col.overflow == "fold" else widest)
    return need <= width


def print_analysis(analysis: Analysis, explain: bool = False, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"surgeon analyze — captured with {analysis.capture.get('method', '?')}")
    table.add_column("kind", no_wrap=True)
    table.add_column("module", no_wrap=True)  # names the site: never shortened
    table.add_column("variant", no_wrap=True)
    table.add_column("shapes", overflow="fold", min_width=16)
    rows = []
    names = dim_names([v for s in analysis.sites for v in s.shapes.values()])
    for s in analysis.sites:
        shapes = ", ".join(f"{k}={_shape(v, names)}" for k, v in s.shapes.items())
        rows.append((s.kind, s.module or "<root>", s.variant, shapes))
        table.add_row(*rows[-1])
    if table_fits(table, console.width):
        console.print(table)
    else:  # narrow terminal or deep module paths: one line per site
        console.print(str(table.title), markup=False, highlight=False)
        for kind, module, variant, shapes in rows:
            console.print(f"{kind} {module} ({variant}): {shapes}", soft_wrap=True, markup=False, highlight=False)
    counts = analysis.counts()
    console.print("totals: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    for note in analysis.capture.get("notes", []):
        console.print(f"[yellow]note:[/] {note}")
    if explain:
        t = Table(title="near-misses (not sites)")
        for col in ("kind", "module", "node"):
            t.add_column(col, no_wrap=True)
        t.add_column("reason", overflow="fold", min_width=24)
        for m in analysis.near_misses:
            t.add_row(m.kind, m.module or "<root>", m.node, m.reason)
        if table_fits(t, console.width):
            console.print(t)
        else:
            console.print("near-misses (not sites):")
            for m in analysis.near_misses:
                console.print(f"  {m.kind} {m.module or '<root>'} [{m.node}]: {m.reason}", soft_wrap=True,
                              markup=False, highlight=False)
