#!/usr/bin/env python3
"""Gateway benchmark: meshgate against nginx as a plain proxy and as an API gateway.

One run measures, on loopback, systems in front of (or being) one nginx upstream: the
upstream directly, nginx ``proxy_pass``, nginx as an API gateway (key map + limit_req),
meshgate on in-memory counters and on Redis counters, then nginx-as-gateway and meshgate
over HTTPS (wrk) and over HTTP/2 with TLS (h2load); last, gRPC unary calls to a grpcio
server directly and through meshgate (a grpcio load client). The load generator and the
upstream share core 0; the proxy under test has core 1 to itself. For each system:
throughput and latency at saturation, the proxy's CPU time per request (from /proc), and
(HTTP/1.1 load only) p99 at half of that system's saturation rate next to the direct
upstream's p99 at the same rate. Figures are ratios against peers measured in the same
run; this is not a pass/fail test. See README.md.
"""

from __future__ import annotations

import argparse
import ctypes
import http.client
import importlib.util
import json
import math
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

PATH = "/echo/hello"
KEY = "k1"
BAD_KEY = "not-a-key"
LOAD_CORE = "0"  # the load generator (wrk, h2load, the gRPC client) and the upstream
PROXY_CORE = "1"  # the proxy under test, alone
REDIS_URL = "redis://127.0.0.1:6379/0"
# x the peer's CPU/req (nginx-gateway, or its HTTPS / HTTP/2 configuration).
CPU_TARGETS = {
    "meshgate-memory": 1.5,
    "meshgate-redis": 2.0,
    "meshgate-https": 2.0,
    "meshgate-h2": 2.5,
}
# Each system's peer, measured in the same run; the others are compared with nginx-gateway.
# meshgate-grpc's is the gRPC server's own CPU per call when called directly.
PEERS = {
    "meshgate-https": "nginx-gateway-https",
    "meshgate-h2": "nginx-gateway-h2",
    "meshgate-grpc": "grpc-direct",
}
H2_SYSTEMS = ("nginx-gateway-h2", "meshgate-h2")  # loaded by h2load over TLS (ALPN h2)
GRPC_SYSTEMS = ("grpc-direct", "meshgate-grpc")  # loaded by grpc_load.py, cleartext HTTP/2
HALF_LOAD_P99_TARGET_MS = 2.0  # allowed p99 above the direct upstream's at the same rate
TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


# processes


