"""The console script's start-up: the CLI imported with the collector off, then frozen; the settings
imported when a command needs them, the same way; settings' descriptions read only when asked."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
from pydantic._internal._docs_extraction import extract_docstrings_from_cls

from custseg.settings import Settings, field_descriptions

PROBE = """
import gc, json, sys
import custseg._entry as entry
sys.argv = ["custseg", "--help"]
try:
    entry.main()
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "enabled": gc.isenabled(), "frozen": gc.get_freeze_count(),
                  "cli": "custseg.cli" in sys.modules, "pandas": "pandas" in sys.modules,
                  "settings": "pydantic_settings" in sys.modules}))
"""
LATE = """
import gc, json, sys
import custseg._entry as entry
sys.argv = ["custseg", "--help"]
try:
    entry.main()
except SystemExit:
    pass
before = gc.get_freeze_count()
from custseg.cli.app import load_settings
settings = load_settings(seed=7)
print(json.dumps({"before": before, "after": gc.get_freeze_count(), "enabled": gc.isenabled(),
                  "seed": settings.seed, "folds": settings.cv_folds}))
"""
LIBRARY = """
import gc, json
from custseg.cli.app import load_settings
settings = load_settings()
print(json.dumps({"frozen": gc.get_freeze_count(), "enabled": gc.isenabled(), "seed": settings.seed}))
"""
BARE = "import gc, json; gc.freeze(); print(json.dumps(gc.get_freeze_count()))"


def probe(code: str) -> Any:
    """What a fresh interpreter running ``code`` printed last, as JSON."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_console_script_freezes_the_imported_cli_and_leaves_the_collector_on() -> None:
    state = probe(PROBE)
    assert state["code"] == 0 and state["cli"]
    assert state["enabled"], "the collector must be on again once the CLI is imported"
    # the CLI's import (pydantic, typer, the commands) is frozen: far more objects than a bare interpreter's
    bare = probe(BARE)
    assert state["frozen"] > 5 * bare


def test_commands_that_read_no_data_do_not_import_pandas() -> None:
    # pandas is a sixth of a second of every start; the commands import it where they read tables
    state = probe(PROBE)
    assert state["code"] == 0 and not state["pandas"]


def test_the_cli_starts_without_the_settings() -> None:
    # pydantic-settings (with asyncio and its cloud sources) is a tenth of a second of a start:
    # `custseg --help` and the commands that need no settings never import it
    state = probe(PROBE)
    assert state["code"] == 0 and not state["settings"]


def test_a_command_imports_the_settings_as_the_cli_was_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUSTSEG_CV_FOLDS", "4")
    state = probe(LATE)
    assert (state["seed"], state["folds"]) == (7, 4)  # overrides over the environment
    assert state["enabled"]
    assert state["after"] > state["before"] + 1000, "the settings' import is frozen like the CLI's"


def test_as_a_library_the_settings_leave_the_collector_alone() -> None:
    state = probe(LIBRARY)
    assert state == {"frozen": 0, "enabled": True, "seed": Settings().seed}


def test_field_descriptions_equal_pydantics_attribute_docstrings() -> None:
    # the reference: what pydantic's use_attribute_docstrings reads, which Settings no longer turns on
    expected = extract_docstrings_from_cls(Settings, use_inspect=True)
    assert field_descriptions() == expected
    assert set(expected) == set(Settings.model_fields)
    home = "Folder for all local state: MLflow store, artifacts, prediction log."
    assert field_descriptions()["home"] == home
