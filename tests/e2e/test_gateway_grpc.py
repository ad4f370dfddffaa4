"""gRPC through ``meshgate gateway``: a real grpcio server on loopback behind an h2c
product, called by a real grpcio client (bytes in, bytes out: generic handlers, no
generated code).

Every call shape (unary, server-streaming, client-streaming, bidirectional) passes with
its metadata and trailers; the gateway's refusals arrive as gRPC statuses; a
``grpc-timeout`` shorter than a slow method is answered DEADLINE_EXCEEDED by the gateway.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from gateway_e2e_support import wait_for
from harness import Gateway, free_port, gateway_config, run_gateway

SERVICE = "demo.Echo"
KEY = "grpc-key-0001"
TINY_KEY = "grpc-key-tiny"


class Echo:
    """The methods of demo.Echo, on raw bytes."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    def say(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self.metadata.append(dict(context.invocation_metadata()))
        context.send_initial_metadata((("x-initial", "hello"),))
        context.set_trailing_metadata((("x-trailing", "bye"),))
        return request.upper()

    def count(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        for i in range(int(request)):
            yield b"%d" % i

    def join(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return b"+".join(requests)

    def chat(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for message in requests:
            yield b"re: " + message

    def fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        context.set_trailing_metadata((("x-detail", "why"),))
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad input: " + request.decode())
        raise AssertionError("abort raises")

    def slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        time.sleep(3)
        return b"late"


def _server(echo: Echo, service: str = SERVICE, port: int = 0) -> tuple[grpc.Server, int]:
    handlers = {
        "Say": grpc.unary_unary_rpc_method_handler(echo.say),
        "Count": grpc.unary_stream_rpc_method_handler(echo.count),
        "Join": grpc.stream_unary_rpc_method_handler(echo.join),
        "Chat": grpc.stream_stream_rpc_method_handler(echo.chat),
        "Fail": grpc.unary_unary_rpc_method_handler(echo.fail),
        "Slow": grpc.unary_unary_rpc_method_handler(echo.slow),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, port


def _product(name: str, prefix: str, port: int, **extra: Any) -> dict[str, Any]:
    product: dict[str, Any] = {
        "name": name,
        "hosts": ["*"],
        "path_prefix": prefix,
        "strip_prefix": False,  # /package.Service/Method is the path the server knows
        "backend": f"http://127.0.0.1:{port}",
        "protocol": "h2c",
        "auth": {"type": "api_key", "header": "x-api-key"},
        "metrics": [{"name": "hits"}],
        "mapping_rules": [{"method": "POST", "pattern": "/", "metric": "hits"}],
        "plans": [
            {"name": "big", "limits": [{"metric": "hits", "period": "day", "value": 100000}]},
            {"name": "tiny", "limits": [{"metric": "hits", "period": "eternity", "value": 2}]},
        ],
        "applications": [
            {"id": "app", "plan": "big", "keys": [KEY]},
            {"id": "tiny", "plan": "tiny", "keys": [TINY_KEY]},
        ],
    }
    product.update(extra)
    return product


class Env:
    def __init__(self, gateway: Gateway, echo: Echo, again_port: int) -> None:
        self.gateway = gateway
        self.echo = echo
        self.again_port = again_port
        self.channel = grpc.insecure_channel(f"127.0.0.1:{gateway.port}")

    def unary(self, method: str, service: str = SERVICE) -> grpc.UnaryUnaryMultiCallable:
        return self.channel.unary_unary(f"/{service}/{method}")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    workdir: Path = tmp_path_factory.mktemp("grpc")
    echo = Echo()
    server, port = _server(echo)
    again_port = free_port()
    anonymous = {"type": "none", "default_application": "app"}
    config = gateway_config(
        [
            _product("grpc", f"/{SERVICE}", port),
            _product("down", "/demo.Down", free_port(), auth=anonymous),
            _product("again", "/demo.Again", again_port, auth=anonymous),
        ]
    )
    try:
        with run_gateway(config, workdir, name="grpc-gateway") as gateway:
            environment = Env(gateway, echo, again_port)
            yield environment
            environment.channel.close()
            assert gateway.proc.popen.poll() is None, gateway.proc.stderr()
            assert "Traceback" not in gateway.proc.stderr(), gateway.proc.stderr()
    finally:
        server.stop(None)


KEYED = (("x-api-key", KEY),)


def test_unary_with_metadata_and_trailers(env):
    response, call = env.unary("Say").with_call(b"hello", metadata=KEYED, timeout=10)
    assert response == b"HELLO"
    assert call.code() == grpc.StatusCode.OK
    assert ("x-initial", "hello") in call.initial_metadata()
    assert ("x-trailing", "bye") in call.trailing_metadata()
    seen = env.echo.metadata[-1]
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert len(seen["x-request-id"]) == 32


def test_server_streaming(env):
    stream = env.channel.unary_stream(f"/{SERVICE}/Count")
    assert list(stream(b"200", metadata=KEYED, timeout=10)) == [b"%d" % i for i in range(200)]


def test_client_streaming(env):
    join = env.channel.stream_unary(f"/{SERVICE}/Join")
    parts = [b"part%d" % i for i in range(100)]
    assert join(iter(parts), metadata=KEYED, timeout=10) == b"+".join(parts)


def test_bidirectional_streaming_interleaved(env):
    """Each answer comes back before the next message is sent."""
    chat = env.channel.stream_stream(f"/{SERVICE}/Chat")
    outbox: queue.Queue[bytes | None] = queue.Queue()

    def messages() -> Iterator[bytes]:
        while (message := outbox.get()) is not None:
            yield message

    replies = chat(messages(), metadata=KEYED, timeout=10)
    for i in range(20):
        outbox.put(b"m%d" % i)
        assert next(replies) == b"re: m%d" % i
    outbox.put(None)
    assert list(replies) == []


def test_large_messages_both_ways(env):
    payload = bytes(range(256)) * (3 * 4096)  # 3 MiB
    assert env.unary("Say")(payload, metadata=KEYED, timeout=20) == payload.upper()


def test_many_concurrent_calls_on_one_channel(env):
    say = env.unary("Say")
    calls = [say.future(b"c%d" % i, metadata=KEYED, timeout=10) for i in range(100)]
    assert [c.result() for c in calls] == [b"C%d" % i for i in range(100)]


def test_an_error_status_and_its_trailers_pass_through(env):
    with pytest.raises(grpc.RpcError) as raised:
        env.unary("Fail")(b"x", metadata=KEYED, timeout=10)
    error = raised.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == "bad input: x"
    assert ("x-detail", "why") in error.trailing_metadata()


def _refused(call: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as raised:
        call(*args, **kwargs)
    return raised.value


def test_no_key_is_unauthenticated(env):
    error = _refused(env.unary("Say"), b"x", timeout=10)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "x-api-key" in error.details()


def test_an_unknown_key_is_permission_denied(env):
    error = _refused(env.unary("Say"), b"x", metadata=(("x-api-key", "nope"),), timeout=10)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error.details() == "the API key is not valid"


def test_over_the_limit_is_resource_exhausted(env):
    tiny = (("x-api-key", TINY_KEY),)
    for _ in range(2):
        assert env.unary("Say")(b"ok", metadata=tiny, timeout=10) == b"OK"
    error = _refused(env.unary("Say"), b"x", metadata=tiny, timeout=10)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit of 2 on hits is reached" in error.details()
    assert any(k == "ratelimit-policy" for k, _ in error.trailing_metadata())


def test_an_unknown_service_is_unimplemented(env):
    error = _refused(env.unary("Call", service="demo.Missing"), b"x", metadata=KEYED, timeout=10)
    assert error.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_backend_down_is_unavailable(env):
    error = _refused(env.unary("Say", service="demo.Down"), b"x", timeout=10)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "cannot connect" in error.details()


def test_grpc_timeout_shorter_than_the_method_is_deadline_exceeded(env):
    """No client-side deadline here (httpx knows nothing of gRPC): the gateway enforces it."""
    started = time.monotonic()
    with httpx.Client(http1=False, http2=True, timeout=10) as client:
        response = client.post(
            f"{env.gateway.url}/{SERVICE}/Slow",
            content=b"\x00\x00\x00\x00\x00",  # one empty message
            headers={
                "content-type": "application/grpc",
                "te": "trailers",
                "grpc-timeout": "300m",
                "x-api-key": KEY,
            },
        )
    elapsed = time.monotonic() - started
    assert response.status_code == 200
    assert response.headers["grpc-status"] == "4"
    assert elapsed < 2.0
    entry = wait_for(
        lambda: next((e for e in env.gateway.access_log() if e["path"].endswith("/Slow")), None),
        what="the access log line of the call",
    )
    assert entry["status"] == 504 and "grpc-timeout" in entry["error"]


def test_the_gateway_serves_plain_http2_and_http1_alongside(env):
    """The same listener: h2c prior knowledge and HTTP/1.1, refusals as problem+json."""
    with httpx.Client(http1=False, http2=True, timeout=10) as client:
        response = client.get(f"{env.gateway.url}/demo.Missing/x")
    assert response.http_version == "HTTP/2"
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"
    response = httpx.get(f"{env.gateway.url}/demo.Missing/x", timeout=10)
    assert response.http_version == "HTTP/1.1" and response.status_code == 404


def test_the_upstream_connection_is_opened_again_after_the_server_restarts(env):
    """The server's GOAWAY and close end the gateway's h2c connection; the next call opens a
    new one (on a new server, same port)."""
    again = env.unary("Say", service="demo.Again")
    first, _ = _server(Echo(), "demo.Again", env.again_port)
    try:
        assert again(b"before", timeout=10) == b"BEFORE"
    finally:
        first.stop(grace=1).wait()
    error = _refused(again, b"between", timeout=10)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    second, _ = _server(Echo(), "demo.Again", env.again_port)
    try:
        assert again(b"after", timeout=10) == b"AFTER"
    finally:
        second.stop(None)


def test_a_call_in_flight_finishes_when_the_server_shuts_down_gracefully(env):
    """The server's GOAWAY covers the call already sent: it completes on that connection."""
    server, _ = _server(Echo(), "demo.Again", env.again_port)
    try:
        slow = env.unary("Slow", service="demo.Again").future(b"", timeout=10)
        time.sleep(0.5)  # the call reached the server
        stopping = server.stop(grace=5)
        assert slow.result() == b"late"
        stopping.wait()
    finally:
        server.stop(None)
