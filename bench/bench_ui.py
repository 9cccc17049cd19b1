"""Benchmark the web app: the Upload page end to end against ``custseg score`` in the same run.

``bench_upload`` measures what a person waits for on the Upload page, against a real ``custseg serve``:
the file sent as the page sends it (one POST, body streamed to disk), the scoring job followed through its
progress URL as ``app.js`` does (polled every 50 ms here, 250 ms in the browser), then the scored file
downloaded. The baseline is ``custseg score INPUT --out OUTPUT`` on the same file in a fresh process (a
warm model cache, start-up included), which is what a person without the page would run. Target: 100k
rows in at most 3 s end to end.

Usage::

    .venv/bin/python bench/bench_ui.py [--rows 100000] [--repeats 3] [--reasons 0] [--home DIR]
    .venv/bin/python bench/bench_ui.py --part pages [--log-rows 1000000] [--backends sqlite,postgresql]
        [--window-baseline] [--compare-feedback-join] [--home DIR]

The champion comes from ``--home`` (a CUSTSEG_HOME), or one is trained on 1,000 generated rows in a
temporary home. The machine's load (``uptime``) is printed beside the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import httpx

VENV_BIN = Path(sys.executable).parent
CUSTSEG = str(VENV_BIN / "custseg")


def _env(home: Path) -> dict[str, str]:
    env = {**os.environ, "CUSTSEG_HOME": str(home), "CUSTSEG_PREDICTION_LOG_ENABLED": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def prepare_home(home: Path | None, work: Path) -> Path:
    """``home``, or a temporary one with a champion trained on 1,000 generated rows."""
    if home is not None:
        return home
    home = work / "home"
    data = work / "train.csv"
    env = _env(home)
    subprocess.run(
        [CUSTSEG, "generate", "--rows", "1000", "--seed", "7", "--out", str(data)], env=env, check=True
    )
    print("training a champion on 1,000 generated rows ...", flush=True)
    subprocess.run([CUSTSEG, "train", "--data", str(data)], env=env, check=True, capture_output=True)
    return home


def start_server(home: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """``custseg serve`` on loopback, once /health/ready answers."""
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [CUSTSEG, "serve", "--port", str(port), "--workers", "1", "--poll-seconds", "0"],
            env=_env(home),
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"custseg serve exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.kill()
    raise SystemExit(f"custseg serve did not get ready:\n{log.read_text()[-3000:]}")


def upload_once(base_url: str, source: Path, reasons: int = 0) -> dict[str, Any]:
    """One upload as the page does it; seconds for sending, scoring (until done) and the download."""
    with httpx.Client(base_url=base_url, timeout=600) as client:
        page = client.get("/ui/upload").text
        found = re.search(r'data-csrf="([^"]+)"', page)
        if found is None:
            raise SystemExit("no CSRF token on /ui/upload")
        started = time.perf_counter()
        with source.open("rb") as body:
            answer = client.post(
                "/ui/upload",
                params={"name": source.name, "reasons": str(reasons)},
                content=body,
                headers={"x-csrf-token": found.group(1), "accept": "application/json"},
            )
        if answer.status_code != 202:
            raise SystemExit(f"upload refused ({answer.status_code}): {answer.text}")
        sent = time.perf_counter()
        url = answer.json()["url"]
        while True:
            progress = client.get(f"{url}/progress").json()
            if progress["state"] in ("done", "failed"):
                break
            time.sleep(0.05)
        if progress["state"] != "done":
            raise SystemExit(f"scoring failed: {progress.get('error')}")
        scored = time.perf_counter()
        size = len(client.get(f"{url}/scored.csv").content)
        finished = time.perf_counter()
    return {
        "total": finished - started,
        "send": sent - started,
        "score": scored - sent,
        "download": finished - scored,
        "bytes": size,
    }


def cli_once(home: Path, source: Path, out: Path, reasons: int = 0) -> float:
    """``custseg score`` on the same file in a fresh process (the baseline)."""
    command = [CUSTSEG, "score", str(source), "--out", str(out)]
    if reasons:
        command += ["--reasons", str(reasons)]
    started = time.perf_counter()
    done = subprocess.run(command, env=_env(home), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode not in (0, 3):
        raise SystemExit(f"custseg score failed ({done.returncode}):\n{done.stderr}")
    return seconds


def bench_upload(
    home: Path, work: Path, rows: int = 100_000, repeats: int = 3, reasons: int = 0, port: int = 8765
) -> dict[str, Any]:
    """Upload page end to end vs ``custseg score``, alternating, ``repeats`` times; medians in seconds."""
    source = work / f"customers-{rows}.csv"
    if not source.exists():
        subprocess.run(
            [CUSTSEG, "generate", "--rows", str(rows), "--seed", "3", "--out", str(source)],
            env=_env(home),
            check=True,
            capture_output=True,
        )
    cli_once(home, source, work / "warm.csv", reasons)  # fills the model cache: the warm path is measured
    server = start_server(home, port, work / "serve.log")
    try:
        upload_once(f"http://127.0.0.1:{port}", source, reasons)  # first job: imports, thread start
        pages, clis = [], []
        for _ in range(repeats):
            pages.append(upload_once(f"http://127.0.0.1:{port}", source, reasons))
            clis.append(cli_once(home, source, work / "cli.csv", reasons))
    finally:
        server.terminate()
        server.wait(timeout=30)
    result = {
        "rows": rows,
        "reasons": reasons,
        "file_mb": source.stat().st_size / 2**20,
        "upload_total": statistics.median(p["total"] for p in pages),
        "upload_send": statistics.median(p["send"] for p in pages),
        "upload_score": statistics.median(p["score"] for p in pages),
        "upload_download": statistics.median(p["download"] for p in pages),
        "cli": statistics.median(clis),
    }
    result["ratio"] = result["upload_total"] / result["cli"]
    return result


def print_upload(result: dict[str, Any]) -> None:
    print(
        f"\nUpload page, {result['rows']:,} rows ({result['file_mb']:.1f} MiB CSV, "
        f"reasons {result['reasons']}), medians in seconds:"
    )
    print(f"  page end to end   {result['upload_total']:6.2f}  (target <= 3 s)")
    print(f"    send            {result['upload_send']:6.2f}")
    print(f"    score (polled)  {result['upload_score']:6.2f}")
    print(f"    download        {result['upload_download']:6.2f}")
    print(f"  custseg score     {result['cli']:6.2f}  (fresh process, warm model cache)")
    print(f"  ratio page / cli  {result['ratio']:6.2f}")


# ---- bench_pages: the Monitoring and Models pages with 1M predictions in the log (issue 14) -----------
#
# ``bench_pages`` fills a prediction log with ``--log-rows`` predictions spread over the last 7 days (4 rows
# per request, true segments for 2% of them), on SQLite and on the PostgreSQL server at 127.0.0.1:5432
# (database ``test``, tables with their own prefix, dropped afterwards), then requests each page in-process
# (TestClient on the app as ``custseg serve`` runs it, its heap frozen for the garbage collector once
# started) and reads the server's time from its ``Server-Timing: app;dur=`` header: ``first`` after
# start (the rollup of the log and its feedback matches built, registry read), ``steady`` (the 5-second
# page cache expired, the in-memory rollup only catching up: what each visit costs on a running server)
# and ``cached``. The baseline is the same per-bucket numbers by ``GROUP BY`` over the window without the
# rollup (``custseg.predlog.queries.traffic`` + ``segment_mix``) and, with ``--window-baseline``, reading
# the day window into pandas as ``custseg monitor`` does (``PredictionStore.window``; off by default: with
# 1M predictions it takes minutes on SQLite and about 6 minutes on PostgreSQL). With
# ``--compare-feedback-join`` every steady render is followed by one made as before the feedback matches
# were kept in the rollup (``custseg.predlog.queries.confusion`` joined on every visit), alternating in the
# same process on the same log. The PostgreSQL tables are analyzed after loading (this server runs without
# autovacuum, which would do it). Page weight: the HTML plus every script and stylesheet it loads, raw and
# gzip-compressed. Beside each server time: the process CPU per steady render (the app and, for SQLite,
# the database; PostgreSQL's own CPU is not in it) and the load average at the time.

PAGES = (
    "/ui/monitoring?window=hour",
    "/ui/monitoring?window=day",
    "/ui/monitoring?window=week",
    "/ui/models",
)
PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
LOG_DAYS = 7


def fill_log(store: Any, rows: int, now: float, seed: int = 0) -> None:
    """``rows`` predictions over the last ``LOG_DAYS`` days in ts order (4 rows per request; version 2 for
    the last 2 days), and true segments for 2% of them."""
    import numpy as np
    import sqlalchemy as sa

    from custseg import schema
    from custseg.core.generator import generate
    from custseg.predlog.tables import FEEDBACK_COLUMN, PREDICTED_COLUMN, PROBA_PREFIX

    store.ensure_schema()
    base = generate(100_000, seed=seed)
    rng = np.random.default_rng(seed)
    columns = store.columns
    segment = PREDICTED_COLUMN
    ts_all = np.sort(rng.uniform(now - LOG_DAYS * 86400, now, rows))
    truth_rows: list[dict[str, Any]] = []
    for start in range(0, rows, 100_000):
        n = min(100_000, rows - start)
        frame = base.iloc[:n].copy()
        index = np.arange(start, start + n)
        frame["request_id"] = [f"bench-{i // 4}" for i in index]
        frame["row_index"] = index % 4
        frame["ts"] = ts_all[start : start + n]
        frame["model_name"] = "customer-segments"
        frame["model_version"] = np.where(frame["ts"] < now - 2 * 86400, "1", "2")
        frame["customer_id"] = [f"C{i}" for i in index]
        truth = frame[schema.LABEL_COLUMN].to_numpy()
        frame[segment] = np.where(rng.random(n) < 0.1, rng.choice(list(schema.LABELS), n), truth)
        proba = rng.dirichlet(np.ones(len(schema.LABELS)), size=n)
        for k, label in enumerate(schema.LABELS):
            frame[f"{PROBA_PREFIX}{label}"] = proba[:, k]
        frame["latency_ms"] = rng.gamma(2.0, 2.0, n)
        frame["client_request_id"] = None
        frame["reasons"] = None
        _insert(store, list(frame[columns].itertuples(index=False, name=None)))
        for i in np.flatnonzero(rng.random(n) < 0.02):
            request, row_index = frame["request_id"].iat[i], int(frame["row_index"].iat[i])
            truth_rows.append(
                {
                    "feedback_key": f"request:{request}:{row_index}",
                    "request_id": request,
                    "row_index": row_index,
                    "customer_id": None,
                    FEEDBACK_COLUMN: str(truth[i]),
                    "ts": now,
                    "source": "bench",
                }
            )
    with store.engine.begin() as conn:
        for part in range(0, len(truth_rows), 50_000):
            conn.execute(sa.insert(store.feedback), truth_rows[part : part + 50_000])
    if store.engine.dialect.name == "postgresql":
        with store.engine.begin() as conn:
            for table in (store.predictions, store.feedback):
                conn.exec_driver_sql(
                    f"ANALYZE {store.engine.dialect.identifier_preparer.format_table(table)}"
                )


def _insert(store: Any, rows: list[tuple[Any, ...]]) -> None:
    """Positional rows into the predictions table: COPY on PostgreSQL, the store's executemany elsewhere."""
    engine = store.engine
    if engine.dialect.name != "postgresql":
        store.write_rows(rows)
        return
    quote = engine.dialect.identifier_preparer
    names = ", ".join(quote.quote(c) for c in store.columns)
    raw = engine.raw_connection()
    try:
        with (
            raw.cursor() as cursor,
            cursor.copy(  # type: ignore[attr-defined]
                f"COPY {quote.format_table(store.predictions)} ({names}) FROM STDIN"
            ) as copy,
        ):
            for row in rows:
                copy.write_row(row)
        raw.commit()
    finally:
        raw.close()


