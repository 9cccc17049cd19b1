"""Latency benchmark: every request's latency at 1 connection, `custseg serve` against the prototype rebuild.

Usage: ``.venv/bin/python bench/bench_latency.py [--duration 60] [--prototype-duration 10]
[--variant LABEL=ARGS ...] [--home DIR] [--logs DIR] [--json OUT]``

What it does, all in one run so the figures share the machine's conditions:

1. trains the prototype's forest the prototype's way (``bench/prototype/train_prototype.py``) and a custseg
   champion with ``custseg train`` on the same 1,000-row generated file (``data/customers.csv``) in a
   temporary CUSTSEG_HOME;
2. starts ``custseg serve`` with no flags but the port (prediction log on, default workers, default
   server) and the prototype (Flask dev server, ``app.run()``) on loopback ports;
3. sends the prototype's body to ``/predict`` one request after another over one keep-alive connection
   (a raw socket: no client library in the measured time) for ``--duration`` seconds against custseg and
   ``--prototype-duration`` seconds against the prototype, after a short warm-up, and records every
   request's latency on the client side (send to last byte of the response);
4. prints p50, p99, p99.9, max and the count over 50 ms for each, the ratios, the slowest requests
   with the second of the run they happened in (to line them up with periodic work: the registry poll
   and the live drift refresh run every 30 s), and the verdict against the targets (p50 <= 0.5 ms,
   p99 <= 2 ms, no request over 50 ms).

``--variant "LABEL=--flag value"`` adds another ``custseg serve`` configuration measured in the same run
(for example ``--variant "one worker=--workers 1"``); the first one is always the no-flags server.
``--home DIR`` trains once into DIR and reuses it on later runs (training is the slow part on a busy
machine); ``--logs DIR`` keeps the servers' logs.
"""

from __future__ import annotations

import argparse
import array
import gc
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROTOTYPE_BODY = (
    b'{"age": 56, "gender": "Male", "annual_income": 65648, "total_spent": 49624, "num_purchases": 17, '
    b'"avg_purchase_value": 467, "online_activity_score": 52, "loyalty_program": 0, '
    b'"days_since_last_purchase": 235, "num_site_visits": 61}'
)
TARGET_P50_MS = 0.5
TARGET_P99_MS = 2.0
STALL_MS = 50.0
WARM_UP_SECONDS = 2.0


@dataclass
class Server:
    name: str
    command: list[str]
    env: dict[str, str]
    port: int
    log: Path
    ready_path: str
    duration: float
    process: subprocess.Popen[bytes] | None = None
    latencies_ms: array.array[float] = field(default_factory=lambda: array.array("d"))
    offsets_s: array.array[float] = field(default_factory=lambda: array.array("d"))
    errors: int = 0
    reconnects: int = 0


class KeepAliveClient:
    """HTTP/1.1 over one socket, reconnecting only when the server closes it; no parsing beyond what
    framing needs, so the client adds a few microseconds, not a client library's hundreds."""

    def __init__(self, port: int, path: str, body: bytes) -> None:
        self.port = port
        self.request = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        self.sock: socket.socket | None = None
        self.connects = 0

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connects += 1
        self.sock = sock
        return sock

    def post(self) -> int:
        """Send the request, read the whole response; returns the status code."""
        sock = self.sock or self._connect()
        sock.sendall(self.request)
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                self.close()
                raise ConnectionError("server closed the connection")
            buffer += chunk
        head, _, body = buffer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip().lower()
        length = int(headers.get(b"content-length", b"-1"))
        close = headers.get(b"connection") == b"close" or lines[0].startswith(b"HTTP/1.0")
        if length < 0:  # no length: the body ends with the connection
            while chunk := sock.recv(65536):
                body += chunk
            close = True
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection mid-body")
            body += chunk
        if close:
            self.close()
        return status

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_checked(command: list[str], env: dict[str, str], what: str) -> str:
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{what} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout


def start(server: Server) -> None:
    with server.log.open("wb") as out:
        server.process = subprocess.Popen(
            server.command, env=server.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
        )