def _die_with_parent() -> None:
    # If this script is killed outright, the kernel still stops its servers.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Server:
    """A child server process pinned to one core; output goes to files in the work dir."""

    def __init__(self, name: str, args: list[str], core: str, workdir: Path) -> None:
        self.name = name
        self.log_path = workdir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.popen = subprocess.Popen(
                ["taskset", "-c", core, *args],  # taskset execs: the pid is the server's
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=workdir,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.pid = self.popen.pid

    def pids(self) -> list[int]:
        """This process and its live descendants (nginx: the master and its worker)."""
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                stat = _read_stat(int(entry))
                if stat is not None:
                    children.setdefault(int(stat[1]), []).append(int(entry))
        out, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            todo += children.get(pid, [])
        return out

    def cpu_ticks(self) -> int:
        return sum(_cpu_ticks(pid) for pid in self.pids())

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def check_alive(self) -> None:
        if self.popen.poll() is not None:
            raise BenchError(
                f"{self.name} exited with {self.popen.returncode}; its log:\n{self.log_tail()}"
            )

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(8)
            except subprocess.TimeoutExpired:
                pass
        # The session holds the server and anything it forked (nginx workers).
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.popen.wait()


def _read_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name: [state, ppid, ...]."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _cpu_ticks(pid: int) -> int:
    stat = _read_stat(pid)
    # utime and stime are fields 14 and 15 of stat(5), 11 and 12 after the name.
    return int(stat[11]) + int(stat[12]) if stat is not None else 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Ports whose system serves HTTPS (the bench's own self-signed certificate).
HTTPS_PORTS: set[int] = set()


def get(port: int, key: str | None, timeout: float = 2.0, path: str = PATH) -> tuple[int, bytes]:
    conn: http.client.HTTPConnection
    if port in HTTPS_PORTS:
        import ssl

        conn = http.client.HTTPSConnection(
            "127.0.0.1", port, timeout=timeout, context=ssl._create_unverified_context()
        )
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"X-API-Key": key} if key is not None else {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_ready(server: Server, port: int, timeout: float = 20.0, http: bool = True) -> None:
    """Until ``port`` answers HTTP (or, ``http=False``, accepts connections: gRPC)."""
    deadline = time.monotonic() + timeout
    while True:
        server.check_alive()
        try:
            if http:
                get(port, KEY, timeout=1.0)
            else:
                socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{server.name} does not answer on 127.0.0.1:{port} after {timeout}s; "
                    f"its log:\n{server.log_tail()}"
                ) from None
            time.sleep(0.1)


def verify(name: str, port: int, checks_key: bool) -> None:
    """Refuse to measure anything but 200s: the right key passes, a bad one gets 403."""
    status, body = get(port, KEY)
    if status != 200 or b'"ok":true' not in body.replace(b" ", b""):
        raise BenchError(f"{name}: GET {PATH} with the key answered {status} {body[:200]!r}")
    if checks_key:
        status, body = get(port, BAD_KEY)
        if status != 403:
            raise BenchError(f"{name}: a bad API key answered {status}, expected 403")


# nginx


NGINX_COMMON = """\
worker_processes 1;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
{body}
}}
"""

UPSTREAM_BODY = """\
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{ default_type application/json; return 200 '{{"ok":true}}'; }}
  }}
"""

POOL = """\
  upstream backend {{
    server 127.0.0.1:{upstream};
    keepalive 64;
    keepalive_requests 1000000;
  }}
"""

PROXY_BODY = (
    POOL
    + """\
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
"""
)

# What meshgate's access phase does, in nginx terms: key -> application, unknown -> 403,
# a per-key rate limit that never rejects here, plus the forwarding fields meshgate adds.
GATEWAY_BODY = (
    POOL
    + """\
  map $http_x_api_key $application {{
    default "";
    {key} app1;
  }}
  limit_req_zone $http_x_api_key zone=per_key:10m rate=1000000r/s;
  limit_req_status 429;
  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location /echo/ {{
      if ($application = "") {{ return 403 '{{"title":"credential invalid"}}'; }}
      limit_req zone=per_key burst=100000 nodelay;
      proxy_pass http://backend/;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_set_header X-Request-Id $request_id;
      add_header X-Request-Id $request_id;
    }}
    location / {{ return 404; }}
  }}
"""
)


# The same gateway over HTTPS: TLS 1.2 and 1.3, session tickets, keep-alive.
GATEWAY_HTTPS_BODY = GATEWAY_BODY.replace(
    "listen 127.0.0.1:{port} backlog=4096;",
    "listen 127.0.0.1:{port} ssl backlog=4096;\n"
    "    ssl_certificate {cert}; ssl_certificate_key {key_file};\n"
    "    ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:tls:10m;",
)

# And over HTTP/2 (ALPN h2 on the TLS listener; nginx 1.22 syntax), upstream still HTTP/1.1.
GATEWAY_H2_BODY = GATEWAY_HTTPS_BODY.replace(" ssl backlog=4096;", " ssl http2 backlog=4096;")


def make_certificate(workdir: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, for both HTTPS systems (the demo's: the
    clients here do not verify it)."""
    from meshgate.demo.tls import demo_certificates

    made = demo_certificates(workdir / "tls")
    made.key.chmod(0o644)  # nginx's worker runs as nobody
    return made.cert, made.key


def certificate(workdir: Path) -> tuple[Path, Path]:
    """The bench's certificate, made once per run."""
    return make_certificate(workdir)


def checkout(rev: str, workdir: Path) -> Path:
    """A worktree of the repository at ``rev`` (removed with the work dir)."""
    target = workdir / f"checkout-{re.sub(r'[^A-Za-z0-9._-]', '_', rev)}"
    if not target.exists():
        done = subprocess.run(
            ["git", "-C", str(REPO), "worktree", "add", "--detach", str(target), rev],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise BenchError(f"cannot check out {rev}: {done.stderr.strip()}")
    return target


def start_nginx(name: str, body: str, core: str, workdir: Path) -> Server:
    prefix = workdir / name
    (prefix / "tmp").mkdir(parents=True)
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_COMMON.format(tmp=prefix / "tmp", body=body))
    error_log = prefix / "error.log"
    globals_ = f"daemon off; pid {prefix / 'nginx.pid'}; error_log {error_log} warn;"
    args = ["nginx", "-p", f"{prefix}/", "-e", str(error_log), "-c", str(conf), "-g", globals_]
    test = subprocess.run([*args, "-t"], capture_output=True, text=True)
    if test.returncode != 0:
        raise BenchError(f"nginx rejects the {name} configuration:\n{test.stderr}")
    return Server(name, args, core, workdir)


# meshgate

MESHGATE_CONFIG = """\
listen: 127.0.0.1:{port}
admin_listen: 127.0.0.1:{admin}
access_log: false
limits: {limits}
timeouts: {{shutdown_grace: 1}}
products:
{product}"""

# The example configuration, with a minute limit that never rejects here.
ECHO_PRODUCT = """\
  - name: echo
    hosts: ["*"]
    path_prefix: /echo
    backend: http://127.0.0.1:{upstream}
    auth: {{type: api_key, header: X-API-Key}}
    metrics:
      - {{name: hits}}
      - {{name: search, parent: hits}}
    mapping_rules:
      - {{method: GET, pattern: "/search", metric: search, last: true}}
      - {{method: ANY, pattern: "/", metric: hits}}
    plans:
      - name: basic
        limits:
          - {{metric: hits, period: minute, value: 1000000000}}
          - {{metric: search, period: day, value: 1000}}
    policies:
      - cors: {{allow_origins: ["*"]}}
    applications:
      - {{id: app1, plan: basic, keys: [{key}]}}
"""

# The gRPC server's service, its paths forwarded whole over h2c; the same key and a plan
# whose minute limit never rejects here.
GRPC_PRODUCT = """\
  - name: grpc
    hosts: ["*"]
    path_prefix: /bench.Echo
    strip_prefix: false
    backend: http://127.0.0.1:{upstream}
    protocol: h2c
    auth: {{type: api_key, header: X-API-Key}}
    metrics: [{{name: hits}}]
    mapping_rules: [{{method: POST, pattern: "/", metric: hits}}]
    plans:
      - name: basic
        limits: [{{metric: hits, period: minute, value: 1000000000}}]
    applications:
      - {{id: app1, plan: basic, keys: [{key}]}}
"""


def meshgate_config(
    workdir: Path,
    name: str,
    port: int,
    upstream: int,
    limits: str,
    tls: tuple[Path, Path] | None = None,
    product: str = ECHO_PRODUCT,
) -> Path:
    """The configuration; with ``tls`` (cert, key) the gateway serves HTTPS on ``port`` and
    its cleartext listener on another port."""
    path = workdir / f"{name}.yaml"
    text = MESHGATE_CONFIG.format(
        port=port if tls is None else free_port(),
        admin=free_port(),
        limits=limits,
        product=product.format(upstream=upstream, key=KEY),
    )
    if tls is not None:
        text += f"tls:\n  listen: 127.0.0.1:{port}\n"
        text += f"  certificates: [{{cert: {tls[0]}, key: {tls[1]}}}]\n"
    path.write_text(text)
    return path


def start_meshgate(
    name: str, config: Path, core: str, workdir: Path, source: Path | None = None
) -> Server:
    """``meshgate gateway``; from the checkout ``source`` (its ``src``) when given."""
    args = [sys.executable, "-m", "meshgate", "gateway", "--config", str(config)]
    if source is not None:
        args = ["env", f"PYTHONPATH={source / 'src'}", *args]
    return Server(name, [*args, "--log-level", "WARNING"], core, workdir)


def admin_port(config: Path) -> int:
    match = re.search(r"^admin_listen: 127\.0\.0\.1:(\d+)$", config.read_text(), re.M)
    assert match is not None
    return int(match.group(1))


# load generators


@dataclass
class LoadResult:
    """What one run of a load generator (wrk, h2load, grpc_load.py) achieved."""

    tool: str
    connections: int
    seconds: float
    requests: int  # completed, whatever their status
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int  # wrk: not 2xx or 3xx; h2load: not 2xx; gRPC: calls not OK
    socket_errors: int  # h2load: streams that failed
    streams: int = 1  # requests in flight per connection (h2load -m; gRPC: the calls)
    delay_ms: float | None = None  # mean pause between a connection's requests (paced)
    # CPU seconds over the run: measured (the process(es) under test), upstream, redis,
    # load (the load generator), others (every other process on the machine: the noise of
    # a shared host), and the idle seconds of cores 0 and 1.
    cpu_s: dict[str, float] = field(default_factory=dict)
    p90_ms: float | None = None  # wrk only


_UNIT_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNIT_MS[unit]


def parse_wrk(text: str, connections: int, delay_ms: float | None) -> LoadResult:
    """The figures of ``wrk --latency`` output."""

    def find(pattern: str) -> re.Match[str]:
        match = re.search(pattern, text, re.M)
        if match is None:
            raise BenchError(f"unexpected wrk output (no {pattern!r}):\n{text}")
        return match

    total = find(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h),")
    p50 = find(r"^\s*50%\s+([\d.]+)(us|ms|s|m|h)\s*$")
    p90 = find(r"^\s*90%\s+([\d.]+)(us|ms|s|m|h)\s*$")
    p99 = find(r"^\s*99%\s+([\d.]+)(us|ms|s|m|h)\s*$")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    return LoadResult(
        tool="wrk",
        connections=connections,
        seconds=_ms(total.group(2), total.group(3)) / 1e3,
        requests=int(total.group(1)),
        rps=float(find(r"^Requests/sec:\s+([\d.]+)").group(1)),
        p50_ms=_ms(*p50.groups()),
        p99_ms=_ms(*p99.groups()),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
        delay_ms=delay_ms,
        p90_ms=_ms(*p90.groups()),
    )


def read_request_log(path: Path) -> list[tuple[int, int]]:
    """(status, µs) per request from h2load's ``--log-file`` (grpc_load.py writes the same
    columns): start µs, status (-1 for a failed stream), µs until the end of the response."""
    rows = []
    with open(path) as f:
        for line in f:
            fields = line.split("\t")
            rows.append((int(fields[1]), int(fields[2])))
    return rows


def percentile_ms(sorted_us: list[int], fraction: float) -> float:
    """Nearest-rank percentile of sorted µs latencies, in ms."""
    if not sorted_us:
        return float("nan")
    return sorted_us[max(1, math.ceil(len(sorted_us) * fraction)) - 1] / 1e3


def _machine_ticks() -> tuple[int, int, int]:
    """From /proc/stat: user+nice+system ticks of the machine, idle+iowait of cores 0 and 1."""
    busy, idle = 0, {}
    with open("/proc/stat") as f:
        for line in f:
            fields = line.split()
            if fields[0] == "cpu":
                busy = int(fields[1]) + int(fields[2]) + int(fields[3])
            elif fields[0] in ("cpu0", "cpu1"):
                idle[fields[0]] = int(fields[4]) + int(fields[5])
    return busy, idle.get("cpu0", 0), idle.get("cpu1", 0)


@dataclass
class Meter:
    """Whose CPU a run used: the process(es) under test, the upstream, Redis, the rest."""

    measured: Server
    upstream: Server | None = None
    redis_pid: int | None = None

    def snapshot(self) -> tuple[int, ...]:
        return (
            self.measured.cpu_ticks(),
            self.upstream.cpu_ticks() if self.upstream is not None else 0,
            _cpu_ticks(self.redis_pid) if self.redis_pid else 0,
            *_machine_ticks(),
        )


def cpu_split(before: tuple[int, ...], after: tuple[int, ...], load_s: float) -> dict[str, float]:
    """CPU seconds between two ``Meter`` snapshots, by party; ``load_s``: the load generator's."""
    measured, upstream, redis, machine, idle0, idle1 = (
        (b - a) * TICK_US / 1e6 for a, b in zip(before, after, strict=True)
    )
    return {
        "measured": measured,
        "upstream": upstream,
        "redis": redis,
        "load": load_s,
        "others": max(0.0, machine - measured - upstream - redis - load_s),
        # Idle time left on each core: a saturated proxy leaves none on core 1.
        "idle_core0": idle0,
        "idle_core1": idle1,
    }


def run_load(
    args: list[str], timeout: float, meter: Meter | None
) -> tuple[subprocess.CompletedProcess[str], dict[str, float]]:
    """Run a load generator to its end; with ``meter``, whose CPU its run took."""
    before = meter.snapshot() if meter is not None else None
    rusage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        args, capture_output=True, text=True, timeout=timeout, preexec_fn=_die_with_parent
    )
    rusage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    after = meter.snapshot() if meter is not None else None
    # Only the load generator was reaped in between: the servers are still running.
    load_s = (rusage1.ru_utime + rusage1.ru_stime) - (rusage0.ru_utime + rusage0.ru_stime)
    if before is None or after is None:
        return done, {}
    return done, cpu_split(before, after, load_s)


def pace_script(workdir: Path, delay_ms: float) -> Path:
    """A wrk Lua script whose ``delay()`` pauses each connection a whole number of ms drawn
    around a uniform 0..2*delay_ms before each request: the mean can be fractional, and
    connections do not fire in step on the timer's ms ticks."""
    script = workdir / "pace.lua"
    script.write_text(
        f"local span = {2 * delay_ms:.4f}\n"
        "math.randomseed(os.time())\n"
        "function delay()\n  return math.floor(math.random() * span + 0.5)\nend\n"
    )
    return script


def wrk(
    port: int,
    connections: int,
    seconds: float,
    workdir: Path,
    delay_ms: float | None = None,
    meter: Meter | None = None,
) -> LoadResult:
    """One wrk run on the load core; ``delay_ms`` paces each connection (``pace_script``)."""
    args = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s"]
    args += ["--latency", "-H", f"X-API-Key: {KEY}"]
    if delay_ms is not None:
        args += ["-s", str(pace_script(workdir, delay_ms))]
    scheme = "https" if port in HTTPS_PORTS else "http"
    args.append(f"{scheme}://127.0.0.1:{port}{PATH}")
    done, cpu = run_load(args, seconds + 60, meter)
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    result = parse_wrk(done.stdout, connections, delay_ms)
    result.cpu_s = cpu
    return result


def h2load(
    name: str,
    port: int,
    load: list[str],
    workdir: Path,
    key: str = KEY,
    meter: Meter | None = None,
) -> tuple[str, list[tuple[int, int]], dict[str, float]]:
    """One h2load run on the load core over TLS (h2 offered by ALPN, as h2load does), with
    the ``load`` options: its output, (status, µs) per request, and the CPU split.

    Refuses a run whose connection did not negotiate h2 (h2load would go on in HTTP/1.1).
    """
    log = workdir / "h2load-requests.log"
    log.unlink(missing_ok=True)
    args = ["taskset", "-c", LOAD_CORE, "h2load", *load, "-H", f"X-API-Key: {key}"]
    args += ["--log-file", str(log), f"https://127.0.0.1:{port}{PATH}"]
    done, cpu = run_load(args, 120, meter)
    if done.returncode != 0:
        raise BenchError(f"h2load failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    protocol = re.search(r"^Application protocol: (\S+)$", done.stdout, re.M)
    if protocol is None or protocol.group(1) != "h2":
        said = protocol.group(1) if protocol else "none: no TLS connection"
        raise BenchError(f"{name} does not speak HTTP/2 (ALPN negotiated {said}):\n{done.stdout}")
    return done.stdout, read_request_log(log) if log.exists() else [], cpu


def h2load_saturation(
    name: str, port: int, args: argparse.Namespace, workdir: Path, meter: Meter
) -> LoadResult:
    """A warm-up, then the measured h2load run: the same requests in flight as wrk's
    connections, ``--h2-streams`` of them on each connection."""
    streams = args.h2_streams
    connections = max(1, args.connections // streams)
    load = [f"-c{connections}", f"-m{streams}", "-t1"]
    h2load(name, port, [*load, "-D", f"{args.warmup * 1000:.0f}ms"], workdir)
    out, rows, cpu = h2load(
        name, port, [*load, "-D", f"{args.duration * 1000:.0f}ms"], workdir, meter=meter
    )
    finished = re.search(r"^finished in ([\d.]+)(us|ms|s|m|h),", out, re.M)
    if finished is None:
        raise BenchError(f"unexpected h2load output (no 'finished in'):\n{out}")
    seconds = _ms(*finished.groups()) / 1e3
    latencies = sorted(us for status, us in rows if status != -1)
    return LoadResult(
        tool="h2load",
        connections=connections,
        streams=streams,
        seconds=seconds,
        requests=len(latencies),
        rps=len(latencies) / seconds,
        p50_ms=percentile_ms(latencies, 0.50),
        p99_ms=percentile_ms(latencies, 0.99),
        non_2xx=sum(1 for status, _ in rows if status != -1 and not 200 <= status < 300),
        socket_errors=sum(1 for status, _ in rows if status == -1),
        cpu_s=cpu,
    )


def verify_h2(name: str, port: int, workdir: Path) -> None:
    """Refuse to measure a system that does not answer HTTP/2 (ALPN h2) with 200 to the
    key and 403 to a bad one (``verify`` checks the body, over HTTPS/1.1)."""
    for key, expected in ((KEY, 200), (BAD_KEY, 403)):
        _, rows, _ = h2load(name, port, ["-n1", "-c1", "-m1"], workdir, key=key)
        statuses = [status for status, _ in rows]
        if statuses != [expected]:
            which = "the key" if key == KEY else "a bad API key"
            raise BenchError(
                f"{name}: GET {PATH} over HTTP/2 with {which} answered {statuses}, "
                f"expected [{expected}]"
            )


def grpc_load(
    name: str, port: int, args: argparse.Namespace, workdir: Path, meter: Meter
) -> LoadResult:
    """grpc_load.py on the load core: ``--connections`` unary calls in flight on one
    channel (one HTTP/2 connection), a warm-up, then the measured duration, whose start
    and end it announces on stdout so that the CPU is read across exactly that window.

    It first checks the echo (and, through meshgate, that a bad key is refused): an
    answer other than the bytes sent ends the benchmark before anything is measured.
    """
    log, errors = workdir / "grpc-calls.log", workdir / f"{name}-grpc-load.err"
    command = ["taskset", "-c", LOAD_CORE, sys.executable, str(HERE / "grpc_load.py")]
    command += ["--target", f"127.0.0.1:{port}", "--key", KEY, "--calls", str(args.connections)]
    command += ["--warmup", f"{args.warmup:g}", "--duration", f"{args.duration:g}"]
    command += ["--log-file", str(log)]
    if name != "grpc-direct":
        command += ["--bad-key", BAD_KEY]
    with open(errors, "w") as stderr:
        client = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            text=True,
            preexec_fn=_die_with_parent,
        )
    # The client has deadlines on every call; this one is for a client that hangs anyway.
    watchdog = threading.Timer(args.warmup + args.duration + 60, client.kill)
    watchdog.start()
    before: tuple[tuple[int, ...], int] | None = None
    after: tuple[tuple[int, ...], int] | None = None
    seconds = 0.0
    try:
        assert client.stdout is not None
        for line in client.stdout:
            if line == "measure\n":
                before = meter.snapshot(), _cpu_ticks(client.pid)
            elif line.startswith("done "):
                after = meter.snapshot(), _cpu_ticks(client.pid)
                seconds = float(line.split()[1])
        client.wait()
    finally:
        watchdog.cancel()
        if client.poll() is None:
            client.kill()
            client.wait()
    if client.returncode != 0 or before is None or after is None:
        reason = errors.read_text(errors="replace").strip()
        raise BenchError(f"{name}: the gRPC load client failed ({client.returncode}): {reason}")
    rows = read_request_log(log)
    ok = sorted(us for status, us in rows if status == 0)
    return LoadResult(
        tool="grpc_load.py",
        connections=1,
        streams=args.connections,
        seconds=seconds,
        requests=len(rows),
        rps=len(rows) / seconds,
        p50_ms=percentile_ms(ok, 0.50),
        p99_ms=percentile_ms(ok, 0.99),
        non_2xx=len(rows) - len(ok),
        socket_errors=0,
        cpu_s=cpu_split(before[0], after[0], (after[1] - before[1]) * TICK_US / 1e6),
    )


def start_grpc_server(workdir: Path) -> tuple[Server, int]:
    """grpc_echo.py on the load core, like the nginx upstream."""
    port = free_port()
    args = [sys.executable, str(HERE / "grpc_echo.py"), "--port", str(port)]
    server = Server("grpc-server", args, LOAD_CORE, workdir)
    return server, port


# measurements


@dataclass
class Saturation:
    system: str
    load: LoadResult
    cpu_us_per_request: float  # gRPC: per call
    proxy_core_busy: float  # CPU seconds of the process(es) under test / wall seconds
    load_core_busy: float  # load generator + upstream CPU / wall seconds
    others_busy: float  # CPU of every other process on the machine / wall seconds
    idle: tuple[float, float]  # idle fraction of core 0 and core 1
    redis_cpu_us_per_request: float | None = None
    ratio_to_peer: float | None = None  # CPU per request over the peer's (see PEERS)
    latency_added_ms: tuple[float, float] | None = None  # meshgate-grpc: p50, p99 - direct's


@dataclass
class HalfLoad:
    system: str
    target_rps: float
    load: LoadResult
    direct: LoadResult | None = None  # the upstream alone at the same rate
    p99_delta_ms: float | None = None


@dataclass
class Report:
    machine: dict[str, str]
    settings: dict[str, object]
    saturation: list[Saturation] = field(default_factory=list)
    half_load: list[HalfLoad] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def saturate(
    system: str, port: int, meter: Meter, args: argparse.Namespace, workdir: Path
) -> Saturation:
    if system in H2_SYSTEMS:
        result = h2load_saturation(system, port, args, workdir, meter)
    elif system in GRPC_SYSTEMS:
        result = grpc_load(system, port, args, workdir, meter)
    else:
        wrk(port, args.connections, args.warmup, workdir)
        result = wrk(port, args.connections, args.duration, workdir, meter=meter)
    cpu, secs = result.cpu_s, result.seconds
    requests = max(result.requests, 1)
    return Saturation(
        system=system,
        load=result,
        cpu_us_per_request=cpu["measured"] * 1e6 / requests,
        proxy_core_busy=cpu["measured"] / secs,
        # Direct: the upstream is the measured process, on the load core.
        load_core_busy=(cpu["upstream" if meter.upstream else "measured"] + cpu["load"]) / secs,
        others_busy=cpu["others"] / secs,
        idle=(cpu["idle_core0"] / secs, cpu["idle_core1"] / secs),
        redis_cpu_us_per_request=cpu["redis"] * 1e6 / requests if meter.redis_pid else None,
    )


def pace_for(port: int, rate: float, connections: int, seconds: float, workdir: Path) -> float:
    """The mean pause (ms) that paces ``connections`` wrk connections to about ``rate``
    req/s: each connection's cycle is its pause plus the time its request takes, so
    ``rate = connections / (pause + service)``; short trial runs of ``seconds`` (which
    also warm the system up) measure the service time and set the pause."""
    cycle_ms = connections * 1000 / rate
    service_ms = 0.3
    for _ in range(3):
        delay = max(0.0, cycle_ms - service_ms)
        trial = wrk(port, connections, seconds, workdir, delay)
        if trial.rps <= 0 or abs(trial.rps - rate) / rate < 0.02:
            break
        service_ms = max(0.0, connections * 1000 / trial.rps - delay)
    return delay


def paced(
    port: int, rate: float, args: argparse.Namespace, workdir: Path, meter: Meter
) -> LoadResult:
    """A wrk run at about ``rate`` req/s over the saturation run's connections (the same
    count, so no system has to open connections beyond its keep-alive pool)."""
    delay = pace_for(port, rate, args.connections, args.warmup, workdir)
    return wrk(port, args.connections, args.duration, workdir, delay, meter)


# machine


def _first_line(args: list[str]) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0] if lines else "?"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


def machine(redis_version: str | None) -> dict[str, str]:
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = _first_line(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"])
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": _first_line(["nginx", "-v"]).removeprefix("nginx version: nginx/"),
        "wrk": _first_line(["wrk", "-v"]).split(" [")[0],
        "h2load": _first_line(["h2load", "--version"]),
        "redis": redis_version or "not reachable",
        "meshgate": f"{_version('meshgate')} @ {commit}"
        + (" + uncommitted src changes" if dirty not in ("", "?") else ""),
        "uvloop": _version("uvloop"),
        "httptools": _version("httptools"),
        "grpcio": _version("grpcio"),
        "loadavg": " ".join(open("/proc/loadavg").read().split()[:3]),
    }


def redis_info() -> tuple[str | None, int | None]:
    """Redis's version and pid, or (None, None) when it does not answer."""
    try:
        import redis
    except ImportError:
        return None, None
    try:
        info = redis.Redis.from_url(REDIS_URL, socket_timeout=2).info("server")
    except redis.RedisError:
        return None, None
    pid = int(info.get("process_id", 0))
    return str(info.get("redis_version")), pid if _read_stat(pid) is not None else None


def delete_keys(prefix: str) -> int:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_timeout=5)
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for i in range(0, len(keys), 500):
        client.delete(*keys[i : i + 500])
    client.close()
    return len(keys)