def _server_ms(response: Any) -> float:
    match = re.fullmatch(r"app;dur=([0-9.]+)", response.headers.get("server-timing", ""))
    if response.status_code != 200 or match is None:
        raise RuntimeError(f"{response.url}: status {response.status_code}, no Server-Timing")
    return float(match.group(1))


@contextlib.contextmanager
def feedback_joined_per_visit(store: Any) -> Iterator[None]:
    """The dashboard as before the feedback matches were kept in its rollup: no matches brought up to
    date, the confusion counts joined from the feedback on every visit (per window, per model version),
    on the render's own connection as before."""
    from custseg.predlog import queries
    from custseg.workflows import dashboard

    connections: dict[int, Any] = {}

    def keep_connection(rollup: Any, conn: Any, *_args: Any) -> None:
        connections[id(rollup)] = conn

    def per_bucket(rollup: Any, span: Any) -> Any:
        return queries.confusion(connections[id(rollup)], store.tables, span)

    def per_version(rollup: Any) -> Any:
        return queries.confusion(connections[id(rollup)], store.tables, None, by="model_version")

    with (
        mock.patch.object(dashboard.Rollup, "_refresh_matches", keep_connection),
        mock.patch.object(dashboard.Rollup, "confusion", per_bucket),
        mock.patch.object(dashboard.Rollup, "confusion_per_version", per_version),
    ):
        yield


