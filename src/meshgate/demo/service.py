"""A small service for the mesh demo, the tests and the benchmark: it says who answered.

``python -m meshgate.demo.service --name payments --version v1 --port 9001``

- any path: JSON with the service, version and instance that answered, the method, path,
  the ``x-meshgate-source`` it was called with, and the body's length; header ``x-served-by``
- ``/status/N`` answers N; ``/delay/S`` answers after S seconds
- ``/call/SERVICE/REST`` calls ``http://SERVICE/REST`` through the sidecar's outbound proxy
  (``--proxy HOST:PORT``) and wraps the answer: how services call each other in the demo;
  the request's ``traceparent``/``tracestate`` (and ``x-meshgate-consumer``) go with the
  call, so that it joins the trace (and the next service knows the API consumer)
- ``POST /admin/fail?status=503`` makes this instance answer that status to everything else
  until ``POST /admin/recover``: for breaking one instance in the walkthrough;
  ``POST /admin/slow?seconds=S`` makes it answer everything after S seconds
- ``GET /admin/stats``: how many requests (admin ones aside) it has answered
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re

import httptools

__all__ = ["ServiceProtocol", "main", "serve"]

_STATUS = re.compile(r"^/status/(\d{3})$")
_DELAY = re.compile(r"^/delay/([0-9.]+)$")
_CALL = re.compile(r"^/call/([a-z0-9.\-]+)(/.*)?$")


class _State:
    def __init__(self, name: str, version: str, instance: str, proxy: tuple[str, int] | None):
        self.name = name
        self.version = version
        self.instance = instance
        self.proxy = proxy
        self.failing = 0
        self.slow = 0.0
        self.requests = 0


class ServiceProtocol(asyncio.Protocol):
    def __init__(self, state: _State) -> None:
        self.state = state
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.headers: dict[str, str] = {}
        self.body = 0
        self.queue: asyncio.Queue[tuple[str, str, dict[str, str], int, bool]] = asyncio.Queue()
        self.worker: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.worker = asyncio.get_running_loop().create_task(self._work())

    def connection_lost(self, exc: Exception | None) -> None:
        if self.worker is not None:
            self.worker.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = {}
        self.body = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body += len(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method().decode()
        self.queue.put_nowait(
            (
                method,
                self.url.decode("latin-1"),
                self.headers,
                self.body,
                self.parser.should_keep_alive(),
            )
        )

    async def _work(self) -> None:
        while True:
            method, url, headers, body, keep_alive = await self.queue.get()
            status, payload = await self._answer(method, url, headers, body)
            self._send(status, payload, keep_alive)
            if not keep_alive:
                return

    async def _answer(
        self, method: str, url: str, headers: dict[str, str], body: int
    ) -> tuple[int, bytes]:
        state = self.state
        path, _, query = url.partition("?")
        if path == "/admin/stats":
            return 200, json.dumps({"requests": state.requests}).encode()
        if path == "/admin/slow" and method == "POST":
            m = re.search(r"seconds=([0-9.]+)", query)
            state.slow = float(m.group(1)) if m else 1.0
            return 200, b'{"slow": %s}' % str(state.slow).encode()
        if not path.startswith("/admin/"):
            state.requests += 1
        if path == "/admin/fail" and method == "POST":
            m = re.search(r"status=(\d{3})", query)
            state.failing = int(m.group(1)) if m else 503
            return 200, b'{"failing": %d}' % state.failing
        if path == "/admin/recover" and method == "POST":
            state.failing = 0
            state.slow = 0.0
            return 200, b'{"failing": 0}'
        if state.slow:
            await asyncio.sleep(state.slow)
        if state.failing and path != "/ready":
            return state.failing, b'{"error": "this instance was told to fail"}'
        m = _STATUS.match(path)
        if m:
            return int(m.group(1)), b""
        m = _DELAY.match(path)
        if m:
            await asyncio.sleep(float(m.group(1)))
        m = _CALL.match(path)
        if m:
            return await self._call(
                m.group(1), (m.group(2) or "/") + (f"?{query}" if query else ""), headers
            )
        doc = {
            "service": state.name,
            "version": state.version,
            "instance": state.instance,
            "method": method,
            "path": path,
            "query": query,
            "host": headers.get("host", ""),
            "source": headers.get("x-meshgate-source"),
            "consumer": _consumer(headers.get("x-meshgate-consumer")),
            "headers": headers,
            "body_bytes": body,
        }
        return 200, json.dumps(doc).encode()

    async def _call(self, service: str, target: str, headers: dict[str, str]) -> tuple[int, bytes]:
        proxy = self.state.proxy
        if proxy is None:
            return 500, b'{"error": "started without --proxy"}'
        try:
            reader, writer = await asyncio.open_connection(*proxy)
        except OSError as exc:
            return 502, json.dumps({"error": f"sidecar unreachable: {exc}"}).encode()
        # The trace context goes on with the call, as an instrumented service passes it.
        context = "".join(f"{name}: {headers[name]}\r\n" for name in _PROPAGATED if name in headers)
        try:
            writer.write(
                f"GET http://{service}{target} HTTP/1.1\r\nHost: {service}\r\n{context}"
                "Connection: close\r\n\r\n".encode()
            )
            data = await reader.read()
        finally:
            writer.close()
        head, _, payload = data.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 502
        doc = {
            "service": self.state.name,
            "instance": self.state.instance,
            "source": headers.get("x-meshgate-source"),
            "consumer": _consumer(headers.get("x-meshgate-consumer")),
            "called": service,
            "status": status,
            "answer": _maybe_json(payload),
        }
        return status, json.dumps(doc).encode()

    def _send(self, status: int, payload: bytes, keep_alive: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        state = self.state
        head = (
            f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
            f"content-length: {len(payload)}\r\nx-served-by: {state.instance}\r\n"
        )
        if not keep_alive:
            head += "connection: close\r\n"
        transport.write(head.encode() + b"\r\n" + payload)
        if not keep_alive:
            transport.close()


# What a service passes from the request it serves to the calls it makes: the trace, and
# the API consumer the edge gateway vouched for.
_PROPAGATED = ("traceparent", "tracestate", "x-meshgate-consumer")


def _consumer(token: str | None) -> dict[str, object] | None:
    """The claims of the consumer token the sidecar let through (it checked the signature;
    an app only reads them)."""
    if not token:
        return None
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return None
    if not isinstance(claims, dict):
        return None
    return {k: claims.get(k) for k in ("product", "application", "account", "plan")}


def _maybe_json(payload: bytes) -> object:
    try:
        return json.loads(payload)
    except ValueError:
        return payload.decode("utf-8", "replace")


async def serve(
    name: str,
    version: str,
    host: str,
    port: int,
    instance: str | None = None,
    proxy: tuple[str, int] | None = None,
) -> asyncio.AbstractServer:
    state = _State(name, version, instance or f"{name}-{version}-{port}", proxy)
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: ServiceProtocol(state), host, port)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--version", default="v1")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--instance")
    parser.add_argument("--proxy", help="HOST:PORT of the sidecar's outbound proxy")
    args = parser.parse_args(argv)
    proxy = None
    if args.proxy:
        host, _, port = args.proxy.rpartition(":")
        proxy = (host, int(port))

    async def run() -> None:
        server = await serve(args.name, args.version, args.host, args.port, args.instance, proxy)
        async with server:
            await server.serve_forever()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
