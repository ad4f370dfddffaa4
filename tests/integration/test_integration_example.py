"""The bundled example routes (``meshgate/examples/routes.yaml``), as a user runs them.

``meshgate integration run routes.yaml`` in a process of its own, against the real
RabbitMQ (big orders land on the queue ``big-orders``); and ``start_example``, which
``meshgate up`` calls, with and without a broker.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness import free_port, wait_port
from integration_kit import run

from meshgate.integration import RouteStartError
from meshgate.integration.example import (
    BROKER_STEP,
    FALLBACK_STEP,
    example_path,
    start_example,
)

COMMAND = [sys.executable, "-m", "meshgate", "integration", "run"]


@dataclass
class Runtime:
    url: str
    stderr: Path
    proc: subprocess.Popen[bytes]

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")

    def wait_log(self, text: str, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                break
            time.sleep(0.05)
        return self.log()


@pytest.fixture(scope="module")
def runtime(amqp_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runtime]:
    """The example file run as written; a copy naming the broker when MESHGATE_AMQP_URL
    points elsewhere than the default."""
    workdir = tmp_path_factory.mktemp("example")
    routes = example_path()
    if os.environ.get("MESHGATE_AMQP_URL"):
        shutil.copytree(routes.parent, workdir / "examples")
        routes = workdir / "examples" / "routes.yaml"
        routes.write_text(routes.read_text() + f"amqp_url: {json.dumps(amqp_url)}\n")
    port = free_port()
    stderr = workdir / "run.err"
    with open(stderr, "wb") as err:
        proc = subprocess.Popen(
            [*COMMAND, str(routes), "--http-listen", f"127.0.0.1:{port}"],
            cwd=workdir,
            stderr=err,
        )
    runtime = Runtime(f"http://127.0.0.1:{port}/orders", stderr, proc)
    try:
        wait_port(port, proc=proc)
        assert "integration routes started: orders, small" in runtime.wait_log("started")
        yield runtime
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(20)
    assert code == 0, runtime.log()
    assert "Traceback" not in runtime.log()


def order_id() -> str:
    return f"test-{uuid.uuid4().hex[:12]}"


async def take_message(amqp_url: str, queue: str, wanted: str, timeout: float = 10.0) -> Any:
    """The message of order ``wanted`` from ``queue``, acknowledged; others are put back."""
    import aio_pika

    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, durable=True)
        others = []
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                message = await declared.get(no_ack=False, fail=False)
                if message is None:
                    await asyncio.sleep(0.05)
                    continue
                if json.loads(message.body).get("id") == wanted:
                    await message.ack()
                    return message
                others.append(message)
        finally:
            for message in others:
                await message.nack(requeue=True)
    return None


def test_a_small_order_is_accepted_and_logged_by_the_small_route(runtime):
    wanted = order_id()
    reply = httpx.post(runtime.url, json={"id": wanted, "total": 250, "customer": "ada"})
    assert reply.status_code == 200
    assert reply.json() == {"accepted": True, "id": wanted}
    assert reply.headers["content-type"] == "application/json"
    assert "priority" not in reply.headers
    assert f"small order {wanted}" in runtime.wait_log(f"small order {wanted}")


def test_a_big_order_goes_to_the_big_orders_queue_with_priority_high(runtime, amqp_url):
    wanted = order_id()
    order = {"id": wanted, "total": 5000, "items": [{"sku": "x", "quantity": 2}]}
    reply = httpx.post(runtime.url, json=order)
    assert (reply.status_code, reply.json()) == (200, {"accepted": True, "id": wanted})
    message = run_value(take_message(amqp_url, "big-orders", wanted))
    assert message is not None, "the order never reached the queue big-orders"
    assert json.loads(message.body) == order
    priority = message.headers["priority"]
    assert (priority.decode() if isinstance(priority, bytes) else priority) == "high"
    assert message.content_type == "application/json"
    assert f"small order {wanted}" not in runtime.log()


def test_a_chunked_order_with_expect_100_continue_is_read_whole(runtime):
    wanted = order_id()

    async def pieces() -> AsyncIterator[bytes]:
        yield b'{"id": "' + wanted.encode()
        yield b'", "total": 12.5}'

    async def post() -> httpx.Response:
        async with httpx.AsyncClient() as client:
            return await client.post(
                runtime.url,
                content=pieces(),
                headers={"content-type": "application/json", "expect": "100-continue"},
            )

    reply = run_value(post())
    assert (reply.status_code, reply.json()) == (200, {"accepted": True, "id": wanted})


def test_malformed_json_is_400(runtime):
    reply = httpx.post(runtime.url, content=b'{"id": "x", "total": ', headers=_json())
    assert reply.status_code == 400
    assert reply.headers["content-type"] == "application/problem+json"
    assert reply.json()["detail"].startswith("malformed JSON")


@pytest.mark.parametrize(
    ("order", "field"),
    [
        ({"id": "x", "total": "a lot"}, "body.total: 'a lot' is not of type 'number'"),
        ({"id": "x"}, "'total' is a required property"),
        ({"id": "x", "total": 1, "items": [{"sku": "a", "quantity": 0}]}, "quantity"),
    ],
)
def test_an_order_failing_its_schema_is_422_naming_the_field(runtime, order, field):
    reply = httpx.post(runtime.url, json=order)
    assert reply.status_code == 422
    assert reply.headers["content-type"] == "application/problem+json"
    assert field in reply.json()["detail"]


def test_an_oversized_body_is_413(runtime):
    big = b'{"id": "x", "total": 1, "pad": "' + b"p" * (1024 * 1024) + b'"}'
    reply = httpx.post(runtime.url, content=big, headers=_json())
    assert reply.status_code == 413
    assert "exceeds 1048576 bytes" in reply.json()["detail"]


def test_get_is_405(runtime):
    reply = httpx.get(runtime.url)
    assert reply.status_code == 405
    assert reply.headers["allow"] == "POST"


def _json() -> dict[str, str]:
    return {"content-type": "application/json"}


def run_value(work: Any) -> Any:
    box: list[Any] = []

    async def main() -> None:
        box.append(await work)

    run(main)
    return box[0]


def test_the_example_holds_the_broker_step_start_example_replaces() -> None:
    text = example_path().read_text()
    assert f"to: {BROKER_STEP}\n" in text
    assert (example_path().parent / "schemas" / "order.json").is_file()


def test_start_example_publishes_big_orders_when_rabbitmq_answers(amqp_url: str) -> None:
    listen = f"127.0.0.1:{free_port()}"
    wanted = order_id()

    async def main() -> None:
        example = await start_example(listen, amqp_url=amqp_url)
        try:
            assert example.broker is not None
            assert example.url == f"http://{listen}/orders"
            assert any(example.url in line for line in example.usage())
            async with httpx.AsyncClient() as client:
                reply = await client.post(example.url, json={"id": wanted, "total": 1001})
            assert reply.json() == {"accepted": True, "id": wanted}
            message = await take_message(amqp_url, "big-orders", wanted)
            assert message is not None
        finally:
            await example.stop()

    run(main)


def test_start_example_runs_without_a_broker(caplog: pytest.LogCaptureFixture) -> None:
    listen = f"127.0.0.1:{free_port()}"
    wanted = order_id()
    caplog.set_level("INFO")

    async def main() -> None:
        example = await start_example(
            listen, amqp_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/"
        )
        try:
            assert example.broker is None
            assert "RabbitMQ is not available" in "\n".join(example.usage())
            async with httpx.AsyncClient() as client:
                reply = await client.post(example.url, json={"id": wanted, "total": 5000})
                assert reply.json() == {"accepted": True, "id": wanted}
                assert reply.headers["priority"] == "high"
                reply = await client.post(example.url, json={"id": "s", "total": 5})
                assert reply.status_code == 200
        finally:
            await example.stop()

    run(main)
    logged = caplog.text
    assert f"big orders go to {FALLBACK_STEP} instead" in logged
    assert f"'id': '{wanted}'" in logged  # the log endpoint that stands for the broker
    assert "small order s" in logged


def test_start_example_on_a_taken_address_fails_and_leaves_nothing_running() -> None:
    async def main() -> None:
        before = asyncio.all_tasks()
        blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = blocker.sockets[0].getsockname()[1]
        try:
            with pytest.raises(RouteStartError, match="cannot listen on"):
                await start_example(f"127.0.0.1:{port}", amqp_url="amqp://127.0.0.1:1/")
        finally:
            blocker.close()
            await blocker.wait_closed()
        await asyncio.sleep(0.05)
        assert asyncio.all_tasks() == before

    run(main)
