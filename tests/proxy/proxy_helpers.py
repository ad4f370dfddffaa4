"""Wire-level tools for the engine's end-to-end tests.

- :class:`RawClient` speaks HTTP/1.1 over a plain socket and returns responses exactly
  as they arrived (status line, header fields in order, body framing).
- :class:`RecordingUpstream` is a small threaded HTTP/1.1 server that counts the
  connections it accepts and records every request it receives, complete or not, so a
  test can assert what the gateway forwarded (and what it never did).
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field


class Incomplete(Exception):
    """The peer closed (or went silent) before a complete message arrived."""


@dataclass
class Reply:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    head: bytes
    chunked: bool = False
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def get(self, name: str) -> str | None:
        key = name.lower().encode()
        for k, v in self.headers:
            if k == key:
                return v.decode("latin-1")
        return None

    def get_all(self, name: str) -> list[str]:
        key = name.lower().encode()
        return [v.decode("latin-1") for k, v in self.headers if k == key]

    def names(self) -> set[str]:
        return {k.decode("latin-1") for k, _ in self.headers}

    def json(self) -> dict:  # type: ignore[type-arg]
        return json.loads(self.body)  # type: ignore[no-any-return]


class _Reader:
    """Buffered reads from a socket with line and exact-size helpers."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.eof = False

    def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = self.sock.recv(1 << 20)
        except TimeoutError:
            raise Incomplete("timed out waiting for data") from None
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def until(self, marker: bytes) -> bytes:
        while True:
            i = self.buf.find(marker)
            if i >= 0:
                out = bytes(self.buf[: i + len(marker)])
                del self.buf[: i + len(marker)]
                return out
            if not self._fill():
                raise Incomplete(f"connection closed before {marker!r}: {bytes(self.buf)!r}")

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise Incomplete(f"connection closed after {len(self.buf)} of {n} bytes")
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def rest(self) -> bytes:
        while self._fill():
            pass
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def closed(self, timeout: float) -> bool:
        """True when the peer closes within ``timeout`` with nothing more sent."""
        self.sock.settimeout(timeout)
        try:
            return not self.buf and not self._fill()
        except Incomplete:
            return False


def parse_head(head: bytes) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    lines = head[:-4].split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    assert version == b"HTTP/1.1", f"status line {lines[0]!r}"
    status, _, reason = rest.partition(b" ")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        assert sep and name == name.strip(), f"bad header line {line!r}"
        headers.append((name.lower(), value.strip()))
    return int(status), reason, headers


