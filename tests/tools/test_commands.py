"""The tool commands are registered: listed in the top help, each with its own --help."""

from __future__ import annotations

import pytest

from sautomed.cli import main
from sautomed.tools.commands import TOOL_COMMANDS


def test_top_help_lists_the_tool_commands(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    tools = {"evaluate", "info", "export", "preview", "report", "compare", "refine", "plan", "models"}
    tools |= {"ensemble", "crossval"}
    for cmd in tools:
        assert f"\n  {cmd} " in out
    assert set(TOOL_COMMANDS) == tools


@pytest.mark.parametrize("cmd", sorted(TOOL_COMMANDS))
def test_each_tool_has_help(cmd, capsys):
    assert main([cmd, "--help"]) == 0
    assert f"sautomed {cmd}" in capsys.readouterr().out
