"""Model faults under steady load: a tampered bundle promoted to champion while `custseg serve` answers.

The registry's champion alias is moved to a version whose artifact files were changed after their
checksums were recorded (what an attacker with write access to the artifact store can do). The server
must refuse to load it, keep answering with the verified version, and log every answered prediction.
Writes its row of the fault table to ``$CUSTSEG_FAULT_REPORT`` when that is set.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from custseg.registry.client import connect
from custseg.scoring.verification import DIGESTS_TAG, bundle_digests, encode_digests
from tests.integration.serving.test_server import (
    MODEL,
    Load,
    ServingHome,
    start_server,
    stop_server,
    wait_until,
)

pytestmark = [pytest.mark.service, pytest.mark.slow]


def _register_tampered(home: ServingHome, file: str) -> str:
    """A new version whose recorded checksums are those of the clean files, then ``file`` is changed."""
    folder = home.home / f"tampered-{time.monotonic_ns()}"
    shutil.copytree(home.bundle_source, folder)
    bundle = folder / "artifacts" / "bundle"
    recorded = encode_digests(bundle_digests(bundle))
    target = bundle / file
    target.write_bytes(target.read_bytes() + b"\x00tampered")
    client = connect(home.settings)
    version = client.create_model_version(MODEL, source=str(folder))
    client.set_model_version_tag(MODEL, str(version.version), DIGESTS_TAG, recorded)
    return str(version.version)


def _report(row: dict[str, object]) -> None:
    if path := os.environ.get("CUSTSEG_FAULT_REPORT"):
        with open(path, "a") as out:
            out.write(json.dumps(row) + "\n")


@pytest.mark.timeout(300)
def test_a_tampered_champion_never_answers_and_nothing_is_lost(
    serving_home: ServingHome, tmp_path: Path
) -> None:
    home = serving_home
    log_url = f"sqlite:///{tmp_path / 'predictions.db'}"
    server = start_server(home.home, tmp_path, "--workers", "1", env={"CUSTSEG_PREDICTION_LOG_URL": log_url})
    before = server.metrics()
    served_before = {key for key, value in before.items() if key[0] == "custseg_model_info" and value}
    try:
        with Load(server.url, threads=2) as load:
            time.sleep(2)
            tampered = _register_tampered(home, "model.onnx")
            home.make_champion(tampered)
            tried = f"models:/{MODEL}/{tampered} failed to load"
            wait_until(lambda: tried in server.log_text(), 30, "the server to refuse the tampered version")
            time.sleep(2)
        answers = load.all()
    finally:
        home.make_champion("1")
        assert stop_server(server) == 0
    ok = [a for a in answers if a.status == 200]
    failed = [a for a in answers if a.status != 200]
    assert ok and not failed, failed[:5]
    assert {a.version for a in ok} == {"1"}, "only the verified version may answer"
    log = server.log_text()
    assert "model.onnx" in log and "s3cret" not in log, log[-3000:]
    assert served_before, before

    engine = sa.create_engine(log_url)
    with engine.connect() as conn:
        stored = conn.execute(
            sa.text("select count(*), count(distinct model_version) from predictions")
        ).one()
        versions = {row[0] for row in conn.execute(sa.text("select distinct model_version from predictions"))}
    engine.dispose()
    assert stored[0] == len(ok), (stored, len(ok))
    assert versions == {"1"}
    _report(
        {
            "fault": "tampered model.onnx promoted to champion under load",
            "answered": len(ok),
            "stored": int(stored[0]),
            "failed_requests": len(failed),
            "answered_by_tampered_version": 0,
            "lost": len(ok) - int(stored[0]),
        }
    )
