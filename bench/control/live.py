#!/usr/bin/env python3
"""Snapshot swap under load: a real control plane, gateway and upstream on loopback.

The store holds the full model (seed.py). ``python -m meshgate control`` publishes it, a
``python -m meshgate gateway --control-plane`` pulls it, and an open-loop client sends a
constant rate of keyed requests through the gateway to the demo echo upstream. After a
steady period, an application is created through the admin API: the control plane
recompiles and publishes production, and the gateway downloads, decodes and swaps in the
new snapshot while the requests keep coming. For each swap: the time from the API call to
publication, from publication to the gateway running it, and the latency of the requests
in flight during the swap (publication to applied + 1 s) against the steady period before.

The gateway has core 1 to itself; the client, the upstream, the control plane and this
script share core 0. The gateway, client and upstream run at nice -10 (``--nice``) and the
control plane at half that, ahead of whatever else runs on the machine. Not a pass/fail
test; see README.md. Run through ``run.py --live``, or alone (seeds its own store):
``python live.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import http.client
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

from meshgate.config import new_admin_token

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
LOAD_CORE = "0"  # the client, the upstream, the control plane and this script
GATEWAY_CORE = "1"  # the gateway, alone
COMPILE_TARGET_S = 2.0  # the targets
APPLY_TARGET_S = 1.0
P99_RATIO_TARGET = 2.0  # p99 during the swap within 2x of p99 before
SWAP_TAIL_S = 1.0  # the swap window ends this long after the gateway applied
AFTER_S = 3.0  # then this window, for what follows a swap (cache write, collections)
HOST = "p0.example.com"  # product-0 (seed.py)
PATH = "/v1/resource-0/42"  # its first mapping rule (metric method-0)
PLAN = "bench-unlimited"  # a plan with no limits on product-0: nothing is refused
SAMPLE_S = 0.01  # the gateway threads' CPU is sampled this often during a swap
PROFILE_RATE = 100  # py-spy samples a second (--profile)
PAUSE_S = 0.05  # no response for this long (25 due at 500 req/s) is a stall


def _load_gateway_bench() -> ModuleType:
    """bench/gateway/run.py: its child-process handling and /proc readers, reused."""
    spec = importlib.util.spec_from_file_location("gateway_bench", REPO / "bench/gateway/run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


gb = _load_gateway_bench()
BenchError = gb.BenchError
free_port = gb.free_port
progress = gb.progress


# the client, in a process of its own on the load core


def _response_status(head: bytes) -> tuple[int, int | None, bool]:
    """Status, Content-Length (None when chunked), and whether the connection closes."""
    lower = head.lower()
    status = int(head[9:12])
    closes = b"\r\nconnection: close" in lower
    i = lower.find(b"\r\ncontent-length:")
    if i >= 0:
        return status, int(lower[i + 17 : lower.index(b"\r\n", i + 2)]), closes
    if b"\r\ntransfer-encoding: chunked" in lower:
        return status, None, closes
    return status, 0, True


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    status, length, closes = _response_status(await reader.readuntil(b"\r\n\r\n"))
    if length is not None:
        await reader.readexactly(length)
        return status, closes
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        await reader.readexactly(size + 2)
        if size == 0:
            return status, closes


async def generate(opts: argparse.Namespace) -> None:
    """Send ``rate`` requests a second until SIGTERM, whatever the answers take.

    A ticker releases each request at its time into a queue that ``connections`` keep-alive
    connections take from: a stalled gateway does not slow the arrivals down, the requests
    wait (open loop). Per request: its ideal time, released, sent, done (monotonic) and
    status (0: no answer), written to ``out`` at the end.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    request = (
        f"GET {opts.path} HTTP/1.1\r\nHost: {opts.host}\r\nX-API-Key: {opts.key}\r\n\r\n"
    ).encode()
    queue: asyncio.Queue[tuple[float, float] | None] = asyncio.Queue()
    times = array("d")
    statuses = array("h")

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", opts.port)

    async def worker() -> None:
        conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = await connect()
        while (item := await queue.get()) is not None:
            ideal, released = item
            sent = time.monotonic()
            status, closes = 0, True
            try:
                if conn is None:
                    conn = await connect()
                async with asyncio.timeout(opts.timeout):
                    conn[1].write(request)
                    status, closes = await _read_response(conn[0])
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                pass
            times.extend((ideal, released, sent, time.monotonic()))
            statuses.append(status)
            if closes and conn is not None:
                conn[1].close()
                conn = None
        if conn is not None:
            conn[1].close()

    workers = [loop.create_task(worker()) for _ in range(opts.connections)]
    print("ready", flush=True)
    interval = 1.0 / opts.rate
    start = time.monotonic()
    n = 0
    while not stop.is_set():
        now = time.monotonic()
        while (ideal := start + n * interval) <= now:
            queue.put_nowait((ideal, now))
            n += 1
        # Timers have ms resolution: the lag of each release is recorded, not hidden.
        await asyncio.sleep(max(0.001, ideal - time.monotonic()))
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.wait(workers, timeout=opts.timeout + 5)
    Path(opts.out).write_bytes(times.tobytes())
    Path(opts.out + ".status").write_bytes(statuses.tobytes())