def check_matches(store: Any) -> None:
    """The rollup's confusion counts equal the feedback joined afresh, for every window and per model
    version, on this log (the two ways the comparison timed must answer the same)."""
    import pandas as pd

    from custseg.predlog import queries
    from custseg.workflows import dashboard

    now = time.time()
    rollup = dashboard.rollup_of(store)
    with store.engine.connect() as conn:
        for window in dashboard.WINDOWS.values():
            span = dashboard.span_of(window, now)
            rollup.refresh(conn, store, span.until)
            pd.testing.assert_frame_equal(rollup.confusion(span), queries.confusion(conn, store.tables, span))
        joined = queries.confusion(conn, store.tables, None, by="model_version")
        pd.testing.assert_frame_equal(rollup.confusion_per_version(), joined)
    rows = int(joined["rows"].sum())
    print(f"the rollup's feedback matches equal the join: 3 windows and per version ({rows:,} matches)")


def steady_ms(client: Any, path: str) -> tuple[float, float]:
    """One steady render (the 5-second page cache expired, the rollup kept): server ms, process CPU ms."""
    from custseg.workflows import dashboard

    dashboard._pages.clear()
    cpu = time.process_time()
    server = _server_ms(client.get(path))
    return server, (time.process_time() - cpu) * 1000


