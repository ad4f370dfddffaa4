#!/usr/bin/env python3
"""Mesh benchmark: a pair of meshgate sidecars against a pair of HAProxy and no proxy at all.

One run measures, on loopback, a call from a client to a server (nginx answering 200)
through the caller's sidecar (A) and the callee's (B): directly (``direct``), through two
HAProxy processes (``haproxy-pair``) and through two meshgate sidecars (``meshgate-pair``:
A's local port for service ``server``, B's inbound to the app). The load generator (wrk)
and the server share core 0; both proxies of a pair share core 1. For each system: latency
at 1,000 req/s (paced), the latency the pair adds over ``direct``, each proxy's CPU per
1,000 req/s and its resident memory; then throughput, latency and CPU per request at
saturation, with ratios meshgate-pair / haproxy-pair. ``--mtls`` measures the pairs with
(mutual) TLS between the proxies instead (``haproxy-tls-pair``, ``meshgate-mtls-pair``:
see mtls.py). ``--propagation`` also measures how
fast the control plane's registry reaches a sidecar (see propagation.py). Not a pass/fail
test; see README.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # bench.gateway and bench.mesh, as packages

from bench.gateway.run import (  # noqa: E402
    LOAD_CORE,
    PROXY_CORE,
    TICK_US,
    UPSTREAM_BODY,
    BenchError,
    LoadResult,
    Meter,
    Server,
    _first_line,
    free_port,
    machine,
    pace_for,
    preflight,
    progress,
    servers,
    start_nginx,
    verify,
    wait_ready,
    wrk,
)
from bench.mesh.mtls import start_haproxy_tls_pair, start_meshgate_mtls_pair  # noqa: E402
from bench.mesh.processes import Sidecar, rss_mb, start_haproxy  # noqa: E402
from bench.mesh.propagation import Propagation, measure_propagation  # noqa: E402

SYSTEMS = (
    "direct",
    "direct-core1",
    "haproxy-pair",
    "meshgate-pair",
    "haproxy-tls-pair",
    "meshgate-mtls-pair",
)
# What --mtls measures: the pairs with (mutual) TLS between the two proxies.
MTLS_SYSTEMS = ("direct", "direct-core1", "haproxy-tls-pair", "meshgate-mtls-pair")
# Each pair and the peer it is compared with.
PEERS = {"meshgate-pair": "haproxy-pair", "meshgate-mtls-pair": "haproxy-tls-pair"}
# The project's targets for a meshgate sidecar pair at 1,000 req/s.
ADDED_P99_TARGET_MS = 0.3
VCPU_PER_1K_TARGET = 0.15
RSS_TARGET_MB = 40.0
ANCHORS = (
    "Istio 1.20 pair: +0.228 ms p90 / +0.298 ms p99 at 1,000 req/s (with mTLS); "
    "Istio 1.24: 0.20 vCPU and 60 MB per sidecar per 1,000 req/s; Linkerd's proxy: about 26 MB"
)


@dataclass
class Chain:
    """What the client calls: the server itself, or the caller's proxy of a pair."""

    system: str
    port: int
    server: Server  # the nginx at the end of the chain
    proxies: dict[str, Server] = field(default_factory=dict)  # "A" (caller's), "B" (callee's)


