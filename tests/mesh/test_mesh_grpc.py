"""gRPC through two sidecars: a real grpcio client calls a real grpcio server, the
services declared ``http2`` so that streams, metadata and trailers pass end to end."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
from harness import free_port
from mesh_support import running, start_app, start_sidecar

SERVICE = "demo.Echo"


def _say(request: bytes, context: grpc.ServicerContext) -> bytes:
    metadata = dict(context.invocation_metadata())
    context.set_trailing_metadata((("x-trailing", "bye"),))
    return request.upper() + b" via " + metadata.get("x-meshgate-source", "?").encode()


def _count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for i in range(int(request)):
        yield b"%d" % i


def _fail(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad input: " + request.decode())
    raise AssertionError("abort raises")


def test_grpc_calls_pass_through_a_pair_of_sidecars(tmp_path: Path) -> None:
    handlers = {
        "Say": grpc.unary_unary_rpc_method_handler(_say),
        "Count": grpc.unary_stream_rpc_method_handler(_count),
        "Fail": grpc.unary_unary_rpc_method_handler(_fail),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    callee = start_sidecar(
        tmp_path,
        "echo",
        port,
        config={"services": [], "sidecar": {"app_protocol": "http2"}},
        extra=["--version", "v1"],
    )
    local = free_port()
    caller_app = start_app(tmp_path, "web")
    service = {
        "name": "echo",
        "protocol": "http2",
        "instances": [{"address": "127.0.0.1", "port": callee.inbound, "version": "v1"}],
    }
    caller = start_sidecar(
        tmp_path,
        "web",
        caller_app.port,
        config={
            "services": [service],
            "sidecar": {"upstreams": [{"service": "echo", "local_port": local}]},
        },
    )
    try:
        with running(callee, caller_app, caller), grpc.insecure_channel(f"127.0.0.1:{local}") as ch:
            say = ch.unary_unary(f"/{SERVICE}/Say")
            answer, call = say.with_call(b"hello", timeout=10)
            assert answer == b"HELLO via web/unknown"
            assert ("x-trailing", "bye") in call.trailing_metadata()
            count = ch.unary_stream(f"/{SERVICE}/Count")
            assert list(count(b"5", timeout=10)) == [b"0", b"1", b"2", b"3", b"4"]
            fail = ch.unary_unary(f"/{SERVICE}/Fail")
            try:
                fail(b"x", timeout=10)
                raise AssertionError("the call should fail")
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert exc.details() == "bad input: x"
            # The caller's sidecar counted them as HTTP/2 calls to echo.
            assert 'destination_service="echo"' in caller.metrics()
    finally:
        server.stop(None)
