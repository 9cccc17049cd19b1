"""`custseg score` (local engine) gives Arrow the C library's allocator unless the user chose one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import pyarrow as pa
from custseg.cli.scoring import _use_system_allocator
_use_system_allocator()
print(pa.default_memory_pool().backend_name)
"""


@pytest.mark.parametrize(("chosen", "expected"), [(None, "system"), ("mimalloc", "mimalloc")])
def test_the_score_command_uses_the_system_allocator_unless_one_is_chosen(
    chosen: str | None, expected: str
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    if chosen is not None:
        env["ARROW_DEFAULT_MEMORY_POOL"] = chosen
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