def start_chain(
    system: str, server: Server, server_port: int, track: Callable[[Server], Server], workdir: Path
) -> Chain:
    """Start ``system``'s proxies in front of the server (B first, then A) and check that a
    request through them gets the server's 200. ``direct-core1`` is a server of its own,
    on the proxies' core: each request crosses from one core to the other, as through a
    pair."""
    if system == "direct":
        chain = Chain(system, server_port, server)
    elif system == "direct-core1":
        port = free_port()
        body = UPSTREAM_BODY.format(port=port)
        own = track(start_nginx("server-core1", body, PROXY_CORE, workdir))
        wait_ready(own, port)
        chain = Chain(system, port, own)
    elif system == "haproxy-pair":
        port_a, port_b = free_port(), free_port()
        b = track(start_haproxy("haproxy-b", port_b, server_port, PROXY_CORE, workdir))
        wait_ready(b, port_b)
        a = track(start_haproxy("haproxy-a", port_a, port_b, PROXY_CORE, workdir))
        wait_ready(a, port_a)
        chain = Chain(system, port_a, server, {"A": a, "B": b})
    elif system == "haproxy-tls-pair":
        port_a, port_b, a, b = start_haproxy_tls_pair(server_port, PROXY_CORE, workdir, track)
        wait_ready(b, port_b, http=False)  # TLS with a client certificate only
        wait_ready(a, port_a)
        chain = Chain(system, port_a, server, {"A": a, "B": b})
    elif system == "meshgate-mtls-pair":
        local, caller, callee = start_meshgate_mtls_pair(server_port, PROXY_CORE, workdir, track)
        wait_ready(caller.server, local)
        chain = Chain(system, local, server, {"A": caller.server, "B": callee.server})
    else:
        callee = Sidecar(
            "sidecar-b", {"service": "server", "app_port": server_port}, [], PROXY_CORE, workdir
        )
        track(callee.server)
        callee.wait_ready()
        local = free_port()
        caller = Sidecar(
            "sidecar-a",
            {
                "service": "client",
                # The client app is wrk, which does not listen: the readiness probe checks
                # the server instead (a TCP connect a second).
                "app_port": server_port,
                "outbound": f"127.0.0.1:{free_port()}",
                "upstreams": [{"service": "server", "local_port": local}],
            },
            [{"name": "server", "instances": [{"address": "127.0.0.1", "port": callee.inbound}]}],
            PROXY_CORE,
            workdir,
        )
        track(caller.server)
        caller.wait_ready()
        wait_ready(caller.server, local)
        chain = Chain(system, local, server, {"A": caller.server, "B": callee.server})
    verify(system, chain.port, checks_key=False)
    return chain


@dataclass
class ProxyCost:
    """One proxy's share of one run."""

    proxy: str  # A or B
    cpu_s: float
    vcpu: float  # CPU seconds per second of the run
    rss_mb: float  # VmRSS at the end of the run
    peak_rss_mb: float  # VmHWM: the most it ever held


def load(
    chain: Chain,
    connections: int,
    seconds: float,
    workdir: Path,
    delay_ms: float | None = None,
) -> tuple[LoadResult, list[ProxyCost]]:
    """One measured wrk run against ``chain``, with each proxy's CPU and memory."""
    before = {name: p.cpu_ticks() for name, p in chain.proxies.items()}
    result = wrk(chain.port, connections, seconds, workdir, delay_ms, Meter(chain.server))
    after = {name: p.cpu_ticks() for name, p in chain.proxies.items()}
    costs = []
    for name, proxy in chain.proxies.items():
        proxy.check_alive()
        cpu = (after[name] - before[name]) * TICK_US / 1e6
        rss, peak = rss_mb(proxy)
        costs.append(ProxyCost(name, cpu, cpu / result.seconds, rss, peak))
    # The meter counted the proxies among the other processes (it measured the server).
    others = result.cpu_s["others"] - sum(c.cpu_s for c in costs)
    result.cpu_s["others"] = max(0.0, others)
    return result, costs


@dataclass
class PacedProxy:
    proxy: str
    vcpu_per_1k: float  # vCPU over all rounds, per 1,000 req/s achieved
    rss_mb: float
    peak_rss_mb: float


