"""One trace across the three layers, checked span by span at a real OTLP/HTTP receiver.

gateway -> sidecar A -> app A -> sidecar A outbound -> sidecar B -> integration route ->
RabbitMQ -> second route; then what the gateway does with sampling off, hostile
``traceparent`` fields, and a collector that never answers.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml
from harness import (
    Proc,
    echo_upstream,
    free_port,
    gateway_config,
    run_gateway,
    service_url,
    unavailable,
    wait_port,
)
from mesh.mesh_support import running, start_app, start_sidecar
from otlp_receiver import OtlpReceiver, Span

from meshgate.telemetry.tracing import parse_traceparent

KEY = {"X-API-Key": "k1"}


@pytest.fixture(scope="module")
def amqp_url() -> str:
    import aio_pika

    url = service_url("AMQP", "amqp://guest:guest@127.0.0.1:5672/")

    async def probe() -> None:
        connection = await aio_pika.connect(url, timeout=3)
        await connection.close()

    try:
        asyncio.run(probe())
    except Exception as error:
        unavailable(f"RabbitMQ not reachable at {url.split('@')[-1]}: {error}")
    return url


def _product(backend_port: int, prefix: str = "/shop") -> dict[str, object]:
    return {
        "name": "shop",
        "hosts": ["*"],
        "path_prefix": prefix,
        "backend": f"http://127.0.0.1:{backend_port}",
        "auth": {"type": "api_key", "header": "X-API-Key"},
        "plans": [{"name": "basic", "limits": []}],
        "applications": [{"id": "app1", "plan": "basic", "keys": ["k1"]}],
    }


def _tracing(endpoint: str, rate: float) -> dict[str, object]:
    return {"enabled": True, "endpoint": endpoint, "sample_rate": rate}


def test_one_trace_from_the_gateway_through_two_sidecars_and_a_broker_hop(
    tmp_path: Path, amqp_url: str
) -> None:
    queue = f"traced-{uuid.uuid4().hex[:8]}"
    with OtlpReceiver() as receiver:
        # App B is an integration runtime: an HTTP route that sends to RabbitMQ, and a
        # route that consumes what it sent.
        http_port = free_port()
        routes = tmp_path / "routes.yaml"
        routes.write_text(
            yaml.safe_dump(
                {
                    "http": {"listen": f"127.0.0.1:{http_port}"},
                    "amqp_url": amqp_url,
                    "tracing": _tracing(receiver.endpoint, 1.0),
                    "routes": [
                        {
                            "id": "orders",
                            "from": "http:/orders",
                            "steps": [
                                {"transform": {"value": {"order": 42}}},
                                {"to": f"amqp:queue:{queue}?durable=false"},
                            ],
                        },
                        {
                            "id": "fulfil",
                            "from": f"amqp:queue:{queue}?durable=false",
                            "steps": [{"log": {"message": "fulfilled"}}],
                        },
                    ],
                }
            )
        )
        runtime = Proc(["integration", "run", str(routes), "--no-watch"], tmp_path, "routes")
        flags = ["--trace-sample-rate", "1", "--tracing-endpoint", receiver.endpoint]
        procs: list[object] = [runtime]
        try:
            wait_port(http_port, proc=runtime.popen)
            sidecar_b = start_sidecar(
                tmp_path, "orders", http_port, config={"services": []}, extra=flags
            )
            procs.append(sidecar_b)
            app_port = free_port()
            mesh = {
                "services": [
                    {
                        "name": "orders",
                        "instances": [{"address": "127.0.0.1", "port": sidecar_b.inbound}],
                    }
                ]
            }
            sidecar_a = start_sidecar(
                tmp_path, "shop", app_port, config=mesh, extra=flags, wait_ready=False
            )
            procs.append(sidecar_a)
            app_a = start_app(tmp_path, "shop", port=app_port, proxy=sidecar_a.outbound)
            procs.append(app_a)
            sidecar_a.wait_ready()
            config = gateway_config(
                [_product(sidecar_a.inbound)], tracing=_tracing(receiver.endpoint, 1.0)
            )
            with run_gateway(config, tmp_path) as gw:
                r = httpx.get(f"{gw.url}/shop/call/orders/orders", headers=KEY, timeout=15)
                assert r.status_code == 200, r.text
                assert r.json()["answer"] == {"order": 42}
                spans = receiver.wait_for(7)
        finally:
            with running(*procs):
                pass
        assert runtime.popen.returncode == 0, runtime.stderr()[-2000:]

    assert len({s.trace_id for s in spans}) == 1, spans
    assert len(spans) == 7, [(s.service, s.name) for s in spans]
    by_id = {s.span_id: s for s in spans}

    def one(service: str, kind: str) -> Span:
        found = [s for s in spans if s.service == service and s.kind == kind]
        assert len(found) == 1, (service, kind, spans)
        return found[0]

    edge = one("meshgate-gateway", "server")
    a_in = one("shop", "server")
    a_out = one("shop", "client")
    b_in = one("orders", "server")
    route = one("meshgate-integration", "server")
    send = one("meshgate-integration", "producer")
    consumed = one("meshgate-integration", "consumer")
    chain = [edge, a_in, a_out, b_in, route, send, consumed]
    assert edge.parent_id == ""
    for parent, child in zip(chain, chain[1:], strict=False):
        assert child.parent_id == parent.span_id, (parent, child)
    assert all(s.parent_id in by_id for s in chain[1:])

    assert edge.name == "GET /shop"
    assert edge.attributes["http.request.method"] == "GET"
    assert edge.attributes["http.response.status_code"] == 200
    assert edge.attributes["http.route"] == "/shop"
    assert edge.attributes["meshgate.product"] == "shop"
    assert edge.attributes["meshgate.application"] == "app1"
    assert a_in.name == "GET shop" and a_out.name == "GET orders" and b_in.name == "GET orders"
    assert a_out.attributes["server.port"] == sidecar_b.inbound
    assert route.name == "route orders" and route.attributes["meshgate.route"] == "orders"
    assert send.name == f"send amqp:queue:{queue}"
    assert consumed.name == "route fulfil"
    assert not any(s.error for s in spans)


def _traceparent_seen(gw_url: str, headers: dict[str, str]) -> tuple[int, str | None]:
    r = httpx.get(f"{gw_url}/shop/echo", headers={**KEY, **headers}, timeout=10)
    if r.status_code != 200:
        return r.status_code, None
    seen = dict(r.json()["headers"])
    return r.status_code, seen.get("traceparent")


def test_sampling_off_propagates_and_exports_nothing(tmp_path: Path) -> None:
    with OtlpReceiver() as receiver, echo_upstream(tmp_path) as echo:
        config = gateway_config([_product(echo)], tracing=_tracing(receiver.endpoint, 0.0))
        with run_gateway(config, tmp_path) as gw:
            # A new trace, not sampled, but its context goes upstream.
            status, sent = _traceparent_seen(gw.url, {})
            assert status == 200
            ctx = parse_traceparent(sent)
            assert ctx is not None and not ctx.sampled
            # An unsampled caller's context goes on as it came.
            unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
            assert _traceparent_seen(gw.url, {"traceparent": unsampled}) == (200, unsampled)
            time.sleep(1.5)  # two export periods
        assert receiver.requests == 0 and receiver.spans == []


HOSTILE = [
    "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",
    "00-00000000000000000000000000000000-b7ad6b7169203331-01",
    "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01" + "a" * 8000,
    "garbage",
]


def test_a_malformed_or_oversized_traceparent_starts_a_new_trace(tmp_path: Path) -> None:
    with OtlpReceiver() as receiver, echo_upstream(tmp_path) as echo:
        config = gateway_config([_product(echo)], tracing=_tracing(receiver.endpoint, 1.0))
        with run_gateway(config, tmp_path) as gw:
            for value in HOSTILE:
                headers = {"traceparent": value, "tracestate": "x=" + "y" * 4000}
                status, sent = _traceparent_seen(gw.url, headers)
                assert status == 200, value
                ctx = parse_traceparent(sent)
                assert ctx is not None and ctx.sampled, value
                assert "0af7651916cd43dd8448eb211c80319c" not in (sent or "")
            spans = receiver.wait_for(len(HOSTILE))
        assert all(s.parent_id == "" for s in spans)
        assert len({s.trace_id for s in spans}) == len(HOSTILE)
        assert "error" not in gw.proc.stderr().lower()


def test_a_collector_that_never_answers_neither_slows_nor_fails_requests(
    tmp_path: Path,
) -> None:
    # A black hole: connections are taken by the kernel, nothing is ever read or answered.
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    endpoint = f"http://127.0.0.1:{hole.getsockname()[1]}"
    try:
        with echo_upstream(tmp_path) as echo:
            config = gateway_config([_product(echo)], tracing=_tracing(endpoint, 1.0))
            with run_gateway(config, tmp_path) as gw, httpx.Client(timeout=10) as client:
                slowest = 0.0
                started = time.monotonic()
                count = 0
                # Long enough for several export attempts (every 0.5 s) to hang meanwhile.
                while time.monotonic() - started < 2.5:
                    before = time.monotonic()
                    r = client.get(f"{gw.url}/shop/echo", headers=KEY)
                    slowest = max(slowest, time.monotonic() - before)
                    assert r.status_code == 200
                    count += 1
                assert count > 100
                assert slowest < 0.5, slowest
                stopping = time.monotonic()
            # The shutdown's flush is bounded too.
            assert time.monotonic() - stopping < 15
    finally:
        hole.close()


def test_a_gateway_attached_to_a_control_plane_traces_with_the_otel_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from control.control_support import (
        attached_gateway,
        make_product,
        make_subscription,
        start_control,
        within,
    )

    with OtlpReceiver() as receiver, echo_upstream(tmp_path) as echo:
        # The local settings only turn tracing on: endpoint and rate come from the standard
        # variables, as an operator sets them for every OpenTelemetry process.
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "1")
        control = start_control(tmp_path, f"sqlite:///{tmp_path / 'cp.db'}")
        try:
            product = make_product(control, echo)
            control.post(f"/products/{product['id']}/promote")
            sub = make_subscription(control, product["id"])
            key, app_id = sub["application"]["key"], sub["application"]["app_id"]
            extra = {"tracing": {"enabled": True}}
            with attached_gateway(tmp_path, control.url, control.token, settings_extra=extra) as gw:
                within(10, lambda: gw.get("/echo/hello", key).status_code == 200, "served")
                spans = receiver.wait_for(1)
        finally:
            control.stop()
    served = [s for s in spans if s.attributes.get("http.response.status_code") == 200]
    assert served and served[-1].service == "meshgate-gateway"
    assert served[-1].attributes["meshgate.application"] == app_id
    assert served[-1].attributes["meshgate.product"] == "echo"
