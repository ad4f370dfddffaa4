#!/usr/bin/env python3
"""The gateway role's Python CPU per request, in process: no sockets, no engine.

Builds the example configuration (key auth, two mapping rules, a plan with two limits,
CORS, metrics on, access log off; the ``hits`` limit raised so nothing is refused) and
runs ``Gateway.handle`` -> ``on_response`` -> ``on_complete`` on the benchmark's
``GET /echo/hello`` the way the engine does. The peer measured in the same run is the
construction of the request objects alone; the gateway's cost is the difference.

    python3 bench/gateway/handler.py [--number N] [--repeat R] [--origin]
"""

from __future__ import annotations

import argparse
import timeit
from importlib import resources

from meshgate.config import parse_config
from meshgate.gateway import Gateway
from meshgate.limits import MemoryCounters
from meshgate.proxy import Exchange, Headers, Request, Response
from meshgate.telemetry.metrics import GatewayMetrics


def build_gateway() -> Gateway:
    text = resources.files("meshgate.examples").joinpath("gateway.yaml").read_text()
    text = text.replace(
        "{metric: hits, period: minute, value: 5}",
        "{metric: hits, period: minute, value: 1000000000}",
    )
    text += "access_log: false\n"
    return Gateway(parse_config(text), MemoryCounters(), GatewayMetrics())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20000, help="requests per timing")
    parser.add_argument("--repeat", type=int, default=7, help="timings; the best is kept")
    parser.add_argument("--origin", action="store_true", help="send an Origin field (CORS)")
    args = parser.parse_args()

    gateway = build_gateway()
    request_fields = [(b"host", b"api.example.com"), (b"x-api-key", b"k1")]
    if args.origin:
        request_fields.append((b"origin", b"https://app.example.com"))

    def objects() -> tuple[Exchange, Headers]:
        request = Request(
            "GET",
            b"/echo/hello",
            "/echo/hello",
            "",
            Headers(request_fields),
            client_ip="127.0.0.1",
            host="api.example.com",
            request_id="req-1",
        )
        return Exchange(request, start=1.0), Headers([(b"content-type", b"application/json")])

    def one_request() -> None:
        exchange, upstream = objects()
        answer = gateway.handle(exchange)
        assert answer is None, answer  # forwarded without waiting: the sync fast path
        exchange.upstream_start = 1.0001
        exchange.upstream_headers_at = 1.0004
        exchange.status = 200
        gateway.on_response(exchange, 200, upstream)
        exchange.end = 1.0005
        gateway.on_complete(exchange)

    one_request()
    exchange, fields = objects()
    gateway.handle(exchange)
    gateway.on_response(exchange, 200, fields)
    assert fields.get("ratelimit") is not None, fields
    assert not isinstance(gateway.handle(objects()[0]), Response)

    n = args.number
    peer = min(timeit.repeat(objects, number=n, repeat=args.repeat)) / n * 1e6
    full = min(timeit.repeat(one_request, number=n, repeat=args.repeat)) / n * 1e6
    print(f"request objects alone (peer): {peer:6.2f} µs/request")
    print(f"objects + gateway phases:     {full:6.2f} µs/request ({full / peer:.1f}x the peer)")
    print(f"gateway phases:               {full - peer:6.2f} µs/request")


if __name__ == "__main__":
    main()