@dataclass
class Paced:
    """A system at the paced rate: every round, and the medians the table shows."""

    system: str
    delay_ms: float
    runs: list[LoadResult] = field(default_factory=list)
    costs: list[list[ProxyCost]] = field(default_factory=list)
    rps: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    proxies: list[PacedProxy] = field(default_factory=list)
    added_ms: dict[str, float] | None = None  # p50, p90, p99 minus direct's

    def summarize(self) -> None:
        runs = self.runs
        seconds = sum(r.seconds for r in runs)
        self.rps = sum(r.requests for r in runs) / seconds
        self.p50_ms = statistics.median(r.p50_ms for r in runs)
        self.p90_ms = statistics.median(r.p90_ms or 0.0 for r in runs)
        self.p99_ms = statistics.median(r.p99_ms for r in runs)
        self.proxies = []
        for i, last in enumerate(self.costs[-1]):
            cpu = sum(costs[i].cpu_s for costs in self.costs)
            self.proxies.append(
                PacedProxy(
                    last.proxy,
                    vcpu_per_1k=cpu / seconds * 1000 / self.rps,
                    rss_mb=last.rss_mb,
                    peak_rss_mb=max(costs[i].peak_rss_mb for costs in self.costs),
                )
            )


@dataclass
class Saturated:
    system: str
    load: LoadResult
    costs: list[ProxyCost]
    cpu_us_per_request: dict[str, float]  # by proxy, and "pair" for both


@dataclass
class Report:
    machine: dict[str, str]
    settings: dict[str, object]
    paced: list[Paced] = field(default_factory=list)
    saturation: list[Saturated] = field(default_factory=list)
    # "meshgate-pair / haproxy-pair" (and the mTLS pairs'): each ratio, meshgate / peer.
    ratios: dict[str, dict[str, float]] = field(default_factory=dict)
    propagation: Propagation | None = None
    notes: list[str] = field(default_factory=list)


def measure_paced(chains: list[Chain], args: argparse.Namespace, workdir: Path) -> list[Paced]:
    """Each system at ``--rate``, round after round (the systems interleaved, so that a
    noisy moment of the host does not fall on one system only)."""
    results = []
    for chain in chains:
        progress(f"{chain.system}: pacing {args.paced_connections} connections to {args.rate:g}")
        delay = pace_for(chain.port, args.rate, args.paced_connections, args.warmup, workdir)
        results.append(Paced(chain.system, delay))
    for round_ in range(args.rounds):
        for chain, paced in zip(chains, results, strict=True):
            result, costs = load(
                chain, args.paced_connections, args.duration, workdir, paced.delay_ms
            )
            paced.runs.append(result)
            paced.costs.append(costs)
            progress(
                f"{chain.system} at {args.rate:g}/s, round {round_ + 1}/{args.rounds}: "
                f"{result.rps:,.0f} req/s, p50 {result.p50_ms:.3f} ms, "
                f"p99 {result.p99_ms:.3f} ms"
            )
    for paced in results:
        paced.summarize()
    direct = next((p for p in results if p.system == "direct"), None)
    if direct is not None:
        for paced in results:
            if paced.system != "direct":
                paced.added_ms = {
                    "p50": paced.p50_ms - direct.p50_ms,
                    "p90": paced.p90_ms - direct.p90_ms,
                    "p99": paced.p99_ms - direct.p99_ms,
                }
    return results


def measure_saturation(chain: Chain, args: argparse.Namespace, workdir: Path) -> Saturated:
    progress(f"{chain.system}: saturation, {args.connections} connections")
    wrk(chain.port, args.connections, args.warmup, workdir)
    result, costs = load(chain, args.connections, args.duration, workdir)
    requests = max(result.requests, 1)
    per_request = {c.proxy: c.cpu_s * 1e6 / requests for c in costs}
    if costs:
        per_request["pair"] = sum(per_request.values())
    progress(f"{chain.system}: {result.rps:,.0f} req/s, p99 {result.p99_ms:.2f} ms")
    return Saturated(chain.system, result, costs, per_request)


