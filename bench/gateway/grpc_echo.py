#!/usr/bin/env python3
"""The gRPC upstream of the gateway benchmark: ``/bench.Echo/Say`` answers its request bytes.

A grpcio server on 127.0.0.1 with a generic handler (raw bytes, no generated code) and a
thread pool, as the project's gRPC tests build it; it runs until SIGTERM. ``run.py``
starts it pinned to the load core. (On one core the thread-pool server spends less CPU
per call than grpc.aio's.)

    python3 bench/gateway/grpc_echo.py --port PORT
"""

from __future__ import annotations

import argparse
from concurrent import futures

import grpc

SERVICE = "bench.Echo"
METHOD = f"/{SERVICE}/Say"


def say(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    handlers = {"Say": grpc.unary_unary_rpc_method_handler(say)}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main()
