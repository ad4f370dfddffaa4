#!/usr/bin/env python3
"""The example's HTTP route in meshgate against the same flow in Node-RED 4.

One run measures, on loopback, ``POST /orders`` with a small JSON order through:

- meshgate: ``python -m meshgate integration run`` on the example's route without the
  broker step (unmarshal json, validate against schemas/order.json, choice on
  ``total > 1000`` setting the header priority, transform to
  ``{"accepted": true, "id": ...}``); the branches end in DEBUG-level logs, which are
  off, so neither side writes a line per request;
- Node-RED 4 (installed apart with npm, never in this repository): http in, json,
  switch on ``msg.payload.total``, change (``msg.priority``), template, http response.

Both servers are pinned to core 1, wrk to core 0; the bodies alternate between a small
and a big order, so both branches run. For each: requests/s, the server's CPU time per
request (utime+stime from /proc), RSS, p50/p99, and meshgate's ratios to Node-RED.

``--rabbitmq`` adds: a route ``amqp:queue:X`` -> transform -> mock draining a
pre-filled queue, against a bare aio-pika consumer that only acknowledges; each runs
alone on core 1. Not a pass/fail test. See README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

# The gateway benchmark's process, /proc and wrk helpers, shared rather than copied.
sys.path.insert(0, str(HERE.parent / "gateway"))
import run as gateway_bench  # noqa: E402
from run import BenchError, LoadResult, Server, free_port, progress  # noqa: E402

LOAD_CORE = "0"  # wrk
SERVER_CORE = "1"  # the server under test, alone
TICK_US = gateway_bench.TICK_US
NODE_RED_DIR = Path(os.environ.get("NODE_RED_DIR", "/tmp/nodered-bench"))
SMALL = {"id": "o-1", "customer": "ACME", "total": 250, "currency": "EUR"}
BIG = {"id": "o-2", "customer": "ACME", "total": 2500, "currency": "EUR"}
NODE_RED_REFERENCE = "about 1,450 req/s, ~690 CPU µs/req, 168 MB RSS (issue 4)"

ROUTES = """\
http: {{listen: "127.0.0.1:{port}"}}
routes:
  - id: orders
    from: http:/orders?method=POST
    steps:
      - unmarshal: json
      - validate: {{json_schema: {schema}}}
      - choice:
          when:
            - expr: "total > `1000`"
              steps:
                - set_header: {{name: priority, value: high}}
                - to: log:big-orders?level=DEBUG
          otherwise:
            steps:
              - to: direct:small-orders
      - set_header: {{name: content-type, value: application/json}}
      - transform: {{template: '{{"accepted": true, "id": "{{{{ body.id }}}}"}}'}}
  - id: small
    from: direct:small-orders
    steps:
      - log: {{message: "small order {{{{ body.id }}}}", level: DEBUG}}
