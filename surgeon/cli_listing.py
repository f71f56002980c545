"""``surgeon passes`` / ``surgeon targets``: the registries listed as Markdown or JSON.

The same Markdown is the generated part of docs/cli.md — regenerate it with
``python -m surgeon.cli --write-docs`` (``write_docs()``); tests/test_cli_listing.py checks it is current.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tokenize
import typing
from pathlib import Path
from typing import Any


def pass_names() -> tuple[str, ...]:
    """Registered pass names (the one place that knows where the pass registry lives)."""
    from . import passes  # type: ignore[attr-defined]

    return tuple(sorted(passes.registered()))


def _pass_class(name: str) -> type:
    from . import passes  # type: ignore[attr-defined]

    return passes.pass_class(name)


def target_names() -> tuple[str, ...]:
    from . import targets  # type: ignore[attr-defined]

    return tuple(targets.registered())


def _get_target(name: str) -> Any:
    from . import targets  # type: ignore[attr-defined]

    return targets.get_target(name)


def _type_name(typ: Any) -> str:
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin is typing.Union or type(typ).__name__ == "UnionType":
        return " | ".join("None" if a is type(None) else _type_name(a) for a in args)
    return getattr(typ, "__name__", str(typ))


def _field_comments(cls: type) -> dict[str, str]:
    """Trailing ``# comment`` of each field line in the class body (``name: T = v  # help``)."""
    import inspect

    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found: dict[str, str] = {}
    line_tokens: list[tokenize.TokenInfo] = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type in (tokenize.NEWLINE, tokenize.NL):
                _field_comment(line_tokens, found)
                line_tokens = []
            elif tok.type not in (tokenize.INDENT, tokenize.DEDENT):
                line_tokens.append(tok)
    except (tokenize.TokenError, IndentationError):
        pass
    return found


def _field_comment(tokens: list[tokenize.TokenInfo], found: dict[str, str]) -> None:
    if len(tokens) >= 3 and tokens[0].type == tokenize.NAME and tokens[1].string == ":" \
            and tokens[-1].type == tokenize.COMMENT:
        found.setdefault(tokens[0].string, tokens[-1].string.lstrip("#").strip())


def _docstring_help(cls: type, field_name: str) -> str:
    """A line of the class docstring that starts with the field name and a colon, else ""."""
    for line in (cls.__doc__ or "").splitlines():
        text = line.strip()
        for prefix in (f"{field_name}:", f"``{field_name}``:", f"``{field_name}`` -", f"{field_name} -"):
            if text.startswith(prefix):
                return text[len(prefix):].strip()
    return ""


def pass_info(name: str) -> dict[str, Any]:
    """A registered pass: name, summary (first docstring line), requires, options (type, default, help)."""
    cls = _pass_class(name)
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an unresolvable annotation still lists as written
        hints = {}
    comments = _field_comments(cls)
    options = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        options.append({"name": f.name, "type": _type_name(hints.get(f.name, f.type)),
                        "default": default, "help": comments.get(f.name) or _docstring_help(cls, f.name)})
    summary = (cls.__doc__ or "").strip().splitlines()[0] if (cls.__doc__ or "").strip() else ""
    return {"name": name, "summary": summary, "requires": list(getattr(cls, "requires", ())), "options": options}


def passes_json() -> dict[str, Any]:
    return {"passes": [pass_info(n) for n in pass_names()]}


def targets_json() -> dict[str, Any]:
    return {"targets": [_get_target(n).to_json() for n in target_names()]}


def _md_cell(v: Any) -> str:
    return str(v).replace("|", "\\|")


def _default_text(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


def passes_markdown() -> str:
    """``surgeon passes``: one section per registered pass with its options."""
    lines: list[str] = []
    for p in passes_json()["passes"]:
        lines.append(f"### `{p['name']}`")
        lines.append("")
        if p["summary"]:
            lines.append(p["summary"])
            lines.append("")
        if p["requires"]:
            lines.append(f"Runs after: {', '.join(p['requires'])} (when in the same pipeline).")
            lines.append("")
        if p["options"]:
            lines.append("| option | type | default | help |")
            lines.append("|---|---|---|---|")
            for o in p["options"]:
                lines.append(f"| `{o['name']}` | {_md_cell(o['type'])} | `{_md_cell(_default_text(o['default']))}` "
                             f"| {_md_cell(o['help'])} |")
        else:
            lines.append("No options.")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def targets_markdown() -> str:
    """``surgeon targets``: a table of the registered targets, then each target's profile."""
    ts = targets_json()["targets"]
    lines = ["| target | file | runtime | default passes | description |", "|---|---|---|---|---|"]
    for t in ts:
        lines.append(f"| `{t['name']}` | `{t['file']}` ({t['format']}) | {t['runtime']} | "
                     f"`{_md_cell(t['default_passes'])}` | {_md_cell(t['description'])} |")
    lines.append("")
    for t in ts:
        pr = t["profile"]
        lines.append(f"**`{t['name']}` profile** ({pr['runtime']}, {pr['machine']}):")
        lines.append("")
        ladders = "; ".join(f"{k}: {' > '.join(v)}" for k, v in pr["ladders"].items())
        lines.append(f"- formats: {ladders}")
        lines.append(f"- weights: {pr['weight_layout']} layout, INT8 weights {pr['int8_weight_bits']}-bit; "
                     f"activations as uint8: {'yes' if pr['uint8_activations'] else 'no'}; "
                     f"fused attention: {'yes' if pr['fuses_attention'] else 'no'}")
        for r in pr["graph_requirements"]:
            lines.append(f"- requires: {r}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


_DOC_SECTIONS = {"surgeon passes": passes_markdown, "surgeon targets": targets_markdown}
_END = "<!-- end generated -->"


def _marker(name: str) -> str:
    return f"<!-- generated: {name} -->"


def generated_docs(text: str) -> str:
    """``text`` (docs/cli.md) with every generated section replaced by what the generators print."""
    for name, gen in _DOC_SECTIONS.items():
        start = text.find(_marker(name))
        if start < 0:
            raise ValueError(f"docs/cli.md has no '{_marker(name)}' marker")
        body = start + len(_marker(name))
        end = text.find(_END, body)
        if end < 0:
            raise ValueError(f"docs/cli.md: '{_marker(name)}' has no '{_END}' after it")
        text = text[:body] + "\n\n" + gen() + "\n" + text[end:]
    return text


def write_docs(path: str | os.PathLike | None = None) -> Path:
    """Regenerate the generated sections of docs/cli.md in place (``python -m surgeon.cli --write-docs``)."""
    p = Path(path) if path is not None else Path(__file__).resolve().parents[1] / "docs" / "cli.md"
    p.write_text(generated_docs(p.read_text(encoding="utf-8")), encoding="utf-8")
    return p


def print_markdown(text: str, console: Any = None) -> None:
    """Print a listing: rendered through rich on a terminal (headings, tables), the Markdown text itself
    otherwise (a pipe or a file gets exactly what docs/cli.md holds)."""
    from rich.console import Console
    from rich.markdown import Markdown

    console = console or Console()
    if console.is_terminal:
        console.print(Markdown(text))
    else:
        console.file.write(text)
