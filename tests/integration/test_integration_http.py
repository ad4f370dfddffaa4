"""The http connector: routes served by the project's HTTP engine, calls to a real upstream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from harness import echo_upstream, free_port
from integration_kit import run_routes

from meshgate.integration import (
    DefinitionError,
    HttpOperationFailed,
    IntegrationContext,
    SchemaValidationError,
    from_,
)
from meshgate.integration.testing import mock_endpoint


def test_a_route_answers_http_requests_through_the_engine() -> None:
    port = free_port()
    routes = [
        from_("http:/hello?method=GET", id="hello")
        .set_header("x-greeted", expr='headers."x-who"')
        .transform(expr='{hello: headers."x-who", query: headers.http_query}')
        .to("mock:seen")
        .build(),
        from_("http:/items?method=GET,DELETE&match_on_uri_prefix=true", id="items")
        .transform(template="{{ headers.http_method }} {{ headers.http_path }}")
        .build(),
        from_("http:/broken?method=GET", id="broken").validate(expr="headers.ok").build(),
    ]

    async def scenario(context: IntegrationContext) -> None:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            reply = await client.get("/hello?x=1", headers={"x-who": "ada"})
            assert reply.status_code == 200
            assert reply.json() == {"hello": "ada", "query": "x=1"}
            assert reply.headers["content-type"] == "application/json"
            assert reply.headers["x-greeted"] == "ada"
            assert "x-who" not in reply.headers  # request fields are not echoed back
            seen = mock_endpoint(context, "mock:seen").received[0]
            assert seen.pattern.value == "InOut"
            reply = await client.delete("/items/42")
            assert (reply.status_code, reply.text) == (200, "DELETE /items/42")
            assert reply.headers["content-type"] == "text/plain; charset=utf-8"
            reply = await client.post("/hello", content=b"{}")
            assert reply.status_code == 405
            assert reply.headers["allow"] == "GET"
            reply = await client.get("/nothing")
            assert reply.status_code == 404
            assert reply.headers["content-type"] == "application/problem+json"
            reply = await client.get("/broken")
            assert reply.status_code == 422
            assert "is not true" in reply.json()["detail"]

    run_routes(routes, scenario, settings={"http_listen": f"127.0.0.1:{port}"})


def test_a_request_body_becomes_the_message_body() -> None:
    port = free_port()
    routes = [
        from_("http:/orders?method=POST,PUT", id="orders")
        .to("mock:orders")
        .unmarshal("json")
        .transform(expr="{id: id, lines: length(items)}")
        .build(),
        from_("http:/raw?method=POST&max_body_size=16", id="raw")
        .transform(template="{{ body | length }} bytes")
        .build(),
    ]

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"id": 7, '
        yield b'"items": [1, 2, 3]}'

    async def scenario(context: IntegrationContext) -> None:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            reply = await client.post("/orders", json={"id": 1, "items": [{"sku": "a"}]})
            assert (reply.status_code, reply.json()) == (200, {"id": 1, "lines": 1})
            received = mock_endpoint(context, "mock:orders").received[0]
            assert received.body == b'{"id":1,"items":[{"sku":"a"}]}'  # the bytes as sent
            assert received.headers["content-type"] == "application/json"
            reply = await client.put("/orders", content=chunks())  # chunked
            assert (reply.status_code, reply.json()) == (200, {"id": 7, "lines": 3})
            reply = await client.post("/raw", content=b"0123456789abcdef")
            assert (reply.status_code, reply.text) == (200, "16 bytes")
            reply = await client.post("/raw", content=b"0123456789abcdefg")
            assert reply.status_code == 413
            assert reply.headers["content-type"] == "application/problem+json"
            assert "exceeds 16 bytes" in reply.json()["detail"]
            reply = await client.post("/orders", content=b"{not json")
            assert reply.status_code == 400
            assert "malformed JSON" in reply.json()["detail"]

    run_routes(routes, scenario, settings={"http_listen": f"127.0.0.1:{port}"})


def test_the_max_body_size_option_is_checked() -> None:
    with pytest.raises(DefinitionError, match="max_body_size"):
        IntegrationContext().add_routes(
            [from_("http:/x?max_body_size=-1", id="x").build()],
        )


def test_an_http_call_sends_the_message_and_takes_the_reply(tmp_path: Path) -> None:
    with echo_upstream(tmp_path) as upstream:
        base = f"http://127.0.0.1:{upstream}"
        routes = [
            from_("direct:call", id="call")
            .to(f"{base}/api/orders?debug=1")
            .unmarshal("json")
            .build(),
            from_("direct:fail", id="fail").to(f"{base}/status/503").build(),
            from_("direct:soft", id="soft").to(f"{base}/status/404?throw_on_failure=false").build(),
            from_("direct:evil", id="evil").to(f"{base}/x").build(),
        ]

        async def scenario(context: IntegrationContext) -> None:
            for _ in range(3):  # the pooled connection is reused
                reply = await context.request("direct:call", {"id": 7}, {"x-trace": "t1"})
                echo = reply.body
                assert echo["method"] == "POST"
                assert echo["path"] == "/api/orders"
                assert echo["query"] == "debug=1"
                assert echo["body_length"] == len(json.dumps({"id": 7}, separators=(",", ":")))
                assert echo["headers"]["x-trace"] == "t1"
                assert echo["headers"]["content-type"] == "application/json"
                assert reply.headers["http_response_code"] == 200
            failed = await context.send("direct:fail")
            assert isinstance(failed.exception, HttpOperationFailed)
            assert failed.exception.status == 503
            soft = await context.request("direct:soft")
            assert soft.headers["http_response_code"] == 404
            evil = await context.send("direct:evil", "x", {"x-evil": "a\r\nx-injected: 1"})
            assert "line break" in str(evil.exception)

        run_routes(routes, scenario)


def test_an_unreachable_service_is_a_clear_failure() -> None:
    port = free_port()
    route = from_("direct:call", id="call").to(f"http://127.0.0.1:{port}/x").build()

    async def scenario(context: IntegrationContext) -> None:
        failed = await context.send("direct:call", "x")
        assert f"cannot connect to 127.0.0.1:{port}" in str(failed.exception)
        assert failed.exception is not None and not isinstance(
            failed.exception, SchemaValidationError
        )

    run_routes([route], scenario)


def test_two_routes_cannot_serve_the_same_path_and_method() -> None:
    port = free_port()
    routes = [
        from_("http:/a?method=GET", id="one").build(),
        from_("http:/a?method=GET", id="two").build(),
    ]

    async def main() -> None:
        context = IntegrationContext(settings={"http_listen": f"127.0.0.1:{port}"})
        context.add_routes(routes)
        try:
            await context.start()
        except Exception as exc:
            assert "serves this path already" in str(exc)
        assert context.route_status("one") == "started"
        assert context.route_status("two") == "failed"
        await context.stop()

    import asyncio

    asyncio.run(main())


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("x-split", "a\r\nset-cookie: stolen=1"),
        ("x-line", "a\nb"),
        ("bad name", "v"),
        ("x-colon:", "v"),
        ("x-city", "東京"),
    ],
)
def test_a_reply_header_that_would_break_the_response_is_refused(name: str, value: str) -> None:
    port = free_port()
    routes = [
        from_("http:/h?method=POST", id="h")
        .unmarshal("json")
        .set_header(name, expr="v")
        .transform("ok")
        .build()
    ]

    async def scenario(context: IntegrationContext) -> None:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            reply = await client.post("/h", json={"v": value})
            assert reply.status_code == 500
            assert f"the reply header {name!r} is not a valid HTTP field" in reply.text
            assert "set-cookie" not in reply.headers
            if name.startswith("x-") and not name.endswith(":"):
                ok = await client.post("/h", json={"v": "Zürich"})  # latin-1: sent as is
                assert ok.status_code == 200 and ok.headers[name] == "Zürich"

    run_routes(routes, scenario, settings={"http_listen": f"127.0.0.1:{port}"})