def saturation_ratios(saturation: list[Saturated]) -> dict[str, dict[str, float]]:
    """Per meshgate pair measured with its peer: the ratios meshgate / peer."""
    by_system = {s.system: s for s in saturation}
    out: dict[str, dict[str, float]] = {}
    for name, peer_name in PEERS.items():
        mesh, peer = by_system.get(name), by_system.get(peer_name)
        if mesh is None or peer is None:
            continue
        ratios = {
            "rps": mesh.load.rps / peer.load.rps,
            "p50": mesh.load.p50_ms / peer.load.p50_ms,
            "p99": mesh.load.p99_ms / peer.load.p99_ms,
        }
        for proxy in ("A", "B", "pair"):
            ratios[f"cpu_per_request_{proxy}"] = (
                mesh.cpu_us_per_request[proxy] / peer.cpu_us_per_request[proxy]
            )
        out[f"{name} / {peer_name}"] = ratios
    return out


# output


def _met(value: float, target: float) -> str:
    return "met" if value <= target else "MISSED"


def targets(paced: list[Paced]) -> list[str]:
    """Where each pair stands against the meshgate targets (HAProxy against the same bar),
    and what crossing cores alone costs (``direct-core1``)."""
    by_system = {p.system: p for p in paced}
    crossing = by_system.get("direct-core1")
    out = []
    if crossing is not None and crossing.added_ms is not None:
        out.append(
            f"direct-core1 (the server alone on core 1: each request crosses cores, as "
            f"through a pair) adds {crossing.added_ms['p50']:+.3f} ms p50 / "
            f"{crossing.added_ms['p99']:+.3f} ms p99 by itself: the tail of cross-core "
            "wakeups on this host, in every pair's added latency too"
        )
    for pair in (by_system.get(s) for s in SYSTEMS if s.endswith("-pair")):
        if pair is None:
            continue
        if pair.added_ms is not None:
            added = pair.added_ms["p99"]
            line = (
                f"{pair.system}: adds {added:+.3f} ms p99 (and {pair.added_ms['p90']:+.3f} ms "
                f"p90) over direct at {pair.rps:,.0f} req/s: target ≤ {ADDED_P99_TARGET_MS} ms "
                f"p99, {_met(added, ADDED_P99_TARGET_MS)}"
            )
            if crossing is not None:
                line += f" ({pair.p99_ms - crossing.p99_ms:+.3f} ms p99 over direct-core1)"
            out.append(line)
        for p in pair.proxies:
            out.append(
                f"{pair.system} {p.proxy}: {p.vcpu_per_1k:.3f} vCPU per 1,000 req/s (target ≤ "
                f"{VCPU_PER_1K_TARGET}, {_met(p.vcpu_per_1k, VCPU_PER_1K_TARGET)}), "
                f"RSS {p.rss_mb:.1f} MB, peak {p.peak_rss_mb:.1f} MB (target ≤ "
                f"{RSS_TARGET_MB:g} MB, {_met(p.rss_mb, RSS_TARGET_MB)})"
            )
    return out


def _pair(values: dict[str, float], digits: int) -> str:
    return " / ".join(f"{values[k]:.{digits}f}" for k in ("A", "B") if k in values) or "—"


