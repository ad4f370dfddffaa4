"""A reload applies a routes file's top-level settings: the routes that read a changed one
are drained and restarted against the new value; a new HTTP address is bound first."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from harness import free_port
from integration_kit import run

from meshgate.integration import IntegrationContext
from meshgate.integration._component import Component, Endpoint, Producer
from meshgate.integration._message import Exchange
from meshgate.integration._reload import RoutesReloader
from meshgate.integration._uri import EndpointUri
from meshgate.integration._yaml import load_routes
from meshgate.integration.testing import mock_endpoint

WEB = """
http: {{listen: "127.0.0.1:{port}"}}
routes:
  - id: web
    from: "http:/ping"
    steps: [{{delay: 300ms}}, {{transform: {{value: pong}}}}]
  - id: other
    from: direct:other
    steps: [{{to: "mock:other"}}]
"""


async def _running(file: Path) -> tuple[IntegrationContext, RoutesReloader]:
    """The routes of ``file`` started with its settings, as ``meshgate integration run`` does."""
    context = IntegrationContext()
    loaded = load_routes(file, context=context)
    context.settings = dict(loaded.settings)
    context.add_routes(loaded.routes)
    await context.start()
    return context, RoutesReloader(context, file, grace=5.0)


async def _refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


def test_a_changed_listen_address_moves_the_http_routes_after_their_requests_finish(
    tmp_path: Path,
) -> None:
    old, new = free_port(), free_port()
    file = tmp_path / "routes.yaml"
    file.write_text(WEB.format(port=old))

    async def main() -> None:
        context, reloader = await _running(file)
        try:
            async with httpx.AsyncClient(timeout=5) as client:
                in_flight = asyncio.ensure_future(client.get(f"http://127.0.0.1:{old}/ping"))
                while context.route_stats("web")["inflight"] == 0:
                    await asyncio.sleep(0.005)
                file.write_text(WEB.format(port=new))
                result = await reloader.reload()
                assert (result.settings, result.kept) == (["http_listen"], {})
                assert (result.stopped, result.started, result.failed) == (["web"], ["web"], {})
                answer = await in_flight
                assert (answer.status_code, answer.text) == (200, "pong")
                moved = await client.get(f"http://127.0.0.1:{new}/ping")
                assert (moved.status_code, moved.text) == (200, "pong")
            assert await _refused(old)
            # The route that reads no changed setting kept running.
            await context.send("direct:other", "still")
            assert mock_endpoint(context, "mock:other").bodies == ["still"]
            assert context.settings["http_listen"] == f"127.0.0.1:{new}"
        finally:
            await context.stop(grace=2.0)

    run(main)


def test_an_address_that_cannot_be_bound_keeps_the_routes_on_the_old_one(
    tmp_path: Path,
) -> None:
    old = free_port()
    file = tmp_path / "routes.yaml"
    file.write_text(WEB.format(port=old))

    async def main() -> None:
        busy = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        taken = busy.sockets[0].getsockname()[1]
        context, reloader = await _running(file)
        try:
            file.write_text(WEB.format(port=taken))
            result = await reloader.reload()
            assert f"cannot listen on 127.0.0.1:{taken}" in result.kept["http.listen"]
            assert (result.settings, result.stopped, result.started) == ([], [], [])
            assert context.settings["http_listen"] == f"127.0.0.1:{old}"
            assert context.route_status("web") == "started"
            async with httpx.AsyncClient(timeout=5) as client:
                answer = await client.get(f"http://127.0.0.1:{old}/ping")
            assert (answer.status_code, answer.text) == (200, "pong")
        finally:
            await context.stop(grace=2.0)
            busy.close()

    run(main)


def _other_db(redis_url: str) -> str:
    parts = urlsplit(redis_url)
    db = int(parts.path.strip("/") or 0)
    return urlunsplit(parts._replace(path=f"/{(db + 1) % 16}"))


REDIS = """
redis_url: "{url}"
routes:
  - id: produce
    from: direct:in
    steps: [{{to: "redis:{stream}"}}]
  - id: consume
    from: "redis:{stream}?group=g&block=50ms"
    steps: [{{to: "mock:got"}}]
  - id: other
    from: direct:other
    steps: [{{to: "mock:other"}}]
