"""The README stays the newcomer's guide: its commands exist, and every command and setting is documented."""

from __future__ import annotations

import re

from custseg.cli import app
from custseg.settings import Settings

from .conftest import REPO

README = (REPO / "README.md").read_text()


def test_the_two_commands_are_make_targets_and_ci_runs_the_test_command() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert "make run" in README and "make test" in README
    assert re.search(r"^run:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert re.search(r"^\s*make test\b", (REPO / ".ci" / "run").read_text(), re.M)


def test_every_cli_command_is_shown_in_the_readme() -> None:
    commands = [c.name or c.callback.__name__ for c in app.registered_commands]  # type: ignore[union-attr]
    assert len(commands) >= 8
    missing = [name for name in commands if f"custseg {name}" not in README]
    assert not missing, f"README shows no example of: {missing}"


def test_every_setting_is_in_the_configuration_table() -> None:
    names = [
        "MLFLOW_TRACKING_URI" if name == "tracking_uri" else f"CUSTSEG_{name.upper()}"
        for name in Settings.model_fields
    ]
    missing = [name for name in names if f"`{name}" not in README]
    assert not missing, f"README's configuration table lacks: {missing}"