def wait_ready(server: Server, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    request = f"GET {server.ready_path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    while time.monotonic() < deadline:
        assert server.process is not None
        if server.process.poll() is not None:
            sys.exit(f"{server.name} exited:\n{server.log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=2) as sock:
                sock.sendall(request)
                if sock.recv(64).split(b" ")[1] == b"200":
                    return
        except (OSError, IndexError):
            pass
        time.sleep(0.3)
    sys.exit(f"{server.name} not ready after {timeout:.0f} s:\n{server.log.read_text()[-3000:]}")


def stop(server: Server) -> None:
    if server.process is not None and server.process.poll() is None:
        server.process.send_signal(signal.SIGTERM)
        try:
            server.process.wait(60)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait(10)


def measure(server: Server, seconds: float, *, record: bool) -> int:
    """Sequential requests for ``seconds``; returns how many were sent."""
    client = KeepAliveClient(server.port, "/predict", PROTOTYPE_BODY)
    clock = time.perf_counter
    latencies, offsets = server.latencies_ms, server.offsets_s
    sent = 0
    began = clock()
    end = began + seconds
    try:
        while True:
            t0 = clock()
            if t0 >= end:
                break
            try:
                status = client.post()
            except OSError:
                server.errors += 1
                client.close()
                continue
            t1 = clock()
            sent += 1
            if status != 200:
                server.errors += 1
            if record:
                latencies.append((t1 - t0) * 1000.0)
                offsets.append(t0 - began)
    finally:
        client.close()
    if record:
        server.reconnects += max(0, client.connects - 1)
    return sent


def quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def summary(server: Server) -> dict[str, float]:
    values = sorted(server.latencies_ms)
    return {
        "requests": len(values),
        "seconds": server.duration,
        "rps": len(values) / server.duration,
        "p50_ms": quantile(values, 0.50),
        "p90_ms": quantile(values, 0.90),
        "p99_ms": quantile(values, 0.99),
        "p999_ms": quantile(values, 0.999),
        "max_ms": values[-1] if values else float("nan"),
        "mean_ms": statistics.fmean(values) if values else float("nan"),
        "over_10_ms": sum(1 for v in values if v > 10.0),
        "over_50_ms": sum(1 for v in values if v > STALL_MS),
        "errors": server.errors,
        "reconnects": server.reconnects,
    }


def slowest(server: Server, n: int = 5) -> list[tuple[float, float]]:
    """The n slowest requests as (latency ms, second of the run it started in)."""
    ranked = sorted(range(len(server.latencies_ms)), key=server.latencies_ms.__getitem__, reverse=True)
    return [(server.latencies_ms[i], server.offsets_s[i]) for i in ranked[:n]]


def parse_variant(text: str) -> tuple[str, list[str]]:
    label, sep, args = text.partition("=")
    if not sep or not label.strip():
        raise argparse.ArgumentTypeError(f"--variant wants LABEL=ARGS, got {text!r}")
    return label.strip(), shlex.split(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--duration", type=float, default=60.0, help="Seconds of requests per custseg server."
    )
    parser.add_argument(
        "--prototype-duration",
        type=float,
        default=10.0,
        help="Seconds of requests to the prototype (0: skip).",
    )
    parser.add_argument(
        "--variant",
        type=parse_variant,
        action="append",
        default=[],
        metavar="LABEL=ARGS",
        help="Another `custseg serve` configuration (extra flags) measured in the same run.",
    )
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "customers.csv")
    parser.add_argument("--json", type=Path, help="Also write the summary (and every latency) here.")
    parser.add_argument(
        "--home",
        type=Path,
        help="Reuse this CUSTSEG_HOME (trained once, here, if it has no model yet) instead of a fresh one.",
    )
    parser.add_argument("--logs", type=Path, help="Copy the servers' logs into this folder.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="custseg-bench-latency-") as tmp_name:
        tmp = Path(tmp_name)
        home = args.home or tmp / "home"
        base_env = {
            **os.environ,
            "CUSTSEG_HOME": str(home),
            "MLFLOW_TRACKING_URI": "",
            "PYTHONUNBUFFERED": "1",
        }
        for name in ("CUSTSEG_WORKERS", "CUSTSEG_SERVER", "CUSTSEG_PREDICTION_LOG_ENABLED"):
            base_env.pop(name, None)  # "no flags" means the shipped defaults, not this shell's overrides
        print(f"training the prototype's forest and a custseg champion on {args.data} ...", flush=True)
        proto_dir = tmp / "proto"
        if args.prototype_duration > 0:
            trainer = [sys.executable, "bench/prototype/train_prototype.py", str(args.data), str(proto_dir)]
            print(run_checked(trainer, base_env, "prototype training").strip())
        trained = home / ".bench-latency-trained"
        if not trained.exists():
            run_checked([str(BIN / "custseg"), "train", "--data", str(args.data)], base_env, "custseg train")
            trained.touch()

        servers: list[Server] = []
        for label, extra in [("custseg serve (no flags)", []), *args.variant]:
            port = free_port()
            servers.append(
                Server(
                    label,
                    [str(BIN / "custseg"), "serve", "--port", str(port), *extra],
                    base_env,
                    port,
                    tmp / f"custseg-{len(servers)}.log",
                    "/health/ready",
                    args.duration,
                )
            )
        if args.prototype_duration > 0:
            port = free_port()
            servers.append(
                Server(
                    "prototype (Flask dev server + sklearn)",
                    [sys.executable, "bench/prototype/app.py", str(port)],
                    {**base_env, "MODEL_DIR": str(proto_dir)},
                    port,
                    tmp / "prototype.log",
                    "/",
                    args.prototype_duration,
                )
            )
        load_before = os.getloadavg()
        try:
            for server in servers:
                start(server)
            for server in servers:
                wait_ready(server)
            gc.disable()  # the client's own collections must not show up as server latency
            for server in servers:
                measure(server, WARM_UP_SECONDS, record=False)
            print(
                f"\nsequential POST /predict over one keep-alive connection, prototype's body; "
                f"{os.cpu_count()} cores, load average {load_before[0]:.2f} {load_before[1]:.2f}\n",
                flush=True,
            )
            for server in servers:
                measure(server, server.duration, record=True)
                stats = summary(server)
                print(
                    f"  {server.name:<40} {stats['requests']:>8,} requests in {server.duration:g} s, "
                    f"p50 {stats['p50_ms']:.3f} ms, max {stats['max_ms']:.1f} ms",
                    flush=True,
                )
            gc.enable()
        finally:
            for server in servers:
                stop(server)
            if args.logs:
                args.logs.mkdir(parents=True, exist_ok=True)
                for server in servers:
                    shutil.copy(server.log, args.logs / server.log.name)
        load_after = os.getloadavg()
        result = report(servers, load_after)
        if args.json:
            record = {
                "summary": result,
                "servers": [
                    {"name": s.name, "command": s.command, "latencies_ms": list(s.latencies_ms)}
                    for s in servers
                ],
            }
            args.json.write_text(json.dumps(record))
            print(f"\nwrote {args.json}")


def report(servers: list[Server], load: tuple[float, float, float]) -> dict[str, object]:
    print(
        f"\n{'server':<40} {'req/s':>8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9}"
        f" {'max ms':>8} {'>10 ms':>7} {'>50 ms':>7} {'errors':>7}"
    )
    stats = {s.name: summary(s) for s in servers}
    for server in servers:
        s = stats[server.name]
        print(
            f"{server.name:<40} {s['rps']:>8.0f} {s['p50_ms']:>8.3f} {s['p90_ms']:>8.3f} {s['p99_ms']:>8.3f}"
            f" {s['p999_ms']:>9.3f} {s['max_ms']:>8.2f} {s['over_10_ms']:>7} {s['over_50_ms']:>7}"
            f" {s['errors']:>7}"
        )
    print(f"(load average after the run: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})")
    for server in servers:
        worst = ", ".join(f"{ms:.1f} ms at {at:.1f} s" for ms, at in slowest(server))
        print(f"slowest of {server.name}: {worst}")
    ours = stats[servers[0].name]
    prototype = stats.get(servers[-1].name) if servers[-1].name.startswith("prototype") else None
    if prototype is not None:
        print(
            f"\nvs the prototype: p50 {prototype['p50_ms'] / ours['p50_ms']:.1f}x lower "
            f"({ours['p50_ms']:.3f} vs {prototype['p50_ms']:.3f} ms), p99 "
            f"{prototype['p99_ms'] / ours['p99_ms']:.1f}x lower ({ours['p99_ms']:.3f} vs "
            f"{prototype['p99_ms']:.3f} ms), sequential throughput {ours['rps'] / prototype['rps']:.1f}x"
        )

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    print(
        f"targets for {servers[0].name}: p50 {ours['p50_ms']:.3f} ms <= {TARGET_P50_MS:g} ms: "
        f"{verdict(ours['p50_ms'] <= TARGET_P50_MS)}; p99 {ours['p99_ms']:.3f} ms <= {TARGET_P99_MS:g} ms: "
        f"{verdict(ours['p99_ms'] <= TARGET_P99_MS)}; requests over {STALL_MS:g} ms in "
        f"{servers[0].duration:g} s: {ours['over_50_ms']} (target 0): {verdict(ours['over_50_ms'] == 0)}"
    )
    return {"load_after": load, "servers": stats}


if __name__ == "__main__":
    main()