def markdown(report: Report) -> str:
    m, settings = report.machine, report.settings
    out = [
        f"Machine: {m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, Python {m['python']}, "
        f"nginx {m['nginx']}, {m['haproxy']}, {m['wrk']}; meshgate {m['meshgate']} "
        f"(uvloop {m['uvloop']}, httptools {m['httptools']}); load average {m['loadavg']}",
        "",
        f"Client (wrk) and server (nginx, return 200) on core {LOAD_CORE}; both proxies of a "
        f"pair on core {PROXY_CORE}.",
    ]
    if report.paced:
        pauses = [p.delay_ms for p in report.paced]
        out += [
            "",
            f"At {settings['rate']:g} req/s: wrk -t1 -c{settings['paced_connections']}, each "
            f"connection paced by a random pause before each request (mean "
            f"{min(pauses):.1f}–{max(pauses):.1f} ms), {settings['rounds']} rounds of "
            f"{settings['duration']} s, systems interleaved; latencies are the median over "
            "rounds (the p99s' range in brackets).",
            "",
            "| system | req/s | p50 ms | p90 ms | p99 ms | added p50 / p90 / p99 ms "
            "| vCPU per 1k req/s A / B | RSS MB A / B | peak RSS MB A / B | non-2xx "
            "| other processes |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for p in report.paced:
            p99s = [r.p99_ms for r in p.runs]
            added = "—"
            if p.added_ms is not None:
                added = " / ".join(f"{p.added_ms[k]:+.3f}" for k in ("p50", "p90", "p99"))
            vcpu = _pair({x.proxy: x.vcpu_per_1k for x in p.proxies}, 3)
            rss = _pair({x.proxy: x.rss_mb for x in p.proxies}, 1)
            peak = _pair({x.proxy: x.peak_rss_mb for x in p.proxies}, 1)
            others = sum(r.cpu_s["others"] for r in p.runs) / sum(r.seconds for r in p.runs)
            out.append(
                f"| {p.system} | {p.rps:,.0f} | {p.p50_ms:.3f} | {p.p90_ms:.3f} "
                f"| {p.p99_ms:.3f} ({min(p99s):.3f}–{max(p99s):.3f}) | {added} | {vcpu} "
                f"| {rss} | {peak} | {sum(r.non_2xx + r.socket_errors for r in p.runs)} "
                f"| {others:.0%} |"
            )
        out += [
            "",
            "vCPU: CPU seconds (utime+stime from /proc) per second of run, per process, over "
            "all rounds, scaled to 1,000 req/s. RSS: VmRSS after the last round; peak: "
            "VmHWM. Added: the pair's median percentile minus direct's. Other processes: "
            "CPU of everything else on the host per second (noise from a shared machine).",
            "",
            "Targets (meshgate pair; HAProxy shown against the same bar):",
            "",
            *(f"- {line}" for line in targets(report.paced)),
            f"- anchors: {ANCHORS}",
        ]
    if report.saturation:
        out += [
            "",
            f"Saturation: wrk -t1 -c{settings['connections']} for {settings['duration']} s "
            f"after a {settings['warmup']} s warm-up.",
            "",
            "| system | req/s | p50 ms | p99 ms | CPU µs/req A / B | CPU µs/req pair "
            "| proxy core busy | idle core 0 / 1 | non-2xx | other processes |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for s in report.saturation:
            w, secs = s.load, s.load.seconds
            busy = sum(c.cpu_s for c in s.costs) / secs if s.costs else None
            pair = s.cpu_us_per_request.get("pair")
            out.append(
                f"| {s.system} | {w.rps:,.0f} | {w.p50_ms:.3f} | {w.p99_ms:.3f} "
                f"| {_pair(s.cpu_us_per_request, 1)} | {'—' if pair is None else f'{pair:.1f}'} "
                f"| {'—' if busy is None else f'{busy:.0%}'} "
                f"| {w.cpu_s['idle_core0'] / secs:.0%} / {w.cpu_s['idle_core1'] / secs:.0%} "
                f"| {w.non_2xx + w.socket_errors} | {w.cpu_s['others'] / secs:.0%} |"
            )
        for pairs, r in report.ratios.items():
            out += [
                "",
                f"{pairs}: req/s {r['rps']:.2f}x, p50 {r['p50']:.2f}x, "
                f"p99 {r['p99']:.2f}x, CPU per request A {r['cpu_per_request_A']:.2f}x, "
                f"B {r['cpu_per_request_B']:.2f}x, pair {r['cpu_per_request_pair']:.2f}x.",
            ]
    if report.propagation is not None:
        out += ["", *report.propagation.markdown()]
    if report.notes:
        out += ["", *(f"Note: {n}" for n in report.notes)]
    return "\n".join(out)


# the run


def run(args: argparse.Namespace) -> Report:
    preflight()
    if shutil.which("haproxy") is None:
        raise BenchError("haproxy is not installed: apt-get install haproxy")
    info = machine(None)
    for unused in ("redis", "grpcio", "h2load"):
        info.pop(unused, None)
    info["haproxy"] = _first_line(["haproxy", "-v"]).split(" - ")[0]
    report = Report(
        machine=info,
        settings={
            "systems": args.systems,
            "rate": args.rate,
            "rounds": args.rounds,
            "duration": args.duration,
            "warmup": args.warmup,
            "connections": args.connections,
            "paced_connections": args.paced_connections,
        },
    )
    workdir = Path(tempfile.mkdtemp(prefix="meshgate-mesh-bench-"))
    workdir.chmod(0o755)  # nginx workers run as nobody
    try:
        with servers() as track:
            if args.systems:
                port = free_port()
                upstream = track(
                    start_nginx("server", UPSTREAM_BODY.format(port=port), LOAD_CORE, workdir)
                )
                wait_ready(upstream, port)
                chains = [start_chain(s, upstream, port, track, workdir) for s in args.systems]
                report.paced = measure_paced(chains, args, workdir)
                report.saturation = [measure_saturation(chain, args, workdir) for chain in chains]
                report.ratios = saturation_ratios(report.saturation)
                bad = [
                    s.system for s in report.saturation if s.load.non_2xx or s.load.socket_errors
                ]
                bad += [
                    p.system + " (paced)"
                    for p in report.paced
                    if any(r.non_2xx or r.socket_errors for r in p.runs)
                ]
                if bad:
                    report.notes.append(f"non-2xx responses or socket errors in: {', '.join(bad)}")
                for chain in chains:
                    for proxy in [*chain.proxies.values(), chain.server]:
                        proxy.stop()
            if args.propagation:
                try:
                    report.propagation = measure_propagation(args, workdir, track)
                except BenchError as exc:
                    if not args.systems:
                        raise
                    # What was measured before still counts.
                    report.notes.append(f"endpoint propagation not measured: {exc}")
    finally:
        if args.keep_tmp:
            progress(f"configurations and logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--systems",
        default=None,
        help=f"comma-separated subset of {','.join(SYSTEMS)} (empty: only --propagation; "
        "default: the plain pairs, or with --mtls the TLS ones)",
    )
    parser.add_argument(
        "--mtls",
        action="store_true",
        help=f"measure the pairs with mutual TLS between the proxies ({','.join(MTLS_SYSTEMS)})",
    )
    parser.add_argument("--rate", type=float, default=1000, help="req/s of the paced runs")
    parser.add_argument("--duration", type=float, default=10, help="seconds per measured run")
    parser.add_argument("--rounds", type=int, default=5, help="paced runs per system")
    parser.add_argument("--warmup", type=float, default=2, help="seconds of warm-up per run")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections at saturation")
    parser.add_argument(
        "--paced-connections",
        type=int,
        default=50,
        help="wrk connections of the paced runs (more: closer to an open loop)",
    )
    parser.add_argument(
        "--propagation",
        action="store_true",
        help="also measure endpoint propagation from the control plane (propagation.py)",
    )
    parser.add_argument(
        "--bulk", type=int, default=1000, help="background instances registered (--propagation)"
    )
    parser.add_argument(
        "--cycles", type=int, default=3, help="removals and additions measured (--propagation)"
    )
    parser.add_argument(
        "--control-src",
        type=Path,
        help="run the control plane from this source tree's src (default: this one's)",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    args = parser.parse_args(argv)
    if args.systems is None:
        args.systems = ",".join(MTLS_SYSTEMS if args.mtls else SYSTEMS[:4])
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    if not args.systems and not args.propagation:
        parser.error("nothing to measure: give --systems or --propagation")
    # Measured in this order whatever the order given: direct first, as the reference.
    args.systems = [s for s in SYSTEMS if s in args.systems]
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