"""


def node_red_flow() -> list[dict[str, object]]:
    """http in -> json -> switch (total > 1000) -> change -> template -> http response."""
    tab: dict[str, object] = {"id": "orders-tab", "type": "tab", "label": "orders"}
    nodes: list[dict[str, object]] = [
        {
            "id": "orders-in",
            "type": "http in",
            "url": "/orders",
            "method": "post",
            "upload": False,
            "wires": [["orders-json"]],
        },
        {
            "id": "orders-json",
            "type": "json",
            "action": "obj",
            "property": "payload",
            "wires": [["orders-switch"]],
        },
        {
            "id": "orders-switch",
            "type": "switch",
            "property": "payload.total",
            "propertyType": "msg",
            "rules": [{"t": "gt", "v": "1000", "vt": "num"}, {"t": "else"}],
            "checkall": "false",
            "outputs": 2,
            "wires": [["orders-high"], ["orders-low"]],
        },
        {
            "id": "orders-high",
            "type": "change",
            "rules": [{"t": "set", "p": "priority", "pt": "msg", "to": "high", "tot": "str"}],
            "wires": [["orders-template"]],
        },
        {
            "id": "orders-low",
            "type": "change",
            "rules": [{"t": "set", "p": "priority", "pt": "msg", "to": "low", "tot": "str"}],
            "wires": [["orders-template"]],
        },
        {
            "id": "orders-template",
            "type": "template",
            "field": "payload",
            "fieldType": "msg",
            "format": "handlebars",
            "syntax": "mustache",
            "output": "str",
            "template": '{"accepted": true, "id": "{{{payload.id}}}"}',
            "wires": [["orders-out"]],
        },
        {
            "id": "orders-out",
            "type": "http response",
            "statusCode": "",
            "headers": {"content-type": "application/json"},
            "wires": [],
        },
    ]
    for node in nodes:
        node["z"] = "orders-tab"
    return [tab, *nodes]


NODE_RED_SETTINGS = """\
module.exports = {{
    uiHost: "127.0.0.1",
    uiPort: {port},
    flowFile: "flows.json",
    userDir: {user_dir},
    credentialSecret: false,
    httpAdminRoot: false,
    httpNodeRoot: "/",
    diagnostics: {{ enabled: false, ui: false }},
    telemetry: {{ enabled: false }},
    externalModules: {{ autoInstall: false }},
    logging: {{ console: {{ level: "warn", metrics: false, audit: false }} }},
    editorTheme: {{ projects: {{ enabled: false }} }},
}};
"""


# servers


def start_meshgate(workdir: Path, port: int) -> Server:
    schema = REPO / "src" / "meshgate" / "examples" / "schemas" / "order.json"
    routes = workdir / "routes.yaml"
    routes.write_text(ROUTES.format(port=port, schema=json.dumps(str(schema))))
    args = [sys.executable, "-m", "meshgate", "integration", "run", str(routes)]
    return Server("meshgate", args, SERVER_CORE, workdir)


def node_red_version() -> str | None:
    package = NODE_RED_DIR / "node_modules" / "node-red" / "package.json"
    try:
        return str(json.loads(package.read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


def start_node_red(workdir: Path, port: int) -> Server:
    user_dir = workdir / "node-red"
    user_dir.mkdir()
    (user_dir / "flows.json").write_text(json.dumps(node_red_flow(), indent=1))
    settings = user_dir / "settings.js"
    settings.write_text(NODE_RED_SETTINGS.format(port=port, user_dir=json.dumps(str(user_dir))))
    red = NODE_RED_DIR / "node_modules" / "node-red" / "red.js"
    args = ["node", str(red), "--settings", str(settings), "--userDir", str(user_dir)]
    return Server("node-red", args, SERVER_CORE, workdir)


def post(port: int, body: dict[str, object], timeout: float = 2.0) -> tuple[int, bytes]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/orders",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(server: Server, port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        server.check_alive()
        try:
            status, _ = post(port, SMALL, timeout=1.0)
            if status == 200:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(
                f"{server.name} does not answer POST /orders on 127.0.0.1:{port} after "
                f"{timeout}s; its log:\n{server.log_tail()}"
            )
        time.sleep(0.2)


def verify(name: str, port: int) -> None:
    """Refuse to measure anything but the flow's answer, for both branches."""
    for order in (SMALL, BIG):
        status, body = post(port, order)
        try:
            answer = json.loads(body)
        except ValueError:
            answer = None
        if status != 200 or answer != {"accepted": True, "id": order["id"]}:
            raise BenchError(f"{name}: POST /orders {order} answered {status} {body[:200]!r}")


def rss_mb(server: Server) -> float:
    total = 0
    for pid in server.pids():
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


# wrk

WRK_SCRIPT = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local bodies = {{ {small}, {big} }}
local requests = {{}}
function init(args)
  -- After wrk.init: the requests carry its Host header.
  for i, body in ipairs(bodies) do
    requests[i] = wrk.format(nil, "/orders", nil, body)
  end
