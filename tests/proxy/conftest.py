"""One real gateway process for the engine's tests, in front of real upstreams.

Products (all plain proxies unless said otherwise):
- ``/echo``      the bundled echo upstream
- ``/slow``      a second echo upstream, upstream response timeout 0.5 s
- ``/rec``       :class:`RecordingUpstream` (counts connections, records requests)
- ``/small``     the recording upstream, max_body_size 8192
- ``/rslow``     a second recording upstream, upstream response timeout 0.5 s
- ``/api``       the example product (API keys, mapping rules) on the recording upstream
- ``/dead``      a port nothing listens on
- ``/blackhole`` a listener whose accept queue is full: connecting never completes;
  max_body_size 8192

Products with their own upstream timeouts get their own upstream: the gateway keeps one
pool per backend address, and its timeouts are those of the last product built on it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import Gateway, echo_upstream, example_product, free_port, gateway_config, run_gateway
from proxy_helpers import HEADER_LIMIT, SMALL_LIMIT, RecordingUpstream, get, plain_product, request


@dataclass
class ProxyEnv:
    gateway: Gateway
    recorder: RecordingUpstream
    slow_recorder: RecordingUpstream
    echo_port: int
    slow_echo_port: int

    @property
    def port(self) -> int:
        return self.gateway.port

    def assert_serving(self) -> None:
        """The gateway process is alive and answers a normal request on a new connection."""
        assert self.gateway.proc.popen.poll() is None, self.gateway.proc.stderr()
        reply = request(self.port, get("/echo/still-alive"))
        assert reply.status == 200
        assert reply.json()["path"] == "/still-alive"


def _blackhole() -> tuple[socket.socket, list[socket.socket]]:
    """A listening socket whose accept queue is full, so new SYNs go unanswered."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(listener.getsockname())
        fillers.append(s)
    return listener, fillers


@pytest.fixture(scope="session")
def proxy_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProxyEnv]:
    workdir: Path = tmp_path_factory.mktemp("proxy")
    recorder = RecordingUpstream()
    slow_recorder = RecordingUpstream()
    listener, fillers = _blackhole()
    api = example_product(
        recorder.port,
        name="api",
        path_prefix="/api",
        plans=[
            {
                "name": "basic",
                "limits": [
                    {"metric": "hits", "period": "day", "value": 1_000_000},
                    {"metric": "search", "period": "day", "value": 1_000_000},
                ],
            }
        ],
    )
    with echo_upstream(workdir) as echo_port, echo_upstream(workdir) as slow_port:
        config = gateway_config(
            [
                plain_product("echo", "/echo", echo_port),
                plain_product("slow", "/slow", slow_port, upstream_response_timeout=0.5),
                plain_product("rec", "/rec", recorder.port),
                plain_product("small", "/small", recorder.port, max_body_size=SMALL_LIMIT),
                plain_product("rslow", "/rslow", slow_recorder.port, upstream_response_timeout=0.5),
                plain_product("dead", "/dead", free_port()),
                plain_product(
                    "blackhole",
                    "/blackhole",
                    listener.getsockname()[1],
                    upstream_connect_timeout=0.3,
                    max_body_size=SMALL_LIMIT,
                ),
                api,
            ],
            timeouts={"client_header": 1.0, "idle_keepalive": 2.0, "client_body": 1.0},
            max_header_size=HEADER_LIMIT,
        )
        with run_gateway(config, workdir, name="proxy-gateway") as gw:
            env = ProxyEnv(gw, recorder, slow_recorder, echo_port, slow_port)
            yield env
            assert gw.proc.popen.poll() is None, "the gateway died during the tests"
    recorder.close()
    slow_recorder.close()
    listener.close()
    for s in fillers:
        s.close()