def _generator_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    for name, kind in (("port", int), ("rate", float), ("connections", int), ("timeout", float)):
        parser.add_argument(f"--{name}", type=kind, required=True)
    for name in ("host", "path", "key", "out"):
        parser.add_argument(f"--{name}", required=True)
    import uvloop

    uvloop.run(generate(parser.parse_args(argv)))


@dataclass
class Requests:
    """What the client recorded: per request ideal, released, sent, done; and status."""

    times: array[float]
    statuses: array[int]
    completions: list[float] = field(default_factory=list)  # done times, in order

    @classmethod
    def read(cls, path: Path) -> Requests:
        times, statuses = array("d"), array("h")
        times.frombytes(path.read_bytes())
        statuses.frombytes(Path(str(path) + ".status").read_bytes())
        return cls(times, statuses, sorted(times[3::4]))

    def pauses(self, start: float, end: float, origin: float, min_s: float) -> list[Pause]:
        """Stretches of at least ``min_s`` within [start, end) in which no response came
        back although requests were due: the gateway was stalled (or the client starved:
        see its release lag). Times in seconds after ``origin``."""
        done = self.completions
        i = bisect.bisect_left(done, start)
        out: list[Pause] = []
        while i + 1 < len(done) and done[i] < end:
            if done[i + 1] - done[i] >= min_s:
                if out and done[i] - origin - out[-1].end_s < min_s / 5:
                    out[-1].end_s = done[i + 1] - origin  # a response or two in between
                else:
                    out.append(Pause(done[i] - origin, done[i + 1] - origin))
            i += 1
        return out

    def longest_pause(self, start: float, end: float) -> float:
        done = self.completions
        lo, hi = bisect.bisect_left(done, start), bisect.bisect_left(done, end)
        return max((b - a for a, b in zip(done[lo:hi], done[lo + 1 : hi], strict=False)), default=0)

    def __len__(self) -> int:
        return len(self.statuses)

    def window(self, start: float, end: float) -> Window:
        """The requests in flight at any time in [start, end): released before its end and
        done after its start."""
        t, latencies, lags, failed = self.times, [], [], 0
        for i, status in enumerate(self.statuses):
            ideal, released, done = t[4 * i], t[4 * i + 1], t[4 * i + 3]
            if released < end and done > start:
                latencies.append(done - released)
                lags.append(released - ideal)
                failed += not 200 <= status < 300
        return Window.of(end - start, latencies, lags, failed)


def _percentile(ordered: list[float], q: float) -> float:
    """Nearest rank."""
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


@dataclass
class Window:
    seconds: float
    requests: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    non_2xx: int  # including requests with no answer
    release_lag_p99_ms: float  # the client's own timer lag: large means a starved client

    @classmethod
    def of(cls, seconds: float, latencies: list[float], lags: list[float], failed: int) -> Window:
        if not latencies:
            return cls(seconds, 0, 0.0, 0.0, 0.0, failed, 0.0)
        ordered, lags = sorted(latencies), sorted(lags)
        return cls(
            seconds=seconds,
            requests=len(ordered),
            p50_ms=_percentile(ordered, 0.5) * 1e3,
            p99_ms=_percentile(ordered, 0.99) * 1e3,
            max_ms=ordered[-1] * 1e3,
            non_2xx=failed,
            release_lag_p99_ms=_percentile(lags, 0.99) * 1e3,
        )


@dataclass
class Pause:
    """No response from ``start_s`` to ``end_s`` (seconds after publication)."""

    start_s: float
    end_s: float
    # The gateway's CPU (all threads) over the pause, in cores: near 1 it was busy (stalled
    # by its own work); near 0 it did not run (preempted by other processes, or idle).
    gateway_cpu: float | None = None


# the gateway's threads during a swap


@dataclass
class Segment:
    """A stretch where one kind of gateway thread was busy; seconds after publication."""

    thread: str  # "loop" (the main thread) or "worker" (the others: to_thread)
    start_s: float
    end_s: float
    cpu_s: float