def page_weight(client: Any, path: str) -> tuple[int, int]:
    """Bytes of the page's HTML and every script and stylesheet it loads: (raw, gzip level 6)."""
    import gzip

    html = client.get(path).content
    assets = re.findall(rb'<(?:script|link)[^>]+(?:src|href)="(/ui/static/[^"]+)"', html)
    bodies = [html] + [client.get(a.decode()).content for a in assets]
    return sum(len(b) for b in bodies), sum(len(gzip.compress(b, 6)) for b in bodies)


def bench_pages(
    home: Path,
    work: Path,
    rows: int,
    repeats: int,
    backends: list[str],
    window_baseline: bool = False,
    compare: bool = False,
) -> list[dict[str, Any]]:
    """Server time (first, steady, cached) and weight of each page with ``rows`` logged predictions;
    with ``window_baseline``, also the day window read into pandas (minutes with 1M rows); with
    ``compare``, steady renders with the feedback joined on every visit, alternating with ours."""
    import uuid

    from starlette.testclient import TestClient

    from custseg.predlog import PredictionLog, queries
    from custseg.serving.app import create_app
    from custseg.serving.server import settle_after_startup
    from custseg.settings import Settings
    from custseg.workflows import dashboard

    results = []
    for backend in backends:
        prefix = f"bench_ui_{uuid.uuid4().hex[:8]}_"
        url = PG_URL if backend == "postgresql" else f"sqlite:///{work / 'pages.db'}"
        log = PredictionLog(url, table_prefix=prefix, spool_dir=work / "spool")
        try:
            started = time.perf_counter()
            fill_log(log.store, rows, time.time())
            print(
                f"{backend}: {rows:,} predictions logged in {time.perf_counter() - started:.0f} s", flush=True
            )
            settings = Settings(
                home=home,
                prediction_log_url=url,
                prediction_log_table_prefix=prefix,
                model_poll_seconds=0,
                trusted_hosts=["testserver"],
                monitor_refresh_seconds=0,
            )
            dashboard.clear_caches()
            app = create_app(settings, prediction_log=log)
            settle_after_startup(app)  # as custseg serve runs it: the heap after startup frozen for the GC
            with TestClient(app) as client:
                for path in PAGES:
                    dashboard.clear_caches()
                    first = _server_ms(client.get(path))
                    steady, cached, joined = [], [], []
                    loads = [os.getloadavg()[0]]
                    for _ in range(repeats):
                        steady.append(steady_ms(client, path))
                        cached.append(_server_ms(client.get(path)))
                        if compare:
                            with feedback_joined_per_visit(log.store):
                                joined.append(steady_ms(client, path))
                        loads.append(os.getloadavg()[0])
                    raw, gz = page_weight(client, path)
                    result = {
                        "backend": backend,
                        "page": path,
                        "first": first,
                        "steady": statistics.median(s[0] for s in steady),
                        "steady_each": [round(s[0]) for s in steady],
                        "steady_cpu": statistics.median(s[1] for s in steady),
                        "cached": statistics.median(cached),
                        "raw": raw,
                        "gzip": gz,
                        "load": (min(loads), max(loads)),
                    }
                    if compare:
                        result["joined"] = statistics.median(s[0] for s in joined)
                        result["joined_cpu"] = statistics.median(s[1] for s in joined)
                        result["joined_each"] = [round(s[0]) for s in joined]
                    results.append(result)
                    print(results[-1], flush=True)
                if compare:
                    check_matches(log.store)
                # the baselines: GROUP BY over the window without the rollup; the window read into pandas
                now = time.time()
                for name in ("day", "week"):
                    span = dashboard.span_of(dashboard.WINDOWS[name], now)
                    times = []
                    for _ in range(repeats):
                        t = time.perf_counter()
                        with log.store.engine.connect() as conn:
                            queries.traffic(conn, log.store.tables, span)
                            queries.segment_mix(conn, log.store.tables, span)
                        times.append((time.perf_counter() - t) * 1000)
                    results.append(
                        {
                            "backend": backend,
                            "page": f"baseline GROUP BY {name}",
                            "steady": statistics.median(times),
                        }
                    )
                    print(results[-1], flush=True)
                if window_baseline:
                    span = dashboard.span_of(dashboard.WINDOWS["day"], now)
                    t = time.perf_counter()
                    frame = log.store.window(span.since, span.until, None, False, None, False)
                    results.append(
                        {
                            "backend": backend,
                            "page": f"baseline window() day ({len(frame):,} rows)",
                            "steady": (time.perf_counter() - t) * 1000,
                        }
                    )
                    print(results[-1], flush=True)
        finally:
            if backend == "postgresql":
                log.store.drop_tables()
            log.close()
    return results