end
local n = 0
function request()
  n = n + 1
  return requests[n % 2 + 1]
end
"""


def lua_string(value: dict[str, object]) -> str:
    return json.dumps(json.dumps(value))  # a JSON string literal is a valid Lua literal here


@dataclass
class HttpResult:
    system: str
    rps: float
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    cpu_us_per_request: float
    server_core_busy: float
    rss_mb: float
    non_2xx: int
    socket_errors: int
    others_busy: float  # CPU of every other process on the machine / wall seconds
    round: int = 1


def wrk(port: int, connections: int, seconds: float, workdir: Path) -> LoadResult:
    script = workdir / "orders.lua"
    script.write_text(WRK_SCRIPT.format(small=lua_string(SMALL), big=lua_string(BIG)))
    args = ["taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s"]
    args += ["--latency", "-s", str(script), f"http://127.0.0.1:{port}/orders"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return gateway_bench.parse_wrk(done.stdout, connections, None)


def measure_http(
    name: str, server: Server, port: int, args: argparse.Namespace, workdir: Path, round_: int
) -> HttpResult:
    progress(
        f"{name} (round {round_}): warm-up {args.warmup:g} s, "
        f"then {args.duration:g} s at -c{args.connections}"
    )
    wrk(port, args.connections, args.warmup, workdir)
    before, machine_before = server.cpu_ticks(), gateway_bench._machine_ticks()[0]
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = wrk(port, args.connections, args.duration, workdir)
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (server.cpu_ticks() - before) * TICK_US / 1e6
    machine_s = (gateway_bench._machine_ticks()[0] - machine_before) * TICK_US / 1e6
    wrk_s = (children_after.ru_utime + children_after.ru_stime) - (
        children_before.ru_utime + children_before.ru_stime
    )
    server.check_alive()
    out = HttpResult(
        system=name,
        rps=result.rps,
        requests=result.requests,
        seconds=result.seconds,
        p50_ms=result.p50_ms,
        p99_ms=result.p99_ms,
        cpu_us_per_request=cpu_s * 1e6 / max(result.requests, 1),
        server_core_busy=cpu_s / result.seconds,
        rss_mb=rss_mb(server),
        non_2xx=result.non_2xx,
        socket_errors=result.socket_errors,
        others_busy=max(0.0, machine_s - cpu_s - wrk_s) / result.seconds,
        round=round_,
    )
    progress(
        f"{name}: {out.rps:,.0f} req/s, {out.cpu_us_per_request:.0f} µs CPU/req, "
        f"p99 {out.p99_ms:.2f} ms, RSS {out.rss_mb:.0f} MB, other processes "
        f"{out.others_busy:.0%}"
    )
    return out


# RabbitMQ (c)

AMQP_URL = os.environ.get("MESHGATE_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


@dataclass
class AmqpResult:
    system: str
    round: int
    messages: int
    seconds: float
    per_second: float
    cpu_us_per_message: float


async def _fill(queue_name: str, count: int) -> None:
    import aio_pika

    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel(publisher_confirms=False)
        await channel.declare_queue(queue_name, durable=True)
        body = json.dumps(SMALL).encode()
        for i in range(count):
            await channel.default_exchange.publish(
                aio_pika.Message(body, content_type="application/json", message_id=str(i)),
                routing_key=queue_name,
            )
        # A confirmed publish after the rest: all of them are in the queue.
        confirmed = await connection.channel(publisher_confirms=True)
        await confirmed.default_exchange.publish(aio_pika.Message(body), routing_key=queue_name)


async def _drop(queue_name: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(queue_name)


def _clock() -> tuple[float, float]:
    """Wall and CPU seconds of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), usage.ru_utime + usage.ru_stime