class ThreadSampler:
    """Samples the CPU ticks of the gateway's threads (/proc/PID/task) every SAMPLE_S."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.samples: list[tuple[float, int, int]] = []  # time, loop ticks, worker ticks
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> tuple[float, int, int]:
        loop_ticks = workers = 0
        try:
            tids = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            tids = []
        for tid in tids:
            try:
                with open(f"/proc/{self.pid}/task/{tid}/stat") as f:
                    text = f.read()
            except OSError:
                continue
            stat = text[text.rindex(")") + 2 :].split()
            ticks = int(stat[11]) + int(stat[12])
            if int(tid) == self.pid:
                loop_ticks = ticks
            else:
                workers += ticks
        return time.monotonic(), loop_ticks, workers

    def start(self) -> None:
        def run() -> None:
            while not self._stop.is_set():
                self.samples.append(self._read())
                self._stop.wait(SAMPLE_S)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def cpu(self, start: float, end: float) -> float | None:
        """The gateway's CPU seconds per second over [start, end], to the sampling tick."""
        inside = [x for x in self.samples if start - SAMPLE_S <= x[0] <= end + SAMPLE_S]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return None
        ticks = (inside[-1][1] + inside[-1][2]) - (inside[0][1] + inside[0][2])
        return ticks / os.sysconf("SC_CLK_TCK") / (inside[-1][0] - inside[0][0])

    def segments(self, origin: float, gap_s: float = 0.05) -> list[Segment]:
        """Busy stretches (over half a core) of the loop and of the worker threads."""
        tick_s = 1.0 / os.sysconf("SC_CLK_TCK")
        out: list[Segment] = []
        for column, name in ((1, "loop"), (2, "worker")):
            current: list[float] | None = None  # start, end, cpu
            for a, b in zip(self.samples, self.samples[1:], strict=False):
                cpu = (b[column] - a[column]) * tick_s
                if cpu < 0.5 * (b[0] - a[0]):
                    continue
                if current is not None and a[0] - current[1] <= gap_s:
                    current[1], current[2] = b[0], current[2] + cpu
                else:
                    if current is not None:
                        out.append(Segment(name, *current))
                    current = [a[0], b[0], cpu]
            if current is not None:
                out.append(Segment(name, *current))
        out = [s for s in out if s.end_s - s.start_s >= 0.03]
        for s in out:
            s.start_s -= origin
            s.end_s -= origin
        return sorted(out, key=lambda s: s.start_s)


# talking to the control plane and the gateway


class Api:
    """The control plane's admin API with the bench's token (stdlib HTTP)."""

    def __init__(self, port: int, token: str) -> None:
        self.port, self.token = port, token

    def call(self, method: str, path: str, body: object = None) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            headers = {"Authorization": f"Bearer {self.token}"}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            conn.request(method, f"/admin/api{path}", body=data, headers=headers)
            response = conn.getresponse()
            text = response.read()
        finally:
            conn.close()
        if response.status >= 300:
            raise BenchError(f"{method} {path} answered {response.status}: {text[:300]!r}")
        return json.loads(text) if text else None

    def versions(self) -> dict[str, int | None]:
        return {env["name"]: env["version"] for env in self.call("GET", "/environments")}


def get_json(port: int, path: str, timeout: float = 10.0) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return json.loads(response.read())
    finally:
        conn.close()


def keyed_get(port: int, key: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", PATH, headers={"Host": HOST, "X-API-Key": key})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def wait_until(what: str, check: Callable[[], bool], servers: list[Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        for server in servers:
            server.check_alive()
        try:
            if check():
                return
        except (OSError, http.client.HTTPException, ValueError):
            pass
        if time.monotonic() > deadline:
            logs = "\n".join(f"{s.name}:\n{s.log_tail()}" for s in servers)
            raise BenchError(f"{what} not within {timeout:g} s; logs:\n{logs}")
        time.sleep(0.02)


_PUBLISHED = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO meshgate\.control: "
    r"(\w+) snapshot version (\d+) \((\d+) bytes\)",
    re.M,
)


def published(log: Path, env: str, version: int) -> tuple[float, int] | None:
    """When (time.time()) the control plane logged storing ``env`` ``version``, and its size."""
    for stamp, name, found, size in _PUBLISHED.findall(log.read_text(errors="replace")):
        if name == env and int(found) == version:
            # The log's local time, to the millisecond.
            return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp(), int(size)
    return None


# the run


