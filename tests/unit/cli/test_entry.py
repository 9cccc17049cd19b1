"""The console script's start-up: the CLI imported with the collector off, then frozen; settings'
descriptions read only when asked."""

from __future__ import annotations

import json
import subprocess
import sys

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
                  "cli": "custseg.cli" in sys.modules, "pandas": "pandas" in sys.modules}))
"""
BARE = "import gc, json; gc.freeze(); print(json.dumps(gc.get_freeze_count()))"


def test_console_script_freezes_the_imported_cli_and_leaves_the_collector_on() -> None:
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    state = json.loads(result.stdout.strip().splitlines()[-1])
    assert state["code"] == 0 and state["cli"]
    assert state["enabled"], "the collector must be on again once the CLI is imported"
    # the CLI's import (pydantic, typer, the commands) is frozen: far more objects than a bare interpreter's
    bare = json.loads(
        subprocess.run([sys.executable, "-c", BARE], capture_output=True, text=True, check=True).stdout
    )
    assert state["frozen"] > 5 * bare


def test_commands_that_read_no_data_do_not_import_pandas() -> None:
    # pandas is a sixth of a second of every start; the commands import it where they read tables
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    state = json.loads(result.stdout.strip().splitlines()[-1])
    assert state["code"] == 0 and not state["pandas"]


def test_field_descriptions_equal_pydantics_attribute_docstrings() -> None:
    # the reference: what pydantic's use_attribute_docstrings reads, which Settings no longer turns on
    expected = extract_docstrings_from_cls(Settings, use_inspect=True)
    assert field_descriptions() == expected
    assert set(expected) == set(Settings.model_fields)
    home = "Folder for all local state: MLflow store, artifacts, prediction log."
    assert field_descriptions()["home"] == home