async def _consume_meshgate(queue_name: str, count: int, prefetch: int) -> tuple[float, float]:
    from meshgate.integration import IntegrationContext, from_
    from meshgate.integration.components import amqp  # noqa: F401 - imported before the clock
    from meshgate.integration.testing import mock_endpoint

    route = (
        from_(f"amqp:queue:{queue_name}?prefetch={prefetch}", id="consume")
        .unmarshal("json")
        .transform(template='{"accepted": true, "id": "{{ body.id }}"}')
        .to("mock:out")
        .build()
    )
    context = IntegrationContext(settings={"amqp_url": AMQP_URL})
    context.add_route(route)
    started = _clock()
    await context.start()
    await mock_endpoint(context, "mock:out").wait_for(count, timeout=600)
    ended = _clock()
    await context.stop(5)
    return ended[0] - started[0], ended[1] - started[1]


async def _consume_bare(queue_name: str, count: int, prefetch: int) -> tuple[float, float]:
    import aio_pika

    done = asyncio.Event()
    seen = 0

    async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal seen
        await message.ack()
        seen += 1
        if seen >= count:
            done.set()

    started = _clock()
    connection = await aio_pika.connect(AMQP_URL)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=prefetch)
    queue = await channel.declare_queue(queue_name, durable=True)
    await queue.consume(on_message, no_ack=False)
    await asyncio.wait_for(done.wait(), 600)
    ended = _clock()
    await connection.close()
    return ended[0] - started[0], ended[1] - started[1]


def amqp_child(system: str, queue_name: str, count: int, prefetch: int) -> None:
    """Runs pinned in its own process; prints elapsed seconds and CPU seconds as JSON.

    Both consumers are timed from connecting to the last message, imports excluded.
    """
    import uvloop

    consume = _consume_meshgate if system == "meshgate" else _consume_bare
    elapsed, cpu = uvloop.run(consume(queue_name, count, prefetch))
    print(json.dumps({"seconds": elapsed, "cpu_s": cpu}))


def measure_amqp(system: str, count: int, prefetch: int, round_: int) -> AmqpResult:
    queue_name = f"meshgate-bench-{os.getpid()}-{system}"
    progress(f"amqp {system}: filling {queue_name} with {count:,} messages")
    asyncio.run(_fill(queue_name, count))
    try:
        progress(f"amqp {system}: consuming on core {SERVER_CORE}")
        done = subprocess.run(
            [
                "taskset",
                "-c",
                SERVER_CORE,
                sys.executable,
                __file__,
                "--amqp-child",
                system,
                queue_name,
                str(count + 1),
                str(prefetch),
            ],
            capture_output=True,
            text=True,
            timeout=900,
        )
        if done.returncode != 0:
            raise BenchError(f"amqp {system} consumer failed:\n{done.stderr[-2000:]}")
        figures = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        asyncio.run(_drop(queue_name))
    out = AmqpResult(
        system=system,
        round=round_,
        messages=count + 1,
        seconds=figures["seconds"],
        per_second=(count + 1) / figures["seconds"],
        cpu_us_per_message=figures["cpu_s"] * 1e6 / (count + 1),
    )
    progress(f"amqp {system}: {out.per_second:,.0f} msg/s, {out.cpu_us_per_message:.0f} µs CPU/msg")
    return out


# report


@dataclass
class Report:
    machine: dict[str, str]
    settings: dict[str, object]
    http: list[HttpResult] = field(default_factory=list)
    amqp: list[AmqpResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def machine(nodered: str | None) -> dict[str, str]:
    info = gateway_bench.machine(None)
    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": info["cpu"],
        "cores": info["cores"],
        "kernel": info["kernel"],
        "python": info["python"],
        "node": gateway_bench._first_line(["node", "--version"]),
        "node-red": nodered or "?",
        "wrk": info["wrk"],
        "meshgate": info["meshgate"],
        "uvloop": info["uvloop"],
        "httptools": info["httptools"],
        "aio-pika": gateway_bench._version("aio-pika"),
        "loadavg": info["loadavg"],
    }


