"""Running the CLI in-process from a test: exit code, stdout and stderr."""

from __future__ import annotations

import pytest

from surgeon import cli


def run_cli(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err
