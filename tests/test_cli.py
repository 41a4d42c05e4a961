"""Every command has help text, appears in the README, and a user mistake exits 2 without a traceback."""

from pathlib import Path

import pytest
import typer.main

from wbc.cli import main
from wbc.cli.app import app

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def commands():
    group = typer.main.get_command(app)
    for name, cmd in group.commands.items():
        sub = getattr(cmd, "commands", None)
        if sub:
            yield from ((f"{name} {n}", c) for n, c in sub.items())
        else:
            yield name, cmd


@pytest.mark.parametrize("name,cmd", list(commands()), ids=lambda x: x if isinstance(x, str) else "")
def test_command_has_help_and_is_in_readme(name, cmd):
    assert (cmd.help or "").strip(), f"wbc {name} has no help text"
    assert f"wbc {name}" in README, f"README does not show `wbc {name}`"


def test_user_mistake_is_one_line_exit_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["info", str(tmp_path / "missing.h5")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err