@dataclass
class Swap:
    version: int
    size_bytes: int
    call_to_published_s: float  # admin API call -> production stored (compile + publish)
    published_to_applied_s: float  # -> the gateway serves it (download, decode, build)
    before: Window  # the steady period before the call
    compile: Window  # call -> published
    swap: Window  # published -> applied + SWAP_TAIL_S
    after: Window  # the AFTER_S that follow
    p99_ratio: float  # swap p99 / before p99
    pauses: list[Pause] = field(default_factory=list)  # >= PAUSE_S, from before to after
    before_longest_pause_ms: float = 0.0  # the same measure in the steady period
    gateway_rss_mb: float = 0.0  # resident memory once the swap is over
    threads: list[Segment] = field(default_factory=list)


@dataclass
class LiveReport:
    machine: dict[str, str]
    settings: dict[str, Any]
    gateway_start_s: float = 0.0  # process start -> the first snapshot served (no load)
    gateway_rss_mb: float = 0.0  # resident memory under load before the first swap
    gateway_peak_rss_mb: float = 0.0  # the most since it started (VmHWM)
    swaps: list[Swap] = field(default_factory=list)
    total_requests: int = 0
    total_non_2xx: int = 0
    achieved_rps: float = 0.0
    others_busy: float = 0.0  # CPU of other processes on the machine, cores
    medians: dict[str, float] = field(default_factory=dict)
    profile: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def machine() -> dict[str, str]:
    model = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "meshgate": gb._version("meshgate"),
        "uvloop": gb._version("uvloop"),
        "loadavg": " ".join(open("/proc/loadavg").read().split()[:3]),
    }


SETTINGS = """\
listen: 127.0.0.1:{port}
admin_listen: 127.0.0.1:{admin}
limits: {{backend: memory}}
access_log: false
"""


def _meshgate(*args: str) -> list[str]:
    return [sys.executable, "-m", "meshgate", *args]


def measure(url: str, echo_port: int, args: argparse.Namespace, workdir: Path) -> LiveReport:
    """The swap under load against the store at ``url``, whose backends point at
    127.0.0.1:``echo_port``."""
    if not {0, 1} <= os.sched_getaffinity(0):
        raise BenchError("needs cores 0 and 1 (the gateway and the load are pinned apart)")
    if shutil.which("taskset") is None:
        raise BenchError("taskset is not installed: apt-get install util-linux")
    affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    report = LiveReport(
        machine=machine(),
        settings={
            "rate": args.rate,
            "connections": args.connections,
            "steady_s": args.steady,
            "swaps": args.swaps,
            "nice": args.nice,
            "swap_window": f"published -> applied + {SWAP_TAIL_S:g} s",
        },
    )
    try:
        with gb.servers() as track:
            _run(url, echo_port, args, workdir, report, track)
    finally:
        os.sched_setaffinity(0, affinity)
    swaps = report.swaps
    if swaps:
        report.medians = {
            "call_to_published_s": statistics.median(s.call_to_published_s for s in swaps),
            "published_to_applied_s": statistics.median(s.published_to_applied_s for s in swaps),
            "before_p99_ms": statistics.median(s.before.p99_ms for s in swaps),
            "swap_p99_ms": statistics.median(s.swap.p99_ms for s in swaps),
            "swap_max_ms": statistics.median(s.swap.max_ms for s in swaps),
            "p99_ratio": statistics.median(s.p99_ratio for s in swaps),
        }
    return report


