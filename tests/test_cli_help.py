"""Every `kvlib` command answers --help: help text is rendered as rich markup, where an option's
text such as `s3://bucket[/prefix]` reads as a closing tag and crashes the command's help."""

from __future__ import annotations

from typer.main import get_command
from typer.testing import CliRunner

from kvlib.cli.app import app


def command_paths(group, prefix=()):
    for name, command in sorted(group.commands.items()):
        yield (*prefix, name)
        if hasattr(command, "commands"):
            yield from command_paths(command, (*prefix, name))


def test_every_command_answers_help():
    paths = list(command_paths(get_command(app)))
    assert ("serve",) in paths and ("sync",) in paths and ("keys", "add") in paths
    for path in paths:
        result = CliRunner().invoke(app, [*path, "--help"])
        assert result.exit_code == 0, f"kvlib {' '.join(path)} --help: {result.output[-500:]} {result.exception!r}"
        assert "Usage" in result.output
