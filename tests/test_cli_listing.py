"""`surgeon passes` / `surgeon targets`: generated from the registries, and docs/cli.md matches.

When a pass option or a target changes, regenerate docs/cli.md's generated sections with
``python -m surgeon.cli --write-docs`` (or ``surgeon.cli_listing.write_docs()``) and commit the result.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from surgeon import cli, cli_listing
from surgeon.passes import REGISTRY, pass_class
from surgeon.targets import get_target, registered

DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
REGENERATE = "regenerate with: python -m surgeon.cli --write-docs"


def test_docs_generated_sections_are_current() -> None:
    text = DOCS.read_text(encoding="utf-8")
    assert "<!-- generated: surgeon passes -->" in text and "<!-- generated: surgeon targets -->" in text
    assert cli_listing.generated_docs(text) == text, f"docs/cli.md is out of date ({REGENERATE})"


def test_docs_sections_are_what_the_commands_print(capsys: pytest.CaptureFixture) -> None:
    text = DOCS.read_text(encoding="utf-8")
    for command in ("passes", "targets"):
        assert cli.main([command]) == 0
        printed = capsys.readouterr().out
        start = text.index(f"<!-- generated: surgeon {command} -->")
        section = text[start:text.index("<!-- end generated -->", start)]
        assert printed.strip() in section, f"`surgeon {command}` differs from docs/cli.md ({REGENERATE})"


def test_passes_json_lists_every_pass_with_its_options(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["passes", "--json"]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)["passes"]}
    assert set(listed) == set(REGISTRY)
    for name, info in listed.items():
        fields = dataclasses.fields(pass_class(name))
        assert [o["name"] for o in info["options"]] == [f.name for f in fields]
        for o, f in zip(info["options"], fields):
            assert o["default"] == f.default and isinstance(o["type"], str) and o["type"]
            assert isinstance(o["help"], str)
    lq = {o["name"]: o for o in listed["linear-quant"]["options"]}
    assert lq["method"] == {"name": "method", "type": "max | percentile | mse", "default": "mse",
                            "help": "activation clip; mse beat max and percentile on MiniLM"}
    assert lq["dtype"]["help"] == ""  # no trailing comment: empty help
    assert listed["linear-quant"]["requires"] == list(pass_class("linear-quant").requires)


def test_targets_json_lists_every_target_with_its_profile(capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["targets", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["targets"]
    assert [t["name"] for t in listed] == list(registered())
    for t in listed:
        target = get_target(t["name"])
        assert t == json.loads(json.dumps(target.to_json()))
        assert {"format", "runtime", "description", "default_passes", "profile"} <= set(t)
        assert t["profile"]["ladders"] and all(v[-1] == "keep" for v in t["profile"]["ladders"].values())


def test_help_names_every_registered_pass_and_target() -> None:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices  # type: ignore[attr-defined]
    opt = {a.dest: a for a in sub["optimize"]._actions}
    for name in registered():
        assert name in opt["target"].help
        assert name in {a.dest: a for a in sub["export"]._actions}["target"].help
    for name in REGISTRY:
        assert name in opt["passes"].help


@pytest.mark.parametrize("command", ["passes", "targets"])
def test_listing_on_a_terminal_is_rendered(command: str, capsys: pytest.CaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """On a terminal the Markdown is rendered by rich (no raw ``###`` or table pipes); piped, it is the text."""
    import io

    from rich.console import Console

    markdown = cli_listing.passes_markdown() if command == "passes" else cli_listing.targets_markdown()
    assert any(line.startswith("|---") for line in markdown.splitlines())  # the plain text has both
    buf = io.StringIO()
    cli_listing.print_markdown(markdown, Console(file=buf, force_terminal=True, width=120))
    rendered = buf.getvalue()
    assert rendered.strip() and "\x1b[" in rendered
    assert not [line for line in rendered.splitlines() if line.lstrip().startswith("###")]
    assert "|---|" not in rendered and "| option |" not in rendered and "| target |" not in rendered
    assert ("linear-quant" if command == "passes" else "onnx-int8") in rendered
    buf = io.StringIO()
    cli_listing.print_markdown(markdown, Console(file=buf, force_terminal=False))
    assert buf.getvalue() == markdown  # not a terminal: exactly the Markdown docs/cli.md holds
    # the command itself takes the terminal path when rich sees one (FORCE_COLOR stands in for a TTY)
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert cli.main([command]) == 0
    out = capsys.readouterr().out
    assert "|---|" not in out and not [line for line in out.splitlines() if line.lstrip().startswith("###")]
    monkeypatch.delenv("FORCE_COLOR")
    assert cli.main([command]) == 0
    assert capsys.readouterr().out == markdown