"""


@pytest.fixture
def stream(redis_url: str) -> Iterator[str]:
    import redis

    name = f"meshgate-reload-{uuid.uuid4().hex[:10]}"
    yield name
    for url in (redis_url, _other_db(redis_url)):
        client = redis.Redis.from_url(url)
        client.delete(name)
        client.close()


def test_a_changed_redis_url_restarts_the_routes_that_use_redis_against_it(
    redis_url: str, stream: str, tmp_path: Path
) -> None:
    import redis

    moved_to = _other_db(redis_url)
    file = tmp_path / "routes.yaml"
    file.write_text(REDIS.format(url=redis_url, stream=stream))

    async def main() -> None:
        context, reloader = await _running(file)
        got = mock_endpoint(context, "mock:got")
        try:
            await context.send("direct:in", "first")
            await got.wait_for(1)
            file.write_text(REDIS.format(url=moved_to, stream=stream))
            result = await reloader.reload()
            assert result.settings == ["redis_url"]
            assert (result.stopped, result.started) == (
                ["produce", "consume"],
                ["produce", "consume"],
            )
            await context.send("direct:in", "second")
            await got.wait_for(2)
            assert got.bodies == [b"first", b"second"]
            await context.send("direct:other", "untouched")
            assert mock_endpoint(context, "mock:other").bodies == ["untouched"]
        finally:
            await context.stop(grace=2.0)

    run(main)
    for url, body in ((redis_url, b"first"), (moved_to, b"second")):
        client = redis.Redis.from_url(url)
        try:
            assert [fields[b"body"] for _, fields in client.xrange(stream)] == [body]
        finally:
            client.close()


def test_a_setting_read_by_no_route_restarts_none_and_an_unknown_one_restarts_all(
    tmp_path: Path,
) -> None:
    routes = "routes: [{id: a, from: 'direct:a', steps: [{to: 'mock:a'}]}]\n"
    file = tmp_path / "routes.yaml"
    file.write_text(routes)

    async def main() -> None:
        context, reloader = await _running(file)
        try:
            file.write_text('amqp_url: "amqp://guest:guest@127.0.0.1:1/"\n' + routes)
            result = await reloader.reload()
            assert (result.settings, result.stopped) == (["amqp_url"], [])
            # A setting of which no scheme is known to read (set by an embedding program):
            # every route may read it, so every route restarts.
            context.settings["custom"] = "before"
            result = await reloader.reload()
            assert (result.settings, result.stopped, result.started) == (["custom"], ["a"], ["a"])
            await context.send("direct:a", "after")
            assert mock_endpoint(context, "mock:a").bodies == ["after"]
        finally:
            await context.stop(grace=2.0)

    run(main)


DATABASE = """
database_url: "sqlite:///{db}"
routes:
  - id: inbox
    from: "file:{inbox}?delay=10&initial_delay=0&read_lock=none&noop=true&idempotent_repository=sql"
    steps: [{{to: "mock:inbox"}}]
  - id: dedupe
    from: direct:dedupe
    steps:
      - idempotent_consumer:
          expr: body
          repository: sql
          steps: [{{to: "mock:dedupe"}}]
  - id: query
    from: direct:query
    steps: [{{to: "sql:select 1 as one"}}]
  - id: plain
    from: direct:plain
    steps: [{{to: "mock:plain"}}]