def print_pages(results: list[dict[str, Any]]) -> None:
    print("\nMonitoring and Models pages: server time in ms (median), process CPU per steady render in ms,")
    print("page weight in KiB; 'joined': steady with the feedback joined on every visit (as before)")
    print(
        f"  {'backend':10} {'page':34} {'first':>7} {'steady':>7} {'cpu':>6} {'joined':>7} {'cpu':>6}"
        f" {'cached':>7} {'raw':>5} {'gzip':>5}  load"
    )
    for r in results:
        first = f"{r['first']:7.0f}" if "first" in r else " " * 7
        cpu = f"{r['steady_cpu']:6.0f}" if "steady_cpu" in r else " " * 6
        joined = f"{r['joined']:7.0f} {r['joined_cpu']:6.0f}" if "joined" in r else " " * 14
        cached = f"{r['cached']:7.1f}" if "cached" in r else " " * 7
        weight = f"{r['raw'] / 1024:5.0f} {r['gzip'] / 1024:5.0f}" if "raw" in r else " " * 11
        load = f"{r['load'][0]:.1f}-{r['load'][1]:.1f}" if "load" in r else ""
        steady = f"{r['steady']:7.0f}"
        print(f"  {r['backend']:10} {r['page']:34} {first} {steady} {cpu} {joined} {cached} {weight}  {load}")


# ---- end of bench_pages ------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reasons", type=int, default=0, help="reasons per customer (0-10)")
    parser.add_argument("--home", type=Path, default=None, help="CUSTSEG_HOME with a champion")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--part", choices=["all", "upload", "pages"], default="all")
    parser.add_argument("--log-rows", type=int, default=1_000_000, help="predictions logged for bench_pages")
    parser.add_argument("--backends", default="sqlite,postgresql", help="prediction logs for bench_pages")
    parser.add_argument(
        "--compare-feedback-join",
        action="store_true",
        help="bench_pages: alternate steady renders with ones joining the feedback per visit (as before)",
    )
    parser.add_argument(
        "--window-baseline",
        action="store_true",
        help="bench_pages: also time reading the day window into pandas (custseg monitor's read; minutes)",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="custseg-bench-ui-"))
    try:
        home = prepare_home(args.home, work)
        if args.part in ("all", "upload"):
            result = bench_upload(home, work, args.rows, args.repeats, args.reasons, args.port)
            print_upload(result)
        if args.part in ("all", "pages"):
            backends = args.backends.split(",")
            results = bench_pages(
                home,
                work,
                args.log_rows,
                args.repeats,
                backends,
                args.window_baseline,
                args.compare_feedback_join,
            )
            print_pages(results)
        print(f"  load: {os.getloadavg()[0]:.1f} {os.getloadavg()[1]:.1f} {os.getloadavg()[2]:.1f} (uptime)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