def _read_chunked(reader: _Reader) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    body = bytearray()
    while True:
        size_line = reader.until(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        body += reader.exactly(size)
        assert reader.exactly(2) == b"\r\n"
    trailers = []
    while (line := reader.until(b"\r\n")) != b"\r\n":
        name, _, value = line[:-2].partition(b":")
        trailers.append((name.lower(), value.strip()))
    return bytes(body), trailers


class RawClient:
    """One client connection; send bytes as given, read responses one at a time."""

    def __init__(self, port: int, timeout: float = 10.0, host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.reader = _Reader(self.sock)

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_response(self, method: str = "GET", interim: bool = False) -> Reply:
        """Read the next response; ``interim`` returns a 1xx instead of skipping it."""
        while True:
            head = self.reader.until(b"\r\n\r\n")
            status, reason, headers = parse_head(head)
            if 100 <= status < 200:
                if interim:
                    return Reply(status, reason, headers, b"", head)
                continue
            break
        reply = Reply(status, reason, headers, b"", head)
        te = reply.get("transfer-encoding")
        length = reply.get("content-length")
        if method == "HEAD" or status in (204, 304):
            return reply
        if te is not None:
            assert te.lower() == "chunked", te
            reply.chunked = True
            reply.body, reply.trailers = _read_chunked(self.reader)
        elif length is not None:
            reply.body = self.reader.exactly(int(length))
        else:
            reply.body = self.reader.rest()
        return reply

    def drain(self, size: int) -> int:
        """Read and discard ``size`` body bytes without keeping them; return the count."""
        received = min(len(self.reader.buf), size)
        del self.reader.buf[:received]
        buf = bytearray(1 << 20)
        while received < size:
            n = self.sock.recv_into(buf, min(len(buf), size - received))
            if not n:
                break
            received += n
        return received

    def exchange(self, data: bytes, method: str = "GET") -> Reply:
        self.send(data)
        return self.read_response(method)

    def closed(self, timeout: float = 2.0) -> bool:
        return self.reader.closed(timeout)


def request(
    port: int,
    data: bytes,
    method: str = "GET",
    timeout: float = 10.0,
) -> Reply:
    """One request on a fresh connection."""
    with RawClient(port, timeout) as client:
        return client.exchange(data, method)


def get(path: str, *extra: str, method: str = "GET", version: str = "1.1") -> bytes:
    """A request head without body: ``get("/echo/a", "X-A: 1")``."""
    lines = [f"{method} {path} HTTP/{version}", "Host: gw.test", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunked(*pieces: bytes, trailers: bytes = b"") -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p)
    return out + b"0\r\n" + trailers + b"\r\n"


# The gateway under test

SMALL_LIMIT = 8192
HEADER_LIMIT = 4096


def plain_product(name: str, prefix: str, backend_port: int, **extra: object) -> dict[str, object]:
    """A product that makes the gateway a plain proxy: no credentials, no limits."""
    product: dict[str, object] = {
        "name": name,
        "hosts": ["*"],
        "path_prefix": prefix,
        "backend": f"http://127.0.0.1:{backend_port}",
        "auth": {"type": "none", "default_application": "anon"},
        "plans": [{"name": "open"}],
        "applications": [{"id": "anon", "plan": "open"}],
    }
    product.update(extra)
    return product


# The recording upstream


@dataclass
class Received:
    """A request as the upstream saw it."""

    connection: int
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes
    complete: bool
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name.lower():
                return v
        return None

    def header_names(self) -> list[str]:
        return [k for k, _ in self.headers]


# A script answers a request: the raw response (bytes, or pieces sent one by one, which
# may sleep in between) and whether to close the connection after it.
Script = Callable[[Received], tuple[bytes | Iterable[bytes], bool]]


def default_reply(req: Received) -> tuple[bytes | Iterable[bytes], bool]:
    doc = {
        "method": req.method,
        "target": req.target,
        "headers": req.headers,
        "length": len(req.body),
        "sha256": hashlib.sha256(req.body).hexdigest(),
    }
    body = json.dumps(doc).encode()
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
    return head % len(body) + body, False


class RecordingUpstream:
    """A threaded HTTP/1.1 upstream that records what it receives.

    ``scripts`` maps a request target to a function returning the raw response bytes
    and whether to close the connection after them; other targets get a JSON echo.
    """

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(256)
        self.port: int = self.listener.getsockname()[1]
        self.scripts: dict[str, Script] = {}
        self.received: list[Received] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop = True
        self.listener.close()

    def requests_for(self, target_part: str) -> list[Received]:
        with self._lock:
            return [r for r in self.received if target_part in r.target]

    def wait_for(self, target_part: str, count: int = 1, timeout: float = 5.0) -> list[Received]:
        """Requests whose head arrived; they may still be incomplete."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.requests_for(target_part)
            if len(found) >= count:
                return found
            time.sleep(0.01)
        raise AssertionError(f"upstream saw {self.requests_for(target_part)} for {target_part}")

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                number = self.connections
            threading.Thread(target=self._serve, args=(conn, number), daemon=True).start()

    def _record(self, req: Received) -> None:
        with self._lock:
            self.received.append(req)

    def _serve(self, conn: socket.socket, number: int) -> None:
        reader = _Reader(conn)
        conn.settimeout(30)
        with conn:
            while True:
                try:
                    head = reader.until(b"\r\n\r\n")
                except Incomplete:
                    return
                lines = head[:-4].decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = []
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers.append((name.lower(), value.strip()))
                req = Received(number, method, target, headers, b"", False)
                self._record(req)  # seen from its head on; ``complete`` once the body is in
                try:
                    if req.header("transfer-encoding") == "chunked":
                        req.body, req.trailers = _read_chunked(reader)
                    elif (length := req.header("content-length")) is not None:
                        req.body = reader.exactly(int(length))
                except (Incomplete, ValueError, AssertionError):
                    req.body = bytes(reader.buf)
                    return
                req.complete = True
                script = self.scripts.get(target, default_reply)
                data, close = script(req)
                try:
                    for piece in [data] if isinstance(data, bytes) else data:
                        conn.sendall(piece)
                except OSError:
                    return
                if close:
                    return


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()
