"""The admin listener over real sockets: /metrics, /healthz, /routes and route control."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from harness import free_port, wait_port
from integration_kit import run
from typer.testing import CliRunner

from meshgate.integration import IntegrationContext, IntegrationError, RouteStartError, from_
from meshgate.integration._admin import AdminListener
from meshgate.integration._reload import RoutesReloader
from meshgate.integration._yaml import load_routes
from meshgate.integration.cli import app
from meshgate.integration.testing import mock_endpoint

COMMAND = [sys.executable, "-c", "from meshgate.integration.cli import app; app()"]


async def _with_admin(context: IntegrationContext, scenario: object) -> None:
    admin = AdminListener(context, "127.0.0.1:0", grace=2.0)
    await admin.start()
    try:
        async with httpx.AsyncClient(base_url=admin.url, timeout=5) as client:
            await scenario(client)  # type: ignore[operator]
    finally:
        await admin.stop()
        await context.stop(grace=2.0)


def test_routes_are_listed_with_status_from_and_stats() -> None:
    async def main() -> None:
        context = IntegrationContext()
        context.add_routes(
            [
                from_("direct:orders", id="orders").to("mock:out").build(),
                replace(from_("direct:idle", id="idle").to("mock:idle").build(), auto_start=False),
            ]
        )
        await context.start()
        await context.send("direct:orders", {"id": 1})

        async def scenario(client: httpx.AsyncClient) -> None:
            listed = await client.get("/routes")
            assert listed.status_code == 200
            assert listed.headers["content-type"] == "application/json"
            assert listed.json() == {
                "routes": [
                    {
                        "id": "orders",
                        "status": "started",
                        "from": "direct:orders",
                        "stats": {"inflight": 0, "completed": 1, "failed": 0},
                    },
                    {
                        "id": "idle",
                        "status": "stopped",
                        "from": "direct:idle",
                        "stats": {"inflight": 0, "completed": 0, "failed": 0},
                    },
                ]
            }
            one = await client.get("/routes/idle")
            assert (one.status_code, one.json()["status"]) == (200, "stopped")
            health = await client.get("/healthz")
            assert health.status_code == 200
            assert health.json() == {"status": "ok", "routes": {"started": 1, "stopped": 1}}
            metrics = await client.get("/metrics")
            assert metrics.status_code == 200
            assert metrics.headers["content-type"].startswith("text/plain")
            assert 'meshgate_integration_route_exchanges_total{route="orders"} 1.0' in metrics.text
            assert (
                'meshgate_integration_step_exchanges_total{route="orders",step="steps[0].to"} 1.0'
                in metrics.text
            )

        await _with_admin(context, scenario)

    run(main)


def test_routes_are_stopped_and_started_through_the_api() -> None:
    async def main() -> None:
        context = IntegrationContext()
        context.add_route(from_("direct:orders", id="orders").to("mock:out").build())
        await context.start()

        async def scenario(client: httpx.AsyncClient) -> None:
            stopped = await client.post("/routes/orders/stop")
            assert (stopped.status_code, stopped.json()["status"]) == (200, "stopped")
            refused = await context.send("direct:orders", "lost")
            assert refused.exception is not None
            started = await client.post("/routes/orders/start")
            assert (started.status_code, started.json()["status"]) == (200, "started")
            await context.send("direct:orders", "taken")
            assert mock_endpoint(context, "mock:out").bodies == ["taken"]

        await _with_admin(context, scenario)

    run(main)


def test_a_suspended_route_finishes_in_flight_and_takes_nothing_new() -> None:
    async def main() -> None:
        context = IntegrationContext()
        context.add_route(from_("seda:work", id="work").delay("200ms").to("mock:done").build())
        await context.start()
        done = mock_endpoint(context, "mock:done")

        async def scenario(client: httpx.AsyncClient) -> None:
            await context.send("seda:work", "first")
            while context.route_stats("work")["inflight"] == 0:
                await asyncio.sleep(0.005)
            suspended = await client.post("/routes/work/suspend")
            assert suspended.status_code == 200
            assert suspended.json()["status"] == "suspended"
            # The exchange in flight when the route was suspended finished.
            assert done.bodies == ["first"]
            assert suspended.json()["stats"] == {"inflight": 0, "completed": 1, "failed": 0}
            await context.send("seda:work", "second")
            await asyncio.sleep(0.3)
            assert done.bodies == ["first"]
            resumed = await client.post("/routes/work/start")
            assert resumed.json()["status"] == "started"
            await done.wait_for(2)
            assert done.bodies == ["first", "second"]

        await _with_admin(context, scenario)

    run(main)


def test_errors_are_problem_documents() -> None:
    async def main() -> None:
        context = IntegrationContext()
        context.add_route(from_("direct:orders", id="orders").to("mock:out").build())
        await context.start()

        async def scenario(client: httpx.AsyncClient) -> None:
            unknown = await client.post("/routes/nope/stop")
            assert unknown.status_code == 404
            assert unknown.headers["content-type"] == "application/problem+json"
            assert unknown.json()["detail"] == "no route 'nope'"
            wrong_action = await client.post("/routes/orders/restart")
            assert wrong_action.status_code == 404
            get_action = await client.get("/routes/orders/stop")
            assert (get_action.status_code, get_action.headers["allow"]) == (405, "POST")
            post_metrics = await client.post("/metrics")
            assert (post_metrics.status_code, post_metrics.headers["allow"]) == (405, "GET, HEAD")
            elsewhere = await client.get("/")
            assert elsewhere.status_code == 404
            assert elsewhere.headers["content-type"] == "application/problem+json"
            assert context.route_status("orders") == "started"

        await _with_admin(context, scenario)

    run(main)


def test_a_route_that_fails_to_start_is_reported_and_the_others_run() -> None:
    async def main() -> None:
        busy = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = busy.sockets[0].getsockname()[1]
        context = IntegrationContext(settings={"http_listen": f"127.0.0.1:{port}"})
        context.add_routes(
            [
                from_("http:/x", id="web").to("mock:web").build(),
                from_("direct:in", id="inner").to("mock:in").build(),
            ]
        )
        try:
            await context.start()
        except RouteStartError:
            pass

        async def scenario(client: httpx.AsyncClient) -> None:
            routes = {r["id"]: r for r in (await client.get("/routes")).json()["routes"]}
            assert routes["inner"]["status"] == "started"
            assert routes["web"]["status"] == "failed"
            assert f"cannot listen on 127.0.0.1:{port}" in routes["web"]["error"]
            retry = await client.post("/routes/web/start")
            assert retry.status_code == 500
            assert retry.headers["content-type"] == "application/problem+json"
            assert "route 'web' failed to start" in retry.json()["detail"]
            await context.send("direct:in", "still served")
            assert mock_endpoint(context, "mock:in").bodies == ["still served"]

        try:
            await _with_admin(context, scenario)
        finally:
            busy.close()

    run(main)


def test_run_serves_the_admin_api(tmp_path: Path) -> None:
    port, admin = free_port(), free_port()
    routes = tmp_path / "routes.yaml"
    routes.write_text(
        f"""