# output


def _f(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _busy(w: LoadResult) -> str:
    return f"{w.cpu_s['others'] / w.seconds:.0%}" if w.cpu_s else "?"


def _ratio(s: Saturation) -> str:
    if s.ratio_to_peer is None:
        return "—"
    target = CPU_TARGETS.get(s.system)
    return f"{s.ratio_to_peer:.2f}x" + ("" if target is None else f" (target ≤ {target:g}x)")


def _proxy_busy(s: Saturation) -> str:
    return "(on load core)" if s.system in ("direct", "grpc-direct") else f"{s.proxy_core_busy:.0%}"


def markdown(report: Report) -> str:
    m, settings = report.machine, report.settings
    http = [s for s in report.saturation if s.system not in GRPC_SYSTEMS]
    grpc = [s for s in report.saturation if s.system in GRPC_SYSTEMS]
    h2 = next((s.load for s in http if s.load.tool == "h2load"), None)
    load = f"wrk -t1 -c{settings['connections']}"
    if h2 is not None:
        load += (
            f" (HTTP/1.1 and HTTPS rows); h2load -t1 -c{h2.connections} -m{h2.streams} "
            f"(HTTP/2 rows, TLS, ALPN h2: the same {h2.connections * h2.streams} requests "
            "in flight)"
        )
    out = [
        f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}, "
        f"nginx {m['nginx']}, {m['wrk']}, {m['h2load']}, Redis {m['redis']}; meshgate "
        f"{m['meshgate']} (uvloop {m['uvloop']}, httptools {m['httptools']}, grpcio "
        f"{m['grpcio']}); load average {m['loadavg']}",
    ]
    if http:
        out += [
            "",
            f"Saturation: {load} for {settings['duration']} s after a {settings['warmup']} s "
            f"warm-up; load generator + upstream on core {LOAD_CORE}, proxy on core "
            f"{PROXY_CORE}.",
            "",
            "| system | req/s | p50 ms | p99 ms | CPU µs/req | ratio | non-2xx | socket errors "
            "| proxy busy | load busy | idle core 0 / 1 | other processes |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
    for s in http:
        w = s.load
        cpu = _f(s.cpu_us_per_request, 1)
        if s.redis_cpu_us_per_request is not None:
            cpu += f" (+{s.redis_cpu_us_per_request:.1f} Redis)"
        out.append(
            f"| {s.system} | {w.rps:,.0f} | {_f(w.p50_ms)} | {_f(w.p99_ms)} | {cpu} "
            f"| {_ratio(s)} | {w.non_2xx} | {w.socket_errors} | {_proxy_busy(s)} "
            f"| {s.load_core_busy:.0%} | {s.idle[0]:.0%} / {s.idle[1]:.0%} "
            f"| {s.others_busy:.0%} |"
        )
    if http:
        out += [
            "",
            "CPU µs/req: utime+stime of the process(es) under test (nginx: master + worker; "
            "direct: the upstream) over the measured run / requests completed. Ratio: "
            "against the peer, meshgate-https against nginx-gateway-https, meshgate-h2 "
            "against nginx-gateway-h2, the others against nginx-gateway. Redis's own CPU is "
            "shown apart (it runs unpinned). Busy: CPU seconds per wall second; load core = "
            "load generator + upstream; other processes = the rest of the machine's "
            "user+system CPU during the run (noise from a shared host, any core); idle: "
            "/proc/stat idle of each core (a saturated proxy leaves core 1 no idle time; "
            "softirq and hypervisor steal make busy + idle less than 100%). p50/p99 of the "
            "HTTP/2 rows: computed from h2load's per-request log.",
        ]
    if grpc:
        out += [
            "",
            f"gRPC unary: /bench.Echo/Say echoing a short message, grpc_load.py (grpc.aio) keeping "
            f"{grpc[0].load.streams} calls in flight on one channel (one HTTP/2 connection, "
            f"cleartext) for {settings['duration']} s after a {settings['warmup']} s warm-up; "
            f"client + gRPC server on core {LOAD_CORE}, meshgate on core {PROXY_CORE}.",
            "",
            "| system | calls/s | p50 ms | p99 ms | CPU µs/call | ratio | added p50 / p99 ms "
            "| not OK | proxy busy | load busy | idle core 0 / 1 | other processes |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for s in grpc:
            w = s.load
            added = "—"
            if s.latency_added_ms is not None:
                added = f"{s.latency_added_ms[0]:+.2f} / {s.latency_added_ms[1]:+.2f}"
            out.append(
                f"| {s.system} | {w.rps:,.0f} | {_f(w.p50_ms)} | {_f(w.p99_ms)} "
                f"| {_f(s.cpu_us_per_request, 1)} | {_ratio(s)} | {added} | {w.non_2xx} "
                f"| {_proxy_busy(s)} | {s.load_core_busy:.0%} "
                f"| {s.idle[0]:.0%} / {s.idle[1]:.0%} | {s.others_busy:.0%} |"
            )
        out += [
            "",
            "CPU µs/call: of the gRPC server (grpc-direct) or of meshgate (meshgate-grpc) over "
            "the measured run / calls completed. Ratio: meshgate's CPU per call over the gRPC "
            "server's own in the grpc-direct run. Added: meshgate-grpc's p50 and p99 minus "
            "grpc-direct's. The Python client and server share core 0 and saturate it at a "
            "few thousand calls/s, so calls/s and latency say more about them than about the "
            "proxy (busy and idle show which side was saturated); the proxy's CPU per call "
            "is the figure to compare.",
        ]
    if report.half_load:
        out += [
            "",
            "Half load: each system paced at ~50% of its saturation req/s over the same "
            "connections (a wrk Lua delay() drawn uniformly around a mean pause that the "
            "warm-up calibrates), then the direct upstream paced at the achieved rate.",
            "",
            "| system | target req/s | achieved req/s | pause ms | p50 ms | p99 ms "
            "| direct req/s | direct p99 ms | Δp99 ms | within 2 ms | non-2xx "
            "| other processes |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
        ]
        for h in report.half_load:
            w, d = h.load, h.direct
            within = (
                "—"
                if h.p99_delta_ms is None
                else ("yes" if h.p99_delta_ms <= HALF_LOAD_P99_TARGET_MS else "no")
            )
            out.append(
                f"| {h.system} | {h.target_rps:,.0f} | {w.rps:,.0f} | {_f(w.delay_ms)} "
                f"| {_f(w.p50_ms)} | {_f(w.p99_ms)} | {'—' if d is None else f'{d.rps:,.0f}'} "
                f"| {'—' if d is None else _f(d.p99_ms)} | {_f(h.p99_delta_ms)} | {within} "
                f"| {w.non_2xx + (d.non_2xx if d else 0)} "
                f"| {_busy(w)}{'' if d is None else ' / ' + _busy(d)} |"
            )
    if report.notes:
        out += ["", *(f"Note: {n}" for n in report.notes)]
    return "\n".join(out)


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# the run


SYSTEMS = (
    "direct",
    "nginx-proxy",
    "nginx-gateway",
    "meshgate-memory",
    "meshgate-redis",
    "nginx-gateway-https",
    "meshgate-https",
    *H2_SYSTEMS,
    *GRPC_SYSTEMS,
)


@contextmanager
def servers() -> Iterator[Callable[[Server], Server]]:
    """Track started servers; stop them all on exit, error or Ctrl-C."""
    started: list[Server] = []

    def track(server: Server) -> Server:
        started.append(server)
        return server

    try:
        yield track
    finally:
        for server in reversed(started):
            server.stop()


def preflight(systems: Collection[str] = ()) -> None:
    """Refuse to start without the tools and cores the ``systems`` need."""
    tools = [
        ("nginx", "apt-get install nginx"),
        ("wrk", "apt-get install wrk"),
        ("taskset", "apt-get install util-linux"),
    ]
    if set(systems) & set(H2_SYSTEMS):
        tools.append(("h2load", "apt-get install nghttp2-client"))
    for tool, hint in tools:
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            raise BenchError(f"{tool} is not installed: {hint}")
    # Found, not imported: grpc in this process would have to survive every fork after it.
    if set(systems) & set(GRPC_SYSTEMS) and importlib.util.find_spec("grpc") is None:
        raise BenchError("grpcio is not installed: pip install grpcio")
    if shutil.which("nginx") is None:
        os.environ["PATH"] += ":/usr/sbin"
    if len(os.sched_getaffinity(0)) < 2 or not {0, 1} <= os.sched_getaffinity(0):
        raise BenchError("needs cores 0 and 1 (the load and the proxy are pinned apart)")
    try:
        import meshgate  # noqa: F401
    except ImportError:
        raise BenchError("meshgate is not importable: pip install -e . at the repo root") from None


def run(args: argparse.Namespace) -> Report:
    preflight(args.systems)
    redis_version, redis_pid = redis_info()
    wanted = [s for s in SYSTEMS if s in args.systems]
    if args.baseline:
        # The commit to compare with, measured in the same run: right after the current one.
        at = wanted.index("meshgate-memory") + 1 if "meshgate-memory" in wanted else len(wanted)
        wanted.insert(at, f"meshgate-memory@{args.baseline}")
    report = Report(
        machine=machine(redis_version),
        settings={
            "duration": args.duration,
            "warmup": args.warmup,
            "connections": args.connections,
            "h2_streams": args.h2_streams,
            "systems": wanted,
        },
    )
    if "meshgate-redis" in wanted and redis_version is None:
        wanted.remove("meshgate-redis")
        report.notes.append(f"meshgate-redis skipped: no Redis answers at {REDIS_URL}")
    if "meshgate-redis" in wanted and redis_pid is None:
        report.notes.append("Redis's pid is not visible here: its CPU is not reported")
    workdir = Path(tempfile.mkdtemp(prefix="meshgate-bench-"))
    workdir.chmod(0o755)  # nginx workers run as nobody
    key_prefix = f"meshgate-bench-{os.getpid()}-{int(time.time())}"
    try:
        with servers() as track:
            up_port = free_port()
            upstream = track(
                start_nginx("upstream", UPSTREAM_BODY.format(port=up_port), LOAD_CORE, workdir)
            )
            wait_ready(upstream, up_port)
            verify("upstream", up_port, checks_key=False)
            grpc_upstream: tuple[Server, int] | None = None
            for system in wanted:
                own_upstream, own_port = upstream, up_port
                if system in GRPC_SYSTEMS:
                    if grpc_upstream is None:  # started for the gRPC rows only, then kept
                        grpc_upstream = start_grpc_server(workdir)
                        track(grpc_upstream[0])
                        wait_ready(*grpc_upstream, http=False)
                    own_upstream, own_port = grpc_upstream
                _measure(
                    system,
                    own_port,
                    own_upstream,
                    track,
                    args,
                    workdir,
                    report,
                    key_prefix,
                    redis_pid,
                )
    finally:
        if "meshgate-redis" in wanted:
            try:
                deleted = delete_keys(key_prefix)
                progress(f"deleted {deleted} Redis keys under {key_prefix}:")
            except Exception as exc:  # cleanup must not hide the run's own error
                progress(f"could not delete Redis keys under {key_prefix}: {exc}")
        if args.keep_tmp:
            progress(f"configurations and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], capture_output=True)
    by_system = {s.system: s for s in report.saturation}
    for s in report.saturation:
        if s.system == "grpc-direct":  # the gRPC rows compare only with each other
            continue
        peer = by_system.get(PEERS.get(s.system, "nginx-gateway"))
        if peer is not None:
            s.ratio_to_peer = s.cpu_us_per_request / peer.cpu_us_per_request
            if s.system == "meshgate-grpc":
                s.latency_added_ms = (
                    s.load.p50_ms - peer.load.p50_ms,
                    s.load.p99_ms - peer.load.p99_ms,
                )
    bad = [s.system for s in report.saturation if s.load.non_2xx or s.load.socket_errors]
    bad += [h.system + " (half load)" for h in report.half_load if h.load.non_2xx]
    if bad:
        report.notes.append(
            f"non-2xx responses (gRPC: calls not OK) or socket errors in: {', '.join(bad)}"
        )
    if not args.skip_half and set(wanted) & {*H2_SYSTEMS, *GRPC_SYSTEMS}:
        report.notes.append("no half-load run for the HTTP/2 and gRPC rows (wrk paces only)")
    return report


def _measure(
    system: str,
    up_port: int,
    upstream: Server,
    track: Callable[[Server], Server],
    args: argparse.Namespace,
    workdir: Path,
    report: Report,
    key_prefix: str,
    redis_pid: int | None,
) -> None:
    """Start ``system`` in front of ``upstream`` (nginx, or the gRPC server for the gRPC
    rows), check its answers, saturate it, and (wrk only) load it at half that rate."""
    port = free_port()
    server: Server | None = None
    if system in ("direct", "grpc-direct"):
        port, meter = up_port, Meter(upstream)
    else:
        if system == "nginx-proxy":
            body = PROXY_BODY.format(port=port, upstream=up_port)
            server = track(start_nginx(system, body, PROXY_CORE, workdir))
        elif system == "nginx-gateway":
            body = GATEWAY_BODY.format(port=port, upstream=up_port, key=KEY)
            server = track(start_nginx(system, body, PROXY_CORE, workdir))
        elif system in ("nginx-gateway-https", "nginx-gateway-h2"):
            cert, key = certificate(workdir)
            HTTPS_PORTS.add(port)
            template = GATEWAY_H2_BODY if system == "nginx-gateway-h2" else GATEWAY_HTTPS_BODY
            body = template.format(port=port, upstream=up_port, key=KEY, cert=cert, key_file=key)
            server = track(start_nginx(system, body, PROXY_CORE, workdir))
        else:
            limits = (
                f"{{backend: redis, redis_url: '{REDIS_URL}', key_prefix: {key_prefix}}}"
                if system == "meshgate-redis"
                else "{backend: memory}"
            )
            tls = None
            if system in ("meshgate-https", "meshgate-h2"):
                tls = certificate(workdir)
                HTTPS_PORTS.add(port)
            source = None
            if "@" in system:
                source = checkout(system.partition("@")[2], workdir)
            product = GRPC_PRODUCT if system == "meshgate-grpc" else ECHO_PRODUCT
            config = meshgate_config(workdir, system, port, up_port, limits, tls, product)
            server = track(start_meshgate(system, config, PROXY_CORE, workdir, source))
        meter = Meter(server, upstream, redis_pid if system == "meshgate-redis" else None)
        wait_ready(server, port)
        # The gRPC client checks its own calls before it loads (see grpc_load).
        if system not in GRPC_SYSTEMS:
            verify(system, port, checks_key=system != "nginx-proxy")
        if system in H2_SYSTEMS:
            verify_h2(system, port, workdir)
        if system.startswith("meshgate"):
            status, _ = get(admin_port(workdir / f"{system}.yaml"), None, path="/metrics")
            if status != 200:
                raise BenchError(f"{system}: the admin listener's /metrics answered {status}")
    progress(f"{system}: saturation, {args.connections} in flight, {args.duration:g} s")
    sat = saturate(system, port, meter, args, workdir)
    meter.measured.check_alive()
    report.saturation.append(sat)
    progress(
        f"{system}: {sat.load.rps:,.0f} req/s, p99 {sat.load.p99_ms:.2f} ms, "
        f"{sat.cpu_us_per_request:.1f} µs CPU/req"
    )
    if not args.skip_half and sat.load.tool == "wrk":
        target = sat.load.rps / 2
        progress(f"{system}: half load, {target:,.0f} req/s")
        half = HalfLoad(system, target, paced(port, target, args, workdir, meter))
        if system != "direct":
            half.direct = paced(up_port, half.load.rps, args, workdir, Meter(upstream))
            half.p99_delta_ms = half.load.p99_ms - half.direct.p99_ms
        report.half_load.append(half)
    if server is not None:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, default=2, help="seconds of warm-up per run")
    parser.add_argument(
        "--connections",
        type=int,
        default=50,
        help="requests in flight at saturation: wrk connections, h2load connections x "
        "streams, gRPC calls",
    )
    parser.add_argument(
        "--h2-streams",
        type=int,
        default=5,
        help="h2load streams per connection (-m); connections: --connections / this",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help=f"comma-separated subset of {','.join(SYSTEMS)}",
    )
    parser.add_argument("--skip-half", action="store_true", help="skip the half-load runs")
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also measure meshgate-memory as of this git revision (a worktree in the "
        "temporary directory), right after the current one",
    )
    parser.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    args = parser.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    # SIGTERM unwinds like Ctrl-C, and Ctrl-C works even where SIGINT was ignored (a
    # background job), so the servers are always stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        report = run(args)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        return 130
    print(markdown(report))
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(report), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
