"""What `custseg serve` does once at startup so that periodic work does not stall requests later: the live
monitor imports what its refresh needs before the server takes requests, and the server freezes its
startup heap out of the garbage collector."""

from __future__ import annotations

import gc
import importlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from custseg.serving import live, server
from custseg.serving.live import REFRESH_MODULES, LiveMonitor
from custseg.serving.server import SWITCH_INTERVAL_SECONDS, settle_after_startup
from custseg.settings import Settings


def test_monitor_imports_what_its_refresh_needs_when_it_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    imported: list[str] = []
    real_import = importlib.import_module
    monkeypatch.setattr(
        live.importlib, "import_module", lambda name: imported.append(name) or real_import(name)
    )
    monitor = LiveMonitor(Settings(home=tmp_path), refresh_seconds=3600)
    monitor.start()
    try:
        assert imported == list(REFRESH_MODULES)  # in start(), not later in the refresh thread
    finally:
        monitor.close()


def test_monitor_that_never_refreshes_imports_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    imported: list[str] = []
    monkeypatch.setattr(live.importlib, "import_module", imported.append)
    LiveMonitor(Settings(home=tmp_path), refresh_seconds=0).start()
    assert imported == []


def test_heap_is_frozen_and_switch_interval_shortened_after_startup() -> None:
    seen: dict[str, int] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        seen["during_startup"] = gc.get_freeze_count()
        yield
        seen["at_shutdown"] = gc.get_freeze_count()

    app = FastAPI(lifespan=lifespan)

    @app.get("/frozen")
    def frozen() -> int:
        return gc.get_freeze_count()

    settle_after_startup(app)
    gc.unfreeze()
    interval = sys.getswitchinterval()
    try:
        with TestClient(app) as client:
            assert seen["during_startup"] == 0  # the model loads first, then the heap is frozen
            assert client.get("/frozen").json() > 1000
        assert seen["at_shutdown"] > 1000  # the app's own shutdown still runs
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_SECONDS)
    finally:
        gc.unfreeze()
        sys.setswitchinterval(interval)


def test_supervisor_gives_slow_starting_workers_time_before_replacing_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """uvicorn's 5 s health ping killed every spawned worker on a loaded machine before it had started."""
    captured: list[Any] = []
    monkeypatch.setattr(server, "_run_workers", captured.append)
    monkeypatch.setattr(os, "environ", os.environ.copy())  # run_server sets variables for its workers
    handler = signal.getsignal(signal.SIGTERM)
    try:
        server.run_server(Settings(home=tmp_path), workers=2, log_level="warning")
    finally:
        signal.signal(signal.SIGTERM, handler)
    (config,) = captured
    assert config.workers == 2
    assert config.timeout_worker_healthcheck == server.WORKER_HEALTHCHECK_SECONDS >= 30