def markdown(report: Report) -> str:
    m = report.machine
    s = report.settings
    out = [
        f"{m['date']}; {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, Python "
        f"{m['python']} (uvloop {m['uvloop']}, httptools {m['httptools']}), Node.js "
        f"{m['node']}, Node-RED {m['node-red']}, {m['wrk']}; meshgate {m['meshgate']}; "
        f"load average {m['loadavg']}",
    ]
    if report.http:
        out += [
            "",
            f"POST /orders, wrk -t1 -c{s['connections']} for {s['duration']} s after a "
            f"{s['warmup']} s warm-up, small and big orders alternating; server on core "
            f"{SERVER_CORE}, wrk on core {LOAD_CORE}.",
            "",
            "| system | round | req/s | p50 ms | p99 ms | CPU µs/req | server core busy "
            "| RSS MB | non-2xx | socket errors | other processes |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in sorted(report.http, key=lambda r: (r.system, r.round)):
            out.append(
                f"| {r.system} | {r.round} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} "
                f"| {r.cpu_us_per_request:.0f} | {r.server_core_busy:.0%} | {r.rss_mb:.0f} "
                f"| {r.non_2xx} | {r.socket_errors} | {r.others_busy:.0%} |"
            )
        systems = {r.system for r in report.http}
        if {"meshgate", "node-red"} <= systems:
            mg, nr = (median_of(report.http, name) for name in ("meshgate", "node-red"))
            out += [
                "",
                f"Medians over the rounds: meshgate {mg['rps']:,.0f} req/s, "
                f"{mg['cpu']:.0f} µs CPU/req, {mg['rss']:.0f} MB; Node-RED {nr['rps']:,.0f} "
                f"req/s, {nr['cpu']:.0f} µs CPU/req, {nr['rss']:.0f} MB.",
                f"meshgate / Node-RED: requests/s {mg['rps'] / nr['rps']:.2f}x (target ≥ 5x); "
                f"CPU per request {mg['cpu'] / nr['cpu']:.2f}x (target ≤ 0.2x); "
                f"RSS {mg['rss'] / nr['rss']:.2f}x.",
                "",
                "CPU µs/req: utime+stime of the server process (all its threads) over the "
                "measured run / requests completed. Server core busy: its CPU seconds per "
                "wall second (under 100% at saturation means it waited: on wrk, or on "
                "other processes sharing the core). Other processes: the rest of the "
                "machine's user+system CPU during the run (a shared host's noise).",
            ]
    if report.amqp:
        out += [
            "",
            f"RabbitMQ: {s['messages']:,} pre-filled messages, prefetch {s['prefetch']}, "
            f"consumer alone on core {SERVER_CORE} (the broker is not pinned).",
            "",
            "| consumer | round | messages/s | CPU µs/message | consumer core busy |",
            "| --- | ---: | ---: | ---: | ---: |",
        ]
        for a in sorted(report.amqp, key=lambda a: (a.system, a.round)):
            out.append(
                f"| {a.system} | {a.round} | {a.per_second:,.0f} | {a.cpu_us_per_message:.0f} "
                f"| {a.per_second * a.cpu_us_per_message / 1e6:.0%} |"
            )
        mg_rate, bare_rate, mg_cpu, bare_cpu = (
            statistics.median(getattr(a, field) for a in report.amqp if a.system == system)
            for field, system in (
                ("per_second", "meshgate"),
                ("per_second", "bare-aio-pika"),
                ("cpu_us_per_message", "meshgate"),
                ("cpu_us_per_message", "bare-aio-pika"),
            )
        )
        out += [
            "",
            f"Medians: meshgate route {mg_rate:,.0f} messages/s at {mg_cpu:.0f} µs CPU each; "
            f"bare consumer {bare_rate:,.0f} messages/s at {bare_cpu:.0f} µs.",
            f"meshgate route / bare consumer: messages/s {mg_rate / bare_rate:.2f}x "
            f"(target ≥ 0.8x); CPU per message {mg_cpu / bare_cpu:.2f}x.",
            "",
            "Timed in the consumer process from connecting to the last message; CPU: its "
            "utime+stime over the same span.",
        ]
    if report.notes:
        out += ["", *(f"Note: {n}" for n in report.notes)]
    return "\n".join(out)


def median_of(results: list[HttpResult], system: str) -> dict[str, float]:
    mine = [r for r in results if r.system == system]
    return {
        "rps": statistics.median(r.rps for r in mine),
        "cpu": statistics.median(r.cpu_us_per_request for r in mine),
        "rss": max(r.rss_mb for r in mine),
    }


def run(args: argparse.Namespace) -> Report:
    for tool in ("wrk", "taskset") + (("node",) if "node-red" in args.systems else ()):
        if shutil.which(tool) is None:
            raise BenchError(f"{tool} is not installed")
    if not {0, 1} <= os.sched_getaffinity(0):
        raise BenchError("needs cores 0 and 1 (wrk and the server are pinned apart)")
    nodered = node_red_version()
    if "node-red" in args.systems and nodered is None:
        raise BenchError(
            f"Node-RED is not installed in {NODE_RED_DIR}: "
            f"mkdir -p {NODE_RED_DIR} && cd {NODE_RED_DIR} && npm install node-red@4 "
            "(or set NODE_RED_DIR)"
        )
    report = Report(
        machine=machine(nodered),
        settings={
            "duration": args.duration,
            "warmup": args.warmup,
            "connections": args.connections,
            "rounds": args.rounds,
            "messages": args.messages,
            "prefetch": args.prefetch,
        },
    )
    workdir = Path(tempfile.mkdtemp(prefix="meshgate-bench-integration-"))
    try:
        started: dict[str, tuple[Server, int]] = {}
        try:
            for system in args.systems:
                port = free_port()
                start = start_meshgate if system == "meshgate" else start_node_red
                started[system] = (start(workdir, port), port)
                wait_ready(*started[system])
                verify(system, port)
            # Rounds alternate the systems, so a noisy neighbour hits both alike.
            for round_ in range(1, args.rounds + 1):
                for system, (server, port) in started.items():
                    report.http.append(measure_http(system, server, port, args, workdir, round_))
        finally:
            for server, _ in started.values():
                server.stop()
        if args.rabbitmq:
            for round_ in range(1, args.rounds + 1):
                for system in ("bare-aio-pika", "meshgate"):
                    result = measure_amqp(system, args.messages, args.prefetch, round_)
                    report.amqp.append(result)
    finally:
        if args.keep_tmp:
            progress(f"routes, flows and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    bad = [r.system for r in report.http if r.non_2xx or r.socket_errors]
    if bad:
        report.notes.append(f"non-2xx responses or socket errors in: {', '.join(bad)}")
    if report.http:
        report.notes.append(
            "Node-RED's flow does not validate against the JSON schema; meshgate's does."
        )
    return report


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--amqp-child":
        system, queue_name, count, prefetch = sys.argv[2:6]
        amqp_child(system, queue_name, int(count), int(prefetch))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=15, help="seconds per measured run")
    parser.add_argument("--warmup", type=float, default=3, help="seconds of warm-up per system")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections")
    parser.add_argument("--rounds", type=int, default=3, help="measured runs per system")
    parser.add_argument(
        "--systems",
        default="meshgate,node-red",
        help="comma-separated subset of meshgate,node-red (empty: --rabbitmq alone)",
    )
    parser.add_argument("--rabbitmq", action="store_true", help="also measure (c) on RabbitMQ")
    parser.add_argument("--messages", type=int, default=50_000, help="messages for --rabbitmq")
    parser.add_argument("--prefetch", type=int, default=10, help="prefetch for --rabbitmq")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--keep-tmp", action="store_true", help="keep routes, flows and logs")
    args = parser.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if set(args.systems) - {"meshgate", "node-red"}:
        parser.error("--systems takes meshgate and/or node-red")
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