http: {{listen: "127.0.0.1:{port}"}}
routes:
  - id: ping
    from: http:/ping?method=GET
    steps:
      - transform: {{expr: "{{pong: `true`}}"}}
"""
    )
    proc = subprocess.Popen(
        [*COMMAND, "run", str(routes), "--admin-listen", f"127.0.0.1:{admin}"],
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_port(port, proc=proc)
        assert httpx.get(f"http://127.0.0.1:{port}/ping").json() == {"pong": True}
        base = f"http://127.0.0.1:{admin}"
        assert httpx.get(f"{base}/routes").json()["routes"][0]["stats"]["completed"] == 1
        assert 'meshgate_integration_route_exchanges_total{route="ping"} 1.0' in (
            httpx.get(f"{base}/metrics").text
        )
        assert httpx.post(f"{base}/routes/ping/stop").json()["status"] == "stopped"
        # The only http: route stopped, so its listener closed.
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/ping")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err.decode()
    assert f"admin API on http://127.0.0.1:{admin}" in err.decode()


def test_run_refuses_a_bad_admin_address(tmp_path: Path) -> None:
    routes = tmp_path / "routes.yaml"
    routes.write_text("routes: [{id: a, from: 'timer:t', steps: [{log: hi}]}]")
    result = CliRunner().invoke(app, ["run", str(routes), "--admin-listen", "nowhere"])
    assert result.exit_code == 1
    assert result.output == "error: admin listen address 'nowhere': write host:port\n"


ROUTES = """
routes:
  - id: a
    from: direct:a
    steps: [{to: "mock:a"}]
  - id: b
    from: seda:b
    steps: [{delay: 300ms}, {to: "mock:b"}]
