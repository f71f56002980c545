"""Rich rendering of analyses and reports for the terminal."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .analysis import Analysis


def _shape(s: object) -> str:
    return "×".join(map(str, s)) if isinstance(s, list) else str(s)


def print_analysis(analysis: Analysis, explain: bool = False, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"surgeon analyze — captured with {analysis.capture.get('method', '?')}")
    for col in ("kind", "module", "variant", "shapes"):
        table.add_column(col)
    for s in analysis.sites:
        shapes = ", ".join(f"{k}={_shape(v)}" for k, v in s.shapes.items())
        table.add_row(s.kind, s.module or "<root>", s.variant, shapes)
    console.print(table)
    counts = analysis.counts()
    console.print("totals: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    for note in analysis.capture.get("notes", []):
        console.print(f"[yellow]note:[/] {note}")
    if explain:
        t = Table(title="near-misses (not sites)")
        for col in ("kind", "module", "node", "reason"):
            t.add_column(col)
        for m in analysis.near_misses:
            t.add_row(m.kind, m.module or "<root>", m.node, m.reason)
        console.print(t)