def _run(
    url: str,
    echo_port: int,
    args: argparse.Namespace,
    workdir: Path,
    report: LiveReport,
    track: Callable[[Any], Any],
) -> None:
    token = new_admin_token()
    # The gateway, the client and the upstream ahead of other work on the machine (a
    # shared host).
    nice = ["nice", "-n", str(args.nice)] if args.nice else []
    echo_args = [*nice, *_meshgate("echo", f"127.0.0.1:{echo_port}")]
    echo = track(gb.Server("echo", echo_args, LOAD_CORE, workdir))
    prioritize(echo.pid, args.nice, report)
    cp_port = free_port()
    control_args = ["--database-url", url, "--listen", f"127.0.0.1:{cp_port}"]
    control_args += ["--admin-token", token]
    # Half as far ahead: before the rest of the machine, behind the client it shares core 0
    # with (its compile is measured, not the client's patience).
    control_nice = ["nice", "-n", str(args.nice // 2)] if args.nice else []
    control = track(
        gb.Server(
            "control", [*control_nice, *_meshgate("control", *control_args)], LOAD_CORE, workdir
        )
    )
    prioritize(control.pid, args.nice // 2, report)
    api = Api(cp_port, token)
    progress("control plane: migrating and publishing both environments")
    wait_until(
        "the control plane's first snapshots",
        lambda: all(api.versions().values()),
        [control, echo],
        300,
    )

    port, admin = free_port(), free_port()
    settings = workdir / "settings.yaml"
    settings.write_text(SETTINGS.format(port=port, admin=admin))
    started = time.monotonic()
    gateway_args = ["--control-plane", f"http://127.0.0.1:{cp_port}", "--token", token]
    gateway_args += ["--env", "production", "--config", str(settings)]
    gateway_args += ["--cache-dir", str(workdir / "cache"), "--name", "bench"]
    gateway = track(
        gb.Server("gateway", [*nice, *_meshgate("gateway", *gateway_args)], GATEWAY_CORE, workdir)
    )
    prioritize(gateway.pid, args.nice, report)
    servers = [echo, control, gateway]

    def gateway_version() -> str | None:
        return get_json(admin, "/config").get("version")

    wait_until("the gateway's first snapshot", lambda: gateway_version() is not None, servers, 300)
    report.gateway_start_s = time.monotonic() - started

    # A key in clear, on a plan with no limits, so that nothing is refused.
    product = api.call("GET", "/products?name=product-0")["items"][0]["id"]
    plan = api.call("POST", f"/products/{product}/plans", {"name": PLAN, "state": "published"})
    account = api.call("GET", "/accounts?per_page=1")["items"][0]["id"]
    app = {"account_id": account, "plan_id": plan["id"], "name": "bench-load"}
    key = api.call("POST", "/applications", app)["key"]
    progress("waiting for the gateway to serve the bench's key")
    wait_until("the bench key served", lambda: keyed_get(port, key) == 200, servers, 300)
    settle(api, gateway_version, servers)

    out = workdir / "requests.bin"
    # name=value: a key may begin with "-"
    load_args = [f"--port={port}", f"--rate={args.rate}", f"--host={HOST}", f"--path={PATH}"]
    load_args += [f"--key={key}", f"--connections={args.connections}", "--timeout=30"]
    load_args += [f"--out={out}"]
    load = subprocess.Popen(
        ["taskset", "-c", LOAD_CORE, *nice, sys.executable, __file__, "generate", *load_args],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=gb._die_with_parent,
    )
    prioritize(load.pid, args.nice, report)
    profiler: subprocess.Popen[bytes] | None = None
    try:
        assert load.stdout is not None
        if load.stdout.readline().strip() != b"ready":
            raise BenchError("the load generator did not start")
        progress(f"load: {args.rate:g} req/s over {args.connections} connections")
        if args.profile is not None:
            profiler = start_profiler(gateway.pid, args.profile)
        report.gateway_rss_mb = memory_mb(gateway.pid, "VmRSS")
        ticks0 = (gb._machine_ticks()[0], _our_ticks(servers, load.pid))
        load_started = time.monotonic()
        time.sleep(args.warmup)
        timeline = []
        for i in range(args.swaps):
            sampler = ThreadSampler(gateway.pid)
            sampler.start()
            time.sleep(args.steady)
            timeline.append(swap(i, api, account, plan["id"], admin, control, sampler, servers))
            progress(
                f"swap {i + 1}: version {timeline[-1]['version']}, published "
                f"{timeline[-1]['published'] - timeline[-1]['call']:.2f} s after the call, "
                f"applied {timeline[-1]['applied'] - timeline[-1]['published']:.2f} s later"
            )
            settle(api, gateway_version, servers)
        ticks1 = (gb._machine_ticks()[0], _our_ticks(servers, load.pid))
        report.gateway_peak_rss_mb = memory_mb(gateway.pid, "VmHWM")
        load_seconds = time.monotonic() - load_started
    finally:
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            profiler.wait(60)
        load.send_signal(signal.SIGTERM)
        load.wait(60)
    if args.profile is not None:
        report.profile = summarize_profile(args.profile, PROFILE_RATE)
        report.notes.append(
            "py-spy stops the gateway for each sample: the latencies of a profiled run are "
            "not the gateway's own"
        )
    requests = Requests.read(out)
    report.total_requests = len(requests)
    report.total_non_2xx = sum(not 200 <= s < 300 for s in requests.statuses)
    report.achieved_rps = len(requests) / max(load_seconds, 1e-9)
    tick_s = 1.0 / os.sysconf("SC_CLK_TCK")
    others = (ticks1[0] - ticks0[0]) - (ticks1[1] - ticks0[1])
    report.others_busy = max(0.0, others * tick_s / load_seconds)
    for t in timeline:
        before = requests.window(t["call"] - args.steady, t["call"])
        swap_end = t["applied"] + SWAP_TAIL_S
        during = requests.window(t["published"], swap_end)
        report.swaps.append(
            Swap(
                version=t["version"],
                size_bytes=t["size"],
                call_to_published_s=t["published"] - t["call"],
                published_to_applied_s=t["applied"] - t["published"],
                before=before,
                compile=requests.window(t["call"], t["published"]),
                swap=during,
                after=requests.window(swap_end, swap_end + AFTER_S),
                p99_ratio=during.p99_ms / before.p99_ms if before.p99_ms else 0.0,
                pauses=[
                    replace(
                        pause,
                        gateway_cpu=t["cpu"].cpu(
                            t["published"] + pause.start_s, t["published"] + pause.end_s
                        ),
                    )
                    for pause in requests.pauses(
                        t["call"] - args.steady, swap_end + AFTER_S, t["published"], PAUSE_S
                    )
                ],
                before_longest_pause_ms=requests.longest_pause(t["call"] - args.steady, t["call"])
                * 1e3,
                threads=t["threads"],
                gateway_rss_mb=t["rss"],
            )
        )
    if report.total_non_2xx:
        report.notes.append(f"{report.total_non_2xx} requests failed or were not 2xx")
    if report.achieved_rps < 0.95 * args.rate:
        report.notes.append(f"the client reached {report.achieved_rps:,.0f} req/s only")


def prioritize(pid: int, nice: int, report: LiveReport) -> None:
    """Give the session of ``pid`` the ``nice`` value. Each server runs in a session of its
    own, and with autogroup scheduling (the Linux default) a nice value only orders the
    processes of one session: across sessions the session's own value counts."""
    if not nice:
        return
    try:
        with open(f"/proc/{pid}/autogroup", "w") as f:
            f.write(str(nice))
    except FileNotFoundError:
        pass  # no autogroup scheduling: the process's own nice value is enough
    except OSError as exc:
        note = f"cannot set the sessions' nice value to {nice}: {exc.strerror}"
        if note not in report.notes:
            report.notes.append(note)


def memory_mb(pid: int, field: str) -> float:
    """VmRSS (resident now) or VmHWM (the most resident since start) of a process."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return 0.0


def _our_ticks(servers: list[Any], load_pid: int) -> int:
    """CPU ticks of every process of this run: the servers, the client, this script."""
    return (
        sum(s.cpu_ticks() for s in servers) + gb._cpu_ticks(load_pid) + gb._cpu_ticks(os.getpid())
    )


def settle(api: Api, gateway_version: Callable[[], str | None], servers: list[Any]) -> None:
    """Until nothing moves: both environments published, the gateway on production's
    latest, for a second."""
    last: tuple[Any, ...] | None = None
    since = time.monotonic()
    deadline = since + 120
    while True:
        for server in servers:
            server.check_alive()
        versions = api.versions()
        now = (versions["production"], versions["staging"], gateway_version())
        if now != last:
            last, since = now, time.monotonic()
        elif now[2] == str(now[0]) and time.monotonic() - since >= 1.0:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"the control plane and gateway do not settle: {now}")
        time.sleep(0.1)


def swap(
    i: int,
    api: Api,
    account: int,
    plan: int,
    admin: int,
    control: Any,
    sampler: ThreadSampler,
    servers: list[Any],
) -> dict[str, Any]:
    """Create an application; return when (monotonic) the call was made, production was
    published and the gateway applied it, with the gateway's threads from the start of
    ``sampler`` (the steady period before) to the end of the swap's windows."""
    old = get_json(admin, "/config")["version"]
    offset = time.time() - time.monotonic()
    call = time.monotonic()
    api.call("POST", "/applications", {"account_id": account, "plan_id": plan, "name": f"swap-{i}"})
    config: dict[str, Any] = {}

    def applied() -> bool:
        config.update(get_json(admin, "/config"))
        return config["version"] != old

    wait_until("the gateway applying the new snapshot", applied, servers, 120)
    version = int(config["version"])
    applied_at = config["loaded_at"] - offset
    time.sleep(max(0.0, applied_at + SWAP_TAIL_S + AFTER_S - time.monotonic()))
    sampler.stop()
    stored = None
    deadline = time.monotonic() + 10
    while stored is None and time.monotonic() < deadline:
        stored = published(control.log_path, "production", version)
        time.sleep(0.05)
    if stored is None:
        raise BenchError(f"no 'production snapshot version {version}' line in {control.log_path}")
    published_at = stored[0] - offset
    return {
        "version": version,
        "size": stored[1],
        "call": call,
        "published": published_at,
        "applied": applied_at,
        "threads": sampler.segments(published_at),
        "cpu": sampler,
        "rss": memory_mb(sampler.pid, "VmRSS"),
    }


# profiling (py-spy, optional)


def start_profiler(pid: int, path: Path) -> subprocess.Popen[bytes]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        raise BenchError("--profile needs py-spy: pip install py-spy")
    path.parent.mkdir(parents=True, exist_ok=True)
    command = [spy, "record", "--pid", str(pid), "--rate", str(PROFILE_RATE), "--native"]
    command += ["--threads", "--format", "raw", "--output", str(path)]
    return subprocess.Popen(
        ["taskset", "-c", LOAD_CORE, *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=gb._die_with_parent,
    )


def _profile_bucket(stack: str) -> str:
    """What one py-spy sample (``--native``) of the gateway was doing."""
    if "MainThread" not in stack.partition(";")[0]:
        if "gc_collect_main" in stack:
            return "worker: garbage collection (holds the GIL)"
        for needle, name in (
            ("_parse_body", "worker: json.loads of the snapshot"),
            ("merge_snapshot", "worker: validate + merge"),
            ("write_cache", "worker: cache write (json.dump)"),
        ):
            if needle in stack:
                if "pthread_cond_timedwait" in stack:
                    return name + ", waiting for the GIL"
                return name
        return "worker: idle" if "_WorkItem.run" not in stack else "worker: other"
    if "gc_collect_main" in stack:
        return "loop: garbage collection"
    if "GatewayProcess.apply" in stack:
        return "loop: build + swap (GatewayProcess.apply)"
    if "pthread_cond_timedwait" in stack:
        return "loop: waiting for the GIL"
    if "ControlPlaneSync" in stack:
        return "loop: snapshot download (control-plane client)"
    if stack.rpartition(";")[2].startswith(("epoll", "uv__io_poll")):
        return "loop: idle (epoll)"
    return "loop: serving requests"


def summarize_profile(path: Path, rate: float) -> dict[str, float]:
    """Seconds of samples per activity, from py-spy's raw (collapsed) output."""
    samples: Counter[str] = Counter()
    if not path.exists():
        return {}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if count.isdigit():
            samples[_profile_bucket(stack)] += int(count)
    return {name: n / rate for name, n in sorted(samples.items())}


# output


def _ran(cpu: float | None) -> str:
    """How much the gateway ran during a pause: its own work, or it was off the CPU."""
    if cpu is None:
        return ""
    return f" ({'busy' if cpu >= 0.6 else 'off CPU' if cpu <= 0.2 else f'{cpu:.0%} CPU'})"


def _ms(value: float) -> str:
    return f"{value:.2f}"


def markdown(report: LiveReport) -> str:
    m, s = report.machine, report.settings
    out = [
        f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}, "
        f"meshgate {m['meshgate']} (uvloop {m['uvloop']}); load average {m['loadavg']}; "
        f"other processes {report.others_busy:.2f} cores during the load",
        "",
        f"Load: {s['rate']:g} req/s open loop over {s['connections']} keep-alive connections "
        f"(achieved {report.achieved_rps:,.0f}); gateway on core {GATEWAY_CORE}, client, "
        f"upstream (these three at nice {s['nice']}) and the control plane (nice "
        f"{s['nice'] // 2}) on core {LOAD_CORE}. "
        f"Gateway start to first snapshot served: {report.gateway_start_s:.2f} s; its resident "
        f"memory {report.gateway_rss_mb:.0f} MB under load, "
        f"{', '.join(f'{w.gateway_rss_mb:.0f}' for w in report.swaps)} MB after each swap, "
        f"{report.gateway_peak_rss_mb:.0f} MB at most.",
        "",
        "| swap | version | MB | call → published s | published → applied s | before p50 / p99 / "
        "max ms | compile p99 / max ms | swap p50 / p99 / max ms | p99 swap / before | after "
        "p99 / max ms | non-2xx |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n, w in enumerate(report.swaps, 1):
        b, c, d, a = w.before, w.compile, w.swap, w.after
        failed = b.non_2xx + c.non_2xx + d.non_2xx + a.non_2xx
        out.append(
            f"| {n} | {w.version} | {w.size_bytes / 1e6:.1f} | {w.call_to_published_s:.2f} "
            f"| {w.published_to_applied_s:.2f} | {_ms(b.p50_ms)} / {_ms(b.p99_ms)} / "
            f"{_ms(b.max_ms)} | {_ms(c.p99_ms)} / {_ms(c.max_ms)} | {_ms(d.p50_ms)} / "
            f"{_ms(d.p99_ms)} / {_ms(d.max_ms)} | {w.p99_ratio:.1f}x | {_ms(a.p99_ms)} / "
            f"{_ms(a.max_ms)} | {failed} |"
        )
    md = report.medians
    if md:
        apply_s = md["published_to_applied_s"]
        out += [
            "",
            f"Medians: compile + publish {md['call_to_published_s']:.2f} s "
            f"({md['call_to_published_s'] / COMPILE_TARGET_S:.2f}x the {COMPILE_TARGET_S:g} s "
            f"target, 50 ms of it the control plane's coalescing delay); gateway apply "
            f"{apply_s:.2f} s ({apply_s / APPLY_TARGET_S:.2f}x "
            f"the {APPLY_TARGET_S:g} s target); p99 {md['before_p99_ms']:.2f} ms before, "
            f"{md['swap_p99_ms']:.2f} ms during the swap: {md['p99_ratio']:.1f}x (target ≤ "
            f"{P99_RATIO_TARGET:g}x); worst request during the swap {md['swap_max_ms']:.0f} ms; "
            f"{report.total_non_2xx} of {report.total_requests:,} requests not 2xx.",
        ]
    out += [
        "",
        "Windows: before = the steady seconds before the admin API call; compile = call → "
        "production stored (the control-plane log's time); swap = stored → the gateway's "
        f"/config loaded_at + {SWAP_TAIL_S:g} s; after = the {AFTER_S:g} s that follow. A request "
        "counts in every window it was in flight in; latency from its release by the client's "
        "ticker to the end of the response.",
        "",
        f"Per swap, in seconds after publication (negative: before it), from the start of "
        "the steady period to the end of the after window: the gateway's threads busy over "
        "half a core (/proc ticks; loop = the event loop's thread, worker = the to_thread "
        f"pool), and the pauses of {PAUSE_S * 1e3:.0f} ms or more in which no response came "
        "back (busy: the gateway used a core meanwhile, a stall of its own; off CPU: it was "
        "preempted, or had nothing to do because the client or the upstream were); the "
        "client's release lag p99 before and during the swap (its own timer: large means the "
        "client was starved, not the gateway):",
        "",
    ]
    for n, w in enumerate(report.swaps, 1):
        busy = [f"{t.thread} {t.start_s:.2f}–{t.end_s:.2f}" for t in w.threads if t.cpu_s >= 0.04]
        pauses = [f"{p.start_s:.2f}–{p.end_s:.2f}{_ran(p.gateway_cpu)}" for p in w.pauses]
        out.append(
            f"- swap {n}: called at {-w.call_to_published_s:.2f}, applied at "
            f"{w.published_to_applied_s:.2f}; busy "
            + (", ".join(busy) or "—")
            + "; no response "
            + (", ".join(pauses) or "—")
            + f"; release lag {w.before.release_lag_p99_ms:.1f} / "
            f"{w.swap.release_lag_p99_ms:.1f} ms"
        )
    if report.profile:
        total = sum(report.profile.values())
        out += [
            "",
            "py-spy (--native, --threads) samples of the gateway from the first swap's steady "
            "period to the last swap's end, seconds per thread and activity:",
            "",
        ]
        out += [f"- {k}: {v:.2f} s ({v / total:.0%})" for k, v in report.profile.items()]
    if report.notes:
        out += ["", *(f"Note: {n}" for n in report.notes)]
    return "\n".join(out)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("live (swap under load)")
    group.add_argument("--rate", type=float, default=500, help="requests a second (open loop)")
    group.add_argument("--connections", type=int, default=32, help="client connections")
    group.add_argument("--swaps", type=int, default=5, help="snapshots swapped in under load")
    group.add_argument("--steady", type=float, default=5, help="steady seconds before each")
    group.add_argument("--warmup", type=float, default=2, help="seconds of load before all")
    group.add_argument(
        "--nice",
        type=int,
        default=-10,
        help="nice value of the gateway, client and upstream (below 0 needs root)",
    )
    group.add_argument(
        "--profile", type=Path, help="record the gateway with py-spy (raw stacks) to this file"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["generate"]:
        _generator_main(argv[1:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--keep-tmp", action="store_true", help="keep the store, logs, cache")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    from seed import Size, seed

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = Path(tempfile.mkdtemp(prefix="meshgate-live-"))
    try:
        echo_port = free_port()
        url = f"sqlite:///{workdir}/control.db"
        progress("seeding the store")
        seed(url, Size(), backend=f"http://127.0.0.1:{echo_port}")
        report = measure(url, echo_port, args, workdir)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep_tmp:
            progress(f"store, logs and cache kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(asdict(report), indent=2) if args.json else markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