"""


async def _running(file: Path, **settings: str) -> tuple[IntegrationContext, RoutesReloader]:
    """The routes of ``file`` started, as ``meshgate integration run`` starts them."""
    context = IntegrationContext(settings=settings)
    context.add_routes(load_routes(file, context=context).routes)
    await context.start()
    return context, RoutesReloader(context, file, overrides=settings, grace=2.0)


def test_a_reload_restarts_only_changed_routes_after_draining_them(tmp_path: Path) -> None:
    file = tmp_path / "routes.yaml"
    file.write_text(ROUTES)

    async def main() -> None:
        context, reloader = await _running(file)
        try:
            await context.send("direct:a", "before")
            await context.send("seda:b", "in flight")
            while context.route_stats("b")["inflight"] == 0:
                await asyncio.sleep(0.005)
            file.write_text(
                ROUTES.replace('[{delay: 300ms}, {to: "mock:b"}]', '[{to: "mock:b2"}]')
                + '  - id: c\n    from: direct:c\n    steps: [{to: "mock:c"}]\n'
            )
            result = await reloader.reload()
            assert (result.stopped, result.started, result.failed) == (["b"], ["b", "c"], {})
            # The exchange in flight in the old b finished before b was replaced.
            assert mock_endpoint(context, "mock:b").bodies == ["in flight"]
            await context.send("seda:b", "after")
            await mock_endpoint(context, "mock:b2").wait_for(1)
            await context.send("direct:c", "new")
            assert mock_endpoint(context, "mock:c").bodies == ["new"]
            # The unchanged route kept running, with its counts.
            assert context.route_stats("a")["completed"] == 1
            assert [r.id for r in context.routes] == ["a", "b", "c"]
        finally:
            await context.stop(grace=2.0)

    run(main)


def test_a_file_that_fails_to_validate_is_refused_and_the_routes_kept(tmp_path: Path) -> None:
    file = tmp_path / "routes.yaml"
    file.write_text(ROUTES)

    async def main() -> None:
        context, reloader = await _running(file)
        try:
            file.write_text(ROUTES.replace('"mock:a"', '"smtp:a"'))
            result = await reloader.reload()
            assert len(result.refused) == 1
            assert "unknown endpoint scheme 'smtp'" in result.refused[0]
            assert result.stopped == result.started == []
            await context.send("direct:a", "still")
            assert mock_endpoint(context, "mock:a").bodies == ["still"]
            assert context.route_status("b") == "started"
        finally:
            await context.stop(grace=2.0)

    run(main)


def test_a_reloaded_route_that_fails_to_start_is_reported_and_the_others_run(
    tmp_path: Path,
) -> None:
    file = tmp_path / "routes.yaml"
    file.write_text(ROUTES)

    async def main() -> None:
        busy = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = busy.sockets[0].getsockname()[1]
        context, reloader = await _running(file, http_listen=f"127.0.0.1:{port}")
        try:
            file.write_text(
                ROUTES + '  - id: web\n    from: "http:/x"\n    steps: [{to: "mock:web"}]\n'
            )
            result = await reloader.reload()
            assert result.started == []
            assert f"cannot listen on 127.0.0.1:{port}" in result.failed["web"]
            assert context.route_status("web") == "failed"
            assert f"cannot listen on 127.0.0.1:{port}" in (context.route_error("web") or "")
            await context.send("direct:a", "served")
            assert mock_endpoint(context, "mock:a").bodies == ["served"]
        finally:
            await context.stop(grace=2.0)
            busy.close()

    run(main)


def test_run_reloads_a_changed_file(tmp_path: Path) -> None:
    admin = free_port()
    routes = tmp_path / "routes.yaml"
    routes.write_text("routes: [{id: a, from: 'direct:a', steps: [{log: a}]}]\n")
    proc = subprocess.Popen(
        [*COMMAND, "run", str(routes), "--admin-listen", f"127.0.0.1:{admin}"],
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_port(admin, proc=proc)
        routes.write_text(
            "routes: [{id: a, from: 'direct:a', steps: [{log: a}]},"
            " {id: b, from: 'direct:b', steps: [{log: b}]}]\n"
        )
        deadline = time.monotonic() + 10
        ids: list[str] = []
        while time.monotonic() < deadline and ids != ["a", "b"]:
            time.sleep(0.1)
            listed = httpx.get(f"http://127.0.0.1:{admin}/routes").json()["routes"]
            ids = [r["id"] for r in listed if r["status"] == "started"]
        assert ids == ["a", "b"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err.decode()
    assert "reloaded: 0 route(s) stopped, 1 started, 0 failed, 1 unchanged" in err.decode()


def test_the_admin_api_shows_the_last_reload_and_reloads_on_post(tmp_path: Path) -> None:
    file = tmp_path / "routes.yaml"
    file.write_text(ROUTES)

    async def main() -> None:
        context, reloader = await _running(file)
        admin = AdminListener(context, "127.0.0.1:0", grace=2.0, reloader=reloader)
        await admin.start()
        try:
            async with httpx.AsyncClient(base_url=admin.url) as client:
                assert (await client.get("/reload")).json() == {"file": str(file), "last": None}
                file.write_text(ROUTES.replace('"mock:a"', '"smtp:a"'))
                refused = await client.post("/reload")
                assert refused.status_code == 422
                last = refused.json()["last"]
                assert "unknown endpoint scheme 'smtp'" in last["refused"][0]
                assert last["at"] <= time.time()
                file.write_text(ROUTES.replace('"mock:a"', '"mock:a2"'))
                applied = await client.post("/reload")
                assert applied.status_code == 200
                last = applied.json()["last"]
                assert (last["refused"], last["stopped"], last["started"]) == ([], ["a"], ["a"])
                assert (await client.get("/reload")).json()["last"] == last
                assert (await client.put("/reload")).status_code == 405
            await context.send("direct:a", "x")
            assert mock_endpoint(context, "mock:a2").bodies == ["x"]
        finally:
            await admin.stop()
            await context.stop(grace=2.0)

    run(main)


def test_without_a_watched_file_the_reload_path_says_so() -> None:
    async def main() -> None:
        context = IntegrationContext()
        admin = AdminListener(context, "127.0.0.1:0")
        await admin.start()
        try:
            async with httpx.AsyncClient(base_url=admin.url) as client:
                missing = await client.get("/reload")
                assert missing.status_code == 404 and "--no-watch" in missing.text
        finally:
            await admin.stop()

    run(main)


def test_while_the_runtime_stops_nothing_starts_or_reloads(tmp_path: Path) -> None:
    file = tmp_path / "routes.yaml"
    file.write_text(ROUTES)

    async def main() -> None:
        context, reloader = await _running(file)
        admin = AdminListener(context, "127.0.0.1:0", grace=2.0, reloader=reloader)
        await admin.start()
        try:
            await context.stop_route("a")
            await context.send("seda:b", "in flight")  # b drains for 300 ms
            while context.route_stats("b")["inflight"] == 0:
                await asyncio.sleep(0.005)
            stopping = asyncio.ensure_future(context.stop(grace=2.0))
            await asyncio.sleep(0.05)
            file.write_text(ROUTES.replace('"mock:a"', '"mock:a2"'))
            async with httpx.AsyncClient(base_url=admin.url) as client:
                for path in ("/reload", "/routes/a/start"):
                    refused = await client.post(path)
                    assert refused.status_code == 503, path
                    assert "the runtime is stopping" in refused.text
            result = await reloader.reload()  # as SIGHUP would
            assert result.refused == ["the runtime is stopping: nothing reloaded"]
            with pytest.raises(IntegrationError, match="the runtime is stopping"):
                await context.start_route("a")
            assert await stopping
            assert {context.route_status(r.id) for r in context.routes} == {"stopped"}
        finally:
            await admin.stop()

    run(main)