"""


def test_a_changed_database_url_restarts_its_readers_and_disposes_the_old_pool(
    tmp_path: Path,
) -> None:
    """A route that reads database_url only through a 'sql' repository (an option of its
    'from', a step's repository) restarts against the new database like a sql endpoint;
    the pool of the database no route uses any more is disposed."""
    from meshgate.integration._sql_state import _ENGINES, database_url
    from meshgate.integration.components.sql import SqlComponent

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    old, new = tmp_path / "old.db", tmp_path / "new.db"
    file = tmp_path / "routes.yaml"
    file.write_text(DATABASE.format(db=old, inbox=inbox))

    async def main() -> None:
        context, reloader = await _running(file)
        try:
            (inbox / "a.txt").write_text("a")
            await mock_endpoint(context, "mock:inbox").wait_for(1)
            await context.send("direct:query", None)
            assert database_url(f"sqlite:///{old}") in _ENGINES
            file.write_text(DATABASE.format(db=new, inbox=inbox))
            result = await reloader.reload()
            assert result.settings == ["database_url"]
            assert sorted(result.stopped) == ["dedupe", "inbox", "query"]
            assert sorted(result.started) == ["dedupe", "inbox", "query"]
            # The new database has not seen a.txt: it is taken again.
            await mock_endpoint(context, "mock:inbox").wait_for(2)
            await context.send("direct:query", None)
            sql = context.components["sql"]
            assert isinstance(sql, SqlComponent)
            assert list(sql._databases) == [f"sqlite:///{new}"]
            assert database_url(f"sqlite:///{old}") not in _ENGINES
        finally:
            await context.stop(grace=2.0)
        assert database_url(f"sqlite:///{new}") not in _ENGINES

    run(main)


def test_overlapping_reloads_run_one_after_the_other(tmp_path: Path) -> None:
    """The file watch and SIGHUP may reload at once: the second waits for the first, so
    that a route is never stopped or started twice at the same time."""
    slow = "routes: [{id: a, from: 'direct:a', steps: [{delay: 200ms}, {to: 'mock:a'}]}]\n"
    file = tmp_path / "routes.yaml"
    file.write_text(slow)

    async def main() -> None:
        context, reloader = await _running(file)
        try:
            task = asyncio.create_task(context.send("direct:a", "in flight"))
            while context.route_stats("a")["inflight"] == 0:  # the stop has one to drain
                await asyncio.sleep(0.01)
            file.write_text(slow.replace("mock:a", "mock:b"))
            first, second = await asyncio.gather(reloader.reload(), reloader.reload())
            await task
            assert (first.stopped, first.started, first.failed) == (["a"], ["a"], {})
            assert (second.stopped, second.started, second.failed) == ([], [], {})
            assert context.route_status("a") == "started"
            await context.send("direct:a", "after")
            assert mock_endpoint(context, "mock:b").bodies == ["after"]
        finally:
            await context.stop(grace=2.0)

    run(main)


RECIPIENTS = """
redis_url: "{url}"
routes:
  - id: fan
    from: direct:in
    steps: [{{recipient_list: "headers.to"}}]
"""


def test_a_changed_setting_renews_the_producers_a_recipient_list_made(
    redis_url: str, stream: str, tmp_path: Path
) -> None:
    import redis

    moved_to = _other_db(redis_url)
    file = tmp_path / "routes.yaml"
    file.write_text(RECIPIENTS.format(url=redis_url))
    target = {"to": f"redis:{stream}"}

    async def main() -> None:
        context, reloader = await _running(file)
        try:
            assert (await context.send("direct:in", "first", target)).exception is None
            file.write_text(RECIPIENTS.format(url=moved_to))
            result = await reloader.reload()
            # The route's definition names no redis endpoint: it keeps running...
            assert (result.settings, result.stopped) == (["redis_url"], [])
            # ...and the producer it made at run time is made anew, against the new server.
            assert (await context.send("direct:in", "second", target)).exception is None
        finally:
            await context.stop(grace=2.0)

    run(main)
    for url, body in ((redis_url, b"first"), (moved_to, b"second")):
        client = redis.Redis.from_url(url)
        try:
            assert [fields[b"body"] for _, fields in client.xrange(stream)] == [body]
        finally:
            client.close()


class _Recorded(Component):
    """Producers that take a moment to start and remember the setting they started with."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.stopped: list[str] = []

    def create_endpoint(self, uri: EndpointUri, context: IntegrationContext) -> Endpoint:
        component = self

        class _Endpoint(Endpoint):
            def create_producer(self) -> Producer:
                return _Producer(self, component)

        return _Endpoint(uri, context)


class _Producer(Producer):
    def __init__(self, endpoint: Endpoint, component: _Recorded) -> None:
        super().__init__(endpoint)
        self.component = component
        self.setting = ""

    async def start(self) -> None:
        # Reads its setting, then connects (takes a moment), as a broker client does.
        self.setting = str(self.endpoint.context.settings.get("x_url"))
        await asyncio.sleep(0.05)
        self.component.started.append(self.setting)

    async def stop(self) -> None:
        self.component.stopped.append(self.setting)

    async def process(self, exchange: Exchange) -> None:
        exchange.message.headers["via"] = self.setting


def test_run_time_producers_start_once_per_uri_and_anew_across_a_renewal() -> None:
    recorded = _Recorded()

    async def main() -> None:
        context = IntegrationContext({"rec": recorded}, settings={"x_url": "old"})
        await context.start()
        try:
            # Three first uses at once: one producer, started once.
            producers = await asyncio.gather(*(context.dynamic_producer("rec:a") for _ in range(3)))
            assert len({id(p) for p in producers}) == 1 and recorded.started == ["old"]
            # A renewal while a producer starts: the one started with the old setting is
            # stopped and made anew.
            starting = asyncio.ensure_future(context.dynamic_producer("rec:b"))
            await asyncio.sleep(0.01)
            context.settings["x_url"] = "new"
            context.renew_dynamic_producers(lambda uri: True, grace=30)
            assert (await starting).setting == "new"
            assert (await context.dynamic_producer("rec:a")).setting == "new"
        finally:
            started = asyncio.get_running_loop().time()
            # The renewed producers' 30 s grace does not hold the stop up.
            assert await context.stop(grace=5)
            assert asyncio.get_running_loop().time() - started < 1
        assert sorted(recorded.stopped) == ["new", "new", "old", "old"]

    run(main)
